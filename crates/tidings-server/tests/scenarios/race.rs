//! Joining while thousands of publishes are in flight: no message missed, none duplicated.

use std::sync::Arc;

use serde_json::json;

use crate::common::{Kind, Start, TestServer, subscribe};
use crate::every_transport;

const PUBLISHERS: u64 = 4;
const EACH: u64 = 500;

async fn subscribers_joining_during_a_publish_burst_see_a_gap_free_duplicate_free_sequence(
    kind: Kind,
) {
    let server = Arc::new(TestServer::with(|c| c.channels.history_size = 10_000).await);
    // Counts publishes; the joiners await a count instead of polling for it.
    let (published, mut progress) = tokio::sync::watch::channel(0u64);
    let published = Arc::new(published);
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let server = server.clone();
        let published = published.clone();
        publishers.push(tokio::spawn(async move {
            for i in 0..EACH {
                server.publish("race", json!({"p": p, "i": i})).await;
                published.send_modify(|n| *n += 1);
            }
        }));
    }
    // Join mid-burst: one from now, one replaying everything retained.
    progress.wait_for(|n| *n >= 200).await.unwrap();
    let mut live = subscribe(&server, kind, &["race"], Start::Now).await;
    let mut full = subscribe(&server, kind, &["race"], Start::History(10_000)).await;
    for p in publishers {
        p.await.unwrap();
    }
    let last = PUBLISHERS * EACH + 1;
    server.publish("race", json!("end")).await;

    for (name, sub) in [("live", &mut live), ("full", &mut full)] {
        let mut offsets = Vec::new();
        while offsets.last() != Some(&last) {
            let (_, offset, _) = sub.messages(1).await.remove(0);
            offsets.push(offset);
        }
        let first = offsets[0];
        if name == "full" {
            assert_eq!(first, 1, "history replay starts at the beginning");
        }
        assert_eq!(
            offsets,
            (first..=last).collect::<Vec<_>>(),
            "{name} subscriber over {kind:?}: a gap or a duplicate"
        );
    }
}
// Raw WebSocket frames carry no offsets to check the sequence by.
every_transport!(subscribers_joining_during_a_publish_burst_see_a_gap_free_duplicate_free_sequence: SseRaw, Sse, Stream, LongPoll, ShortPoll, Ws);
