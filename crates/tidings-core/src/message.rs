//! Messages, positions and their envelope encoding.
//!
//! A message is encoded once: the envelope is kept as two shared byte strings around the
//! cursor (`head` + cursor + `tail`), because the cursor is the one part that differs per
//! subscription (a multi-channel cursor covers every channel of its subscription). Every other
//! wire format a transport needs is cached in `cached_frame` slots, so each format is
//! serialized at most once per message whatever the number of subscribers.

use std::fmt;
use std::sync::{Arc, OnceLock};

use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;

use crate::channel::{ChannelName, EventName};
use crate::cursor::Cursor;

/// The name of one incarnation of a channel's stream. It changes when history is lost.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Epoch(Arc<str>);

pub const MAX_EPOCH_LEN: usize = 32;

impl Epoch {
    /// Accepts 1–32 URL-safe ASCII characters (the alphabet every broker draws from).
    pub fn new(s: &str) -> Option<Self> {
        let valid = !s.is_empty()
            && s.len() <= MAX_EPOCH_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        valid.then(|| Self(Arc::from(s)))
    }

    /// A fresh random epoch of 8 base-36 characters.
    pub fn random() -> Self {
        const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let s: String = (0..8)
            .map(|_| char::from(ALPHABET[rand::random_range(0..ALPHABET.len())]))
            .collect();
        Self(Arc::from(s.as_str()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}
impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl Serialize for Epoch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// `(epoch, offset)` in one channel. Offset 0 means "before the first message".
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Position {
    pub epoch: Epoch,
    pub offset: u64,
}

/// What was published. JSON is kept as its (validated) text; text as UTF-8 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Data {
    Json(Bytes),
    Text(Bytes),
    Binary(Bytes),
}

impl Data {
    pub fn len(&self) -> usize {
        match self {
            Data::Json(b) | Data::Text(b) | Data::Binary(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The payload as a raw transport sends it: JSON text, the string, or the bytes.
    pub fn raw(&self) -> &Bytes {
        match self {
            Data::Json(b) | Data::Text(b) | Data::Binary(b) => b,
        }
    }

    /// Appends the JSON value used in envelopes.
    pub fn write_json<B: BufMut + AsMut<[u8]>>(&self, out: &mut B) {
        match self {
            // Raw CR/LF can only be insignificant whitespace in valid JSON (inside strings
            // they must be escaped), so replacing them keeps the value and keeps an envelope
            // on one line, which NDJSON and SSE `data:` need.
            Data::Json(b) => {
                let start = out.as_mut().len();
                out.put_slice(b);
                for byte in &mut out.as_mut()[start..] {
                    if *byte == b'\n' || *byte == b'\r' {
                        *byte = b' ';
                    }
                }
            }
            Data::Text(b) => write_json_str(out, &text_of(b)),
            Data::Binary(b) => {
                out.put_u8(b'"');
                out.put_slice(
                    base64::engine::general_purpose::STANDARD
                        .encode(b)
                        .as_bytes(),
                );
                out.put_u8(b'"');
            }
        }
    }

    /// Text for transports that carry only text (raw SSE): binary becomes base64.
    pub fn as_text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Data::Json(b) | Data::Text(b) => text_of(b),
            Data::Binary(b) => base64::engine::general_purpose::STANDARD.encode(b).into(),
        }
    }
}

/// The text of bytes that were validated as UTF-8 when published: `from_utf8`'s ASCII fast
/// path instead of `from_utf8_lossy`'s chunk iterator (several times slower on valid input).
fn text_of(b: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(b) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(b),
    }
}

/// Appends `s` as a JSON string literal.
pub fn write_json_str<B: BufMut>(out: &mut B, s: &str) {
    // serde_json's escaper is correct for every code point; writing into a Vec cannot fail.
    let mut w = out.writer();
    if serde_json::to_writer(&mut w, s).is_err() {
        w.get_mut().put_slice(b"\"\"");
    }
}

/// Slots a transport may use to cache its own per-message frame (see `Message::cached_frame`).
pub const FRAME_SLOTS: usize = 6;

pub struct Message {
    pub channel: ChannelName,
    pub epoch: Epoch,
    pub offset: u64,
    pub event: Option<EventName>,
    pub data: Data,
    /// Milliseconds since the Unix epoch, set by the broker.
    pub time: u64,
    /// Kept apart from the envelope: raw transports and publish replies need only the cursor.
    /// In the message itself (a one-channel cursor is at most `SINGLE_MAX` bytes): its text
    /// was an allocation of every publish (issue 17).
    cursor: OnceLock<CursorText>,
    envelope: OnceLock<EnvelopeParts>,
    frames: [OnceLock<Bytes>; FRAME_SLOTS],
}

/// A message's own cursor text.
struct CursorText {
    text: [u8; crate::cursor::SINGLE_MAX],
    len: u8,
}

/// The envelope with the message's own cursor, inside the one-message poll reply that holds
/// it: `all` is `{"messages":[` envelope `],"cursor":"` cursor `","gaps":[]}`, the envelope
/// is `all[POLL_START.len()..end]` and the cursor inside it is `all[head..tail]`. One buffer
/// for both, and not `Bytes` (issue 17): its sharing was one more allocation per message.
/// Whoever shares the reply shares the message (`Arc<Message>`) instead.
struct EnvelopeParts {
    all: Vec<u8>,
    head: usize,
    tail: usize,
    end: usize,
}

const POLL_START: &[u8] = b"{\"messages\":[";

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("channel", &self.channel)
            .field("epoch", &self.epoch)
            .field("offset", &self.offset)
            .field("event", &self.event)
            .field("len", &self.data.len())
            .finish()
    }
}

impl Message {
    pub fn new(
        channel: ChannelName,
        position: Position,
        event: Option<EventName>,
        data: Data,
        time: u64,
    ) -> Self {
        Self {
            channel,
            epoch: position.epoch,
            offset: position.offset,
            event,
            data,
            time,
            cursor: OnceLock::new(),
            envelope: OnceLock::new(),
            frames: Default::default(),
        }
    }

    pub fn position(&self) -> Position {
        Position {
            epoch: self.epoch.clone(),
            offset: self.offset,
        }
    }

    /// Bytes this message counts for in an outbound queue.
    pub fn weight(&self) -> usize {
        self.data.len() + 160
    }

    /// The envelope with this message's own cursor and the poll reply around it, written
    /// once into one buffer whose slices are the parts (one allocation; issue 17).
    fn parts(&self) -> &EnvelopeParts {
        self.envelope.get_or_init(|| {
            let cursor = self.cursor();
            let (channel, epoch) = (self.channel.as_str(), self.epoch.as_str());
            let event = self.event.as_ref().map_or(0, |e| e.as_str().len() + 11);
            let mut out = Vec::with_capacity(
                160 + channel.len() + epoch.len() + 2 * cursor.len() + event + self.data.len(),
            );
            let mut number = itoa::Buffer::new();
            out.put_slice(POLL_START);
            out.put_slice(b"{\"channel\":\"");
            out.put_slice(channel.as_bytes());
            out.put_slice(b"\",\"offset\":");
            out.put_slice(number.format(self.offset).as_bytes());
            out.put_slice(b",\"epoch\":\"");
            out.put_slice(epoch.as_bytes());
            out.put_slice(b"\",\"cursor\":\"");
            let head = out.len();
            out.put_slice(cursor);
            let tail = out.len();
            out.put_u8(b'"');
            if let Some(event) = &self.event {
                out.put_slice(b",\"event\":\"");
                out.put_slice(event.as_str().as_bytes());
                out.put_u8(b'"');
            }
            out.put_slice(b",\"data\":");
            self.data.write_json(&mut out);
            if matches!(self.data, Data::Binary(_)) {
                out.put_slice(b",\"encoding\":\"base64\"");
            }
            out.put_slice(b",\"time\":");
            out.put_slice(number.format(self.time).as_bytes());
            out.put_u8(b'}');
            let end = out.len();
            out.put_slice(b"],\"cursor\":\"");
            out.put_slice(cursor);
            out.put_slice(b"\",\"gaps\":[]}");
            EnvelopeParts {
                all: out,
                head,
                tail,
                end,
            }
        })
    }

    /// The cursor of this message's own channel at this message (valid as `since`).
    pub fn cursor(&self) -> &[u8] {
        let c = self.cursor.get_or_init(|| {
            let mut text = [0u8; crate::cursor::SINGLE_MAX];
            let len = Cursor::encode_single_into(&self.channel, &self.position(), &mut text);
            CursorText {
                text,
                // At most `SINGLE_MAX` (72).
                len: len as u8,
            }
        });
        &c.text[..usize::from(c.len)]
    }

    /// Appends the envelope with the given cursor text (a subscription's cursor).
    pub fn write_envelope(&self, out: &mut BytesMut, cursor: &[u8]) {
        let p = self.parts();
        let (head, tail) = (&p.all[POLL_START.len()..p.head], &p.all[p.tail..p.end]);
        out.reserve(head.len() + cursor.len() + tail.len());
        out.put_slice(head);
        out.put_slice(cursor);
        out.put_slice(tail);
    }

    /// The envelope with this message's own cursor, encoded once.
    pub fn envelope(&self) -> &[u8] {
        let p = self.parts();
        &p.all[POLL_START.len()..p.end]
    }

    /// A poll's whole reply when this message is all it answers, with its own cursor and no
    /// gaps (SPEC §3: `{"messages":[envelope],"cursor":"…","gaps":[]}`): what every held
    /// one-channel poll of the channel answers, in the envelope's own buffer (shared by
    /// sharing the message).
    pub fn poll_reply(&self) -> &[u8] {
        &self.parts().all
    }

    /// A per-message frame cache for transports: `slot` must be one the caller owns
    /// (each transport names its slot constant), `encode` runs at most once per message.
    pub fn cached_frame(&self, slot: usize, encode: impl FnOnce(&Message) -> Bytes) -> &Bytes {
        self.frames[slot % FRAME_SLOTS].get_or_init(|| encode(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(data: Data, event: Option<&str>) -> Message {
        Message::new(
            ChannelName::new("chat:lobby").unwrap(),
            Position {
                epoch: Epoch::new("h3k9").unwrap(),
                offset: 42,
            },
            event.map(|e| EventName::new(e).unwrap()),
            data,
            1_732_200_000_123,
        )
    }

    #[test]
    fn an_envelope_is_valid_json_with_every_spec_field() {
        let m = msg(Data::Json(Bytes::from_static(b"{\"a\":\n 1}")), Some("msg"));
        let v: serde_json::Value = serde_json::from_slice(m.envelope()).unwrap();
        assert_eq!(v["channel"], "chat:lobby");
        assert_eq!(v["offset"], 42);
        assert_eq!(v["epoch"], "h3k9");
        assert_eq!(v["event"], "msg");
        assert_eq!(v["data"]["a"], 1);
        assert_eq!(v["time"], 1_732_200_000_123u64);
        assert_eq!(v["cursor"].as_str().unwrap().as_bytes(), m.cursor());
        assert!(!m.envelope().contains(&b'\n'));
    }

    #[test]
    fn text_data_is_a_json_string_and_binary_is_base64_with_its_encoding() {
        let m = msg(Data::Text(Bytes::from_static(b"he said \"hi\"\n")), None);
        let v: serde_json::Value = serde_json::from_slice(m.envelope()).unwrap();
        assert_eq!(v["data"], "he said \"hi\"\n");
        assert!(v.get("event").is_none());
        let m = msg(Data::Binary(Bytes::from_static(&[0, 255])), None);
        let v: serde_json::Value = serde_json::from_slice(m.envelope()).unwrap();
        assert_eq!(v["data"], "AP8=");
        assert_eq!(v["encoding"], "base64");
    }

    #[test]
    fn the_poll_reply_holds_the_envelope_and_the_cursor() {
        let m = msg(Data::Json(Bytes::from_static(b"[1]")), Some("msg"));
        let mut expected = b"{\"messages\":[".to_vec();
        expected.extend_from_slice(m.envelope());
        expected.extend_from_slice(b"],\"cursor\":\"");
        expected.extend_from_slice(m.cursor());
        expected.extend_from_slice(b"\",\"gaps\":[]}");
        assert_eq!(m.poll_reply(), &expected[..]);
        let mut written = BytesMut::new();
        m.write_envelope(&mut written, b"XYZ");
        let v: serde_json::Value = serde_json::from_slice(&written).unwrap();
        assert_eq!(v["cursor"], "XYZ");
        assert_eq!(v["time"], 1_732_200_000_123u64);
    }

    #[test]
    fn epochs_are_short_and_url_safe() {
        let e = Epoch::random();
        assert_eq!(e.as_str().len(), 8);
        assert!(Epoch::new(e.as_str()).is_some());
        assert!(Epoch::new("no spaces").is_none());
    }
}
