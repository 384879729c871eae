//! The `/ws` JSON request parser (`transport::websocket::parse_request`, the synchronous half
//! of every `/ws` text frame the server handles) on arbitrary UTF-8. Never panics; what it
//! accepts is what the rest of the server relies on; what it refuses gets an error reply
//! with a machine-readable code.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use tidings_core::{ChannelName, Cursor, Data, EventName, Since};
use tidings_server::Config;
use tidings_server::transport::websocket::{Op, parse_request};

fn max_message_bytes() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| Config::default().server.max_message_bytes)
}

fn check_channel(channel: &ChannelName) {
    let again = ChannelName::new(channel.as_str()).expect("an accepted channel name is valid");
    assert_eq!(&again, channel);
}

/// A resume position must be one the client can be handed back as a cursor.
fn check_since(channel: &ChannelName, since: &Since) {
    if let Since::After(p) = since {
        let text = Cursor::single(channel, p.clone()).encode();
        let back = Cursor::decode(&text).expect("a position re-encodes as a cursor");
        assert_eq!(back.get(channel), Some(p));
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = std::str::from_utf8(data) else {
        return;
    };
    let max = max_message_bytes();
    match parse_request(frame, max) {
        Err(m) => {
            assert!(
                !m.code.is_empty() && m.code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "error code {:?}",
                m.code
            );
            assert!(!m.message.is_empty(), "empty message for {}", m.code);
            // The reply the server sends for it serializes.
            let reply = serde_json::json!({"type": "reply", "id": m.id, "error": {"code": m.code, "message": m.message}});
            assert!(serde_json::to_string(&reply).is_ok());
        }
        Ok(req) => match req.op {
            Op::Ping => {}
            Op::Subscribe { channel, since } => {
                check_channel(&channel);
                check_since(&channel, &since);
            }
            Op::Unsubscribe { channel } | Op::Presence { channel, .. } => check_channel(&channel),
            Op::Publish {
                channel,
                event,
                data,
                idempotency_key,
            } => {
                check_channel(&channel);
                // An accepted key is one the validator accepts again, unchanged.
                if let Some(k) = idempotency_key {
                    let again = tidings_core::idempotency::IdempotencyKey::new(k.as_str())
                        .expect("an accepted idempotency key validates again");
                    assert_eq!(again.as_str(), k.as_str());
                }
                if let Some(e) = event {
                    assert_eq!(EventName::new(e.as_str()).as_ref(), Ok(&e));
                }
                assert!(
                    data.len() <= max,
                    "{} bytes accepted over {max}",
                    data.len()
                );
                match &data {
                    Data::Json(b) => {
                        serde_json::from_slice::<&RawValue>(b).expect("accepted JSON data is JSON");
                        // Finding 1 (fixed): a lone surrogate escape is refused, so every
                        // strict parser takes what was accepted.
                        serde_json::from_slice::<serde_json::Value>(b)
                            .expect("accepted JSON data parses into a serde_json::Value");
                    }
                    Data::Binary(_) => {}
                    Data::Text(_) => panic!("a /ws publish is JSON or base64, never text"),
                }
            }
            Op::History {
                channel,
                since,
                limit,
            } => {
                check_channel(&channel);
                check_since(&channel, &since);
                assert!(limit <= 10_000, "limit {limit}");
            }
        },
    }
});
