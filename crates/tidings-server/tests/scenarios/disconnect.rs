//! Sessions ended from the server side (here as when the broker goes away) get a goodbye
//! that says why and that reconnecting makes sense, then the stream ends.

use serde_json::json;
use tidings_core::DisconnectReason;

use crate::common::{Item, Kind, Start, TestServer, subscribe};
use crate::every_transport;

async fn a_broker_outage_disconnects_every_session_with_reconnect_advice(kind: Kind) {
    let server = TestServer::spawn().await;
    let mut sub = subscribe(&server, kind, &["news"], Start::Now).await;
    server
        .state
        .node
        .hub
        .disconnect_all(DisconnectReason::BrokerUnavailable);
    match sub.next().await {
        Item::Disconnect(d) if kind == Kind::WsRaw => assert_eq!(d["close"], json!(1013)),
        Item::Disconnect(d) => {
            assert_eq!(d["reason"], "broker_unavailable");
            assert_eq!(d["reconnect"], true);
        }
        other => panic!("expected a disconnect, got {other:?}"),
    }
    assert!(sub.ended().await, "the stream ends after the goodbye");
}
every_transport!(a_broker_outage_disconnects_every_session_with_reconnect_advice: SseRaw, Sse, Stream, WsRaw, Ws);
