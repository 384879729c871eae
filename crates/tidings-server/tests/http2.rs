//! HTTP/2 without TLS (h2c, prior knowledge) on the same port as HTTP/1.1: publishing and
//! several streams multiplexed over one connection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::TestServer;
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
