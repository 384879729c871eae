//! A connection's kill switch: fired by a session whose queue overflowed (on the publisher's
//! thread: a client that stopped reading stops its writer from being polled at all), and
//! awaited by the connection's task (the server's `net::listener::drive`), which then drops
//! the connection after a grace. It lives here, beside the queue, because the queue holds
//! it (`SessionQueue::set_on_overflow`): an overflow fires it directly, with no boxed hook
//! per session (issue 17).
//!
//! Not a `CancellationToken`: that is a node of a cancellation tree (~112 bytes, with a
//! `Notify`), and waiting on it keeps a `Notify` waiter (~70 bytes) in every connection's
//! task for the connection's whole life. This is a flag and one waker slot: one task is its
//! only waiter (a second task waiting would take the slot from the first; one task may wait
//! on it at several places in turn).
//!
//! Concurrency: `cancel` may run on any thread; the flag is set before the waker is taken,
//! and the waiter re-checks it after storing its waker, so a wake is never lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

#[derive(Clone, Default)]
pub struct Kill(Arc<State>);

#[derive(Default)]
struct State {
    fired: AtomicBool,
    waiter: Mutex<Option<Waker>>,
}

impl Kill {
    pub fn new() -> Self {
        Self::default()
    }

    /// Fires the switch (the first call counts; later ones change nothing).
    pub fn cancel(&self) {
        self.0.fired.store(true, Ordering::SeqCst);
        let waker = self.0.waiter.lock().ok().and_then(|mut w| w.take());
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.fired.load(Ordering::SeqCst)
    }

    /// `Ready` once fired; otherwise the waker is kept for `cancel`.
    pub fn poll_cancelled(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_cancelled() {
            return Poll::Ready(());
        }
        if let Ok(mut slot) = self.0.waiter.lock() {
            match &mut *slot {
                Some(w) if w.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
        }
        // Fired between the first check and the store: `cancel` may have found no waker.
        if self.is_cancelled() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
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
