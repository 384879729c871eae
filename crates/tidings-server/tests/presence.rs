//! Presence: who follows a channel where the namespace keeps it, and join/leave events on
//! every transport that carries envelopes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Item, Kind, Start, TIMEOUT, TestServer, eventually, subscribe};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tidings_server::config::NamespaceConfig;
use tokio_tungstenite::tungstenite::Message as Ws;

async fn server() -> TestServer {
    TestServer::with(|c| {
        c.namespaces.insert(
            "room".into(),
            NamespaceConfig {
                presence: Some(true),
                join_leave: Some(true),
                ..Default::default()
            },
        );
    })
    .await
}

async fn presence_count(server: &TestServer, channel: &str) -> usize {
    let (status, body) = server
        .get_json(&format!("/api/channels/{channel}/presence"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["channel"], channel);
    body["clients"].as_array().unwrap().len()
}

/// Waits until presence lists `n` clients (presence changes land asynchronously on leave).
async fn await_presence(server: &TestServer, channel: &str, n: usize) {
    eventually(&format!("presence lists {n}"), async || {
        presence_count(server, channel).await == n
    })
    .await;
}

async fn next_json(ws: &mut common_ws::Socket) -> Value {
    loop {
        match tokio::time::timeout(TIMEOUT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Ws::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            _ => continue,
        }
    }
}

mod common_ws {
    pub type Socket = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;
}

#[tokio::test]
async fn joins_and_leaves_reach_websocket_sse_and_stream_subscribers_and_presence_lists_them() {
    let server = server().await;
    let url = server.url.replacen("http://", "ws://", 1);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{url}/ws"))
        .await
        .unwrap();
    ws.send(Ws::text(
        json!({"id": 1, "op": "subscribe", "channel": "room:1"}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(next_json(&mut ws).await["ok"], true);
    // Its own join.
    let own = next_json(&mut ws).await;
    assert_eq!(
        (own["type"].clone(), own["channel"].clone()),
        (json!("join"), json!("room:1"))
    );
    assert_eq!(presence_count(&server, "room:1").await, 1);

    let mut sse = subscribe(&server, Kind::Sse, &["room:1"], Start::Now).await;
    let joined = next_json(&mut ws).await;
    assert_eq!(joined["type"], "join");
    assert_ne!(
        joined["client"], own["client"],
        "every connection has its own client id"
    );
    assert!(joined.get("user").is_some());
    assert_eq!(presence_count(&server, "room:1").await, 2);

    let mut stream = subscribe(&server, Kind::Stream, &["room:1"], Start::Now).await;
    assert_eq!(next_json(&mut ws).await["type"], "join");
    ws.send(Ws::text(
        json!({"id": 2, "op": "presence", "channel": "room:1"}).to_string(),
    ))
    .await
    .unwrap();
    let reply = next_json(&mut ws).await;
    assert_eq!(reply["clients"].as_array().unwrap().len(), 3);

    // The SSE subscriber saw the stream one join, as a `tidings.join` event.
    let sse_join = loop {
        if let Item::Presence(v) = sse.next_item().await {
            break v;
        }
    };
    assert_eq!(sse_join["type"], "join");
    // When the SSE subscriber goes, the others see it leave, and presence shrinks.
    drop(sse);
    let left = next_json(&mut ws).await;
    assert_eq!(
        (left["type"].clone(), left["client"].clone()),
        (json!("leave"), joined["client"].clone())
    );
    await_presence(&server, "room:1", 2).await;
    let leave = loop {
        if let Item::Presence(v) = stream.next_item().await
            && v["type"] == "leave"
        {
            break v;
        }
    };
    assert_eq!(leave["client"], joined["client"]);
    // Messages flow as before, after the presence records.
    server.publish("room:1", json!("hi")).await;
    assert_eq!(stream.messages(1).await[0].2, json!("hi"));
    assert_eq!(next_json(&mut ws).await["data"], "hi");
}

#[tokio::test]
async fn presence_on_a_namespace_without_it_is_409_presence_disabled() {
    let server = server().await;
    let (status, body) = server.get_json("/api/channels/plain/presence").await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (409, json!("presence_disabled"))
    );
}
