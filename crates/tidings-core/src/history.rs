//! A bounded per-channel log and the read that turns a cursor into a replay or a gap.
//!
//! Bounded twice: by count (`history_size`) and by age (`history_ttl`). Ages use tokio's
//! clock so paused-time tests can expire history without waiting.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::channel::ChannelName;
use crate::message::{Epoch, Message, Position};

/// Where a read starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Since {
    /// Nothing from history: only what is published from now on.
    Now,
    /// The most recent N retained messages.
    Last(usize),
    /// Everything after this position.
    After(Position),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GapReason {
    /// History no longer holds messages between the cursor and what follows.
    Trimmed,
    /// The channel's stream is a new incarnation; the cursor's epoch is gone.
    EpochChanged,
}

/// The notice a subscriber receives before the first message after a discontinuity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Gap {
    pub channel: String,
    pub epoch: Epoch,
    /// From here on the subscriber receives offsets >= next_offset of `epoch`.
    pub next_offset: u64,
    pub reason: GapReason,
}

/// The outcome of a history read: either complete, or a gap followed by what is left.
#[derive(Clone, Debug)]
pub enum Replay {
    Complete(Vec<Arc<Message>>),
    Gap {
        gap: Gap,
        messages: Vec<Arc<Message>>,
    },
}

impl Replay {
    pub fn messages(&self) -> &[Arc<Message>] {
        match self {
            Replay::Complete(m) | Replay::Gap { messages: m, .. } => m,
        }
    }

    pub fn gap(&self) -> Option<&Gap> {
        match self {
            Replay::Complete(_) => None,
            Replay::Gap { gap, .. } => Some(gap),
        }
    }
}

#[derive(Clone, Debug)]
pub struct HistoryRead {
    /// The channel's position when the read was taken: its epoch and last assigned offset.
    pub top: Position,
    pub replay: Replay,
}

/// One channel's stream: its epoch, next offset and retained messages.
pub struct History {
    channel: ChannelName,
    epoch: Epoch,
    last_offset: u64,
    entries: VecDeque<(Instant, Arc<Message>)>,
    size: usize,
    ttl: Duration,
    last_active: Instant,
    /// Publishes given an offset here and not yet committed to the data dir: the channel is
    /// in use even if nothing is retained yet.
    pub(crate) pending: u32,
    /// Set (under this lock) when the sweeper removes the channel from the broker's map: a
    /// publisher or reader that looked it up before must look it up again, or it would write
    /// into a history nobody can reach any more.
    pub(crate) retired: bool,
}

impl History {
    pub fn new(channel: ChannelName, epoch: Epoch, size: usize, ttl: Duration) -> Self {
        Self {
            channel,
            epoch,
            last_offset: 0,
            entries: VecDeque::new(),
            size,
            ttl,
            last_active: Instant::now(),
            pending: 0,
            retired: false,
        }
    }

    pub fn channel(&self) -> &ChannelName {
        &self.channel
    }

    pub fn epoch(&self) -> &Epoch {
        &self.epoch
    }

    pub fn last_offset(&self) -> u64 {
        self.last_offset
    }

    /// Messages retained, oldest first (for a store's compaction).
    pub fn messages(&self) -> impl Iterator<Item = &Arc<Message>> {
        self.entries.iter().map(|(_, m)| m)
    }

    /// Puts back a message read from a data dir, published at `at`. A message that does not
    /// follow the last one (a record lost in the middle of the file) empties what is retained
    /// first: a reader from before it then gets a `trimmed` gap instead of a silent hole.
    pub fn restore(&mut self, message: Arc<Message>, at: Instant) {
        if message.offset <= self.last_offset {
            return;
        }
        if message.offset != self.last_offset + 1 {
            self.entries.clear();
        }
        self.append(message, at);
    }

    /// A position with nothing retained behind it (restored from a data dir).
    pub fn restore_position(&mut self, last_offset: u64) {
        if last_offset > self.last_offset {
            self.entries.clear();
            self.last_offset = last_offset;
        }
    }

    /// Records use (a publish, a read, a join): idle time counts from here.
    pub fn touch(&mut self, now: Instant) {
        self.last_active = now;
    }

    /// Empty and unused for a whole TTL: nobody can still hold a cursor worth keeping it for.
    /// Reclaiming sooner would hand a client that polls an idle channel a new epoch, and with it
    /// a spurious `epoch_changed` gap, every few seconds.
    pub fn reclaimable(&self, now: Instant) -> bool {
        self.entries.is_empty()
            && self.pending == 0
            && now.saturating_duration_since(self.last_active) >= self.ttl
    }

    pub fn top(&self) -> Position {
        Position {
            epoch: self.epoch.clone(),
            offset: self.last_offset,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The position the next message gets.
    pub fn next_position(&self) -> Position {
        Position {
            epoch: self.epoch.clone(),
            offset: self.last_offset + 1,
        }
    }

    pub fn append(&mut self, message: Arc<Message>, now: Instant) {
        self.last_offset = message.offset;
        if self.size == 0 {
            return;
        }
        if self.entries.len() == self.size {
            self.entries.pop_front();
        }
        self.entries.push_back((now, message));
    }

    /// Drops what is older than the TTL.
    pub fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.entries.front() {
            if now.saturating_duration_since(*at) >= self.ttl {
                self.entries.pop_front();
            } else {
                break;
            }
        }
    }

    /// Reads from `since`, at most `limit` messages (oldest first).
    pub fn read(&self, since: &Since, limit: Option<usize>) -> HistoryRead {
        let top = self.top();
        let limit = limit.unwrap_or(usize::MAX);
        let replay = match since {
            Since::Now => Replay::Complete(Vec::new()),
            Since::Last(n) => {
                let n = (*n).min(limit);
                let skip = self.entries.len().saturating_sub(n);
                Replay::Complete(self.collect(skip, usize::MAX))
            }
            Since::After(pos) => {
                let first = self
                    .entries
                    .front()
                    .map_or(self.last_offset + 1, |(_, m)| m.offset);
                if pos.epoch != self.epoch || pos.offset > self.last_offset {
                    // A cursor from another incarnation, or one ahead of this stream (which
                    // only another incarnation could have produced): start over at what is kept.
                    self.gap(GapReason::EpochChanged, first, limit)
                } else if pos.offset + 1 < first {
                    self.gap(GapReason::Trimmed, first, limit)
                } else {
                    let skip = usize::try_from(pos.offset + 1 - first).unwrap_or(usize::MAX);
                    Replay::Complete(self.collect(skip, limit))
                }
            }
        };
        HistoryRead { top, replay }
    }

    fn collect(&self, skip: usize, limit: usize) -> Vec<Arc<Message>> {
        self.entries
            .iter()
            .skip(skip)
            .take(limit)
            .map(|(_, m)| m.clone())
            .collect()
    }

    fn gap(&self, reason: GapReason, next_offset: u64, limit: usize) -> Replay {
        Replay::Gap {
            gap: Gap {
                channel: self.channel.as_str().to_owned(),
                epoch: self.epoch.clone(),
                next_offset,
                reason,
            },
            messages: self.collect(0, limit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Data;
    use bytes::Bytes;

    fn history(size: usize) -> History {
        History::new(
            ChannelName::new("c").unwrap(),
            Epoch::new("e1").unwrap(),
            size,
            Duration::from_secs(60),
        )
    }

    fn push(h: &mut History, now: Instant) -> u64 {
        let pos = h.next_position();
        let m = Message::new(
            ChannelName::new("c").unwrap(),
            pos.clone(),
            None,
            Data::Text(Bytes::from_static(b"x")),
            0,
        );
        h.append(Arc::new(m), now);
        pos.offset
    }

    fn offsets(r: &HistoryRead) -> Vec<u64> {
        r.replay.messages().iter().map(|m| m.offset).collect()
    }

    fn after(e: &str, offset: u64) -> Since {
        Since::After(Position {
            epoch: Epoch::new(e).unwrap(),
            offset,
        })
    }

    #[test]
    fn a_read_after_a_retained_position_is_complete() {
        let mut h = history(10);
        let now = Instant::now();
        for _ in 0..5 {
            push(&mut h, now);
        }
        let r = h.read(&after("e1", 2), None);
        assert_eq!(offsets(&r), vec![3, 4, 5]);
        assert!(r.replay.gap().is_none());
        assert_eq!(r.top.offset, 5);
        assert_eq!(offsets(&h.read(&after("e1", 5), None)), Vec::<u64>::new());
        assert_eq!(offsets(&h.read(&after("e1", 0), Some(2))), vec![1, 2]);
    }

    #[test]
    fn a_read_behind_trimmed_history_reports_a_gap_then_what_is_left() {
        let mut h = history(3);
        let now = Instant::now();
        for _ in 0..6 {
            push(&mut h, now);
        }
        let r = h.read(&after("e1", 1), None);
        let gap = r.replay.gap().unwrap();
        assert_eq!((gap.reason, gap.next_offset), (GapReason::Trimmed, 4));
        assert_eq!(offsets(&r), vec![4, 5, 6]);
        // Exactly at the edge (next wanted = first kept) is no gap.
        assert!(h.read(&after("e1", 3), None).replay.gap().is_none());
    }

    #[test]
    fn a_read_from_another_epoch_reports_epoch_changed() {
        let mut h = history(3);
        push(&mut h, Instant::now());
        let r = h.read(&after("old", 7), None);
        assert_eq!(r.replay.gap().unwrap().reason, GapReason::EpochChanged);
        assert_eq!(offsets(&r), vec![1]);
    }

    #[test]
    fn expired_messages_leave_a_gap_but_keep_the_offset_counter() {
        let mut h = history(10);
        let t0 = Instant::now();
        push(&mut h, t0);
        push(&mut h, t0);
        h.expire(t0 + Duration::from_secs(61));
        assert!(h.is_empty());
        let r = h.read(&after("e1", 1), None);
        assert_eq!(r.replay.gap().unwrap().next_offset, 3);
        assert_eq!(push(&mut h, t0), 3);
    }

    #[test]
    fn last_n_returns_the_most_recent_oldest_first() {
        let mut h = history(10);
        for _ in 0..5 {
            push(&mut h, Instant::now());
        }
        assert_eq!(offsets(&h.read(&Since::Last(2), None)), vec![4, 5]);
        assert_eq!(offsets(&h.read(&Since::Last(50), None)).len(), 5);
        assert!(offsets(&h.read(&Since::Now, None)).is_empty());
    }

    #[test]
    fn a_history_of_size_zero_keeps_nothing_but_counts() {
        let mut h = history(0);
        push(&mut h, Instant::now());
        assert_eq!(push(&mut h, Instant::now()), 2);
        assert!(h.is_empty());
    }
}
