//! The access log (`[server] access_log`): one line per request, and per stream when it
//! ends, with method, masked path, status, bytes, duration and transport; JSON lines when
//! `log_format = "json"`; a reload reopens the file; a file that cannot be opened refuses
//! the start.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestServer, eventually};
use futures_util::{SinkExt, StreamExt};
use tidings_server::{AppState, Config};

fn log_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tidings-access-{}-{name}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("access.log")
}

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits for a line containing every one of `parts`; returns it.
async fn line_with(path: &std::path::Path, parts: &[&str]) -> String {
    let mut found = String::new();
    eventually(
        &format!("an access-log line with {parts:?}"),
        async || match read(path)
            .lines()
            .find(|l| parts.iter().all(|p| l.contains(p)))
        {
            Some(l) => {
                found = l.to_owned();
                true
            }
            None => false,
        },
    )
    .await;
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_and_every_stream_gets_one_line_when_it_ends() {
    let path = log_path("text");
    let p = path.clone();
    let server = TestServer::with(move |c| {
        c.server.access_log = Some(p.to_string_lossy().into_owned());
    })
    .await;
    let http = &server.http;

    // A plain request, with a credential in its query that must not reach the file.
    let res = http
        .get(format!(
            "{}/healthz?token=s3cret-do-not-log&x=1",
            server.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body = res.bytes().await.unwrap();
    let line = line_with(&path, &["/healthz"]).await;
    assert!(
        line.contains("\"GET /healthz?token=redacted&x=1 HTTP/1.1\" 200"),
        "{line}"
    );
    assert!(
        line.contains(&format!(" 200 {} ", body.len())),
        "bytes: {line}"
    );
    assert!(line.ends_with(" http"), "{line}");

    // A 404 and a publish.
    http.get(format!("{}/nowhere", server.url))
        .send()
        .await
        .unwrap();
    line_with(&path, &["\"GET /nowhere HTTP/1.1\" 404"]).await;
    server.publish("chat", serde_json::json!({"n": 1})).await;
    line_with(&path, &["\"POST /publish/chat HTTP/1.1\" 200"]).await;

    // An SSE stream: no line while it is open, one when the client goes away.
    let mut sse = http
        .get(format!("{}/sse/chat?history=1", server.url))
        .send()
        .await
        .unwrap()
        .bytes_stream();
    let first = sse.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    assert!(!read(&path).contains("/sse/chat"), "{}", read(&path));
    drop(sse);
    let line = line_with(&path, &["/sse/chat?history=1", " sse"]).await;
    assert!(line.contains("\" 200 "), "{line}");

    // A long poll: its line is written when its answer is.
    let poll = tokio::spawn({
        let (http, url) = (http.clone(), server.url.clone());
        async move {
            http.get(format!("{url}/poll/news?wait=10"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    });
    eventually("the long poll to be held", async || {
        server
            .state
            .node
            .hub
            .subscriber_count(&tidings_core::ChannelName::new("news").unwrap())
            > 0
    })
    .await;
    server.publish("news", serde_json::json!({"n": 1})).await;
    poll.await.unwrap();
    line_with(&path, &["/poll/news?wait=10", " long-poll"]).await;

    // A WebSocket: one line when the socket closes, with the bytes the session wrote.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr))
        .await
        .unwrap();
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        r#"{"op":"subscribe","id":1,"channel":"chat"}"#,
    ))
    .await
    .unwrap();
    ws.next().await.unwrap().unwrap();
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    let line = line_with(&path, &["\"GET /ws HTTP/1.1\" 101", "websocket"]).await;
    let bytes: u64 = line
        .split("\" 101 ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(bytes > 0, "{line}");

    assert!(!read(&path).contains("s3cret"), "{}", read(&path));
    assert_eq!(
        read(&path).lines().filter(|l| l.contains("/ws ")).count(),
        1,
        "one line per socket:\n{}",
        read(&path)
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_parse_and_carry_every_field() {
    let path = log_path("json");
    let p = path.clone();
    let server = TestServer::with(move |c| {
        c.server.access_log = Some(p.to_string_lossy().into_owned());
        c.server.log_format = tidings_server::config::LogFormat::Json;
    })
    .await;
    server
        .http
        .get(format!("{}/readyz?api_key=k-do-not-log", server.url))
        .send()
        .await
        .unwrap();
    let line = line_with(&path, &["/readyz"]).await;
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/readyz?api_key=redacted");
    assert_eq!(v["status"], 200);
    assert_eq!(v["protocol"], "HTTP/1.1");
    assert_eq!(v["transport"], "http");
    assert!(v["bytes"].as_u64().unwrap() > 0);
    assert!(v["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(v["ts"].as_str().unwrap().ends_with('Z'));
    assert!(v["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reopens_a_file_that_logrotate_moved_away() {
    let path = log_path("rotate");
    let p = path.clone();
    let server = TestServer::with(move |c| {
        c.server.access_log = Some(p.to_string_lossy().into_owned());
    })
    .await;
    server
        .http
        .get(format!("{}/healthz?before", server.url))
        .send()
        .await
        .unwrap();
    line_with(&path, &["/healthz?before"]).await;
    let rotated = path.with_extension("log.1");
    std::fs::rename(&path, &rotated).unwrap();
    let config: Config = (*server.state.config()).clone();
    tidings_server::lifecycle::reload(&server.state, config).unwrap();
    server
        .http
        .get(format!("{}/healthz?after", server.url))
        .send()
        .await
        .unwrap();
    line_with(&path, &["/healthz?after"]).await;
    assert!(!read(&rotated).contains("after"), "{}", read(&rotated));
    server.shutdown().await;
}

#[tokio::test]
async fn an_access_log_that_cannot_be_opened_refuses_the_start() {
    let mut config = Config::default();
    config.server.access_log = Some("/nonexistent-dir-for-tidings/access.log".into());
    let err = AppState::connect(config).await.err().unwrap().to_string();
    assert!(err.contains("server.access_log"), "{err}");
    assert!(
        err.contains("/nonexistent-dir-for-tidings/access.log"),
        "{err}"
    );
}
