//! History that lives on disk: the memory broker writing through a real data dir, with a
//! small RAM cache, read back across the cache/disk boundary and across restarts (a broker
//! dropped and another opened on the same dir, as a restarted server does).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tidings_testkit::TempDir;

use tokio::time::Instant;

use bytes::Bytes;
use tidings_core::broker::memory::{MemoryBroker, Restore};
use tidings_core::idempotency::PublishOptions;
use tidings_core::{
    Broker, BrokerError, ChannelName, ChannelPolicy, Data, Fsync, GapReason, Hub, IdempotencyKey,
    LivePolicies, Policies, Position, Since,
};

fn policies(history_size: usize) -> Arc<LivePolicies> {
    LivePolicies::new(Policies {
        default: ChannelPolicy {
            history_size,
            history_ttl: Duration::from_secs(3600),
            ..Default::default()
        },
        namespaces: Default::default(),
    })
}

/// Opens a broker on `dir`. The previous broker's writer thread lets go of the dir's lock
/// once it sees the broker gone; until then the open is refused as locked, so it is retried
/// (the event awaited is the lock's release, with a deadline).
fn open(
    dir: &Path,
    history_size: usize,
    cache: usize,
    options: tidings_store::Options,
) -> Arc<MemoryBroker> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let p = policies(history_size);
        let mut restore = Restore::new(p.clone()).with_cache(cache);
        match tidings_store::open(dir, options.clone(), &mut |r| restore.apply(r)) {
            Ok((store, _)) => {
                return MemoryBroker::durable(
                    Arc::new(Hub::new()),
                    p,
                    restore,
                    Box::new(store),
                    Fsync::Batch,
                )
                .unwrap();
            }
            Err(tidings_store::OpenError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::yield_now();
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn text(s: String) -> Data {
    Data::Text(Bytes::from(s))
}

fn ch(name: &str) -> ChannelName {
    ChannelName::new(name).unwrap()
}

fn offsets(r: &tidings_core::HistoryRead) -> Vec<u64> {
    r.replay.messages().iter().map(|m| m.offset).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_an_old_cursor_reads_the_older_part_from_disk_exactly_once_in_order() {
    let dir = TempDir::new("durable-history");
    let c = ch("chat:old");
    let broker = open(&dir.0, 100, 10, Default::default());
    let mut epoch = None;
    for i in 1..=100 {
        let m = broker
            .publish(&c, None, text(format!("m{i}")))
            .await
            .unwrap();
        epoch = Some(m.epoch.clone());
    }
    assert_eq!(
        broker.history_counts(),
        (100, 10),
        "100 retained, only the last 10 in RAM"
    );
    drop(broker);

    // After a restart too, only the cache is read into RAM.
    let broker = open(&dir.0, 100, 10, Default::default());
    assert_eq!(broker.history_counts(), (100, 10));
    let since = Since::After(Position {
        epoch: epoch.clone().unwrap(),
        offset: 50,
    });
    let r = broker.read(&c, &since, None).await.unwrap();
    assert!(r.replay.gap().is_none(), "{:?}", r.replay.gap());
    assert_eq!(offsets(&r), (51..=100).collect::<Vec<_>>());
    for m in r.replay.messages() {
        assert_eq!(m.data, text(format!("m{}", m.offset)));
        assert_eq!(Some(&m.epoch), epoch.as_ref());
    }
    // A limit across the boundary, and `history=N` reaching past the cache.
    let r = broker.read(&c, &since, Some(45)).await.unwrap();
    assert_eq!(offsets(&r), (51..=95).collect::<Vec<_>>());
    let r = broker.read(&c, &Since::Last(30), None).await.unwrap();
    assert_eq!(offsets(&r), (71..=100).collect::<Vec<_>>());
    // Publishing goes on from there, and the next resume crosses the boundary again.
    let m = broker.publish(&c, None, text("m101".into())).await.unwrap();
    assert_eq!(m.offset, 101);
    let r = broker.read(&c, &since, None).await.unwrap();
    assert_eq!(offsets(&r), (51..=101).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_on_disk_is_an_error_for_the_read_never_data() {
    let dir = TempDir::new("durable-history");
    let c = ch("chat:damaged");
    let broker = open(&dir.0, 100, 10, Default::default());
    let mut epoch = None;
    for i in 1..=60 {
        let m = broker
            .publish(&c, None, text(format!("payload-{i:03}")))
            .await
            .unwrap();
        epoch = Some(m.epoch.clone());
    }
    // Alter a record the cache does not hold, under the running broker.
    let seg = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.windows(11).position(|w| w == b"payload-020").unwrap();
    bytes[at + 3] ^= 0x01;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, &bytes[at..at + 11], at as u64))
        .unwrap();
    let from = |offset| {
        Since::After(Position {
            epoch: epoch.clone().unwrap(),
            offset,
        })
    };
    let err = broker.read(&c, &from(10), None).await.unwrap_err();
    assert!(matches!(err, BrokerError::Storage(_)), "{err:?}");
    // Reads that do not cross it are unaffected.
    let r = broker.read(&c, &from(20), None).await.unwrap();
    assert_eq!(offsets(&r), (21..=60).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_size_is_honoured_on_disk_with_a_trimmed_gap_before_what_is_left() {
    let dir = TempDir::new("durable-history");
    let c = ch("chat:trim");
    let broker = open(&dir.0, 100, 10, Default::default());
    let mut epoch = None;
    for i in 1..=150 {
        epoch = Some(
            broker
                .publish(&c, None, text(format!("m{i}")))
                .await
                .unwrap()
                .epoch
                .clone(),
        );
    }
    let r = broker
        .read(
            &c,
            &Since::After(Position {
                epoch: epoch.unwrap(),
                offset: 10,
            }),
            None,
        )
        .await
        .unwrap();
    let gap = r.replay.gap().expect("a gap");
    assert_eq!((gap.reason, gap.next_offset), (GapReason::Trimmed, 51));
    assert_eq!(offsets(&r), (51..=150).collect::<Vec<_>>());
    assert_eq!(broker.history_counts(), (100, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_moves_records_and_reads_from_disk_still_find_them() {
    let dir = TempDir::new("durable-history");
    let small = tidings_store::Options {
        segment_bytes: 16 << 10,
    };
    let broker = open(&dir.0, 20, 2, small.clone());
    // Many channels' records interleaved, far past what is retained: the log compacts
    // several times while this runs.
    let names: Vec<ChannelName> = (0..8).map(|i| ch(&format!("room:{i}"))).collect();
    let mut epoch = None;
    for round in 1..=200u64 {
        for c in &names {
            epoch = Some(
                broker
                    .publish(c, None, text(format!("{c}-{round}-{}", "x".repeat(40))))
                    .await
                    .unwrap()
                    .epoch
                    .clone(),
            );
        }
    }
    // The last compaction's copy may still be running on its own thread: wait for it.
    tidings_testkit::eventually(
        "the last compaction is installed",
        Duration::from_secs(10),
        Duration::from_millis(10),
        async || broker.bytes_on_disk().unwrap() < 200 * 8 * 60,
    )
    .await;
    let on_disk = broker.bytes_on_disk().unwrap();
    assert!(on_disk < 200 * 8 * 60, "compacted: {on_disk} bytes");
    let since = Since::After(Position {
        epoch: epoch.unwrap(),
        offset: 180,
    });
    for c in &names {
        let r = broker.read(c, &since, None).await.unwrap();
        assert!(r.replay.gap().is_none());
        assert_eq!(offsets(&r), (181..=200).collect::<Vec<_>>());
        for m in r.replay.messages() {
            assert!(
                m.data
                    .raw()
                    .starts_with(format!("{c}-{}-", m.offset).as_bytes()),
                "{:?}",
                m.data
            );
        }
    }
    drop(broker);
    let broker = open(&dir.0, 20, 2, small);
    for c in &names {
        let r = broker.read(c, &since, None).await.unwrap();
        assert_eq!(offsets(&r), (181..=200).collect::<Vec<_>>());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_is_still_known_after_a_restart_and_answers_what_it_first_answered() {
    let dir = TempDir::new("durable-history");
    let c = ch("orders");
    let keyed = |key: &str| PublishOptions {
        idempotency_key: Some(IdempotencyKey::new(key).unwrap()),
        idempotency_window: Duration::from_secs(120),
    };
    let broker = open(&dir.0, 100, 4, Default::default());
    let first = broker
        .publish_with(&c, None, text("one".into()), &keyed("order-1"))
        .await
        .unwrap();
    broker.publish(&c, None, text("two".into())).await.unwrap();
    drop(broker);

    let broker = open(&dir.0, 100, 4, Default::default());
    let again = broker
        .publish_with(&c, None, text("one".into()), &keyed("order-1"))
        .await
        .unwrap();
    assert!(again.replayed, "published nothing");
    assert_eq!(again.message.position(), first.message.position());
    assert_eq!(again.message.time, first.message.time);
    let top = broker.stats(&c).await.unwrap().unwrap().top;
    assert_eq!(top.offset, 2, "nothing new was stored");
    // A new key publishes.
    let other = broker
        .publish_with(&c, None, text("three".into()), &keyed("order-2"))
        .await
        .unwrap();
    assert!(!other.replayed);
    assert_eq!(other.message.offset, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_outlives_its_message_through_compaction_and_a_restart() {
    let dir = TempDir::new("durable-history");
    let c = ch("orders");
    let small = tidings_store::Options {
        segment_bytes: 8 << 10,
    };
    let options = PublishOptions {
        idempotency_key: Some(IdempotencyKey::new("pay-7").unwrap()),
        idempotency_window: Duration::from_secs(120),
    };
    // History keeps one message: the keyed one is trimmed at once, and compaction drops
    // its record; the key must survive as a record of its own.
    let broker = open(&dir.0, 1, 1, small.clone());
    let first = broker
        .publish_with(&c, None, text("pay".into()), &options)
        .await
        .unwrap();
    let start = broker.bytes_on_disk().unwrap();
    let mut compacted = false;
    for i in 0..2000 {
        broker
            .publish(&c, None, text(format!("filler-{i}-{}", "y".repeat(60))))
            .await
            .unwrap();
        if broker.bytes_on_disk().unwrap() < start + 4096 && i > 200 {
            compacted = true;
            break;
        }
    }
    assert!(compacted, "the log never compacted");
    drop(broker);
    let broker = open(&dir.0, 1, 1, small);
    let again = broker
        .publish_with(&c, None, text("pay".into()), &options)
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.message.position(), first.message.position());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_epoch_a_new_channel_will_get_is_the_same_after_a_restart() {
    let dir = TempDir::new("durable-history");
    let c = ch("not-yet");
    let broker = open(&dir.0, 100, 4, Default::default());
    let seen = broker.read(&c, &Since::Now, None).await.unwrap().top;
    assert_eq!(seen.offset, 0);
    drop(broker);
    let broker = open(&dir.0, 100, 4, Default::default());
    let again = broker.read(&c, &Since::Now, None).await.unwrap().top;
    assert_eq!(again, seen, "the same (epoch, 0) across the restart");
    let m = broker
        .publish(&c, None, text("first".into()))
        .await
        .unwrap();
    assert_eq!(m.epoch, seen.epoch);
    let r = broker.read(&c, &Since::After(seen), None).await.unwrap();
    assert!(r.replay.gap().is_none(), "{:?}", r.replay.gap());
    assert_eq!(offsets(&r), [1]);
}

/// Resident memory of this process in MB (Linux; nextest runs each test in its own process).
fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .unwrap()
        / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_history_far_larger_than_the_cache_does_not_grow_resident_memory_with_it() {
    // 400 channels x 100 messages of 2 KiB: 80 MiB retained on disk. With 4 per channel
    // cached, RAM holds ~3 MiB of messages and a 12-byte index entry per message.
    let dir = TempDir::new("durable-history");
    let broker = open(&dir.0, 100, 4, Default::default());
    let names: Arc<Vec<ChannelName>> =
        Arc::new((0..400).map(|i| ch(&format!("big:{i}"))).collect());
    let before = rss_mb();
    for _round in 0..100 {
        let mut tasks = Vec::new();
        for p in 0..16 {
            let (broker, names) = (broker.clone(), names.clone());
            tasks.push(tokio::spawn(async move {
                for c in names.iter().skip(p).step_by(16) {
                    // Each message its own bytes, as a server's are (no shared buffer).
                    let payload = Bytes::from(vec![b'z'; 2048]);
                    broker.publish(c, None, Data::Text(payload)).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    let grown = rss_mb() - before;
    eprintln!("resident memory grew by {grown:.1} MB");
    assert_eq!(broker.history_counts().0, 40_000);
    assert!(
        broker.bytes_on_disk().unwrap() > 75 << 20,
        "it is all on disk"
    );
    assert!(
        grown < 40.0,
        "resident memory grew by {grown:.0} MB for 80 MB retained"
    );
}
