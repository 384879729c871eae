//! Helpers the workspace's integration tests share: a spawned process read line by line
//! (`Proc`: third-party clients, `tidings subscribe`), a running `tidings serve` (`Served`),
//! one `tidings` command run to completion (`cli`)
//! and `eventually` for state that announces no event. A dev-dependency only; nothing here ships.
//!
//! Tests fail by panicking, so helpers here panic too, with the context a reader of the
//! failure needs (what the process printed, what never happened).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

pub mod cli;
pub mod proc;
pub mod served;
pub mod temp_dir;

pub use proc::Proc;
pub use served::Served;
pub use temp_dir::TempDir;

/// `bin` (a `tidings` binary, `env!("CARGO_BIN_EXE_tidings")` in the CLI's tests) with a clean
/// environment: no `TIDINGS_*` variable or proxy setting of the caller leaks in, logs at
/// `warn` unless the test sets `TIDINGS_LOG`, stdin closed, stdout and stderr piped, and the
/// process killed when the handle is dropped (also when a test panics).
pub fn command(bin: &str) -> tokio::process::Command {
    use std::process::Stdio;
    let mut cmd = tokio::process::Command::new(bin);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TIDINGS_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("TIDINGS_LOG", "warn")
        .env("NO_PROXY", "*")
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("all_proxy")
        .env_remove("ALL_PROXY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

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
