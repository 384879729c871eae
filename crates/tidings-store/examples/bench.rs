//! Numbers for docs/storage.md: the broker in process, with no HTTP in the way.
//!
//! ```sh
//! cargo run --release -p tidings-store --example bench -- publish DIR [SECONDS]
//! cargo run --release -p tidings-store --example bench -- log DIR [MEGABYTES]
//! cargo run --release -p tidings-store --example bench -- memory DIR CHANNELS MESSAGES [CACHE|none]
//! cargo run --release -p tidings-store --example bench -- stall DIR [MESSAGES]
//! ```
//!
//! `publish`: 8 concurrent publishers (tokio tasks on 2 worker threads) on 8 channels, against
//! the memory broker and the durable one under each `fsync` mode: publishes/s and latency
//! percentiles. `log`: append ~N MB of 200-byte messages to a fresh data dir (unsynced, then
//! one fsync), reopen it and time the replay, compact it down to the last 100 per channel, and
//! read from an offset (50 back: past the cache, so from disk). `memory`: publish MESSAGES
//! 100-byte messages to each of CHANNELS channels (history_size 100) with a data dir whose
//! cache is CACHE messages per channel (or, with `none`, the memory broker alone), and print
//! the process's resident memory before and after, then time resumes from 50 back.
//! `stall`: 8 publishers publish MESSAGES 200-byte messages over 1,000 channels that retain
//! 500 each (~125 MB retained at most), so the log compacts as it grows;
//! prints each compaction seen (the log shrank) and the publish latency percentiles and
//! maximum: how long publishing waits while a compaction copies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use tidings_core::broker::memory::{MemoryBroker, Restore};
use tidings_core::store::Store;
use tidings_core::{
    Broker, ChannelName, Data, Fsync, Hub, LivePolicies, Policies, Position, Since,
};

const PUBLISHERS: usize = 8;

fn open_durable(dir: &Path, policies: &Arc<LivePolicies>, fsync: Fsync) -> Arc<MemoryBroker> {
    let mut restore = Restore::new(policies.clone());
    let (store, _) = tidings_store::open(dir, tidings_store::Options::default(), &mut |r| {
        restore.apply(r)
    })
    .unwrap();
    MemoryBroker::durable(
        Arc::new(Hub::new()),
        policies.clone(),
        restore,
        Box::new(store),
        fsync,
    )
    .unwrap()
}

async fn publish_run(name: &str, broker: Arc<dyn Broker>, seconds: f64) {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let broker = broker.clone();
        tasks.push(tokio::spawn(async move {
            let channel = ChannelName::new(&format!("bench:{p}")).unwrap();
            let payload = Bytes::from(vec![b'x'; 100]);
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                broker
                    .publish(&channel, None, Data::Text(payload.clone()))
                    .await
                    .unwrap();
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    let pct = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    println!(
        "{name:>14}: {:>9.0} publishes/s   p50 {:>8.1} µs   p99 {:>8.1} µs   p99.9 {:>8.1} µs",
        all.len() as f64 / seconds,
        pct(0.50).as_secs_f64() * 1e6,
        pct(0.99).as_secs_f64() * 1e6,
        pct(0.999).as_secs_f64() * 1e6,
    );
}

fn fresh(dir: &Path, name: &str) -> PathBuf {
    let d = dir.join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

async fn publish(dir: &Path, seconds: f64) {
    let policies = LivePolicies::new(Policies::default());
    println!("{PUBLISHERS} publishers, 100-byte messages, {seconds} s each");
    publish_run(
        "memory",
        MemoryBroker::new(Arc::new(Hub::new()), policies.clone()),
        seconds,
    )
    .await;
    for fsync in [Fsync::Never, Fsync::Batch, Fsync::Always] {
        let d = fresh(dir, fsync.as_str());
        let broker = open_durable(&d, &policies, fsync);
        publish_run(&format!("fsync={}", fsync.as_str()), broker, seconds).await;
        let _ = std::fs::remove_dir_all(&d);
    }
}

fn log(dir: &Path, megabytes: u64) {
    let d = fresh(dir, "log");
    let channels = 1_000usize;
    let (mut store, _) =
        tidings_store::open(&d, tidings_store::Options::default(), &mut |_| {}).unwrap();
    let payload = Bytes::from(vec![b'x'; 200]);
    let target = megabytes << 20;
    let t = Instant::now();
    let mut n = 0u64;
    let mut batch = Vec::with_capacity(256);
    // Where each channel's last 100 messages lie (what the broker's index holds).
    let mut kept: Vec<std::collections::VecDeque<tidings_core::store::Loc>> =
        vec![Default::default(); channels];
    let epoch = tidings_core::Epoch::new("bench").unwrap();
    let names: Vec<ChannelName> = (0..channels)
        .map(|i| ChannelName::new(&format!("c{i}")).unwrap())
        .collect();
    while store.bytes_on_disk() < target {
        batch.clear();
        let mut which = Vec::with_capacity(256);
        for _ in 0..256 {
            let c = (n as usize) % channels;
            which.push(c);
            let offset = n / channels as u64 + 1;
            batch.push((
                Arc::new(tidings_core::Message::new(
                    names[c].clone(),
                    Position {
                        epoch: epoch.clone(),
                        offset,
                    },
                    None,
                    Data::Text(payload.clone()),
                    tidings_core::broker::memory::now_millis(),
                )),
                None,
            ));
            n += 1;
        }
        let locs = store.append(&batch, false).unwrap();
        for (&c, loc) in which.iter().zip(locs) {
            let k = &mut kept[c];
            if k.len() == 100 {
                k.pop_front();
            }
            k.push_back(loc);
        }
    }
    store.append(&batch[..0], true).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let bytes = store.bytes_on_disk();
    println!(
        "append: {n} messages, {:.0} MB in {secs:.2} s = {:.0} messages/s, {:.0} MB/s (256 per write, unsynced)",
        bytes as f64 / 1e6,
        n as f64 / secs,
        bytes as f64 / 1e6 / secs
    );
    drop(store);

    let policies = LivePolicies::new(Policies::default());
    let t = Instant::now();
    let mut restore = Restore::new(policies.clone());
    let (store, report) = tidings_store::open(&d, tidings_store::Options::default(), &mut |r| {
        restore.apply(r)
    })
    .unwrap();
    println!(
        "reopen: {} records in {} segments ({:.0} MB) replayed in {:.2} s, {} channels restored",
        report.records,
        report.segments,
        report.bytes as f64 / 1e6,
        t.elapsed().as_secs_f64(),
        restore.len()
    );
    // Trim: rewrite the log down to the last 100 messages of every channel (what the broker
    // hands the store when it compacts), then delete the old segments.
    let mut store = store;
    let last = n / channels as u64;
    let t = Instant::now();
    let snapshots = names
        .iter()
        .zip(&kept)
        .map(|(c, k)| tidings_core::store::Snapshot {
            channel: c.clone(),
            epoch: epoch.clone(),
            last_offset: last,
            locs: k.iter().copied().collect(),
        });
    store.compact(snapshots.collect(), Vec::new()).unwrap();
    println!(
        "trim (compaction to 100 per channel): {:.0} MB -> {:.0} MB in {:.2} s",
        report.bytes as f64 / 1e6,
        store.bytes_on_disk() as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let broker = MemoryBroker::durable(
        Arc::new(Hub::new()),
        policies,
        restore,
        Box::new(store),
        Fsync::Batch,
    )
    .unwrap();
    let t = Instant::now();
    let reads = 100_000u64;
    let mut got = 0;
    rt.block_on(async {
        for i in 0..reads {
            let c = &names[(i as usize * 7919) % channels];
            let top = broker.stats(c).await.unwrap().unwrap().top;
            let since = Since::After(Position {
                epoch: top.epoch.clone(),
                offset: top.offset.saturating_sub(50),
            });
            got += broker
                .read(c, &since, None)
                .await
                .unwrap()
                .replay
                .messages()
                .len();
        }
    });
    println!(
        "read from an offset (50 back: 16 from the cache, 34 from disk): {:.2} µs per read ({got} messages)",
        t.elapsed().as_secs_f64() * 1e6 / reads as f64
    );
    drop(broker);
    let _ = std::fs::remove_dir_all(&d);
}

/// Resident and peak resident memory of this process, in MB (Linux).
fn rss() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn memory(dir: &Path, channels: usize, messages: u64, cache: Option<usize>) {
    let policies = LivePolicies::new(Policies {
        default: tidings_core::ChannelPolicy {
            history_size: 100,
            history_ttl: Duration::from_secs(3600),
            ..Default::default()
        },
        namespaces: Default::default(),
    });
    let d = fresh(dir, "memory");
    let (before, _) = rss();
    let broker: Arc<MemoryBroker> = match cache {
        None => MemoryBroker::new(Arc::new(Hub::new()), policies.clone()),
        Some(cache) => {
            let mut restore = Restore::new(policies.clone()).with_cache(cache);
            let (store, _) = tidings_store::open(&d, tidings_store::Options::default(), &mut |r| {
                restore.apply(r)
            })
            .unwrap();
            MemoryBroker::durable(
                Arc::new(Hub::new()),
                policies.clone(),
                restore,
                Box::new(store),
                Fsync::Never,
            )
            .unwrap()
        }
    };
    let names: Arc<Vec<ChannelName>> = Arc::new(
        (0..channels)
            .map(|i| ChannelName::new(&format!("room:{i}")).unwrap())
            .collect(),
    );
    let t = Instant::now();
    // Round by round (every channel gets its i-th message, then the next), so one channel's
    // records are spread over the whole log as they are in a real server.
    for _ in 0..messages {
        let mut tasks = Vec::new();
        for p in 0..64 {
            let (broker, names) = (broker.clone(), names.clone());
            tasks.push(tokio::spawn(async move {
                let payload = Bytes::from(vec![b'x'; 100]);
                for c in names.iter().skip(p).step_by(64) {
                    broker
                        .publish(c, None, Data::Text(payload.clone()))
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    let took = t.elapsed().as_secs_f64();
    let (after, peak) = rss();
    let mode = match cache {
        None => "memory broker (no data dir)".to_owned(),
        Some(c) => format!("data dir, history_cache = {c}"),
    };
    println!(
        "{mode}: {channels} channels x {messages} messages of 100 B in {took:.1} s; RSS {before:.0} MB -> {after:.0} MB (peak {peak:.0} MB); on disk {:.0} MB",
        broker.bytes_on_disk().unwrap_or(0) as f64 / 1e6
    );
    let reads = 10_000usize;
    let t = Instant::now();
    let mut got = 0;
    for i in 0..reads {
        let c = &names[(i * 7919) % channels];
        let top = broker.stats(c).await.unwrap().unwrap().top;
        let since = Since::After(Position {
            epoch: top.epoch.clone(),
            offset: top.offset.saturating_sub(50),
        });
        let read = broker.read(c, &since, None).await.unwrap();
        assert!(read.replay.gap().is_none());
        got += read.replay.messages().len();
    }
    println!(
        "  resume from 50 back: {:.1} µs per read ({got} messages); RSS after the reads {:.0} MB",
        t.elapsed().as_secs_f64() * 1e6 / reads as f64,
        rss().0
    );
    drop(broker);
    let _ = std::fs::remove_dir_all(&d);
}

async fn stall(dir: &Path, messages: u64) {
    let _ = std::fs::remove_dir_all(dir);
    let policies = LivePolicies::new(Policies {
        default: tidings_core::ChannelPolicy {
            history_size: 500,
            history_ttl: Duration::from_secs(3600),
            ..Default::default()
        },
        namespaces: Default::default(),
    });
    let broker = open_durable(dir, &policies, Fsync::Batch);
    let per = messages / PUBLISHERS as u64;
    let started = Instant::now();
    let watch = {
        let broker = broker.clone();
        tokio::spawn(async move {
            let mut last = 0u64;
            let mut seen = Vec::new();
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let now = broker.bytes_on_disk().unwrap_or(0);
                if now < last {
                    seen.push((started.elapsed().as_secs_f64(), last, now));
                }
                last = now;
                if Arc::strong_count(&broker) <= 2 {
                    return seen;
                }
            }
        })
    };
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let broker = broker.clone();
        tasks.push(tokio::spawn(async move {
            let payload = Bytes::from(vec![b'x'; 200]);
            let mut latencies = Vec::with_capacity(per as usize);
            for i in 0..per {
                let channel = ChannelName::new(&format!(
                    "stall:{}",
                    (i * PUBLISHERS as u64 + p as u64) % 1000
                ))
                .unwrap();
                let t = Instant::now();
                broker
                    .publish(&channel, None, Data::Text(payload.clone()))
                    .await
                    .unwrap();
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    let seen = watch.await.unwrap();
    all.sort_unstable();
    let pct = |q: f64| all[((all.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    for (at, from, to) in &seen {
        println!(
            "compaction seen at {at:.1} s: {:.0} MB -> {:.0} MB",
            *from as f64 / 1e6,
            *to as f64 / 1e6
        );
    }
    println!(
        "{} publishes in {secs:.1} s ({:.0}/s): latency p50 {:.2} ms, p99 {:.2} ms, p99.99 {:.1} ms, max {:.1} ms",
        all.len(),
        all.len() as f64 / secs,
        pct(0.5),
        pct(0.99),
        pct(0.9999),
        all.last().map_or(0.0, |d| d.as_secs_f64() * 1e3)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = PathBuf::from(args.get(1).map_or("/tmp/tidings-bench", String::as_str));
    match args.first().map(String::as_str) {
        Some("publish") => {
            let seconds = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5.0);
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
                .block_on(publish(&dir, seconds));
        }
        Some("stall") => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(stall(
                &dir,
                args.get(2)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(1_200_000),
            )),
        Some("log") => log(
            &dir,
            args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1024),
        ),
        Some("memory") => {
            let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
            let cache = match args.get(4).map(String::as_str) {
                Some("none") => None,
                other => Some(other.and_then(|s| s.parse().ok()).unwrap_or(16)),
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
                .block_on(memory(&dir, num(2, 100_000), num(3, 100) as u64, cache));
        }
        _ => eprintln!(
            "usage: bench publish DIR [SECONDS] | bench log DIR [MEGABYTES] | bench memory DIR CHANNELS MESSAGES [CACHE|none]"
        ),
    }
}
