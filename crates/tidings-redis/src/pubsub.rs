//! The node's pub/sub side: one connection per node, one reader, one supervisor, and the
//! per-channel subscriptions reconciled against the hub.
//!
//! # Concurrency rules
//! - redis-rs calls the push callback (`Inbox::push`) on its connection task, in the order the
//!   server sent the pushes, and it must never block. It only enqueues into the inbox, which is
//!   bounded twice (pushes and bytes). When full, the push is dropped and the drop recorded;
//!   the reader then ends every local session (`BrokerUnavailable`) *before* it delivers
//!   anything that followed, so nobody is left with a silent hole: clients resume from their
//!   cursors, and history has what they missed.
//! - Exactly one reader task (`run_reader`) drains the inbox into `Hub::deliver` and
//!   `Hub::deliver_presence`. Redis sends a channel's messages in publish (= offset) order on
//!   one connection, and a single reader keeps that order.
//! - Exactly one supervisor task (`run_supervisor`) owns the connection's life: connect,
//!   resubscribe every channel with local subscribers, health-check, and on loss (a
//!   `Disconnection` push or a failed PING) drop it, end every local session, reconnect with
//!   backoff. Each connection has a generation; pushes carry theirs and the reader ignores
//!   those of a connection that is no longer current.
//! - SUBSCRIBE/UNSUBSCRIBE of one channel are serialized by that channel's async mutex in
//!   `subs`, and each call reconciles Redis with `Hub::subscriber_count` rather than trusting
//!   call order: a leave racing a join ends subscribed exactly when the hub has a subscriber.
//! - `link` and `subs` are std mutexes held for a clone or a map update, never across an
//!   `.await`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::{PushInfo, PushKind, Value};
use tidings_core::presence::PresenceEvent;
use tidings_core::{
    BrokerError, ChannelName, DisconnectReason, Epoch, HistoryRead, Message, Position, Since,
};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::broker::{Shared, relock};
use crate::codec::{Push, decode_push};
use crate::connection::{PubSubConn, RESPONSE_TIMEOUT};
use crate::keys::Keys;

/// Pushes the inbox holds before it starts dropping (and ending sessions).
const INBOX_PUSHES: usize = 65_536;
/// Bytes of payload the inbox holds before it starts dropping.
const INBOX_BYTES: usize = 64 << 20;
/// How often an idle connection is PINGed: a peer that vanished without closing the socket
/// is noticed within this plus `RESPONSE_TIMEOUT`.
const HEALTH_EVERY: Duration = Duration::from_secs(5);
/// The health interval behind Sentinel (see `health_every`).
const SENTINEL_CHECK_EVERY: Duration = Duration::from_secs(1);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Resubscriptions in flight at once after a reconnect.
const RESUBSCRIBE_CONCURRENCY: usize = 32;
/// Pub/sub names the reader remembers the channel (and last position) of.
const NAME_CACHE: usize = 10_000;
/// Live messages held per channel while its subscription is being restored.
const RECOVERY_HOLD: usize = 100_000;
/// Recovery reports waiting for the reader.
const RECOVERY_QUEUE: usize = 1024;

pub struct Pushed {
    generation: u64,
    info: PushInfo,
    weight: usize,
}

/// Where the connection's push callback puts what Redis sends.
pub struct Inbox {
    tx: mpsc::Sender<Pushed>,
    bytes: AtomicUsize,
    /// Set when a push had to be dropped; the reader ends every session before going on.
    dropped: AtomicBool,
    /// The generation whose connection reported `Disconnection`, for the supervisor.
    disconnected: AtomicU64,
    wake_supervisor: Notify,
}

impl Inbox {
    pub fn new() -> (Arc<Self>, mpsc::Receiver<Pushed>) {
        let (tx, rx) = mpsc::channel(INBOX_PUSHES);
        let inbox = Arc::new(Self {
            tx,
            bytes: AtomicUsize::new(0),
            dropped: AtomicBool::new(false),
            disconnected: AtomicU64::new(0),
            wake_supervisor: Notify::new(),
        });
        (inbox, rx)
    }

    /// The push callback: never blocks, never fails.
    fn push(&self, generation: u64, info: PushInfo) {
        if info.kind == PushKind::Disconnection {
            self.disconnected.store(generation, Release);
            self.wake_supervisor.notify_one();
            return;
        }
        if !matches!(
            info.kind,
            PushKind::Message | PushKind::SMessage | PushKind::Unsubscribe | PushKind::SUnsubscribe
        ) {
            // Subscribe confirmations and the like: the subscribe call already has its answer.
            // Unsubscribes are kept: on a cluster the server sends one by itself when the
            // channel's slot moves to another master (see `Reader::unsubscribed`).
            return;
        }
        let weight = 64 + info.data.iter().map(value_len).sum::<usize>();
        if self.bytes.fetch_add(weight, AcqRel) + weight > INBOX_BYTES {
            self.bytes.fetch_sub(weight, AcqRel);
            self.dropped.store(true, Release);
            return;
        }
        let pushed = Pushed {
            generation,
            info,
            weight,
        };
        if self.tx.try_send(pushed).is_err() {
            self.bytes.fetch_sub(weight, AcqRel);
            self.dropped.store(true, Release);
        }
    }
}

fn value_len(v: &Value) -> usize {
    match v {
        Value::BulkString(b) => b.len(),
        _ => 16,
    }
}

/// The current pub/sub connection, if any, and its generation.
#[derive(Default)]
pub struct Link {
    generation: u64,
    conn: Option<PubSubConn>,
}

impl Shared {
    fn link(&self) -> (u64, Option<PubSubConn>) {
        let link = relock(&self.link);
        (link.generation, link.conn.clone())
    }

    /// Whether the node can receive messages now.
    pub fn connected(&self) -> bool {
        relock(&self.link).conn.is_some()
    }

    fn install(&self, generation: u64, conn: PubSubConn) {
        let mut link = relock(&self.link);
        link.generation = generation;
        link.conn = Some(conn);
        self.current_generation.store(generation, Release);
        drop(link);
        self.installed.notify_waiters();
    }

    /// The connection of `generation` is gone: stop using it, then end every local session.
    /// Order matters: a session that registers after this sees no connection and is refused
    /// (503) instead of going live on a connection that misses messages.
    fn lose(&self, generation: u64, why: &str) {
        {
            let mut link = relock(&self.link);
            if link.generation != generation || link.conn.is_none() {
                return;
            }
            link.conn = None;
        }
        self.current_generation.store(0, Release);
        tracing::warn!(
            why,
            "lost the Redis pub/sub connection; ending every local session (clients resume from their cursors)"
        );
        self.hub.disconnect_all(DisconnectReason::BrokerUnavailable);
    }

    fn slot(&self, channel: &ChannelName) -> Arc<tokio::sync::Mutex<u64>> {
        relock(&self.subs)
            .entry(channel.clone())
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(0)))
            .clone()
    }

    /// Makes Redis agree with the hub for `channel`: subscribed on the current connection
    /// when the hub has local subscribers, not subscribed otherwise. Returns once Redis has
    /// confirmed, which is what lets a join read history right after (see `read`).
    pub async fn reconcile(&self, channel: &ChannelName) -> Result<(), BrokerError> {
        self.reconcile_with(channel, false).await
    }

    /// `reconcile`, but with `resubscribe` the channel is subscribed again even where this
    /// node believes it already is: Redis dropped the subscription by itself (a slot
    /// migration), and SUBSCRIBE is idempotent.
    pub async fn reconcile_with(
        &self,
        channel: &ChannelName,
        resubscribe: bool,
    ) -> Result<(), BrokerError> {
        let slot = self.slot(channel);
        let result = {
            // The generation this channel is subscribed on (0: not subscribed).
            let mut subscribed = slot.lock().await;
            if resubscribe {
                *subscribed = 0;
            }
            let want = self.hub.subscriber_count(channel) > 0;
            match self.link() {
                (generation, Some(conn)) => {
                    let have = *subscribed == generation;
                    let name = self.keys.pubsub(channel);
                    if want && !have {
                        match tokio::time::timeout(RESPONSE_TIMEOUT, conn.subscribe(&name)).await {
                            Ok(Ok(())) => {
                                *subscribed = generation;
                                Ok(())
                            }
                            Ok(Err(e)) => Err(BrokerError::Unavailable(format!(
                                "subscribing to {channel}: {e}"
                            ))),
                            Err(_) => Err(BrokerError::Unavailable(format!(
                                "subscribing to {channel}: timed out"
                            ))),
                        }
                    } else {
                        if !want && have {
                            *subscribed = 0;
                            // A failed UNSUBSCRIBE only costs unneeded traffic until the
                            // connection is replaced; the hub drops what nobody follows.
                            if let Ok(Err(e)) =
                                tokio::time::timeout(RESPONSE_TIMEOUT, conn.unsubscribe(&name))
                                    .await
                            {
                                tracing::debug!(%channel, error = %e, "unsubscribe failed");
                            }
                        }
                        Ok(())
                    }
                }
                (_, None) => {
                    *subscribed = 0;
                    if want {
                        Err(BrokerError::Unavailable(
                            "Redis pub/sub is not connected".into(),
                        ))
                    } else {
                        Ok(())
                    }
                }
            }
        };
        // Forget the slot when nobody holds it and it stands for no subscription.
        let mut subs = relock(&self.subs);
        if Arc::strong_count(&slot) == 2 && slot.try_lock().is_ok_and(|g| *g == 0) {
            subs.remove(channel);
        }
        result
    }

    /// After a reconnect: every channel the hub follows, plus any slot left from before.
    async fn resubscribe_all(&self) {
        let mut channels = self.hub.channels();
        channels.extend(relock(&self.subs).keys().cloned());
        channels.sort();
        channels.dedup();
        futures_util::stream::iter(channels)
            .for_each_concurrent(RESUBSCRIBE_CONCURRENCY, |c| async move {
                if let Err(e) = self.reconcile(&c).await {
                    tracing::warn!(channel = %c, error = %e, "resubscribe failed");
                }
            })
            .await;
    }
}

/// Keeps the node's pub/sub connection up for as long as the broker lives.
pub async fn run_supervisor(shared: Arc<Shared>, stop: CancellationToken) {
    let mut backoff = RETRY_MIN;
    let mut generation = 0u64;
    let mut failures = 0u32;
    loop {
        generation += 1;
        let inbox = shared.inbox.clone();
        let sender = move |info: PushInfo| -> Result<(), ()> {
            inbox.push(generation, info);
            Ok(())
        };
        let attempt = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(2 * RESPONSE_TIMEOUT, shared.endpoint.pubsub(sender)) => r,
        };
        let conn = match attempt {
            Ok(Ok(conn)) => conn,
            failed => {
                failures += 1;
                // One line per outage, then one every ~30 attempts, not one per retry.
                if failures == 1 || failures.is_multiple_of(30) {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".into(),
                    };
                    tracing::warn!(%error, failures, "cannot reach Redis for pub/sub; retrying");
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                    // Sentinel announced a new primary: try it now rather than after the backoff.
                    _ = sentinel_wake(&shared) => {}
                }
                backoff = (backoff * 2).min(RETRY_MAX);
                continue;
            }
        };
        shared.install(generation, conn.clone());
        shared.resubscribe_all().await;
        if failures > 0 {
            tracing::info!(failures, "Redis pub/sub is back; channels resubscribed");
        }
        failures = 0;
        backoff = RETRY_MIN;
        loop {
            let health_check = tokio::select! {
                _ = stop.cancelled() => return,
                _ = shared.inbox.wake_supervisor.notified() => false,
                _ = sentinel_wake(&shared) => false,
                _ = tokio::time::sleep(health_every(&shared)) => true,
            };
            if shared.inbox.disconnected.load(Acquire) == generation {
                shared.lose(generation, "the connection closed");
                break;
            }
            if let Some(sentinel) = shared.endpoint.sentinel()
                && sentinel.moved(health_check).await
            {
                shared.lose(generation, "Sentinel named another primary");
                break;
            }
            if health_check
                && !matches!(
                    tokio::time::timeout(RESPONSE_TIMEOUT, conn.ping()).await,
                    Ok(Ok(()))
                )
            {
                shared.lose(generation, "PING went unanswered");
                break;
            }
        }
    }
}

/// Resolves when Sentinel announces a new primary; never without Sentinel.
async fn sentinel_wake(shared: &Shared) {
    match shared.endpoint.sentinel() {
        Some(s) => s.wake.notified().await,
        None => std::future::pending().await,
    }
}

/// Behind Sentinel the health check also asks the sentinels where the primary is, so it runs
/// more often: a demoted primary keeps its connections open and would otherwise go unnoticed
/// until a `+switch-master` arrives.
fn health_every(shared: &Shared) -> Duration {
    if shared.endpoint.sentinel().is_some() {
        SENTINEL_CHECK_EVERY
    } else {
        HEALTH_EVERY
    }
}

/// What a recovery task (`recover`) hands back to the reader.
pub struct Recovered {
    channel: ChannelName,
    generation: u64,
    /// What history held after the node's last delivered message, read once the channel was
    /// subscribed again; `None` when it could not be read (or nobody needs it any more).
    read: Option<HistoryRead>,
}

/// The control channel from recovery tasks to the reader.
pub fn recovery_channel() -> (mpsc::Sender<Recovered>, mpsc::Receiver<Recovered>) {
    mpsc::channel(RECOVERY_QUEUE)
}

/// What the reader remembers of a pub/sub name.
struct Known {
    channel: ChannelName,
    /// The epoch of the last message decoded (saves an allocation per message).
    epoch: Option<Epoch>,
    /// The offset of the last message of `epoch` handed to the hub (0: none yet).
    last: u64,
}

/// A channel whose subscription Redis dropped, while it is subscribed again.
#[derive(Default)]
struct Recovering {
    /// Live messages that arrived meanwhile, delivered after what history returns.
    held: Vec<Arc<Message>>,
    /// Another drop arrived while recovering: recover once more when this one ends.
    again: bool,
}

/// The single reader: inbox → hub, in arrival order.
pub async fn run_reader(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Pushed>,
    mut recovered: mpsc::Receiver<Recovered>,
    stop: CancellationToken,
) {
    let mut reader = Reader {
        shared,
        names: HashMap::new(),
        recovering: HashMap::new(),
        stop: stop.clone(),
    };
    let mut batch = Vec::with_capacity(256);
    loop {
        batch.clear();
        let n = tokio::select! {
            _ = stop.cancelled() => return,
            Some(r) = recovered.recv() => {
                reader.recovered(r);
                continue;
            }
            n = rx.recv_many(&mut batch, 256) => n,
        };
        if n == 0 {
            return;
        }
        for pushed in batch.drain(..) {
            let shared = &reader.shared;
            shared.inbox.bytes.fetch_sub(pushed.weight, AcqRel);
            if shared.inbox.dropped.swap(false, AcqRel) {
                tracing::warn!(
                    "the Redis pub/sub inbox overflowed; ending every local session (clients resume from their cursors)"
                );
                shared
                    .hub
                    .disconnect_all(DisconnectReason::BrokerUnavailable);
            }
            if pushed.generation != shared.current_generation.load(Relaxed) {
                continue;
            }
            match pushed.info.kind {
                PushKind::Unsubscribe | PushKind::SUnsubscribe => {
                    reader.unsubscribed(pushed.generation, pushed.info.data);
                }
                _ => reader.deliver(pushed.info.data),
            }
        }
    }
}

struct Reader {
    shared: Arc<Shared>,
    names: HashMap<Vec<u8>, Known>,
    recovering: HashMap<ChannelName, Recovering>,
    stop: CancellationToken,
}

fn known<'a>(
    names: &'a mut HashMap<Vec<u8>, Known>,
    keys: &Keys,
    name: &[u8],
) -> Option<&'a mut Known> {
    if !names.contains_key(name) {
        let channel = keys.channel_of_pubsub(name)?;
        if names.len() >= NAME_CACHE {
            // Only costs a longer replay should a channel need recovering (see `start_recovery`).
            names.clear();
        }
        names.insert(
            name.to_vec(),
            Known {
                channel,
                epoch: None,
                last: 0,
            },
        );
    }
    names.get_mut(name)
}

impl Reader {
    fn deliver(&mut self, data: Vec<Value>) {
        let mut data = data.into_iter();
        let (Some(Value::BulkString(name)), Some(Value::BulkString(payload))) =
            (data.next(), data.next())
        else {
            tracing::warn!("ignoring a pub/sub push without channel and payload");
            return;
        };
        let Some(known) = known(&mut self.names, &self.shared.keys, &name) else {
            return;
        };
        match decode_push(&known.channel, Bytes::from(payload), &mut known.epoch) {
            Ok(Push::Message(m)) => {
                if let Some(r) = self.recovering.get_mut(&m.channel) {
                    if r.held.len() < RECOVERY_HOLD {
                        r.held.push(m);
                    }
                    // Beyond that the message is dropped: the subscription reports the hole
                    // as a gap before the next message it receives, never silently.
                    return;
                }
                known.last = m.offset;
                self.shared.note_seen(&m.channel, &m.position());
                self.shared.hub.deliver(&m);
            }
            Ok(Push::Presence(kind, info)) => {
                self.shared.hub.deliver_presence(&Arc::new(PresenceEvent {
                    kind,
                    channel: known.channel.clone(),
                    info,
                }));
            }
            Err(e) => {
                let channel = &known.channel;
                tracing::warn!(%channel, error = e, "ignoring a malformed pub/sub payload");
            }
        }
    }

    /// Redis says the connection no longer follows a channel. Mostly the answer to this
    /// node's own UNSUBSCRIBE; but on a cluster a master that hands a slot to another one
    /// drops every shard subscription of that slot with an unasked `sunsubscribe`, and the
    /// messages then go to the new owner. While local sessions follow the channel, it is
    /// subscribed again (at whichever master owns it now) and whatever the node missed is
    /// read from history, so each session receives everything or, where history no longer
    /// has it, a gap notice. A false alarm (an own unsubscribe racing a join) costs one
    /// SUBSCRIBE and one history read whose messages the sessions skip as duplicates.
    fn unsubscribed(&mut self, generation: u64, data: Vec<Value>) {
        let Some(Value::BulkString(name)) = data.into_iter().next() else {
            return;
        };
        let Some(known) = known(&mut self.names, &self.shared.keys, &name) else {
            return;
        };
        let channel = known.channel.clone();
        if self.shared.hub.subscriber_count(&channel) == 0 {
            return;
        }
        if let Some(r) = self.recovering.get_mut(&channel) {
            r.again = true;
            return;
        }
        self.start_recovery(channel, generation);
    }

    fn start_recovery(&mut self, channel: ChannelName, generation: u64) {
        let since = self
            .names
            .get(self.shared.keys.pubsub(&channel).as_bytes())
            .and_then(|k| {
                let epoch = k.epoch.clone()?;
                (k.last > 0).then_some(Since::After(Position {
                    epoch,
                    offset: k.last,
                }))
            })
            // Nothing delivered yet (or forgotten): all that history holds; the sessions
            // skip what they already have.
            .unwrap_or_else(|| {
                Since::Last(self.shared.policies.for_channel(&channel).history_size)
            });
        tracing::info!(%channel, "Redis dropped the channel's subscription (slot moved?); subscribing again");
        self.recovering
            .insert(channel.clone(), Recovering::default());
        tokio::spawn(recover(
            self.shared.clone(),
            channel,
            generation,
            since,
            self.stop.clone(),
        ));
    }

    fn recovered(&mut self, r: Recovered) {
        let Some(state) = self.recovering.remove(&r.channel) else {
            return;
        };
        let generation = self.shared.current_generation.load(Relaxed);
        if r.generation != generation {
            // The connection was replaced meanwhile: every session was ended already.
            return;
        }
        let name = self.shared.keys.pubsub(&r.channel);
        let Some(known) = known(&mut self.names, &self.shared.keys, name.as_bytes()) else {
            return;
        };
        let replay = r.read.map(|read| read.replay);
        let from_history = replay.as_ref().map_or(&[][..], |r| r.messages());
        for m in from_history.iter().chain(state.held.iter()) {
            let new = known.epoch.as_ref() != Some(&m.epoch) || m.offset > known.last;
            if new {
                known.epoch = Some(m.epoch.clone());
                known.last = m.offset;
                self.shared.note_seen(&m.channel, &m.position());
                self.shared.hub.deliver(m);
            }
        }
        if state.again {
            self.start_recovery(r.channel, generation);
        }
    }
}

/// Subscribes `channel` again after Redis dropped it, then reads what the node missed.
/// Retries (with backoff) while local sessions follow the channel and the connection lives;
/// always reports back, so the reader releases the messages it holds.
async fn recover(
    shared: Arc<Shared>,
    channel: ChannelName,
    generation: u64,
    since: Since,
    stop: CancellationToken,
) {
    let mut backoff = RETRY_MIN;
    let mut attempts = 0u32;
    let read = loop {
        if stop.is_cancelled() || shared.current_generation.load(Acquire) != generation {
            break None;
        }
        match shared.reconcile_with(&channel, true).await {
            Ok(()) if shared.hub.subscriber_count(&channel) == 0 => break None,
            Ok(()) => match shared.read_history(&channel, &since, None).await {
                Ok(read) => break Some(read),
                Err(e) => {
                    // Subscribed: from here on nothing more is missed, and the sessions
                    // see the hole (if any) as a gap.
                    tracing::warn!(%channel, error = %e, "reading what was missed failed");
                    break None;
                }
            },
            Err(e) => {
                attempts += 1;
                if attempts == 1 || attempts.is_multiple_of(30) {
                    tracing::warn!(%channel, error = %e, attempts, "subscribing again failed; retrying");
                }
                tokio::select! {
                    _ = stop.cancelled() => break None,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
    };
    let _ = shared
        .recovered
        .send(Recovered {
            channel,
            generation,
            read,
        })
        .await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn message(bytes: usize) -> PushInfo {
        PushInfo {
            kind: PushKind::Message,
            data: vec![
                Value::BulkString(b"p:{c}:c".to_vec()),
                Value::BulkString(vec![b'x'; bytes]),
            ],
        }
    }

    #[test]
    fn a_full_inbox_drops_and_records_the_loss_without_blocking() {
        let (inbox, mut rx) = Inbox::new();
        let big = INBOX_BYTES / 4;
        for _ in 0..4 {
            inbox.push(1, message(big));
        }
        assert!(
            inbox.dropped.load(Acquire),
            "the fourth push is over the byte budget"
        );
        let mut taken = 0;
        while let Ok(p) = rx.try_recv() {
            inbox.bytes.fetch_sub(p.weight, AcqRel);
            taken += 1;
        }
        assert_eq!(taken, 3);
        assert_eq!(inbox.bytes.load(Acquire), 0);
    }

    #[test]
    fn a_disconnection_wakes_the_supervisor_even_when_the_inbox_is_full() {
        let (inbox, _rx) = Inbox::new();
        for _ in 0..INBOX_PUSHES + 1 {
            inbox.push(3, message(1));
        }
        assert!(inbox.dropped.load(Acquire));
        inbox.push(
            3,
            PushInfo {
                kind: PushKind::Disconnection,
                data: vec![],
            },
        );
        assert_eq!(inbox.disconnected.load(Acquire), 3);
    }
}
