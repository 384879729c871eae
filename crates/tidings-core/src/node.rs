//! A node: this process's hub joined to a broker. Transports talk to the node only.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::broker::memory::MemoryBroker;
use crate::broker::{Broker, BrokerError};
use crate::channel::{ChannelName, EventName};
use crate::history::{HistoryRead, Since};
use crate::hub::Hub;
use crate::idempotency::{PublishOptions, Published};
use crate::message::{Data, Message};
use crate::policy::{LivePolicies, Policies};

pub struct Node {
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub policies: Arc<LivePolicies>,
    session_ids: AtomicU64,
}

impl Node {
    pub fn new(hub: Arc<Hub>, broker: Arc<dyn Broker>, policies: Arc<LivePolicies>) -> Arc<Self> {
        Arc::new(Self {
            hub,
            broker,
            policies,
            session_ids: AtomicU64::new(1),
        })
    }

    /// A node on the in-memory broker.
    pub fn memory(policies: Policies) -> Arc<Self> {
        let hub = Arc::new(Hub::new());
        let policies = LivePolicies::new(policies);
        let broker = MemoryBroker::new(hub.clone(), policies.clone());
        Self::new(hub, broker, policies)
    }

    pub fn next_session_id(&self) -> u64 {
        self.session_ids.fetch_add(1, Ordering::Relaxed)
    }

    pub async fn publish(
        &self,
        channel: &ChannelName,
        event: Option<EventName>,
        data: Data,
    ) -> Result<Arc<Message>, BrokerError> {
        self.broker.publish(channel, event, data).await
    }

    pub async fn publish_with(
        &self,
        channel: &ChannelName,
        event: Option<EventName>,
        data: Data,
        options: &PublishOptions,
    ) -> Result<Published, BrokerError> {
        if self.broker.publishes_at_once() {
            return self.broker.publish_at_once(channel, event, data, options);
        }
        self.broker
            .publish_with(channel, event, data, options)
            .await
    }

    pub async fn read(
        &self,
        channel: &ChannelName,
        since: &Since,
        limit: Option<usize>,
    ) -> Result<HistoryRead, BrokerError> {
        self.broker.read(channel, since, limit).await
    }
}
