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
//! - Records come back at open in append order. A message of an epoch other than the
//!   channel's current one starts a new incarnation of that channel.

use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::channel::ChannelName;
use crate::message::{Epoch, Message};

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
    Message(Message),
    /// A channel's position with no message behind it (all expired or trimmed when the store
    /// last compacted).
    Channel {
        channel: ChannelName,
        epoch: Epoch,
        last_offset: u64,
    },
    /// The channel was reclaimed (idle, nothing retained) while in this epoch.
    Forgotten {
        channel: ChannelName,
        epoch: Epoch,
    },
}

/// One channel as the broker holds it, for a store that rewrites itself (compaction).
pub struct Snapshot {
    pub channel: ChannelName,
    pub epoch: Epoch,
    pub last_offset: u64,
    pub messages: Vec<std::sync::Arc<Message>>,
}

pub trait Store: Send + 'static {
    /// Appends `messages` in order; with `sync`, durable before this returns.
    fn append(
        &mut self,
        messages: &[std::sync::Arc<Message>],
        sync: bool,
    ) -> Result<(), StoreError>;

    /// Records that `channel` in `epoch` was reclaimed, so it does not come back at open.
    fn forget(&mut self, channel: &ChannelName, epoch: &Epoch) -> Result<(), StoreError>;

    /// Whether the store would like to be rewritten from the broker's state (its files hold
    /// much more than what is retained).
    fn wants_compaction(&self) -> bool {
        false
    }

    /// Replaces everything stored with `channels` (durably), then reclaims the old files.
    fn compact(&mut self, _channels: &mut dyn Iterator<Item = Snapshot>) -> Result<(), StoreError> {
        Ok(())
    }

    /// Bytes the store occupies on disk.
    fn bytes_on_disk(&self) -> u64;
}

/// Age of a message published at `time_ms`, by the wall clock (history TTLs survive restarts).
pub fn age(time_ms: u64, now_ms: u64) -> Duration {
    Duration::from_millis(now_ms.saturating_sub(time_ms))
}
