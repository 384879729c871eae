//! No silent loss: a cursor that history no longer covers gets a gap notice first.

use serde_json::json;

use crate::common::{Item, Kind, Start, Sub, TestServer, subscribe};
use crate::every_transport;

async fn resume_behind_trimmed_history_reports_a_gap_then_what_is_left(kind: Kind) {
    let server = TestServer::with(|c| c.channels.history_size = 3).await;
    let first = server.publish("news", json!(1)).await;
    for i in 2..=10 {
        server.publish("news", json!(i)).await;
    }
    let cursor = first["cursor"].as_str().unwrap().to_owned();
    let mut sub = subscribe(&server, kind, &["news"], Start::Since(cursor)).await;
    if kind == Kind::WsRaw {
        // A raw socket cannot carry the notice: it closes with 4010 at once, sending nothing.
        assert_closed_for_gap(&mut sub).await;
        return;
    }
    match sub.next().await {
        Item::Gap(g) => {
            assert_eq!(g["channel"], "news");
            assert_eq!(g["reason"], "trimmed");
            assert_eq!(g["next_offset"], 8);
            assert_eq!(g["epoch"], first["epoch"]);
        }
        other => panic!("expected a gap first, got {other:?}"),
    }
    let offsets: Vec<u64> = sub
        .messages(3)
        .await
        .into_iter()
        .map(|(_, o, _)| o)
        .collect();
    assert_eq!(offsets, vec![8, 9, 10]);
    // The cursor after the gap resumes cleanly: no second gap.
    let cursor = sub.cursor.clone().unwrap();
    drop(sub);
    server.publish("news", json!(11)).await;
    let mut sub = subscribe(&server, kind, &["news"], Start::Since(cursor)).await;
    assert_eq!(sub.messages(1).await[0].1, 11);
}
every_transport!(resume_behind_trimmed_history_reports_a_gap_then_what_is_left);

async fn a_cursor_from_another_epoch_reports_epoch_changed(kind: Kind) {
    // Two servers: the second's channel is a new incarnation (as after a restart).
    let old = TestServer::spawn().await;
    let pos = old.publish("news", json!("old")).await;
    let server = TestServer::spawn().await;
    server.publish("news", json!("new")).await;
    let cursor = pos["cursor"].as_str().unwrap().to_owned();
    let mut sub = subscribe(&server, kind, &["news"], Start::Since(cursor)).await;
    if kind == Kind::WsRaw {
        // A raw socket cannot carry the notice: it closes with 4010 at once, sending nothing.
        assert_closed_for_gap(&mut sub).await;
        return;
    }
    match sub.next().await {
        Item::Gap(g) => {
            assert_eq!(g["reason"], "epoch_changed");
            assert_eq!(g["next_offset"], 1);
            assert_ne!(g["epoch"], pos["epoch"]);
        }
        other => panic!("expected a gap, got {other:?}"),
    }
    assert_eq!(sub.messages(1).await[0].2, json!("new"));
}
every_transport!(a_cursor_from_another_epoch_reports_epoch_changed);

async fn assert_closed_for_gap(sub: &mut Sub) {
    match sub.next().await {
        Item::Disconnect(d) => assert_eq!(d["close"], json!(4010)),
        other => panic!("expected close 4010 first, got {other:?}"),
    }
}
