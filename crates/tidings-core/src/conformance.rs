//! The broker conformance suite: one set of scenarios every `Broker` must pass.
//!
//! A broker crate runs it from its tests with `broker_conformance_suite!(factory)`, where the
//! factory builds a fresh, isolated broker (for Redis: a unique key prefix) delivering into the
//! given hub with the given policies. Each scenario panics on failure, like any test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::broker::Broker;
use crate::channel::ChannelName;
use crate::cursor::Cursor;
use crate::history::{GapReason, Since};
use crate::hub::Hub;
use crate::message::{Data, Epoch, Position};
use crate::node::Node;
use crate::policy::{ChannelPolicy, LivePolicies, Policies};
use crate::queue::SessionQueue;
use crate::subscription::{Event, Start};

#[async_trait]
pub trait BrokerFactory: Send + Sync {
    async fn make(&self, hub: Arc<Hub>, policies: Arc<LivePolicies>) -> Arc<dyn Broker>;
}

/// Generates one `#[tokio::test]` per scenario for the factory expression given.
#[macro_export]
macro_rules! broker_conformance_suite {
    ($factory:expr) => {
        $crate::broker_conformance_suite!(@cases $factory;
            publish_assigns_consecutive_offsets_from_one_in_one_epoch,
            channels_have_independent_offsets,
            a_read_after_a_position_returns_exactly_what_followed,
            a_read_behind_trimmed_history_reports_a_gap,
            a_read_with_a_foreign_epoch_reports_epoch_changed,
            last_n_returns_the_most_recent_oldest_first,
            history_expires_after_its_ttl,
            published_messages_reach_the_hub_in_offset_order,
            a_subscriber_joining_during_publishes_misses_and_duplicates_nothing,
            resuming_from_a_cursor_replays_then_goes_live,
            stats_and_channels_report_what_the_broker_holds,
        );
    };
    (@cases $factory:expr; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::conformance::$case(&$factory).await;
            }
        )+
    };
}

fn policies(history_size: usize, ttl: Duration) -> Arc<LivePolicies> {
    LivePolicies::new(Policies {
        default: ChannelPolicy {
            history_size,
            history_ttl: ttl,
            ..ChannelPolicy::default()
        },
        namespaces: Default::default(),
    })
}

async fn setup(f: &dyn BrokerFactory, size: usize, ttl: Duration) -> (Arc<Hub>, Arc<dyn Broker>) {
    let hub = Arc::new(Hub::new());
    let broker = f.make(hub.clone(), policies(size, ttl)).await;
    (hub, broker)
}

fn ch(name: &str) -> ChannelName {
    ChannelName::new(name).unwrap()
}

fn text(s: String) -> Data {
    Data::Text(Bytes::from(s))
}

const LONG: Duration = Duration::from_secs(600);

pub async fn publish_assigns_consecutive_offsets_from_one_in_one_epoch(f: &dyn BrokerFactory) {
    let (_, b) = setup(f, 100, LONG).await;
    let c = ch("conf:offsets");
    let mut epoch = None;
    for i in 1..=5u64 {
        let m = b.publish(&c, None, text(format!("m{i}"))).await.unwrap();
        assert_eq!(m.offset, i);
        assert!(m.time > 0);
        epoch.get_or_insert(m.epoch.clone());
        assert_eq!(Some(&m.epoch), epoch.as_ref());
    }
}

pub async fn channels_have_independent_offsets(f: &dyn BrokerFactory) {
    let (_, b) = setup(f, 100, LONG).await;
    b.publish(&ch("conf:a"), None, text("x".into()))
        .await
        .unwrap();
    b.publish(&ch("conf:a"), None, text("x".into()))
        .await
        .unwrap();
    let m = b
        .publish(&ch("conf:b"), None, text("x".into()))
        .await
        .unwrap();
    assert_eq!(m.offset, 1);
}

pub async fn a_read_after_a_position_returns_exactly_what_followed(f: &dyn BrokerFactory) {
    let (_, b) = setup(f, 100, LONG).await;
    let c = ch("conf:read");
    let mut last = None;
    for i in 0..6 {
        last = Some(b.publish(&c, None, text(format!("m{i}"))).await.unwrap());
    }
    let epoch = last.unwrap().epoch.clone();
    let since = Since::After(Position {
        epoch: epoch.clone(),
        offset: 3,
    });
    let r = b.read(&c, &since, None).await.unwrap();
    assert!(r.replay.gap().is_none());
    let offsets: Vec<u64> = r.replay.messages().iter().map(|m| m.offset).collect();
    assert_eq!(offsets, vec![4, 5, 6]);
    assert_eq!(r.replay.messages()[0].data, text("m3".into()));
    assert_eq!(r.top, Position { epoch, offset: 6 });
    let r = b.read(&c, &since, Some(2)).await.unwrap();
    assert_eq!(r.replay.messages().len(), 2);
}

pub async fn a_read_behind_trimmed_history_reports_a_gap(f: &dyn BrokerFactory) {
    let (_, b) = setup(f, 3, LONG).await;
    let c = ch("conf:trim");
    let mut epoch = None;
    for i in 0..10 {
        epoch = Some(
            b.publish(&c, None, text(format!("m{i}")))
                .await
                .unwrap()
                .epoch
                .clone(),
        );
    }
    let since = Since::After(Position {
        epoch: epoch.unwrap(),
        offset: 2,
    });
    let r = b.read(&c, &since, None).await.unwrap();
    let gap = r.replay.gap().expect("a gap");
    assert_eq!(gap.reason, GapReason::Trimmed);
    assert_eq!(gap.next_offset, 8);
    assert_eq!(gap.channel, "conf:trim");
    let offsets: Vec<u64> = r.replay.messages().iter().map(|m| m.offset).collect();
    assert_eq!(offsets, vec![8, 9, 10]);
}

pub async fn a_read_with_a_foreign_epoch_reports_epoch_changed(f: &dyn BrokerFactory) {
    let (_, b) = setup(f, 10, LONG).await;
    let c = ch("conf:epoch");
    b.publish(&c, None, text("x".into())).await.unwrap();
    let since = Since::After(Position {
        epoch: Epoch::new("gone").unwrap(),
        offset: 1,
    });
    let r = b.read(&c, &since, None).await.unwrap();
    let gap = r.replay.gap().expect("a gap");
    assert_eq!(gap.reason, GapReason::EpochChanged);
    assert_eq!(gap.next_offset, 1);
    assert_eq!(r.replay.messages().len(), 1);
}

pub async fn last_n_returns_the_most_recent_oldest_first(f: &dyn BrokerFactory) {
    let (_, b) = setup(f, 100, LONG).await;
    let c = ch("conf:last");
    for i in 0..5 {
        b.publish(&c, None, text(format!("m{i}"))).await.unwrap();
    }
    let r = b.read(&c, &Since::Last(2), None).await.unwrap();
    let offsets: Vec<u64> = r.replay.messages().iter().map(|m| m.offset).collect();
    assert_eq!(offsets, vec![4, 5]);
    let r = b.read(&c, &Since::Now, None).await.unwrap();
    assert!(r.replay.messages().is_empty());
    assert_eq!(r.top.offset, 5);
}

pub async fn history_expires_after_its_ttl(f: &dyn BrokerFactory) {
    let (_, b) = setup(f, 100, Duration::from_millis(300)).await;
    let c = ch("conf:ttl");
    let m = b.publish(&c, None, text("x".into())).await.unwrap();
    let since = Since::After(Position {
        epoch: m.epoch.clone(),
        offset: 0,
    });
    // Waits for the event (expiry) with a deadline rather than asserting after a sleep.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = b.read(&c, &since, None).await.unwrap();
        if r.replay.messages().is_empty() {
            assert_eq!(r.replay.gap().map(|g| g.reason), Some(GapReason::Trimmed));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "history never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn published_messages_reach_the_hub_in_offset_order(f: &dyn BrokerFactory) {
    let (hub, b) = setup(f, 1000, LONG).await;
    let c = ch("conf:order");
    let q = SessionQueue::new(usize::MAX);
    hub.add(&c, 1, q.clone());
    b.subscribe(&c).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let b = b.clone();
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                b.publish(&c, None, text(format!("{t}-{i}"))).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < 400 {
        q.drain_into(&mut got).unwrap();
        if got.len() < 400 {
            tokio::time::timeout_at(deadline, q.ready())
                .await
                .expect("all 400 messages delivered");
        }
    }
    let offsets: Vec<u64> = got
        .iter()
        .filter_map(|i| match i {
            crate::queue::QueueItem::Message(m) => Some(m.offset),
            crate::queue::QueueItem::Presence(_) => None,
        })
        .collect();
    assert_eq!(offsets, (1..=400).collect::<Vec<_>>());
}

pub async fn a_subscriber_joining_during_publishes_misses_and_duplicates_nothing(
    f: &dyn BrokerFactory,
) {
    let (hub, b) = setup(f, 100_000, LONG).await;
    let policies = policies(100_000, LONG);
    let node = Node::new(hub, b, policies);
    let c = ch("conf:race");
    const TOTAL: u64 = 2000;
    let publisher = {
        let node = node.clone();
        let c = c.clone();
        tokio::spawn(async move {
            for i in 0..TOTAL {
                node.publish(&c, None, text(format!("{i}"))).await.unwrap();
                if i % 16 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    // Join at several points during the burst, each from the very beginning (Last(all)).
    let mut joins = Vec::new();
    for _ in 0..8 {
        tokio::task::yield_now().await;
        let sub = node
            .subscribe(
                std::slice::from_ref(&c),
                &Start::Last(usize::MAX),
                usize::MAX,
                None,
            )
            .await
            .unwrap();
        joins.push(sub);
    }
    publisher.await.unwrap();
    for mut sub in joins {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            sub.drain(|e, _| match e {
                Event::Message(m) => seen.push(m.offset),
                Event::Gap(g) => panic!("unexpected gap {g:?}"),
                Event::Presence(_) => {}
            })
            .unwrap();
            if seen.last() == Some(&TOTAL) {
                break;
            }
            tokio::time::timeout_at(deadline, sub.ready())
                .await
                .expect("the subscriber receives everything");
        }
        assert_eq!(seen, (1..=TOTAL).collect::<Vec<_>>());
    }
}

pub async fn resuming_from_a_cursor_replays_then_goes_live(f: &dyn BrokerFactory) {
    let (hub, b) = setup(f, 100, LONG).await;
    let node = Node::new(hub, b, policies(100, LONG));
    let c = ch("conf:resume");
    let mut cursor = None;
    for i in 1..=3 {
        let m = node.publish(&c, None, text(format!("{i}"))).await.unwrap();
        if i == 1 {
            cursor = Some(Cursor::decode(std::str::from_utf8(m.cursor()).unwrap()).unwrap());
        }
    }
    let mut sub = node
        .subscribe(
            std::slice::from_ref(&c),
            &Start::Cursor(cursor.unwrap()),
            1 << 20,
            None,
        )
        .await
        .unwrap();
    node.publish(&c, None, text("4".into())).await.unwrap();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while seen.len() < 3 {
        sub.drain(|e, cursor| {
            if let Event::Message(m) = e {
                assert_eq!(cursor, m.cursor());
                seen.push(m.offset);
            }
        })
        .unwrap();
        if seen.len() < 3 {
            tokio::time::timeout_at(deadline, sub.ready())
                .await
                .unwrap();
        }
    }
    assert_eq!(seen, vec![2, 3, 4]);
}

pub async fn stats_and_channels_report_what_the_broker_holds(f: &dyn BrokerFactory) {
    let (_, b) = setup(f, 2, LONG).await;
    let c = ch("conf:stats");
    assert_eq!(b.stats(&ch("conf:never")).await.unwrap(), None);
    for _ in 0..3 {
        b.publish(&c, None, text("x".into())).await.unwrap();
    }
    let s = b.stats(&c).await.unwrap().expect("stats");
    assert_eq!((s.top.offset, s.history_len), (3, 2));
    assert!(b.channels().await.unwrap().contains(&c));
    b.ready().await.unwrap();
}
