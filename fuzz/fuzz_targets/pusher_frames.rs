//! What a Pusher client sends (`tidings_pusher`): a WebSocket text frame (`protocol::parse`),
//! presence `channel_data` (`parse_member`), the channel name it names and the HTTP API's
//! request signing, on arbitrary input. Never panics; a channel name maps to a Tidings name
//! and back unchanged; a request signed with the secret verifies, and the same request with
//! its signature, body or path changed does not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidings_pusher::names::{pusher_name, tidings_name};
use tidings_pusher::protocol::{ClientMessage, parse, parse_member};
use tidings_pusher::sign::{SignedRequest, md5_hex, sign_request, verify_request};

const APP: &str = "1001";
const KEY: &str = "app-key";
const SECRET: &str = "app-secret";
const NOW: u64 = 1_800_000_000;

fn round_trip(channel: &str) {
    let mapped = tidings_name(APP, channel);
    assert_eq!(
        pusher_name(APP, &mapped).as_deref(),
        Some(channel),
        "{channel:?} -> {mapped:?} does not map back"
    );
    // Another app's prefix never claims it.
    assert_eq!(pusher_name("1002", &mapped), None);
}

fn signed(path: &str, body: &[u8], extra: &str) {
    let mut query = vec![
        ("auth_key".to_owned(), KEY.to_owned()),
        ("auth_timestamp".to_owned(), NOW.to_string()),
        ("auth_version".to_owned(), "1.0".to_owned()),
        ("info".to_owned(), extra.to_owned()),
    ];
    if !body.is_empty() {
        query.push(("body_md5".to_owned(), md5_hex(body)));
    }
    let signature = sign_request(SECRET, "POST", path, &query);
    query.push(("auth_signature".to_owned(), signature));
    let q = &query[..];
    fn req<'a>(query: &'a [(String, String)], path: &'a str, body: &'a [u8]) -> SignedRequest<'a> {
        SignedRequest {
            method: "POST",
            path,
            query,
            body,
        }
    }
    assert!(
        verify_request(KEY, SECRET, &req(q, path, body), NOW).is_ok(),
        "a request signed with the secret is refused: {path:?} {extra:?}"
    );
    let other_path = format!("{path}x");
    assert!(verify_request(KEY, SECRET, &req(q, &other_path, body), NOW).is_err());
    if !body.is_empty() {
        let mut changed = body.to_vec();
        changed[0] ^= 1;
        assert!(verify_request(KEY, SECRET, &req(q, path, &changed), NOW).is_err());
    }
    assert!(verify_request(KEY, "another-secret", &req(q, path, body), NOW).is_err());
    assert!(verify_request(KEY, SECRET, &req(q, path, body), NOW + 601).is_err());
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse(text) {
        Ok(ClientMessage::Subscribe {
            channel,
            channel_data,
            ..
        }) => {
            round_trip(&channel);
            if let Some(d) = channel_data
                && let Ok(member) = parse_member(&d)
            {
                assert!(!member.user_id.is_empty(), "an empty user_id accepted");
            }
        }
        Ok(ClientMessage::Unsubscribe { channel } | ClientMessage::ClientEvent { channel, .. }) => {
            round_trip(&channel);
        }
        Ok(_) => {}
        Err(refused) => assert!(!refused.message.is_empty(), "a refusal says nothing"),
    }
    if let Ok(member) = parse_member(text) {
        assert!(
            !member.user_id.is_empty() && member.user_id.len() <= 128
                || member.user_id.parse::<f64>().is_ok()
        );
    }
    round_trip(text);
    let (path, body) = text.split_once('\n').unwrap_or((text, ""));
    signed(&format!("/apps/{APP}/events{path}"), body.as_bytes(), path);
});
