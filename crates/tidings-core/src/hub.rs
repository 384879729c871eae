//! The hub: which local sessions follow which channel, and the fan-out to them.
//!
//! Concurrency: the registry is sharded by channel (std `Mutex`, never held across an
//! `.await`). A broker calls `deliver` once per message, per channel in offset order (the
//! memory broker while holding its channel lock, a remote broker from its single reader), so
//! each queue sees a channel's messages in order. `deliver` only pushes an `Arc` per
//! subscriber into bounded queues: it never waits for a subscriber.
//!
//! The hub also reaches every persistent session at once (`Hub::watch`): a shutdown closes
//! each one's queue with `Shutdown`, a reload sets a flag in each and wakes it, in one pass.
//! A parked session then waits on its queue alone, not on a shutdown token and a reload
//! watch of its own (~160 bytes of waiters in every session's future). Race-free with a
//! session registering during the pass: `closing` is set before the pass takes any shard
//! lock, and a registration checks it under the shard lock after inserting.
//!
//! The node's timer sleeps while no session is watched (`Hub::until_watched`): `watching`
//! counts the watched sessions (changed under the shard lock, with the insert or remove that
//! changes the map), and the session that takes it from 0 to 1 leaves a permit in
//! `first_watch` (`Notify::notify_one`), so a timer that saw 0 and then waits cannot miss it.
//!
//! A held long poll can be answered from the publishing side instead (`Held`, issue 17):
//! its entry in the channel's list carries a hook beside its queue, set under the channel's
//! lock and only while the queue is empty (the queue's lock taken inside the channel's, the
//! order `deliver` uses). `deliver` offers the message to the hook in place of the push, and
//! takes the hook out as it does: answered or declined, a hook is used once. So each
//! message is either answered by the hook or queued, never both and never neither, and
//! `release` (under the same lock) tells the poll's own task for certain whether a message
//! went to the hook.
//!
//! Heartbeats and pings reach them the same way (`Hub::tick_part`): the caller's one timer
//! per node visits one of the `TICK_PARTS` parts of the watched sessions every
//! 1/`TICK_PARTS` of the interval, so each session is visited once per interval and only
//! those listening to that tick wake (`SessionQueue::listen`). Its first beat comes within
//! one interval of its start, then one every interval. Spread over parts, a node's beats
//! are not one burst of a write per stream (a million at once, where each delivery due at
//! that moment waited behind them), and a benchmark's window sees its share of them. The
//! parts are many and small (512, each its own map): a part's wakes and writes run back to
//! back on the runtime, and a delivery due then waits behind all of them. With 32 parts,
//! 10,000 streams made bursts of ~310 keep-alives every 470 ms, and the slow 1 % of
//! channels-5k-sse's deliveries waited behind them (p99 2.3x Nchan's; docs/benchmarks.md,
//! session 9).

use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::channel::ChannelName;
use crate::message::Message;
use crate::presence::PresenceEvent;
use crate::queue::{QueueItem, SessionQueue, Tick};
use crate::shards::Shards;

type Subscribers = Mutex<Local>;

/// How many parts `Hub::tick_part` splits the watched sessions into (one per shard of the
/// session registry, by id): at 15 s, a part every ~29 ms. An empty part costs a lock and a
/// look; the registry's maps are ~40 bytes each while empty.
pub const TICK_PARTS: usize = 512;

/// A held poll that can answer a message itself, from the publishing side (`Hub::hold`):
/// the core knows no socket; the transport's hook writes the answer where it can.
pub trait Held: Send + Sync {
    /// Answers the poll with `message` now if it can: `true` when it did (the message is
    /// then not queued for the session), `false` to have it queued as without a hook.
    /// Called at most once per hook, under the channel's lock: it must not wait (a socket
    /// that takes nothing now is a `false`) nor call back into the hub.
    fn answer(&self, message: &Arc<Message>) -> bool;
}

/// One local subscriber of a channel: its session's queue, and the hook of a held poll.
struct Member {
    id: u64,
    queue: Arc<SessionQueue>,
    held: Option<Arc<dyn Held>>,
}

/// A channel's local subscribers: a list to fan out over, and — once the list is long —
/// where each one sits in it, so a session leaves in O(1). (A scan made every long poll's
/// re-registration cost O(n): a message to 10,000 pollers then cost 10,000 × 5,000
/// comparisons.) A short list is scanned: most channels have a few subscribers, and a
/// channel a long poll joins alone is created and dropped on every round trip, where the
/// index map was one more allocation each time (issue 17).
#[derive(Default)]
struct Local {
    list: Vec<Member>,
    /// Empty while the list is at most `SCAN` long.
    at: foldhash::HashMap<u64, usize>,
}

/// Lists up to this long are scanned instead of indexed.
const SCAN: usize = 16;

impl Local {
    fn push(&mut self, id: u64, queue: Arc<SessionQueue>) {
        self.list.push(Member {
            id,
            queue,
            held: None,
        });
        if self.list.len() > SCAN {
            if self.at.is_empty() {
                self.at
                    .extend(self.list.iter().enumerate().map(|(i, e)| (e.id, i)));
            } else {
                self.at.insert(id, self.list.len() - 1);
            }
        }
    }

    fn find(&self, id: u64) -> Option<usize> {
        if self.at.is_empty() {
            self.list.iter().position(|e| e.id == id)
        } else {
            self.at.get(&id).copied()
        }
    }

    fn remove(&mut self, id: u64) {
        let found = if self.at.is_empty() {
            self.list.iter().position(|e| e.id == id)
        } else {
            self.at.remove(&id)
        };
        let Some(i) = found else {
            return;
        };
        self.list.swap_remove(i);
        if self.at.is_empty() {
            return;
        }
        if self.list.len() <= SCAN {
            // Back to scanning; the map's memory goes with it.
            self.at = foldhash::HashMap::default();
        } else if let Some(moved) = self.list.get(i) {
            self.at.insert(moved.id, i);
        }
    }

    fn queues(&self) -> impl Iterator<Item = &Arc<SessionQueue>> {
        self.list.iter().map(|e| &e.queue)
    }
}

pub struct Hub {
    shards: Shards<Arc<Subscribers>>,
    /// The sessions that follow shutdown and reloads (`watch`), by id, sharded by id.
    sessions: Vec<Mutex<foldhash::HashMap<u64, Arc<SessionQueue>>>>,
    /// Set once by `close_sessions`: a session registering later is closed at once.
    closing: std::sync::atomic::AtomicBool,
    /// How many sessions `sessions` holds; the timer's wake when it leaves 0.
    watching: std::sync::atomic::AtomicUsize,
    first_watch: tokio::sync::Notify,
    /// Emptied channel entries kept for the next channel to get its first subscriber: a
    /// long poll alone on its channel empties and re-creates the entry on every round trip,
    /// two allocations each time (issue 17). At most `SPARES`, each with a short list only.
    /// Lock order: a shard, then this.
    spare: Mutex<Vec<Arc<Subscribers>>>,
    /// Messages answered by held polls' hooks (`hold`) since the start: one count per
    /// delivery, added once per `deliver`.
    held_answers: std::sync::atomic::AtomicU64,
}

const SPARES: usize = 32;

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections here are plain collection updates; a poisoned lock holds valid data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    pub fn new() -> Self {
        Self {
            shards: Shards::new(),
            sessions: (0..TICK_PARTS).map(|_| Mutex::default()).collect(),
            closing: std::sync::atomic::AtomicBool::new(false),
            watching: std::sync::atomic::AtomicUsize::new(0),
            first_watch: tokio::sync::Notify::new(),
            spare: Mutex::new(Vec::with_capacity(SPARES)),
            held_answers: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Adds a session's queue to a channel. Returns true when it is the channel's first
    /// local subscriber (the node must then subscribe to the channel at the broker).
    pub fn add(&self, channel: &ChannelName, id: u64, queue: Arc<SessionQueue>) -> bool {
        let mut shard = relock(self.shards.of(channel));
        match shard.entry(channel.clone()) {
            Entry::Occupied(e) => {
                relock(e.get()).push(id, queue);
                false
            }
            Entry::Vacant(e) => {
                let subs = relock(&self.spare).pop().unwrap_or_default();
                relock(&subs).push(id, queue);
                e.insert(subs);
                true
            }
        }
    }

    /// Removes a session from a channel. Returns true when it was the last local subscriber.
    pub fn remove(&self, channel: &ChannelName, id: u64) -> bool {
        let mut shard = relock(self.shards.of(channel));
        let Some(subs) = shard.get(channel) else {
            return false;
        };
        let now_empty = {
            let mut local = relock(subs);
            local.remove(id);
            local.list.is_empty()
        };
        if now_empty && let Some(subs) = shard.remove(channel) {
            self.keep_spare(subs);
        }
        now_empty
    }

    /// Keeps an emptied entry for reuse if nobody else holds it (a delivery clones it under
    /// the shard lock, which the caller holds) and its list is short.
    fn keep_spare(&self, subs: Arc<Subscribers>) {
        if Arc::strong_count(&subs) != 1 || relock(&subs).list.capacity() > SCAN {
            return;
        }
        let mut spare = relock(&self.spare);
        if spare.len() < SPARES {
            spare.push(subs);
        }
    }

    /// Pushes a message to every local subscriber of its channel, or has a held poll's hook
    /// answer it (`hold`); returns how many took it.
    pub fn deliver(&self, message: &Arc<Message>) -> usize {
        let subs = match relock(self.shards.of(&message.channel)).get(&message.channel) {
            Some(s) => s.clone(),
            None => return 0,
        };
        let mut local = relock(&subs);
        let (mut took, mut answered) = (0, 0);
        for e in &mut local.list {
            // Used once, answered or not: a poll answers one message, and one that declined
            // has its queue to sort out what follows.
            if let Some(held) = e.held.take()
                && held.answer(message)
            {
                answered += 1;
                continue;
            }
            took += usize::from(e.queue.push(message));
        }
        if answered > 0 {
            self.held_answers
                .fetch_add(answered as u64, std::sync::atomic::Ordering::Relaxed);
        }
        took + answered
    }

    /// How many deliveries held polls' hooks answered (`hold`) since the start.
    pub fn held_answers(&self) -> u64 {
        self.held_answers.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets a held poll's hook on its entry in `channel`'s list, if its queue is empty (the
    /// queue's lock inside the channel's, as in `deliver`): the channel's next message goes
    /// to the hook first. False when nothing was set (something is queued, or the session
    /// does not follow `channel`).
    pub fn hold(&self, channel: &ChannelName, id: u64, hook: Arc<dyn Held>) -> bool {
        let Some(subs) = relock(self.shards.of(channel)).get(channel).cloned() else {
            return false;
        };
        let mut local = relock(&subs);
        let Some(e) = local.find(id).and_then(|i| local.list.get_mut(i)) else {
            return false;
        };
        // A message weighs at least its envelope's overhead: nothing queued means 0 bytes.
        if e.queue.queued_bytes() != 0 {
            return false;
        }
        e.held = Some(hook);
        true
    }

    /// Takes a held poll's hook back; `true` when it was still set, so no message went to
    /// it and none will (a delivery in progress holds the channel's lock).
    pub fn release(&self, channel: &ChannelName, id: u64) -> bool {
        let Some(subs) = relock(self.shards.of(channel)).get(channel).cloned() else {
            return false;
        };
        let mut local = relock(&subs);
        local
            .find(id)
            .and_then(|i| local.list.get_mut(i))
            .and_then(|e| e.held.take())
            .is_some()
    }

    /// Pushes a join or leave to every local subscriber of its channel.
    pub fn deliver_presence(&self, event: &Arc<PresenceEvent>) {
        let subs = match relock(self.shards.of(&event.channel)).get(&event.channel) {
            Some(s) => s.clone(),
            None => return,
        };
        for q in relock(&subs).queues() {
            q.push_item(QueueItem::Presence(event.clone()));
        }
    }

    /// Ends every local session (say, the broker became unreachable): each writer sends its
    /// goodbye with `reason` and closes; clients resume from their cursors.
    pub fn disconnect_all(&self, reason: crate::disconnect::DisconnectReason) {
        for shard in self.shards.all() {
            let subs: Vec<_> = relock(shard).values().cloned().collect();
            for s in subs {
                for q in relock(&s).queues() {
                    q.close(reason);
                }
            }
        }
    }

    fn sessions_of(&self, id: u64) -> &Mutex<foldhash::HashMap<u64, Arc<SessionQueue>>> {
        &self.sessions[(id as usize) % self.sessions.len()]
    }

    /// Registers a session for `close_sessions` and `reload_sessions`; one that registers
    /// after `close_sessions` is closed at once.
    pub fn watch(&self, id: u64, queue: &Arc<SessionQueue>) {
        let mut sessions = relock(self.sessions_of(id));
        if sessions.insert(id, queue.clone()).is_none()
            && self
                .watching
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                == 0
        {
            self.first_watch.notify_one();
        }
        if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            queue.close(crate::disconnect::DisconnectReason::Shutdown);
        }
    }

    pub fn unwatch(&self, id: u64) {
        if relock(self.sessions_of(id)).remove(&id).is_some() {
            self.watching
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Resolves once at least one session is watched (at once if one is): the node's tick
    /// timer waits here instead of visiting empty parts (~55 wakes a second for nothing).
    pub async fn until_watched(&self) {
        while self.watching.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            self.first_watch.notified().await;
        }
    }

    /// Shutdown: every watched session (and every one that registers from now on) ends
    /// with `Shutdown`, saying goodbye; its clients resume from their cursors.
    pub fn close_sessions(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for shard in &self.sessions {
            for q in relock(shard).values() {
                q.close(crate::disconnect::DisconnectReason::Shutdown);
            }
        }
    }

    /// A reload took effect: every watched session wakes and re-checks what it follows.
    pub fn reload_sessions(&self) {
        for shard in &self.sessions {
            for q in relock(shard).values() {
                q.signal_reload();
            }
        }
    }

    /// A shared timer fired for one part of the sessions (`part` modulo `TICK_PARTS`):
    /// every watched session of it listening to `tick` wakes (its heartbeat or ping is
    /// due). A session is always in the same part, so visiting the parts in turn reaches
    /// each once per round.
    pub fn tick_part(&self, tick: Tick, part: usize) {
        for q in relock(&self.sessions[part % self.sessions.len()]).values() {
            q.signal_tick(tick);
        }
    }

    /// How many sessions are watched.
    pub fn watched(&self) -> usize {
        self.watching.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many of `channel`'s subscribers are held polls with a hook set (`hold`).
    pub fn held_count(&self, channel: &ChannelName) -> usize {
        relock(self.shards.of(channel)).get(channel).map_or(0, |s| {
            relock(s).list.iter().filter(|e| e.held.is_some()).count()
        })
    }

    pub fn subscriber_count(&self, channel: &ChannelName) -> usize {
        relock(self.shards.of(channel))
            .get(channel)
            .map_or(0, |s| relock(s).list.len())
    }

    /// At most `max` channels with local subscribers.
    pub fn channel_sample(&self, max: usize) -> Vec<ChannelName> {
        let mut names = Vec::new();
        for shard in self.shards.all() {
            if names.len() >= max {
                break;
            }
            names.extend(relock(shard).keys().take(max - names.len()).cloned());
        }
        names
    }

    /// Channels with at least one local subscriber.
    pub fn channels(&self) -> Vec<ChannelName> {
        self.shards
            .all()
            .flat_map(|s| relock(s).keys().cloned().collect::<Vec<_>>())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use bytes::Bytes;

    use super::*;
    use crate::message::{Data, Epoch, Position};

    fn message(channel: &ChannelName) -> Arc<Message> {
        let position = Position {
            epoch: Epoch::new("e1").unwrap(),
            offset: 1,
        };
        let data = Data::Text(Bytes::from_static(b"x"));
        Arc::new(Message::new(channel.clone(), position, None, data, 0))
    }

    fn message_at(channel: &ChannelName, offset: u64) -> Arc<Message> {
        let position = Position {
            epoch: Epoch::new("e1").unwrap(),
            offset,
        };
        let data = Data::Text(Bytes::from_static(b"x"));
        Arc::new(Message::new(channel.clone(), position, None, data, 0))
    }

    /// A hook that answers (or declines) and remembers what it answered.
    struct Hook {
        accept: bool,
        answered: Mutex<Vec<u64>>,
    }

    impl Hook {
        fn new(accept: bool) -> Arc<Self> {
            Arc::new(Self {
                accept,
                answered: Mutex::new(Vec::new()),
            })
        }

        fn answered(&self) -> Vec<u64> {
            self.answered.lock().unwrap().clone()
        }
    }

    impl Held for Hook {
        fn answer(&self, message: &Arc<Message>) -> bool {
            if self.accept {
                self.answered.lock().unwrap().push(message.offset);
            }
            self.accept
        }
    }

    fn queued(q: &SessionQueue) -> Vec<u64> {
        let mut items = Vec::new();
        let _ = q.drain_into(&mut items);
        items
            .into_iter()
            .filter_map(|i| match i {
                QueueItem::Message(m) => Some(m.offset),
                QueueItem::Presence(_) => None,
            })
            .collect()
    }

    #[test]
    fn a_held_poll_s_hook_answers_one_message_and_its_queue_takes_the_rest() {
        let hub = Hub::new();
        let c = ChannelName::new("c").unwrap();
        let (q, other) = (SessionQueue::new(1 << 20), SessionQueue::new(1 << 20));
        hub.add(&c, 1, q.clone());
        hub.add(&c, 2, other.clone());
        assert!(!hub.hold(&c, 9, Hook::new(true)), "no such session");
        assert!(!hub.hold(&ChannelName::new("elsewhere").unwrap(), 1, Hook::new(true)));
        let hook = Hook::new(true);
        assert!(hub.hold(&c, 1, hook.clone()));
        assert_eq!(hub.deliver(&message_at(&c, 1)), 2);
        assert_eq!(hub.deliver(&message_at(&c, 2)), 2);
        assert_eq!(hook.answered(), [1], "answered once, then spent");
        assert_eq!(hub.held_answers(), 1);
        assert!(!hub.release(&c, 1), "used: nothing to take back");
        assert!(!hub.hold(&c, 1, Hook::new(true)), "something is queued");
        assert_eq!(queued(&q), [2]);
        assert_eq!(queued(&other), [1, 2]);

        // A hook taken back before any message never sees one.
        let unused = Hook::new(true);
        assert!(hub.hold(&c, 1, unused.clone()));
        assert!(hub.release(&c, 1));
        assert!(!hub.release(&c, 1));
        hub.deliver(&message_at(&c, 3));
        assert!(unused.answered().is_empty());
        assert_eq!(queued(&q), [3]);

        // One that declines is spent too, and the message is queued as without it.
        let declines = Hook::new(false);
        assert!(hub.hold(&c, 1, declines.clone()));
        hub.deliver(&message_at(&c, 4));
        assert!(!hub.release(&c, 1));
        hub.deliver(&message_at(&c, 5));
        assert_eq!(queued(&q), [4, 5]);

        // Leaving takes the hook with the entry.
        let left = Hook::new(true);
        assert!(hub.hold(&c, 1, left.clone()));
        hub.remove(&c, 1);
        hub.deliver(&message_at(&c, 6));
        assert!(left.answered().is_empty());
        assert_eq!(
            Arc::strong_count(&left),
            1,
            "the hub keeps no hook of a session gone"
        );
    }

    #[test]
    // Plain threads, no runtime: tokio's paused clock has nothing to do with their deadline.
    #[allow(clippy::disallowed_types)]
    fn every_message_reaches_a_held_poller_exactly_once_while_hooks_come_and_go() {
        const POLLERS: u64 = 4;
        const MESSAGES: u64 = 3000;
        let hub = Arc::new(Hub::new());
        let c = ChannelName::new("c").unwrap();
        // Enough subscribers for the indexed list, the pollers among them.
        let bystanders: Vec<_> = (0..SCAN as u64)
            .map(|id| {
                let q = SessionQueue::new(1 << 20);
                hub.add(&c, 1000 + id, q.clone());
                q
            })
            .collect();
        let queues: Vec<_> = (0..POLLERS)
            .map(|id| {
                let q = SessionQueue::new(1 << 20);
                hub.add(&c, id, q.clone());
                q
            })
            .collect();
        let pollers: Vec<_> = queues
            .iter()
            .enumerate()
            .map(|(id, q)| {
                let (hub, c, q) = (hub.clone(), c.clone(), q.clone());
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    let mut hooks = 0;
                    // Until everything came (a lost message fails at the deadline instead).
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                    while got.len() < MESSAGES as usize && std::time::Instant::now() < deadline {
                        got.extend(queued(&q));
                        let hook = Hook::new(true);
                        if hub.hold(&c, id as u64, hook.clone()) {
                            hooks += 1;
                        }
                        std::thread::yield_now();
                        hub.release(&c, id as u64);
                        let answered = hook.answered();
                        assert!(answered.len() <= 1, "a hook answers one message");
                        got.extend(answered);
                    }
                    got.extend(queued(&q));
                    (got, hooks)
                })
            })
            .collect();
        for offset in 1..=MESSAGES {
            hub.deliver(&message_at(&c, offset));
        }
        let expected: Vec<u64> = (1..=MESSAGES).collect();
        for p in pollers {
            let (mut got, hooks) = p.join().unwrap();
            assert!(hooks > 0, "the poller held at least once");
            got.sort_unstable();
            assert_eq!(got, expected, "each message once: answered or queued");
        }
        for q in &bystanders {
            assert_eq!(queued(q), expected);
        }
    }

    #[test]
    fn sessions_leave_in_any_order_and_the_rest_keep_receiving() {
        let hub = Hub::new();
        let c = ChannelName::new("c").unwrap();
        let queues: Vec<_> = (0..6).map(|_| SessionQueue::new(1 << 20)).collect();
        for (id, q) in queues.iter().enumerate() {
            assert_eq!(
                hub.add(&c, id as u64, q.clone()),
                id == 0,
                "first subscriber"
            );
        }
        // The first, the last and one in the middle; an unknown id changes nothing.
        for id in [0, 5, 2, 99] {
            assert!(!hub.remove(&c, id));
        }
        assert_eq!(hub.subscriber_count(&c), 3);
        assert_eq!(hub.deliver(&message(&c)), 3);
        let mut got = Vec::new();
        for (id, q) in queues.iter().enumerate() {
            let mut items = Vec::new();
            let _ = q.drain_into(&mut items);
            if !items.is_empty() {
                got.push(id);
            }
        }
        assert_eq!(got, [1, 3, 4]);
        assert!(!hub.remove(&c, 3));
        assert!(!hub.remove(&c, 1));
        assert!(hub.remove(&c, 4), "the last one out empties the channel");
        assert_eq!(hub.subscriber_count(&c), 0);
        assert_eq!(hub.deliver(&message(&c)), 0);
    }

    #[test]
    fn a_channel_emptied_and_joined_again_starts_fresh() {
        let hub = Hub::new();
        let (a, b) = (
            ChannelName::new("a").unwrap(),
            ChannelName::new("b").unwrap(),
        );
        let q = SessionQueue::new(1 << 20);
        for round in 0..3 {
            // The entry `a` leaves behind may be the one `b` gets: it must come empty.
            assert!(hub.add(&a, round, q.clone()), "first subscriber of a");
            assert!(hub.remove(&a, round));
            assert!(hub.add(&b, 100 + round, q.clone()), "first subscriber of b");
            assert_eq!(hub.subscriber_count(&b), 1);
            assert_eq!(hub.subscriber_count(&a), 0);
            assert_eq!(hub.deliver(&message(&b)), 1);
            assert_eq!(hub.deliver(&message(&a)), 0);
            assert!(hub.remove(&b, 100 + round));
        }
    }

    #[test]
    fn a_shutdown_closes_every_watched_session_and_every_one_that_comes_later() {
        let hub = Hub::new();
        let early: Vec<_> = (0..40).map(|_| SessionQueue::new(1 << 20)).collect();
        for (id, q) in early.iter().enumerate() {
            hub.watch(id as u64, q);
        }
        let unwatched = SessionQueue::new(1 << 20);
        hub.watch(1000, &unwatched);
        hub.watch(1000, &unwatched);
        hub.unwatch(1000);
        hub.unwatch(1000);
        assert_eq!(hub.watched(), 40);
        assert_eq!(
            hub.sessions.iter().map(|s| relock(s).len()).sum::<usize>(),
            40
        );
        hub.reload_sessions();
        assert!(early.iter().all(|q| q.take_reload() && !q.take_reload()));
        assert!(!unwatched.take_reload());
        hub.close_sessions();
        let late = SessionQueue::new(1 << 20);
        hub.watch(99, &late);
        let mut out = Vec::new();
        for q in early.iter().chain([&late]) {
            assert_eq!(
                q.drain_into(&mut out),
                Err(crate::disconnect::DisconnectReason::Shutdown)
            );
        }
        assert_eq!(unwatched.drain_into(&mut out), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_timer_s_wait_ends_with_the_first_watched_session_and_not_before() {
        let hub = Arc::new(Hub::new());
        let hour = std::time::Duration::from_secs(3600);
        assert!(
            tokio::time::timeout(hour, hub.until_watched())
                .await
                .is_err()
        );
        let waiting = tokio::spawn({
            let hub = hub.clone();
            async move { hub.until_watched().await }
        });
        tokio::task::yield_now().await;
        let q = SessionQueue::new(1 << 20);
        hub.watch(1, &q);
        assert!(waiting.await.is_ok());
        hub.until_watched().await;
        hub.unwatch(1);
        assert!(
            tokio::time::timeout(hour, hub.until_watched())
                .await
                .is_err()
        );
        // Watched and gone again before the timer looked: it waits on.
        hub.watch(2, &q);
        hub.unwatch(2);
        assert!(
            tokio::time::timeout(hour, hub.until_watched())
                .await
                .is_err()
        );
    }

    #[test]
    fn a_tick_reaches_every_watched_session_listening_to_it_and_no_other() {
        let hub = Hub::new();
        let beats: Vec<_> = (0..40).map(|_| SessionQueue::new(1 << 20)).collect();
        let pings: Vec<_> = (0..3).map(|_| SessionQueue::new(1 << 20)).collect();
        for (id, q) in beats.iter().enumerate() {
            q.listen(Tick::Heartbeat);
            hub.watch(id as u64, q);
        }
        for (id, q) in pings.iter().enumerate() {
            q.listen(Tick::Ping);
            hub.watch(100 + id as u64, q);
        }
        let gone = SessionQueue::new(1 << 20);
        gone.listen(Tick::Heartbeat);
        hub.watch(1000, &gone);
        hub.unwatch(1000);
        (0..TICK_PARTS).for_each(|part| hub.tick_part(Tick::Heartbeat, part));
        assert!(beats.iter().all(|q| q.take_tick() && !q.take_tick()));
        assert!(pings.iter().all(|q| !q.take_tick()));
        assert!(!gone.take_tick());
        (0..TICK_PARTS).for_each(|part| hub.tick_part(Tick::Ping, part));
        assert!(pings.iter().all(|q| q.take_tick()));
        assert!(beats.iter().all(|q| !q.take_tick()));
    }

    #[test]
    fn ticking_the_parts_in_turn_reaches_each_session_once_and_a_part_only_its_own() {
        let hub = Hub::new();
        let beats: Vec<_> = (0..TICK_PARTS * 2)
            .map(|_| SessionQueue::new(1 << 20))
            .collect();
        for (id, q) in beats.iter().enumerate() {
            q.listen(Tick::Heartbeat);
            hub.watch(id as u64, q);
        }
        let mut reached = vec![0; beats.len()];
        for part in 0..TICK_PARTS {
            hub.tick_part(Tick::Heartbeat, part);
            let now: Vec<usize> = (0..beats.len()).filter(|&i| beats[i].take_tick()).collect();
            assert!(!now.is_empty(), "part {part} reached nobody");
            assert!(
                now.iter().all(|&i| i % TICK_PARTS == part),
                "part {part}: {now:?}"
            );
            for i in now {
                reached[i] += 1;
            }
        }
        assert!(reached.iter().all(|&n| n == 1), "{reached:?}");
    }

    /// A part's wakes run back to back, and a delivery due then waits behind them: 10,000
    /// streams' keep-alives come in slices of at most 20 (they came 313 at a time).
    #[test]
    fn a_tick_part_wakes_a_small_slice_of_ten_thousand_sessions() {
        let hub = Hub::new();
        let beats: Vec<_> = (0..10_000).map(|_| SessionQueue::new(1 << 10)).collect();
        for (id, q) in beats.iter().enumerate() {
            q.listen(Tick::Heartbeat);
            hub.watch(id as u64, q);
        }
        let mut largest = 0;
        for part in 0..TICK_PARTS {
            hub.tick_part(Tick::Heartbeat, part);
            largest = largest.max(beats.iter().filter(|q| q.take_tick()).count());
        }
        assert!(largest <= 20, "a part woke {largest} of 10,000 sessions");
    }

    #[test]
    fn a_long_list_indexed_and_shrunk_back_to_a_scan_keeps_every_session() {
        let hub = Hub::new();
        let c = ChannelName::new("c").unwrap();
        let n = SCAN as u64 * 3;
        let queues: Vec<_> = (0..n).map(|_| SessionQueue::new(1 << 20)).collect();
        for (id, q) in queues.iter().enumerate() {
            hub.add(&c, id as u64, q.clone());
        }
        // Every other one leaves (indexed removals), then all but three (down into scanning).
        for id in (0..n).step_by(2) {
            assert!(!hub.remove(&c, id));
        }
        assert_eq!(hub.subscriber_count(&c), (n / 2) as usize);
        for id in (1..n).step_by(2).skip(3) {
            assert!(!hub.remove(&c, id));
        }
        assert_eq!(hub.deliver(&message(&c)), 3);
        assert!(!hub.remove(&c, 1));
        assert!(!hub.remove(&c, 3));
        assert!(hub.remove(&c, 5));
    }
}
