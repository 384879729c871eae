//! WebSocket specifics beyond the shared scenario matrix: the raw broadcast and echo of the
//! classic examples, the JSON protocol's replies and errors, close codes, pings, and
//! WebSocket over HTTP/2 (RFC 8441).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{TIMEOUT, TestServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message as Ws;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(server: &TestServer, path: &str) -> Socket {
    let url = format!("{}{path}", server.url.replacen("http://", "ws://", 1));
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

/// The next text or binary frame (pings answered by the library), or the close frame.
async fn next(socket: &mut Socket) -> Ws {
    loop {
        let frame = tokio::time::timeout(TIMEOUT, socket.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("socket ended")
            .expect("socket error");
        match frame {
            Ws::Ping(_) | Ws::Pong(_) => continue,
            f => return f,
        }
    }
}

async fn next_json(socket: &mut Socket) -> Value {
    match next(socket).await {
        Ws::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

async fn send(socket: &mut Socket, v: Value) {
    socket.send(Ws::text(v.to_string())).await.unwrap();
}

async fn close_code(socket: &mut Socket) -> u16 {
    loop {
        match next(socket).await {
            Ws::Close(Some(f)) => return u16::from(f.code),
            Ws::Close(None) => return 1005,
            _ => continue,
        }
    }
}

#[tokio::test]
async fn a_raw_channel_broadcasts_to_every_client_sender_included_and_keeps_binary_binary() {
    let server = TestServer::spawn().await;
    let mut a = connect(&server, "/ws/chat").await;
    let mut b = connect(&server, "/ws/chat").await;
    a.send(Ws::text("hello")).await.unwrap();
    a.send(Ws::binary(vec![0u8, 1, 255])).await.unwrap();
    for socket in [&mut a, &mut b] {
        assert_eq!(next(socket).await, Ws::text("hello"));
        assert_eq!(next(socket).await, Ws::binary(vec![0u8, 1, 255]));
    }
    // What raw clients sent is ordinary channel history.
    let (_, history) = server.get_json("/api/channels/chat/history").await;
    assert_eq!(history["messages"][0]["data"], "hello");
    assert_eq!(history["messages"][1]["encoding"], "base64");
}

#[tokio::test]
async fn a_raw_channel_with_one_client_is_an_echo_server_and_json_passes_through() {
    let server = TestServer::spawn().await;
    let mut a = connect(&server, "/ws/echo").await;
    a.send(Ws::text("ping?")).await.unwrap();
    assert_eq!(next(&mut a).await, Ws::text("ping?"));
    server.publish("echo", json!({"from": "backend"})).await;
    assert_eq!(next(&mut a).await, Ws::text(r#"{"from":"backend"}"#));
}

#[tokio::test]
async fn the_json_protocol_subscribes_publishes_with_acks_and_reads_history() {
    let server = TestServer::spawn().await;
    server.publish("a", json!("old")).await;
    let mut ws = connect(&server, "/ws").await;
    send(
        &mut ws,
        json!({"id": 1, "op": "subscribe", "channel": "a", "history": 5}),
    )
    .await;
    let reply = next_json(&mut ws).await;
    assert_eq!(
        (
            reply["type"].clone(),
            reply["id"].clone(),
            reply["ok"].clone()
        ),
        (json!("reply"), json!(1), json!(true))
    );
    assert!(reply["cursor"].is_string());
    let replayed = next_json(&mut ws).await;
    assert_eq!(
        (replayed["type"].clone(), replayed["data"].clone()),
        (json!("message"), json!("old"))
    );
    send(
        &mut ws,
        json!({"id": "p", "op": "subscribe", "channel": "b"}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["ok"], true);

    send(
        &mut ws,
        json!({"id": 2, "op": "publish", "channel": "b", "data": {"n": 1}, "event": "e"}),
    )
    .await;
    // The ack and the message itself, in either order.
    let mut ack = None;
    let mut message = None;
    for _ in 0..2 {
        let v = next_json(&mut ws).await;
        match v["type"].as_str() {
            Some("reply") => ack = Some(v),
            Some("message") => message = Some(v),
            _ => panic!("unexpected {v}"),
        }
    }
    let (ack, message) = (ack.unwrap(), message.unwrap());
    assert_eq!(
        (ack["id"].clone(), ack["ok"].clone(), ack["offset"].clone()),
        (json!(2), json!(true), json!(1))
    );
    assert_eq!(message["channel"], "b");
    assert_eq!(message["event"], "e");
    assert_eq!(
        message["cursor"], ack["cursor"],
        "a /ws cursor is the channel's own"
    );
    // Acknowledged means stored.
    let (_, history) = server.get_json("/api/channels/b/history").await;
    assert_eq!(history["messages"][0]["data"], json!({"n": 1}));

    send(
        &mut ws,
        json!({"id": 3, "op": "history", "channel": "a", "limit": 10}),
    )
    .await;
    let h = next_json(&mut ws).await;
    assert_eq!(
        (h["id"].clone(), h["messages"][0]["data"].clone()),
        (json!(3), json!("old"))
    );
    assert_eq!(h["gaps"], json!([]));

    send(&mut ws, json!({"op": "ping", "id": 9})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type": "pong", "id": 9}));

    send(
        &mut ws,
        json!({"id": 4, "op": "unsubscribe", "channel": "a"}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["ok"], true);
    server.publish("a", json!("after unsubscribe")).await;
    server.publish("b", json!("still here")).await;
    assert_eq!(next_json(&mut ws).await["data"], "still here");
}

#[tokio::test]
async fn protocol_mistakes_get_error_replies_and_the_connection_stays() {
    let server = TestServer::with(|c| {
        c.server.max_channels_per_subscription = 2;
        c.namespaces.insert(
            "locked".into(),
            tidings_server::config::NamespaceConfig {
                publish: Some(tidings_server::config::PublishSetting::Server),
                ..Default::default()
            },
        );
    })
    .await;
    let mut ws = connect(&server, "/ws").await;
    let cases = [
        (json!({"id": 1, "op": "subscribe", "channel": "a"}), None),
        (
            json!({"id": 2, "op": "subscribe", "channel": "a"}),
            Some("already_subscribed"),
        ),
        (
            json!({"id": 3, "op": "unsubscribe", "channel": "never"}),
            Some("not_subscribed"),
        ),
        (json!({"id": 4, "op": "fly"}), Some("unknown_op")),
        (
            json!({"id": 5, "op": "subscribe", "channel": "bad name"}),
            Some("invalid_channel"),
        ),
        (json!({"id": 6, "op": "subscribe"}), Some("missing_channel")),
        (
            json!({"id": 7, "op": "subscribe", "channel": "b", "since": "nope!"}),
            Some("invalid_cursor"),
        ),
        (
            json!({"id": 8, "op": "publish", "channel": "locked:x", "data": 1}),
            Some("unauthorized"),
        ),
        (
            json!({"id": 9, "op": "presence", "channel": "a"}),
            Some("presence_disabled"),
        ),
        (json!({"id": 10, "op": "subscribe", "channel": "b"}), None),
        (
            json!({"id": 11, "op": "subscribe", "channel": "c"}),
            Some("too_many_channels"),
        ),
        (
            json!({"id": 12, "op": "publish", "channel": "a"}),
            Some("invalid_request"),
        ),
        // Not a request at all (no op, an op of the wrong type), but the id is still echoed
        // so the client can match the error to what it sent.
        (json!({"id": 13}), Some("invalid_request")),
        (json!({"id": "fourteen", "op": 5}), Some("invalid_request")),
    ];
    for (frame, expected) in cases {
        let id = frame["id"].clone();
        send(&mut ws, frame).await;
        let reply = next_json(&mut ws).await;
        assert_eq!(reply["id"], id, "{reply}");
        match expected {
            None => assert_eq!(reply["ok"], true, "{reply}"),
            Some(code) => {
                assert_eq!(reply["error"]["code"], code, "{reply}");
                assert!(reply["error"]["message"].as_str().unwrap().len() > 10);
            }
        }
    }
    ws.send(Ws::text("not json")).await.unwrap();
    assert_eq!(next_json(&mut ws).await["error"]["code"], "invalid_request");
    ws.send(Ws::binary(vec![1u8])).await.unwrap();
    assert_eq!(next_json(&mut ws).await["error"]["code"], "invalid_frame");
    // Still connected and working.
    send(&mut ws, json!({"op": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");
}

#[tokio::test]
async fn ten_malformed_frames_in_a_row_close_with_1008_but_a_valid_one_resets_the_count() {
    let server = TestServer::spawn().await;
    let mut ws = connect(&server, "/ws").await;
    for _ in 0..9 {
        ws.send(Ws::text("{")).await.unwrap();
        assert!(next_json(&mut ws).await.get("error").is_some());
    }
    send(&mut ws, json!({"op": "ping"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");
    for _ in 0..10 {
        ws.send(Ws::text("{")).await.unwrap();
    }
    assert_eq!(close_code(&mut ws).await, 1008);
}

#[tokio::test]
async fn a_frame_over_max_message_bytes_closes_with_1009_on_both_endpoints() {
    let server = TestServer::with(|c| c.server.max_message_bytes = 1000).await;
    for path in ["/ws/big", "/ws"] {
        let mut ws = connect(&server, path).await;
        ws.send(Ws::text("x".repeat(2000))).await.unwrap();
        assert_eq!(close_code(&mut ws).await, 1009, "{path}");
    }
    // Only a publish creates a channel, and the raw socket that joined it has gone.
    let (status, info) = server.get_json("/api/channels/big").await;
    assert_eq!(status, 404, "nothing too big was published: {info}");
}

#[tokio::test]
async fn raw_clients_may_not_publish_where_the_namespace_forbids_it() {
    let server = TestServer::with(|c| {
        c.namespaces.insert(
            "news".into(),
            tidings_server::config::NamespaceConfig {
                publish: Some(tidings_server::config::PublishSetting::Server),
                ..Default::default()
            },
        );
    })
    .await;
    let mut ws = connect(&server, "/ws/news:today").await;
    server
        .publish("news:today", json!("from the backend"))
        .await;
    assert_eq!(next(&mut ws).await, Ws::text("\"from the backend\""));
    ws.send(Ws::text("from a client")).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 1008);
}

#[tokio::test]
async fn shutdown_sends_a_disconnect_frame_with_its_delay_then_closes_with_1012() {
    let server = TestServer::with(|c| c.server.reconnect_spread = Duration::from_millis(800)).await;
    let mut json_ws = connect(&server, "/ws").await;
    send(
        &mut json_ws,
        json!({"id": 1, "op": "subscribe", "channel": "a"}),
    )
    .await;
    assert_eq!(next_json(&mut json_ws).await["ok"], true);
    let mut raw_ws = connect(&server, "/ws/a").await;
    let stopping = tokio::spawn(server.shutdown());
    let mut goodbye = next_json(&mut json_ws).await;
    let after = goodbye["reconnect_after_ms"].take();
    assert!(after.as_u64().is_some_and(|ms| ms <= 800), "{after}");
    goodbye
        .as_object_mut()
        .unwrap()
        .remove("reconnect_after_ms");
    assert_eq!(
        goodbye,
        json!({"type": "disconnect", "reason": "shutdown", "reconnect": true})
    );
    assert_eq!(close_code(&mut json_ws).await, 1012);
    assert_eq!(close_code(&mut raw_ws).await, 1012);
    stopping.await.unwrap();
}

#[tokio::test]
async fn the_server_pings_and_closes_a_peer_that_stops_answering() {
    let server = TestServer::with(|c| c.server.ping_interval = Duration::from_millis(200)).await;
    // A live client sees pings (its library answers them).
    let mut ws = connect(&server, "/ws/p").await;
    let ping = tokio::time::timeout(TIMEOUT, async {
        loop {
            if let Some(Ok(Ws::Ping(_))) = ws.next().await {
                return;
            }
        }
    })
    .await;
    assert!(ping.is_ok(), "no ping within the timeout");
    // A peer that completes the handshake and then says nothing is closed.
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(
        b"GET /ws/p HTTP/1.1\r\nhost: t\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
          sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let ended = tokio::time::timeout(TIMEOUT, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "a silent peer was never closed");
}

#[tokio::test]
async fn websocket_upgrades_refuse_plain_requests_with_json_errors() {
    let server = TestServer::spawn().await;
    let (status, body) = server.get_json("/ws").await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (400, json!("websocket_required"))
    );
    let res = server
        .http
        .post(format!("{}/ws/x", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 405);
    assert_eq!(res.headers()["allow"], "GET, CONNECT");
    let res = server
        .http
        .delete(format!("{}/ws", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 405);
    assert_eq!(res.headers()["allow"], "GET, CONNECT");
    let (status, body) = server.get_json("/ws/bad%20name").await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (400, json!("invalid_channel"))
    );
}

/// The WebSocket gauges follow a session: one connection while it is open, its channels as
/// it joins and leaves them, and nothing left once it closes.
#[tokio::test]
async fn the_websocket_gauges_follow_a_session_s_joins_and_leaves_and_its_close() {
    let server = TestServer::spawn().await;
    let connections = "tidings_connections{transport=\"websocket\"}";
    let subscriptions = "tidings_subscriptions{transport=\"websocket\"}";
    let mut ws = connect(&server, "/ws").await;
    server.await_metric(connections, 1.0).await;
    for (id, channel) in [(1, "a"), (2, "b"), (3, "c")] {
        send(
            &mut ws,
            json!({"id": id, "op": "subscribe", "channel": channel}),
        )
        .await;
        assert_eq!(next_json(&mut ws).await["ok"], true);
    }
    assert_eq!(server.metric(subscriptions).await, 3.0);
    send(
        &mut ws,
        json!({"id": 4, "op": "unsubscribe", "channel": "b"}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["ok"], true);
    assert_eq!(server.metric(subscriptions).await, 2.0);
    ws.close(None).await.unwrap();
    server.await_metric(connections, 0.0).await;
    server.await_metric(subscriptions, 0.0).await;
}
