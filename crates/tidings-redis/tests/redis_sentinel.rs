//! The Redis broker behind Redis Sentinel: it finds the primary through the sentinels, answers
//! 503 while none is reachable, and follows a failover (the primary killed, or moved by hand)
//! to the promoted replica without losing what was acknowledged. Real `redis-server` and
//! `redis-server --sentinel` processes on free loopback ports.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tidings_core::{
    Broker, BrokerError, ChannelName, ChannelPolicy, Data, DisconnectReason, Event, Hub,
    LivePolicies, Node, Policies, Start, Subscription,
};
use tidings_redis::{RedisBroker, RedisOptions};
use tokio::time::Instant;

use support::{RedisServer, free_port, unique_prefix};

/// Sentinel needs `down-after-milliseconds` plus an election and a promotion; generous for a
/// loaded machine.
const FAILOVER_WITHIN: Duration = Duration::from_secs(40);
const WAIT: Duration = Duration::from_secs(10);

fn policies() -> Arc<LivePolicies> {
    LivePolicies::new(Policies {
        default: ChannelPolicy {
            history_size: 1000,
            ..ChannelPolicy::default()
        },
        namespaces: Default::default(),
    })
}

fn text(s: &str) -> Data {
    Data::Text(Bytes::from(s.to_owned()))
}

/// A primary, one replica in sync with it, and one sentinel that knows both.
struct Deployment {
    primary: RedisServer,
    replica: RedisServer,
    sentinel: RedisServer,
}

impl Deployment {
    async fn start() -> Self {
        let primary = RedisServer::start();
        let replica = RedisServer::start_on(
            free_port(),
            &["--replicaof", "127.0.0.1", &primary.port.to_string()],
        );
        let sentinel = RedisServer::start_sentinel("mymaster", primary.port, 300);
        let d = Self {
            primary,
            replica,
            sentinel,
        };
        tidings_testkit::eventually(
            "the replica is in sync and the sentinel knows it",
            WAIT * 3,
            Duration::from_millis(50),
            async || {
                d.replica
                    .command("INFO replication")
                    .contains("master_link_status:up")
                    && d.sentinel
                        .command("SENTINEL replicas mymaster")
                        .contains(&d.replica.port.to_string())
            },
        )
        .await;
        d
    }

    fn url(&self) -> String {
        format!("redis+sentinel://127.0.0.1:{}/mymaster", self.sentinel.port)
    }

    fn primary_port(&self) -> u16 {
        let reply = self
            .sentinel
            .command("SENTINEL get-master-addr-by-name mymaster");
        support::bulk_lines(&reply)
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }
}

/// Waits until Sentinel has swapped the two roles.
async fn failover_completed(old_primary: &RedisServer, replica: &RedisServer) {
    tidings_testkit::eventually(
        "sentinel completes the failover",
        FAILOVER_WITHIN,
        Duration::from_millis(100),
        async || {
            replica.command("ROLE").contains("master")
                && old_primary.command("ROLE").contains("slave")
        },
    )
    .await;
}

/// Whether `server` holds offset 2 of channel `news` under `prefix` (where a write landed).
fn holds_offset_2(server: &RedisServer, prefix: &str) -> bool {
    let key = format!("{prefix}:{{news}}:m");
    server
        .command(&format!("HGET {key} o"))
        .contains("\r\n2\r\n")
}

async fn node(url: &str, prefix: &str) -> (Arc<Node>, Arc<RedisBroker>) {
    let hub = Arc::new(Hub::new());
    let broker = RedisBroker::connect(RedisOptions::from_url(url, prefix), hub.clone(), policies())
        .await
        .unwrap();
    (Node::new(hub, broker.clone(), policies()), broker)
}

/// Waits for the next message, failing on a gap.
async fn next_offset(sub: &mut Subscription) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut got = None;
        sub.drain(|e, _| match e {
            Event::Message(m) if got.is_none() => got = Some(m.offset),
            Event::Gap(g) => panic!("unexpected gap {g:?}"),
            _ => {}
        })
        .expect("the session stays up");
        if let Some(o) = got {
            return o;
        }
        tokio::time::timeout_at(deadline, sub.ready())
            .await
            .expect("a message arrives");
    }
}

/// Waits for the next `n` messages, failing on a gap; returns their offsets.
async fn next_offsets(sub: &mut Subscription, n: usize) -> Vec<u64> {
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    loop {
        sub.drain(|e, _| match e {
            Event::Message(m) => got.push(m.offset),
            Event::Gap(g) => panic!("unexpected gap {g:?}"),
            _ => {}
        })
        .expect("the session stays up");
        if got.len() >= n {
            return got;
        }
        tokio::time::timeout_at(deadline, sub.ready())
            .await
            .expect("the messages arrive");
    }
}

/// Publishes until a publish succeeds (they answer 503 while no primary is reachable).
async fn published_once_up(a: &Node, c: &ChannelName) -> Arc<tidings_core::Message> {
    let mut done = None;
    tidings_testkit::eventually(
        "a publish succeeds on the promoted primary",
        FAILOVER_WITHIN,
        Duration::from_millis(100),
        async || match a.publish(c, None, text("two")).await {
            Ok(p) => {
                done = Some(p);
                true
            }
            Err(BrokerError::Unavailable(_)) => false,
            Err(e) => panic!("unexpected publish error {e:?}"),
        },
    )
    .await;
    done.expect("published")
}

async fn ended(sub: &mut Subscription) -> DisconnectReason {
    let deadline = Instant::now() + WAIT;
    loop {
        match sub.drain(|_, _| {}) {
            Err(reason) => return reason,
            Ok(_) => tokio::time::timeout_at(deadline, sub.ready())
                .await
                .expect("the session is ended"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_primary_is_killed_publishes_answer_503_until_sentinel_promotes_the_replica_then_resume_without_a_gap()
 {
    let mut d = Deployment::start().await;
    let prefix = unique_prefix("sentinel");
    let (a, broker) = node(&d.url(), &prefix).await;
    let c = ChannelName::new("news").unwrap();
    let mut sub = a
        .subscribe(std::slice::from_ref(&c), &Start::Now, 1 << 20, None)
        .await
        .unwrap();
    let first = a.publish(&c, None, text("one")).await.unwrap();
    assert_eq!(next_offset(&mut sub).await, 1);
    // Acknowledged by the replica too, so the promoted replica holds it.
    assert!(d.primary.command("WAIT 1 2000").starts_with(":1"));

    let old_port = d.primary.port;
    d.primary.kill();
    assert_eq!(ended(&mut sub).await, DisconnectReason::BrokerUnavailable);
    match a.publish(&c, None, text("refused")).await {
        Err(BrokerError::Unavailable(_)) => {}
        other => panic!("a publish with no primary is refused, got {other:?}"),
    }

    let second = published_once_up(&a, &c).await;
    assert_eq!(
        d.primary_port(),
        d.replica.port,
        "sentinel promoted the replica"
    );
    assert_ne!(d.replica.port, old_port);
    assert_eq!(
        (&second.epoch, second.offset),
        (&first.epoch, 2),
        "the promoted replica continues the channel"
    );
    assert!(broker.ready().await.is_ok());
    let since = tidings_core::Cursor::single(&c, first.position());
    let mut sub = a
        .subscribe(
            std::slice::from_ref(&c),
            &Start::Cursor(since),
            1 << 20,
            None,
        )
        .await
        .unwrap();
    assert_eq!(next_offset(&mut sub).await, 2);
    a.publish(&c, None, text("three")).await.unwrap();
    assert_eq!(next_offset(&mut sub).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_ordered_by_hand_moves_the_node_to_the_new_primary_while_the_old_one_lives_on() {
    let d = Deployment::start().await;
    let prefix = unique_prefix("switch");
    let (a, _broker) = node(&d.url(), &prefix).await;
    let c = ChannelName::new("news").unwrap();
    let first = a.publish(&c, None, text("one")).await.unwrap();
    assert!(d.primary.command("WAIT 1 2000").starts_with(":1"));
    let mut sub = a
        .subscribe(std::slice::from_ref(&c), &Start::Now, 1 << 20, None)
        .await
        .unwrap();

    assert!(
        d.sentinel
            .command("SENTINEL FAILOVER mymaster")
            .starts_with("+OK")
    );
    // The node drops its sessions (they resume from their cursors) and moves over.
    assert_eq!(ended(&mut sub).await, DisconnectReason::BrokerUnavailable);
    failover_completed(&d.primary, &d.replica).await;
    let second = published_once_up(&a, &c).await;
    assert_eq!((&second.epoch, second.offset), (&first.epoch, 2));
    // The write went to the new primary (the old one, now a replica, would refuse it).
    assert!(
        holds_offset_2(&d.replica, &prefix),
        "the new primary holds offset 2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_check_asks_each_sentinel_over_one_kept_connection_not_a_new_one_per_second() {
    let d = Deployment::start().await;
    let (_a, _broker) = node(&d.url(), &unique_prefix("asking")).await;
    // Every second the node asks where the primary is. On one kept connection, that
    // connection's last command is `SENTINEL MASTER` and it grows old; a connection per
    // question would be closed after its answer, so none would reach three seconds.
    let asking = || {
        d.sentinel
            .command("CLIENT LIST")
            .lines()
            .filter(|l| l.contains("cmd=sentinel|master"))
            .filter_map(|l| {
                l.split(' ')
                    .find_map(|f| f.strip_prefix("age="))
                    .and_then(|a| a.parse::<u64>().ok())
            })
            .collect::<Vec<_>>()
    };
    tidings_testkit::eventually(
        "a connection that asked about the master is three seconds old",
        WAIT,
        Duration::from_millis(100),
        async || asking().iter().any(|&age| age >= 3),
    )
    .await;
    assert_eq!(asking().len(), 1, "one asking connection per sentinel");
}

#[test]
fn a_sentinel_url_that_names_no_reachable_sentinel_fails_at_connect_with_a_clear_error() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let port = free_port();
    let e = rt
        .block_on(RedisBroker::connect(
            RedisOptions::from_url(
                &format!("redis+sentinel://:pw@127.0.0.1:{port}/mymaster"),
                "p",
            ),
            Arc::new(Hub::new()),
            policies(),
        ))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.starts_with("cannot connect to Redis at redis+sentinel://:****@"),
        "{e}"
    );
    assert!(!e.contains("pw@"), "{e}");
}

/// A primary, one replica and three sentinels with quorum 2 (the deployment the docs
/// recommend), plus, when asked, a fourth sentinel that never hears the others.
struct Quorum {
    primary: RedisServer,
    replica: RedisServer,
    sentinels: Vec<RedisServer>,
    /// Logs in as a user without pub/sub rights, so it never hears the other sentinels'
    /// hellos: after a failover it still names the old primary, with the old epoch.
    deaf: Option<RedisServer>,
}

const DEAF_USER: [&str; 6] = ["--user", "deaf", "on", ">deafpw", "~*", "+@all"];

impl Quorum {
    async fn start(with_deaf: bool) -> Self {
        let primary = RedisServer::start_on(free_port(), &DEAF_USER);
        let mut replica_args = vec!["--replicaof", "127.0.0.1"];
        let primary_port = primary.port.to_string();
        replica_args.push(&primary_port);
        replica_args.extend(DEAF_USER);
        let replica = RedisServer::start_on(free_port(), &replica_args);
        let sentinels: Vec<RedisServer> = (0..3)
            .map(|_| RedisServer::start_sentinel_with("mymaster", primary.port, 2, 500, ""))
            .collect();
        let deaf = with_deaf.then(|| {
            RedisServer::start_sentinel_with(
                "mymaster",
                primary.port,
                2,
                500,
                "sentinel auth-user mymaster deaf\nsentinel auth-pass mymaster deafpw\n",
            )
        });
        let q = Self {
            primary,
            replica,
            sentinels,
            deaf,
        };
        tidings_testkit::eventually(
            "the replica is in sync and every sentinel knows it and the two others",
            WAIT * 3,
            Duration::from_millis(50),
            async || {
                q.replica
                    .command("INFO replication")
                    .contains("master_link_status:up")
                    && q.sentinels.iter().all(|s| {
                        let others = s.command("SENTINEL sentinels mymaster");
                        s.command("SENTINEL replicas mymaster")
                            .contains(&q.replica.port.to_string())
                            && q.sentinels
                                .iter()
                                .filter(|o| o.port != s.port)
                                .all(|o| others.contains(&o.port.to_string()))
                    })
                    && q.deaf.as_ref().is_none_or(|d| {
                        d.command("SENTINEL replicas mymaster")
                            .contains(&q.replica.port.to_string())
                    })
            },
        )
        .await;
        q
    }

    /// The sentinels in the URL: the deaf one first, where it does the most harm.
    fn url(&self) -> String {
        let hosts: Vec<String> = self
            .deaf
            .iter()
            .chain(&self.sentinels)
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+sentinel://{}/mymaster", hosts.join(","))
    }

    fn named_by(s: &RedisServer) -> u16 {
        support::bulk_lines(&s.command("SENTINEL get-master-addr-by-name mymaster"))
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_three_sentinels_one_killed_then_the_primary_killed_the_node_follows_the_failover_and_loses_nothing_acknowledged()
 {
    let mut q = Quorum::start(false).await;
    let prefix = unique_prefix("quorum");
    let (a, _broker) = node(&q.url(), &prefix).await;
    let c = ChannelName::new("news").unwrap();
    let mut sub = a
        .subscribe(std::slice::from_ref(&c), &Start::Now, 1 << 20, None)
        .await
        .unwrap();
    let first = a.publish(&c, None, text("one")).await.unwrap();
    assert_eq!(next_offset(&mut sub).await, 1);

    // The first sentinel of the URL dies: the node keeps working, and asks the others.
    q.sentinels[0].kill();
    let second = a.publish(&c, None, text("two")).await.unwrap();
    assert_eq!(next_offset(&mut sub).await, 2);
    assert!(q.primary.command("WAIT 1 2000").starts_with(":1"));

    // Then the primary: the two sentinels left are a quorum and a majority of three.
    q.primary.kill();
    assert_eq!(ended(&mut sub).await, DisconnectReason::BrokerUnavailable);
    let third = published_once_up(&a, &c).await;
    assert_eq!(Quorum::named_by(&q.sentinels[1]), q.replica.port);
    assert_eq!(
        (&third.epoch, third.offset),
        (&first.epoch, 3),
        "the promoted replica continues the channel"
    );
    // A subscriber that saw offset 1 resumes and gets every acknowledged message after it.
    let mut sub = a
        .subscribe(
            std::slice::from_ref(&c),
            &Start::Cursor(tidings_core::Cursor::single(&c, first.position())),
            1 << 20,
            None,
        )
        .await
        .unwrap();
    assert_eq!(next_offsets(&mut sub, 2).await, [second.offset, 3]);
    a.publish(&c, None, text("four")).await.unwrap();
    assert_eq!(next_offsets(&mut sub, 1).await, [4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_still_naming_the_old_primary_is_outvoted_by_the_newer_epoch_and_a_stopped_one_costs_nothing()
 {
    let q = Quorum::start(true).await;
    let deaf = q.deaf.as_ref().unwrap();
    let prefix = unique_prefix("stale");
    let (a, _broker) = node(&q.url(), &prefix).await;
    let c = ChannelName::new("news").unwrap();
    let first = a.publish(&c, None, text("one")).await.unwrap();
    assert!(q.primary.command("WAIT 1 2000").starts_with(":1"));
    let mut sub = a
        .subscribe(std::slice::from_ref(&c), &Start::Now, 1 << 20, None)
        .await
        .unwrap();

    // One sentinel stops answering (it still accepts connections), and a failover is
    // ordered; the old primary lives on and becomes a replica.
    q.sentinels[0].pause(true);
    assert!(
        q.sentinels[1]
            .command("SENTINEL FAILOVER mymaster")
            .starts_with("+OK")
    );
    assert_eq!(ended(&mut sub).await, DisconnectReason::BrokerUnavailable);
    failover_completed(&q.primary, &q.replica).await;
    let second = published_once_up(&a, &c).await;
    assert_eq!((&second.epoch, second.offset), (&first.epoch, 2));
    assert!(
        holds_offset_2(&q.replica, &prefix),
        "the write went to the new primary"
    );
    // The premise: the first sentinel of the URL still names the old primary.
    assert_eq!(
        Quorum::named_by(deaf),
        q.primary.port,
        "the deaf sentinel is stale"
    );

    // And the node stays on the new primary: a session opened now is not ended by the
    // health checks (every second) for three seconds of publishes.
    let since = tidings_core::Cursor::single(&c, second.position());
    let mut sub = a
        .subscribe(
            std::slice::from_ref(&c),
            &Start::Cursor(since),
            1 << 20,
            None,
        )
        .await
        .unwrap();
    let until = Instant::now() + Duration::from_secs(3);
    let mut offset = 2;
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    while Instant::now() < until {
        pace.tick().await;
        let p = a.publish(&c, None, text("more")).await.unwrap();
        offset += 1;
        assert_eq!(p.offset, offset);
        assert_eq!(next_offset(&mut sub).await, offset);
    }
    q.sentinels[0].pause(false);
}
