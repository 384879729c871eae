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
