//! The broker conformance suite against the in-memory broker.

use std::sync::Arc;

use async_trait::async_trait;
use tidings_core::broker::memory::MemoryBroker;
use tidings_core::conformance::BrokerFactory;
use tidings_core::{Broker, Hub, LivePolicies};

struct Memory;

#[async_trait]
impl BrokerFactory for Memory {
    async fn make(&self, hub: Arc<Hub>, policies: Arc<LivePolicies>) -> Arc<dyn Broker> {
        MemoryBroker::new(hub, policies)
    }
}

tidings_core::broker_conformance_suite!(Memory);
