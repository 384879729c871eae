//! Long polls return on publish and on timeout; short polls answer at once.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::TestServer;

#[tokio::test]
async fn a_long_poll_returns_as_soon_as_a_message_is_published() {
    let server = TestServer::spawn().await;
    let cursor = server.cursor_now("news").await;
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
    let cursor = server.cursor_now("news").await;
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
    let cursor = server.cursor_now("news").await;
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
    let cursor = server.cursor_now("news").await;
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

/// Holds a raw poll (`path`) and returns its task: the answer's `etag` and body text.
fn hold(server: &TestServer, path: &str) -> tokio::task::JoinHandle<(String, String)> {
    let (http, url) = (server.http.clone(), format!("{}{path}", server.url));
    tokio::spawn(async move {
        let res = http.get(url).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let etag = res.headers()["etag"].to_str().unwrap().to_owned();
        (etag, res.text().await.unwrap())
    })
}

async fn answered(held: tokio::task::JoinHandle<(String, String)>) -> (String, Value) {
    let (etag, text) = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .unwrap()
        .unwrap();
    (etag, serde_json::from_str(&text).unwrap())
}

#[tokio::test]
async fn held_polls_answered_by_one_publish_all_get_the_same_body() {
    let server = TestServer::spawn().await;
    let cursor = server.cursor_now("news").await;
    // Some resume from the cursor, some start from now: the same position either way.
    let held: Vec<_> = (0..8)
        .map(|i| {
            let since = if i % 2 == 0 {
                format!("&since={cursor}")
            } else {
                String::new()
            };
            hold(&server, &format!("/poll/news?wait=30{since}"))
        })
        .collect();
    server
        .await_metric("tidings_connections{transport=\"long_poll\"}", 8.0)
        .await;
    let position = server.publish("news", json!({"n": 1})).await;
    let mut bodies = Vec::new();
    for h in held {
        let (etag, text) = tokio::time::timeout(Duration::from_secs(5), h)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            etag,
            format!("\"{}\"", position["cursor"].as_str().unwrap())
        );
        bodies.push(text);
    }
    assert!(bodies.iter().all(|b| *b == bodies[0]), "{bodies:?}");
    let reply: Value = serde_json::from_str(&bodies[0]).unwrap();
    assert_eq!(reply["messages"].as_array().unwrap().len(), 1);
    assert_eq!(reply["messages"][0]["data"], json!({"n": 1}));
    assert_eq!(reply["messages"][0]["cursor"], position["cursor"]);
    assert_eq!(reply["cursor"], position["cursor"]);
    assert_eq!(reply["gaps"], json!([]));
}

#[tokio::test]
async fn one_publish_answers_polls_at_mixed_positions_each_with_its_own_cursor() {
    let server = TestServer::spawn().await;
    server.publish("other", json!("before")).await;
    let news = server.cursor_now("news").await;
    // One channel, from now; two channels (a cursor covering both); one channel behind by
    // a message (answered at once, not held).
    let one = hold(&server, "/poll/news?wait=30");
    let both = hold(&server, "/poll?channel=news&channel=other&wait=30");
    server
        .await_metric("tidings_connections{transport=\"long_poll\"}", 2.0)
        .await;
    let first = server.publish("news", json!(1)).await;
    let (etag, one) = answered(one).await;
    let (_, both) = answered(both).await;
    assert_eq!(one["cursor"], first["cursor"]);
    assert_eq!(etag, format!("\"{}\"", first["cursor"].as_str().unwrap()));
    assert_eq!(both["messages"][0]["data"], json!(1));
    assert_ne!(both["cursor"], first["cursor"], "a two-channel cursor");
    assert_eq!(both["messages"][0]["cursor"], both["cursor"]);
    // Each cursor resumes exactly after what it answered.
    server.publish("news", json!(2)).await;
    server.publish("other", json!("after")).await;
    let (_, behind) = server
        .get_json(&format!("/poll/news?wait=30&since={news}"))
        .await;
    let data: Vec<_> = behind["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"].clone())
        .collect();
    assert_eq!(data, [json!(1), json!(2)]);
    let (_, resumed) = server
        .get_json(&format!(
            "/poll?channel=news&channel=other&since={}",
            both["cursor"].as_str().unwrap()
        ))
        .await;
    let data: Vec<_> = resumed["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"].clone())
        .collect();
    assert_eq!(data, [json!(2), json!("after")]);
    let (_, resumed) = server
        .get_json(&format!(
            "/poll/news?since={}",
            one["cursor"].as_str().unwrap()
        ))
        .await;
    assert_eq!(resumed["messages"][0]["data"], json!(2));
    assert_eq!(resumed["messages"].as_array().unwrap().len(), 1);
}
