//! What a parked connection's task costs, checked: its future's size, with the real
//! application as the service (the task is allocated at that size for the connection's
//! whole life, whichever state it parks in). The session's own part is checked beside it:
//! `transport::stream` (an SSE or NDJSON writer) and `transport::websocket` (a session).
//!
//! Sizes, not RSS: exact and repeatable, so a bound a little over today's fails as soon as
//! a change makes every parked connection larger. docs/benchmarks.md (*Idle memory*) has the
//! whole breakdown and how it is measured.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use crate::app::service::App;
use crate::config::Config;
use crate::net::ConnectionCtx;
use crate::net::listener::{Edge, connection};
use crate::state::AppState;

/// Today: 744 bytes in a debug build (776 before a long poll's CORS header and access-log
/// entry were boxed, `app::service::Finish`, which also made room for a held poll's hook;
/// 768 before the exchange box was kept across requests, which saves an allocation per
/// request; 1,136 before the lean path's parked states became futures of their own,
/// `h1::Lean::serve`; 1,016 before the kill switch's wait was a poll of a flag, `net::kill`;
/// 952 before a long poll's answer-to-come was waited on in place; 888 before the lean path
/// read its timeouts and shutdown token from the service and hyper connections learnt of
/// shutdown without a graceful watcher in every task; 800 before the connection's place was
/// kept with its context, `limits::Placed`, and the TLS acceptor became the edge's); tokio
/// adds ~112 bytes and rounds the cell up to a multiple of 128, so ≤ ~784 is a cell of 896
/// — which the release build's is since then (massif).
// One bound for debug and release builds: the sizes differ by a few bytes. At most 784:
// past it, every connection's task cell grows by 128 bytes.
const TASK_BOUND: usize = 784;

#[tokio::test]
async fn a_parked_connection_s_task_stays_small() {
    let state = AppState::new(Config::default()).unwrap();
    let app = Arc::new(App::new(state.clone()));
    let edge = Arc::new(Edge::new(app, None));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (stream, peer) = listener.accept().await.unwrap();
    let stream = crate::net::deadline::Deadline::new(stream, std::time::Duration::from_secs(1));
    let ctx = ConnectionCtx {
        peer,
        kill: crate::net::kill::Kill::new(),
        http2: false,
    };
    let permit = state.limits.try_acquire(peer.ip()).ok().unwrap();
    let task = connection(edge, stream, permit.keep_with(ctx), false);
    let size = std::mem::size_of_val(&task);
    let bound = TASK_BOUND;
    eprintln!("a parked connection's task future: {size} bytes");
    assert!(
        size <= bound,
        "a connection's task future is {size} bytes (bound {bound})"
    );
}

/// Today: 392 bytes in a debug build (the wait's future in the `Option` of its reused box,
/// `transport::long_poll::Wait`; 496 while it had a tokio `Sleep` of its own for its
/// deadline, now on the node's one timer, `transport::due`; 576 while it waited on the
/// shutdown token beside its queue,
/// which the node's shutdown pass now closes, `lifecycle::follow`, and kept its wait as a
/// 16-byte `Duration`; 592 while it kept a reference to its hook and the pinned
/// poll of the socket's answer across the wait; 688 while the wait was an `async fn` of
/// its own awaited inside the answer's future, which kept a reference to each of its
/// arguments). Not in the task's cell, but every waiting long poll holds one.
// glibc's chunk for it is 400 bytes up to 392 (416 above).
const LONG_POLL_WAIT_BOUND: usize = 392;

#[tokio::test]
async fn a_waiting_long_poll_s_answer_stays_small() {
    let state = AppState::new(Config::default()).unwrap();
    let headers = axum::http::HeaderMap::new();
    let polled =
        crate::transport::short_poll::poll(&state, None, Some("p"), Some("wait=5"), &headers, true)
            .await
            .unwrap_or_else(|_| panic!("a poll"));
    let crate::transport::short_poll::Polled::Later(wait) = polled else {
        panic!("a long poll with nothing to answer waits");
    };
    let size = wait.answer_size();
    eprintln!("a waiting long poll's answer: {size} bytes");
    assert!(
        size <= LONG_POLL_WAIT_BOUND,
        "a waiting long poll's answer is {size} bytes (bound {LONG_POLL_WAIT_BOUND})"
    );
}

/// Today: 120 bytes (136 while a partly written answer's head was kept inline,
/// `net::held::Answered`). Every waiting long poll that can be held has one (the hub's hook,
/// `transport::long_poll::HeldPoll`), in an `Arc` of its own beside the wait's box.
const HELD_POLL_BOUND: usize = 120;

#[test]
fn a_held_poll_s_hook_stays_small() {
    let size = std::mem::size_of::<crate::transport::long_poll::HeldPoll>();
    eprintln!("a held poll's hook: {size} bytes");
    assert!(
        size <= HELD_POLL_BOUND,
        "a held poll's hook is {size} bytes (bound {HELD_POLL_BOUND})"
    );
}
