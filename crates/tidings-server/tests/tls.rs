//! TLS with ALPN: h2 is negotiated, and one TLS connection carries many SSE streams at once
//! (what lets a browser open more than six EventSources per origin). HTTP/1.1 over TLS is
//! served by the lean path as on plaintext: streams, pipelining, hand-offs to hyper, JSON
//! errors for bad heads, WebSocket upgrades.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::read_until;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tidings_server::{AppState, Config};
use tokio::net::TcpListener;

struct TlsServer {
    addr: std::net::SocketAddr,
    http_url: String,
    root: CertificateDer<'static>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn tls_server() -> TlsServer {
    let dir = std::env::temp_dir().join(format!(
        "tidings-tls-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    let mut config = Config::default();
    config.server.tls_cert = Some(dir.join("cert.pem"));
    config.server.tls_key = Some(dir.join("key.pem"));
    config.server.tls_listen = Some("127.0.0.1:0".into());
    let (_, acceptor) = tidings_server::tls::from_config(&config).unwrap().unwrap();
    let state = AppState::new(config).unwrap();
    let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_url = format!("http://{}", plain.local_addr().unwrap());
    let tls = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tls.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tidings_server::serve_all(
        state,
        plain,
        Some((tls, acceptor)),
        async {
            let _ = stopped.await;
        },
    ));
    TlsServer {
        addr,
        http_url,
        root: cert.cert.der().clone(),
        _stop: stop,
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A client that trusts only the test server's certificate and offers `alpn`.
fn client_config(server: &TlsServer, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server.root.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

async fn connect(
    server: &TlsServer,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tokio_rustls::TlsConnector::from(client_config(server, alpn))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test]
async fn alpn_negotiates_h2_and_one_tls_connection_carries_ten_sse_streams() {
    let server = tls_server().await;
    let tls = connect(&server, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut bodies = Vec::new();
    for _ in 0..10 {
        let res = sender
            .send_request(
                Request::get(format!("https://localhost:{}/sse/tls", server.addr.port()))
                    .version(Version::HTTP_2)
                    .body(Empty::<Bytes>::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let mut body = res.into_body();
        // Live once the id-only block after the (empty) replay arrives.
        let mut seen = String::new();
        while !seen.contains("\nid: ") && !seen.starts_with("id: ") {
            let f = body.frame().await.unwrap().unwrap();
            seen.push_str(&String::from_utf8_lossy(&f.into_data().unwrap()));
        }
        bodies.push(body);
    }
    let http = reqwest::Client::new();
    let res = http
        .post(format!("{}/publish/tls", server.http_url))
        .header("content-type", "application/json")
        .body(r#"{"over":"tls"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    for mut body in bodies {
        let mut seen = String::new();
        let got = tokio::time::timeout(common::TIMEOUT, async {
            while !seen.contains(r#"data: {"over":"tls"}"#) {
                let f = body.frame().await.unwrap().unwrap();
                if let Ok(d) = f.into_data() {
                    seen.push_str(&String::from_utf8_lossy(&d));
                }
            }
        })
        .await;
        assert!(got.is_ok(), "a stream missed the message: {seen}");
    }
}

#[tokio::test]
async fn http1_clients_get_http1_over_tls() {
    let server = tls_server().await;
    let tls = connect(&server, &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let res = sender
        .send_request(
            Request::get("/healthz")
                .header("host", "localhost")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn a_websocket_over_tls_echoes_on_a_raw_channel_and_closes_cleanly() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let server = tls_server().await;
    let tls = connect(&server, &[b"http/1.1"]).await;
    // HTTP/1.1 over TLS: the lean path answers the upgrade and the session takes the socket.
    let (mut ws, res) = tokio_tungstenite::client_async("wss://localhost/ws/tls-echo", tls)
        .await
        .unwrap();
    assert_eq!(res.status(), 101);
    ws.send(Message::text("over tls")).await.unwrap();
    let echo = tokio::time::timeout(common::TIMEOUT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echo, Message::text("over tls"));
    ws.close(None).await.unwrap();
    // The server answers the close and ends the stream.
    let rest = tokio::time::timeout(common::TIMEOUT, async {
        let mut frames = Vec::new();
        while let Some(Ok(frame)) = ws.next().await {
            frames.push(frame);
        }
        frames
    })
    .await
    .unwrap();
    assert!(
        rest.iter().all(|f| matches!(f, Message::Close(_))),
        "{rest:?}"
    );
}

#[tokio::test]
async fn an_sse_stream_over_tls_delivers_each_message_as_it_is_published() {
    use tokio::io::AsyncWriteExt;
    let server = tls_server().await;
    let mut tls = connect(&server, &[b"http/1.1"]).await;
    tls.write_all(b"GET /sse/tls-live HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    // The head and the opening record arrive before anything is published.
    let opened = read_until(&mut tls, "id: ", 1).await;
    assert!(opened.starts_with("HTTP/1.1 200 "), "{opened}");
    let client = reqwest::Client::new();
    for n in 1..=3 {
        client
            .post(format!("{}/publish/tls-live", server.http_url))
            .body(format!("message {n}"))
            .send()
            .await
            .unwrap();
        // Each one is written out (TLS records flushed) on its own, not at the next write.
        read_until(&mut tls, &format!("data: message {n}"), 1).await;
    }
}

#[tokio::test]
async fn over_tls_a_publish_is_served_on_the_lean_path_a_chunked_one_by_hyper_and_a_huge_head_gets_a_json_431()
 {
    use tokio::io::AsyncWriteExt;
    let server = tls_server().await;
    let mut tls = connect(&server, &[b"http/1.1"]).await;
    tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut tls, "\r\n\r\n", 1).await;
    tls.write_all(b"POST /publish/tls-lean HTTP/1.1\r\nhost: localhost\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nhello")
        .await
        .unwrap();
    let out = read_until(&mut tls, "\"offset\":1", 1).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // The same connection is still the lean path's: its 431 is JSON.
    let big = "a".repeat(70 * 1024);
    tls.write_all(
        format!("GET /healthz HTTP/1.1\r\nhost: localhost\r\nx-big: {big}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let out = read_until(&mut tls, "header_too_large", 1).await;
    assert!(out.contains("HTTP/1.1 431"), "{out}");

    // A chunked body goes to hyper over TLS, from its first byte.
    let mut tls = connect(&server, &[b"http/1.1"]).await;
    tls.write_all(b"POST /publish/tls-handoff HTTP/1.1\r\nhost: localhost\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        .await
        .unwrap();
    let out = read_until(&mut tls, "\"offset\":1", 1).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

#[test]
fn tls_settings_that_do_not_fit_together_are_refused() {
    let mut c = Config::default();
    c.server.tls_listen = Some("127.0.0.1:0".into());
    assert!(
        tidings_server::tls::from_config(&c).is_err(),
        "tls_listen without a certificate"
    );
    let mut c = Config::default();
    c.server.tls_self_signed = true;
    c.server.tls_cert = Some("x.pem".into());
    c.server.tls_key = Some("y.pem".into());
    assert!(tidings_server::tls::from_config(&c).is_err());
    let mut c = Config::default();
    c.server.tls_self_signed = true;
    let (addr, _) = tidings_server::tls::from_config(&c).unwrap().unwrap();
    assert_eq!(addr.to_string(), "127.0.0.1:8443", "SPEC §12 default");
}

#[tokio::test]
async fn a_websocket_over_tls_carries_messages_larger_than_a_tls_record_whole_both_ways() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let server = tls_server().await;
    let tls = connect(&server, &[b"http/1.1"]).await;
    let (mut ws, _) = tokio_tungstenite::client_async("wss://localhost/ws/tls-big", tls)
        .await
        .unwrap();
    // A small message first: the connection has read, answered and gone back to waiting.
    ws.send(Message::text("small")).await.unwrap();
    type Wss =
        tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    async fn next(ws: &mut Wss) -> Message {
        tokio::time::timeout(common::TIMEOUT, ws.next())
            .await
            .expect("a message in time")
            .expect("the stream is open")
            .expect("a frame")
    }
    assert_eq!(next(&mut ws).await, Message::text("small"));
    // Published from the backend: ~60 KB, four TLS records' worth.
    let big: String = (0..60_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let res = reqwest::Client::new()
        .post(format!("{}/publish/tls-big", server.http_url))
        .header("content-type", "application/json")
        .body(serde_json::json!({ "big": big }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let got = next(&mut ws).await;
    let got: serde_json::Value = serde_json::from_str(got.to_text().unwrap()).unwrap();
    assert_eq!(got["big"].as_str().map(str::len), Some(big.len()));
    assert_eq!(got["big"], big.as_str());
    // From the client: one frame over several records, echoed back whole (one subscriber).
    let upstream = big.chars().rev().collect::<String>();
    ws.send(Message::text(upstream.clone())).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text(upstream));
}

/// A socket that hands the kernel one byte per write and lets the runtime run between two,
/// so the server sees records (the handshake's too) arrive a piece at a time.
struct Trickle {
    inner: tokio::net::TcpStream,
    paused: bool,
}

impl tokio::io::AsyncRead for Trickle {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Trickle {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if !self.paused && !buf.is_empty() {
            self.paused = true;
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        self.paused = false;
        let one = &buf[..buf.len().min(1)];
        std::pin::Pin::new(&mut self.inner).poll_write(cx, one)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// Two workers: the server reads on one while the client trickles on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_its_records_one_byte_at_a_time_is_served_and_closed_with_close_notify() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = tls_server().await;
    let config = client_config(&server, &[b"http/1.1"]);
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let trickle = Trickle {
        inner: tcp,
        paused: false,
    };
    let mut tls = tokio::time::timeout(
        common::TIMEOUT,
        tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::try_from("localhost").unwrap(), trickle),
    )
    .await
    .expect("the handshake in time")
    .unwrap();
    tls.write_all(b"POST /publish/tls-trickle HTTP/1.1\r\nhost: localhost\r\ncontent-type: text/plain\r\ncontent-length: 11\r\n\r\none by one!")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    let out = read_until(&mut tls, "\"offset\":1", 1).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    // The server ends the connection with a close_notify: a clean end of stream, which
    // rustls tells from a truncation (that would be an `UnexpectedEof` error).
    let mut rest = Vec::new();
    tokio::time::timeout(common::TIMEOUT, tls.read_to_end(&mut rest))
        .await
        .expect("the server closes in time")
        .expect("a clean TLS close");
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest}");
}

#[tokio::test]
async fn a_client_that_updates_its_keys_mid_connection_keeps_being_answered_under_the_new_ones() {
    use tokio::io::AsyncWriteExt;
    let server = tls_server().await;
    let mut tls = connect(&server, &[b"http/1.1"]).await;
    tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let out = read_until(&mut tls, "\r\n\r\n", 1).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // TLS 1.3 KeyUpdate, asking the server to update its keys too: it has to answer with
    // its own before anything it encrypts next, or this client cannot read it.
    tls.get_mut().1.refresh_traffic_keys().unwrap();
    let body = "k".repeat(40_000);
    tls.write_all(
        format!(
            "POST /publish/tls-rekey HTTP/1.1\r\nhost: localhost\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let out = read_until(&mut tls, "\"offset\":1", 1).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let client = reqwest::Client::new();
    let history = client
        .get(format!(
            "{}/api/channels/tls-rekey/history",
            server.http_url
        ))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(history["messages"][0]["data"], body.as_str());
}

/// Reads until the server ends the connection (an end of stream, a reset, or a TLS alert
/// read as an error); panics if it is still open after `common::TIMEOUT`.
async fn ends<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, what: &str) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    tokio::time::timeout(common::TIMEOUT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: the server kept the connection open"));
}

/// The TLS stream is ours (rustls' unbuffered API under buffers of our own), so what a
/// hostile peer sends must end its own connection, promptly and with nothing held for it,
/// and never the server: plaintext on the TLS port, a record header that claims more than
/// TLS allows (the server must not wait for, or reserve, 64 KiB), and a forged record after
/// a good handshake (it fails to decrypt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_are_not_tls_an_oversized_record_and_a_forged_one_end_only_their_own_connection()
{
    use tokio::io::AsyncWriteExt;
    let server = tls_server().await;

    let mut plain = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    ends(&mut plain, "plaintext on the TLS port").await;

    // A handshake record whose length is 0xFFFF (TLS allows 16 KiB plus expansion), then a
    // few of its "bytes" and silence.
    let mut huge = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    huge.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3, 4])
        .await
        .unwrap();
    ends(&mut huge, "an oversized record").await;

    // A good handshake, then an application-data record that no key made.
    let mut forged = connect(&server, &[b"http/1.1"]).await;
    let mut record = vec![0x17, 0x03, 0x03, 0x00, 0x40];
    record.extend((0..0x40u8).map(|i| i.wrapping_mul(37)));
    forged.get_mut().0.write_all(&record).await.unwrap();
    ends(&mut forged, "a forged record").await;

    // The server goes on serving, over TLS as before.
    let mut good = connect(&server, &[b"http/1.1"]).await;
    good.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let out = read_until(&mut good, "HTTP/1.1 200", 1).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

/// rustls does not remember a record that failed to decrypt: the sequence number did not
/// move, so the client's next genuine record decrypts under the same keys. The stream must
/// remember it instead (found by the `tls` fuzz target): after the error its reader gets
/// errors, not the next record, its writer is refused, and the client gets the fatal alert.
/// The server's stream runs here by itself over a real socket, because the server's own
/// readers stop at the first error and could not show a read after it.
#[tokio::test]
async fn after_a_record_that_does_not_decrypt_the_stream_reads_and_writes_nothing_more_not_even_the_clients_next_genuine_record()
 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (chain, key) = tidings_server::tls::self_signed().unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain.clone(), key)
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = tidings_server::net::tls::accept(tcp, Arc::new(config))
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        while got.len() < 5 {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "the end before the first record");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"first");
        let err = tls.read(&mut buf).await.expect_err("the forged record");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
        let again = tls.read(&mut buf).await;
        assert!(
            again.is_err(),
            "read after the error: {again:?} ({:?})",
            again
                .as_ref()
                .map(|&n| String::from_utf8_lossy(&buf[..n]).into_owned())
        );
        let wrote = tls.write(b"reply").await;
        assert!(wrote.is_err(), "written after the error: {wrote:?}");
    });

    let mut roots = rustls::RootCertStore::empty();
    roots.add(chain[0].clone()).unwrap();
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut client = tokio_rustls::TlsConnector::from(Arc::new(client_config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    client.write_all(b"first").await.unwrap();
    client.flush().await.unwrap();
    let mut forged = vec![0x17, 0x03, 0x03, 0x00, 0x40];
    forged.extend((0..0x40u8).map(|i| i.wrapping_mul(37)));
    client.get_mut().0.write_all(&forged).await.unwrap();
    client.write_all(b"second").await.unwrap();
    client.flush().await.unwrap();

    tokio::time::timeout(common::TIMEOUT, server)
        .await
        .expect("the server's stream answered within the timeout")
        .unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(common::TIMEOUT, client.read(&mut buf))
        .await
        .expect("the client heard back");
    let err = read.expect_err("the server's alert, not data");
    assert!(
        err.to_string().contains("BadRecordMac"),
        "the alert for a record that does not decrypt: {err}"
    );
}
