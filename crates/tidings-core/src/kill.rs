//! A connection's kill switch: fired by a session whose queue overflowed (on the publisher's
//! thread: a client that stopped reading stops its writer from being polled at all), and
//! awaited by the connection's task (the server's `net::listener::drive`), which then drops
//! the connection after a grace. It lives here, beside the queue, because it *is* one: the
//! connection's queue, made at accept with the kill's flag and waiter slot in it, which the
//! connection's sessions claim in turn (`claim`; the rules are in `queue`'s module docs).
//! One allocation per connection where the switch and each session's queue were one each
//! (issue 17).
//!
//! Not a `CancellationToken`: that is a node of a cancellation tree (~112 bytes, with a
//! `Notify`), and waiting on it keeps a `Notify` waiter (~70 bytes) in every connection's
//! task for the connection's whole life. This is a flag and one waker slot: one task is its
//! only waiter (a second task waiting would take the slot from the first; one task may wait
//! on it at several places in turn).
//!
//! Concurrency: `cancel` may run on any thread; the flag is set before the waker is taken,
//! and the waiter re-checks it after storing its waker, so a wake is never lost.

use std::sync::Arc;
use std::task::{Context, Poll};

use crate::queue::SessionQueue;

#[derive(Clone)]
pub struct Kill(Arc<SessionQueue>);

impl Default for Kill {
    fn default() -> Self {
        Self::new()
    }
}

impl Kill {
    /// A connection's switch, with the queue its sessions claim (its budget is set by each
    /// claim).
    pub fn new() -> Self {
        Self(SessionQueue::new(0))
    }

    /// A session's own switch on its queue (a Pusher session's: its overflow stops its
    /// writer, and no connection's task waits on it).
    pub fn of(queue: &Arc<SessionQueue>) -> Self {
        Self(queue.clone())
    }

    pub(crate) fn queue(&self) -> &Arc<SessionQueue> {
        &self.0
    }

    /// The connection's queue for a session, reset, with the budget `max_bytes`, if no other
    /// session holds it; otherwise a fresh one (see `queue`'s module docs).
    pub fn claim(&self, max_bytes: usize) -> Arc<SessionQueue> {
        if self.0.try_claim(max_bytes) {
            self.0.clone()
        } else {
            SessionQueue::new(max_bytes)
        }
    }

    /// Fires the switch (the first call counts; later ones change nothing).
    pub fn cancel(&self) {
        self.0.fire_kill();
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.kill_fired()
    }

    /// `Ready` once fired; otherwise the waker is kept for `cancel`.
    pub fn poll_cancelled(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.0.poll_kill(cx)
    }

    /// Resolves once fired.
    pub fn cancelled(&self) -> impl Future<Output = ()> + Send + '_ {
        std::future::poll_fn(|cx| self.poll_cancelled(cx))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[tokio::test]
    async fn a_kill_from_another_thread_wakes_the_waiting_connection() {
        let kill = Kill::new();
        let waiting = tokio::spawn({
            let kill = kill.clone();
            async move { kill.cancelled().await }
        });
        tokio::task::yield_now().await;
        assert!(!kill.is_cancelled());
        std::thread::spawn({
            let kill = kill.clone();
            move || kill.cancel()
        })
        .join()
        .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the waiter was woken")
            .expect("the waiter's task ran");
        // Fired stays fired: a later wait resolves at once.
        kill.cancelled().await;
    }
}
