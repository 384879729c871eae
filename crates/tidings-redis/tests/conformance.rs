//! The broker conformance suite, unchanged, against `RedisBroker` on a real `redis-server`
//! (one per test process), each test under its own key prefix.

use std::sync::Arc;

use async_trait::async_trait;
use tidings_core::conformance::BrokerFactory;
use tidings_core::{Broker, Hub, LivePolicies};
use tidings_redis::{RedisBroker, RedisOptions};

mod support;

struct Redis;

#[async_trait]
impl BrokerFactory for Redis {
    async fn make(&self, hub: Arc<Hub>, policies: Arc<LivePolicies>) -> Arc<dyn Broker> {
        let options =
            RedisOptions::from_url(&support::shared().url(), &support::unique_prefix("conf"));
        match RedisBroker::connect(options, hub, policies).await {
            Ok(b) => b,
            Err(e) => panic!("connecting to the test Redis: {e}"),
        }
    }
}

tidings_core::broker_conformance_suite!(Redis);
