//! # tidings-store
//!
//! The data dir behind `tidings serve --data-dir`: an append-only log of CRC-framed records
//! (`record.rs`), implementing `tidings_core::Store`. The broker decides offsets, epochs and
//! visibility; this crate only appends, fsyncs, rewrites itself when most of it has expired,
//! and reads everything back at start.
//!
//! ## Layout on disk
//! - `LOCK`: locked (`flock`) by the server using the dir, and holding its pid, so a second
//!   server on the same dir is refused with the other one's pid.
//! - `0000000000000001.log`, `…2.log`: segments, replayed in name order. Each starts with the
//!   header `TIDINGS\0` + format version (u32 LE); a newer version is refused. A segment past
//!   `segment_bytes` is closed and a new one started.
//!
//! ## Crashes and damage
//! A write that fails is cut off the file again (`set_len`) before the publish is answered with
//! an error, so nothing half-written becomes visible, even after a restart. At open, every
//! segment is scanned frame by frame:
//! - a frame that does not check out and is followed by intact frames is damage in the middle:
//!   it is skipped and reported (never served), and the channel it belonged to gets a
//!   `trimmed` gap at the hole (`History::restore`);
//! - damage that runs to the end of the last segment is a torn tail (a crash mid-write): it is
//!   cut off, with a warning naming the bytes and the channels it held.
//!
//! ## Where a message lies
//! A `Loc` is `segment << 40 | byte position` (segments are numbered from 1; a compacted
//! segment may pass `segment_bytes`, up to 1 TiB). The broker keeps one per retained message
//! and reads older history back through a `LogReader`.
//!
//! Concurrency: a `LogStore` is owned by the broker's one writer thread. The only shared part
//! is the map of open segment files (`files`, an `RwLock` held only to clone an `Arc<File>`),
//! which `LogReader`s use from the tasks serving history: they `pread` whole frames that an
//! `append` already returned, which needs no lock against the writer's `pwrite` past them. A
//! compaction deletes the old segments' names but keeps their open files in the map until the
//! writer's next call, by which time the broker has re-pointed its index; a reader that
//! still misses a segment gets `ReadError::Moved` and plans again.

mod record;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use thiserror::Error;
use tidings_core::store::{
    CompactionJob, Copied, KeySnapshot, Keyed, Loc, ReadError, Recovered, Snapshot, Store,
    StoreError, StoreReader,
};
use tidings_core::{ChannelName, Epoch, Message};

use record::Frame;

/// The format this build writes and reads.
/// The format this build writes and reads (2 added keyed messages, fresh epochs and keys;
/// version 1 files are read as they are).
pub const FORMAT_VERSION: u32 = 2;
const POS_BITS: u32 = 40;
const POS_MASK: u64 = (1 << POS_BITS) - 1;
const HEADER_MAGIC: &[u8; 8] = b"TIDINGS\0";
const HEADER_LEN: u64 = 12;
const LOCK_FILE: &str = "LOCK";

#[derive(Clone, Debug)]
pub struct Options {
    /// A segment past this size is closed and a new one started.
    pub segment_bytes: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, Error)]
pub enum OpenError {
    #[error(
        "the data dir {dir} is in use by another tidings process{}: its lock {lock} is held",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked {
        dir: PathBuf,
        lock: PathBuf,
        pid: Option<u32>,
    },
    #[error("the data dir {dir} cannot be written: {source}")]
    NotWritable {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{file} was written by a newer tidings (data format v{version}; this build reads v{FORMAT_VERSION}): upgrade tidings or use another data dir"
    )]
    NewerFormat { file: PathBuf, version: u32 },
    #[error("{file} is not a tidings data file (bad header): is this the right data dir?")]
    NotAStore { file: PathBuf },
    #[error("reading the data dir: {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What opening found, for the startup log.
#[derive(Debug, Default)]
pub struct Report {
    pub segments: usize,
    pub records: u64,
    pub bytes: u64,
    /// A torn tail cut off the last segment.
    pub torn: Option<Torn>,
    /// Damaged records skipped in the middle of the log.
    pub damaged: Vec<Damage>,
}

#[derive(Debug)]
pub struct Torn {
    pub file: PathBuf,
    pub bytes_cut: u64,
    /// Channels named by the records cut off (as far as what is left of them tells).
    pub channels: Vec<String>,
}

#[derive(Debug)]
pub struct Damage {
    pub file: PathBuf,
    pub at: u64,
    pub bytes_skipped: u64,
}

struct Segment {
    seq: u64,
    path: PathBuf,
}

pub struct LogStore {
    dir: PathBuf,
    options: Options,
    /// Held for the lock's sake (released when the store is dropped or the process dies).
    _lock: File,
    /// Closed segments, oldest first (kept until a compaction replaces them).
    closed: Vec<Segment>,
    active: Segment,
    file: Arc<File>,
    /// Every open segment by number, shared with readers.
    files: Files,
    /// Segments a compaction deleted, still readable until the next call (see the top).
    retiring: Vec<u64>,
    /// The last fresh epoch recorded (rewritten by a compaction).
    fresh: Option<Epoch>,
    /// Bytes of `file` that hold whole, acknowledged records: the next write goes here.
    len: u64,
    /// Bytes in every closed segment.
    closed_bytes: u64,
    /// Size of the log right after the last compaction (or the open).
    base_bytes: u64,
    broken: Option<String>,
    scratch: Vec<u8>,
    /// The compaction whose copy is running, if one is.
    compacting: Option<Compacting>,
}

/// A compaction between its cut and its finish.
struct Compacting {
    /// The number the copy's segment gets.
    seq: u64,
    /// The segments before the cut, oldest first (deleted when the copy is installed).
    old: Vec<Segment>,
    old_bytes: u64,
}

/// What a compaction job hands back to `finish_compaction` (inside `Copied`).
struct CopyDone {
    seq: u64,
    len: u64,
    file: File,
}

type Files = Arc<RwLock<HashMap<u64, Arc<File>>>>;

fn loc(seq: u64, pos: u64) -> Loc {
    seq << POS_BITS | (pos & POS_MASK)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        path: path.to_owned(),
        source,
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016}.log"))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates a segment with its header, durably (the file and its directory entry).
fn create_segment(dir: &Path, seq: u64) -> std::io::Result<(Segment, File)> {
    let path = segment_path(dir, seq);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    file.write_all(&header())?;
    file.sync_all()?;
    sync_dir(dir)?;
    Ok((Segment { seq, path }, file))
}

/// The bytes every segment starts with.
fn header() -> Vec<u8> {
    let mut header = Vec::with_capacity(HEADER_LEN as usize);
    header.extend_from_slice(HEADER_MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    header
}

/// A compaction's copy, on its own thread: the retained records of `channels` (copied as
/// they are, no decoding), a position record per channel, the keys and the fresh epoch, into
/// `NNNN.log.tmp`, fsynced, then renamed to segment `seq`. Until the rename nothing in the
/// dir changed meaning (`open` deletes a leftover `.tmp`).
fn copy_retained(
    dir: &Path,
    seq: u64,
    files: &HashMap<u64, Arc<File>>,
    channels: Vec<Snapshot>,
    keys: Vec<KeySnapshot>,
    fresh: Option<&Epoch>,
) -> Result<Copied, StoreError> {
    let fail = |e: std::io::Error| StoreError::Write(format!("compacting: {e}"));
    let path = segment_path(dir, seq);
    let tmp = path.with_extension("log.tmp");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(fail)?;
    let copied = (|| -> Result<(Vec<Vec<Loc>>, u64), StoreError> {
        let mut buf = header();
        let mut len = 0u64;
        let mut moved = Vec::with_capacity(channels.len());
        for s in channels {
            let mut locs = Vec::with_capacity(s.locs.len());
            for &at in &s.locs {
                let frame = files
                    .get(&(at >> POS_BITS))
                    .ok_or_else(|| format!("segment {} is gone", at >> POS_BITS))
                    .and_then(|f| read_frame(f, at & POS_MASK))
                    .map_err(|e| StoreError::Write(format!("compacting: reading {e}")))?;
                locs.push(loc(seq, len + buf.len() as u64));
                buf.extend_from_slice(&frame);
            }
            moved.push(locs);
            // After the messages: a position record first would make them look old.
            record::encode_channel(&mut buf, &s.channel, &s.epoch, s.last_offset);
            if buf.len() >= 1 << 20 {
                file.write_all_at(&buf, len).map_err(fail)?;
                len += buf.len() as u64;
                buf.clear();
            }
        }
        for k in &keys {
            record::encode_key(&mut buf, k);
        }
        if let Some(fresh) = fresh {
            record::encode_fresh(&mut buf, fresh);
        }
        file.write_all_at(&buf, len)
            .and_then(|()| file.sync_all())
            .map_err(fail)?;
        len += buf.len() as u64;
        std::fs::rename(&tmp, &path)
            .and_then(|()| sync_dir(dir))
            .map_err(fail)?;
        Ok((moved, len))
    })();
    match copied {
        Ok((moved, len)) => Ok(Copied {
            moved,
            state: Box::new(CopyDone { seq, len, file }),
        }),
        Err(e) => {
            // Whichever name it has by now (a failed dir fsync comes after the rename).
            let _ = std::fs::remove_file(&tmp);
            let _ = std::fs::remove_file(&path);
            Err(e)
        }
    }
}

/// Takes the data dir's lock, or says who holds it.
fn lock(dir: &Path) -> Result<File, OpenError> {
    let path = dir.join(LOCK_FILE);
    let not_writable = |source| OpenError::NotWritable {
        dir: dir.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(not_writable)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(OpenError::Locked {
                dir: dir.to_owned(),
                lock: path,
                pid: text.trim().parse().ok(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(not_writable(e)),
    }
    // Also proves the dir takes writes and fsyncs before anything else is touched.
    file.set_len(0)
        .and_then(|()| file.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0))
        .and_then(|()| file.sync_all())
        .map_err(not_writable)?;
    Ok(file)
}

/// What `probe` found in a data dir.
#[derive(Debug, Default)]
pub struct Probe {
    /// Segment files in it.
    pub segments: usize,
    /// Their bytes.
    pub bytes: u64,
    /// The newest format version among them (`None` when there are none yet).
    pub version: Option<u32>,
}

/// For `tidings doctor`: what `open` would refuse, without reading the records or changing
/// any segment. Creates the dir if missing (as `open` would), takes the lock and lets it go
/// again (so the dir is writable and no server holds it), and reads every segment's header.
pub fn probe(dir: &Path) -> Result<Probe, OpenError> {
    std::fs::create_dir_all(dir).map_err(|source| OpenError::NotWritable {
        dir: dir.to_owned(),
        source,
    })?;
    drop(lock(dir)?);
    let mut probe = Probe::default();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(seq) = name.to_str().and_then(|n| n.strip_suffix(".log")) else {
            continue;
        };
        if seq.len() != 16 || seq.parse::<u64>().is_err() {
            continue;
        }
        let path = entry.path();
        let mut file = File::open(&path).map_err(io_err(&path))?;
        probe.segments += 1;
        probe.bytes += file.metadata().map_err(io_err(&path))?.len();
        let mut header = [0u8; HEADER_LEN as usize];
        match file.read_exact(&mut header) {
            Ok(()) => {}
            // Cut short before its header was whole: `open` repairs it.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => continue,
            Err(e) => return Err(io_err(&path)(e)),
        }
        if &header[..8] != HEADER_MAGIC {
            return Err(OpenError::NotAStore { file: path });
        }
        let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        if version > FORMAT_VERSION {
            return Err(OpenError::NewerFormat {
                file: path,
                version,
            });
        }
        probe.version = probe.version.max(Some(version));
    }
    Ok(probe)
}

/// Opens (or creates) the data dir at `dir`, handing every record it holds to `restore` in
/// order, and repairing a torn tail. The returned store appends after what was read.
pub fn open(
    dir: &Path,
    options: Options,
    restore: &mut dyn FnMut(Recovered),
) -> Result<(LogStore, Report), OpenError> {
    std::fs::create_dir_all(dir).map_err(|source| OpenError::NotWritable {
        dir: dir.to_owned(),
        source,
    })?;
    let lock = lock(dir)?;
    let mut seqs: Vec<u64> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(".log.tmp") {
            // A compaction's copy that the process did not live to install: the segments
            // it was copied from are all still here.
            let path = entry.path();
            tracing::info!(file = %path.display(), "removing an unfinished compaction");
            std::fs::remove_file(&path).map_err(io_err(&path))?;
            continue;
        }
        if let Some(seq) = name.strip_suffix(".log").filter(|s| s.len() == 16)
            && let Ok(seq) = seq.parse()
        {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    let mut report = Report {
        segments: seqs.len(),
        ..Report::default()
    };
    let mut segments: Vec<Segment> = Vec::new();
    let mut closed_bytes = 0;
    let mut active = None;
    let files: Files = Arc::default();
    let mut fresh = None;
    let mut restore = |r: Recovered| {
        if let Recovered::Fresh(e) = &r {
            fresh = Some(e.clone());
        }
        restore(r)
    };
    for (i, &seq) in seqs.iter().enumerate() {
        let path = segment_path(dir, seq);
        let last = i + 1 == seqs.len();
        let (len, file) = replay(&path, seq, last, &mut restore, &mut report)?;
        let file = Arc::new(file);
        write_lock(&files).insert(seq, file.clone());
        report.bytes += len;
        if last {
            active = Some((Segment { seq, path }, file, len));
        } else {
            closed_bytes += len;
            segments.push(Segment { seq, path });
        }
    }
    let (active, file, len) = match active {
        Some(a) => a,
        None => {
            let (segment, file) =
                create_segment(dir, 1).map_err(|source| OpenError::NotWritable {
                    dir: dir.to_owned(),
                    source,
                })?;
            let file = Arc::new(file);
            write_lock(&files).insert(1, file.clone());
            (segment, file, HEADER_LEN)
        }
    };
    let store = LogStore {
        dir: dir.to_owned(),
        options,
        _lock: lock,
        closed: segments,
        active,
        file,
        files,
        retiring: Vec::new(),
        fresh,
        len,
        closed_bytes,
        base_bytes: closed_bytes + len,
        broken: None,
        scratch: Vec::new(),
        compacting: None,
    };
    Ok((store, report))
}

/// Reads one segment into `restore`; returns the length of its intact part and, for the
/// last segment, the file opened for appending (with a torn tail already cut off).
fn replay(
    path: &Path,
    seq: u64,
    last: bool,
    restore: &mut dyn FnMut(Recovered),
    report: &mut Report,
) -> Result<(u64, File), OpenError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(last)
        .open(path)
        .map_err(io_err(path))?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).map_err(io_err(path))?;
    let header_len = HEADER_LEN as usize;
    if buf.len() < header_len && last && HEADER_MAGIC.starts_with(&buf[..buf.len().min(8)]) {
        // Created and cut short before its header was whole: nothing was ever in it.
        let mut header = HEADER_MAGIC.to_vec();
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        file.set_len(0)
            .and_then(|()| file.write_all_at(&header, 0))
            .and_then(|()| file.sync_all())
            .map_err(io_err(path))?;
        return Ok((HEADER_LEN, file));
    }
    if buf.len() < header_len || &buf[..8] != HEADER_MAGIC {
        return Err(OpenError::NotAStore {
            file: path.to_owned(),
        });
    }
    let version = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
    if version > FORMAT_VERSION {
        return Err(OpenError::NewerFormat {
            file: path.to_owned(),
            version,
        });
    }
    let mut pos = header_len;
    while pos < buf.len() {
        match record::frame_at(&buf, pos) {
            Frame::Whole { payload, next } => {
                match record::decode(payload, loc(seq, pos as u64)) {
                    Some(r) => {
                        report.records += 1;
                        restore(r);
                    }
                    None => report.damaged.push(Damage {
                        file: path.to_owned(),
                        at: pos as u64,
                        bytes_skipped: (next - pos) as u64,
                    }),
                }
                pos = next;
            }
            Frame::Short | Frame::Damaged => match next_whole_frame(&buf, pos + 1) {
                Some(next) => {
                    report.damaged.push(Damage {
                        file: path.to_owned(),
                        at: pos as u64,
                        bytes_skipped: (next - pos) as u64,
                    });
                    pos = next;
                }
                None if last => {
                    let channels = channels_in(&buf[pos..]);
                    file.set_len(pos as u64)
                        .and_then(|()| file.sync_all())
                        .map_err(io_err(path))?;
                    report.torn = Some(Torn {
                        file: path.to_owned(),
                        bytes_cut: (buf.len() - pos) as u64,
                        channels,
                    });
                    return Ok((pos as u64, file));
                }
                None => {
                    report.damaged.push(Damage {
                        file: path.to_owned(),
                        at: pos as u64,
                        bytes_skipped: (buf.len() - pos) as u64,
                    });
                    pos = buf.len();
                }
            },
        }
    }
    Ok((pos as u64, file))
}

/// Where the next intact frame after damage starts, if any does.
fn next_whole_frame(buf: &[u8], from: usize) -> Option<usize> {
    let magic = record::MAGIC.to_le_bytes();
    let mut at = from;
    while at + record::FRAME_HEADER <= buf.len() {
        let found = buf[at..].windows(4).position(|w| w == magic)?;
        at += found;
        if matches!(record::frame_at(buf, at), Frame::Whole { .. }) {
            return Some(at);
        }
        at += 1;
    }
    None
}

/// Channels named by the frames (whole or not) that start in a torn tail.
fn channels_in(tail: &[u8]) -> Vec<String> {
    let magic = record::MAGIC.to_le_bytes();
    let mut names: Vec<String> = Vec::new();
    let mut at = 0;
    while let Some(found) = tail
        .get(at..)
        .and_then(|t| t.windows(4).position(|w| w == magic))
    {
        at += found;
        if let Some(name) = tail
            .get(at + record::FRAME_HEADER..)
            .and_then(record::channel_of_partial)
            .filter(|n| !names.contains(n))
        {
            names.push(name);
        }
        at += 1;
    }
    names
}

impl LogStore {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `self.scratch` after the last whole record; undoes it on failure. Answers the
    /// position it was written at, in the active segment.
    fn write_scratch(&mut self, sync: bool) -> Result<u64, StoreError> {
        self.release_retired();
        if let Some(why) = &self.broken {
            return Err(StoreError::Broken(why.clone()));
        }
        if self.scratch.is_empty() {
            return Ok(self.len);
        }
        if self.len >= self.options.segment_bytes {
            self.rotate()
                .map_err(|e| StoreError::Write(format!("starting a new segment: {e}")))?;
        }
        let at = self.len;
        let written = self
            .file
            .write_all_at(&self.scratch, at)
            .and_then(|()| if sync { self.file.sync_data() } else { Ok(()) });
        match written {
            Ok(()) => {
                self.len += self.scratch.len() as u64;
                Ok(at)
            }
            Err(e) => {
                // Cut back to the last whole record: shrinking needs no space, so this works
                // on a full disk; if even it fails, a restart's scan will cut the tail.
                let undone = self.file.set_len(at).and_then(|()| self.file.sync_data());
                match undone {
                    Ok(()) => Err(StoreError::Write(e.to_string())),
                    Err(e2) => {
                        let why = format!("{e}; undoing it failed too: {e2}");
                        self.broken = Some(why.clone());
                        Err(StoreError::Broken(why))
                    }
                }
            }
        }
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let (segment, file) = create_segment(&self.dir, self.active.seq + 1)?;
        let file = Arc::new(file);
        write_lock(&self.files).insert(segment.seq, file.clone());
        let old = std::mem::replace(&mut self.active, segment);
        self.closed.push(old);
        self.closed_bytes += self.len;
        self.file = file;
        self.len = HEADER_LEN;
        Ok(())
    }

    /// Closes the files of segments a compaction deleted (the broker has re-pointed its
    /// index since: the writer thread only calls again once it has).
    fn release_retired(&mut self) {
        if !self.retiring.is_empty() {
            let mut files = write_lock(&self.files);
            for seq in self.retiring.drain(..) {
                files.remove(&seq);
            }
        }
    }
}

fn write_lock(files: &Files) -> std::sync::RwLockWriteGuard<'_, HashMap<u64, Arc<File>>> {
    // The map is valid at every step; poisoning carries no meaning.
    files.write().unwrap_or_else(|e| e.into_inner())
}

/// The whole frame (header and payload) at `pos` of `file`, checked.
fn read_frame(file: &File, pos: u64) -> Result<Vec<u8>, String> {
    // Most records are small: one read of the header and a guess, a second if it is longer.
    let mut buf = vec![0u8; record::FRAME_HEADER + 512];
    let n = read_at_most(file, &mut buf, pos).map_err(|e| e.to_string())?;
    buf.truncate(n);
    if buf.len() < record::FRAME_HEADER {
        return Err(format!("no record at byte {pos}"));
    }
    let len = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
    if len > record::MAX_PAYLOAD {
        return Err(format!("no record at byte {pos}"));
    }
    let whole = record::FRAME_HEADER + len;
    if buf.len() < whole {
        let have = buf.len();
        buf.resize(whole, 0);
        file.read_exact_at(&mut buf[have..], pos + have as u64)
            .map_err(|e| e.to_string())?;
    }
    buf.truncate(whole);
    match record::frame_at(&buf, 0) {
        record::Frame::Whole { .. } => Ok(buf),
        _ => Err(format!("a damaged record at byte {pos}")),
    }
}

fn read_at_most(file: &File, buf: &mut [u8], pos: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], pos + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads messages back from the segments, from any thread (see the top of this file).
pub struct LogReader {
    files: Files,
}

impl StoreReader for LogReader {
    fn read(&self, locs: &[Loc]) -> Result<Vec<Message>, ReadError> {
        let mut out = Vec::with_capacity(locs.len());
        let mut file: Option<(u64, Arc<File>)> = None;
        for &at in locs {
            let seq = at >> POS_BITS;
            let f = match &file {
                Some((s, f)) if *s == seq => f.clone(),
                _ => {
                    let f = self
                        .files
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&seq)
                        .cloned()
                        .ok_or(ReadError::Moved)?;
                    file = Some((seq, f.clone()));
                    f
                }
            };
            let frame = read_frame(&f, at & POS_MASK)
                .map_err(|e| ReadError::Failed(format!("segment {seq}: {e}")))?;
            match record::decode(&frame[record::FRAME_HEADER..], at) {
                Some(Recovered::Message { message, .. }) => out.push(message),
                _ => {
                    return Err(ReadError::Failed(format!(
                        "segment {seq}: no message at byte {}",
                        at & POS_MASK
                    )));
                }
            }
        }
        Ok(out)
    }
}

impl Store for LogStore {
    fn append(
        &mut self,
        messages: &[(Arc<Message>, Option<Keyed>)],
        sync: bool,
    ) -> Result<Vec<Loc>, StoreError> {
        self.scratch.clear();
        let mut starts = Vec::with_capacity(messages.len());
        for (m, key) in messages {
            starts.push(self.scratch.len() as u64);
            record::encode_message(&mut self.scratch, m, key.as_ref());
        }
        let at = self.write_scratch(sync)?;
        let seq = self.active.seq;
        Ok(starts.into_iter().map(|s| loc(seq, at + s)).collect())
    }

    fn set_fresh(&mut self, epoch: &Epoch) -> Result<(), StoreError> {
        self.scratch.clear();
        record::encode_fresh(&mut self.scratch, epoch);
        self.write_scratch(true)?;
        self.fresh = Some(epoch.clone());
        Ok(())
    }

    fn reader(&self) -> Arc<dyn StoreReader> {
        Arc::new(LogReader {
            files: self.files.clone(),
        })
    }

    fn forget(&mut self, channel: &ChannelName, epoch: &Epoch) -> Result<(), StoreError> {
        self.scratch.clear();
        record::encode_forgotten(&mut self.scratch, channel, epoch);
        self.write_scratch(false).map(|_| ())
    }

    fn wants_compaction(&self) -> bool {
        // Rewriting costs what is retained; do it once the log is mostly what is not.
        self.compacting.is_none()
            && self.bytes_on_disk() > 2 * self.base_bytes + self.options.segment_bytes
    }

    fn begin_compaction(
        &mut self,
        channels: Vec<Snapshot>,
        keys: Vec<KeySnapshot>,
    ) -> Result<CompactionJob, StoreError> {
        self.release_retired();
        if let Some(why) = &self.broken {
            return Err(StoreError::Broken(why.clone()));
        }
        if self.compacting.is_some() {
            return Err(StoreError::Write("a compaction is already running".into()));
        }
        // The cut: appends go on in a new segment, numbered one past the copy's, so that
        // replaying in name order gives old, copy, new — the order things happened in.
        let copy_seq = self.active.seq + 1;
        let (segment, file) = create_segment(&self.dir, copy_seq + 1)
            .map_err(|e| StoreError::Write(format!("compacting: starting a new segment: {e}")))?;
        let file = Arc::new(file);
        write_lock(&self.files).insert(segment.seq, file.clone());
        let cut = std::mem::replace(&mut self.active, segment);
        self.closed.push(cut);
        self.closed_bytes += self.len;
        self.file = file;
        self.len = HEADER_LEN;
        let old: Vec<Segment> = self.closed.drain(..).collect();
        self.compacting = Some(Compacting {
            seq: copy_seq,
            old,
            old_bytes: self.closed_bytes,
        });
        let files = self.files.read().unwrap_or_else(|e| e.into_inner()).clone();
        let dir = self.dir.clone();
        let fresh = self.fresh.clone();
        Ok(Box::new(move || {
            copy_retained(&dir, copy_seq, &files, channels, keys, fresh.as_ref())
        }))
    }

    fn finish_compaction(
        &mut self,
        copied: Result<Copied, StoreError>,
    ) -> Result<Vec<Vec<Loc>>, StoreError> {
        let Some(compacting) = self.compacting.take() else {
            return Err(StoreError::Write("no compaction was running".into()));
        };
        let copy = copied.and_then(|c| match c.state.downcast::<CopyDone>() {
            Ok(done) if done.seq == compacting.seq => Ok((c.moved, *done)),
            _ => Err(StoreError::Write(
                "compacting: not this compaction's copy".into(),
            )),
        });
        let (moved, done) = match copy {
            Ok(c) => c,
            Err(e) => {
                // The old segments are still the oldest part of the log: put them back, and
                // wait for the log to grow again before the next try (a full disk would
                // otherwise be retried after every write).
                let mut closed = compacting.old;
                closed.append(&mut self.closed);
                self.closed = closed;
                self.base_bytes = self.bytes_on_disk();
                return Err(e);
            }
        };
        write_lock(&self.files).insert(done.seq, Arc::new(done.file));
        // Newest first: a crash half-way leaves an oldest prefix of segments, which replays
        // into a state the copy then brings up to date.
        for s in compacting.old.iter().rev() {
            if let Err(e) = std::fs::remove_file(&s.path) {
                tracing::warn!(file = %s.path.display(), error = %e, "could not delete a compacted segment");
            }
            self.retiring.push(s.seq);
        }
        let _ = sync_dir(&self.dir);
        self.closed.insert(
            0,
            Segment {
                seq: done.seq,
                path: segment_path(&self.dir, done.seq),
            },
        );
        self.closed_bytes = self.closed_bytes - compacting.old_bytes + done.len;
        self.base_bytes = self.bytes_on_disk();
        Ok(moved)
    }

    fn bytes_on_disk(&self) -> u64 {
        self.closed_bytes + self.len
    }
}

#[cfg(test)]
mod tests;
