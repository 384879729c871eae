//! Idempotent publishing (SPEC §13) over real HTTP and WebSocket connections, on the memory
//! broker: `Idempotency-Key` on `POST /publish/{c}` and `/publish`, `"idempotency_key"` in
//! batch entries and in the `/ws` publish op; a repeat within the window publishes nothing
//! and answers what the first publish answered. (On Redis: `redis_nodes.rs` and the
//! tidings-redis tests.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{TIMEOUT, TestServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as Ws;

async fn post(
    server: &TestServer,
    path: &str,
    key: Option<&str>,
    body: Value,
) -> (u16, Option<String>, Value) {
    let mut req = server
        .http
        .post(format!("{}{path}", server.url))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(key) = key {
        req = req.header("Idempotency-Key", key);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let replayed = res
        .headers()
        .get("idempotent-replayed")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, replayed, res.json().await.unwrap())
}

async fn history(server: &TestServer, channel: &str) -> Vec<Value> {
    let (status, body) = server
        .get_json(&format!("/api/channels/{channel}/history?limit=100"))
        .await;
    assert_eq!(status, 200, "{body}");
    body["messages"].as_array().unwrap().clone()
}

#[tokio::test]
async fn a_publish_repeated_with_its_idempotency_key_is_stored_once_and_answered_the_same() {
    let server = TestServer::spawn().await;
    let (status, replayed, first) =
        post(&server, "/publish/news", Some("order-42"), json!(1)).await;
    assert_eq!((status, replayed), (200, None), "{first}");
    let (status, replayed, again) =
        post(&server, "/publish/news", Some("order-42"), json!(1)).await;
    assert_eq!((status, replayed.as_deref()), (200, Some("true")));
    assert_eq!(
        again, first,
        "offset, epoch, cursor and time as the first time"
    );
    assert_eq!(history(&server, "news").await.len(), 1);

    // Another key publishes; the same key on another channel is another publish.
    let (_, _, other) = post(&server, "/publish/news", Some("order-43"), json!(2)).await;
    assert_eq!(other["offset"], 2);
    let (_, replayed, elsewhere) =
        post(&server, "/publish/sports", Some("order-42"), json!(1)).await;
    assert_eq!((replayed, &elsewhere["offset"]), (None, &json!(1)));
    // Without a key every publish is a new message.
    server.publish("news", json!(1)).await;
    server.publish("news", json!(1)).await;
    assert_eq!(history(&server, "news").await.len(), 4);
}

#[tokio::test]
async fn a_key_is_forgotten_after_the_idempotency_window() {
    let server =
        TestServer::with(|c| c.broker.idempotency_window = Duration::from_millis(300)).await;
    let (_, _, first) = post(&server, "/publish/news", Some("k"), json!("a")).await;
    common::eventually("the key expires", async || {
        let (_, replayed, reply) = post(&server, "/publish/news", Some("k"), json!("a")).await;
        replayed.is_none() && reply["offset"] != first["offset"]
    })
    .await;
}

#[tokio::test]
async fn the_publish_document_takes_the_key_as_header_or_field_and_batch_entries_one_each() {
    let server = TestServer::spawn().await;
    let single = json!({"channel": "a", "data": "x", "idempotency_key": "one"});
    let (_, _, first) = post(&server, "/publish", None, single.clone()).await;
    let (status, replayed, again) = post(&server, "/publish", Some("one"), single).await;
    assert_eq!(
        (status, replayed.as_deref(), &again),
        (200, Some("true"), &first)
    );

    // Fan-out: the key is remembered per channel.
    let fan = json!({"channels": ["a", "b"], "data": "y"});
    let (_, _, first) = post(&server, "/publish", Some("fan"), fan.clone()).await;
    let (_, _, again) = post(&server, "/publish", Some("fan"), fan).await;
    assert_eq!(again, first);
    assert_eq!(first["results"][0]["offset"], 2);

    let batch = json!({"messages": [
        {"channel": "c", "data": 1, "idempotency_key": "b1"},
        {"channel": "c", "data": 2},
        {"channel": "c", "data": 3, "idempotency_key": "b3"},
    ]});
    let (_, _, first) = post(&server, "/publish", None, batch.clone()).await;
    let (_, _, again) = post(&server, "/publish", None, batch).await;
    let offsets = |v: &Value| {
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["offset"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(offsets(&first), [1, 2, 3]);
    assert_eq!(
        offsets(&again),
        [1, 4, 3],
        "only the unkeyed entry is published again"
    );
    assert_eq!(history(&server, "c").await.len(), 4);
    assert_eq!(history(&server, "a").await.len(), 2);
    assert_eq!(history(&server, "b").await.len(), 1);
}

#[tokio::test]
async fn an_invalid_idempotency_key_is_a_clear_400_and_publishes_nothing() {
    let server = TestServer::spawn().await;
    let long = "k".repeat(129);
    for bad in ["has space", "é", long.as_str(), ""] {
        let res = server
            .http
            .post(format!("{}/publish/news", server.url))
            .header("Idempotency-Key", bad.as_bytes())
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "{bad:?}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_idempotency_key", "{body}");
    }
    let batch = json!({"messages": [
        {"channel": "news", "data": 1, "idempotency_key": "fine"},
        {"channel": "news", "data": 2, "idempotency_key": "not fine"},
    ]});
    let (status, _, body) = post(&server, "/publish", None, batch).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_idempotency_key");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("messages[1]"),
        "{body}"
    );
    // One key for a whole batch would make its entries on one channel collide.
    let batch = json!({"messages": [{"channel": "news", "data": 1}]});
    let (status, _, _) = post(&server, "/publish", Some("whole"), batch).await;
    assert_eq!(status, 400);
    // Wrong in both channel and key: a single document and a batch entry name the same fault.
    let single = json!({"channel": "bad channel", "data": 1, "idempotency_key": "a b"});
    let (status, _, one) = post(&server, "/publish", None, single).await;
    assert_eq!(status, 400);
    let batch =
        json!({"messages": [{"channel": "bad channel", "data": 1, "idempotency_key": "a b"}]});
    let (status, _, entry) = post(&server, "/publish", None, batch).await;
    assert_eq!(status, 400);
    assert_eq!(one["error"]["code"], "invalid_idempotency_key", "{one}");
    assert_eq!(entry["error"]["code"], one["error"]["code"], "{entry}");
    let mismatch = json!({"channel": "news", "data": 1, "idempotency_key": "a"});
    let (status, _, _) = post(&server, "/publish", Some("b"), mismatch).await;
    assert_eq!(status, 400);
    assert!(history(&server, "news").await.is_empty());
}

#[tokio::test]
async fn a_ws_publish_op_repeated_with_its_key_answers_the_first_position() {
    let server = TestServer::spawn().await;
    let url = format!("{}/ws", server.url.replacen("http://", "ws://", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut replies = Vec::new();
    for id in 1..=2 {
        let op = json!({"id": id, "op": "publish", "channel": "news", "data": "hi", "idempotency_key": "ws-1"});
        ws.send(Ws::text(op.to_string())).await.unwrap();
        let reply: Value = loop {
            match tokio::time::timeout(TIMEOUT, ws.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap()
            {
                Ws::Text(t) => break serde_json::from_str(t.as_str()).unwrap(),
                _ => continue,
            }
        };
        assert_eq!(reply["ok"], true, "{reply}");
        replies.push(reply);
    }
    for field in ["offset", "epoch", "cursor", "time"] {
        assert_eq!(replies[0][field], replies[1][field], "{field}");
    }
    let bad =
        json!({"id": 3, "op": "publish", "channel": "news", "data": 1, "idempotency_key": "a b"});
    ws.send(Ws::text(bad.to_string())).await.unwrap();
    let reply: Value = loop {
        match tokio::time::timeout(TIMEOUT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Ws::Text(t) => break serde_json::from_str(t.as_str()).unwrap(),
            _ => continue,
        }
    };
    assert_eq!(reply["error"]["code"], "invalid_idempotency_key", "{reply}");
    assert_eq!(history(&server, "news").await.len(), 1);
}
