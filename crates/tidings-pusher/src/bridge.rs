//! One set of channels: a Pusher event as a Tidings publish, and a Tidings message as the
//! Pusher event pusher-js receives (the mapping docs/pusher.md states).
//!
//! Pusher → Tidings: channel `NAME` → `pusher:ID:NAME` (`names`), event name → the same
//! event name (or the `pusher.named` wrapper), `data` string → Tidings text data.
//! Tidings → Pusher: the event name (`message` when the publish had none), and `data` as the
//! string pusher-js parses: JSON data as its JSON text, text as is, binary as base64.

use std::borrow::Cow;

use base64::Engine;
use bytes::Bytes;
use tidings_core::{ChannelName, Data, EventName, Message};

use crate::names::{self, NameError, PusherChannel, TidingsEvent};

/// A publish, ready for `Node::publish`.
#[derive(Debug)]
pub struct Publish {
    pub channel: ChannelName,
    pub event: Option<EventName>,
    pub data: Data,
}

/// The Tidings publish for Pusher event `event` with string `data` on `channel`.
pub fn to_tidings(
    app_id: &str,
    channel: &PusherChannel,
    event: &str,
    data: &str,
) -> Result<Publish, NameError> {
    to_tidings_from(app_id, channel, event, data, None, None)
}

/// `to_tidings` for an event that skips the Pusher connection `except` (a trigger's
/// `socket_id`, a client event's sender) and, for a client event on a presence channel,
/// carries its sender's `user_id`. Either makes it travel wrapped.
pub fn to_tidings_from(
    app_id: &str,
    channel: &PusherChannel,
    event: &str,
    data: &str,
    user_id: Option<&str>,
    except: Option<&str>,
) -> Result<Publish, NameError> {
    let tidings = channel.tidings(app_id)?;
    let named = names::tidings_event(event)?;
    Ok(match named {
        TidingsEvent::Named(e) if user_id.is_none() && except.is_none() => Publish {
            channel: tidings,
            event: Some(e),
            data: Data::Text(Bytes::copy_from_slice(data.as_bytes())),
        },
        _ => Publish {
            channel: tidings,
            event: EventName::new(names::WRAPPED_EVENT).ok(),
            data: Data::Json(Bytes::from(names::wrap(event, data, user_id, except))),
        },
    })
}

/// A client event's `data` as the string other clients receive: a JSON string's content, or
/// any other JSON value's text.
pub fn client_data(raw: &str) -> Cow<'_, str> {
    match serde_json::from_str::<String>(raw) {
        Ok(s) => Cow::Owned(s),
        Err(_) => Cow::Borrowed(raw),
    }
}

/// `data` as the string a Pusher client receives.
pub fn data_string(data: &Data) -> Cow<'_, str> {
    match data {
        Data::Json(b) | Data::Text(b) => String::from_utf8_lossy(b),
        Data::Binary(b) => Cow::Owned(base64::engine::general_purpose::STANDARD.encode(b)),
    }
}

/// The Pusher event for a Tidings message on one of app `app_id`'s channels, as the JSON
/// text of the frame; `None` when the channel is not the app's.
pub fn to_pusher(app_id: &str, m: &Message) -> Option<String> {
    to_pusher_except(app_id, m).map(|(text, _)| text)
}

/// `to_pusher`, with the Pusher connection the event is not for (`socket_id`), if any.
pub fn to_pusher_except(app_id: &str, m: &Message) -> Option<(String, Option<String>)> {
    let channel = names::pusher_name(app_id, m.channel.as_str())?;
    if let (Some(e), Data::Json(b)) = (&m.event, &m.data)
        && e.as_str() == names::WRAPPED_EVENT
        && let Some(w) = names::unwrap(b)
    {
        let text = crate::protocol::event(&w.event, &channel, &w.data, w.user_id.as_deref());
        return Some((text, w.socket_id));
    }
    let event = names::pusher_event(m.event.as_ref());
    Some((
        crate::protocol::event(&event, &channel, &data_string(&m.data), None),
        None,
    ))
}

/// The Pusher event name of a Tidings message (to know a `client-` event when it arrives).
pub fn event_name(m: &Message) -> Cow<'_, str> {
    if let (Some(e), Data::Json(b)) = (&m.event, &m.data)
        && e.as_str() == names::WRAPPED_EVENT
        && let Some(w) = names::unwrap(b)
    {
        return Cow::Owned(w.event);
    }
    names::pusher_event(m.event.as_ref())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tidings_core::{Epoch, Position};

    fn message(p: Publish) -> Message {
        let pos = Position {
            epoch: Epoch::new("e").unwrap(),
            offset: 1,
        };
        Message::new(p.channel, pos, p.event, p.data, 0)
    }

    #[test]
    fn a_pusher_event_comes_back_unchanged_through_tidings() {
        for (event, data) in [
            ("order.shipped", r#"{"id":1}"#),
            ("App\\Events\\OrderShipped", r#"{"id":2}"#),
            ("plain", "just text"),
        ] {
            let c = PusherChannel::parse("7", "private-a,b").unwrap();
            let p = to_tidings("7", &c, event, data).unwrap();
            assert_eq!(p.channel.as_str(), "pusher:7:private-a=2Cb");
            let m = message(p);
            let v: serde_json::Value = serde_json::from_str(&to_pusher("7", &m).unwrap()).unwrap();
            assert_eq!(v["event"], event);
            assert_eq!(v["channel"], "private-a,b");
            assert_eq!(v["data"], data);
            assert_eq!(event_name(&m), event);
        }
    }

    #[test]
    fn an_event_for_everyone_but_one_socket_carries_that_socket_id_to_every_node() {
        let c = PusherChannel::parse("7", "news").unwrap();
        let p = to_tidings_from("7", &c, "greet", "hi", None, Some("1.2")).unwrap();
        let (text, except) = to_pusher_except("7", &message(p)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (v["event"].as_str(), v["data"].as_str()),
            (Some("greet"), Some("hi"))
        );
        assert_eq!(except.as_deref(), Some("1.2"));
    }

    #[test]
    fn a_tidings_publish_becomes_a_pusher_event_with_string_data() {
        let m = Message::new(
            ChannelName::new("pusher:7:news").unwrap(),
            Position {
                epoch: Epoch::new("e").unwrap(),
                offset: 1,
            },
            None,
            Data::Json(Bytes::from_static(b"{\"a\":1}")),
            0,
        );
        let v: serde_json::Value = serde_json::from_str(&to_pusher("7", &m).unwrap()).unwrap();
        assert_eq!(v["event"], "message");
        assert_eq!(v["data"], "{\"a\":1}");
        assert!(to_pusher("8", &m).is_none());
        assert_eq!(client_data("\"x\""), "x");
        assert_eq!(client_data("{\"a\":1}"), "{\"a\":1}");
    }
}
