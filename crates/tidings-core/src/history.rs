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
use crate::store::Loc;

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
///
/// In memory only, `entries` holds every retained message. With a data dir (`durable`),
/// `index` holds where every retained message lies on disk and when it was published (12
/// bytes each), and `entries` only the most recent `cache` of them: a read that reaches
/// further back gets the older part as `Loc`s to read from the store (`read_plan`).
/// Retained offsets are always contiguous, ending at `last_offset`.
pub struct History {
    channel: ChannelName,
    epoch: Epoch,
    last_offset: u64,
    entries: VecDeque<(Instant, Arc<Message>)>,
    index: Option<DiskIndex>,
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

/// Every retained message's place on disk, oldest first.
struct DiskIndex {
    slots: VecDeque<Slot>,
    /// Messages kept in RAM (the most recent ones).
    cache: usize,
    /// `Slot::at` counts tenths of a second from here (`ttl` before the history was made, so
    /// anything older has expired anyway).
    base: Instant,
}

/// 12 bytes: where a message lies and when it was published.
#[derive(Clone, Copy)]
#[repr(C, packed(4))]
struct Slot {
    loc: Loc,
    at: u32,
}

const TICK: Duration = Duration::from_millis(100);

impl DiskIndex {
    fn encode(&self, at: Instant) -> u32 {
        let ticks = at.saturating_duration_since(self.base).as_millis() / TICK.as_millis();
        u32::try_from(ticks).unwrap_or(u32::MAX)
    }

    fn at(&self, slot: Slot) -> Instant {
        self.base + TICK * slot.at
    }
}

/// A read taken under the channel's lock, with the part that lies only on disk still to be
/// read: `from_disk` precedes `read.replay`'s messages.
pub struct ReadPlan {
    pub read: HistoryRead,
    pub from_disk: Vec<Loc>,
}

impl History {
    pub fn new(channel: ChannelName, epoch: Epoch, size: usize, ttl: Duration) -> Self {
        Self {
            channel,
            epoch,
            last_offset: 0,
            entries: VecDeque::new(),
            index: None,
            size,
            ttl,
            last_active: Instant::now(),
            pending: 0,
            retired: false,
        }
    }

    /// A history whose messages live on disk, `cache` of the most recent ones also in RAM.
    pub fn durable(
        channel: ChannelName,
        epoch: Epoch,
        size: usize,
        ttl: Duration,
        cache: usize,
    ) -> Self {
        let now = Instant::now();
        let mut h = Self::new(channel, epoch, size, ttl);
        h.index = Some(DiskIndex {
            slots: VecDeque::new(),
            cache,
            base: now.checked_sub(ttl).unwrap_or(now),
        });
        h
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

    /// Where the retained messages lie on disk, oldest first (for a store's compaction).
    pub fn locs(&self) -> Vec<Loc> {
        self.index
            .as_ref()
            .map(|i| i.slots.iter().map(|s| s.loc).collect())
            .unwrap_or_default()
    }

    /// After a compaction: the messages from `first` on lie at `locs` now. Those expired
    /// meanwhile are skipped; those appended after the compaction's snapshot (past the end
    /// of `locs`) were written after its cut and keep their places.
    pub fn relocate(&mut self, first: u64, locs: &[Loc]) {
        let kept_from = self.first_offset();
        let Some(index) = &mut self.index else {
            return;
        };
        for (i, slot) in index.slots.iter_mut().enumerate() {
            let offset = kept_from + i as u64;
            if let Some(&loc) = offset
                .checked_sub(first)
                .and_then(|k| locs.get(usize::try_from(k).ok()?))
            {
                slot.loc = loc;
            }
        }
    }

    /// Puts back a message read from a data dir, published at `at`. A message that does not
    /// follow the last one (a record lost in the middle of the file) empties what is retained
    /// first: a reader from before it then gets a `trimmed` gap instead of a silent hole.
    pub fn restore(&mut self, message: Arc<Message>, loc: Loc, at: Instant) {
        if message.offset <= self.last_offset {
            return;
        }
        if message.offset != self.last_offset + 1 {
            self.clear();
        }
        self.append_at(message, loc, at);
    }

    /// A position with nothing retained behind it (restored from a data dir).
    pub fn restore_position(&mut self, last_offset: u64) {
        if last_offset > self.last_offset {
            self.clear();
            self.last_offset = last_offset;
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        if let Some(i) = &mut self.index {
            i.slots.clear();
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
        self.is_empty()
            && self.pending == 0
            && now.saturating_duration_since(self.last_active) >= self.ttl
    }

    pub fn top(&self) -> Position {
        Position {
            epoch: self.epoch.clone(),
            offset: self.last_offset,
        }
    }

    /// Messages retained (in RAM or on disk).
    pub fn len(&self) -> usize {
        match &self.index {
            Some(i) => i.slots.len(),
            None => self.entries.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Messages held in RAM.
    pub fn cached(&self) -> usize {
        self.entries.len()
    }

    fn first_offset(&self) -> u64 {
        self.last_offset + 1 - self.len() as u64
    }

    /// The position the next message gets.
    pub fn next_position(&self) -> Position {
        Position {
            epoch: self.epoch.clone(),
            offset: self.last_offset + 1,
        }
    }

    /// Appends a message held in memory only.
    pub fn append(&mut self, message: Arc<Message>, now: Instant) {
        self.append_at(message, 0, now);
    }

    /// Appends a message, which lies at `loc` in the data dir if this history is durable.
    pub fn append_at(&mut self, message: Arc<Message>, loc: Loc, now: Instant) {
        self.last_offset = message.offset;
        if self.size == 0 {
            return;
        }
        let cache = match &mut self.index {
            None => self.size,
            Some(index) => {
                if index.slots.len() == self.size {
                    index.slots.pop_front();
                } else if index.slots.len() == index.slots.capacity() {
                    // Grow by doubling but never past `size`: a full index of 100 takes 100
                    // slots, not the 128 plain doubling would leave (per channel, it adds up).
                    let want = (index.slots.len() * 2).max(4).min(self.size);
                    index.slots.reserve_exact(want - index.slots.len());
                }
                let at = index.encode(now);
                index.slots.push_back(Slot { loc, at });
                index.cache.min(self.size)
            }
        };
        if cache == 0 {
            return;
        }
        if self.entries.len() >= cache {
            self.entries.pop_front();
        }
        self.entries.push_back((now, message));
    }

    /// Drops what is older than the TTL.
    pub fn expire(&mut self, now: Instant) {
        if let Some(index) = &mut self.index {
            while let Some(&slot) = index.slots.front() {
                if now.saturating_duration_since(index.at(slot)) >= self.ttl {
                    index.slots.pop_front();
                } else {
                    break;
                }
            }
            // The cache holds a suffix of what is retained.
            let keep = index.slots.len();
            while self.entries.len() > keep {
                self.entries.pop_front();
            }
            return;
        }
        while let Some((at, _)) = self.entries.front() {
            if now.saturating_duration_since(*at) >= self.ttl {
                self.entries.pop_front();
            } else {
                break;
            }
        }
    }

    /// Reads from `since`, at most `limit` messages (oldest first). For a durable history,
    /// only what is cached; `read_plan` says what else to read from disk.
    pub fn read(&self, since: &Since, limit: Option<usize>) -> HistoryRead {
        self.read_plan(since, limit).read
    }

    /// Reads from `since`, at most `limit` messages: the cached part in `read`, the part
    /// that is only on disk (older, so first) as `from_disk`.
    pub fn read_plan(&self, since: &Since, limit: Option<usize>) -> ReadPlan {
        let top = self.top();
        let limit = limit.unwrap_or(usize::MAX);
        let first = self.first_offset();
        let end = self.last_offset + 1;
        let take = |from: u64| from..end.min(from.saturating_add(limit as u64));
        let (gap, range) = match since {
            Since::Now => (None, end..end),
            Since::Last(n) => {
                let n = (*n).min(limit).min(self.len()) as u64;
                (None, end - n..end)
            }
            Since::After(pos) => {
                if pos.epoch != self.epoch || pos.offset > self.last_offset {
                    // A cursor from another incarnation, or one ahead of this stream (which
                    // only another incarnation could have produced): start over at what is kept.
                    (Some(GapReason::EpochChanged), take(first))
                } else if pos.offset + 1 < first {
                    (Some(GapReason::Trimmed), take(first))
                } else {
                    (None, take(pos.offset + 1))
                }
            }
        };
        let cached_from = end - self.entries.len() as u64;
        let mut from_disk = Vec::new();
        if let Some(index) = &self.index {
            for offset in range.start..range.end.min(cached_from) {
                if let Some(slot) = usize::try_from(offset - first)
                    .ok()
                    .and_then(|i| index.slots.get(i))
                {
                    from_disk.push(slot.loc);
                }
            }
        }
        let skip = usize::try_from(range.start.saturating_sub(cached_from)).unwrap_or(usize::MAX);
        let count = usize::try_from(range.end.saturating_sub(range.start.max(cached_from)))
            .unwrap_or(usize::MAX);
        let messages = self.collect(skip, count);
        let replay = match gap {
            None => Replay::Complete(messages),
            Some(reason) => Replay::Gap {
                gap: Gap {
                    channel: self.channel.as_str().to_owned(),
                    epoch: self.epoch.clone(),
                    next_offset: first,
                    reason,
                },
                messages,
            },
        };
        ReadPlan {
            read: HistoryRead { top, replay },
            from_disk,
        }
    }

    fn collect(&self, skip: usize, limit: usize) -> Vec<Arc<Message>> {
        self.entries
            .iter()
            .skip(skip)
            .take(limit)
            .map(|(_, m)| m.clone())
            .collect()
    }
}

impl Replay {
    /// Puts `older` (read from disk) before the messages already in the replay.
    pub fn prepend(&mut self, older: Vec<Arc<Message>>) {
        if older.is_empty() {
            return;
        }
        let (Replay::Complete(m) | Replay::Gap { messages: m, .. }) = self;
        let newer = std::mem::replace(m, older);
        m.extend(newer);
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

    fn durable(size: usize, cache: usize) -> History {
        History::durable(
            ChannelName::new("c").unwrap(),
            Epoch::new("e1").unwrap(),
            size,
            Duration::from_secs(60),
            cache,
        )
    }

    /// Appends offsets 1..=n at `loc = 1000 + offset`.
    fn fill(h: &mut History, n: u64, now: Instant) {
        for _ in 0..n {
            let pos = h.next_position();
            let m = Message::new(
                ChannelName::new("c").unwrap(),
                pos.clone(),
                None,
                Data::Text(Bytes::from_static(b"x")),
                0,
            );
            h.append_at(Arc::new(m), 1000 + pos.offset, now);
        }
    }

    #[test]
    fn a_durable_read_past_the_cache_plans_the_older_part_from_disk() {
        let mut h = durable(100, 10);
        fill(&mut h, 100, Instant::now());
        assert_eq!((h.len(), h.cached()), (100, 10));
        let p = h.read_plan(&after("e1", 50), None);
        assert_eq!(p.from_disk, (1051..=1090).collect::<Vec<_>>());
        assert_eq!(offsets(&p.read), (91..=100).collect::<Vec<_>>());
        // Within the cache: nothing from disk.
        let p = h.read_plan(&after("e1", 95), None);
        assert!(p.from_disk.is_empty());
        assert_eq!(offsets(&p.read), (96..=100).collect::<Vec<_>>());
        // A limit that ends before the cache starts.
        let p = h.read_plan(&after("e1", 50), Some(20));
        assert_eq!(p.from_disk, (1051..=1070).collect::<Vec<_>>());
        assert!(offsets(&p.read).is_empty());
        // Last N, and a trimmed gap from before what is retained.
        let p = h.read_plan(&Since::Last(12), None);
        assert_eq!(p.from_disk, [1089, 1090]);
        fill(&mut h, 5, Instant::now());
        let p = h.read_plan(&after("e1", 2), Some(3));
        let gap = p.read.replay.gap().unwrap();
        assert_eq!((gap.reason, gap.next_offset), (GapReason::Trimmed, 6));
        assert_eq!(p.from_disk, [1006, 1007, 1008]);
    }

    #[test]
    fn a_durable_history_expires_on_disk_and_in_its_cache_alike() {
        let mut h = durable(100, 3);
        let t0 = Instant::now();
        fill(&mut h, 5, t0);
        fill(&mut h, 2, t0 + Duration::from_secs(30));
        h.expire(t0 + Duration::from_secs(61));
        assert_eq!((h.len(), h.cached()), (2, 2));
        let p = h.read_plan(&after("e1", 0), None);
        assert_eq!(p.read.replay.gap().unwrap().next_offset, 6);
        assert!(p.from_disk.is_empty());
        h.expire(t0 + Duration::from_secs(91));
        assert!(h.is_empty() && h.cached() == 0);
        assert_eq!(h.next_position().offset, 8);
    }

    #[test]
    fn relocating_after_a_compaction_skips_what_expired_meanwhile() {
        let mut h = durable(4, 0);
        fill(&mut h, 6, Instant::now());
        // Retained 3..=6; the compaction saw 2..=6 (2 trimmed since).
        h.relocate(2, &[7002, 7003, 7004, 7005, 7006]);
        let p = h.read_plan(&after("e1", 2), None);
        assert_eq!(p.from_disk, [7003, 7004, 7005, 7006]);
    }
}
