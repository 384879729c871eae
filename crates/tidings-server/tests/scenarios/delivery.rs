//! Ordered delivery without duplicates; many channels on one request.

use serde_json::json;

use crate::common::{Kind, Start, TestServer, subscribe};
use crate::every_transport;

async fn messages_arrive_in_order_without_duplicates(kind: Kind) {
    // History holds the whole burst: a short poller may fall 200 messages behind, and with
    // the default 100 it would (rightly) get a gap instead.
    let server = TestServer::with(|c| c.channels.history_size = 1000).await;
    let mut sub = subscribe(&server, kind, &["news"], Start::Now).await;
    for i in 0..200 {
        server.publish("news", json!({ "n": i })).await;
    }
    let got = sub.messages(200).await;
    for (i, (channel, offset, data)) in got.iter().enumerate() {
        assert_eq!(channel, "news");
        if kind.positions() {
            assert_eq!(*offset, i as u64 + 1);
        }
        assert_eq!(data, &json!({ "n": i }));
    }
}
every_transport!(messages_arrive_in_order_without_duplicates);

async fn one_request_follows_many_channels_and_its_cursor_covers_them_all(kind: Kind) {
    let server = TestServer::spawn().await;
    let mut sub = subscribe(&server, kind, &["a", "b", "chat:c"], Start::Now).await;
    server.publish("a", json!("a1")).await;
    server.publish("b", json!("b1")).await;
    server.publish("chat:c", json!("c1")).await;
    let got = sub.messages(3).await;
    let data: Vec<_> = got.iter().map(|(_, _, d)| d.clone()).collect();
    assert_eq!(data, vec![json!("a1"), json!("b1"), json!("c1")]);
    let cursor = sub.cursor.clone().unwrap();
    drop(sub);
    // Missed while away, on two of the channels.
    server.publish("b", json!("b2")).await;
    server.publish("a", json!("a2")).await;
    let mut sub = subscribe(&server, kind, &["a", "b", "chat:c"], Start::Since(cursor)).await;
    let mut got: Vec<_> = sub
        .messages(2)
        .await
        .into_iter()
        .map(|(_, _, d)| d)
        .collect();
    got.sort_by_key(|v| v.to_string());
    assert_eq!(got, vec![json!("a2"), json!("b2")]);
}
// `/ws` cursors are per channel by design (SPEC §10); its own test covers many channels.
every_transport!(one_request_follows_many_channels_and_its_cursor_covers_them_all: Sse, Stream, LongPoll, ShortPoll);
