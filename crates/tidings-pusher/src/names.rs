//! Pusher names and how they map onto Tidings' (SPEC §13, docs/pusher.md).
//!
//! Channels: a Pusher channel `NAME` of app `ID` is the Tidings channel `pusher:ID:NAME`.
//! Pusher allows `,` `;` and `#` where Tidings does not, so those (and `=`, the escape
//! character itself) are written `=2C` `=3B` `=23` `=3D` inside Tidings; every other
//! character is the same on both sides. The mapping is one-to-one, so a Tidings name maps
//! back to exactly the Pusher name it came from.
//!
//! Events: a Pusher event name that is a valid Tidings event name (`[A-Za-z0-9_.-]{1,64}`)
//! is the Tidings event name. Any other (Laravel's `App\Events\OrderShipped`, names with
//! `:` or longer than 64) travels as the Tidings event `pusher.named` whose JSON data is
//! `{"event": NAME, "data": DATA}`: Pusher clients get the event unchanged, Tidings' own
//! transports see the wrapper. Events that must skip one Pusher connection (a trigger with
//! `socket_id`, every client event: never echoed to its sender) are wrapped too, with
//! `"socket_id"`: the exclusion travels in the message, so whichever node holds that
//! connection leaves it out.

use std::borrow::Cow;

use tidings_core::{ChannelName, EventName};

/// Pusher's own limit on a channel name.
pub const MAX_PUSHER_CHANNEL: usize = 164;
/// Pusher's own limit on an event name.
pub const MAX_PUSHER_EVENT: usize = 200;
/// The Tidings event carrying a Pusher event whose name Tidings cannot hold.
pub const WRAPPED_EVENT: &str = "pusher.named";

/// What a channel name's prefix makes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelKind {
    Public,
    Private,
    /// `private-encrypted-`: the payload is end-to-end encrypted; relayed as is.
    PrivateEncrypted,
    Presence,
    /// `#server-to-user-ID`: a signed-in user's own channel (`sendToUser`); only a socket
    /// signed in as that user may follow it.
    ServerToUser,
}

/// The prefix of a user's own channel (Pusher's `sendToUser`).
pub const SERVER_TO_USER: &str = "#server-to-user-";

impl ChannelKind {
    /// Whether subscribing needs an auth signature.
    pub fn needs_auth(self) -> bool {
        !matches!(self, ChannelKind::Public | ChannelKind::ServerToUser)
    }
}

/// Why a Pusher channel name is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error(
        "invalid channel name {0:?}: use 1 to 164 of A-Z a-z 0-9 _ - = @ , . ; (and fit in 128 bytes once mapped to pusher:ID:NAME)"
    )]
    Channel(String),
    #[error("invalid event name {0:?}: use 1 to 200 characters")]
    Event(String),
}

/// A validated Pusher channel name with its kind and its `cache-` flag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PusherChannel {
    pub name: String,
    pub kind: ChannelKind,
    /// `cache-`, `private-cache-`, `private-encrypted-cache-` or `presence-cache-`.
    pub cache: bool,
}

fn pusher_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"_-=@,.;".contains(&b)
}

impl PusherChannel {
    /// Checks `name` as Pusher does, and that its Tidings form fits (`tidings` needs that).
    pub fn parse(app_id: &str, name: &str) -> Result<Self, NameError> {
        // `#` only as the user channel's prefix, whose rest is a user id (Pusher's SDKs
        // allow the channel-name characters in it).
        let plain = name.strip_prefix(SERVER_TO_USER).unwrap_or(name);
        let ok = !plain.is_empty()
            && name.len() <= MAX_PUSHER_CHANNEL
            && plain.bytes().all(pusher_char)
            && tidings_len(app_id, name) <= tidings_core::channel::MAX_CHANNEL_LEN;
        if !ok {
            return Err(NameError::Channel(name.chars().take(170).collect()));
        }
        let (kind, rest) = if plain.len() < name.len() {
            (ChannelKind::ServerToUser, "")
        } else if let Some(rest) = name.strip_prefix("private-encrypted-") {
            (ChannelKind::PrivateEncrypted, rest)
        } else if let Some(rest) = name.strip_prefix("private-") {
            (ChannelKind::Private, rest)
        } else if let Some(rest) = name.strip_prefix("presence-") {
            (ChannelKind::Presence, rest)
        } else {
            (ChannelKind::Public, name)
        };
        Ok(Self {
            name: name.to_owned(),
            kind,
            cache: rest.starts_with("cache-"),
        })
    }

    /// The Tidings channel `pusher:ID:NAME` (escaped as the module docs say).
    pub fn tidings(&self, app_id: &str) -> Result<ChannelName, NameError> {
        ChannelName::new(&tidings_name(app_id, &self.name))
            .map_err(|_| NameError::Channel(self.name.clone()))
    }
}

fn escape(b: u8) -> Option<&'static str> {
    match b {
        b'=' => Some("=3D"),
        b',' => Some("=2C"),
        b';' => Some("=3B"),
        b'#' => Some("=23"),
        _ => None,
    }
}

fn tidings_len(app_id: &str, name: &str) -> usize {
    "pusher:".len()
        + app_id.len()
        + 1
        + name
            .bytes()
            .map(|b| escape(b).map_or(1, str::len))
            .sum::<usize>()
}

/// `pusher:ID:` + the escaped name (not validated: `PusherChannel::tidings` does that).
pub fn tidings_name(app_id: &str, name: &str) -> String {
    let mut out = String::with_capacity(tidings_len(app_id, name));
    out.push_str("pusher:");
    out.push_str(app_id);
    out.push(':');
    for c in name.chars() {
        match u8::try_from(c).ok().and_then(escape) {
            Some(e) => out.push_str(e),
            None => out.push(c),
        }
    }
    out
}

/// The prefix every Tidings channel of app `app_id` starts with.
pub fn tidings_prefix(app_id: &str) -> String {
    format!("pusher:{app_id}:")
}

/// The Pusher name of a Tidings channel of app `app_id`; `None` when it is not one of the
/// app's channels or its escapes are not ours.
pub fn pusher_name(app_id: &str, channel: &str) -> Option<String> {
    let rest = channel
        .strip_prefix("pusher:")?
        .strip_prefix(app_id)?
        .strip_prefix(':')?;
    let mut out = String::with_capacity(rest.len());
    let mut parts = rest.split('=');
    out.push_str(parts.next()?);
    for part in parts {
        let (code, tail) = (part.get(..2)?, part.get(2..)?);
        out.push(match code {
            "3D" => '=',
            "2C" => ',',
            "3B" => ';',
            "23" => '#',
            _ => return None,
        });
        out.push_str(tail);
    }
    Some(out)
}

/// How a Pusher event travels inside Tidings.
#[derive(Debug, PartialEq, Eq)]
pub enum TidingsEvent {
    /// The same name.
    Named(EventName),
    /// Wrapped: event `pusher.named`, data `{"event","data"}`.
    Wrapped,
}

/// Where a Pusher event name goes in Tidings (see the module docs).
pub fn tidings_event(name: &str) -> Result<TidingsEvent, NameError> {
    if name.is_empty() || name.len() > MAX_PUSHER_EVENT {
        return Err(NameError::Event(name.chars().take(210).collect()));
    }
    Ok(match EventName::new(name) {
        Ok(e) if e.as_str() != WRAPPED_EVENT => TidingsEvent::Named(e),
        _ => TidingsEvent::Wrapped,
    })
}

/// The wrapper's JSON for a Pusher event Tidings cannot name, a client event on a presence
/// channel (which carries its sender's `user_id`), or an event not for `socket_id`.
pub fn wrap(event: &str, data: &str, user_id: Option<&str>, socket_id: Option<&str>) -> String {
    let mut v = serde_json::json!({"event": event, "data": data});
    if let Some(u) = user_id {
        v["user_id"] = serde_json::json!(u);
    }
    if let Some(s) = socket_id {
        v["socket_id"] = serde_json::json!(s);
    }
    v.to_string()
}

/// A wrapped Pusher event.
#[derive(Debug, PartialEq, Eq, serde::Deserialize)]
pub struct Wrapped {
    pub event: String,
    pub data: String,
    #[serde(default)]
    pub user_id: Option<String>,
    /// The Pusher connection the event is not for.
    #[serde(default)]
    pub socket_id: Option<String>,
}

/// The Pusher event of a wrapped message.
pub fn unwrap(json: &[u8]) -> Option<Wrapped> {
    serde_json::from_slice::<Wrapped>(json).ok()
}

/// The Pusher name of a Tidings event: the same, or `message` when it has none.
pub fn pusher_event(event: Option<&EventName>) -> Cow<'_, str> {
    match event {
        Some(e) => Cow::Borrowed(e.as_str()),
        None => Cow::Borrowed("message"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn channel_kinds_come_from_the_prefix() {
        let k = |n: &str| PusherChannel::parse("1", n).unwrap();
        assert_eq!(k("chat").kind, ChannelKind::Public);
        assert_eq!(k("private-a").kind, ChannelKind::Private);
        assert_eq!(k("private-encrypted-a").kind, ChannelKind::PrivateEncrypted);
        assert_eq!(k("presence-a").kind, ChannelKind::Presence);
        assert_eq!(k("#server-to-user-u1").kind, ChannelKind::ServerToUser);
        assert_eq!(
            k("#server-to-user-u1").tidings("1").unwrap().as_str(),
            "pusher:1:=23server-to-user-u1"
        );
        assert!(PusherChannel::parse("1", "#other").is_err());
        assert!(PusherChannel::parse("1", "#server-to-user-").is_err());
        assert!(k("presence-cache-a").cache);
        assert!(k("cache-a").cache);
        assert!(!k("cachex").cache);
    }

    #[test]
    fn names_outside_tidings_characters_map_one_to_one_and_back() {
        for name in ["a,b;c=d", "plain-name", "=3D", "x=", "@.;,"] {
            let c = PusherChannel::parse("1001", name).unwrap();
            let t = c.tidings("1001").unwrap();
            assert_eq!(
                pusher_name("1001", t.as_str()).as_deref(),
                Some(name),
                "{t}"
            );
        }
        assert_eq!(
            tidings_name("1001", "a,b=c"),
            "pusher:1001:a=2Cb=3Dc".to_owned()
        );
        assert_eq!(pusher_name("1002", "pusher:1001:a"), None);
        assert_eq!(pusher_name("1001", "pusher:1001:a=ZZ"), None);
    }

    #[test]
    fn names_pusher_refuses_or_tidings_cannot_hold_are_refused() {
        assert!(PusherChannel::parse("1", "").is_err());
        assert!(PusherChannel::parse("1", "has space").is_err());
        assert!(PusherChannel::parse("1", "a/b").is_err());
        assert!(PusherChannel::parse("1", &"x".repeat(119)).is_ok());
        assert!(PusherChannel::parse("1", &"x".repeat(120)).is_err());
    }

    #[test]
    fn event_names_tidings_cannot_hold_are_wrapped() {
        assert!(matches!(
            tidings_event("order.shipped"),
            Ok(TidingsEvent::Named(_))
        ));
        assert_eq!(
            tidings_event("App\\Events\\OrderShipped"),
            Ok(TidingsEvent::Wrapped)
        );
        assert_eq!(tidings_event(WRAPPED_EVENT), Ok(TidingsEvent::Wrapped));
        assert_eq!(tidings_event("client:x"), Ok(TidingsEvent::Wrapped));
        assert!(tidings_event(&"e".repeat(201)).is_err());
        let w = wrap("App\\E", "{\"a\":1}", Some("u"), None);
        let back = unwrap(w.as_bytes()).unwrap();
        assert_eq!(back.event, "App\\E");
        assert_eq!(back.data, "{\"a\":1}");
        assert_eq!(back.user_id.as_deref(), Some("u"));
    }
}
