//! Channel-keyed maps split into separately locked shards, so traffic on unrelated channels
//! does not contend on one lock. The hub and the memory broker each keep one.
//!
//! Channel names come from clients, so the maps need a seeded hash. std's SipHash cost ~3 %
//! of a long poll's instructions (every lookup hashes twice: the shard, then the map);
//! foldhash's quality variant is seeded per process and per map, and much cheaper.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;

use foldhash::quality::RandomState;

use crate::channel::ChannelName;

pub(crate) const SHARDS: usize = 32;

pub(crate) type ChannelMap<V> = HashMap<ChannelName, V, RandomState>;

pub(crate) struct Shards<V> {
    shards: Vec<Mutex<ChannelMap<V>>>,
    hasher: RandomState,
}

impl<V> Shards<V> {
    pub(crate) fn new() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::default()))
                .collect(),
            hasher: RandomState::default(),
        }
    }

    /// The shard `channel` lives in.
    pub(crate) fn of(&self, channel: &ChannelName) -> &Mutex<ChannelMap<V>> {
        &self.shards[(self.hasher.hash_one(channel) as usize) % SHARDS]
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.len()
    }

    /// Every shard, for sweeps and listings.
    pub(crate) fn all(&self) -> impl Iterator<Item = &Mutex<ChannelMap<V>>> {
        self.shards.iter()
    }
}
