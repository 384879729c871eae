//! Per-namespace channel policy, resolved from a channel's name.
//!
//! The core only needs history limits today; who may publish or subscribe is carried here
//! too so every layer reads one resolved policy instead of re-deriving it from config.
//!
//! Concurrency: the policies in force are one `LivePolicies`, shared by the node, its broker
//! and the edge. A reload (SIGHUP) replaces the whole `Policies` value at once; a reader
//! takes a copy of one channel's policy with one atomic load and never waits on a lock.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::channel::ChannelName;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubscribePolicy {
    Anyone,
    Token,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishPolicy {
    Anyone,
    Token,
    Server,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelPolicy {
    /// Messages kept per channel; 0 keeps none (no resume possible).
    pub history_size: usize,
    /// How long a message stays in history.
    pub history_ttl: Duration,
    pub subscribe: SubscribePolicy,
    pub publish: PublishPolicy,
    pub presence: bool,
    pub join_leave: bool,
}

impl Default for ChannelPolicy {
    fn default() -> Self {
        Self {
            history_size: 100,
            history_ttl: Duration::from_secs(600),
            subscribe: SubscribePolicy::Anyone,
            publish: PublishPolicy::Anyone,
            presence: false,
            join_leave: false,
        }
    }
}

/// The `[channels]` defaults plus `[namespaces.NAME]` overrides, already merged.
#[derive(Clone, Debug, Default)]
pub struct Policies {
    pub default: ChannelPolicy,
    pub namespaces: HashMap<String, ChannelPolicy>,
}

impl Policies {
    pub fn for_channel(&self, channel: &ChannelName) -> &ChannelPolicy {
        channel
            .namespace()
            .and_then(|ns| self.namespaces.get(ns))
            .unwrap_or(&self.default)
    }
}

/// The policies in force, replaced whole by a reload. Brokers and the edge read it per
/// operation, so a new history limit or subscribe rule applies from the next one on.
#[derive(Debug, Default)]
pub struct LivePolicies(arc_swap::ArcSwap<Policies>);

impl LivePolicies {
    pub fn new(policies: Policies) -> Arc<Self> {
        Arc::new(Self(arc_swap::ArcSwap::from_pointee(policies)))
    }

    /// The policy of `channel` as of now.
    pub fn for_channel(&self, channel: &ChannelName) -> ChannelPolicy {
        *self.0.load().for_channel(channel)
    }

    /// Every policy as of now.
    pub fn current(&self) -> Arc<Policies> {
        self.0.load_full()
    }

    /// Puts `policies` in force for every operation from now on.
    pub fn replace(&self, policies: Policies) {
        self.0.store(Arc::new(policies));
    }
}

impl From<Policies> for LivePolicies {
    fn from(policies: Policies) -> Self {
        Self(arc_swap::ArcSwap::from_pointee(policies))
    }
}
