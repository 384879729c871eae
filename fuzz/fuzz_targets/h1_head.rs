//! The lean HTTP/1.1 path's request-head parser (`tidings_server::net::h1`, through `fuzz_parse`)
//! on arbitrary bytes: the first bytes of every plaintext connection go through it. Never
//! panics; never consumes bytes it then hands elsewhere (hyper must see a request it takes
//! over from its first byte); keeps only requests with at most a small body of declared length that upgrade to nothing
//! but WebSocket.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidings_server::net::h1::{FuzzHead, LEAN_BODY, MAX_HEAD, fuzz_parse};

fuzz_target!(|data: &[u8]| {
    let (head, left) = fuzz_parse(data);
    match head {
        FuzzHead::Partial | FuzzHead::Handoff | FuzzHead::Refuse(_) => {
            assert_eq!(left, data, "bytes consumed without a request: {head:?}");
            const PREFACE: &[u8] = tidings_server::net::h1::HTTP2_PREFACE;
            let n = data.len().min(PREFACE.len());
            if n > 0 && data[..n] == PREFACE[..n] {
                // Read whole under the head deadline first, then hyper's.
                if n == PREFACE.len() {
                    assert!(
                        matches!(head, FuzzHead::Handoff),
                        "the HTTP/2 preface stays with hyper"
                    );
                } else {
                    assert!(matches!(head, FuzzHead::Partial), "a partial preface waits");
                }
            }
            if let FuzzHead::Refuse(status) = head {
                assert!(status == 400 || status == 431, "refused with {status}");
            }
        }
        FuzzHead::Request {
            rest,
            method,
            uri,
            headers,
            body,
            keep_alive: _,
            head_only,
        } => {
            assert_eq!(left, rest);
            assert!(
                data.ends_with(&rest),
                "what follows the head is kept as sent"
            );
            let head_len = data.len() - rest.len();
            if !headers.iter().any(|(name, _)| name == "content-length") {
                assert_eq!(body, 0, "no declared length, no body");
            }
            assert!(
                head_len > 0 && head_len <= MAX_HEAD,
                "head of {head_len} bytes"
            );
            assert!(
                data[..head_len].ends_with(b"\n"),
                "a head ends with a blank line"
            );
            assert_ne!(method, "CONNECT");
            assert_eq!(head_only, method == "HEAD");
            assert!(!uri.is_empty());
            for (name, value) in &headers {
                assert!(
                    !matches!(name.as_str(), "transfer-encoding" | "expect"),
                    "{name} belongs to hyper"
                );
                if name == "upgrade" {
                    let protocols = String::from_utf8_lossy(value).to_ascii_lowercase();
                    assert!(
                        protocols.split(',').any(|p| p.trim() == "websocket"),
                        "only WebSocket upgrades stay on the lean path"
                    );
                }
                if name == "content-length" {
                    let declared = std::str::from_utf8(value.trim_ascii())
                        .ok()
                        .and_then(|v| v.parse::<usize>().ok());
                    assert_eq!(declared, Some(body), "the body read is the one declared");
                    assert!(body <= LEAN_BODY, "a large body belongs to hyper");
                }
            }
            // Pipelined: what follows the body parses on its own, with the same guarantees.
            let next = &rest[body.min(rest.len())..];
            let (_, again) = fuzz_parse(next);
            assert!(next.ends_with(&again));
        }
    }
});
