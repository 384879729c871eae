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
//! Heartbeats and pings reach them the same way (`Hub::tick_part`): the caller's one timer
//! per node visits one of the `TICK_PARTS` parts of the watched sessions every
//! 1/`TICK_PARTS` of the interval, so each session is visited once per interval and only
//! those listening to that tick wake (`SessionQueue::listen`). Its first beat comes within
//! one interval of its start, then one every interval. Spread over parts, a node's beats
//! are not one burst of a write per stream (a million at once, where each delivery due at
//! that moment waited behind them), and a benchmark's window sees its share of them.

use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::channel::ChannelName;
use crate::message::Message;
use crate::presence::PresenceEvent;
use crate::queue::{QueueItem, SessionQueue, Tick};
use crate::shards::Shards;

type Subscribers = Mutex<Local>;

/// How many parts `Hub::tick_part` splits the watched sessions into (one per shard of the
/// session registry).
pub const TICK_PARTS: usize = crate::shards::SHARDS;

/// A channel's local subscribers: a list to fan out over, and — once the list is long —
/// where each one sits in it, so a session leaves in O(1). (A scan made every long poll's
/// re-registration cost O(n): a message to 10,000 pollers then cost 10,000 × 5,000
/// comparisons.) A short list is scanned: most channels have a few subscribers, and a
/// channel a long poll joins alone is created and dropped on every round trip, where the
/// index map was one more allocation each time (issue 17).
#[derive(Default)]
struct Local {
    list: Vec<(u64, Arc<SessionQueue>)>,
    /// Empty while the list is at most `SCAN` long.
    at: foldhash::HashMap<u64, usize>,
}

/// Lists up to this long are scanned instead of indexed.
const SCAN: usize = 16;

impl Local {
    fn push(&mut self, id: u64, queue: Arc<SessionQueue>) {
        self.list.push((id, queue));
        if self.list.len() > SCAN {
            if self.at.is_empty() {
                self.at
                    .extend(self.list.iter().enumerate().map(|(i, (id, _))| (*id, i)));
            } else {
                self.at.insert(id, self.list.len() - 1);
            }
        }
    }

    fn remove(&mut self, id: u64) {
        let found = if self.at.is_empty() {
            self.list.iter().position(|(i, _)| *i == id)
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
        } else if let Some((moved, _)) = self.list.get(i) {
            self.at.insert(*moved, i);
        }
    }

    fn queues(&self) -> impl Iterator<Item = &Arc<SessionQueue>> {
        self.list.iter().map(|(_, q)| q)
    }
}

pub struct Hub {
    shards: Shards<Arc<Subscribers>>,
    /// The sessions that follow shutdown and reloads (`watch`), by id, sharded by id.
    sessions: Vec<Mutex<foldhash::HashMap<u64, Arc<SessionQueue>>>>,
    /// Set once by `close_sessions`: a session registering later is closed at once.
    closing: std::sync::atomic::AtomicBool,
    /// Emptied channel entries kept for the next channel to get its first subscriber: a
    /// long poll alone on its channel empties and re-creates the entry on every round trip,
    /// two allocations each time (issue 17). At most `SPARES`, each with a short list only.
    /// Lock order: a shard, then this.
    spare: Mutex<Vec<Arc<Subscribers>>>,
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
            sessions: (0..crate::shards::SHARDS)
                .map(|_| Mutex::default())
                .collect(),
            closing: std::sync::atomic::AtomicBool::new(false),
            spare: Mutex::new(Vec::with_capacity(SPARES)),
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

    /// Pushes a message to every local subscriber of its channel; returns how many took it.
    pub fn deliver(&self, message: &Arc<Message>) -> usize {
        let subs = match relock(self.shards.of(&message.channel)).get(&message.channel) {
            Some(s) => s.clone(),
            None => return 0,
        };
        let local = relock(&subs);
        local.queues().filter(|q| q.push(message)).count()
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
        sessions.insert(id, queue.clone());
        if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            queue.close(crate::disconnect::DisconnectReason::Shutdown);
        }
    }

    pub fn unwatch(&self, id: u64) {
        relock(self.sessions_of(id)).remove(&id);
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

    /// A shared timer fired: every watched session listening to `tick` wakes (its
    /// heartbeat or ping is due).
    pub fn tick(&self, tick: Tick) {
        for part in 0..TICK_PARTS {
            self.tick_part(tick, part);
        }
    }

    /// The same for one part of the sessions (`part` modulo `TICK_PARTS`): a session is
    /// always in the same part, so visiting the parts in turn reaches each once per round.
    pub fn tick_part(&self, tick: Tick, part: usize) {
        for q in relock(&self.sessions[part % self.sessions.len()]).values() {
            q.signal_tick(tick);
        }
    }

    /// How many sessions are watched.
    pub fn watched(&self) -> usize {
        self.sessions.iter().map(|s| relock(s).len()).sum()
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
        hub.unwatch(1000);
        assert_eq!(hub.watched(), 40);
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
        hub.tick(Tick::Heartbeat);
        assert!(beats.iter().all(|q| q.take_tick() && !q.take_tick()));
        assert!(pings.iter().all(|q| !q.take_tick()));
        assert!(!gone.take_tick());
        hub.tick(Tick::Ping);
        assert!(pings.iter().all(|q| q.take_tick()));
        assert!(beats.iter().all(|q| !q.take_tick()));
    }

    #[test]
    fn ticking_the_parts_in_turn_reaches_each_session_once_and_a_part_only_its_own() {
        let hub = Hub::new();
        let beats: Vec<_> = (0..100).map(|_| SessionQueue::new(1 << 20)).collect();
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
