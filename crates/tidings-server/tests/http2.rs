//! HTTP/2 without TLS (h2c, prior knowledge) on the same port as HTTP/1.1: publishing and
//! several streams multiplexed over one connection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestServer, eventually};
use futures_util::StreamExt;

#[tokio::test]
async fn h2c_carries_publishes_and_many_streams_on_one_connection() {
    let server = TestServer::spawn().await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .unwrap();
    let mut streams = Vec::new();
    for i in 0..10 {
        let path = if i % 2 == 0 { "sse/h2" } else { "stream/h2" };
        let res = h2
            .get(format!("{}/{path}", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(res.version(), reqwest::Version::HTTP_2);
        assert_eq!(res.status(), 200);
        let mut body = res.bytes_stream();
        // Wait for the subscription to be live (its first chunk carries the ready marker).
        let mut seen = Vec::new();
        while !(String::from_utf8_lossy(&seen).contains("id: ")
            || String::from_utf8_lossy(&seen).contains("\"ready\""))
        {
            seen.extend_from_slice(&body.next().await.unwrap().unwrap());
        }
        streams.push(body);
    }
    let res = h2
        .post(format!("{}/publish/h2", server.url))
        .header("content-type", "application/json")
        .body(r#"{"over":"h2"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_2);
    assert_eq!(res.status(), 200);
    let metrics = h2
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tidings_connections{transport=\"sse\"} 5\n"),
        "{metrics}"
    );
    assert!(metrics.contains("tidings_connections{transport=\"http_stream\"} 5\n"));
    for mut body in streams {
        let mut seen = Vec::new();
        let received = tokio::time::timeout(common::TIMEOUT, async {
            while !String::from_utf8_lossy(&seen).contains(r#"{"over":"h2"}"#) {
                seen.extend_from_slice(&body.next().await.unwrap().unwrap());
            }
        })
        .await;
        assert!(
            received.is_ok(),
            "a stream missed the message: {:?}",
            String::from_utf8_lossy(&seen)
        );
    }
    // All ten streams, the publish and this metrics read share one TCP connection.
    let metrics = h2
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tidings_http_connections_total 1\n"),
        "{metrics}"
    );
}

/// RFC 8441: a WebSocket as one stream of an HTTP/2 connection, beside an SSE stream.
#[tokio::test]
async fn a_websocket_rides_an_http2_stream_beside_sse_on_one_connection() {
    use bytes::Bytes;
    use futures_util::SinkExt;
    use http_body_util::{BodyExt, Empty};
    use hyper::{Method, Request, Version};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message as Ws;
    use tokio_tungstenite::tungstenite::protocol::Role;

    let server = TestServer::spawn().await;
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    // The server's SETTINGS (with ENABLE_CONNECT_PROTOCOL) arrive with the first exchange.
    let sse = sender
        .send_request(
            Request::get(format!("{}/sse/h2ws", server.url))
                .version(Version::HTTP_2)
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let mut sse_body = sse.into_body();
    let connect = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("{}/ws/h2ws", server.url))
        .version(Version::HTTP_2)
        .header("sec-websocket-version", "13")
        .extension(hyper::ext::Protocol::from_static("websocket"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = sender.send_request(connect).await.unwrap();
    assert_eq!(res.status(), 200, "extended CONNECT accepted");
    let upgraded = hyper::upgrade::on(res).await.unwrap();
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    ws.send(Ws::text("over h2")).await.unwrap();
    let echoed = tokio::time::timeout(common::TIMEOUT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed, Ws::text("over h2"));
    // The SSE stream on the same connection got the WebSocket's publish too.
    let mut seen = Vec::new();
    let got = tokio::time::timeout(common::TIMEOUT, async {
        while !String::from_utf8_lossy(&seen).contains("data: over h2") {
            let frame = sse_body.frame().await.unwrap().unwrap();
            if let Ok(data) = frame.into_data() {
                seen.extend_from_slice(&data);
            }
        }
    })
    .await;
    assert!(got.is_ok(), "{}", String::from_utf8_lossy(&seen));
    assert_eq!(
        server.metric("tidings_http_connections_total").await,
        2.0,
        "one h2 connection plus this metrics read"
    );
}

/// An HTTP/2 stream counts against the connection limits like a connection (SPEC §13); a
/// WebSocket on one keeps its place for as long as the session lives, not only until its
/// extended CONNECT is answered.
#[tokio::test]
async fn a_websocket_over_http2_holds_its_place_against_the_connection_limits_until_it_ends() {
    use bytes::Bytes;
    use futures_util::SinkExt;
    use http_body_util::Empty;
    use hyper::{Method, Request, Version};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message as Ws;
    use tokio_tungstenite::tungstenite::protocol::Role;

    let server = TestServer::with(|c| c.server.max_connections = 2).await;
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    // A first exchange brings the server's SETTINGS (ENABLE_CONNECT_PROTOCOL).
    let health = sender
        .send_request(
            Request::get(format!("{}/healthz", server.url))
                .version(Version::HTTP_2)
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let connect = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("{}/ws/h2places", server.url))
        .version(Version::HTTP_2)
        .header("sec-websocket-version", "13")
        .extension(hyper::ext::Protocol::from_static("websocket"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = sender.send_request(connect).await.unwrap();
    assert_eq!(res.status(), 200);
    let upgraded = hyper::upgrade::on(res).await.unwrap();
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    ws.send(Ws::text("placed")).await.unwrap();
    let echoed = tokio::time::timeout(common::TIMEOUT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed, Ws::text("placed"));
    // The session is live and answered: the connection and the WebSocket hold both places.
    assert_eq!(
        server.state.limits.open(),
        2,
        "connection + WebSocket stream"
    );
    // A third connection finds no place: the server answers 503 without reading a request.
    let mut third = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let refused = common::read_to_end(&mut third).await;
    assert!(
        refused.starts_with("HTTP/1.1 503") && refused.contains("too_many_connections"),
        "{refused}"
    );
    // Once the session ends, its place is free again.
    ws.close(None).await.unwrap();
    eventually("the WebSocket's place is given back", async || {
        server.state.limits.open() == 1
    })
    .await;
    let (status, _) = server.get_json("/healthz").await;
    assert_eq!(status, 200);
}

/// A socket whose reads the test can hold back: while held, the client's h2 connection gets
/// nothing the server sends (it waits in the kernel's buffers and, beyond them, in the
/// server's), as with a client that stopped reading. Writes always go through.
struct HeldReads {
    tcp: tokio::net::TcpStream,
    gate: std::sync::Arc<Gate>,
}

#[derive(Default)]
struct Gate {
    held: std::sync::atomic::AtomicBool,
    waker: futures_util::task::AtomicWaker,
}

impl Gate {
    fn hold(&self) {
        self.held.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn release(&self) {
        self.held.store(false, std::sync::atomic::Ordering::SeqCst);
        self.waker.wake();
    }
}

impl tokio::io::AsyncRead for HeldReads {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.gate.waker.register(cx.waker());
        if self.gate.held.load(std::sync::atomic::Ordering::SeqCst) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for HeldReads {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// The HTTP/2 idle close under test: what `request_header_timeout` is set to.
const IDLE: std::time::Duration = std::time::Duration::from_millis(300);

/// A directory removed when dropped.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `static_dir` holding `big.bin`: `len` bytes in a sequence that does not repeat within
/// it, so a truncated or shuffled body cannot compare equal.
fn big_file(len: usize) -> (TempDir, Vec<u8>) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tidings-h2idle-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut x: u32 = 0x9e37_79b9;
    let body: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect();
    std::fs::write(dir.join("big.bin"), &body).unwrap();
    (TempDir(dir), body)
}

/// An h2c client whose reads `gate` holds, on a socket that keeps the kernels' share small:
/// a small receive buffer, and a small MSS (536), which is what loopback's send buffer is
/// sized from — with loopback's 64 KB MSS the server's kernel alone would take megabytes,
/// and a held response would never be *in the server*. Windows (16 MB) never stop the
/// server: it queues a whole `big_file` at once and its stream ends while most of the bytes
/// wait in `h2`'s send buffer. Returns once a first exchange (`/healthz`) went through, so
/// both sides' SETTINGS are applied.
async fn held_client(
    server: &TestServer,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    std::sync::Arc<Gate>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket2::SockRef::from(&socket).set_tcp_mss(536).unwrap();
    let tcp = socket.connect(server.addr).await.unwrap();
    let gate = std::sync::Arc::new(Gate::default());
    let io = HeldReads {
        tcp,
        gate: gate.clone(),
    };
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(16 << 20)
        .initial_connection_window_size(16 << 20)
        .handshake::<_, bytes::Bytes>(io)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let (res, _) = client
        .send_request(h2_request(server, "/healthz"), true)
        .unwrap();
    let res = tokio::time::timeout(common::TIMEOUT, res)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), 200);
    let health = read_h2_body(res.into_body()).await.unwrap();
    assert!(!health.is_empty());
    (client, gate, conn)
}

fn h2_request(server: &TestServer, path: &str) -> http::Request<()> {
    http::Request::get(format!("http://{}{path}", server.addr))
        .body(())
        .unwrap()
}

/// A body read to its end (its window given back as it comes), or what came before the
/// error that cut it.
async fn read_h2_body(mut body: h2::RecvStream) -> Result<Vec<u8>, (Vec<u8>, h2::Error)> {
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        match chunk {
            Ok(chunk) => {
                let _ = body.flow_control().release_capacity(chunk.len());
                out.extend_from_slice(&chunk);
            }
            Err(e) => return Err((out, e)),
        }
    }
    Ok(out)
}

/// An HTTP/2 response is queued in the server (h2's send buffer) before it is on the wire;
/// its stream ends there. A client that stops reading for longer than the idle close then
/// reads on still gets every byte: the idle close is a GOAWAY after what was queued, not a
/// drop of the connection with the response's tail in it. (The server that dropped it cut
/// this body after 81,920 of 393,216 bytes.)
#[tokio::test]
async fn an_http2_client_that_pauses_reading_past_the_idle_close_still_gets_the_whole_body() {
    let (dir, file) = big_file(384 * 1024);
    let static_dir = dir.0.clone();
    let server = TestServer::with(move |c| {
        c.server.static_dir = Some(static_dir);
        c.server.request_header_timeout = IDLE;
    })
    .await;
    let (mut client, gate, conn) = held_client(&server).await;
    gate.hold();
    let (res, _) = client
        .send_request(h2_request(&server, "/big.bin"), true)
        .unwrap();
    // The client's pause, well past the idle close: this wait is the slow reader under test
    // (its length is the input), not a wait for something to happen. The server ends its
    // stream as soon as the body is queued, and the idle timer starts then.
    tokio::time::sleep(IDLE * 4).await;
    gate.release();
    let res = tokio::time::timeout(common::TIMEOUT, res)
        .await
        .expect("the response head within TIMEOUT")
        .expect("the response head, not a connection error");
    assert_eq!(res.status(), 200);
    let body = tokio::time::timeout(common::TIMEOUT, read_h2_body(res.into_body()))
        .await
        .expect("the body within TIMEOUT");
    match body {
        Ok(body) => assert!(
            body == file,
            "the body differs: {} bytes of {}",
            body.len(),
            file.len()
        ),
        Err((got, e)) => panic!(
            "the body was cut after {} of {} bytes: {e}",
            got.len(),
            file.len()
        ),
    }
    // With the body delivered, the idle connection is still closed (by the server: the
    // client holds its `SendRequest` and would keep it open).
    tokio::time::timeout(common::TIMEOUT, conn)
        .await
        .expect("the server closes the idle connection once its queue is out")
        .unwrap()
        .ok();
    eventually("the connection's place is given back", async || {
        server.state.limits.open() == 0
    })
    .await;
}

/// The idle close waits for queued bytes only while they can go: a peer that never reads
/// is still closed, by `write_timeout` when the server has bytes the kernel refuses, by the
/// ping timeout when everything fits in the kernel's buffers. (Each bound is far below the
/// other one's, so the close within `TIMEOUT` shows which one did it.)
#[tokio::test]
async fn an_http2_peer_that_never_reads_is_still_closed_by_the_write_timeout_or_the_ping() {
    // Queued in `h2` beyond what the kernels take, the stream ended, the idle close
    // started at 0.3 s: the GOAWAY waits behind refused writes, and `write_timeout` ends it
    // (1 s; pings every 25 s would take 50 s).
    let (dir, _) = big_file(384 * 1024);
    let static_dir = dir.0.clone();
    let server = TestServer::with(move |c| {
        c.server.static_dir = Some(static_dir);
        c.server.request_header_timeout = IDLE;
        c.server.write_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let (mut client, gate, _conn) = held_client(&server).await;
    gate.hold();
    let _res = client
        .send_request(h2_request(&server, "/big.bin"), true)
        .unwrap();
    eventually(
        "a peer that never reads a large body is closed by write_timeout",
        async || server.state.limits.open() == 0,
    )
    .await;

    // Nothing refused, the idle close's GOAWAY and its ping unanswered: the ping timeout
    // (pings every 1 s, so the idle close at 0.3 s has started; the default `write_timeout`
    // never fires, nothing is refused).
    let server = TestServer::with(|c| {
        c.server.request_header_timeout = IDLE;
        c.server.ping_interval = std::time::Duration::from_secs(1);
    })
    .await;
    let (_client, gate, _conn) = held_client(&server).await;
    gate.hold();
    eventually(
        "an idle peer that never reads is closed by the ping timeout",
        async || server.state.limits.open() == 0,
    )
    .await;
}
