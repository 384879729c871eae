//! What travels through Redis, and how it is read back.
//!
//! Pub/sub payloads are built by the Lua scripts, byte-exact:
//! - a message: `m<epoch>\n<offset>\n<time ms>\n<kind>\n<event>\n<data>` (kind `j` JSON, `t`
//!   text, `b` binary; event empty when unset; data is the rest, any bytes);
//! - a join or leave: `j` or `l` followed by the client's `{"client","user"}` JSON.
//!
//! History entries are stream entries `<offset>-<time ms>` with fields `k` (kind), `v` (event,
//! absent when unset) and `d` (data).

use std::sync::Arc;

use bytes::Bytes;
use redis::Value;
use tidings_core::presence::{ClientInfo, PresenceKind};
use tidings_core::{ChannelName, Data, Epoch, EventName, Message, Position};

pub fn kind_of(data: &Data) -> &'static str {
    match data {
        Data::Json(_) => "j",
        Data::Text(_) => "t",
        Data::Binary(_) => "b",
    }
}

fn data_of(kind: &[u8], bytes: Bytes) -> Option<Data> {
    match kind {
        b"j" => Some(Data::Json(bytes)),
        b"t" => Some(Data::Text(bytes)),
        b"b" => Some(Data::Binary(bytes)),
        _ => None,
    }
}

fn event_of(raw: &[u8]) -> Result<Option<EventName>, &'static str> {
    if raw.is_empty() {
        return Ok(None);
    }
    let s = std::str::from_utf8(raw).map_err(|_| "event is not UTF-8")?;
    EventName::new(s)
        .map(Some)
        .map_err(|_| "invalid event name")
}

fn number(raw: &[u8]) -> Option<u64> {
    std::str::from_utf8(raw).ok()?.parse().ok()
}

/// The client JSON stored in presence and sent with joins and leaves.
pub fn client_json(info: &ClientInfo) -> String {
    serde_json::json!({"client": info.client, "user": info.user}).to_string()
}

pub fn parse_client(raw: &[u8]) -> Option<ClientInfo> {
    let v: serde_json::Value = serde_json::from_slice(raw).ok()?;
    Some(ClientInfo {
        client: v.get("client")?.as_str()?.to_owned(),
        user: v.get("user").and_then(|u| u.as_str()).map(str::to_owned),
    })
}

/// The pub/sub payload of a join or leave.
pub fn announcement(kind: PresenceKind, info: &ClientInfo) -> Vec<u8> {
    let tag = match kind {
        PresenceKind::Join => b'j',
        PresenceKind::Leave => b'l',
    };
    let mut out = vec![tag];
    out.extend_from_slice(client_json(info).as_bytes());
    out
}

/// A decoded pub/sub payload.
#[derive(Debug)]
pub enum Push {
    /// Shared already: the hub hands the same `Arc` to every subscriber.
    Message(Arc<Message>),
    Presence(PresenceKind, ClientInfo),
}

/// Decodes a pub/sub payload of `channel`. `epoch_cache` holds the channel's last epoch, so
/// the common case (same epoch as the previous message) allocates no new one.
pub fn decode_push(
    channel: &ChannelName,
    payload: Bytes,
    epoch_cache: &mut Option<Epoch>,
) -> Result<Push, &'static str> {
    match payload.first() {
        Some(b'm') => {}
        Some(b'j') => {
            let info = parse_client(&payload[1..]).ok_or("invalid join")?;
            return Ok(Push::Presence(PresenceKind::Join, info));
        }
        Some(b'l') => {
            let info = parse_client(&payload[1..]).ok_or("invalid leave")?;
            return Ok(Push::Presence(PresenceKind::Leave, info));
        }
        _ => return Err("unknown payload type"),
    }
    // Five header fields, each ended by a newline; the data is everything after.
    let mut fields = [&b""[..]; 5];
    let mut at = 1;
    for field in &mut fields {
        let len = payload[at..]
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("truncated header")?;
        *field = &payload[at..at + len];
        at += len + 1;
    }
    let [epoch, offset, time, kind, event] = fields;
    let epoch = match epoch_cache {
        Some(e) if e.as_str().as_bytes() == epoch => e.clone(),
        _ => {
            let e = std::str::from_utf8(epoch)
                .ok()
                .and_then(Epoch::new)
                .ok_or("invalid epoch")?;
            *epoch_cache = Some(e.clone());
            e
        }
    };
    let offset = number(offset).ok_or("invalid offset")?;
    let time = number(time).ok_or("invalid time")?;
    let event = event_of(event)?;
    let data = data_of(kind, payload.slice(at..)).ok_or("invalid data kind")?;
    Ok(Push::Message(Arc::new(Message::new(
        channel.clone(),
        Position { epoch, offset },
        event,
        data,
        time,
    ))))
}

/// A history entry (`[id, [field, value, …]]`) as a message of `channel` in `epoch`.
pub fn entry_message(
    channel: &ChannelName,
    epoch: &Epoch,
    entry: Value,
) -> Result<Message, &'static str> {
    let Value::Array(mut parts) = entry else {
        return Err("entry is not an array");
    };
    if parts.len() != 2 {
        return Err("entry is not [id, fields]");
    }
    let fields = parts.pop().and_then(array).ok_or("entry fields")?;
    let id = parts.pop().and_then(bytes).ok_or("entry id")?;
    let (offset, time) = id
        .iter()
        .position(|&b| b == b'-')
        .and_then(|dash| Some((number(&id[..dash])?, number(&id[dash + 1..])?)))
        .ok_or("invalid entry id")?;
    let (mut kind, mut event, mut data) = (None, None, None);
    let mut fields = fields.into_iter();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        let (Some(name), Some(value)) = (bytes(name), bytes(value)) else {
            return Err("entry field is not a string");
        };
        match &name[..] {
            b"k" => kind = Some(value),
            b"v" => event = Some(value),
            b"d" => data = Some(value),
            _ => {}
        }
    }
    let kind = kind.ok_or("entry without kind")?;
    let data = data_of(&kind, Bytes::from(data.ok_or("entry without data")?))
        .ok_or("invalid data kind")?;
    let event = event_of(event.as_deref().unwrap_or_default())?;
    Ok(Message::new(
        channel.clone(),
        Position {
            epoch: epoch.clone(),
            offset,
        },
        event,
        data,
        time,
    ))
}

pub fn bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Okay => Some(b"OK".to_vec()),
        _ => None,
    }
}

pub fn array(v: Value) -> Option<Vec<Value>> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a),
        _ => None,
    }
}

pub fn integer(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => number(b),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

pub fn epoch(v: Value) -> Option<Epoch> {
    Epoch::new(std::str::from_utf8(&bytes(v)?).ok()?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ch() -> ChannelName {
        ChannelName::new("chat:lobby").unwrap()
    }

    #[test]
    fn a_message_payload_decodes_with_data_that_contains_newlines() {
        let payload = Bytes::from_static(b"mh3k9\n42\n1732200000123\nt\nmsg\nline 1\nline 2");
        let mut cache = None;
        let Push::Message(m) = decode_push(&ch(), payload, &mut cache).unwrap() else {
            panic!("not a message");
        };
        assert_eq!(
            (m.epoch.as_str(), m.offset, m.time),
            ("h3k9", 42, 1_732_200_000_123)
        );
        assert_eq!(m.event.as_ref().map(|e| e.as_str()), Some("msg"));
        assert_eq!(m.data, Data::Text(Bytes::from_static(b"line 1\nline 2")));
        assert_eq!(cache.as_ref().map(Epoch::as_str), Some("h3k9"));
    }

    #[test]
    fn binary_data_and_no_event_survive_the_payload() {
        let mut p = b"me1\n1\n5\nb\n\n".to_vec();
        p.extend_from_slice(&[0, 255, b'\n']);
        let Push::Message(m) = decode_push(&ch(), Bytes::from(p), &mut None).unwrap() else {
            panic!("not a message");
        };
        assert_eq!(m.event, None);
        assert_eq!(m.data, Data::Binary(Bytes::from_static(&[0, 255, b'\n'])));
    }

    #[test]
    fn a_corrupt_payload_is_an_error_not_a_panic() {
        for bad in [
            &b""[..],
            b"x",
            b"me1\n",
            b"me1\nNaN\n1\nt\n\nd",
            b"me1\n1\n1\nq\n\nd",
        ] {
            assert!(
                decode_push(&ch(), Bytes::copy_from_slice(bad), &mut None).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn joins_and_leaves_carry_the_client() {
        let info = ClientInfo {
            client: "c1".into(),
            user: Some("alice".into()),
        };
        let p = Bytes::from(announcement(PresenceKind::Leave, &info));
        match decode_push(&ch(), p, &mut None).unwrap() {
            Push::Presence(PresenceKind::Leave, got) => assert_eq!(got, info),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_stream_entry_decodes_to_its_message() {
        let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let entry = Value::Array(vec![
            b("7-1732200000999"),
            Value::Array(vec![
                b("k"),
                b("j"),
                b("v"),
                b("ev"),
                b("d"),
                b("{\"a\":1}"),
            ]),
        ]);
        let m = entry_message(&ch(), &Epoch::new("e").unwrap(), entry).unwrap();
        assert_eq!((m.offset, m.time), (7, 1_732_200_000_999));
        assert_eq!(m.data, Data::Json(Bytes::from_static(b"{\"a\":1}")));
        assert_eq!(m.event.as_ref().map(|e| e.as_str()), Some("ev"));
    }
}
