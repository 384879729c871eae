//! Helpers the workspace's integration tests share: a spawned process read line by line
//! (`Proc`: third-party clients, `tidings subscribe`) and `eventually` for state that
//! announces no event. A dev-dependency only; nothing here ships.
//!
//! Tests fail by panicking, so helpers here panic too, with the context a reader of the
//! failure needs (what the process printed, what never happened).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

pub mod proc;

pub use proc::Proc;

/// Polls `probe` every `tick` until it holds; panics naming `what` if it has not within
/// `within`. For state with no event a test could await instead (metrics gauges after a
/// hang-up, `/readyz` following a broker, presence kept in Redis).
pub async fn eventually(
    what: &str,
    within: Duration,
    tick: Duration,
    mut probe: impl AsyncFnMut() -> bool,
) {
    // One timeout around the whole wait: the probe's own time counts too.
    let mut ticker = tokio::time::interval(tick);
    let held = tokio::time::timeout(within, async {
        loop {
            ticker.tick().await;
            if probe().await {
                return;
            }
        }
    })
    .await;
    assert!(held.is_ok(), "never happened within {within:?}: {what}");
}
