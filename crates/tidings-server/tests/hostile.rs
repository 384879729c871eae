//! The holes of issue 19 ("hostile clients"), each reproduced over a real socket the way it
//! was found, and shown closed: replays bounded and paged, a write deadline on every
//! transport, the `/ws` slow goodbye, HTTP/2 preface and idle deadlines and streams counted
//! against the limits, cookie CSRF, per-client publish rates, one WebSocket-handshake
//! predicate, one request-head deadline, paged presence. (Cursor-hash collisions are
//! tested in `tidings-core`'s `subscription` tests with a forged hash: finding a real FNV-1a
//! collision is a 2^32-step search.)
//! `scripts/hostile.py` runs the same attacks against a release build and reports RSS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::time::Instant;

use common::{TIMEOUT, TestServer, eventually, read_to_end};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// A client socket with a small receive buffer, so a client that does not read stalls the
/// server's writes after a few hundred KB rather than after megabytes of kernel buffers.
async fn small_window(addr: std::net::SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(addr).await.unwrap()
}

fn open_connections(server: &TestServer) -> i64 {
    server.state.metrics.http_connections.load(Relaxed)
}

/// Publishes `n` messages of `size` bytes of text to `channel`, from a client that keeps no
/// connection open afterwards (the tests count the server's open connections).
async fn fill(server: &TestServer, channel: &str, n: usize, size: usize) {
    let body = "x".repeat(size);
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    for _ in 0..n {
        let res = http
            .post(format!("{}/publish/{channel}", server.url))
            .header("content-type", "text/plain")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    eventually("the publisher's connections are gone", async || {
        open_connections(server) == 0
    })
    .await;
}

#[tokio::test]
async fn a_short_poll_replay_comes_in_pages_of_the_byte_budget_and_the_cursor_fetches_the_rest() {
    let server = TestServer::with(|c| c.server.queue_max_bytes = 64 * 1024).await;
    fill(&server, "big", 40, 10_000).await;
    // history=999999: capped at what the namespace keeps (100), paged by the budget.
    let (status, first) = server.get_json("/poll?channel=big&history=999999").await;
    assert_eq!(status, 200, "{first}");
    let page = first["messages"].as_array().unwrap().len();
    assert!(
        (1..40).contains(&page),
        "one page, not the whole replay: {page}"
    );
    let mut offsets: Vec<u64> = first["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    let mut cursor = first["cursor"].as_str().unwrap().to_owned();
    while offsets.len() < 40 {
        let (_, next) = server
            .get_json(&format!("/poll?channel=big&since={cursor}"))
            .await;
        let got = next["messages"].as_array().unwrap();
        assert!(!got.is_empty(), "the cursor resumes the replay");
        offsets.extend(got.iter().map(|m| m["offset"].as_u64().unwrap()));
        cursor = next["cursor"].as_str().unwrap().to_owned();
    }
    assert_eq!(offsets, (1..=40).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_poll_of_a_large_replay_from_a_client_that_never_reads_is_dropped_after_the_write_timeout()
 {
    let server = TestServer::with(|c| {
        c.server.write_timeout = Duration::from_millis(500);
        // One page takes the whole replay (6 MB): more than the kernel buffers.
        c.server.queue_max_bytes = 32 << 20;
        c.server.request_header_timeout = Duration::from_secs(60);
    })
    .await;
    fill(&server, "big", 100, 60_000).await;
    let mut s = small_window(server.addr).await;
    s.write_all(b"GET /poll?channel=big&history=999999 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    // The client never reads: the server's write stalls, and the connection goes.
    eventually("the stalled poll's connection is closed", async || {
        open_connections(&server) == 0
    })
    .await;
    drop(s);
}

#[tokio::test]
async fn an_sse_replay_to_a_client_that_never_reads_is_dropped_after_the_write_timeout() {
    let server = TestServer::with(|c| c.server.write_timeout = Duration::from_millis(500)).await;
    fill(&server, "big", 100, 60_000).await;
    let mut s = small_window(server.addr).await;
    s.write_all(b"GET /sse?channel=big&history=100 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    eventually("the stalled stream's connection is closed", async || {
        open_connections(&server) == 0
    })
    .await;
    assert_eq!(
        server.state.metrics.connections[tidings_server::transport::TransportKind::Sse as usize]
            .load(Relaxed),
        0,
        "its session is gone too"
    );
}

#[tokio::test]
async fn a_websocket_whose_writes_stall_is_closed_after_the_write_timeout() {
    let server = TestServer::with(|c| {
        c.server.write_timeout = Duration::from_millis(500);
        c.server.ping_interval = Duration::from_secs(1);
        c.server.idle_timeout = Duration::from_secs(2);
        // The reply's page (6 MB) is more than the kernel buffers.
        c.server.queue_max_bytes = 32 << 20;
    })
    .await;
    fill(&server, "big0", 100, 60_000).await;
    let mut s = small_window(server.addr).await;
    s.write_all(
        b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
          sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    // A masked text frame: the history op, then never a read again.
    let op = br#"{"op":"history","channel":"big0","limit":100}"#;
    let mut frame = vec![0x81, 0x80 | op.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(op);
    s.write_all(&frame).await.unwrap();
    eventually("the stalled WebSocket is closed", async || {
        open_connections(&server) == 0
    })
    .await;
}

#[tokio::test]
async fn a_websocket_that_overflows_its_queue_gets_the_slow_disconnect_and_close_4008() {
    let server = TestServer::with(|c| {
        c.server.queue_max_bytes = 256 * 1024;
        c.server.write_timeout = Duration::from_secs(10);
    })
    .await;
    let tcp = small_window(server.addr).await;
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/ws", server.addr), tcp)
        .await
        .unwrap();
    ws.send(WsMessage::text(
        r#"{"id":1,"op":"subscribe","channel":"fast"}"#,
    ))
    .await
    .unwrap();
    let reply = ws.next().await.unwrap().unwrap();
    assert!(reply.to_text().unwrap().contains("\"ok\":true"), "{reply}");
    // Stop reading; publish until the session overflows.
    let slow = || {
        server.state.metrics.slow_disconnects
            [tidings_server::transport::TransportKind::WebSocket as usize]
            .load(Relaxed)
    };
    let body = "y".repeat(60_000);
    let publish = async {
        while slow() == 0 {
            server
                .http
                .post(format!("{}/publish/fast", server.url))
                .body(body.clone())
                .send()
                .await
                .unwrap();
        }
    };
    tokio::time::timeout(TIMEOUT, publish).await.unwrap();
    // Now read: some messages, then the goodbye, then 4008.
    let mut disconnect = None;
    let close = tokio::time::timeout(TIMEOUT, async {
        while let Some(frame) = ws.next().await {
            match frame {
                Ok(WsMessage::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "disconnect" {
                        disconnect = Some(v);
                    } else {
                        assert_eq!(v["type"], "message", "{v}");
                        assert!(disconnect.is_none(), "nothing after the disconnect frame");
                    }
                }
                Ok(WsMessage::Close(c)) => return c.map(|c| u16::from(c.code)),
                Ok(_) => {}
                Err(e) => panic!("the socket broke instead of closing: {e}"),
            }
        }
        None
    })
    .await
    .unwrap();
    assert_eq!(close, Some(4008));
    let d = disconnect.expect("a disconnect frame before the close");
    assert_eq!(d["reason"], "slow");
    assert_eq!(d["reconnect"], true);
}

#[tokio::test]
async fn an_http2_preface_that_never_completes_is_cut_off_by_the_head_deadline() {
    let server =
        TestServer::with(|c| c.server.request_header_timeout = Duration::from_millis(500)).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"PRI").await.unwrap();
    let started = Instant::now();
    let rest = tokio::time::timeout(TIMEOUT, read_to_end(&mut s))
        .await
        .unwrap();
    assert_eq!(rest, "");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_http2_client_that_sends_its_settings_then_goes_silent_is_closed() {
    let server = TestServer::with(|c| {
        c.server.ping_interval = Duration::from_millis(300);
        // Longer than the test waits: only the unanswered pings can close it.
        c.server.request_header_timeout = Duration::from_secs(60);
    })
    .await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    // The preface and an empty SETTINGS frame, then never an answer (not even to pings).
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let closed = tokio::time::timeout(TIMEOUT, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the silent HTTP/2 connection was never closed"
    );
}

/// An h2c connection (prior knowledge) and its request sender.
async fn h2(
    server: &TestServer,
) -> (
    hyper::client::conn::http2::SendRequest<String>,
    tokio::task::JoinHandle<()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, task)
}

fn get(path: &str) -> http::Request<String> {
    http::Request::get(format!("http://x{path}"))
        .body(String::new())
        .unwrap()
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_head_deadline() {
    let server =
        TestServer::with(|c| c.server.request_header_timeout = Duration::from_millis(500)).await;
    let (mut send, conn) = h2(&server).await;
    let res = send.send_request(get("/healthz")).await.unwrap();
    assert_eq!(res.status(), 200);
    drop(res);
    // No stream open: the server closes the connection, and the client's task ends.
    tokio::time::timeout(TIMEOUT, conn).await.unwrap().unwrap();
}

#[tokio::test]
async fn http2_streams_count_against_the_connection_limits() {
    let server = TestServer::with(|c| c.server.max_connections_per_ip = 3).await;
    let (mut send, _conn) = h2(&server).await;
    // The connection holds one place; two open streams take the other two.
    let a = send.send_request(get("/sse/one")).await.unwrap();
    let b = send.send_request(get("/sse/two")).await.unwrap();
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    let c = send.send_request(get("/sse/three")).await.unwrap();
    assert_eq!(c.status(), 503);
    // A stream that ends gives its place back.
    drop(a);
    eventually("a closed stream's place is free again", async || {
        let mut send = send.clone();
        let res = send.send_request(get("/healthz")).await.unwrap();
        res.status() == 200
    })
    .await;
    drop(b);
}

const SECRET: &str = "a-secret-long-enough-for-hs256-0123456789";
const API_KEY: &str = "backend-key-0123456789abcdef";

/// A user token for `sub` (minted with the server's own HS256 signer; verification is the
/// server's real one).
fn token(sub: &str) -> String {
    use tidings_server::auth::jwt::{Claims, Grants, mint_hs256};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = Claims {
        sub: Some(sub.into()),
        exp: Some(now + 600),
        nbf: None,
        iat: None,
        tidings: Grants {
            subscribe: vec!["*".into()],
            publish: vec!["chat:*".into()],
        },
    };
    mint_hs256(SECRET, &claims).unwrap()
}

async fn secured(edit: impl FnOnce(&mut tidings_server::Config)) -> TestServer {
    use tidings_server::config::Secret;
    TestServer::with(|c| {
        c.auth.api_keys = vec![Secret(API_KEY.into())];
        c.auth.jwt_secret = Some(Secret(SECRET.into()));
        edit(c);
    })
    .await
}

/// `POST /publish/chat:lobby` as a browser form would send it; returns the status and body.
async fn cookie_publish(server: &TestServer, headers: &[(&str, &str)]) -> (u16, String) {
    let mut req = server
        .http
        .post(format!("{}/publish/chat:lobby", server.url))
        .header("content-type", "text/plain")
        .body("forged?");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.unwrap();
    (res.status().as_u16(), res.text().await.unwrap())
}

#[tokio::test]
async fn a_cross_site_publish_riding_the_token_cookie_is_refused_and_a_same_site_one_is_not() {
    let server = secured(|_| {}).await;
    let cookie = format!("tidings_token={}", token("alice"));
    let (status, body) = cookie_publish(
        &server,
        &[("cookie", &cookie), ("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("origin_not_allowed"), "{body}");
    // No Origin at all is no browser page: refused too.
    assert_eq!(cookie_publish(&server, &[("cookie", &cookie)]).await.0, 403);
    let info: Value = server
        .http
        .get(format!("{}/api/channels/chat:lobby", server.url))
        .header("authorization", format!("Bearer {API_KEY}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(info["offset"], 1, "nothing was stored: {info}");
    // The server's own page, or a browser saying same-origin: accepted.
    let own = format!("http://{}", server.addr);
    assert_eq!(
        cookie_publish(&server, &[("cookie", &cookie), ("origin", &own)])
            .await
            .0,
        200
    );
    assert_eq!(
        cookie_publish(
            &server,
            &[("cookie", &cookie), ("sec-fetch-site", "same-origin")]
        )
        .await
        .0,
        200
    );
    // A bearer header is not something a foreign page can make a browser send.
    let bearer = format!("Bearer {}", token("alice"));
    assert_eq!(
        cookie_publish(
            &server,
            &[
                ("authorization", &bearer),
                ("origin", "https://evil.example")
            ]
        )
        .await
        .0,
        200
    );
}

#[tokio::test]
async fn the_publish_rate_is_per_user_across_connections_not_per_connection() {
    let server = secured(|c| c.server.client_publish_rate = 5).await;
    let bearer = format!("Bearer {}", token("bob"));
    let mut statuses = Vec::new();
    for _ in 0..10 {
        // A fresh client each time: a fresh connection each time.
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let res = http
            .post(format!("{}/publish/chat:x", server.url))
            .header("authorization", &bearer)
            .body("hi")
            .send()
            .await
            .unwrap();
        statuses.push(res.status().as_u16());
    }
    assert_eq!(&statuses[..5], &[200; 5], "{statuses:?}");
    assert!(statuses[5..].contains(&429), "{statuses:?}");
    // Another user has a bucket of their own.
    let other = format!("Bearer {}", token("carol"));
    let res = server
        .http
        .post(format!("{}/publish/chat:x", server.url))
        .header("authorization", &other)
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

async fn handshake(server: &TestServer, extra: &[u8]) -> String {
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut req = b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\n\
sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        .to_vec();
    req.extend_from_slice(extra);
    req.extend_from_slice(b"\r\n");
    s.write_all(&req).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(TIMEOUT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn every_handshake_the_server_would_accept_meets_the_origin_check() {
    let server =
        TestServer::with(|c| c.server.cors_origins = vec!["https://good.example".into()]).await;
    for extra in [
        &b"upgrade: websocket\r\norigin: https://evil.example\r\n"[..],
        b"upgrade: websocket, x\r\norigin: https://evil.example\r\n",
        b"upgrade: x, WebSocket\r\norigin: https://evil.example\r\n",
        b"upgrade: websocket\r\norigin: https://evil.example\xff\r\n",
    ] {
        let answer = handshake(&server, extra).await;
        assert!(
            answer.starts_with("HTTP/1.1 403"),
            "{}: {answer}",
            String::from_utf8_lossy(extra)
        );
    }
    // The same handshake from an allowed page is accepted.
    let good = b"upgrade: websocket, x\r\norigin: https://good.example\r\n";
    let answer = handshake(&server, good).await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
}

#[tokio::test]
async fn the_request_head_deadline_runs_from_the_moment_the_server_waits() {
    let server =
        TestServer::with(|c| c.server.request_header_timeout = Duration::from_millis(1000)).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let started = Instant::now();
    // Silent for most of the deadline (the server says nothing either)...
    let mut buf = [0u8; 16];
    let quiet = tokio::time::timeout(Duration::from_millis(700), s.read(&mut buf)).await;
    assert!(quiet.is_err(), "the server spoke first or closed early");
    // ...then one byte: it does not buy a second deadline.
    s.write_all(b"G").await.unwrap();
    let rest = tokio::time::timeout(TIMEOUT, read_to_end(&mut s))
        .await
        .unwrap();
    assert_eq!(rest, "");
    let held = started.elapsed();
    assert!(held < Duration::from_millis(1500), "held for {held:?}");
}

#[tokio::test]
async fn presence_reads_are_paged_and_rate_limited() {
    use tidings_server::config::NamespaceConfig;
    let server = TestServer::with(|c| {
        c.namespaces.insert(
            "room".into(),
            NamespaceConfig {
                presence: Some(true),
                ..Default::default()
            },
        );
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr))
            .await
            .unwrap();
        ws.send(WsMessage::text(r#"{"op":"subscribe","channel":"room:a"}"#))
            .await
            .unwrap();
        let reply = ws.next().await.unwrap().unwrap();
        assert!(reply.to_text().unwrap().contains("\"ok\":true"));
        clients.push(ws);
    }
    let (_, first) = server
        .get_json("/api/channels/room:a/presence?limit=2")
        .await;
    assert_eq!(first["clients"].as_array().unwrap().len(), 2, "{first}");
    let next = first["next"].as_str().unwrap().to_owned();
    let (_, second) = server
        .get_json(&format!(
            "/api/channels/room:a/presence?limit=2&after={next}"
        ))
        .await;
    assert_eq!(second["clients"].as_array().unwrap().len(), 1, "{second}");
    assert!(second["next"].is_null());
    let mut ids: Vec<String> = first["clients"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["clients"].as_array().unwrap())
        .map(|c| c["client"].as_str().unwrap().to_owned())
        .collect();
    ids.dedup();
    assert_eq!(ids.len(), 3);
    // One client asking in a loop is slowed down.
    let ws = &mut clients[0];
    for id in 0..30 {
        ws.send(WsMessage::text(
            json!({"id": id, "op": "presence", "channel": "room:a"}).to_string(),
        ))
        .await
        .unwrap();
    }
    let mut limited = 0;
    for _ in 0..30 {
        let frame = tokio::time::timeout(TIMEOUT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
        if v["error"]["code"] == "rate_limited" {
            limited += 1;
        }
    }
    assert!(limited > 0, "30 presence reads at once were all answered");
}
