//! Idle streams carry heartbeats (SSE comment, empty NDJSON line) every heartbeat_interval.

use std::time::Duration;

use crate::common::{Item, Kind, Start, TestServer, subscribe};
use crate::every_transport;

async fn an_idle_stream_sends_heartbeats(kind: Kind) {
    let server =
        TestServer::with(|c| c.server.heartbeat_interval = Duration::from_millis(150)).await;
    let mut sub = subscribe(&server, kind, &["quiet"], Start::Now).await;
    for _ in 0..2 {
        match sub.next_item().await {
            Item::Heartbeat => {}
            other => panic!("expected a heartbeat, got {other:?}"),
        }
    }
}
every_transport!(an_idle_stream_sends_heartbeats: SseRaw, Sse, Stream);
