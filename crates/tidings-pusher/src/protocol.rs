//! The WebSocket protocol's messages (protocol version 7): what a client sends, parsed and
//! checked, and what the server sends, rendered. Pure: no sockets, no state.
//!
//! Every message is a JSON object `{"event", "channel"?, "data"?}`. The server's `data` is a
//! JSON-encoded string for events (pusher-js parses it), an object for `pusher:error` and
//! `pusher:subscription_error`.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

/// The protocol version served; pusher-js 4+ and Laravel Echo speak it.
pub const PROTOCOL: u32 = 7;
/// Seconds of silence after which the client should ping (sent in `connection_established`).
pub const ACTIVITY_TIMEOUT_SECS: u64 = 120;
/// Client events one connection may send per second (Pusher's documented limit).
pub const CLIENT_EVENTS_PER_SEC: u32 = 10;

/// Close and error codes (Pusher protocol: 4000–4099 don't reconnect, 4100–4199 reconnect
/// slowly, 4200–4299 reconnect now; 4300+ are errors that do not close).
pub mod code {
    pub const APP_NOT_FOUND: u16 = 4001;
    pub const OVER_QUOTA: u16 = 4004;
    pub const PATH_NOT_FOUND: u16 = 4005;
    pub const INVALID_VERSION: u16 = 4006;
    pub const UNSUPPORTED_PROTOCOL: u16 = 4007;
    pub const NO_PROTOCOL: u16 = 4008;
    pub const UNAUTHORIZED: u16 = 4009;
    pub const OVER_CAPACITY: u16 = 4100;
    pub const RECONNECT: u16 = 4200;
    pub const PONG_NOT_RECEIVED: u16 = 4201;
    pub const INACTIVE: u16 = 4202;
    pub const CLIENT_EVENT_RATE: u16 = 4301;
    /// Not in Pusher's table: a generic error that does not close (400-like).
    pub const BAD_REQUEST: u16 = 4300;
}

/// Checks `?protocol=` the way Pusher does: missing 4008, not a number 4006, not 5–7 4007.
pub fn check_protocol(query: Option<&str>) -> Result<(), (u16, &'static str)> {
    let value = query.and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "protocol")
            .map(|(_, v)| v)
    });
    match value.map(str::parse::<u32>) {
        None => Err((code::NO_PROTOCOL, "No protocol version supplied")),
        Some(Err(_)) => Err((code::INVALID_VERSION, "Invalid version string format")),
        Some(Ok(5..=PROTOCOL)) => Ok(()),
        Some(Ok(_)) => Err((code::UNSUPPORTED_PROTOCOL, "Unsupported protocol version")),
    }
}

/// A client message, checked.
#[derive(Debug, PartialEq)]
pub enum ClientMessage {
    Ping,
    Pong,
    Subscribe {
        channel: String,
        auth: Option<String>,
        channel_data: Option<String>,
    },
    Unsubscribe {
        channel: String,
    },
    Signin {
        auth: String,
        user_data: String,
    },
    /// `client-*`: `data` is the raw JSON text of the value the client sent.
    ClientEvent {
        event: String,
        channel: String,
        data: String,
    },
}

/// Why a frame is refused: a `pusher:error` with this code and message.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub code: u16,
    pub message: String,
}

impl Refused {
    fn bad(message: impl Into<String>) -> Self {
        Self {
            code: code::BAD_REQUEST,
            message: message.into(),
        }
    }
}

#[derive(Deserialize)]
struct Frame {
    event: String,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct SubscribeData {
    channel: String,
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    channel_data: Option<String>,
}

#[derive(Deserialize)]
struct SigninData {
    auth: String,
    user_data: String,
}

/// `data` may be an object or a JSON string holding one (older clients send the latter).
fn object_data<T: serde::de::DeserializeOwned>(data: Option<&RawValue>) -> Result<T, Refused> {
    let raw = data.ok_or_else(|| Refused::bad("missing data"))?;
    if let Ok(v) = serde_json::from_str::<T>(raw.get()) {
        return Ok(v);
    }
    let text: String =
        serde_json::from_str(raw.get()).map_err(|e| Refused::bad(format!("invalid data: {e}")))?;
    serde_json::from_str(&text).map_err(|e| Refused::bad(format!("invalid data: {e}")))
}

/// Parses one text frame. Unknown `pusher:` events are refused; anything else that is not a
/// `client-` event too.
pub fn parse(frame: &str) -> Result<ClientMessage, Refused> {
    let f: Frame = serde_json::from_str(frame)
        .map_err(|e| Refused::bad(format!("expected a JSON object with \"event\": {e}")))?;
    Ok(match f.event.as_str() {
        "pusher:ping" => ClientMessage::Ping,
        "pusher:pong" => ClientMessage::Pong,
        "pusher:subscribe" => {
            let d: SubscribeData = object_data(f.data.as_deref())?;
            ClientMessage::Subscribe {
                channel: d.channel,
                auth: d.auth,
                channel_data: d.channel_data,
            }
        }
        "pusher:unsubscribe" => {
            let d: SubscribeData = object_data(f.data.as_deref())?;
            ClientMessage::Unsubscribe { channel: d.channel }
        }
        "pusher:signin" => {
            let d: SigninData = object_data(f.data.as_deref())?;
            ClientMessage::Signin {
                auth: d.auth,
                user_data: d.user_data,
            }
        }
        e if e.starts_with("client-") => ClientMessage::ClientEvent {
            event: f.event.clone(),
            channel: f
                .channel
                .ok_or_else(|| Refused::bad("a client event needs \"channel\""))?,
            data: f
                .data
                .map_or_else(|| "null".to_owned(), |d| d.get().to_owned()),
        },
        other => {
            return Err(Refused::bad(format!(
                "unsupported event {:?}",
                other.chars().take(64).collect::<String>()
            )));
        }
    })
}

/// Presence `channel_data`: `user_id` (a string or number, made a string) and `user_info`.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    pub user_id: String,
    pub user_info: Value,
}

/// Parses presence `channel_data`; `Err` when it is not JSON or has no usable `user_id`.
pub fn parse_member(channel_data: &str) -> Result<Member, String> {
    let v: Value =
        serde_json::from_str(channel_data).map_err(|e| format!("channel_data is not JSON: {e}"))?;
    let user_id = match v.get("user_id") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 128 => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err("presence channel_data needs a user_id (a non-empty string of at most 128 bytes, or a number)".into()),
    };
    Ok(Member {
        user_id,
        user_info: v.get("user_info").cloned().unwrap_or(Value::Null),
    })
}

/// Sign-in `user_data`: needs an `id`.
pub fn parse_user(user_data: &str) -> Result<String, String> {
    let v: Value =
        serde_json::from_str(user_data).map_err(|e| format!("user_data is not JSON: {e}"))?;
    match v.get("id") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 128 => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        _ => Err("user_data needs an id".into()),
    }
}

// ---- server messages ----

fn message(event: &str, channel: Option<&str>, data: Value) -> String {
    let mut m = serde_json::Map::new();
    m.insert("event".into(), json!(event));
    if let Some(c) = channel {
        m.insert("channel".into(), json!(c));
    }
    m.insert("data".into(), data);
    Value::Object(m).to_string()
}

pub fn connection_established(socket_id: &str) -> String {
    let data = json!({"socket_id": socket_id, "activity_timeout": ACTIVITY_TIMEOUT_SECS});
    message(
        "pusher:connection_established",
        None,
        json!(data.to_string()),
    )
}

/// `pusher:error`; `code` is `null` for errors Pusher gives no code.
pub fn error(code: Option<u16>, text: &str) -> String {
    message("pusher:error", None, json!({"code": code, "message": text}))
}

pub fn pong() -> String {
    message("pusher:pong", None, json!({}))
}

pub fn ping() -> String {
    message("pusher:ping", None, json!({}))
}

/// `pusher_internal:subscription_succeeded`; `data` is the JSON text (`{}` or presence).
pub fn subscription_succeeded(channel: &str, data: &str) -> String {
    message(
        "pusher_internal:subscription_succeeded",
        Some(channel),
        json!(data),
    )
}

/// `pusher:subscription_error`, bindable on the channel in pusher-js.
pub fn subscription_error(channel: &str, kind: &str, text: &str, status: u16) -> String {
    message(
        "pusher:subscription_error",
        Some(channel),
        json!({"type": kind, "error": text, "status": status}),
    )
}

/// The presence part of `subscription_succeeded`.
pub fn presence_data<'a>(members: impl Iterator<Item = (&'a str, &'a Value)>) -> String {
    let mut ids = Vec::new();
    let mut hash = serde_json::Map::new();
    for (id, info) in members {
        ids.push(json!(id));
        hash.insert(id.to_owned(), info.clone());
    }
    let count = ids.len();
    json!({"presence": {"ids": ids, "hash": hash, "count": count}}).to_string()
}

pub fn member_added(channel: &str, user_id: &str, user_info: &Value) -> String {
    let data = json!({"user_id": user_id, "user_info": user_info});
    message(
        "pusher_internal:member_added",
        Some(channel),
        json!(data.to_string()),
    )
}

pub fn member_removed(channel: &str, user_id: &str) -> String {
    let data = json!({"user_id": user_id});
    message(
        "pusher_internal:member_removed",
        Some(channel),
        json!(data.to_string()),
    )
}

pub fn signin_success(user_data: &str) -> String {
    message(
        "pusher:signin_success",
        None,
        json!({"user_data": user_data}),
    )
}

pub fn cache_miss(channel: &str) -> String {
    message("pusher:cache_miss", Some(channel), json!({}))
}

/// An event; `data` is the string pusher-js receives, `user_id` the sender of a client event
/// on a presence channel.
pub fn event(event: &str, channel: &str, data: &str, user_id: Option<&str>) -> String {
    let mut m = serde_json::Map::new();
    m.insert("event".into(), json!(event));
    m.insert("channel".into(), json!(channel));
    m.insert("data".into(), json!(data));
    if let Some(u) = user_id {
        m.insert("user_id".into(), json!(u));
    }
    Value::Object(m).to_string()
}

/// A new socket id: `NNN.NNN`, as pusher-js and the SDKs' signature code expect.
pub fn socket_id() -> String {
    format!(
        "{}.{}",
        rand::random_range(1..1_000_000_000u64),
        rand::random_range(1..1_000_000_000u64)
    )
}

/// Whether `s` has the shape of a socket id (the HTTP API checks `socket_id` with it).
pub fn is_socket_id(s: &str) -> bool {
    match s.split_once('.') {
        Some((a, b)) => {
            !a.is_empty()
                && !b.is_empty()
                && a.len() <= 20
                && b.len() <= 20
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn subscribe_takes_data_as_an_object_or_as_a_json_string() {
        let a = parse(r#"{"event":"pusher:subscribe","data":{"channel":"c","auth":"k:s"}}"#);
        let b =
            parse(r#"{"event":"pusher:subscribe","data":"{\"channel\":\"c\",\"auth\":\"k:s\"}"}"#);
        assert_eq!(a, b);
        assert_eq!(
            a,
            Ok(ClientMessage::Subscribe {
                channel: "c".into(),
                auth: Some("k:s".into()),
                channel_data: None
            })
        );
    }

    #[test]
    fn unknown_and_malformed_frames_are_refused_with_4300() {
        assert_eq!(parse("nope").unwrap_err().code, code::BAD_REQUEST);
        assert_eq!(
            parse(r#"{"event":"pusher:bogus"}"#).unwrap_err().code,
            code::BAD_REQUEST
        );
        assert!(parse(r#"{"event":"client-x"}"#).is_err());
        assert!(parse(r#"{"event":"other"}"#).is_err());
    }

    #[test]
    fn protocol_versions_map_to_pusher_s_close_codes() {
        assert_eq!(check_protocol(Some("protocol=7&client=js")), Ok(()));
        assert_eq!(check_protocol(Some("client=js")).unwrap_err().0, 4008);
        assert_eq!(check_protocol(Some("protocol=x")).unwrap_err().0, 4006);
        assert_eq!(check_protocol(Some("protocol=8")).unwrap_err().0, 4007);
        assert_eq!(check_protocol(None).unwrap_err().0, 4008);
    }

    #[test]
    fn presence_members_need_a_user_id() {
        assert_eq!(parse_member(r#"{"user_id":7}"#).unwrap().user_id, "7");
        assert!(parse_member(r#"{"user_info":{}}"#).is_err());
        assert!(parse_member(r#"{"user_id":""}"#).is_err());
        assert!(parse_member("x").is_err());
    }

    #[test]
    fn event_data_is_a_string_and_connection_established_carries_the_timeout() {
        let v: Value = serde_json::from_str(&connection_established("1.2")).unwrap();
        let inner: Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
        assert_eq!(inner["socket_id"], "1.2");
        assert_eq!(inner["activity_timeout"], 120);
        assert!(is_socket_id(&socket_id()));
        assert!(!is_socket_id("1.2.3"));
        assert!(!is_socket_id("a.b"));
    }
}
