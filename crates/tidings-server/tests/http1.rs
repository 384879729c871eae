//! The lean HTTP/1.1 path (`h1.rs`) as raw sockets see it: keep-alive and pipelining, HEAD,
//! small bodies read here, hand-offs to hyper in the middle of a connection (a chunked or
//! large body, HTTP/1.0), clear errors for
//! malformed and oversized heads, parked requests released the moment their client
//! hangs up, and WebSocket handshakes answered here with the socket kept for the session.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::{TIMEOUT, TestServer, eventually, read_to_end, read_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` on a fresh connection and reads until the server closes it.
async fn answer_then_close(server: &TestServer, request: &[u8]) -> String {
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(request).await.unwrap();
    tokio::time::timeout(TIMEOUT, read_to_end(&mut s))
        .await
        .expect("the server never closed the connection")
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let server = TestServer::spawn().await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(
        b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /nope HTTP/1.1\r\nhost: x\r\n\r\nGET /readyz HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let out = read_until(&mut s, "HTTP/1.1 ", 3).await;
    let statuses: Vec<&str> = out
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &out[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "404", "200"], "{out}");
    assert!(out.contains("\"not_found\""), "{out}");
}

#[tokio::test]
async fn a_publish_with_a_small_body_is_served_on_the_lean_path_with_requests_pipelined_behind_it()
{
    let server = TestServer::spawn().await;
    let mut s = kept_alive(&server).await;
    // The body and a GET pipelined behind it, in one write.
    s.write_all(b"POST /publish/lean HTTP/1.1\r\nhost: x\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nhelloGET /api/channels/lean HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let out = read_until(&mut s, "HTTP/1.1 200", 2).await;
    assert!(out.contains("\"offset\":1"), "{out}");
    let (_, history) = server.get_json("/api/channels/lean/history").await;
    assert_eq!(history["messages"][0]["data"], "hello", "{history}");
    // Still the lean path: hyper would answer an oversized head with a bare 431.
    s.write_all(&oversized_head()).await.unwrap();
    let out = tokio::time::timeout(TIMEOUT, read_to_end(&mut s))
        .await
        .unwrap();
    assert_json_431(&out[out.find("HTTP/1.1 431").unwrap_or(0)..]);
}

#[tokio::test]
async fn one_kept_alive_connection_s_requests_never_see_each_other_s_bytes() {
    let server = TestServer::spawn().await;
    let mut s = kept_alive(&server).await;
    // Long, then shorter and shorter: a buffer kept between requests must not lend a body
    // or a header the bytes of the request before it.
    let bodies = [
        "a".repeat(3000),
        "bb".repeat(40),
        "c".to_string(),
        "d".to_string(),
    ];
    for (i, body) in bodies.iter().enumerate() {
        let extra = if i == 0 {
            "x-long: ".to_string() + &"z".repeat(900) + "\r\n"
        } else {
            String::new()
        };
        let request = format!(
            "POST /publish/kept HTTP/1.1\r\nhost: x\r\n{extra}content-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(request.as_bytes()).await.unwrap();
        let out = read_until(&mut s, "}", 1).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.contains(&format!("\"offset\":{}", i + 1)), "{out}");
    }
    // A GET with a query after the publishes: its own path and query, nothing of theirs.
    s.write_all(b"GET /poll/kept HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let out = read_until(&mut s, "\"cursor\"", 1).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let (_, history) = server.get_json("/api/channels/kept/history").await;
    let got: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"].as_str().unwrap())
        .collect();
    assert_eq!(got, bodies.iter().map(String::as_str).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_body_sent_in_pieces_is_read_whole_before_the_publish() {
    let server = TestServer::spawn().await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"POST /publish/pieces HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n{\"a\":")
        .await
        .unwrap();
    s.flush().await.unwrap();
    tokio::task::yield_now().await;
    s.write_all(b"[1, 2]}").await.unwrap();
    let out = read_until(&mut s, "\"offset\":1", 1).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let (_, history) = server.get_json("/api/channels/pieces/history").await;
    assert_eq!(history["messages"][0]["data"]["a"][1], 2, "{history}");
}

#[tokio::test]
async fn a_chunked_publish_is_handed_to_hyper_intact_with_a_request_pipelined_behind_it() {
    let server = TestServer::spawn().await;
    let mut s = kept_alive(&server).await;
    // hyper gets the POST and the GET behind it from their first byte.
    s.write_all(b"POST /publish/handoff HTTP/1.1\r\nhost: x\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /api/channels/handoff HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let out = read_until(&mut s, "HTTP/1.1 200", 2).await;
    assert!(out.contains("\"offset\":1"), "{out}");
    let (_, history) = server.get_json("/api/channels/handoff/history").await;
    assert_eq!(history["messages"][0]["data"], "hello", "{history}");
}

#[tokio::test]
async fn bodies_the_lean_path_does_not_take_get_hyper_s_answer_and_nothing_is_published() {
    let server = TestServer::with(|c| c.server.max_message_bytes = 1024).await;
    // Two lengths that disagree: a smuggling attempt, refused whole.
    let out = answer_then_close(&server, b"POST /publish/odd HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    // Over the lean path's 64 KiB: hyper streams it and the handler's 413 comes early.
    let big = "x".repeat(70 * 1024);
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /publish/big HTTP/1.1\r\nhost: x\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
        big.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let _ = s.write_all(big.as_bytes()).await;
    let out = read_until(&mut s, "payload_too_large", 1).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    // Over max_message_bytes but within 64 KiB: read here, refused by the same handler.
    let body = "y".repeat(2000);
    let request = format!(
        "POST /publish/big HTTP/1.1\r\nhost: x\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let out = read_until(&mut s, "payload_too_large", 1).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    for channel in ["odd", "big"] {
        let (status, _) = server.get_json(&format!("/api/channels/{channel}")).await;
        assert_eq!(status, 404, "{channel} was never published to");
    }
}

#[tokio::test]
async fn head_answers_with_headers_only_and_keeps_the_connection() {
    let server = TestServer::spawn().await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(
        b"HEAD /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /healthz HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let out = read_until(&mut s, "HTTP/1.1 200", 2).await;
    let second = out.rfind("HTTP/1.1 200").unwrap();
    // Nothing between the HEAD's blank line and the next status line.
    assert!(out[..second].ends_with("\r\n\r\n"), "{out}");
}

#[tokio::test]
async fn http_1_0_and_connection_close_end_the_connection_after_the_answer() {
    let server = TestServer::spawn().await;
    for request in [
        "GET /healthz HTTP/1.0\r\n\r\n",
        "GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    ] {
        let out = answer_then_close(&server, request.as_bytes()).await;
        assert!(out.starts_with("HTTP/1."), "{out}");
        assert!(out.contains(" 200 OK\r\n"), "{out}");
    }
}

#[tokio::test]
async fn a_kept_alive_connection_that_idles_past_the_header_timeout_is_closed() {
    let server =
        TestServer::with(|c| c.server.request_header_timeout = Duration::from_millis(300)).await;
    let out = answer_then_close(&server, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

/// The same between requests on a connection hyper took over (a chunked body): hyper's
/// header-read timer starts as soon as an answer is out, so nothing of ours watches it.
#[tokio::test]
async fn a_connection_hyper_served_that_idles_past_the_header_timeout_is_closed() {
    let server =
        TestServer::with(|c| c.server.request_header_timeout = Duration::from_millis(300)).await;
    let out = answer_then_close(&server, b"POST /publish/idle HTTP/1.1\r\nhost: x\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"offset\":1"), "{out}");
}

#[tokio::test]
async fn a_malformed_request_line_gets_a_json_400() {
    let server = TestServer::spawn().await;
    let out = answer_then_close(&server, b"GET /a b c HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("\"bad_request\""), "{out}");
}

#[tokio::test]
async fn a_head_over_64_kib_gets_a_json_431() {
    let server = TestServer::spawn().await;
    let out = answer_then_close(&server, &oversized_head()).await;
    assert_json_431(&out);
}

/// A connection that has been answered one GET and is waiting for its next request.
async fn kept_alive(server: &TestServer) -> TcpStream {
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut s, "\r\n\r\n", 1).await;
    s
}

/// A request whose head is over the lean path's 64 KiB.
fn oversized_head() -> Vec<u8> {
    let big = "a".repeat(70 * 1024);
    format!("GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n").into_bytes()
}

/// The lean path's answer to `oversized_head`: a JSON 431 (hyper's would be bare).
fn assert_json_431(out: &str) {
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    assert!(out.contains("\"header_too_large\""), "{out}");
}

#[tokio::test]
async fn a_long_poll_whose_client_hangs_up_is_released_at_once() {
    let server = TestServer::spawn().await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"GET /poll/gone?wait=60 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let line = "tidings_connections{transport=\"long_poll\"}";
    server.await_metric(line, 1.0).await;
    drop(s);
    server.await_metric(line, 0.0).await;
}

#[tokio::test]
async fn an_sse_stream_whose_client_hangs_up_is_released_at_once() {
    let server = TestServer::spawn().await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"GET /sse/gone HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut s, "retry:", 1).await;
    let line = "tidings_connections{transport=\"sse\"}";
    server.await_metric(line, 1.0).await;
    drop(s);
    server.await_metric(line, 0.0).await;
}

#[tokio::test]
async fn a_long_poll_answer_carries_the_cors_headers_on_both_paths() {
    let server = TestServer::spawn().await;
    // HTTP/1.1 (lean path) and HTTP/2 prior knowledge (hyper), each answered by a publish.
    for http2 in [false, true] {
        let builder = reqwest::Client::builder();
        let client = if http2 {
            builder.http2_prior_knowledge().build().unwrap()
        } else {
            builder.http1_only().build().unwrap()
        };
        let url = format!("{}/poll/cors-{http2}?wait=30", server.url);
        let poll = tokio::spawn(async move {
            client
                .get(url)
                .header("origin", "http://app.example")
                .send()
                .await
                .unwrap()
        });
        let line = "tidings_connections{transport=\"long_poll\"}";
        server.await_metric(line, 1.0).await;
        server
            .publish(&format!("cors-{http2}"), serde_json::json!("hi"))
            .await;
        let res = tokio::time::timeout(TIMEOUT, poll).await.unwrap().unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.headers()["access-control-allow-origin"],
            "http://app.example"
        );
        assert!(res.headers().get("etag").is_some());
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["messages"][0]["data"], "hi", "{body}");
        server.await_metric(line, 0.0).await;
    }
}

/// A masked client text frame (RFC 6455 §5.3).
fn client_text(text: &str) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    assert!(text.len() < 126);
    let mut out = vec![0x81, 0x80 | text.len() as u8];
    out.extend_from_slice(&mask);
    out.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

const UPGRADE: &str = "GET /ws/lean HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

#[tokio::test]
async fn a_frame_sent_in_the_same_write_as_the_handshake_is_echoed_not_lost() {
    let server = TestServer::spawn().await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut bytes = UPGRADE.as_bytes().to_vec();
    bytes.extend(client_text("early bird"));
    s.write_all(&bytes).await.unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(TIMEOUT, async {
        while !raw.ends_with(b"early bird") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early");
            raw.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("no echo");
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 101 "), "{text}");
    // The RFC's own example key and answer.
    assert!(
        text.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{text}"
    );
    // Raw mode echoes a lone client's publish as an unmasked text frame.
    let frame = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(&raw[frame..], b"\x81\x0aearly bird");
}

#[tokio::test]
async fn a_refused_upgrade_is_a_json_error_and_the_connection_serves_the_next_request() {
    let server = TestServer::spawn().await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    // No Sec-WebSocket-Key: not a handshake.
    s.write_all(
        b"GET /ws/lean HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n\r\nGET /healthz HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let out = read_until(&mut s, "HTTP/1.1 ", 2).await;
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
    assert!(out.contains("\"websocket_required\""), "{out}");
    assert!(out.contains("HTTP/1.1 200 "), "{out}");
}

#[tokio::test]
async fn an_upgrade_to_another_protocol_is_left_to_hyper_which_answers_over_http_1_1() {
    let server = TestServer::spawn().await;
    let out = answer_then_close(
        &server,
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\nupgrade: foo/2\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
}

/// A connection hyper took over (a chunked body) that then upgrades to a WebSocket keeps its
/// place against the limits and in `tidings_http_connections` while the session lives.
#[tokio::test]
async fn a_websocket_upgraded_through_hyper_is_counted_as_an_open_connection_until_it_ends() {
    let server = TestServer::spawn().await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(
        b"POST /publish/viahyper HTTP/1.1\r\nhost: x\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    read_until(&mut s, "HTTP/1.1 200 ", 1).await;
    let mut bytes = UPGRADE.as_bytes().to_vec();
    bytes.extend(client_text("through hyper"));
    s.write_all(&bytes).await.unwrap();
    let out = read_until(&mut s, "through hyper", 1).await;
    assert!(out.contains("HTTP/1.1 101 "), "{out}");
    assert_eq!(server.state.limits.open(), 1);
    assert_eq!(server.state.metrics.http_connections.load(Relaxed), 1);
    drop(s);
    eventually("the session's connection is gone", async || {
        server.state.limits.open() == 0 && server.state.metrics.http_connections.load(Relaxed) == 0
    })
    .await;
}

/// Sends `request` on `s` and reads exactly one answer with a `content-length`.
async fn one_answer(s: &mut TcpStream, request: &[u8]) -> String {
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(TIMEOUT, async {
        loop {
            if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if out.len() >= end + 4 + len {
                    assert_eq!(out.len(), end + 4 + len, "one answer, nothing after it");
                    return;
                }
            }
            let n = s.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed early after:\n{}",
                String::from_utf8_lossy(&out)
            );
            out.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out:\n{}", String::from_utf8_lossy(&out)));
    String::from_utf8_lossy(&out).into_owned()
}

fn publish_request(channel: &str, headers: &[u8], body: &str) -> Vec<u8> {
    let mut out = format!("POST /publish/{channel} HTTP/1.1\r\nhost: x\r\n").into_bytes();
    out.extend_from_slice(headers);
    out.extend_from_slice(format!("content-length: {}\r\n\r\n{body}", body.len()).as_bytes());
    out
}

#[tokio::test]
async fn a_publish_reads_its_headers_from_the_head_in_any_case_and_nothing_carries_over_to_the_next_request()
 {
    let server = TestServer::spawn().await;
    let mut s = kept_alive(&server).await;
    // The content type in capitals still makes the body JSON.
    let out = one_answer(
        &mut s,
        &publish_request("heads", b"CONTENT-TYPE: Application/JSON\r\n", "{\"a\":1}"),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // A key, then no key: the second publish is a new message, not the first one replayed.
    let keyed = publish_request("heads", b"Idempotency-Key: k-1\r\n", "one");
    let out = one_answer(&mut s, &keyed).await;
    assert!(out.contains("\"offset\":2"), "{out}");
    let out = one_answer(&mut s, &publish_request("heads", b"", "two")).await;
    assert!(out.contains("\"offset\":3"), "{out}");
    assert!(!out.contains("idempotent-replayed"), "{out}");
    let out = one_answer(&mut s, &keyed).await;
    assert!(out.contains("\"offset\":2"), "{out}");
    assert!(out.contains("idempotent-replayed: true"), "{out}");
    // Two keys in two cases are a repeat; a key with a byte that is not ASCII is refused.
    let out = one_answer(
        &mut s,
        &publish_request(
            "heads",
            b"idempotency-key: a\r\nIDEMPOTENCY-KEY: b\r\n",
            "x",
        ),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("give one Idempotency-Key header"), "{out}");
    let out = one_answer(
        &mut s,
        &publish_request("heads", b"idempotency-key: caf\xc3\xa9\r\n", "x"),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("the Idempotency-Key is not ASCII"), "{out}");
    // A content type that is not text is no content type at all, as `HeaderValue::to_str`
    // has it: the body is text.
    let out = one_answer(
        &mut s,
        &publish_request("heads", b"content-type: application/j\xc3\xa9son\r\n", "{"),
    )
    .await;
    assert!(out.contains("\"offset\":4"), "{out}");
    let (_, history) = server.get_json("/api/channels/heads/history").await;
    let data: Vec<&serde_json::Value> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["data"])
        .collect();
    assert_eq!(
        data,
        [
            &serde_json::json!({"a": 1}),
            &serde_json::json!("one"),
            &serde_json::json!("two"),
            &serde_json::json!("{"),
        ]
    );
}

#[tokio::test]
async fn a_poll_reads_its_cursor_and_wait_from_the_head_and_the_next_poll_on_the_socket_does_not() {
    let server = TestServer::spawn().await;
    let first = server.publish("heads", serde_json::json!(1)).await;
    server.publish("heads", serde_json::json!(2)).await;
    let cursor = first["cursor"].as_str().unwrap().to_string();
    let mut s = kept_alive(&server).await;
    // `Last-Event-ID` in capitals, and `Prefer` given twice: the wait is in the second line.
    let request = format!(
        "GET /poll/heads HTTP/1.1\r\nhost: x\r\nLAST-EVENT-ID: {cursor}\r\nprefer: respond-async\r\nPrefer: wait=5\r\n\r\n"
    );
    let out = one_answer(&mut s, request.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("preference-applied: wait=5"), "{out}");
    let body: serde_json::Value =
        serde_json::from_str(&out[out.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_eq!(body["messages"].as_array().unwrap().len(), 1, "{body}");
    assert_eq!(body["messages"][0]["data"], 2, "{body}");
    // The same socket, no cursor and no wait: a short poll from now, empty and at once.
    let out = one_answer(&mut s, b"GET /poll/heads HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(!out.contains("preference-applied"), "{out}");
    assert!(out.contains("\"messages\":[]"), "{out}");
    // A cursor that is not text is no cursor (as before): the history parameter decides.
    let out = one_answer(
        &mut s,
        b"GET /poll/heads?history=1 HTTP/1.1\r\nhost: x\r\nlast-event-id: \xff\xfe\r\n\r\n",
    )
    .await;
    assert!(out.contains("\"data\":2"), "{out}");
    assert!(!out.contains("\"data\":1"), "{out}");
}

#[tokio::test]
async fn requests_the_lean_request_does_not_hold_are_answered_as_before() {
    let server = TestServer::spawn().await;
    let mut s = kept_alive(&server).await;
    // Over 32 header lines: a full request, published all the same.
    let many: String = (0..40).map(|i| format!("x-h{i}: {i}\r\n")).collect();
    let request = publish_request("full", many.as_bytes(), "many headers");
    let out = one_answer(&mut s, &request).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // A target with characters the lean request leaves to `http`: the same answers as ever.
    let out = one_answer(&mut s, b"GET /poll/full?x={} HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let out = one_answer(&mut s, b"GET /poll/a%20b HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("invalid_channel"), "{out}");
    // A fragment is dropped, as `http` drops it.
    let out = one_answer(&mut s, b"GET /poll/full#frag HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let (_, history) = server.get_json("/api/channels/full/history").await;
    assert_eq!(history["messages"][0]["data"], "many headers", "{history}");
}
