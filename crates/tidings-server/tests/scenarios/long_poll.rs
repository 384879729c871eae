//! Long polls return on publish and on timeout; short polls answer at once.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::TestServer;

async fn cursor_now(server: &TestServer, channel: &str) -> String {
    let (status, reply) = server.get_json(&format!("/poll/{channel}")).await;
    assert_eq!(status, 200);
    reply["cursor"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_long_poll_returns_as_soon_as_a_message_is_published() {
    let server = TestServer::spawn().await;
    let cursor = cursor_now(&server, "news").await;
    let url = format!("{}/poll/news?wait=30&since={cursor}", server.url);
    let http = server.http.clone();
    let held = tokio::spawn(async move {
        let res = http.get(url).send().await.unwrap();
        (
            res.headers().get("etag").cloned(),
            res.json::<Value>().await.unwrap(),
        )
    });
    // Wait until the server holds the request, then publish.
    server
        .await_metric("tidings_connections{transport=\"long_poll\"}", 1.0)
        .await;
    let published_at = tokio::time::Instant::now();
    server.publish("news", json!({"title": "hi"})).await;
    let (etag, reply) = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .unwrap()
        .unwrap();
    // Far below the 30 s wait: the publish ended it.
    assert!(published_at.elapsed() < Duration::from_secs(2));
    assert_eq!(reply["messages"][0]["data"], json!({"title": "hi"}));
    let cursor = reply["cursor"].as_str().unwrap();
    assert_eq!(etag.unwrap().to_str().unwrap(), format!("\"{cursor}\""));
    assert_eq!(reply["gaps"], json!([]));
}

#[tokio::test]
async fn a_long_poll_with_nothing_new_answers_empty_when_the_wait_runs_out() {
    let server = TestServer::spawn().await;
    let cursor = cursor_now(&server, "news").await;
    let started = tokio::time::Instant::now();
    let (status, reply) = server
        .get_json(&format!("/poll/news?wait=0.3&since={cursor}"))
        .await;
    assert_eq!(status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(reply["messages"], json!([]));
    assert_eq!(reply["cursor"], json!(cursor));
}

#[tokio::test]
async fn prefer_wait_makes_a_long_poll_and_if_none_match_resumes() {
    let server = TestServer::spawn().await;
    let cursor = cursor_now(&server, "news").await;
    server.publish("news", json!(1)).await;
    let res = server
        .http
        .get(format!("{}/poll/news", server.url))
        .header("prefer", "wait=5")
        .header("if-none-match", format!("\"{cursor}\""))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["preference-applied"], "wait=5");
    let reply: Value = res.json().await.unwrap();
    assert_eq!(reply["messages"][0]["data"], json!(1));
}

#[tokio::test]
async fn a_short_poll_answers_at_once_even_when_nothing_is_new() {
    let server = TestServer::spawn().await;
    let started = tokio::time::Instant::now();
    let (status, reply) = server.get_json("/poll?channel=a&channel=b").await;
    assert_eq!(status, 200);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(reply["messages"], json!([]));
    assert!(reply["cursor"].as_str().is_some());
}

#[tokio::test]
async fn a_wait_above_long_poll_max_wait_is_held_for_the_maximum_and_preference_applied_says_so() {
    let server = TestServer::with(|c| c.server.long_poll_max_wait = Duration::from_secs(1)).await;
    let cursor = cursor_now(&server, "news").await;
    // The query form, far above the cap: held for the cap, then answered empty.
    let started = tokio::time::Instant::now();
    let res = server
        .http
        .get(format!("{}/poll/news?wait=3600&since={cursor}", server.url))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["preference-applied"], "wait=1");
    assert!(started.elapsed() >= Duration::from_secs(1));
    let reply: Value = res.json().await.unwrap();
    assert_eq!(reply["messages"], json!([]));
    assert_eq!(reply["cursor"], json!(cursor));
    // The RFC 7240 form, with a message waiting: answered at once, the cap still reported.
    server.publish("news", json!("hi")).await;
    let res = server
        .http
        .get(format!("{}/poll/news?since={cursor}", server.url))
        .header("prefer", "wait=90")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["preference-applied"], "wait=1");
    let reply: Value = res.json().await.unwrap();
    assert_eq!(reply["messages"][0]["data"], json!("hi"));
    // Only a wait that is not a non-negative number is refused.
    for bad in ["-1", "soon"] {
        let (status, reply) = server.get_json(&format!("/poll/news?wait={bad}")).await;
        assert_eq!(status, 400, "wait={bad}");
        assert_eq!(reply["error"]["code"], "invalid_wait");
    }
}
