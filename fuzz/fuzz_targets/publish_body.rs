//! The publish bodies: `POST /publish` documents (one message, `channels` fan-in, `messages`
//! batch) through `fuzzing::publish_document`, the handler's synchronous half, and raw
//! `POST /publish/{channel}` bodies with their content type and `?event=` through
//! `fuzzing::publish_raw`.
//!
//! Input: the first byte picks the path and the size limit; for the raw path the rest is
//! `content-type\nquery\nbody` (an empty first line: no content type).
#![no_main]

use std::sync::OnceLock;

use base64::Engine;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use tidings_core::{ChannelName, Data, EventName};
use tidings_server::Config;
use tidings_server::fuzzing::{Refusal, ToPublish, publish_document, publish_raw};

/// A small limit makes the fuzzer reach `too_large`; the default is what servers run with.
const SMALL: usize = 64;

fn default_max() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| Config::default().server.max_message_bytes)
}

fn check_refusal(r: &Refusal, statuses: &[u16]) {
    assert!(
        statuses.contains(&r.status),
        "status {} for {r:?}",
        r.status
    );
    assert!(
        !r.code.is_empty()
            && r.code
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
        "code {:?}",
        r.code
    );
    assert!(!r.message.is_empty(), "empty message for {}", r.code);
}

fn check_message(m: &ToPublish, max: usize) {
    assert_eq!(
        ChannelName::new(m.channel.as_str()).as_ref(),
        Ok(&m.channel)
    );
    if let Some(e) = &m.event {
        assert_eq!(EventName::new(e.as_str()).as_ref(), Ok(e));
    }
    assert!(m.data.len() <= max, "{} bytes over {max}", m.data.len());
    match &m.data {
        Data::Json(b) => {
            // Every subscriber's parser must take it: serde_json is a strict one.
            serde_json::from_slice::<Value>(b).expect("accepted JSON data parses");
            assert_eq!(
                b.trim_ascii(),
                &b[..],
                "JSON data is stored without surrounding space"
            );
        }
        Data::Binary(_) => {}
        Data::Text(_) => panic!("a document publishes JSON or base64, never text"),
    }
}

/// The document entry that publishes `m` again, built as text: JSON data goes in as sent
/// (through a `Value` its numbers could change form).
fn entry(m: &ToPublish) -> String {
    let quoted = |s: &str| serde_json::to_string(s).expect("a string serializes");
    let mut e = format!("{{\"channel\":{}", quoted(m.channel.as_str()));
    match &m.data {
        Data::Json(b) => {
            e.push_str(",\"data\":");
            e.push_str(std::str::from_utf8(b).expect("accepted JSON is UTF-8"));
        }
        Data::Binary(b) => {
            let text = base64::engine::general_purpose::STANDARD.encode(b);
            e.push_str(&format!(
                ",\"data\":{},\"encoding\":\"base64\"",
                quoted(&text)
            ));
        }
        Data::Text(_) => unreachable!("checked"),
    }
    if let Some(ev) = &m.event {
        e.push_str(&format!(",\"event\":{}", quoted(ev.as_str())));
    }
    if let Some(k) = &m.idempotency_key {
        e.push_str(&format!(",\"idempotency_key\":{}", quoted(k)));
    }
    e.push('}');
    e
}

/// Published again as a document, each message yields itself.
fn check_reencodes(messages: &[ToPublish], max: usize) {
    for m in messages {
        let doc = entry(m);
        let (again, what) = publish_document(max, doc.as_bytes())
            .unwrap_or_else(|r| panic!("a re-encoded message is accepted: {r:?} for {doc}"));
        assert_eq!((again.as_slice(), what), (std::slice::from_ref(m), None));
    }
    if messages.len() > 1 {
        let entries: Vec<String> = messages.iter().map(entry).collect();
        let doc = format!("{{\"messages\":[{}]}}", entries.join(","));
        let (again, what) = publish_document(max, doc.as_bytes())
            .unwrap_or_else(|r| panic!("a re-encoded batch is accepted: {r:?}"));
        assert_eq!((again.as_slice(), what), (messages, Some("messages")));
    }
}

#[derive(Deserialize)]
struct Batch<'a> {
    #[serde(borrow)]
    messages: Vec<&'a RawValue>,
}

/// All or nothing: a batch is accepted only if every entry is, alone, with the same result;
/// an entry it blames is refused alone.
fn check_batch_entries(
    body: &[u8],
    outcome: &Result<(Vec<ToPublish>, Option<&str>), Refusal>,
    max: usize,
) {
    let Ok(batch) = serde_json::from_slice::<Batch>(body) else {
        return;
    };
    match outcome {
        Ok((messages, Some("messages"))) => {
            assert_eq!(messages.len(), batch.messages.len());
            for (m, raw) in messages.iter().zip(&batch.messages) {
                let (alone, _) = publish_document(max, raw.get().as_bytes())
                    .expect("an entry of an accepted batch is accepted alone");
                assert_eq!(alone.as_slice(), std::slice::from_ref(m));
            }
        }
        Err(r) if r.message.starts_with("messages[") => {
            let i: usize = r.message["messages[".len()..]
                .split(']')
                .next()
                .and_then(|n| n.parse().ok())
                .expect("the blamed entry's index");
            let raw = batch.messages.get(i).expect("the blamed entry exists");
            // Refused alone too; the code may differ when the entry has two defects (a
            // lone document checks its idempotency key before its channel, a batch entry
            // after).
            assert!(
                publish_document(max, raw.get().as_bytes()).is_err(),
                "the blamed entry is refused alone: {r:?}"
            );
        }
        _ => {}
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&selector, rest)) = input.split_first() else {
        return;
    };
    let max = if selector & 2 == 0 {
        default_max()
    } else {
        SMALL
    };
    if selector & 1 == 0 {
        let outcome = publish_document(max, rest);
        match &outcome {
            Err(r) => check_refusal(r, &[400, 413]),
            Ok((messages, what)) => {
                assert!(
                    (1..=1000).contains(&messages.len()),
                    "{} messages",
                    messages.len()
                );
                if what.is_none() {
                    assert_eq!(messages.len(), 1);
                }
                for m in messages {
                    check_message(m, max);
                }
                check_reencodes(messages, max);
            }
        }
        check_batch_entries(rest, &outcome, max);
        return;
    }
    let mut parts = rest.splitn(3, |&b| b == b'\n');
    let ct = parts.next().unwrap_or_default();
    let query = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();
    let Ok(query) = std::str::from_utf8(query) else {
        return;
    };
    let ct = (!ct.is_empty()).then_some(ct);
    let query = (!query.is_empty()).then_some(query);
    match publish_raw(ct, query, Bytes::copy_from_slice(body)) {
        Err(r) => check_refusal(&r, &[400, 415]),
        Ok((event, data)) => {
            match &data {
                Data::Text(b) => assert!(std::str::from_utf8(b).is_ok(), "text is UTF-8"),
                Data::Binary(b) => assert_eq!(&b[..], body, "binary is the body as sent"),
                Data::Json(_) => {}
            }
            // Binary and JSON bodies publish the same message through a document.
            if !matches!(data, Data::Text(_)) && data.len() <= default_max() {
                let m = ToPublish {
                    channel: ChannelName::new("fuzz").expect("valid"),
                    event,
                    data,
                    idempotency_key: None,
                };
                check_message(&m, default_max());
                check_reencodes(std::slice::from_ref(&m), default_max());
            }
        }
    }
});
