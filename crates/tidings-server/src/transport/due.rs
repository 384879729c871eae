//! Waiting long polls' deadlines on one timer per node, instead of a tokio `Sleep` in every
//! waiting poll's box (issue 17: 112 bytes of each).
//!
//! A poll registers its due time (milliseconds of the node's clock from `start`, rounded up,
//! so that it never comes early) with its queue; one task sleeps until the earliest and wakes
//! the queues that are due (`SessionQueue::wake_writer`); the poll, woken, reads the clock
//! itself (`Due::passed`) and answers. A poll answered before then takes its entry out
//! (`Due`'s drop). The clock is tokio's, so a test's paused time moves it too.
//!
//! Concurrency: one std `Mutex` over a map sorted by (due time, session id), never held
//! across an `.await`; a queue's lock is taken inside it (`wake_writer`), never the other
//! way round. Bounded: one entry per waiting poll, out at its answer or at its due time,
//! whichever comes first. The task is spawned by the first poll, and while none waits it
//! sleeps on `earlier`, as it does until the earliest due time; a poll due before every
//! other wakes it (`notify_one` keeps a permit, so a wake between the task's look at the
//! map and its wait is not lost).
//!
//! Shutdown reaches the waiting polls through the same map, not the hub's watch (a second
//! lock, insert and remove per round trip): the task closes every queue in it with
//! `Shutdown`. Race-free with a poll registering during that pass: `closing` is set before
//! the pass takes the lock, and `add` checks it under the lock after inserting.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tidings_core::queue::SessionQueue;
use tokio::time::Instant;

pub struct Deadlines {
    start: Instant,
    waiting: Mutex<BTreeMap<(u64, u64), Arc<SessionQueue>>>,
    earlier: tokio::sync::Notify,
    started: AtomicBool,
    /// Set once by the shutdown pass: a poll that registers later is closed at once.
    closing: AtomicBool,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            waiting: Mutex::default(),
            earlier: tokio::sync::Notify::new(),
            started: AtomicBool::new(false),
            closing: AtomicBool::new(false),
        }
    }
}

/// A waiting poll's place in `Deadlines`: taken out when dropped (answered, or the client
/// gone), if the timer has not taken it out first.
pub struct Due<'a> {
    deadlines: &'a Deadlines,
    at: u64,
    id: u64,
}

impl Due<'_> {
    /// Whether the poll's wait is over: never before it ends.
    pub fn passed(&self) -> bool {
        self.deadlines.now_ms() >= self.at
    }
}

impl Drop for Due<'_> {
    fn drop(&mut self) {
        self.deadlines.lock().remove(&(self.at, self.id));
    }
}

impl Deadlines {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<(u64, u64), Arc<SessionQueue>>> {
        // Plain map updates: a poisoned lock holds valid data.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Wakes `queue` (session `id`) once `wait` from now has passed; the timer task starts
    /// with the first poll.
    pub fn add(
        self: &Arc<Self>,
        id: u64,
        queue: &Arc<SessionQueue>,
        wait: Duration,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Due<'_> {
        let end = self.start.elapsed().saturating_add(wait);
        let at = u64::try_from(end.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
        let first = {
            let mut waiting = self.lock();
            let first = waiting.first_key_value().is_none_or(|(k, _)| (at, id) < *k);
            waiting.insert((at, id), Arc::clone(queue));
            if self.closing.load(Ordering::SeqCst) {
                queue.close(tidings_core::DisconnectReason::Shutdown);
            }
            first
        };
        if !self.started.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    let (this, shutdown) = (Arc::clone(self), shutdown.clone());
                    rt.spawn(async move {
                        tokio::select! {
                            _ = shutdown.cancelled() => this.close_all(),
                            _ = Arc::clone(&this).run() => {}
                        }
                    });
                }
                // No runtime (never in the server): the next poll tries again.
                Err(_) => self.started.store(false, Ordering::Release),
            }
        } else if first {
            self.earlier.notify_one();
        }
        Due {
            deadlines: self,
            at,
            id,
        }
    }

    /// Shutdown: every waiting poll (and every one that registers from now on) ends with
    /// `Shutdown`, through its queue, and answers with the notice of SPEC §13.
    fn close_all(&self) {
        self.closing.store(true, Ordering::SeqCst);
        for queue in self.lock().values() {
            queue.close(tidings_core::DisconnectReason::Shutdown);
        }
    }

    /// The timer: wakes the polls that are due, then sleeps until the next one is, or until
    /// one due earlier comes. Runs as long as the runtime does.
    async fn run(self: Arc<Self>) {
        loop {
            let next = {
                let now = self.now_ms();
                let mut waiting = self.lock();
                while let Some(entry) = waiting.first_entry() {
                    if entry.key().0 > now {
                        break;
                    }
                    entry.remove().wake_writer();
                }
                waiting.first_key_value().map(|(k, _)| k.0)
            };
            match next {
                Some(at) => {
                    // A wait past what `Instant` holds (none the config allows) waits a year.
                    let at = self
                        .start
                        .checked_add(Duration::from_millis(at))
                        .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 86_400));
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = self.earlier.notified() => {}
                    }
                }
                None => self.earlier.notified().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `queue` was woken since it was last looked at.
    fn woken(queue: &SessionQueue) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        queue.poll_ready(&mut cx).is_ready()
    }

    /// A node's deadlines, its shutdown token and `n` session queues.
    fn fixture(
        n: usize,
    ) -> (
        Arc<Deadlines>,
        tokio_util::sync::CancellationToken,
        Vec<Arc<SessionQueue>>,
    ) {
        let queues = (0..n).map(|_| SessionQueue::new(1 << 20)).collect();
        (
            Arc::default(),
            tokio_util::sync::CancellationToken::new(),
            queues,
        )
    }

    /// Moves the paused clock by `by`, then lets the timer task run what is due.
    async fn advance(by: Duration) {
        tokio::time::advance(by).await;
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_poll_is_woken_at_its_own_due_time_never_before_and_an_answered_one_not_at_all() {
        let (deadlines, shutdown, queues) = fixture(3);
        let long = deadlines.add(1, &queues[0], Duration::from_millis(2_000), &shutdown);
        let short = deadlines.add(2, &queues[1], Duration::from_millis(1_000), &shutdown);
        let answered = deadlines.add(3, &queues[2], Duration::from_millis(500), &shutdown);
        drop(answered);
        advance(Duration::from_millis(999)).await;
        assert!(
            !short.passed() && !woken(&queues[1]),
            "not before its wait ends"
        );
        advance(Duration::from_millis(2)).await;
        assert!(short.passed() && woken(&queues[1]));
        assert!(!long.passed() && !woken(&queues[0]));
        assert!(!woken(&queues[2]), "taken out when answered");
        advance(Duration::from_millis(1_000)).await;
        assert!(long.passed() && woken(&queues[0]));
        assert!(deadlines.lock().is_empty(), "every entry out");
    }

    /// Whether `queue` was closed for shutdown.
    fn shut(queue: &SessionQueue) -> bool {
        queue.drain_into(&mut Vec::new()) == Err(tidings_core::DisconnectReason::Shutdown)
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_closes_every_waiting_poll_and_every_poll_that_registers_after_it() {
        let (deadlines, shutdown, queues) = fixture(2);
        let waiting = deadlines.add(1, &queues[0], Duration::from_secs(30), &shutdown);
        tokio::task::yield_now().await;
        assert!(!shut(&queues[0]), "a poll waits until shutdown");
        shutdown.cancel();
        while !deadlines.closing.load(Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        assert!(shut(&queues[0]), "the waiting poll is closed");
        assert!(!waiting.passed(), "by shutdown, not by its deadline");
        let late = deadlines.add(2, &queues[1], Duration::from_secs(30), &shutdown);
        assert!(
            shut(&queues[1]),
            "a poll that registers after the pass is closed at once"
        );
        drop((waiting, late));
        assert!(deadlines.lock().is_empty(), "every entry out");
    }
}
