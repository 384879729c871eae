//! The persistence a memory broker may write through: what a data dir must keep and give back.
//!
//! The core only defines the contract; `tidings-store` implements it on disk (the core never
//! depends on it). The broker owns every decision about offsets, epochs, ordering and
//! visibility (see `broker::memory`); a `Store` only appends what it is given, makes it
//! durable when asked, and hands back at open what it holds, in the order it was appended.
//!
//! Contract:
//! - `append` writes the batch in order; with `sync` it returns only once the batch is
//!   durable (fsync). On `Err`, nothing of the batch may come back at the next open: the
//!   store cuts off whatever part of it reached the file.
//! - After `Err(StoreError::Broken)`, every later call fails too (the store could not undo a
//!   partial write); publishing stops until a restart, which cuts the torn tail.
//! - Records come back at open in append order, each with its `Loc`. A message of an epoch
//!   other than the channel's current one starts a new incarnation of that channel.
//! - A `Loc` names one message record until the store is compacted; `finish_compaction`
//!   answers every retained message's new `Loc`, and the old ones stay readable until the
//!   store's next call after it (readers that raced it get `ReadError::Moved` and look again).
//! - A compaction copies on a thread of its own while appends go on: `begin_compaction`
//!   cuts the log (what is retained before the cut is copied, what comes after stays), the
//!   job copies, `finish_compaction` swaps the files. A crash at any point leaves a store
//!   that replays into the same state.
//! - `StoreReader::read` may be called from any thread, concurrently with `append` and
//!   `compact`: it reads only what an `append` already returned (written whole).
//! - The broker never holds every retained message in RAM: it keeps an index of `Loc`s and a
//!   cache of the most recent messages, and reads older ones back through a `StoreReader`.

use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::channel::ChannelName;
use crate::idempotency::IdempotencyKey;
use crate::message::{Epoch, Message, Position};

/// Where a message record lies in a store (opaque to the broker; 8 bytes so that an index
/// entry per retained message stays small).
pub type Loc = u64;

/// An idempotency key written with the message it published, so a retry after a restart
/// still finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keyed {
    pub key: IdempotencyKey,
    /// Wall-clock milliseconds until which the key is remembered.
    pub until_ms: u64,
}

/// A key remembered on a channel, for compaction (its message may be trimmed already).
#[derive(Clone, Debug)]
pub struct KeySnapshot {
    pub channel: ChannelName,
    pub position: Position,
    pub time: u64,
    pub keyed: Keyed,
}

/// When an acknowledged publish is on disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// Every publish is written and fsynced on its own before it is answered.
    Always,
    /// Publishes that arrive together are written together and share one fsync (group
    /// commit); each is answered after that fsync.
    #[default]
    Batch,
    /// Written before it is answered, fsynced when the OS decides: a crash of the machine
    /// (not of the process) may lose the last acknowledged publishes.
    Never,
}

impl Fsync {
    pub fn as_str(self) -> &'static str {
        match self {
            Fsync::Always => "always",
            Fsync::Batch => "batch",
            Fsync::Never => "never",
        }
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The write (or its fsync) failed and was undone: nothing of it is kept.
    #[error("writing to the data dir failed: {0}")]
    Write(String),
    /// A failed write could not be undone; the store refuses writes until a restart.
    #[error("the data dir is unusable until a restart: {0}")]
    Broken(String),
}

/// What a store holds, handed back at open (see `Restore`).
#[derive(Debug)]
// A message is what nearly every record is; boxing it would cost an allocation each.
#[allow(clippy::large_enum_variant)]
pub enum Recovered {
    /// A message, where it lies, and the idempotency key it was published with.
    Message {
        message: Message,
        loc: Loc,
        key: Option<Keyed>,
    },
    /// A key whose message may be gone (written at compaction).
    Key(KeySnapshot),
    /// The epoch the next new channel gets (see `broker::memory`).
    Fresh(Epoch),
    /// A channel's position with no message behind it (all expired or trimmed when the store
    /// last compacted).
    Channel {
        channel: ChannelName,
        epoch: Epoch,
        last_offset: u64,
    },
    /// The channel was reclaimed (idle, nothing retained) while in this epoch.
    Forgotten { channel: ChannelName, epoch: Epoch },
}

/// One channel as the broker holds it, for a store that rewrites itself (compaction).
pub struct Snapshot {
    pub channel: ChannelName,
    pub epoch: Epoch,
    pub last_offset: u64,
    /// Where the retained messages lie, oldest first.
    pub locs: Vec<Loc>,
}

/// Why a read from the store gave nothing.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The store was compacted since the `Loc` was taken: look it up again.
    #[error("the data dir was compacted meanwhile")]
    Moved,
    /// The record could not be read or does not check out (never served as data).
    #[error("reading the data dir: {0}")]
    Failed(String),
}

/// Reads messages back from a store; shared with the tasks that serve history.
pub trait StoreReader: Send + Sync + 'static {
    /// The messages at `locs`, in that order.
    fn read(&self, locs: &[Loc]) -> Result<Vec<Message>, ReadError>;
}

pub trait Store: Send + 'static {
    /// Appends `messages` (each with the key it was published with) in order; with `sync`,
    /// durable before this returns. Answers where each one lies.
    fn append(
        &mut self,
        messages: &[(std::sync::Arc<Message>, Option<Keyed>)],
        sync: bool,
    ) -> Result<Vec<Loc>, StoreError>;

    /// Records the epoch the next new channel gets (durably: a reader may see it next).
    fn set_fresh(&mut self, epoch: &Epoch) -> Result<(), StoreError>;

    /// A handle that reads messages back, from any thread.
    fn reader(&self) -> std::sync::Arc<dyn StoreReader>;

    /// Records that `channel` in `epoch` was reclaimed, so it does not come back at open.
    fn forget(&mut self, channel: &ChannelName, epoch: &Epoch) -> Result<(), StoreError>;

    /// Whether the store would like to be rewritten from the broker's state (its files hold
    /// much more than what is retained).
    fn wants_compaction(&self) -> bool {
        false
    }

    /// Starts rewriting the store from `channels` and `keys` (what the broker holds now):
    /// everything appended so far moves behind a cut, and the returned job copies what is
    /// retained of it into a new file. The job runs on a thread of its own while `append`
    /// goes on after the cut; its outcome goes to `finish_compaction`. At most one
    /// compaction runs at a time (`wants_compaction` says no meanwhile).
    fn begin_compaction(
        &mut self,
        channels: Vec<Snapshot>,
        keys: Vec<KeySnapshot>,
    ) -> Result<CompactionJob, StoreError>;

    /// Installs what a compaction job copied and reclaims the files from before its cut.
    /// Answers, per snapshot in order, where its messages lie now (messages appended after
    /// the cut stay where they are). On `Err` (the job's or its own) the store keeps its
    /// files as they were and every `Loc` stays valid.
    fn finish_compaction(
        &mut self,
        copied: Result<Copied, StoreError>,
    ) -> Result<Vec<Vec<Loc>>, StoreError>;

    /// `begin_compaction`, the job and `finish_compaction` in one go, on this thread.
    fn compact(
        &mut self,
        channels: Vec<Snapshot>,
        keys: Vec<KeySnapshot>,
    ) -> Result<Vec<Vec<Loc>>, StoreError> {
        let job = self.begin_compaction(channels, keys)?;
        let copied = job();
        self.finish_compaction(copied)
    }

    /// Bytes the store occupies on disk.
    fn bytes_on_disk(&self) -> u64;
}

/// The copying part of a compaction: blocking file I/O, run off the writer thread.
pub type CompactionJob = Box<dyn FnOnce() -> Result<Copied, StoreError> + Send>;

/// What a compaction job copied: the new places of each snapshot's messages, and what the
/// store needs to install them (its own type, opaque to the broker).
pub struct Copied {
    pub moved: Vec<Vec<Loc>>,
    pub state: Box<dyn std::any::Any + Send>,
}

/// Age of a message published at `time_ms`, by the wall clock (history TTLs survive restarts).
pub fn age(time_ms: u64, now_ms: u64) -> Duration {
    Duration::from_millis(now_ms.saturating_sub(time_ms))
}
