//! The single-node broker: history in RAM, an epoch per channel incarnation, and optionally a
//! data dir (`Store`) that history, offsets and epochs are written through.
//!
//! Concurrency: channels live in a sharded map of `Arc<Mutex<History>>` (std mutexes, never
//! held across an `.await`). Offsets, history and fan-out change only under a channel's lock,
//! so "in history before anyone sees it" and "delivered in offset order" hold by construction.
//!
//! - In memory only, `publish` assigns the offset, appends and calls `Hub::deliver` under the
//!   channel's lock, on the publisher's task.
//! - With a store, every publish goes through one writer thread (`run_writer`) over a bounded
//!   queue: it takes what is queued (one job under `fsync = "always"`), gives each message its
//!   offset under the channel's lock (counting it as `pending`, which also keeps the sweeper
//!   off the channel), writes the batch and fsyncs once (group commit), and only then, channel
//!   lock by channel lock and in batch order, appends to history, delivers and answers. A
//!   message is thus never seen before it is durable, so a crash can never hand its offset to
//!   a different message; a failed write answers every publish of the batch with an error and
//!   the offsets are simply not taken (the channel's `last_offset` never moved).
//! - With a store, a channel's history is an index of where each retained message lies on
//!   disk plus the most recent `history_cache` messages in RAM (`History::durable`). A read
//!   that reaches past the cache is planned under the channel's lock (which `Loc`s, which
//!   cached messages) and the older part is then read with `spawn_blocking`, never on the
//!   runtime's threads and never on the writer thread: reads are `pread`s of whole, already
//!   written records, parallel with each other and with writes, and queuing them behind the
//!   writer would make every resume wait for other publishers' fsyncs. At most
//!   `DISK_READS` such reads run at once (a semaphore: the rest wait their turn). The index
//!   only ever names records whose write returned, so a disk read never sees a message
//!   before it is durable. A compaction moves records: the writer thread snapshots every
//!   history's index and has the store cut its log, a `tidings-compact` thread copies what
//!   is retained while publishes go on after the cut, and its outcome comes back through
//!   the job queue, where the writer installs it and re-points each history's index under
//!   its lock (only the part the snapshot covered: later messages were written after the
//!   cut and stay put); a read that planned with old `Loc`s and finds their segment gone
//!   (`ReadError::Moved`) plans again.
//!
//! Only a publish creates a channel. Reading one the broker does not hold (a poll, a join, a
//! history read) leaves no state behind: it answers with the position `(fresh, 0)`, where
//! `fresh` is the epoch the next new channel will get. A cursor at `(fresh, 0)` therefore
//! resumes without a gap when the channel is then created, as long as no channel that had
//! messages was reclaimed meanwhile: every such reclaim draws a new `fresh` (under the
//! reclaimed channel's shard lock), so a channel that came, published, expired and went while
//! a client was away can never be mistaken for the first incarnation it saw.
//!
//! A channel with no subscribers, no retained history and no use for a whole `history_ttl` is
//! reclaimed by a sweeper task, one shard per tick so each tick's work is a fraction of the
//! map; when it comes back it gets a new epoch, so an old cursor reports `epoch_changed`.
//! `max_channels` caps how many exist: a publish that would create one more is refused. The sweeper marks what it removes `retired` under the channel's
//! lock; whoever looked the channel up before and finds it retired looks it up again
//! (`locked`), so nothing is ever written into a history the map no longer holds.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::broker::{Broker, BrokerError, ChannelStats};
use crate::channel::{ChannelName, EventName};
use crate::history::{Gap, GapReason, History, HistoryRead, ReadPlan, Replay, Since};
use crate::hub::Hub;
use crate::idempotency::{IdempotencyWindow, PublishOptions, Published, Remembered};
use crate::message::{Data, Epoch, Message};
use crate::policy::LivePolicies;
use crate::presence::{ClientInfo, PresenceEvent, PresenceKind};
use crate::shards::Shards;
use crate::store::{
    Copied, Fsync, KeySnapshot, Keyed, ReadError, Recovered, Snapshot, Store, StoreError,
    StoreReader, age,
};

/// The whole map is swept once per this period, one shard per tick.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Publishes waiting for the writer thread; a full queue makes publishers wait (backpressure).
const JOB_QUEUE: usize = 4096;
/// At most this many publishes share one write and one fsync.
const MAX_BATCH: usize = 1024;
/// History reads from the data dir running at once (blocking threads they may occupy).
const DISK_READS: usize = 16;
/// Messages per channel kept in RAM with a data dir, when not configured.
pub const DEFAULT_HISTORY_CACHE: usize = 16;

pub struct MemoryBroker {
    hub: Arc<Hub>,
    policies: Arc<LivePolicies>,
    shards: Shards<Arc<Mutex<History>>>,
    /// Who is present where, per channel by client id (its user beside it): a join or leave
    /// is O(log n) and a page of readers is a range, not a scan or a clone of the whole list.
    /// One lock: joins and leaves are per connection, not per message.
    presence: Mutex<HashMap<ChannelName, BTreeMap<String, Option<String>>>>,
    /// Idempotency keys per channel, checked and recorded while holding the channel's
    /// history lock (lock order: history, then this shard). Kept apart from the history so a
    /// reclaimed channel still remembers them; the sweeper drops empty windows.
    keys: Shards<IdempotencyWindow>,
    durable: Option<Durable>,
    /// The epoch a channel created now gets (see the module comment).
    fresh: Mutex<Epoch>,
    /// Channels in `shards`, and how many may be.
    count: AtomicUsize,
    max_channels: AtomicUsize,
    /// The shard the next sweep tick visits.
    sweep_at: AtomicUsize,
}

/// The write-through side, with a data dir.
struct Durable {
    jobs: mpsc::Sender<Job>,
    bytes_on_disk: Arc<AtomicU64>,
    reader: Arc<dyn StoreReader>,
    reads: Arc<tokio::sync::Semaphore>,
    /// Messages per channel kept in RAM.
    cache: usize,
    /// Why the data dir can take no more publishes (the writer thread panicked, or the store
    /// is broken until a restart); `ready` reports it, so a load balancer stops sending
    /// publishes to a node that can only refuse them.
    /// A `watch` so a test (or anything else) can await the moment it is set.
    failed: Arc<tokio::sync::watch::Sender<Option<String>>>,
}

type Reply = oneshot::Sender<Result<Published, BrokerError>>;

enum Job {
    Publish {
        channel: ChannelName,
        event: Option<EventName>,
        data: Data,
        options: PublishOptions,
        reply: Reply,
    },
    Forget {
        channel: ChannelName,
        epoch: Epoch,
        /// The epoch new channels get from now on, when this reclaim redrew it.
        fresh: Option<Epoch>,
    },
    /// A compaction's copy is done (sent by its thread): install it and re-point the
    /// histories it covered.
    Compacted {
        copied: Result<Copied, StoreError>,
        /// Per snapshot, in order: whose it is and the offset of its first message.
        taken: Vec<(Arc<Mutex<History>>, Epoch, u64)>,
    },
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data valid at each step; poisoning carries no meaning.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Channels read back from a data dir, built record by record as the store replays them.
/// Only each channel's index and its `cache` most recent messages stay in RAM.
pub struct Restore {
    policies: Arc<LivePolicies>,
    channels: HashMap<ChannelName, History>,
    keys: HashMap<ChannelName, IdempotencyWindow>,
    fresh: Option<Epoch>,
    cache: usize,
    now: Instant,
    now_ms: u64,
}

impl Restore {
    pub fn new(policies: Arc<LivePolicies>) -> Self {
        Self {
            policies,
            channels: HashMap::new(),
            keys: HashMap::new(),
            fresh: None,
            cache: DEFAULT_HISTORY_CACHE,
            now: Instant::now(),
            now_ms: now_millis(),
        }
    }

    /// Keeps the `cache` most recent messages of each channel in RAM (the rest is read from
    /// disk when asked for).
    pub fn with_cache(mut self, cache: usize) -> Self {
        self.cache = cache;
        self
    }

    fn remember(&mut self, channel: ChannelName, first: Remembered, keyed: Keyed) {
        let Some(left) = keyed.until_ms.checked_sub(self.now_ms).filter(|&l| l > 0) else {
            return;
        };
        self.keys.entry(channel).or_default().insert(
            keyed.key,
            first,
            self.now,
            Duration::from_millis(left),
        );
    }

    /// The channel in `epoch`: a record of another epoch starts a new incarnation.
    fn incarnation(&mut self, channel: &ChannelName, epoch: &Epoch) -> &mut History {
        let policy = self.policies.for_channel(channel);
        let cache = self.cache;
        let make = || {
            History::durable(
                channel.clone(),
                epoch.clone(),
                policy.history_size,
                policy.history_ttl,
                cache,
            )
        };
        let h = self.channels.entry(channel.clone()).or_insert_with(make);
        if h.epoch() != epoch {
            *h = make();
        }
        h
    }

    pub fn apply(&mut self, record: Recovered) {
        match record {
            Recovered::Message { message, loc, key } => {
                let at = self
                    .now
                    .checked_sub(age(message.time, self.now_ms))
                    .unwrap_or(self.now);
                let (channel, epoch) = (message.channel.clone(), message.epoch.clone());
                if let Some(keyed) = key {
                    let first = Remembered {
                        position: message.position(),
                        time: message.time,
                    };
                    self.remember(channel.clone(), first, keyed);
                }
                let now = self.now;
                let h = self.incarnation(&channel, &epoch);
                h.restore(Arc::new(message), loc, at);
                h.expire(now);
            }
            Recovered::Key(k) => {
                let first = Remembered {
                    position: k.position,
                    time: k.time,
                };
                self.remember(k.channel, first, k.keyed);
            }
            Recovered::Fresh(epoch) => self.fresh = Some(epoch),
            Recovered::Channel {
                channel,
                epoch,
                last_offset,
            } => self
                .incarnation(&channel, &epoch)
                .restore_position(last_offset),
            Recovered::Forgotten { channel, epoch } => {
                if self
                    .channels
                    .get(&channel)
                    .is_some_and(|h| h.epoch() == &epoch)
                {
                    self.channels.remove(&channel);
                }
            }
        }
    }

    /// Channels restored so far.
    pub fn len(&self) -> usize {
        self.channels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }
}

impl MemoryBroker {
    /// Creates the broker and, inside a tokio runtime, its sweeper (which ends with the broker).
    pub fn new(hub: Arc<Hub>, policies: Arc<LivePolicies>) -> Arc<Self> {
        let broker = Arc::new(Self {
            hub,
            policies,
            shards: Shards::new(),
            keys: Shards::new(),
            presence: Mutex::new(HashMap::new()),
            durable: None,
            fresh: Mutex::new(Epoch::random()),
            count: AtomicUsize::new(0),
            max_channels: AtomicUsize::new(usize::MAX),
            sweep_at: AtomicUsize::new(0),
        });
        spawn_sweeper(&broker);
        broker
    }

    /// A broker that writes through `store`, starting from what it held (`restore`). Starts
    /// the writer thread, which ends when the broker is dropped.
    /// The epoch new channels get is kept in the data dir too (written here if it holds
    /// none yet), so a cursor taken on a channel before it existed resumes without a gap
    /// across a restart.
    pub fn durable(
        hub: Arc<Hub>,
        policies: Arc<LivePolicies>,
        restore: Restore,
        mut store: Box<dyn Store>,
        fsync: Fsync,
    ) -> std::io::Result<Arc<Self>> {
        let (jobs, queue) = mpsc::channel(JOB_QUEUE);
        let fresh = match restore.fresh {
            Some(epoch) => epoch,
            None => {
                // One small write and fsync, once, when a data dir is first used.
                let epoch = Epoch::random();
                store.set_fresh(&epoch).map_err(std::io::Error::other)?;
                epoch
            }
        };
        let bytes_on_disk = Arc::new(AtomicU64::new(store.bytes_on_disk()));
        let failed = Arc::new(tokio::sync::watch::Sender::new(None));
        let keys = Shards::new();
        for (name, window) in restore.keys {
            relock(keys.of(&name)).insert(name, window);
        }
        let shards = Shards::new();
        let now = Instant::now();
        let count = restore.channels.len();
        for (name, mut history) in restore.channels {
            history.expire(now);
            // A restored channel counts as used now: clients resuming after the restart
            // find their epoch even when nothing is retained any more.
            history.touch(now);
            relock(shards.of(&name)).insert(name, Arc::new(Mutex::new(history)));
        }
        let broker = Arc::new(Self {
            hub,
            policies,
            shards,
            presence: Mutex::new(HashMap::new()),
            keys,
            durable: Some(Durable {
                jobs,
                bytes_on_disk: bytes_on_disk.clone(),
                reader: store.reader(),
                reads: Arc::new(tokio::sync::Semaphore::new(DISK_READS)),
                cache: restore.cache,
                failed: failed.clone(),
            }),
            fresh: Mutex::new(fresh),
            count: AtomicUsize::new(count),
            max_channels: AtomicUsize::new(usize::MAX),
            sweep_at: AtomicUsize::new(0),
        });
        let weak = Arc::downgrade(&broker);
        std::thread::Builder::new()
            .name("tidings-store".into())
            .spawn(move || {
                // A panic here is a bug, but it must not look like a healthy node: waiting
                // publishers get an error as their replies drop, and `ready` says why.
                let run = std::panic::AssertUnwindSafe(|| {
                    run_writer(weak, store, queue, fsync, bytes_on_disk)
                });
                if let Err(panic) = std::panic::catch_unwind(run) {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    tracing::error!(panic = %what, "the data dir's writer thread panicked; publishing stops until a restart");
                    failed.send_replace(Some(format!("the data dir's writer panicked: {what}")));
                }
            })?;
        spawn_sweeper(&broker);
        Ok(broker)
    }

    /// Caps how many channels may exist; a publish that would create one more is refused.
    pub fn set_max_channels(&self, max: usize) {
        self.max_channels.store(max.max(1), Ordering::Relaxed);
    }

    /// Channels the broker holds now.
    pub fn channel_count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Messages retained over all channels, and how many of them are held in RAM (with a
    /// data dir the rest is on disk). A scan of every channel: for tests and tools.
    pub fn history_counts(&self) -> (usize, usize) {
        let histories: Vec<Arc<Mutex<History>>> = self
            .shards
            .all()
            .flat_map(|s| relock(s).values().cloned().collect::<Vec<_>>())
            .collect();
        histories.iter().fold((0, 0), |(retained, cached), h| {
            let h = relock(h);
            (retained + h.len(), cached + h.cached())
        })
    }

    /// The channel's history, created (with the fresh epoch) if the broker holds none.
    fn channel(&self, channel: &ChannelName) -> Result<Arc<Mutex<History>>, BrokerError> {
        let mut shard = relock(self.shards.of(channel));
        if let Some(h) = shard.get(channel) {
            return Ok(h.clone());
        }
        let max = self.max_channels.load(Ordering::Relaxed);
        if self.count.load(Ordering::Relaxed) >= max {
            return Err(BrokerError::TooManyChannels(max));
        }
        let policy = self.policies.for_channel(channel);
        let epoch = relock(&self.fresh).clone();
        let history = Arc::new(Mutex::new(match &self.durable {
            Some(d) => History::durable(
                channel.clone(),
                epoch,
                policy.history_size,
                policy.history_ttl,
                d.cache,
            ),
            None => History::new(
                channel.clone(),
                epoch,
                policy.history_size,
                policy.history_ttl,
            ),
        }));
        shard.insert(channel.clone(), history.clone());
        self.count.fetch_add(1, Ordering::Relaxed);
        Ok(history)
    }

    /// Reads a channel, creating nothing: one the broker does not hold answers from
    /// `(fresh, 0)`, under its shard's lock so a concurrent reclaim is seen whole.
    fn read_existing(
        &self,
        channel: &ChannelName,
        since: &Since,
        limit: Option<usize>,
    ) -> ReadPlan {
        let found = {
            let shard = relock(self.shards.of(channel));
            match shard.get(channel) {
                Some(h) => h.clone(),
                None => {
                    let fresh = relock(&self.fresh).clone();
                    return ReadPlan {
                        read: absent(channel, fresh, since),
                        from_disk: Vec::new(),
                    };
                }
            }
        };
        let mut h = relock(&found);
        if h.retired {
            drop(h);
            return self.read_existing(channel, since, limit);
        }
        let now = Instant::now();
        h.expire(now);
        h.touch(now);
        h.read_plan(since, limit)
    }

    /// A read, with what lies only on disk read back off the runtime's threads.
    async fn read_through(
        &self,
        channel: &ChannelName,
        since: &Since,
        limit: Option<usize>,
    ) -> Result<HistoryRead, BrokerError> {
        // A compaction between planning and reading moves records: plan again (a compaction
        // takes far longer than a plan, so one retry nearly always does; a few bound it).
        for _ in 0..4 {
            let ReadPlan {
                mut read,
                from_disk,
            } = self.read_existing(channel, since, limit);
            let Some(d) = self.durable.as_ref().filter(|_| !from_disk.is_empty()) else {
                return Ok(read);
            };
            let _permit = d
                .reads
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| BrokerError::Storage("the data dir is closed".into()))?;
            let reader = d.reader.clone();
            let loaded = tokio::task::spawn_blocking(move || reader.read(&from_disk))
                .await
                .map_err(|e| BrokerError::Storage(format!("reading the data dir: {e}")))?;
            match loaded {
                Ok(older) => {
                    read.replay
                        .prepend(older.into_iter().map(Arc::new).collect());
                    return Ok(read);
                }
                Err(ReadError::Moved) => continue,
                Err(e @ ReadError::Failed(_)) => {
                    tracing::error!(error = %e, %channel, "reading history from the data dir failed");
                    return Err(BrokerError::Storage(e.to_string()));
                }
            }
        }
        Err(BrokerError::Storage(
            "the data dir kept moving under a read; try again".into(),
        ))
    }

    /// Runs `f` under the lock of the channel's live history. `found` is a history looked up
    /// earlier: if the sweeper retired it meanwhile, the channel is looked up again.
    fn locked<R>(
        &self,
        channel: &ChannelName,
        mut found: Arc<Mutex<History>>,
        f: impl FnOnce(&Arc<Mutex<History>>, &mut History) -> R,
    ) -> Result<R, BrokerError> {
        loop {
            let mut h = relock(&found);
            if !h.retired {
                return Ok(f(&found, &mut h));
            }
            drop(h);
            found = self.channel(channel)?;
        }
    }

    /// The first answer to a publish whose idempotency key the channel's window still holds.
    /// Call under the channel's history lock (lock order: history, then the key shard).
    fn replay_of(
        &self,
        channel: &ChannelName,
        options: &PublishOptions,
        event: &Option<EventName>,
        data: &Data,
        now: Instant,
    ) -> Option<Published> {
        let key = options.idempotency_key.as_ref()?;
        let first = relock(self.keys.of(channel))
            .get_mut(channel)
            .and_then(|w| w.get(key, now))?;
        let message = Message::new(
            channel.clone(),
            first.position,
            event.clone(),
            data.clone(),
            first.time,
        );
        Some(Published {
            message: Arc::new(message),
            replayed: true,
        })
    }

    /// Records a stored publish's key. Call under the channel's history lock, once the
    /// message is in history (durable, with a data dir).
    fn remember(
        &self,
        channel: &ChannelName,
        options: &PublishOptions,
        message: &Message,
        now: Instant,
    ) {
        if let Some(key) = &options.idempotency_key {
            let first = Remembered {
                position: message.position(),
                time: message.time,
            };
            relock(self.keys.of(channel))
                .entry(channel.clone())
                .or_default()
                .insert(key.clone(), first, now, options.idempotency_window);
        }
    }

    /// Expires history everywhere and reclaims channels nobody follows and nothing is kept for.
    pub fn sweep(&self) {
        for i in 0..self.shards.len() {
            self.sweep_shard(i);
        }
    }

    /// One sweeper tick: the next shard.
    fn sweep_step(&self) {
        let i = self.sweep_at.fetch_add(1, Ordering::Relaxed) % self.shards.len();
        self.sweep_shard(i);
    }

    fn sweep_shard(&self, i: usize) {
        let now = Instant::now();
        if let Some(keys) = self.keys.all().nth(i) {
            relock(keys).retain(|_, window| !window.sweep(now));
        }
        let Some(shard) = self.shards.all().nth(i) else {
            return;
        };
        let mut shard = relock(shard);
        let mut published_gone = false;
        shard.retain(|name, history| {
            let mut h = relock(history);
            h.expire(now);
            // The hub check happens under the shard lock: a subscriber that registers
            // after it and then reads sees no channel, which is consistent.
            if !h.reclaimable(now) || self.hub.subscriber_count(name) > 0 {
                return true;
            }
            let redraw = h.last_offset() > 0 && h.epoch() == &*relock(&self.fresh);
            if let Some(d) = &self.durable {
                let fresh = redraw.then(Epoch::random);
                let forget = Job::Forget {
                    channel: name.clone(),
                    epoch: h.epoch().clone(),
                    fresh: fresh.clone(),
                };
                if d.jobs.try_send(forget).is_err() {
                    // The writer is busy: reclaim at a later sweep rather than let the
                    // channel come back from the data dir after a restart.
                    return true;
                }
                if let Some(fresh) = fresh {
                    // Still under the shard lock (see below); the writer records it.
                    *relock(&self.fresh) = fresh;
                }
            } else {
                published_gone |= redraw;
            }
            h.retired = true;
            self.count.fetch_sub(1, Ordering::Relaxed);
            false
        });
        if published_gone {
            // Still under the shard lock: nobody can read this channel as absent, or
            // create it again, with the old fresh epoch.
            *relock(&self.fresh) = Epoch::random();
        }
    }

    /// Gives each queued publish its offset, writes the batch, then makes it visible in order.
    fn commit(&self, store: &mut dyn Store, batch: &mut Vec<Job>, sync: bool) {
        let now = Instant::now();
        let now_ms = now_millis();
        let mut staged = Vec::with_capacity(batch.len());
        let mut forgotten = Vec::new();
        // The last offset given out in this batch, per channel: `last_offset` itself only
        // moves once the batch is durable.
        let mut given: foldhash::HashMap<ChannelName, u64> = Default::default();
        // Keys of this batch's publishes: a second publish with one of them waits for the
        // next batch, where the first is durable and its answer can be replayed (answering
        // it now could replay a message whose write then fails).
        let mut keyed: foldhash::HashSet<(ChannelName, crate::idempotency::IdempotencyKey)> =
            Default::default();
        let mut deferred = Vec::new();
        let mut compacted = Vec::new();
        for job in batch.drain(..) {
            let (channel, event, data, options, reply) = match job {
                Job::Publish {
                    channel,
                    event,
                    data,
                    options,
                    reply,
                } => (channel, event, data, options, reply),
                Job::Forget {
                    channel,
                    epoch,
                    fresh,
                } => {
                    forgotten.push((channel, epoch, fresh));
                    continue;
                }
                Job::Compacted { copied, taken } => {
                    compacted.push((copied, taken));
                    continue;
                }
            };
            if let Some(key) = &options.idempotency_key
                && !keyed.insert((channel.clone(), key.clone()))
            {
                deferred.push(Job::Publish {
                    channel,
                    event,
                    data,
                    options,
                    reply,
                });
                continue;
            }
            enum Step {
                Replayed(Published),
                Staged(Arc<Mutex<History>>, crate::message::Position),
            }
            let looked_up = self.channel(&channel).and_then(|found| {
                self.locked(&channel, found, |arc, h| {
                    if let Some(replayed) = self.replay_of(&channel, &options, &event, &data, now) {
                        return Step::Replayed(replayed);
                    }
                    h.pending += 1;
                    h.touch(now);
                    let last = given.entry(channel.clone()).or_insert(h.last_offset());
                    *last += 1;
                    let position = crate::message::Position {
                        epoch: h.epoch().clone(),
                        offset: *last,
                    };
                    Step::Staged(arc.clone(), position)
                })
            });
            let (history, position) = match looked_up {
                Ok(Step::Staged(history, position)) => (history, position),
                Ok(Step::Replayed(replayed)) => {
                    let _ = reply.send(Ok(replayed));
                    continue;
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                    continue;
                }
            };
            let message = Arc::new(Message::new(channel, position, event, data, now_ms));
            staged.push((history, message, options, reply));
        }
        // The key rides in the message's own record: durable with it, or not at all.
        let messages: Vec<(Arc<Message>, Option<Keyed>)> = staged
            .iter()
            .map(|(_, m, options, _)| {
                let keyed = options.idempotency_key.as_ref().map(|key| Keyed {
                    key: key.clone(),
                    until_ms: now_ms.saturating_add(
                        u64::try_from(options.idempotency_window.as_millis()).unwrap_or(u64::MAX),
                    ),
                });
                (m.clone(), keyed)
            })
            .collect();
        let written = if messages.is_empty() {
            Ok(Vec::new())
        } else {
            store.append(&messages, sync)
        };
        drop(messages);
        if let Err(e) = &written {
            tracing::error!(error = %e, publishes = staged.len(), "a write to the data dir failed; those publishes were refused");
            if let (StoreError::Broken(_), Some(d)) = (e, &self.durable) {
                d.failed.send_replace(Some(e.to_string()));
            }
        }
        for (i, (history, message, options, reply)) in staged.into_iter().enumerate() {
            let outcome = {
                let mut h = relock(&history);
                h.pending -= 1;
                match &written {
                    Ok(locs) => {
                        h.expire(now);
                        h.append_at(message.clone(), locs.get(i).copied().unwrap_or(0), now);
                        self.remember(&message.channel, &options, &message, now);
                        self.hub.deliver(&message);
                        Ok(Published {
                            message,
                            replayed: false,
                        })
                    }
                    Err(e) => Err(BrokerError::Storage(e.to_string())),
                }
            };
            // The publisher may have gone away (its request was dropped): nothing to tell.
            let _ = reply.send(outcome);
        }
        for (channel, epoch, fresh) in forgotten {
            // The new fresh epoch first: should the forget then be lost, the channel comes
            // back at the next start beside it, which a cursor handles (a `trimmed` gap); the
            // other way round, an old cursor could resume across a lost incarnation unseen.
            if let Some(fresh) = fresh
                && let Err(e) = store.set_fresh(&fresh)
            {
                tracing::warn!(error = %e, "could not record the epoch new channels get");
            }
            if let Err(e) = store.forget(&channel, &epoch) {
                tracing::warn!(error = %e, %channel, "could not record a reclaimed channel");
            }
        }
        for (copied, taken) in compacted {
            self.finish_compaction(store, copied, taken);
        }
        batch.extend(deferred);
    }

    /// Hands the store what the broker holds, so it can rewrite its files without the rest.
    /// The copy runs on a thread of its own while publishes go on (a compaction costs what
    /// is retained, seconds for gigabytes); its outcome comes back through the job queue as
    /// `Job::Compacted`, and `finish_compaction` re-points each history's index.
    fn start_compaction(&self, store: &mut dyn Store) {
        let Some(d) = &self.durable else {
            return;
        };
        let now = Instant::now();
        let now_ms = now_millis();
        let histories: Vec<Arc<Mutex<History>>> = self
            .shards
            .all()
            .flat_map(|s| relock(s).values().cloned().collect::<Vec<_>>())
            .collect();
        // Per snapshot, in order: whose it is and the offset of its first message. Taken
        // on the writer thread between two batches, so nothing is pending: the snapshot is
        // exactly what the log holds before the store's cut.
        let mut taken: Vec<(Arc<Mutex<History>>, Epoch, u64)> = Vec::new();
        let mut snapshots = Vec::new();
        for arc in &histories {
            let mut h = relock(arc);
            if h.retired {
                continue;
            }
            h.expire(now);
            let locs = h.locs();
            let first = h.last_offset() + 1 - locs.len() as u64;
            taken.push((arc.clone(), h.epoch().clone(), first));
            snapshots.push(Snapshot {
                channel: h.channel().clone(),
                epoch: h.epoch().clone(),
                last_offset: h.last_offset(),
                locs,
            });
        }
        let keys: Vec<KeySnapshot> = self
            .keys
            .all()
            .flat_map(|shard| {
                let shard = relock(shard);
                shard
                    .iter()
                    .flat_map(|(channel, window)| {
                        window.live(now).map(|(key, first, left)| KeySnapshot {
                            channel: channel.clone(),
                            position: first.position.clone(),
                            time: first.time,
                            keyed: Keyed {
                                key: key.clone(),
                                until_ms: now_ms.saturating_add(
                                    u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
                                ),
                            },
                        })
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let job = match store.begin_compaction(snapshots, keys) {
            Ok(job) => job,
            Err(e) => {
                tracing::warn!(error = %e, "compacting the data dir failed; it keeps its files");
                return;
            }
        };
        let jobs = d.jobs.clone();
        let spawned = std::thread::Builder::new()
            .name("tidings-compact".into())
            .spawn(move || {
                let copied = job();
                // The writer takes it with the next batch. Should the broker be gone, so is
                // the writer: the copy stays a complete segment the next open replays.
                let _ = jobs.blocking_send(Job::Compacted { copied, taken });
            });
        if let Err(e) = spawned {
            let refused = store.finish_compaction(Err(StoreError::Write(format!(
                "starting the compaction thread: {e}"
            ))));
            if let Err(e) = refused {
                tracing::warn!(error = %e, "compacting the data dir failed; it keeps its files");
            }
        }
    }

    /// Installs a compaction's copy, then points each history's index at where its messages
    /// lie now (messages published during the copy are past what it covered and stay put).
    fn finish_compaction(
        &self,
        store: &mut dyn Store,
        copied: Result<Copied, StoreError>,
        taken: Vec<(Arc<Mutex<History>>, Epoch, u64)>,
    ) {
        match store.finish_compaction(copied) {
            Ok(moved) => {
                for ((arc, epoch, first), locs) in taken.iter().zip(moved) {
                    let mut h = relock(arc);
                    if !h.retired && h.epoch() == epoch {
                        h.relocate(*first, &locs);
                    }
                }
                tracing::info!(bytes = store.bytes_on_disk(), "data dir compacted")
            }
            Err(e) => {
                tracing::warn!(error = %e, "compacting the data dir failed; it keeps its files")
            }
        }
    }
}

/// A read of a channel the broker does not hold: nothing retained, top `(fresh, 0)`.
fn absent(channel: &ChannelName, fresh: Epoch, since: &Since) -> HistoryRead {
    let top = crate::message::Position {
        epoch: fresh,
        offset: 0,
    };
    let replay = match since {
        Since::After(pos) if pos != &top => Replay::Gap {
            gap: Gap {
                channel: channel.as_str().to_owned(),
                epoch: top.epoch.clone(),
                next_offset: 1,
                reason: GapReason::EpochChanged,
            },
            messages: Vec::new(),
        },
        _ => Replay::Complete(Vec::new()),
    };
    HistoryRead { top, replay }
}

fn spawn_sweeper(broker: &Arc<MemoryBroker>) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(sweep_loop(Arc::downgrade(broker)));
    }
}

/// The writer thread: blocking file I/O off the async runtime, one batch at a time.
fn run_writer(
    broker: Weak<MemoryBroker>,
    mut store: Box<dyn Store>,
    mut queue: mpsc::Receiver<Job>,
    fsync: Fsync,
    bytes_on_disk: Arc<AtomicU64>,
) {
    // What `commit` leaves in `batch` (publishes deferred behind one with the same key) is
    // committed next, before waiting for more.
    let mut batch = Vec::new();
    loop {
        if batch.is_empty() {
            match queue.blocking_recv() {
                Some(job) => batch.push(job),
                None => return,
            }
        }
        if fsync != Fsync::Always {
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        }
        let Some(broker) = broker.upgrade() else {
            return;
        };
        broker.commit(&mut *store, &mut batch, fsync != Fsync::Never);
        if store.wants_compaction() {
            broker.start_compaction(&mut *store);
        }
        bytes_on_disk.store(store.bytes_on_disk(), Ordering::Relaxed);
    }
}

async fn sweep_loop(broker: Weak<MemoryBroker>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY / crate::shards::SHARDS as u32);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match broker.upgrade() {
            Some(b) => b.sweep_step(),
            None => return,
        }
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn publish_with(
        &self,
        channel: &ChannelName,
        event: Option<EventName>,
        data: Data,
        options: &PublishOptions,
    ) -> Result<Published, BrokerError> {
        if let Some(d) = &self.durable {
            let (reply, answer) = oneshot::channel();
            let job = Job::Publish {
                channel: channel.clone(),
                event,
                data,
                options: options.clone(),
                reply,
            };
            let stopped = || {
                BrokerError::Storage(
                    d.failed
                        .borrow()
                        .clone()
                        .unwrap_or_else(|| "the data dir's writer stopped".into()),
                )
            };
            d.jobs.send(job).await.map_err(|_| stopped())?;
            return answer.await.map_err(|_| stopped())?;
        }
        self.publish_at_once(channel, event, data, options)
    }

    fn publishes_at_once(&self) -> bool {
        self.durable.is_none()
    }

    fn publish_at_once(
        &self,
        channel: &ChannelName,
        event: Option<EventName>,
        data: Data,
        options: &PublishOptions,
    ) -> Result<Published, BrokerError> {
        if self.durable.is_some() {
            return Err(BrokerError::Unsupported(
                "publishing without waiting to a data dir",
            ));
        }
        let found = self.channel(channel)?;
        self.locked(channel, found, |_, h| {
            let now = Instant::now();
            // Idempotency hook: checked and recorded under the channel's lock, so two
            // publishes with one key store one message.
            if let Some(replayed) = self.replay_of(channel, options, &event, &data, now) {
                return replayed;
            }
            h.expire(now);
            h.touch(now);
            let message = Arc::new(Message::new(
                channel.clone(),
                h.next_position(),
                event,
                data,
                now_millis(),
            ));
            h.append(message.clone(), now);
            self.remember(channel, options, &message, now);
            self.hub.deliver(&message);
            Published {
                message,
                replayed: false,
            }
        })
    }

    async fn read(
        &self,
        channel: &ChannelName,
        since: &Since,
        limit: Option<usize>,
    ) -> Result<HistoryRead, BrokerError> {
        self.read_through(channel, since, limit).await
    }

    fn read_at_once(
        &self,
        channel: &ChannelName,
        since: &Since,
        limit: Option<usize>,
    ) -> Option<Result<HistoryRead, BrokerError>> {
        self.durable
            .is_none()
            .then(|| Ok(self.read_existing(channel, since, limit).read))
    }

    fn tracks_subscriptions(&self) -> bool {
        false
    }

    async fn subscribe(&self, _channel: &ChannelName) -> Result<(), BrokerError> {
        // One process: every publish already goes through this node's hub.
        Ok(())
    }

    async fn unsubscribe(&self, _channel: &ChannelName) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn stats(&self, channel: &ChannelName) -> Result<Option<ChannelStats>, BrokerError> {
        let history = relock(self.shards.of(channel)).get(channel).cloned();
        Ok(history.map(|h| {
            let mut h = relock(&h);
            h.expire(Instant::now());
            ChannelStats {
                top: h.top(),
                history_len: h.len(),
            }
        }))
    }

    async fn channels(&self) -> Result<Vec<ChannelName>, BrokerError> {
        Ok(self
            .shards
            .all()
            .flat_map(|s| relock(s).keys().cloned().collect::<Vec<_>>())
            .collect())
    }

    async fn ready(&self) -> Result<(), BrokerError> {
        match self
            .durable
            .as_ref()
            .and_then(|d| d.failed.borrow().clone())
        {
            Some(why) => Err(BrokerError::Storage(why)),
            None => Ok(()),
        }
    }

    async fn channel_sample(&self, max: usize) -> Result<(usize, Vec<ChannelName>), BrokerError> {
        let mut names = Vec::new();
        for shard in self.shards.all() {
            if names.len() >= max {
                break;
            }
            let shard = relock(shard);
            names.extend(shard.keys().take(max - names.len()).cloned());
        }
        Ok((self.channel_count(), names))
    }

    fn bytes_on_disk(&self) -> Option<u64> {
        self.durable
            .as_ref()
            .map(|d| d.bytes_on_disk.load(Ordering::Relaxed))
    }

    async fn presence_join(
        &self,
        channel: &ChannelName,
        info: &ClientInfo,
        announce: bool,
    ) -> Result<(), BrokerError> {
        relock(&self.presence)
            .entry(channel.clone())
            .or_default()
            .insert(info.client.clone(), info.user.clone());
        if announce {
            self.announce(PresenceKind::Join, channel, info);
        }
        Ok(())
    }

    async fn presence_leave(
        &self,
        channel: &ChannelName,
        info: &ClientInfo,
        announce: bool,
    ) -> Result<(), BrokerError> {
        let removed = {
            let mut all = relock(&self.presence);
            let removed = all
                .get_mut(channel)
                .and_then(|clients| clients.remove(&info.client));
            if all.get(channel).is_some_and(BTreeMap::is_empty) {
                all.remove(channel);
            }
            removed.is_some()
        };
        if announce && removed {
            self.announce(PresenceKind::Leave, channel, info);
        }
        Ok(())
    }

    async fn presence(&self, channel: &ChannelName) -> Result<Vec<ClientInfo>, BrokerError> {
        self.presence_page(channel, None, usize::MAX)
            .await
            .map(|(clients, _)| clients)
    }

    async fn presence_page(
        &self,
        channel: &ChannelName,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<ClientInfo>, bool), BrokerError> {
        use std::ops::Bound;
        let all = relock(&self.presence);
        let Some(clients) = all.get(channel) else {
            return Ok((Vec::new(), false));
        };
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut page = clients.range::<str, _>((from, Bound::Unbounded));
        let taken: Vec<ClientInfo> = page
            .by_ref()
            .take(limit)
            .map(|(client, user)| ClientInfo {
                client: client.clone(),
                user: user.clone(),
            })
            .collect();
        Ok((taken, page.next().is_some()))
    }
}

impl MemoryBroker {
    fn announce(&self, kind: PresenceKind, channel: &ChannelName, info: &ClientInfo) {
        self.hub.deliver_presence(&Arc::new(PresenceEvent {
            kind,
            channel: channel.clone(),
            info: info.clone(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Since;

    fn broker(ttl: Duration) -> Arc<MemoryBroker> {
        let policies = crate::policy::Policies {
            default: crate::policy::ChannelPolicy {
                history_ttl: ttl,
                ..Default::default()
            },
            namespaces: Default::default(),
        };
        MemoryBroker::new(Arc::new(Hub::new()), LivePolicies::new(policies))
    }

    fn text() -> Data {
        Data::Text(bytes::Bytes::from_static(b"x"))
    }

    #[tokio::test(start_paused = true)]
    async fn reading_a_channel_the_broker_does_not_hold_creates_nothing_and_resumes_without_a_gap()
    {
        let b = broker(Duration::from_secs(60));
        let c = ChannelName::new("absent").unwrap();
        let first = b.read(&c, &Since::Now, None).await.unwrap().top;
        assert_eq!(first.offset, 0);
        for since in [Since::Now, Since::Last(5), Since::After(first.clone())] {
            let r = b.read(&c, &since, None).await.unwrap();
            assert!(r.replay.gap().is_none(), "{since:?}");
            assert_eq!(r.top, first, "the same position every time");
        }
        assert!(
            b.channels().await.unwrap().is_empty(),
            "nothing was created"
        );
        assert_eq!(b.channel_count(), 0);
        // Created by a publish: the cursor read while it was absent resumes with no gap.
        let m = b.publish(&c, None, text()).await.unwrap();
        assert_eq!(m.position().epoch, first.epoch);
        let r = b
            .read(&c, &Since::After(first.clone()), None)
            .await
            .unwrap();
        assert!(r.replay.gap().is_none());
        assert_eq!(r.replay.messages().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cursor_from_before_a_whole_incarnation_came_and_went_gets_a_gap() {
        let b = broker(Duration::from_secs(60));
        let c = ChannelName::new("comes-and-goes").unwrap();
        let seen = b.read(&c, &Since::Now, None).await.unwrap().top;
        b.publish(&c, None, text()).await.unwrap();
        // Its message expires and the channel is reclaimed, then it comes back.
        tokio::time::advance(Duration::from_secs(121)).await;
        b.sweep();
        assert_eq!(b.channel_count(), 0);
        b.publish(&c, None, text()).await.unwrap();
        let r = b.read(&c, &Since::After(seen), None).await.unwrap();
        assert_eq!(
            r.replay.gap().map(|g| g.reason),
            Some(GapReason::EpochChanged),
            "the first incarnation's message was missed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_used_channel_keeps_its_epoch_until_unused_for_a_whole_ttl() {
        let b = broker(Duration::from_secs(60));
        let c = ChannelName::new("idle").unwrap();
        let e1 = b.publish(&c, None, text()).await.unwrap().epoch.clone();
        tokio::time::advance(Duration::from_secs(30)).await;
        b.sweep();
        let e2 = b.read(&c, &Since::Now, None).await.unwrap().top.epoch;
        assert_eq!(e1, e2, "reclaimed while still in use");
        tokio::time::advance(Duration::from_secs(61)).await;
        b.sweep();
        // Its message expired at 60 s, the read at 30 s kept it in use until 90 s.
        assert!(b.channels().await.unwrap().is_empty());
        let e3 = b.publish(&c, None, text()).await.unwrap().epoch.clone();
        assert_ne!(
            e1, e3,
            "a reclaimed channel comes back as a new incarnation"
        );
    }

    #[tokio::test]
    async fn publishes_that_would_pass_max_channels_are_refused_and_existing_ones_still_work() {
        let b = broker(Duration::from_secs(60));
        b.set_max_channels(2);
        let (a, c, d) = (
            ChannelName::new("a").unwrap(),
            ChannelName::new("c").unwrap(),
            ChannelName::new("d").unwrap(),
        );
        b.publish(&a, None, text()).await.unwrap();
        b.publish(&c, None, text()).await.unwrap();
        assert_eq!(
            b.publish(&d, None, text()).await.unwrap_err(),
            BrokerError::TooManyChannels(2)
        );
        assert_eq!(b.publish(&a, None, text()).await.unwrap().offset, 2);
        // Reads of other channels are still answered, and create nothing.
        assert!(b.read(&d, &Since::Now, None).await.is_ok());
        assert_eq!(b.channel_count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_publisher_that_looked_up_a_channel_the_sweeper_then_reclaimed_writes_into_the_live_one()
     {
        let b = broker(Duration::from_secs(60));
        let c = ChannelName::new("swept").unwrap();
        let old_epoch = b.publish(&c, None, text()).await.unwrap().epoch.clone();
        // A publisher looks the channel up (what `publish` does first) ...
        let found = b.channel(&c).unwrap();
        // ... and before it takes the lock, the channel turns idle and the sweeper removes it.
        tokio::time::advance(Duration::from_secs(61)).await;
        b.sweep();
        assert!(b.channels().await.unwrap().is_empty());
        let message = b
            .locked(&c, found, |_, h| {
                let m = Arc::new(Message::new(
                    c.clone(),
                    h.next_position(),
                    None,
                    text(),
                    now_millis(),
                ));
                h.append(m.clone(), Instant::now());
                m
            })
            .unwrap();
        assert_ne!(message.epoch, old_epoch, "written into a fresh incarnation");
        // The acknowledged message is in the history every reader reaches.
        let read = b.read(&c, &Since::Last(10), None).await.unwrap();
        assert_eq!(read.top, message.position());
        assert_eq!(read.replay.messages().len(), 1);
    }

    /// A store whose writes fail the way `kind` says: a panic in the writer thread, or a
    /// write that could not be undone (the store is broken until a restart).
    struct Failing {
        panic: bool,
    }

    impl StoreReader for Failing {
        fn read(&self, _: &[crate::store::Loc]) -> Result<Vec<Message>, ReadError> {
            Err(ReadError::Failed("nothing stored".into()))
        }
    }

    impl Store for Failing {
        fn append(
            &mut self,
            _: &[(Arc<Message>, Option<Keyed>)],
            _: bool,
        ) -> Result<Vec<crate::store::Loc>, StoreError> {
            if self.panic {
                panic!("a bug in the store");
            }
            Err(StoreError::Broken("the disk went away".into()))
        }
        fn set_fresh(&mut self, _: &Epoch) -> Result<(), StoreError> {
            Ok(())
        }
        fn reader(&self) -> Arc<dyn StoreReader> {
            Arc::new(Failing { panic: self.panic })
        }
        fn forget(&mut self, _: &ChannelName, _: &Epoch) -> Result<(), StoreError> {
            Ok(())
        }
        fn begin_compaction(
            &mut self,
            _: Vec<Snapshot>,
            _: Vec<KeySnapshot>,
        ) -> Result<crate::store::CompactionJob, StoreError> {
            Err(StoreError::Write("not here".into()))
        }
        fn finish_compaction(
            &mut self,
            _: Result<Copied, StoreError>,
        ) -> Result<Vec<Vec<crate::store::Loc>>, StoreError> {
            Err(StoreError::Write("not here".into()))
        }
        fn bytes_on_disk(&self) -> u64 {
            0
        }
    }

    async fn durable_over(store: Failing) -> Arc<MemoryBroker> {
        let policies = LivePolicies::new(crate::policy::Policies::default());
        MemoryBroker::durable(
            Arc::new(Hub::new()),
            policies.clone(),
            Restore::new(policies),
            Box::new(store),
            Fsync::Batch,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_writer_thread_that_panics_fails_publishes_and_readiness_instead_of_hanging() {
        let b = durable_over(Failing { panic: true }).await;
        assert!(b.ready().await.is_ok(), "ready before anything went wrong");
        let c = ChannelName::new("doomed").unwrap();
        let first = tokio::time::timeout(Duration::from_secs(10), b.publish(&c, None, text()))
            .await
            .expect("the publish is answered, not left waiting");
        assert!(matches!(first, Err(BrokerError::Storage(_))), "{first:?}");
        // The panic is recorded as the thread unwinds, just after the reply dropped: await it.
        let mut failed = b.durable.as_ref().unwrap().failed.subscribe();
        tokio::time::timeout(Duration::from_secs(10), failed.wait_for(Option::is_some))
            .await
            .expect("the panic is recorded")
            .unwrap();
        let why = b.ready().await.unwrap_err().to_string();
        assert!(why.contains("panicked: a bug in the store"), "{why}");
        let later = b.publish(&c, None, text()).await;
        assert!(
            matches!(&later, Err(BrokerError::Storage(m)) if m.contains("panicked")),
            "{later:?}"
        );
    }

    #[tokio::test]
    async fn a_broken_store_makes_the_broker_unready_with_its_reason() {
        let b = durable_over(Failing { panic: false }).await;
        let c = ChannelName::new("broken").unwrap();
        let r = b.publish(&c, None, text()).await;
        assert!(matches!(r, Err(BrokerError::Storage(_))), "{r:?}");
        let why = b.ready().await.unwrap_err().to_string();
        assert!(why.contains("the disk went away"), "{why}");
    }
}
