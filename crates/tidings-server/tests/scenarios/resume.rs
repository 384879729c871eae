//! Resume from a cursor, and `history=N` on a fresh subscription.

use serde_json::json;

use crate::common::{Kind, Start, TestServer, subscribe};
use crate::every_transport;

async fn resuming_from_a_publish_cursor_replays_exactly_what_followed_then_goes_live(kind: Kind) {
    let server = TestServer::spawn().await;
    let mut cursor = None;
    for i in 1..=5 {
        let pos = server.publish("news", json!(i)).await;
        if i == 2 {
            cursor = Some(pos["cursor"].as_str().unwrap().to_owned());
        }
    }
    let mut sub = subscribe(&server, kind, &["news"], Start::Since(cursor.unwrap())).await;
    server.publish("news", json!(6)).await;
    let got = sub.messages(4).await;
    let data: Vec<_> = got.iter().map(|(_, _, d)| d.clone()).collect();
    assert_eq!(data, vec![json!(3), json!(4), json!(5), json!(6)]);
    if kind.positions() {
        let offsets: Vec<_> = got.iter().map(|(_, o, _)| *o).collect();
        assert_eq!(offsets, vec![3, 4, 5, 6]);
    }
}
every_transport!(resuming_from_a_publish_cursor_replays_exactly_what_followed_then_goes_live);

async fn a_reconnect_with_the_last_cursor_loses_and_repeats_nothing(kind: Kind) {
    let server = TestServer::spawn().await;
    let mut sub = subscribe(&server, kind, &["news"], Start::Now).await;
    for i in 1..=3 {
        server.publish("news", json!(i)).await;
    }
    assert_eq!(sub.messages(3).await.len(), 3);
    let cursor = sub.cursor.clone().unwrap();
    drop(sub);
    for i in 4..=6 {
        server.publish("news", json!(i)).await;
    }
    let mut sub = subscribe(&server, kind, &["news"], Start::Since(cursor)).await;
    let offsets: Vec<u64> = sub
        .messages(3)
        .await
        .into_iter()
        .map(|(_, o, _)| o)
        .collect();
    assert_eq!(offsets, vec![4, 5, 6]);
}
// Raw WebSocket frames carry no cursor to reconnect with.
every_transport!(a_reconnect_with_the_last_cursor_loses_and_repeats_nothing: SseRaw, Sse, Stream, LongPoll, ShortPoll, Ws);

async fn history_n_replays_the_last_n_messages_oldest_first(kind: Kind) {
    let server = TestServer::spawn().await;
    for i in 1..=5 {
        server.publish("news", json!(i)).await;
    }
    let mut sub = subscribe(&server, kind, &["news"], Start::History(3)).await;
    let data: Vec<_> = sub
        .messages(3)
        .await
        .into_iter()
        .map(|(_, _, d)| d)
        .collect();
    assert_eq!(data, vec![json!(3), json!(4), json!(5)]);
}
every_transport!(history_n_replays_the_last_n_messages_oldest_first);

async fn a_subscriber_that_dropped_before_any_message_resumes_from_when_it_joined(kind: Kind) {
    let server = TestServer::spawn().await;
    server.publish("news", json!("before")).await;
    let sub = subscribe(&server, kind, &["news"], Start::Now).await;
    let cursor = sub
        .cursor
        .clone()
        .expect("a cursor as soon as the subscription is live");
    drop(sub);
    server.publish("news", json!("while away")).await;
    let mut sub = subscribe(&server, kind, &["news"], Start::Since(cursor)).await;
    let got = sub.messages(1).await;
    assert_eq!(got[0].2, json!("while away"));
}
every_transport!(a_subscriber_that_dropped_before_any_message_resumes_from_when_it_joined: SseRaw, Sse, Stream, LongPoll, ShortPoll, Ws);
