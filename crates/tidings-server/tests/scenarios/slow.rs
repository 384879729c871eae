//! A subscriber that stops reading is disconnected as `slow`; the publisher never waits.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

use crate::common::{Item, Kind, Start, TestServer, subscribe};
use crate::every_transport;

async fn a_slow_subscriber_is_disconnected_without_blocking_the_publisher(kind: Kind) {
    let server = TestServer::with(|c| c.server.queue_max_bytes = 64 * 1024).await;
    let path = match kind {
        Kind::SseRaw => "/sse/busy",
        Kind::Sse => "/sse?channel=busy",
        _ => "/stream?channel=busy",
    };
    // A small receive buffer so the kernel cannot absorb the whole burst for the client.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(server.addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // Read until the subscription is live, and keep its cursor.
    let mut head = Vec::new();
    let cursor = loop {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before the subscription was live");
        head.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&head);
        let marker = if kind == Kind::Stream {
            "\"type\":\"ready\",\"cursor\":\""
        } else {
            "\nid: "
        };
        if let Some(at) = text.find(marker) {
            let rest = &text[at + marker.len()..];
            if let Some(end) = rest.find(['"', '\n']) {
                break rest[..end].to_owned();
            }
        }
    };
    // Now stop reading and publish far more than the queue and the socket buffers hold.
    let payload = "x".repeat(60_000);
    let started = tokio::time::Instant::now();
    for _ in 0..400 {
        server.publish("busy", json!(payload)).await;
    }
    // 24 MB of publishes; with a blocking publisher this would never finish.
    assert!(started.elapsed() < Duration::from_secs(30));
    let label = if kind == Kind::Stream {
        "http_stream"
    } else {
        "sse"
    };
    let metric = format!("tidings_slow_disconnects_total{{transport=\"{label}\"}}");
    // Counted when the session ends (its writer dropped with the killed connection, up
    // to the kill grace after the overflow), not on the publisher's thread.
    server.await_metric(&metric, 1.0).await;
    // The connection ends: reading drains what was buffered, then hits EOF (or a reset).
    let mut sink = vec![0u8; 1 << 16];
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the slow connection was never closed");
    // Its cursor still resumes: what history no longer holds is reported as a gap.
    let mut sub = subscribe(&server, kind, &["busy"], Start::Since(cursor)).await;
    match sub.next().await {
        Item::Gap(g) => assert_eq!(g["reason"], "trimmed"),
        other => panic!("expected a gap, got {other:?}"),
    }
}
every_transport!(a_slow_subscriber_is_disconnected_without_blocking_the_publisher: SseRaw, Sse, Stream);

/// The same over WebSocket: a client that completes the handshake (and, on `/ws`, its
/// subscribe) and then stops reading is closed as slow, and publishing never waits for it.
async fn a_slow_websocket_client_is_disconnected_without_blocking_the_publisher(kind: Kind) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as Ws;

    let server = TestServer::with(|c| c.server.queue_max_bytes = 64 * 1024).await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(server.addr).await.unwrap();
    let path = if kind == Kind::WsRaw {
        "/ws/busy"
    } else {
        "/ws"
    };
    let url = format!("ws://{}{path}", server.addr);
    let (mut ws, _) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
    if kind == Kind::Ws {
        ws.send(Ws::text(
            json!({"id": 1, "op": "subscribe", "channel": "busy"}).to_string(),
        ))
        .await
        .unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(reply.to_text().unwrap().contains("\"ok\":true"));
    }
    // Stop reading; publish far more than the queue and socket buffers hold.
    let payload = "x".repeat(60_000);
    let started = tokio::time::Instant::now();
    for _ in 0..400 {
        server.publish("busy", json!(payload)).await;
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    let metric = "tidings_slow_disconnects_total{transport=\"websocket\"}";
    assert_eq!(server.metric(metric).await, 1.0);
    // Reading now drains what was buffered, then the socket ends.
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the slow WebSocket was never closed");
    let (_, info) = server.get_json("/api/channels/busy").await;
    assert_eq!(info["subscribers"], 0, "the slow session left the channel");
}
every_transport!(a_slow_websocket_client_is_disconnected_without_blocking_the_publisher: WsRaw, Ws);
