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
//!
//! A channel with no subscribers, no retained history and no use for a whole `history_ttl` is
//! reclaimed by a sweeper task; when it comes back it gets a new epoch, so an old cursor
//! reports `epoch_changed`. The sweeper marks what it removes `retired` under the channel's
//! lock; whoever looked the channel up before and finds it retired looks it up again
//! (`locked`), so nothing is ever written into a history the map no longer holds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::broker::{Broker, BrokerError, ChannelStats};
use crate::channel::{ChannelName, EventName};
use crate::history::{History, HistoryRead, Since};
use crate::hub::Hub;
use crate::message::{Data, Epoch, Message};
use crate::policy::Policies;
use crate::presence::{ClientInfo, PresenceEvent, PresenceKind};
use crate::shards::Shards;
use crate::store::{Fsync, Recovered, Snapshot, Store, age};

const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Publishes waiting for the writer thread; a full queue makes publishers wait (backpressure).
const JOB_QUEUE: usize = 4096;
/// At most this many publishes share one write and one fsync.
const MAX_BATCH: usize = 1024;

pub struct MemoryBroker {
    hub: Arc<Hub>,
    policies: Arc<Policies>,
    shards: Shards<Arc<Mutex<History>>>,
    /// Who is present where. One lock: joins and leaves are per connection, not per message.
    presence: Mutex<HashMap<ChannelName, Vec<ClientInfo>>>,
    durable: Option<Durable>,
}

/// The write-through side, with a data dir.
struct Durable {
    jobs: mpsc::Sender<Job>,
    bytes_on_disk: Arc<AtomicU64>,
}

type Reply = oneshot::Sender<Result<Arc<Message>, BrokerError>>;

enum Job {
    Publish {
        channel: ChannelName,
        event: Option<EventName>,
        data: Data,
        reply: Reply,
    },
    Forget {
        channel: ChannelName,
        epoch: Epoch,
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
pub struct Restore {
    policies: Arc<Policies>,
    channels: HashMap<ChannelName, History>,
    now: Instant,
    now_ms: u64,
}

impl Restore {
    pub fn new(policies: Arc<Policies>) -> Self {
        Self {
            policies,
            channels: HashMap::new(),
            now: Instant::now(),
            now_ms: now_millis(),
        }
    }

    /// The channel in `epoch`: a record of another epoch starts a new incarnation.
    fn incarnation(&mut self, channel: &ChannelName, epoch: &Epoch) -> &mut History {
        let policy = self.policies.for_channel(channel);
        let h = self.channels.entry(channel.clone()).or_insert_with(|| {
            History::new(
                channel.clone(),
                epoch.clone(),
                policy.history_size,
                policy.history_ttl,
            )
        });
        if h.epoch() != epoch {
            *h = History::new(
                channel.clone(),
                epoch.clone(),
                policy.history_size,
                policy.history_ttl,
            );
        }
        h
    }

    pub fn apply(&mut self, record: Recovered) {
        match record {
            Recovered::Message(m) => {
                let at = self
                    .now
                    .checked_sub(age(m.time, self.now_ms))
                    .unwrap_or(self.now);
                let (channel, epoch) = (m.channel.clone(), m.epoch.clone());
                self.incarnation(&channel, &epoch).restore(Arc::new(m), at);
            }
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
    pub fn new(hub: Arc<Hub>, policies: Arc<Policies>) -> Arc<Self> {
        let broker = Arc::new(Self {
            hub,
            policies,
            shards: Shards::new(),
            presence: Mutex::new(HashMap::new()),
            durable: None,
        });
        spawn_sweeper(&broker);
        broker
    }

    /// A broker that writes through `store`, starting from what it held (`restore`). Starts
    /// the writer thread, which ends when the broker is dropped.
    pub fn durable(
        hub: Arc<Hub>,
        policies: Arc<Policies>,
        restore: Restore,
        store: Box<dyn Store>,
        fsync: Fsync,
    ) -> std::io::Result<Arc<Self>> {
        let (jobs, queue) = mpsc::channel(JOB_QUEUE);
        let bytes_on_disk = Arc::new(AtomicU64::new(store.bytes_on_disk()));
        let shards = Shards::new();
        let now = Instant::now();
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
            durable: Some(Durable {
                jobs,
                bytes_on_disk: bytes_on_disk.clone(),
            }),
        });
        let weak = Arc::downgrade(&broker);
        std::thread::Builder::new()
            .name("tidings-store".into())
            .spawn(move || run_writer(weak, store, queue, fsync, bytes_on_disk))?;
        spawn_sweeper(&broker);
        Ok(broker)
    }

    /// The channel's history, created (with a fresh epoch) if the broker holds none.
    fn channel(&self, channel: &ChannelName) -> Arc<Mutex<History>> {
        let mut shard = relock(self.shards.of(channel));
        shard
            .entry(channel.clone())
            .or_insert_with(|| {
                let policy = self.policies.for_channel(channel);
                Arc::new(Mutex::new(History::new(
                    channel.clone(),
                    Epoch::random(),
                    policy.history_size,
                    policy.history_ttl,
                )))
            })
            .clone()
    }

    /// Runs `f` under the lock of the channel's live history. `found` is a history looked up
    /// earlier: if the sweeper retired it meanwhile, the channel is looked up again.
    fn locked<R>(
        &self,
        channel: &ChannelName,
        mut found: Arc<Mutex<History>>,
        f: impl FnOnce(&Arc<Mutex<History>>, &mut History) -> R,
    ) -> R {
        loop {
            let mut h = relock(&found);
            if !h.retired {
                return f(&found, &mut h);
            }
            drop(h);
            found = self.channel(channel);
        }
    }

    /// Expires history everywhere and reclaims channels nobody follows and nothing is kept for.
    pub fn sweep(&self) {
        let now = Instant::now();
        for shard in self.shards.all() {
            let mut shard = relock(shard);
            shard.retain(|name, history| {
                let mut h = relock(history);
                h.expire(now);
                // The hub check happens under the shard lock: a subscriber that registers
                // after it and then reads will create a fresh channel, which is consistent.
                if !h.reclaimable(now) || self.hub.subscriber_count(name) > 0 {
                    return true;
                }
                if let Some(d) = &self.durable {
                    let forget = Job::Forget {
                        channel: name.clone(),
                        epoch: h.epoch().clone(),
                    };
                    if d.jobs.try_send(forget).is_err() {
                        // The writer is busy: reclaim at a later sweep rather than let the
                        // channel come back from the data dir after a restart.
                        return true;
                    }
                }
                h.retired = true;
                false
            });
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
        for job in batch.drain(..) {
            let (channel, event, data, reply) = match job {
                Job::Publish {
                    channel,
                    event,
                    data,
                    reply,
                } => (channel, event, data, reply),
                Job::Forget { channel, epoch } => {
                    forgotten.push((channel, epoch));
                    continue;
                }
            };
            let found = self.channel(&channel);
            let (history, position) = self.locked(&channel, found, |arc, h| {
                h.pending += 1;
                h.touch(now);
                let last = given.entry(channel.clone()).or_insert(h.last_offset());
                *last += 1;
                let position = crate::message::Position {
                    epoch: h.epoch().clone(),
                    offset: *last,
                };
                (arc.clone(), position)
            });
            let message = Arc::new(Message::new(channel, position, event, data, now_ms));
            staged.push((history, message, reply));
        }
        let messages: Vec<Arc<Message>> = staged.iter().map(|(_, m, _)| m.clone()).collect();
        let written = if messages.is_empty() {
            Ok(())
        } else {
            store.append(&messages, sync)
        };
        if let Err(e) = &written {
            tracing::error!(error = %e, publishes = messages.len(), "a write to the data dir failed; those publishes were refused");
        }
        for (history, message, reply) in staged {
            let outcome = {
                let mut h = relock(&history);
                h.pending -= 1;
                match &written {
                    Ok(()) => {
                        h.expire(now);
                        h.append(message.clone(), now);
                        self.hub.deliver(&message);
                        Ok(message)
                    }
                    Err(e) => Err(BrokerError::Storage(e.to_string())),
                }
            };
            // The publisher may have gone away (its request was dropped): nothing to tell.
            let _ = reply.send(outcome);
        }
        for (channel, epoch) in forgotten {
            if let Err(e) = store.forget(&channel, &epoch) {
                tracing::warn!(error = %e, %channel, "could not record a reclaimed channel");
            }
        }
    }

    /// Hands the store what the broker holds, so it can rewrite its files without the rest.
    fn compact(&self, store: &mut dyn Store) {
        let now = Instant::now();
        let histories: Vec<Arc<Mutex<History>>> = self
            .shards
            .all()
            .flat_map(|s| relock(s).values().cloned().collect::<Vec<_>>())
            .collect();
        let mut snapshots = histories.iter().filter_map(|arc| {
            let mut h = relock(arc);
            if h.retired {
                return None;
            }
            h.expire(now);
            Some(Snapshot {
                channel: h.channel().clone(),
                epoch: h.epoch().clone(),
                last_offset: h.last_offset(),
                messages: h.messages().cloned().collect(),
            })
        });
        match store.compact(&mut snapshots) {
            Ok(()) => tracing::info!(bytes = store.bytes_on_disk(), "data dir compacted"),
            Err(e) => {
                tracing::warn!(error = %e, "compacting the data dir failed; it keeps its files")
            }
        }
    }
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
    let mut batch = Vec::new();
    while let Some(job) = queue.blocking_recv() {
        batch.push(job);
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
            broker.compact(&mut *store);
        }
        bytes_on_disk.store(store.bytes_on_disk(), Ordering::Relaxed);
    }
}

async fn sweep_loop(broker: Weak<MemoryBroker>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match broker.upgrade() {
            Some(b) => b.sweep(),
            None => return,
        }
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn publish(
        &self,
        channel: &ChannelName,
        event: Option<EventName>,
        data: Data,
    ) -> Result<Arc<Message>, BrokerError> {
        if let Some(d) = &self.durable {
            let (reply, answer) = oneshot::channel();
            let job = Job::Publish {
                channel: channel.clone(),
                event,
                data,
                reply,
            };
            let stopped = || BrokerError::Storage("the data dir's writer stopped".into());
            d.jobs.send(job).await.map_err(|_| stopped())?;
            return answer.await.map_err(|_| stopped())?;
        }
        let found = self.channel(channel);
        Ok(self.locked(channel, found, |_, h| {
            let now = Instant::now();
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
            self.hub.deliver(&message);
            message
        }))
    }

    async fn read(
        &self,
        channel: &ChannelName,
        since: &Since,
        limit: Option<usize>,
    ) -> Result<HistoryRead, BrokerError> {
        let found = self.channel(channel);
        Ok(self.locked(channel, found, |_, h| {
            let now = Instant::now();
            h.expire(now);
            h.touch(now);
            h.read(since, limit)
        }))
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
        Ok(())
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
            .push(info.clone());
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
            let removed = all.get_mut(channel).and_then(|list| {
                let i = list.iter().position(|c| c.client == info.client)?;
                Some(list.swap_remove(i))
            });
            if all.get(channel).is_some_and(Vec::is_empty) {
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
        Ok(relock(&self.presence)
            .get(channel)
            .cloned()
            .unwrap_or_default())
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
        let policies = Policies {
            default: crate::policy::ChannelPolicy {
                history_ttl: ttl,
                ..Default::default()
            },
            namespaces: Default::default(),
        };
        MemoryBroker::new(Arc::new(Hub::new()), Arc::new(policies))
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_channel_keeps_its_epoch_until_unused_for_a_whole_ttl() {
        let b = broker(Duration::from_secs(60));
        let c = ChannelName::new("idle").unwrap();
        let e1 = b.read(&c, &Since::Now, None).await.unwrap().top.epoch;
        tokio::time::advance(Duration::from_secs(30)).await;
        b.sweep();
        let e2 = b.read(&c, &Since::Now, None).await.unwrap().top.epoch;
        assert_eq!(e1, e2, "reclaimed while still in use");
        tokio::time::advance(Duration::from_secs(61)).await;
        b.sweep();
        assert!(b.channels().await.unwrap().is_empty());
        let e3 = b.read(&c, &Since::Now, None).await.unwrap().top.epoch;
        assert_ne!(
            e1, e3,
            "a reclaimed channel comes back as a new incarnation"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_publisher_that_looked_up_a_channel_the_sweeper_then_reclaimed_writes_into_the_live_one()
     {
        let b = broker(Duration::from_secs(60));
        let c = ChannelName::new("swept").unwrap();
        let old_epoch = b.read(&c, &Since::Now, None).await.unwrap().top.epoch;
        // A publisher looks the channel up (what `publish` does first) ...
        let found = b.channel(&c);
        // ... and before it takes the lock, the channel turns idle and the sweeper removes it.
        tokio::time::advance(Duration::from_secs(61)).await;
        b.sweep();
        assert!(b.channels().await.unwrap().is_empty());
        let message = b.locked(&c, found, |_, h| {
            let m = Arc::new(Message::new(
                c.clone(),
                h.next_position(),
                None,
                Data::Text(bytes::Bytes::from_static(b"x")),
                now_millis(),
            ));
            h.append(m.clone(), Instant::now());
            m
        });
        assert_ne!(message.epoch, old_epoch, "written into a fresh incarnation");
        // The acknowledged message is in the history every reader reaches.
        let read = b.read(&c, &Since::Last(10), None).await.unwrap();
        assert_eq!(read.top, message.position());
        assert_eq!(read.replay.messages().len(), 1);
    }
}
