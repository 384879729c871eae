//! The hub: which local sessions follow which channel, and the fan-out to them.
//!
//! Concurrency: the registry is sharded by channel (std `Mutex`, never held across an
//! `.await`). A broker calls `deliver` once per message, per channel in offset order (the
//! memory broker while holding its channel lock, a remote broker from its single reader), so
//! each queue sees a channel's messages in order. `deliver` only pushes an `Arc` per
//! subscriber into bounded queues: it never waits for a subscriber.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::channel::ChannelName;
use crate::message::Message;
use crate::presence::PresenceEvent;
use crate::queue::{QueueItem, SessionQueue};

const SHARDS: usize = 32;

type Subscribers = Mutex<Vec<(u64, Arc<SessionQueue>)>>;

pub struct Hub {
    shards: Vec<Mutex<HashMap<ChannelName, Arc<Subscribers>>>>,
    hasher: RandomState,
}

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
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, channel: &ChannelName) -> &Mutex<HashMap<ChannelName, Arc<Subscribers>>> {
        let i = (self.hasher.hash_one(channel) as usize) % SHARDS;
        &self.shards[i]
    }

    /// Adds a session's queue to a channel. Returns true when it is the channel's first
    /// local subscriber (the node must then subscribe to the channel at the broker).
    pub fn add(&self, channel: &ChannelName, id: u64, queue: Arc<SessionQueue>) -> bool {
        let mut shard = relock(self.shard(channel));
        match shard.entry(channel.clone()) {
            Entry::Occupied(e) => {
                relock(e.get()).push((id, queue));
                false
            }
            Entry::Vacant(e) => {
                e.insert(Arc::new(Mutex::new(vec![(id, queue)])));
                true
            }
        }
    }

    /// Removes a session from a channel. Returns true when it was the last local subscriber.
    pub fn remove(&self, channel: &ChannelName, id: u64) -> bool {
        let mut shard = relock(self.shard(channel));
        let Some(subs) = shard.get(channel) else {
            return false;
        };
        let now_empty = {
            let mut list = relock(subs);
            if let Some(i) = list.iter().position(|(sid, _)| *sid == id) {
                list.swap_remove(i);
            }
            list.is_empty()
        };
        if now_empty {
            shard.remove(channel);
        }
        now_empty
    }

    /// Pushes a message to every local subscriber of its channel; returns how many took it.
    pub fn deliver(&self, message: &Arc<Message>) -> usize {
        let subs = match relock(self.shard(&message.channel)).get(&message.channel) {
            Some(s) => s.clone(),
            None => return 0,
        };
        let list = relock(&subs);
        list.iter().filter(|(_, q)| q.push(message)).count()
    }

    /// Pushes a join or leave to every local subscriber of its channel.
    pub fn deliver_presence(&self, event: &Arc<PresenceEvent>) {
        let subs = match relock(self.shard(&event.channel)).get(&event.channel) {
            Some(s) => s.clone(),
            None => return,
        };
        for (_, q) in relock(&subs).iter() {
            q.push_item(QueueItem::Presence(event.clone()));
        }
    }

    /// Ends every local session (say, the broker became unreachable): each writer sends its
    /// goodbye with `reason` and closes; clients resume from their cursors.
    pub fn disconnect_all(&self, reason: crate::disconnect::DisconnectReason) {
        for shard in &self.shards {
            let subs: Vec<_> = relock(shard).values().cloned().collect();
            for s in subs {
                for (_, q) in relock(&s).iter() {
                    q.close(reason);
                }
            }
        }
    }

    pub fn subscriber_count(&self, channel: &ChannelName) -> usize {
        relock(self.shard(channel))
            .get(channel)
            .map_or(0, |s| relock(s).len())
    }

    /// Channels with at least one local subscriber.
    pub fn channels(&self) -> Vec<ChannelName> {
        self.shards
            .iter()
            .flat_map(|s| relock(s).keys().cloned().collect::<Vec<_>>())
            .collect()
    }
}
