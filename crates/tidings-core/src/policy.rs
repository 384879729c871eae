//! Per-namespace channel policy, resolved from a channel's name.
//!
//! The core only needs history limits today; who may publish or subscribe is carried here
//! too so every layer reads one resolved policy instead of re-deriving it from config.

use std::collections::HashMap;
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

#[derive(Clone, Debug, PartialEq, Eq)]
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
