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

async fn connect(
    server: &TlsServer,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server.root.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
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
