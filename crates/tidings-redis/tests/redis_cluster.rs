//! The Redis broker on a 3-master Redis Cluster (three `redis-server` processes on loopback
//! ports): sharded pub/sub, keys of a channel in one slot, the conformance scenarios.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod lost_replies;
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

/// Offsets (and gap notices) a subscription received.
#[derive(Default)]
struct Seen {
    offsets: Vec<u64>,
    gaps: Vec<tidings_core::Gap>,
}

impl Seen {
    /// Drains until `done` holds, failing after `WAIT`.
    async fn until(
        &mut self,
        what: &str,
        sub: &mut tidings_core::Subscription,
        done: impl Fn(&Seen) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            sub.drain(|e, _| match e {
                Event::Message(m) => self.offsets.push(m.offset),
                Event::Gap(g) => self.gaps.push(g.clone()),
                Event::Presence(_) => {}
            })
            .expect("the session stays up");
            if done(self) {
                return;
            }
            let last = self.offsets.last().copied();
            tokio::time::timeout_at(deadline, sub.ready())
                .await
                .unwrap_or_else(|_| panic!("{what}: stuck after offset {last:?}"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_delivery_continues_with_nothing_lost_when_the_channel_slot_moves_to_another_master() {
    let cluster = RedisCluster::start(3);
    let prefix = unique_prefix("reshard");
    let policies = LivePolicies::new(Policies {
        default: tidings_core::ChannelPolicy {
            history_size: 100_000,
            ..Default::default()
        },
        namespaces: Default::default(),
    });
    let connect = |hub: Arc<Hub>| {
        RedisBroker::connect(
            RedisOptions {
                urls: cluster.urls(),
                prefix: prefix.clone(),
                tls_ca_file: None,
            },
            hub,
            policies.clone(),
        )
    };
    let (hub_a, hub_b) = (Arc::new(Hub::new()), Arc::new(Hub::new()));
    let a = connect(hub_a.clone()).await.unwrap();
    let b = connect(hub_b.clone()).await.unwrap();
    let node_a = Node::new(hub_a, a.clone(), policies.clone());
    let node_b = Node::new(hub_b, b.clone(), policies.clone());
    let c = ChannelName::new("moving").unwrap();
    let one = std::slice::from_ref(&c);
    let mut sub_a = node_a
        .subscribe(one, &Start::Now, 64 << 20, None)
        .await
        .unwrap();
    let mut sub_b = node_b
        .subscribe(one, &Start::Now, 64 << 20, None)
        .await
        .unwrap();

    // A publish load through node B for the whole test.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (b, c, stop) = (b.clone(), c.clone(), stop.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut failed = 0;
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                match b
                    .publish(&c, None, Data::Text(Bytes::from(i.to_string())))
                    .await
                {
                    Ok(m) => acked.push(m.offset),
                    Err(_) => failed += 1,
                }
            }
            (acked, failed)
        })
    };
    let (mut seen_a, mut seen_b) = (Seen::default(), Seen::default());
    seen_a
        .until("before the move", &mut sub_a, |s| s.offsets.len() >= 200)
        .await;

    let slot = cluster.keyslot(&format!("{prefix}:{{moving}}:m"));
    let from = cluster.owner(slot);
    let to = (from + 1) % 3;
    cluster.move_slot(slot, from, to);
    assert_eq!(cluster.owner(slot), to);
    let moved_at = seen_a.offsets.len();

    // Delivery goes on on both nodes, well past the move.
    seen_a
        .until("node A after the move", &mut sub_a, |s| {
            s.offsets.len() >= moved_at + 500
        })
        .await;
    let reached = *seen_a.offsets.last().unwrap();
    seen_b
        .until("node B after the move", &mut sub_b, |s| {
            s.offsets.last().is_some_and(|&o| o >= reached)
        })
        .await;
    // A session that joins node A now is live too.
    let mut late = node_a
        .subscribe(one, &Start::Now, 64 << 20, None)
        .await
        .unwrap();
    let mut seen_late = Seen::default();
    seen_late
        .until("a session joining after the move", &mut late, |s| {
            s.offsets.len() >= 50
        })
        .await;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, failed) = publisher.await.unwrap();
    assert_eq!(failed, 0, "no publish failed during the move");
    let top = *acked.last().unwrap();
    assert_eq!(
        acked,
        (1..=top).collect::<Vec<_>>(),
        "offsets have no holes"
    );
    for (name, seen, sub) in [
        ("A", &mut seen_a, &mut sub_a),
        ("B", &mut seen_b, &mut sub_b),
    ] {
        seen.until(name, sub, |s| s.offsets.last() == Some(&top))
            .await;
        assert!(seen.gaps.is_empty(), "node {name}: gap {:?}", seen.gaps);
        let first = seen.offsets[0];
        assert_eq!(
            seen.offsets,
            (first..=top).collect::<Vec<_>>(),
            "node {name} received every message once, in order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_whose_reply_is_lost_is_never_stored_twice_on_a_cluster() {
    let cluster = RedisCluster::start(3);
    let mut proxies = Vec::new();
    for node in &cluster.nodes {
        proxies.push(support::LossyProxy::start(node.port, 25).await);
    }
    cluster.announce(&proxies.iter().map(|p| p.port).collect::<Vec<_>>());
    let policies = LivePolicies::new(Policies {
        default: tidings_core::ChannelPolicy {
            history_size: 100_000,
            ..Default::default()
        },
        namespaces: Default::default(),
    });
    let options = RedisOptions {
        urls: proxies
            .iter()
            .map(|p| format!("redis://127.0.0.1:{}", p.port))
            .collect(),
        prefix: unique_prefix("lossy"),
        tls_ca_file: None,
    };
    let b = RedisBroker::connect(options, Arc::new(Hub::new()), policies)
        .await
        .unwrap();
    let c = ChannelName::new("lossy").unwrap();
    let report = lost_replies::publish_through_lost_replies(&b, &c, 300, || {
        for p in &proxies {
            p.lossy.store(false, std::sync::atomic::Ordering::Relaxed);
        }
    })
    .await;
    let dropped: u64 = proxies
        .iter()
        .map(|p| p.dropped.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    assert!(dropped >= 5, "only {dropped} replies were lost");
    assert!(report.unknown > 0, "a lost reply is reported as unknown");
    assert!(report.acknowledged > 200);
}
