//! Redis broker vs memory broker: publishes/s, deliveries/s, CPU per delivery on the node and
//! on Redis. Not a test: run it by hand and copy the table into `docs/redis.md`.
//!
//! ```text
//! cargo run --release -p tidings-redis --example bench [-- MESSAGES SUBSCRIBERS PUBLISHERS]
//! ```
//!
//! It starts its own `redis-server` (no persistence) on a free loopback port. Each scenario
//! publishes MESSAGES messages of 100 bytes to one channel from PUBLISHERS concurrent tasks
//! (each awaits its publish, as an HTTP publisher would) while SUBSCRIBERS local sessions
//! drain it, and measures until every session has every message. CPU comes from
//! `/proc/<pid>/stat` (utime + stime): this process is the node (publishers and subscribers
//! included, no HTTP), the other is Redis.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use tidings_core::{
    Broker, ChannelName, ChannelPolicy, Data, Hub, LivePolicies, Node, Policies, Start,
};
use tidings_redis::{RedisBroker, RedisOptions};

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
        f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
    });
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn policies() -> Arc<LivePolicies> {
    LivePolicies::new(Policies {
        default: ChannelPolicy {
            history_size: 1000,
            ..ChannelPolicy::default()
        },
        namespaces: Default::default(),
    })
}

struct Outcome {
    name: &'static str,
    seconds: f64,
    publishes: u64,
    deliveries: u64,
    node_cpu: f64,
    redis_cpu: Option<f64>,
}

/// Publishes through `publisher` while `subscribers` sessions on `receiver` drain.
async fn run(
    name: &'static str,
    publisher: Arc<Node>,
    receiver: Arc<Node>,
    redis_pid: Option<u32>,
    messages: u64,
    subscribers: usize,
    publishers: u64,
) -> Outcome {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let channel =
        ChannelName::new(&format!("bench:{}", RUNS.fetch_add(1, Ordering::Relaxed))).unwrap();
    let delivered = Arc::new(AtomicU64::new(0));
    let mut drains = Vec::new();
    for _ in 0..subscribers {
        let mut sub = receiver
            .subscribe(std::slice::from_ref(&channel), &Start::Now, 64 << 20, None)
            .await
            .unwrap();
        let delivered = delivered.clone();
        drains.push(tokio::spawn(async move {
            let mut seen = 0u64;
            while seen < messages {
                sub.ready().await;
                let n = sub
                    .drain(|_, _| {})
                    .expect("a bench session is never ended") as u64;
                seen += n;
                delivered.fetch_add(n, Ordering::Relaxed);
            }
        }));
    }
    let payload = Bytes::from(vec![b'x'; 100]);
    let node_before = cpu_seconds(std::process::id());
    let redis_before = redis_pid.map(cpu_seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..publishers {
        let publisher = publisher.clone();
        let channel = channel.clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..messages / publishers {
                publisher
                    .publish(&channel, None, Data::Text(payload.clone()))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for d in drains {
        tokio::time::timeout(Duration::from_secs(120), d)
            .await
            .expect("every message delivered")
            .unwrap();
    }
    let seconds = started.elapsed().as_secs_f64();
    Outcome {
        name,
        seconds,
        publishes: messages,
        deliveries: delivered.load(Ordering::Relaxed),
        node_cpu: cpu_seconds(std::process::id()) - node_before,
        redis_cpu: redis_pid.map(|p| cpu_seconds(p) - redis_before.unwrap_or(0.0)),
    }
}

async fn redis_node(url: &str, prefix: &str) -> Arc<Node> {
    let hub = Arc::new(Hub::new());
    let broker = RedisBroker::connect(RedisOptions::from_url(url, prefix), hub.clone(), policies())
        .await
        .unwrap();
    Node::new(hub, broker as Arc<dyn Broker>, policies())
}

#[tokio::main]
async fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let messages = args.first().copied().unwrap_or(20_000);
    let subscribers = args.get(1).copied().unwrap_or(100) as usize;
    let publishers = args.get(2).copied().unwrap_or(16).max(1);
    let messages = (messages / publishers).max(1) * publishers;
    let redis = support::RedisServer::start();
    let url = redis.url();
    let mut outcomes = Vec::new();

    // Publish-only first (no subscriber anywhere), then fan-out.
    let memory = Node::memory((*policies().current()).clone());
    outcomes.push(
        run(
            "memory, publish only",
            memory.clone(),
            memory,
            None,
            messages,
            0,
            publishers,
        )
        .await,
    );
    let r = redis_node(&url, "bench1").await;
    outcomes.push(
        run(
            "redis, publish only",
            r.clone(),
            r,
            Some(redis.pid),
            messages,
            0,
            publishers,
        )
        .await,
    );

    let memory = Node::memory((*policies().current()).clone());
    outcomes.push(
        run(
            "memory, one node",
            memory.clone(),
            memory,
            None,
            messages,
            subscribers,
            publishers,
        )
        .await,
    );
    let r = redis_node(&url, "bench2").await;
    outcomes.push(
        run(
            "redis, one node",
            r.clone(),
            r,
            Some(redis.pid),
            messages,
            subscribers,
            publishers,
        )
        .await,
    );
    let a = redis_node(&url, "bench3").await;
    let b = redis_node(&url, "bench3").await;
    outcomes.push(
        run(
            "redis, publish on A, subscribers on B",
            a,
            b,
            Some(redis.pid),
            messages,
            subscribers,
            publishers,
        )
        .await,
    );

    println!(
        "{messages} messages of 100 bytes, {publishers} concurrent publishers, {subscribers} subscribers (publish-only rows: none)\n"
    );
    println!(
        "| scenario | publishes/s | deliveries/s | node CPU µs/publish | node CPU µs/delivery | Redis CPU µs/publish | Redis CPU µs/delivery |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for o in outcomes {
        let per = |cpu: f64, n: u64| {
            if n == 0 {
                "–".to_owned()
            } else {
                format!("{:.2}", cpu * 1e6 / n as f64)
            }
        };
        println!(
            "| {} | {:.0} | {} | {} | {} | {} | {} |",
            o.name,
            o.publishes as f64 / o.seconds,
            if o.deliveries == 0 {
                "–".to_owned()
            } else {
                format!("{:.0}", o.deliveries as f64 / o.seconds)
            },
            per(o.node_cpu, o.publishes),
            per(o.node_cpu, o.deliveries),
            o.redis_cpu.map_or("–".to_owned(), |c| per(c, o.publishes)),
            o.redis_cpu.map_or("–".to_owned(), |c| per(c, o.deliveries)),
        );
    }
}
