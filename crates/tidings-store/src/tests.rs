#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use tidings_core::{Data, Position};
use tidings_testkit::TempDir;

use super::*;

fn message(channel: &str, epoch: &str, offset: u64, data: &str) -> (Arc<Message>, Option<Keyed>) {
    (msg(channel, epoch, offset, data), None)
}

fn msg(channel: &str, epoch: &str, offset: u64, data: &str) -> Arc<Message> {
    Arc::new(Message::new(
        ChannelName::new(channel).unwrap(),
        Position {
            epoch: Epoch::new(epoch).unwrap(),
            offset,
        },
        None,
        Data::Text(Bytes::from(data.to_owned())),
        1_700_000_000_000 + offset,
    ))
}

/// (channel, offset, data) of every message record, in order.
fn reopen(dir: &Path) -> (LogStore, Report, Vec<(String, u64, String)>) {
    let mut seen = Vec::new();
    let (store, report) = open(dir, Options::default(), &mut |r| {
        if let Recovered::Message { message: m, .. } = r {
            let data = String::from_utf8(m.data.raw().to_vec()).unwrap();
            seen.push((m.channel.as_str().to_owned(), m.offset, data));
        }
    })
    .unwrap();
    (store, report, seen)
}

fn last_segment(dir: &Path) -> PathBuf {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs.pop().unwrap()
}

#[test]
fn what_was_appended_comes_back_in_order_after_a_reopen() {
    let dir = TempDir::new("store-test");
    let (mut store, report, seen) = reopen(&dir.0);
    assert!(seen.is_empty() && report.torn.is_none());
    store
        .append(
            &[message("a", "e1", 1, "x"), message("b", "e2", 1, "y")],
            true,
        )
        .unwrap();
    store.append(&[message("a", "e1", 2, "z")], false).unwrap();
    drop(store);
    let (_, report, seen) = reopen(&dir.0);
    assert_eq!(
        seen,
        [
            ("a".into(), 1, "x".into()),
            ("b".into(), 1, "y".into()),
            ("a".into(), 2, "z".into())
        ]
    );
    assert_eq!(report.records, 3);
}

#[test]
fn a_second_open_of_the_same_dir_is_refused_naming_the_lock_and_pid() {
    let dir = TempDir::new("store-test");
    let (_store, _, _) = reopen(&dir.0);
    let err = open(&dir.0, Options::default(), &mut |_| {})
        .err()
        .expect("refused");
    let text = err.to_string();
    assert!(text.contains("LOCK"), "{text}");
    assert!(
        text.contains(&format!("pid {}", std::process::id())),
        "{text}"
    );
}

#[test]
fn a_torn_tail_is_cut_off_with_its_size_and_channel_and_appends_continue() {
    let dir = TempDir::new("store-test");
    let (mut store, _, _) = reopen(&dir.0);
    store
        .append(&[message("keep", "e1", 1, "one")], true)
        .unwrap();
    store
        .append(&[message("torn:ch", "e1", 1, "a longer payload")], true)
        .unwrap();
    drop(store);
    let seg = last_segment(&dir.0);
    let len = std::fs::metadata(&seg).unwrap().len();
    let f = OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len - 5).unwrap();
    drop(f);

    let (mut store, report, seen) = reopen(&dir.0);
    assert_eq!(seen, [("keep".into(), 1, "one".into())]);
    let torn = report.torn.expect("a torn tail");
    let frame_len = (record::FRAME_HEADER + 1 + 1 + 7 + 1 + 2 + 16 + 1 + 1 + 16) as u64;
    assert_eq!(torn.bytes_cut, frame_len - 5);
    assert_eq!(torn.channels, ["torn:ch"]);
    assert!(report.damaged.is_empty());
    store
        .append(&[message("keep", "e1", 2, "two")], true)
        .unwrap();
    drop(store);
    let (_, report, seen) = reopen(&dir.0);
    assert!(report.torn.is_none(), "the cut was made for good");
    assert_eq!(seen.len(), 2);
}

#[test]
fn a_flipped_byte_in_the_middle_is_reported_and_never_read_as_data() {
    let dir = TempDir::new("store-test");
    let (mut store, _, _) = reopen(&dir.0);
    for i in 1..=3 {
        store
            .append(&[message("c", "e1", i, &format!("payload-{i}"))], true)
            .unwrap();
    }
    drop(store);
    let seg = last_segment(&dir.0);
    let mut bytes = std::fs::read(&seg).unwrap();
    // Inside the second record's data.
    let at = bytes.windows(9).position(|w| w == b"payload-2").unwrap();
    bytes[at + 3] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();

    let (_, report, seen) = reopen(&dir.0);
    assert_eq!(
        seen,
        [
            ("c".into(), 1, "payload-1".into()),
            ("c".into(), 3, "payload-3".into())
        ]
    );
    assert_eq!(report.damaged.len(), 1);
    assert!(report.torn.is_none());
}

#[test]
fn a_damaged_length_in_the_middle_does_not_cut_what_follows() {
    let dir = TempDir::new("store-test");
    let (mut store, _, _) = reopen(&dir.0);
    for i in 1..=3 {
        store.append(&[message("c", "e1", i, "x")], true).unwrap();
    }
    drop(store);
    let seg = last_segment(&dir.0);
    let mut bytes = std::fs::read(&seg).unwrap();
    // The second frame's length field: now it claims to run past the end of the file.
    let second = HEADER_LEN as usize + (bytes.len() - HEADER_LEN as usize) / 3;
    bytes[second + 7] = 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let (_, report, seen) = reopen(&dir.0);
    assert_eq!(
        seen.iter().map(|s| s.1).collect::<Vec<_>>(),
        [1, 3],
        "{report:?}"
    );
    assert!(report.torn.is_none());
}

#[test]
fn a_data_dir_of_a_newer_format_is_refused() {
    let dir = TempDir::new("store-test");
    drop(reopen(&dir.0));
    let seg = last_segment(&dir.0);
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    std::fs::write(&seg, &bytes).unwrap();
    let err = open(&dir.0, Options::default(), &mut |_| {})
        .err()
        .expect("refused");
    assert!(
        matches!(err, OpenError::NewerFormat { version, .. } if version == FORMAT_VERSION + 1),
        "{err}"
    );
    assert!(err.to_string().contains("newer tidings"), "{err}");
}

#[test]
fn compaction_keeps_what_is_retained_and_reclaims_the_rest() {
    let dir = TempDir::new("store-test");
    let (mut store, _, _) = reopen(&dir.0);
    for i in 1..=97 {
        store
            .append(&[message("c", "e1", i, "xxxxxxxxxx")], false)
            .unwrap();
    }
    let before = store.bytes_on_disk();
    let kept: Vec<Loc> = (98..=100)
        .map(|i| {
            store
                .append(&[message("c", "e1", i, "xxxxxxxxxx")], false)
                .unwrap()[0]
        })
        .collect();
    let snapshots = std::iter::once(Snapshot {
        channel: ChannelName::new("c").unwrap(),
        epoch: Epoch::new("e1").unwrap(),
        last_offset: 100,
        locs: kept,
    })
    .chain(std::iter::once(Snapshot {
        channel: ChannelName::new("empty").unwrap(),
        epoch: Epoch::new("e9").unwrap(),
        last_offset: 7,
        locs: Vec::new(),
    }));
    let moved = store.compact(snapshots.collect(), Vec::new()).unwrap();
    assert_eq!(moved.len(), 2);
    let back = store.reader().read(&moved[0]).unwrap();
    assert_eq!(
        back.iter().map(|m| m.offset).collect::<Vec<_>>(),
        [98, 99, 100],
        "the new places hold the same messages"
    );
    assert!(
        store.bytes_on_disk() < before / 10,
        "{} of {before}",
        store.bytes_on_disk()
    );
    store
        .append(&[message("c", "e1", 101, "new")], true)
        .unwrap();
    drop(store);
    let mut positions = Vec::new();
    let (_, _) = open(&dir.0, Options::default(), &mut |r| match r {
        Recovered::Message { message: m, .. } => {
            positions.push((m.channel.as_str().to_owned(), m.offset))
        }
        Recovered::Channel {
            channel,
            last_offset,
            ..
        } => positions.push((format!("{channel}@"), last_offset)),
        _ => {}
    })
    .unwrap();
    assert_eq!(
        positions,
        [
            ("c".into(), 98),
            ("c".into(), 99),
            ("c".into(), 100),
            ("c@".into(), 100),
            ("empty@".into(), 7),
            ("c".into(), 101)
        ]
    );
    assert_eq!(
        std::fs::read_dir(&dir.0)
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "log"))
            .count(),
        2,
        "the copy, and the segment appends went on in after the cut"
    );
}

fn log_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains(".log"))
        .collect();
    names.sort();
    names
}

#[test]
fn appends_go_on_while_a_compaction_copies_and_both_come_back_in_order() {
    let dir = TempDir::new("store-test");
    let (mut store, _, _) = reopen(&dir.0);
    let mut kept = Vec::new();
    for i in 1..=50 {
        let at = store
            .append(&[message("c", "e1", i, "before")], false)
            .unwrap()[0];
        if i > 45 {
            kept.push(at);
        }
    }
    let snapshot = Snapshot {
        channel: ChannelName::new("c").unwrap(),
        epoch: Epoch::new("e1").unwrap(),
        last_offset: 50,
        locs: kept,
    };
    let job = store.begin_compaction(vec![snapshot], Vec::new()).unwrap();
    assert!(!store.wants_compaction(), "one compaction at a time");
    // The writer goes on while the copy has not even started.
    let during: Vec<Loc> = (51..=55)
        .map(|i| {
            store
                .append(&[message("c", "e1", i, "during")], true)
                .unwrap()[0]
        })
        .collect();
    let copy = std::thread::spawn(job).join().unwrap();
    let moved = store.finish_compaction(copy).unwrap();
    assert_eq!(moved.len(), 1);
    let reader = store.reader();
    let offsets = |locs: &[Loc]| -> Vec<u64> {
        reader
            .read(locs)
            .unwrap()
            .iter()
            .map(|m| m.offset)
            .collect()
    };
    assert_eq!(offsets(&moved[0]), [46, 47, 48, 49, 50]);
    assert_eq!(
        offsets(&during),
        [51, 52, 53, 54, 55],
        "written after the cut, not moved"
    );
    drop(store);
    let (_, _, seen) = reopen(&dir.0);
    assert_eq!(
        seen.iter().map(|(_, o, _)| *o).collect::<Vec<_>>(),
        (46..=55).collect::<Vec<_>>()
    );
    assert_eq!(log_files(&dir.0).len(), 2, "{:?}", log_files(&dir.0));
}

#[test]
fn a_compaction_the_process_did_not_finish_leaves_the_log_as_it_was() {
    let dir = TempDir::new("store-test");
    let (mut store, _, _) = reopen(&dir.0);
    for i in 1..=10 {
        store.append(&[message("c", "e1", i, "x")], false).unwrap();
    }
    let snapshot = Snapshot {
        channel: ChannelName::new("c").unwrap(),
        epoch: Epoch::new("e1").unwrap(),
        last_offset: 10,
        locs: Vec::new(),
    };
    let _never_run = store.begin_compaction(vec![snapshot], Vec::new()).unwrap();
    store.append(&[message("c", "e1", 11, "y")], true).unwrap();
    drop(store);
    // As if the copy had been half-written when the process died.
    std::fs::write(dir.0.join("0000000000000002.log.tmp"), b"TIDINGS\0half").unwrap();
    let (_, _, seen) = reopen(&dir.0);
    assert_eq!(
        seen.iter().map(|(_, o, _)| *o).collect::<Vec<_>>(),
        (1..=11).collect::<Vec<_>>()
    );
    assert!(
        !log_files(&dir.0).iter().any(|n| n.ends_with(".tmp")),
        "{:?}",
        log_files(&dir.0)
    );
}

#[test]
fn a_failed_copy_keeps_every_segment_and_every_place() {
    let dir = TempDir::new("store-test");
    let (mut store, _, _) = reopen(&dir.0);
    let first = store.append(&[message("c", "e1", 1, "x")], true).unwrap();
    let _job = store.begin_compaction(Vec::new(), Vec::new()).unwrap();
    let after = store.append(&[message("c", "e1", 2, "y")], true).unwrap();
    let err = store
        .finish_compaction(Err(StoreError::Write("disk full".into())))
        .unwrap_err();
    assert!(err.to_string().contains("disk full"));
    let read = store.reader().read(&[first[0], after[0]]).unwrap();
    assert_eq!(read.iter().map(|m| m.offset).collect::<Vec<_>>(), [1, 2]);
    // A later compaction still works, and covers both sides of the failed cut.
    let job = store
        .begin_compaction(
            vec![Snapshot {
                channel: ChannelName::new("c").unwrap(),
                epoch: Epoch::new("e1").unwrap(),
                last_offset: 2,
                locs: vec![first[0], after[0]],
            }],
            Vec::new(),
        )
        .unwrap();
    let moved = store.finish_compaction(job()).unwrap();
    let read = store.reader().read(&moved[0]).unwrap();
    assert_eq!(read.iter().map(|m| m.offset).collect::<Vec<_>>(), [1, 2]);
    drop(store);
    let (_, _, seen) = reopen(&dir.0);
    assert_eq!(seen.iter().map(|(_, o, _)| *o).collect::<Vec<_>>(), [1, 2]);
}
