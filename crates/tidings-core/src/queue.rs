//! The bounded outbound queue of one session.
//!
//! Concurrency: many producers (the hub's fan-out, one per channel, possibly on several
//! threads) and exactly one consumer (the session's writer). The lock is a std `Mutex`
//! because it is held for a push or a swap, never across an `.await`. Producers never wait
//! for the consumer: a push that would exceed `max_bytes` marks the queue overflowed, drops
//! what it held and wakes the writer, which ends the session with `slow` — the subscriber
//! resumes from its cursor, so nothing is lost, and the publisher is never blocked. If the
//! writer's connection may not be polling it at all (an HTTP/1.1 stream stuck in a write),
//! the overflow also fires the connection's kill switch, which the queue holds (`Kill`,
//! 8 bytes; it was a boxed closure per session, an allocation each). The session counts
//! its slow disconnect itself when it ends (`overflowed`).
//!
//! The writer is woken through one waker slot in the locked state, not a `Notify`: a
//! parked session waits on its queue for hours, and `Notify`'s waiter (~70 bytes in every
//! session's future, beside the `Notify` itself in the queue) was more than the slot and a
//! flag. One consumer means one waker; a wake is a flag that stays set until `poll_ready`
//! sees it, so a wakeup is never lost between polls.
//!
//! Heartbeats and pings come the same way (`Tick`): one task per node ticks every watched
//! session through the hub (`Hub::tick_part`) instead of a timer in each one (a boxed `Sleep`
//! per session: 112 bytes and an allocation). A tick sets a flag and wakes the writer, and
//! `take_tick` says so once, like a reload.
//!
//! One allocation per connection (issue 17): a connection's kill switch (`Kill`) *is* a
//! queue, made at accept, and the connection's sessions claim it in turn (`Kill::claim`)
//! instead of allocating one each; it carries the kill's flag and its waiter's slot beside
//! the session's. Ownership rules:
//! - A queue is claimed by at most one session at a time (`claimed`, a compare-and-swap);
//!   a second session meanwhile (an h2 stream, an overlap) gets a fresh queue of its own,
//!   as does every session of an HTTP/2 connection.
//! - Claiming resets what the last session left (items, end, flags, the writer's waker,
//!   the overflow action, the budget); the kill's flag and its waiter stay, they are the
//!   connection's. The claim is given back (`unclaim`) by the `Subscription` that holds it
//!   when it drops, after `Hub::remove` for each channel and `Hub::unwatch` returned: those
//!   take the same locks as every delivery, presence event, tick, reload and shutdown
//!   pass, so once they return nothing reaches the queue until the next session registers
//!   it. Nothing else keeps a clone of a session's queue.
//! - The kill's waiter (the connection's task, `Kill::poll_cancelled`) and the session's
//!   writer (`poll_ready`, `poll_cut`) have a slot each: one waiter per slot, as before.
//! - An overflow fires the kill of this queue itself (`own_kill`, when a session on the
//!   connection's own queue asked for it) or the one it holds (a fresh queue's, pointing at
//!   its connection's queue; never the other way round, so no cycle of `Arc`s).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::disconnect::DisconnectReason;
use crate::kill::Kill;
use crate::message::Message;
use crate::presence::PresenceEvent;

/// What a session's queue carries: messages, and presence events where the namespace asks.
#[derive(Clone, Debug)]
pub enum QueueItem {
    Message(Arc<Message>),
    Presence(Arc<PresenceEvent>),
}

/// The shared timers a session can listen to (`Hub::tick_part`): what it does on a tick is the
/// transport's (an SSE comment, an empty NDJSON line, a WebSocket ping and its timeout check).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tick {
    /// Every `heartbeat_interval`: streams.
    Heartbeat,
    /// Every `ping_interval`: WebSocket sessions.
    Ping,
}

/// Queue weight of a presence event (it is small and fixed-size in every encoding).
const PRESENCE_WEIGHT: usize = 160;

impl QueueItem {
    fn weight(&self) -> usize {
        match self {
            QueueItem::Message(m) => m.weight(),
            QueueItem::Presence(_) => PRESENCE_WEIGHT,
        }
    }
}

pub struct SessionQueue {
    state: Mutex<QueueState>,
    /// Set at creation, and again by each claim (`Kill::claim`). 32 bits, as `bytes`: with
    /// the kill's fields the queue would otherwise be 112 bytes, a malloc size class up
    /// (`budget`: a budget past 4 GiB is 4 GiB).
    max_bytes: AtomicU32,
    /// The kill switch's flag when this is a connection's queue (`Kill`): set once, never
    /// reset (a claim leaves it).
    fired: AtomicBool,
    /// Held by the session using the connection's queue (see the module docs).
    claimed: AtomicBool,
}

/// What is queued, oldest first: a lone item inline, so a session that gets one message at a
/// time (a long poll's one answer, a quiet stream) allocates no list for it — that list was
/// an allocation per long-poll delivery (issue 17). The same size as the `VecDeque` alone
/// (the enum's tag lives in the deque's niche). A list with room (one handed back by
/// `swap_into`) is reused rather than traded for the inline slot.
enum Items {
    One(QueueItem),
    Many(VecDeque<QueueItem>),
}

impl Default for Items {
    fn default() -> Self {
        Items::Many(VecDeque::new())
    }
}

impl Items {
    fn len(&self) -> usize {
        match self {
            Items::One(_) => 1,
            Items::Many(v) => v.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&mut self, item: QueueItem) {
        match self {
            Items::Many(v) if v.is_empty() && v.capacity() == 0 => *self = Items::One(item),
            Items::Many(v) => v.push_back(item),
            Items::One(_) => {
                let mut v = VecDeque::with_capacity(4);
                if let Items::One(first) = std::mem::take(self) {
                    v.push_back(first);
                }
                v.push_back(item);
                *self = Items::Many(v);
            }
        }
    }
}

#[derive(Default)]
struct QueueState {
    items: Items,
    bytes: u32,
    /// Set once: the session must end, and why (`Slow` after an overflow).
    ended: Option<DisconnectReason>,
    /// Something was pushed (or the queue ended) since the writer last saw `poll_ready`.
    woken: bool,
    /// A reload took effect since the writer last looked (`take_reload`).
    reloaded: bool,
    /// The shared tick this session listens to (`listen`), if any.
    listens: Option<Tick>,
    /// That tick came since the writer last looked (`take_tick`).
    ticked: bool,
    /// The writer's, while it waits.
    waker: Option<Waker>,
    /// An overflow fires this queue's own kill (`fire_kill`): a session on its connection's
    /// queue that asked for it (`set_on_overflow`).
    own_kill: bool,
    /// An overflow fires this (a fresh queue's: its connection's kill switch).
    on_overflow: Option<Kill>,
    /// The connection's task while it waits on the kill switch (`Kill::poll_cancelled`);
    /// not the writer's slot: both may wait at once.
    kill_waker: Option<Waker>,
}

impl QueueState {
    /// Marks the queue ready; the waker to wake once the lock is released.
    fn wake(&mut self) -> Option<Waker> {
        self.woken = true;
        self.waker.take()
    }
}

/// Bytes as the queue counts them (32 bits; more is `u32::MAX`).
fn budget(bytes: usize) -> u32 {
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

impl SessionQueue {
    pub fn new(max_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(QueueState::default()),
            max_bytes: AtomicU32::new(budget(max_bytes)),
            fired: AtomicBool::new(false),
            claimed: AtomicBool::new(false),
        })
    }

    /// Takes the queue for a session if no other holds it, reset for it (see the module
    /// docs); false when another session holds it.
    pub(crate) fn try_claim(&self, max_bytes: usize) -> bool {
        if self
            .claimed
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        let mut s = self.lock();
        let kill_waker = s.kill_waker.take();
        *s = QueueState {
            kill_waker,
            ..QueueState::default()
        };
        self.max_bytes.store(budget(max_bytes), Ordering::Relaxed);
        true
    }

    /// Gives the claim back (the `Subscription` that held the queue, once nothing can reach
    /// it); a fresh queue was never claimed and this changes nothing there.
    pub(crate) fn unclaim(&self) {
        self.claimed.store(false, Ordering::Release);
    }

    /// The kill switch: the first call counts (`Kill::cancel`).
    pub(crate) fn fire_kill(&self) {
        self.fired.store(true, Ordering::SeqCst);
        let waker = self.lock().kill_waker.take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    pub(crate) fn kill_fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// `Ready` once the kill fired; otherwise the waker is kept for `fire_kill`.
    pub(crate) fn poll_kill(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.kill_fired() {
            return Poll::Ready(());
        }
        {
            let mut s = self.lock();
            match &mut s.kill_waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
        }
        // Fired between the first check and the store: `fire_kill` may have found no waker.
        if self.kill_fired() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // A panic while holding this lock cannot leave the state inconsistent (each
        // critical section is a handful of field updates), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Enqueues without waiting. Returns false when the queue is (or just became) overflowed.
    pub fn push(&self, message: &Arc<Message>) -> bool {
        self.push_item(QueueItem::Message(message.clone()))
    }

    /// Enqueues any item without waiting; false when the queue is (or just became) overflowed.
    pub fn push_item(&self, item: QueueItem) -> bool {
        let weight = budget(item.weight());
        let mut s = self.lock();
        if s.ended.is_some() {
            return false;
        }
        // One message larger than the whole budget still goes through an empty queue;
        // otherwise a small queue setting would make big messages undeliverable.
        if s.bytes.saturating_add(weight) > self.max_bytes.load(Ordering::Relaxed)
            && !s.items.is_empty()
        {
            s.ended = Some(DisconnectReason::Slow);
            s.items = Items::default();
            s.bytes = 0;
            let waker = s.wake();
            let (own, other) = (s.own_kill, s.on_overflow.clone());
            drop(s);
            if let Some(waker) = waker {
                waker.wake();
            }
            if own {
                self.fire_kill();
            }
            if let Some(kill) = other {
                kill.cancel();
            }
            return false;
        }
        s.items.push(item);
        s.bytes = s.bytes.saturating_add(weight);
        // The writer takes everything at once, so only the empty → non-empty edge wakes it.
        let waker = if s.items.len() == 1 { s.wake() } else { None };
        drop(s);
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }

    /// Moves everything queued into `out`; `Err` once the session must end.
    pub fn drain_into(&self, out: &mut Vec<QueueItem>) -> Result<(), DisconnectReason> {
        let mut s = self.lock();
        if let Some(reason) = s.ended {
            return Err(reason);
        }
        match std::mem::take(&mut s.items) {
            Items::One(item) => out.push(item),
            Items::Many(mut items) => {
                out.extend(items.drain(..));
                // The list's room stays with the queue.
                s.items = Items::Many(items);
            }
        }
        s.bytes = 0;
        Ok(())
    }

    /// `drain_into` for a caller that keeps a `VecDeque`: an empty `out` trades places with
    /// the queue's list, so nothing is copied or allocated (a long poll's one-shot
    /// subscription allocated a batch list per poll for the one message it drains; issue 17).
    /// A lone queued item is returned instead when `out` is empty (it goes first), so that
    /// neither side allocates a list for it; otherwise everything is appended to `out`.
    pub fn swap_into(
        &self,
        out: &mut VecDeque<QueueItem>,
    ) -> Result<Option<QueueItem>, DisconnectReason> {
        let mut s = self.lock();
        if let Some(reason) = s.ended {
            return Err(reason);
        }
        s.bytes = 0;
        let lone = match &mut s.items {
            Items::One(_) => match std::mem::take(&mut s.items) {
                Items::One(item) if out.is_empty() => Some(item),
                Items::One(item) => {
                    out.push_back(item);
                    None
                }
                Items::Many(_) => None,
            },
            Items::Many(items) if out.is_empty() => {
                std::mem::swap(out, items);
                None
            }
            Items::Many(items) => {
                out.extend(items.drain(..));
                None
            }
        };
        Ok(lone)
    }

    /// Ends the session for `reason` (the first reason wins): what is queued is dropped, the
    /// writer wakes and says goodbye. Subscribers resume from their cursors.
    pub fn close(&self, reason: DisconnectReason) {
        let mut s = self.lock();
        if s.ended.is_some() {
            return;
        }
        s.ended = Some(reason);
        s.items = Items::default();
        s.bytes = 0;
        let waker = s.wake();
        drop(s);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Tells the writer that a reload took effect: it wakes, and `take_reload` says so once.
    pub fn signal_reload(&self) {
        let mut s = self.lock();
        s.reloaded = true;
        let waker = s.wake();
        drop(s);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Wakes the writer with nothing queued and no flag: a waiting long poll's deadline
    /// came (the server's one timer for all of them), and it checks its own clock.
    pub fn wake_writer(&self) {
        let waker = self.lock().wake();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Whether a reload took effect since the last call.
    pub fn take_reload(&self) -> bool {
        std::mem::take(&mut self.lock().reloaded)
    }

    /// From now on, `tick` (and no other) wakes the writer and `take_tick` says so.
    pub fn listen(&self, tick: Tick) {
        self.lock().listens = Some(tick);
    }

    /// A shared timer fired: a writer that listens to `tick` wakes; others are untouched.
    pub fn signal_tick(&self, tick: Tick) {
        let mut s = self.lock();
        if s.listens != Some(tick) {
            return;
        }
        s.ticked = true;
        let waker = s.wake();
        drop(s);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Whether the tick this session listens to came since the last call.
    pub fn take_tick(&self) -> bool {
        std::mem::take(&mut self.lock().ticked)
    }

    /// `Ready` once the session is cut short (`Slow` or `Shutdown`: what is queued goes
    /// unsent); otherwise the waker is kept, as by `poll_ready` (the same one: one consumer).
    /// Unlike `poll_ready`, it takes no wake: a writer checks this first and drains after.
    pub fn poll_cut(&self, cx: &mut Context<'_>) -> Poll<DisconnectReason> {
        let mut s = self.lock();
        if let Some(reason @ (DisconnectReason::Slow | DisconnectReason::Shutdown)) = s.ended {
            return Poll::Ready(reason);
        }
        match &mut s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// `Ready` once something was pushed (or the queue ended) since the last time it was;
    /// otherwise the waker is kept for the next push. One consumer: a second task polling
    /// takes the slot from the first.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.lock();
        if s.woken {
            s.woken = false;
            s.waker = None;
            return Poll::Ready(());
        }
        match &mut s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Resolves when something was pushed (or overflow happened) since the last drain.
    pub fn ready(&self) -> impl Future<Output = ()> + Send + '_ {
        std::future::poll_fn(|cx| self.poll_ready(cx))
    }

    /// Has an overflow fire `kill` (first call wins): this queue's own flag when `kill` is
    /// this queue (a session on its connection's queue), else the one held.
    pub fn set_on_overflow(&self, kill: Kill) {
        let mut s = self.lock();
        if s.own_kill || s.on_overflow.is_some() {
            return;
        }
        if std::ptr::eq(Arc::as_ptr(kill.queue()), self) {
            s.own_kill = true;
        } else {
            s.on_overflow = Some(kill);
        }
    }

    /// Whether the queue ended by overflowing (`Slow`).
    pub fn overflowed(&self) -> bool {
        self.lock().ended == Some(DisconnectReason::Slow)
    }

    /// The budget: more than this queued ends the session (`Slow`).
    pub fn max_bytes(&self) -> usize {
        self.max_bytes.load(Ordering::Relaxed) as usize
    }

    /// Bytes currently queued.
    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::ChannelName;
    use crate::message::{Data, Epoch, Position};
    use bytes::Bytes;

    fn msg(offset: u64, size: usize) -> Arc<Message> {
        Arc::new(Message::new(
            ChannelName::new("c").unwrap(),
            Position {
                epoch: Epoch::new("e").unwrap(),
                offset,
            },
            None,
            Data::Text(Bytes::from(vec![b'x'; size])),
            0,
        ))
    }

    #[test]
    fn an_overflow_fires_the_kill_switch_the_queue_holds_and_says_so() {
        let q = SessionQueue::new(1024);
        let kill = Kill::new();
        q.set_on_overflow(kill.clone());
        assert!(q.push(&msg(1, 800)));
        assert!(!kill.is_cancelled());
        assert!(!q.overflowed());
        assert!(!q.push(&msg(2, 800)));
        assert!(kill.is_cancelled());
        assert!(q.overflowed());
    }

    #[test]
    fn a_queue_closed_for_another_reason_did_not_overflow() {
        let q = SessionQueue::new(1024);
        let kill = Kill::new();
        q.set_on_overflow(kill.clone());
        q.close(DisconnectReason::Shutdown);
        assert!(!q.overflowed());
        assert!(!kill.is_cancelled());
    }

    /// Every connection allocates one at accept (its kill switch, claimed by its sessions in
    /// turn): the queue, the kill's flag and its waiter's slot in one allocation, where the
    /// kill switch was an allocation of its own (48 bytes) beside a 96-byte queue per
    /// session. Today 104 bytes (an `ArcInner` of 120: malloc's 128-byte class; 112 was the
    /// next one up).
    #[test]
    fn a_session_queue_stays_small() {
        let size = std::mem::size_of::<SessionQueue>();
        eprintln!("a session queue: {size} bytes");
        assert!(size <= 104, "a session queue is {size} bytes (bound 104)");
    }

    #[test]
    fn an_overflow_on_the_connection_s_own_queue_fires_its_kill_switch() {
        let kill = Kill::new();
        let q = kill.claim(1024);
        assert!(Arc::ptr_eq(&q, kill.queue()));
        q.set_on_overflow(kill.clone());
        assert!(q.push(&msg(1, 800)));
        assert!(!kill.is_cancelled());
        assert!(!q.push(&msg(2, 800)));
        assert!(kill.is_cancelled());
        assert!(q.overflowed());
    }

    #[test]
    fn a_claimed_queue_goes_to_the_next_session_reset_and_a_second_session_gets_its_own() {
        let kill = Kill::new();
        let first = kill.claim(1024);
        assert!(first.push(&msg(1, 10)));
        first.listen(Tick::Heartbeat);
        first.close(DisconnectReason::Shutdown);
        // Meanwhile a second session (an overlap): a queue of its own, whose overflow
        // fires the connection's kill switch.
        let second = kill.claim(1024);
        assert!(!Arc::ptr_eq(&first, &second));
        second.set_on_overflow(kill.clone());
        assert!(second.push(&msg(1, 800)));
        assert!(!second.push(&msg(2, 800)));
        assert!(kill.is_cancelled());
        first.unclaim();
        drop(first);
        // The next one gets the connection's queue back, empty and open; the kill stays.
        let third = kill.claim(2048);
        assert!(Arc::ptr_eq(&third, kill.queue()));
        assert_eq!(third.queued_bytes(), 0);
        assert_eq!(third.max_bytes(), 2048);
        assert!(!third.overflowed());
        assert!(third.push(&msg(3, 10)));
        let mut out = Vec::new();
        assert!(third.drain_into(&mut out).is_ok());
        assert_eq!(out.len(), 1);
        third.signal_tick(Tick::Heartbeat);
        assert!(!third.take_tick(), "the last session's tick stays with it");
        assert!(kill.is_cancelled());
    }

    #[tokio::test]
    async fn a_push_wakes_the_writer_and_drain_takes_everything_in_order() {
        let q = SessionQueue::new(1 << 20);
        assert!(q.push(&msg(1, 10)));
        assert!(q.push(&msg(2, 10)));
        q.ready().await;
        let mut out = Vec::new();
        assert!(q.drain_into(&mut out).is_ok());
        let offsets: Vec<u64> = out
            .iter()
            .map(|i| match i {
                QueueItem::Message(m) => m.offset,
                QueueItem::Presence(_) => 0,
            })
            .collect();
        assert_eq!(offsets, vec![1, 2]);
        assert_eq!(q.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn swapping_takes_everything_in_order_and_leaves_the_queue_working() {
        let q = SessionQueue::new(1 << 20);
        let mut out = VecDeque::new();
        for round in 0..3u64 {
            assert!(q.push(&msg(2 * round + 1, 10)));
            assert!(q.push(&msg(2 * round + 2, 10)));
            q.ready().await;
            assert!(q.swap_into(&mut out).is_ok());
            let offsets: Vec<u64> = out
                .drain(..)
                .map(|i| match i {
                    QueueItem::Message(m) => m.offset,
                    QueueItem::Presence(_) => 0,
                })
                .collect();
            assert_eq!(offsets, vec![2 * round + 1, 2 * round + 2]);
            assert_eq!(q.queued_bytes(), 0);
        }
    }

    fn offsets(items: impl IntoIterator<Item = QueueItem>) -> Vec<u64> {
        items
            .into_iter()
            .map(|i| match i {
                QueueItem::Message(m) => m.offset,
                QueueItem::Presence(_) => 0,
            })
            .collect()
    }

    #[test]
    fn a_lone_item_comes_back_apart_and_a_second_one_joins_it_in_order() {
        let q = SessionQueue::new(1 << 20);
        let mut out = VecDeque::new();
        // One at a time: handed back on its own, no list on either side.
        for offset in 1..=3 {
            assert!(q.push(&msg(offset, 10)));
            let lone = q.swap_into(&mut out).unwrap();
            assert_eq!(offsets(lone), vec![offset]);
            assert!(out.is_empty() && out.capacity() == 0);
            assert_eq!(q.queued_bytes(), 0);
        }
        // A second push moves the inline one into a list, first.
        for offset in [4, 5, 6] {
            assert!(q.push(&msg(offset, 10)));
        }
        assert!(q.swap_into(&mut out).unwrap().is_none());
        assert_eq!(offsets(out.drain(..)), vec![4, 5, 6]);
        // Into a list that already holds something, a lone item is appended after it.
        out.push_back(QueueItem::Message(msg(7, 10)));
        assert!(q.push(&msg(8, 10)));
        assert!(q.swap_into(&mut out).unwrap().is_none());
        assert_eq!(offsets(out.drain(..)), vec![7, 8]);
        // `drain_into` takes a lone one too; an overflow drops it.
        assert!(q.push(&msg(9, 10)));
        let mut all = Vec::new();
        assert!(q.drain_into(&mut all).is_ok());
        assert_eq!(offsets(all), vec![9]);
        let small = SessionQueue::new(100);
        assert!(small.push(&msg(1, 90)));
        assert!(!small.push(&msg(2, 90)));
        assert!(matches!(
            small.swap_into(&mut out),
            Err(DisconnectReason::Slow)
        ));
    }

    #[tokio::test]
    async fn a_push_while_nobody_waits_is_kept_for_the_next_wait() {
        let q = SessionQueue::new(1 << 20);
        // A wait that gave up (another branch of a `select!` won) before the push.
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(q.poll_ready(&mut cx).is_pending());
        assert!(q.push(&msg(1, 10)));
        // The next wait sees it at once, and only once.
        q.ready().await;
        assert!(q.poll_ready(&mut cx).is_pending());
        assert!(q.push(&msg(2, 10)), "not the empty edge: no second wake");
        assert!(q.poll_ready(&mut cx).is_pending());
        let mut out = Vec::new();
        assert!(q.drain_into(&mut out).is_ok());
        assert_eq!(out.len(), 2);
    }

    #[tokio::test]
    async fn a_waiting_writer_is_woken_by_a_push_from_another_task() {
        let q = SessionQueue::new(1 << 20);
        let waiting = tokio::spawn({
            let q = q.clone();
            async move { q.ready().await }
        });
        // Yield until the waiter has registered its waker; the push then wakes it.
        tokio::task::yield_now().await;
        assert!(q.push(&msg(1, 10)));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the writer was woken")
            .expect("the writer's task ran");
    }

    #[tokio::test]
    async fn an_overflow_or_a_shutdown_cuts_the_session_and_other_ends_do_not() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let slow = SessionQueue::new(100);
        assert!(slow.poll_cut(&mut cx).is_pending());
        assert!(slow.push(&msg(1, 10)));
        assert!(slow.poll_cut(&mut cx).is_pending(), "a push is not a cut");
        assert!(!slow.push(&msg(2, 1000)));
        assert_eq!(slow.poll_cut(&mut cx), Poll::Ready(DisconnectReason::Slow));
        // The cut took no wake: the writer's drain still runs and says why.
        slow.ready().await;
        let shut = SessionQueue::new(100);
        shut.close(DisconnectReason::Shutdown);
        assert_eq!(
            shut.poll_cut(&mut cx),
            Poll::Ready(DisconnectReason::Shutdown)
        );
        let broker = SessionQueue::new(100);
        broker.close(DisconnectReason::BrokerUnavailable);
        assert!(broker.poll_cut(&mut cx).is_pending(), "drained, then ended");
        broker.ready().await;
    }

    #[test]
    fn overflow_marks_the_queue_and_refuses_further_pushes_without_blocking() {
        let q = SessionQueue::new(1000);
        let mut pushed = 0;
        while q.push(&msg(pushed + 1, 200)) {
            pushed += 1;
        }
        assert!((1..10).contains(&pushed));
        assert!(!q.push(&msg(99, 1)));
        let mut out = Vec::new();
        assert_eq!(q.drain_into(&mut out), Err(DisconnectReason::Slow));
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn closing_wakes_the_writer_with_the_reason_and_refuses_pushes() {
        let q = SessionQueue::new(1 << 20);
        assert!(q.push(&msg(1, 10)));
        q.close(DisconnectReason::BrokerUnavailable);
        q.close(DisconnectReason::Shutdown);
        q.ready().await;
        let mut out = Vec::new();
        assert_eq!(
            q.drain_into(&mut out),
            Err(DisconnectReason::BrokerUnavailable)
        );
        assert!(!q.push(&msg(2, 10)));
    }

    #[tokio::test]
    async fn a_tick_wakes_only_a_writer_that_listens_to_it_and_is_taken_once() {
        let q = SessionQueue::new(1 << 20);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        q.signal_tick(Tick::Heartbeat);
        assert!(q.poll_ready(&mut cx).is_pending(), "not listening yet");
        assert!(!q.take_tick());
        q.listen(Tick::Heartbeat);
        q.signal_tick(Tick::Ping);
        assert!(q.poll_ready(&mut cx).is_pending(), "another tick");
        q.signal_tick(Tick::Heartbeat);
        q.ready().await;
        assert!(q.take_tick());
        assert!(!q.take_tick(), "once");
        let mut out = Vec::new();
        assert_eq!(q.drain_into(&mut out), Ok(()));
        assert!(out.is_empty(), "a tick queues nothing");
    }

    #[test]
    fn one_message_bigger_than_the_budget_passes_an_empty_queue() {
        let q = SessionQueue::new(100);
        assert!(q.push(&msg(1, 10_000)));
        assert!(!q.push(&msg(2, 10)));
    }
}
