//! The broker contract: where offsets are assigned, history is kept and messages are fanned
//! out to nodes.
//!
//! Contract every implementation keeps (the conformance suite in `conformance.rs` checks it):
//! - `publish` assigns the channel's next offset, appends to history and hands the message to
//!   every subscribed node's `Hub::deliver` as one atomic step per channel; it returns only
//!   after the message is in history, so a success is never a lie.
//! - Per channel, nodes receive messages in offset order.
//! - `read` returns the channel's `top` (epoch, last offset) taken atomically with the replay,
//!   which is what lets `Node::subscribe` discard live duplicates (register first, read, skip
//!   offsets <= top).
//! - `subscribe`/`unsubscribe` are node-level, called on a channel's first and last local
//!   subscriber. Calls for one channel may race (a leave and a join at once): implementations
//!   that keep remote subscriptions reconcile against `Hub::subscriber_count` rather than
//!   trusting call order.
//! - An unsupported capability answers `BrokerError::Unsupported`, never a silent no-op.
//! - `Unavailable` from `publish` means nothing was stored; a publish that may or may not
//!   have been stored (Redis ran it, the reply was lost) is `OutcomeUnknown`, never retried
//!   blindly. A publish with an idempotency key (`PublishOptions`) checks and records the key
//!   in the same atomic step as the publish (see `idempotency.rs`).

pub mod memory;

use std::sync::Arc;

use async_trait::async_trait;
use thiserror::Error;

use crate::channel::{ChannelName, EventName};
use crate::history::{HistoryRead, Since};
use crate::idempotency::{PublishOptions, Published};
use crate::message::{Data, Message, Position};
use crate::presence::ClientInfo;
use crate::roster::Roster;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BrokerError {
    /// Nothing was stored.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The publish may have been stored: the broker's answer was lost.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    #[error("not supported by this broker: {0}")]
    Unsupported(&'static str),
    /// The data dir could not take the write (disk full, I/O error): nothing was stored.
    #[error("storage failed: {0}")]
    Storage(String),
    /// Creating one more channel would pass `max_channels` (the number given).
    #[error("the server holds its maximum of {0} channels")]
    TooManyChannels(usize),
}

/// A channel's state as the broker knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelStats {
    pub top: Position,
    pub history_len: usize,
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// A short name for logs and `/readyz` (`memory`, `redis`).
    fn kind(&self) -> &'static str;

    /// Publishes one message (see the module docs for what a success promises).
    async fn publish_with(
        &self,
        channel: &ChannelName,
        event: Option<EventName>,
        data: Data,
        options: &PublishOptions,
    ) -> Result<Published, BrokerError>;

    /// Whether `publish_at_once` works: the broker can publish without waiting (the memory
    /// broker without a data dir). Calling it directly saves the boxed future of
    /// `publish_with` (issue 17: an allocation per publish).
    fn publishes_at_once(&self) -> bool {
        false
    }

    /// `publish_with` without a future, for a broker whose `publishes_at_once` says so.
    fn publish_at_once(
        &self,
        _channel: &ChannelName,
        _event: Option<EventName>,
        _data: Data,
        _options: &PublishOptions,
    ) -> Result<Published, BrokerError> {
        Err(BrokerError::Unsupported("publishing without waiting"))
    }

    /// `read` without a future when the broker has the answer at hand (the memory broker,
    /// unless part of it is on disk); `None`: call `read`. Saves a boxed future per join.
    fn read_at_once(
        &self,
        _channel: &ChannelName,
        _since: &Since,
        _limit: Option<usize>,
    ) -> Option<Result<HistoryRead, BrokerError>> {
        None
    }

    /// `publish_with` without options.
    async fn publish(
        &self,
        channel: &ChannelName,
        event: Option<EventName>,
        data: Data,
    ) -> Result<Arc<Message>, BrokerError> {
        self.publish_with(channel, event, data, &PublishOptions::default())
            .await
            .map(|p| p.message)
    }

    /// Reads history from `since`, at most `limit` messages, with the channel's top.
    async fn read(
        &self,
        channel: &ChannelName,
        since: &Since,
        limit: Option<usize>,
    ) -> Result<HistoryRead, BrokerError>;

    /// Whether `subscribe`/`unsubscribe` do anything. A broker in this process (the memory
    /// broker) feeds the hub on every publish already, so a subscription need not tell it:
    /// skipping the calls saves a boxed future per join and, per last leave, a spawned task
    /// (issue 17: a long poll joins and leaves its channel on every round trip).
    fn tracks_subscriptions(&self) -> bool {
        true
    }

    /// This node wants the channel's messages delivered to its hub.
    async fn subscribe(&self, channel: &ChannelName) -> Result<(), BrokerError>;

    /// This node no longer has local subscribers for the channel.
    async fn unsubscribe(&self, channel: &ChannelName) -> Result<(), BrokerError>;

    /// One channel's position and history length, `None` when the broker has no such channel.
    async fn stats(&self, channel: &ChannelName) -> Result<Option<ChannelStats>, BrokerError>;

    /// Channels the broker currently holds (with history or subscribers).
    async fn channels(&self) -> Result<Vec<ChannelName>, BrokerError>;

    /// How many channels the broker holds and at most `max` of their names, for callers that
    /// sample (the stats task) rather than list: a broker holding a million channels must
    /// not clone every name for them.
    async fn channel_sample(&self, max: usize) -> Result<(usize, Vec<ChannelName>), BrokerError> {
        let mut all = self.channels().await?;
        let total = all.len();
        all.truncate(max);
        Ok((total, all))
    }

    /// Whether the broker can serve requests now (`/readyz`).
    async fn ready(&self) -> Result<(), BrokerError>;

    /// The cluster-wide roster of a broker that spans nodes; `None` for a one-node broker,
    /// whose caller uses a `LocalRoster`.
    fn roster(&self) -> Option<Arc<dyn Roster>> {
        None
    }

    /// Bytes its data dir occupies, for a broker that keeps one.
    fn bytes_on_disk(&self) -> Option<u64> {
        None
    }

    /// Records `info` as present on `channel`; with `announce`, every subscriber of the
    /// channel (on every node) gets a join event.
    async fn presence_join(
        &self,
        _channel: &ChannelName,
        _info: &ClientInfo,
        _announce: bool,
    ) -> Result<(), BrokerError> {
        Err(BrokerError::Unsupported("presence"))
    }

    /// Removes `info` from `channel`'s presence; with `announce`, a leave event.
    async fn presence_leave(
        &self,
        _channel: &ChannelName,
        _info: &ClientInfo,
        _announce: bool,
    ) -> Result<(), BrokerError> {
        Err(BrokerError::Unsupported("presence"))
    }

    /// Who is present on `channel`.
    async fn presence(&self, _channel: &ChannelName) -> Result<Vec<ClientInfo>, BrokerError> {
        Err(BrokerError::Unsupported("presence"))
    }

    /// One page of who is present on `channel`, ordered by client id: at most `limit`
    /// clients after the client id `after`, and whether more follow. This default reads the
    /// whole list (a broker that keeps presence elsewhere); the memory broker reads the page.
    async fn presence_page(
        &self,
        channel: &ChannelName,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<ClientInfo>, bool), BrokerError> {
        let mut all = self.presence(channel).await?;
        all.sort_unstable_by(|a, b| a.client.cmp(&b.client));
        let start = after.map_or(0, |a| all.partition_point(|c| c.client.as_str() <= a));
        let more = all.len().saturating_sub(start) > limit;
        all.truncate(start.saturating_add(limit));
        all.drain(..start.min(all.len()));
        Ok((all, more))
    }
}
