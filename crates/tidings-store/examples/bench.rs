//! Numbers for docs/storage.md: the broker in process, with no HTTP in the way.
//!
//! ```sh
//! cargo run --release -p tidings-store --example bench -- publish DIR [SECONDS]
//! cargo run --release -p tidings-store --example bench -- log DIR [MEGABYTES]
//! ```
//!
//! `publish`: 8 concurrent publishers (tokio tasks on 2 worker threads) on 8 channels, against
//! the memory broker and the durable one under each `fsync` mode: publishes/s and latency
//! percentiles. `log`: append ~N MB of 200-byte messages to a fresh data dir (unsynced, then
//! one fsync), reopen it and time the replay, compact it down to the last 100 per channel, and
//! read from an offset.

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
    let epoch = tidings_core::Epoch::new("bench").unwrap();
    let names: Vec<ChannelName> = (0..channels)
        .map(|i| ChannelName::new(&format!("c{i}")).unwrap())
        .collect();
    while store.bytes_on_disk() < target {
        batch.clear();
        for _ in 0..256 {
            let c = (n as usize) % channels;
            let offset = n / channels as u64 + 1;
            batch.push(Arc::new(tidings_core::Message::new(
                names[c].clone(),
                Position {
                    epoch: epoch.clone(),
                    offset,
                },
                None,
                Data::Text(payload.clone()),
                tidings_core::broker::memory::now_millis(),
            )));
            n += 1;
        }
        store.append(&batch, false).unwrap();
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
    let mut snapshots = names.iter().map(|c| tidings_core::store::Snapshot {
        channel: c.clone(),
        epoch: epoch.clone(),
        last_offset: last,
        messages: (last.saturating_sub(99)..=last)
            .map(|offset| {
                Arc::new(tidings_core::Message::new(
                    c.clone(),
                    Position {
                        epoch: epoch.clone(),
                        offset,
                    },
                    None,
                    Data::Text(payload.clone()),
                    0,
                ))
            })
            .collect(),
    });
    store.compact(&mut snapshots).unwrap();
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
        "read from an offset (50 back, in RAM): {:.2} µs per read ({got} messages)",
        t.elapsed().as_secs_f64() * 1e6 / reads as f64
    );
    drop(broker);
    let _ = std::fs::remove_dir_all(&d);
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
        Some("log") => log(
            &dir,
            args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1024),
        ),
        _ => eprintln!("usage: bench publish DIR [SECONDS] | bench log DIR [MEGABYTES]"),
    }
}
