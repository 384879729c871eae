//! Bad input gets the JSON error of SPEC §3 with a fitting status and an actionable message;
//! nothing panics and nothing already published is lost.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::TestServer;
use serde_json::{Value, json};

struct Reply {
    status: u16,
    content_type: String,
    body: Value,
}

async fn send(server: &TestServer, req: reqwest::RequestBuilder) -> Reply {
    let _ = server;
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let content_type = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = res.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"));
    Reply {
        status,
        content_type,
        body,
    }
}

/// Asserts the error shape and returns the message.
fn expect_error(r: &Reply, status: u16, code: &str) -> String {
    assert_eq!(r.status, status, "{:?}", r.body);
    assert!(
        r.content_type.starts_with("application/json"),
        "{}",
        r.content_type
    );
    assert_eq!(r.body["error"]["code"], code, "{:?}", r.body);
    let message = r.body["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        message.len() > 10,
        "a message a person can act on: {message:?}"
    );
    message
}

#[tokio::test]
async fn every_bad_request_gets_a_json_error_and_the_history_survives() {
    let server = TestServer::with(|c| {
        c.server.max_message_bytes = 1024;
        c.server.max_channels_per_subscription = 3;
        c.server.long_poll_max_wait = std::time::Duration::from_secs(5);
    })
    .await;
    let url = &server.url;
    let http = &server.http;
    server.publish("keep", json!("before")).await;

    // Publishing.
    let r = send(
        &server,
        http.post(format!("{url}/publish/bad%20name")).body("x"),
    )
    .await;
    assert!(expect_error(&r, 400, "invalid_channel").contains("bad name"));
    let long = "x".repeat(129);
    let r = send(
        &server,
        http.post(format!("{url}/publish/{long}")).body("x"),
    )
    .await;
    expect_error(&r, 400, "invalid_channel");
    let r = send(
        &server,
        http.post(format!("{url}/publish/keep"))
            .header("content-type", "application/json")
            .body("{\"title\": "),
    )
    .await;
    expect_error(&r, 400, "invalid_json");
    let nested = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let r = send(
        &server,
        http.post(format!("{url}/publish/keep"))
            .header("content-type", "application/json")
            .body(nested),
    )
    .await;
    expect_error(&r, 413, "payload_too_large");
    let nested = format!("{}{}", "[".repeat(300), "]".repeat(300));
    let r = send(
        &server,
        http.post(format!("{url}/publish/keep"))
            .header("content-type", "application/json")
            .body(nested),
    )
    .await;
    expect_error(&r, 400, "invalid_json");
    // A number beyond a double (found by the publish_body fuzzer): strict parsers refuse the
    // message, so it is refused at the door, raw and in a document alike.
    let r = send(
        &server,
        http.post(format!("{url}/publish/keep"))
            .header("content-type", "application/json")
            .body("{\"n\": 1e400}"),
    )
    .await;
    assert!(expect_error(&r, 400, "invalid_json").contains("double"));
    let r = send(
        &server,
        http.post(format!("{url}/publish"))
            .header("content-type", "application/json")
            .body(
                r#"{"messages":[{"channel":"keep","data":1},{"channel":"keep","data":[1e400]}]}"#,
            ),
    )
    .await;
    assert!(expect_error(&r, 400, "invalid_json").starts_with("messages[1]: "));
    let r = send(
        &server,
        http.post(format!("{url}/publish/keep"))
            .header("content-type", "text/plain")
            .body(vec![0x66, 0xff, 0xfe]),
    )
    .await;
    expect_error(&r, 400, "invalid_utf8");
    let r = send(
        &server,
        http.post(format!("{url}/publish/keep"))
            .body("y".repeat(1025)),
    )
    .await;
    assert!(expect_error(&r, 413, "payload_too_large").contains("1024"));
    let r = send(
        &server,
        http.post(format!("{url}/publish/keep"))
            .header("content-type", "image/png")
            .body("x"),
    )
    .await;
    expect_error(&r, 415, "unsupported_media_type");
    let r = send(
        &server,
        http.post(format!("{url}/publish/keep?event=a:b")).body("x"),
    )
    .await;
    expect_error(&r, 400, "invalid_event");

    // A batch is validated whole: one bad entry names its index and nothing is published.
    let r = send(
        &server,
        http.post(format!("{url}/publish"))
            .json(&json!({"messages": [
                {"channel": "batch", "data": 1},
                {"channel": "no way", "data": 2},
            ]})),
    )
    .await;
    assert!(expect_error(&r, 400, "invalid_channel").starts_with("messages[1]:"));
    let (status, _) = server.get_json("/api/channels/batch").await;
    assert_eq!(status, 404, "nothing of the bad batch was published");
    let r = send(
        &server,
        http.post(format!("{url}/publish"))
            .json(&json!({"data": 1})),
    )
    .await;
    expect_error(&r, 400, "invalid_request");
    let r = send(
        &server,
        http.post(format!("{url}/publish"))
            .header("content-type", "application/json")
            .body("not json"),
    )
    .await;
    expect_error(&r, 400, "invalid_json");

    // Routing.
    let r = send(&server, http.get(format!("{url}/nowhere"))).await;
    expect_error(&r, 404, "not_found");
    let r = send(&server, http.get(format!("{url}/publish/keep"))).await;
    expect_error(&r, 405, "method_not_allowed");
    let r = send(&server, http.post(format!("{url}/sse/keep"))).await;
    expect_error(&r, 405, "method_not_allowed");

    // Subscribing, on every transport.
    for path in [
        "/sse/keep",
        "/sse?channel=keep",
        "/stream?channel=keep",
        "/poll/keep",
    ] {
        let sep = if path.contains('?') { '&' } else { '?' };
        let r = send(
            &server,
            http.get(format!("{url}{path}{sep}since=not-a-cursor!")),
        )
        .await;
        expect_error(&r, 400, "invalid_cursor");
        let r = send(
            &server,
            http.get(format!("{url}{path}"))
                .header("last-event-id", "AAAAAAAA"),
        )
        .await;
        expect_error(&r, 400, "invalid_cursor");
    }
    for path in ["/sse", "/stream", "/poll"] {
        let r = send(
            &server,
            http.get(format!("{url}{path}?channel=a&channel=b%2F")),
        )
        .await;
        expect_error(&r, 400, "invalid_channel");
        let r = send(
            &server,
            http.get(format!(
                "{url}{path}?channel=a&channel=b&channel=c&channel=d"
            )),
        )
        .await;
        assert!(expect_error(&r, 400, "too_many_channels").contains('3'));
        let r = send(&server, http.get(format!("{url}{path}"))).await;
        expect_error(&r, 400, "missing_channel");
    }
    let r = send(&server, http.get(format!("{url}/poll/keep?wait=-6"))).await;
    expect_error(&r, 400, "invalid_wait");
    let r = send(&server, http.get(format!("{url}/poll/keep?wait=soon"))).await;
    expect_error(&r, 400, "invalid_wait");
    let r = send(&server, http.get(format!("{url}/sse/keep?history=lots"))).await;
    expect_error(&r, 400, "invalid_parameter");
    let r = send(
        &server,
        http.get(format!("{url}/api/channels/keep/history?limit=0")),
    )
    .await;
    expect_error(&r, 400, "invalid_parameter");

    // Nothing was lost, and the server still works.
    server.publish("keep", json!("after")).await;
    let (status, history) = server.get_json("/api/channels/keep/history").await;
    assert_eq!(status, 200);
    let data: Vec<_> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"].clone())
        .collect();
    assert_eq!(data, vec![json!("before"), json!("after")]);
}

#[tokio::test]
async fn publish_accepts_each_documented_content_type() {
    let server = TestServer::spawn().await;
    let url = &server.url;
    let http = &server.http;
    let cases: [(Option<&str>, &[u8], Value); 5] = [
        (Some("application/json"), b" {\"a\": 1} ", json!({"a": 1})),
        (
            Some("application/merge-patch+json"),
            b"[1,2]",
            json!([1, 2]),
        ),
        (
            Some("text/plain; charset=utf-8"),
            b"hello\nworld",
            json!("hello\nworld"),
        ),
        (None, b"no type", json!("no type")),
        (
            Some("application/octet-stream"),
            &[0, 1, 255],
            json!("AAH/"),
        ),
    ];
    for (ct, body, _) in &cases {
        let mut req = http
            .post(format!("{url}/publish/types"))
            .body(body.to_vec());
        if let Some(ct) = ct {
            req = req.header("content-type", *ct);
        }
        let r = send(&server, req).await;
        assert_eq!(r.status, 200, "{ct:?}: {:?}", r.body);
        for key in ["channel", "offset", "epoch", "cursor", "time"] {
            assert!(r.body.get(key).is_some(), "{key} missing in {:?}", r.body);
        }
    }
    let (_, history) = server.get_json("/api/channels/types/history").await;
    let messages = history["messages"].as_array().unwrap();
    for (m, (_, _, expected)) in messages.iter().zip(&cases) {
        assert_eq!(&m["data"], expected);
    }
    assert_eq!(messages[4]["encoding"], "base64");
}

#[tokio::test]
async fn batch_publish_forms_reply_with_every_position() {
    let server = TestServer::spawn().await;
    let url = &server.url;
    let one = send(
        &server,
        server
            .http
            .post(format!("{url}/publish"))
            .json(&json!({"channel": "x", "data": {"k": 1}, "event": "e"})),
    )
    .await;
    assert_eq!((one.status, one.body["offset"].clone()), (200, json!(1)));
    let fan = send(
        &server,
        server
            .http
            .post(format!("{url}/publish"))
            .json(&json!({"channels": ["x", "y"], "data": 2})),
    )
    .await;
    let results = fan.body["results"].as_array().unwrap();
    assert_eq!(
        (results[0]["offset"].clone(), results[1]["offset"].clone()),
        (json!(2), json!(1))
    );
    let batch = send(
        &server,
        server
            .http
            .post(format!("{url}/publish"))
            .json(&json!({"messages": [
                {"channel": "y", "data": "a"},
                {"channel": "z", "data": "AQI=", "encoding": "base64"},
            ]})),
    )
    .await;
    let results = batch.body["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["channel"], "y");
    let (_, info) = server.get_json("/api/channels/y").await;
    assert_eq!(
        (info["offset"].clone(), info["history_length"].clone()),
        (json!(2), json!(2))
    );
    let (_, list) = server.get_json("/api/channels").await;
    assert_eq!(list["channels"].as_array().unwrap().len(), 3);
}
