//! The Redis broker on a 3-master Redis Cluster (three `redis-server` processes on loopback
//! ports): sharded pub/sub, keys of a channel in one slot, the conformance scenarios.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tidings_core::conformance::{self, BrokerFactory};
use tidings_core::{Broker, ChannelName, Data, Event, Hub, LivePolicies, Node, Policies, Start};
use tidings_redis::{RedisBroker, RedisOptions};
use tokio::time::Instant;

use support::{RedisCluster, unique_prefix};

fn cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| RedisCluster::start(3))
}

struct OnCluster;

#[async_trait]
impl BrokerFactory for OnCluster {
    async fn make(&self, hub: Arc<Hub>, policies: Arc<LivePolicies>) -> Arc<dyn Broker> {
        let options = RedisOptions {
            urls: cluster().urls(),
            prefix: unique_prefix("cluster"),
            tls_ca_file: None,
        };
        let b = RedisBroker::connect(options, hub, policies).await.unwrap();
        assert!(b.is_cluster());
        b
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_scenarios_hold_on_a_cluster() {
    let f = OnCluster;
    conformance::publish_assigns_consecutive_offsets_from_one_in_one_epoch(&f).await;
    conformance::a_read_behind_trimmed_history_reports_a_gap(&f).await;
    conformance::a_read_with_a_foreign_epoch_reports_epoch_changed(&f).await;
    conformance::history_expires_after_its_ttl(&f).await;
    conformance::published_messages_reach_the_hub_in_offset_order(&f).await;
    conformance::a_subscriber_joining_during_publishes_misses_and_duplicates_nothing(&f).await;
    conformance::resuming_from_a_cursor_replays_then_goes_live(&f).await;
    conformance::stats_and_channels_report_what_the_broker_holds(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_spread_over_every_shard_reach_other_nodes_through_sharded_pubsub() {
    let prefix = unique_prefix("shards");
    let policies = LivePolicies::new(Policies::default());
    let hub_a = Arc::new(Hub::new());
    // One seed URL is enough: the broker sees `cluster_enabled:1` and goes cluster-wide.
    let one_seed = RedisOptions {
        urls: vec![cluster().nodes[1].url()],
        prefix: prefix.clone(),
        tls_ca_file: None,
    };
    let a = RedisBroker::connect(one_seed, hub_a.clone(), policies.clone())
        .await
        .unwrap();
    assert!(a.is_cluster());
    let b = RedisBroker::connect(
        RedisOptions {
            urls: cluster().urls(),
            prefix: prefix.clone(),
            tls_ca_file: None,
        },
        Arc::new(Hub::new()),
        policies.clone(),
    )
    .await
    .unwrap();
    let node_a = Node::new(hub_a, a, policies);
    let channels: Vec<ChannelName> = (0..24)
        .map(|i| ChannelName::new(&format!("room:{i}")).unwrap())
        .collect();
    let mut sub = node_a
        .subscribe(&channels, &Start::Now, 1 << 20, None)
        .await
        .unwrap();
    // Every master holds some of the channels' shard subscriptions.
    for node in &cluster().nodes {
        let reply = node.command(&format!("PUBSUB SHARDCHANNELS {prefix}:*"));
        assert!(
            !reply.starts_with("*0"),
            "no shard channel on port {}: {reply}",
            node.port
        );
    }
    for c in &channels {
        b.publish(c, None, Data::Text(Bytes::from(c.as_str().to_owned())))
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < channels.len() {
        sub.drain(|e, _| {
            if let Event::Message(m) = e {
                assert_eq!(m.offset, 1);
                got.push(m.channel.clone());
            }
        })
        .unwrap();
        if got.len() < channels.len() {
            tokio::time::timeout_at(deadline, sub.ready())
                .await
                .expect("every channel delivers");
        }
    }
    got.sort();
    let mut want = channels.clone();
    want.sort();
    assert_eq!(got, want);
}
