//! Channel lifecycle over a socket: only a publish creates a channel (reads of an absent one
//! leave nothing behind and resume without a gap), and `max_channels` caps how many exist.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Kind, Start, TestServer, eventually, subscribe};
use serde_json::{Value, json};

async fn listed(server: &TestServer) -> Vec<String> {
    let (status, body) = server.get_json("/api/channels").await;
    assert_eq!(status, 200);
    body["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["channel"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_subscribing_and_reading_absent_channels_leaves_no_lasting_state() {
    let server = TestServer::spawn().await;
    let (status, poll) = server.get_json("/poll/never:polled").await;
    assert_eq!(status, 200, "{poll}");
    let (status, _) = server
        .get_json("/api/channels/never:read/history?limit=5")
        .await;
    assert_eq!(status, 200);
    {
        let _sub = subscribe(&server, Kind::Sse, &["never:followed"], Start::Now).await;
        assert!(listed(&server).await.contains(&"never:followed".to_owned()));
    }
    eventually("the subscriber's channel goes once it leaves", async || {
        listed(&server).await.is_empty()
    })
    .await;
    let (status, _) = server.get_json("/api/channels/never:polled").await;
    assert_eq!(status, 404);

    // The cursor the poll returned resumes once the channel exists, with no gap.
    server.publish("never:polled", json!("first")).await;
    let cursor = poll["cursor"].as_str().unwrap();
    let (status, again) = server
        .get_json(&format!("/poll/never:polled?since={cursor}"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(again["gaps"], json!([]), "{again}");
    assert_eq!(again["messages"][0]["data"], "first");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_past_max_channels_gets_a_json_error_and_existing_channels_go_on() {
    let server = TestServer::with(|c| c.server.max_channels = 2).await;
    server.publish("cap:a", json!(1)).await;
    server.publish("cap:b", json!(1)).await;
    let res = server
        .http
        .post(format!("{}/publish/cap:c", server.url))
        .header("content-type", "application/json")
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    let body: Value = serde_json::from_str(&res.text().await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "too_many_channels", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_channels"),
        "{body}"
    );
    assert_eq!(server.publish("cap:a", json!(2)).await["offset"], 2);
    server.shutdown().await;
}
