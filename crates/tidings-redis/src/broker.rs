//! `RedisBroker`: the `Broker` contract kept in Redis, so several nodes share channels.
//!
//! - `publish` runs `publish.lua`: offset assignment, history append (trimmed by size and
//!   age) and PUBLISH (SPUBLISH on a cluster) in one atomic script per channel. It returns
//!   only after Redis answered, so a success is in Redis; any failure is a 503 and nothing
//!   was acknowledged that was not stored.
//! - Every node, the publishing one included, gets messages back through its one pub/sub
//!   connection and its single reader (`pubsub.rs`), which hands them to `Hub::deliver` in
//!   offset order.
//! - `read` runs `read.lua`: the replay and the channel's top in one atomic step. When the
//!   hub has local subscribers it first makes sure the channel's subscription is confirmed,
//!   so a joining session never reads a top that live delivery could fall behind.
//! - Presence lives in Redis with an expiry each node pushes forward for its own clients
//!   (`run_upkeep`): a node that dies leaves entries that vanish within `PRESENCE_TTL`.
//!
//! Concurrency: `Shared` is the state the broker, the reader, the supervisor and the upkeep
//! task hold; its rules are at the top of `pubsub.rs`. `presence` is a std mutex held for map
//! updates only.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::Value;
use tidings_core::broker::{Broker, BrokerError, ChannelStats};
use tidings_core::history::{Gap, GapReason, HistoryRead, Replay, Since};
use tidings_core::presence::{ClientInfo, PresenceKind};
use tidings_core::{
    ChannelName, ChannelPolicy, Data, Epoch, EventName, Hub, LivePolicies, Message, Position,
};
use tokio_util::sync::CancellationToken;

use crate::codec::{self, announcement, client_json, entry_message, kind_of, parse_client};
use crate::connection::{self, Commands, Endpoint, RESPONSE_TIMEOUT};
use crate::keys::Keys;
use crate::pubsub::{Inbox, Link, run_reader, run_supervisor};
use crate::scripts;
use crate::{ConnectError, RedisOptions};

/// How long a present client's entry lives without a refresh from its node.
pub const PRESENCE_TTL: Duration = Duration::from_secs(45);
/// How often a node refreshes its clients' presence and its channels' metadata.
const UPKEEP_EVERY: Duration = Duration::from_secs(15);
/// A channel's epoch and offset counter outlive its history by at least this long, and
/// nodes with subscribers keep them alive: an idle channel does not change epoch under a
/// subscriber that is waiting for its next message.
const META_TTL_MIN: Duration = Duration::from_secs(60);
/// Upper bound on one read's entries (a whole history of the largest allowed size).
const READ_MAX: usize = 1_000_000;
/// `/api/channels` lists at most this many channels…
const LIST_MAX: usize = 10_000;
/// …and examines at most this many SCAN pages per node, so a huge keyspace cannot make it hang.
const SCAN_PAGES_MAX: usize = 1_000;
/// Presence lists are capped like channel lists.
const PRESENCE_MAX: usize = 10_000;
/// Redis calls the upkeep task makes at once.
const UPKEEP_CONCURRENCY: usize = 16;

pub(crate) fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a clone or a map update; a poisoned lock holds valid data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the broker and its tasks share.
pub struct Shared {
    pub(crate) hub: Arc<Hub>,
    pub(crate) policies: Arc<LivePolicies>,
    pub(crate) keys: Keys,
    pub(crate) endpoint: Endpoint,
    pub(crate) commands: Commands,
    pub(crate) inbox: Arc<Inbox>,
    pub(crate) link: Mutex<Link>,
    pub(crate) current_generation: AtomicU64,
    /// Woken whenever a pub/sub connection is installed.
    pub(crate) installed: tokio::sync::Notify,
    /// Per channel: the generation of the connection it is subscribed on (see `reconcile`).
    pub(crate) subs: Mutex<HashMap<ChannelName, Arc<tokio::sync::Mutex<u64>>>>,
    /// This node's present clients, refreshed in Redis by `run_upkeep`.
    presence: Mutex<HashMap<ChannelName, HashMap<String, ClientInfo>>>,
}

/// Tidings channels in Redis, shared by every node pointed at the same Redis and prefix.
pub struct RedisBroker {
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(format!("{what}: {e}"))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn meta_ttl(policy: &ChannelPolicy) -> u64 {
    millis(policy.history_ttl.max(META_TTL_MIN))
}

/// Bounds a Redis call by `RESPONSE_TIMEOUT` (on top of the connection's own) and turns
/// every failure into `Unavailable`.
async fn timed<T>(
    what: &str,
    call: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(RESPONSE_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(what, e)),
        Err(_) => Err(unavailable(what, "Redis did not answer in time")),
    }
}

fn malformed(what: &str) -> BrokerError {
    BrokerError::Unavailable(format!("unexpected reply from Redis ({what})"))
}

impl RedisBroker {
    /// Connects (failing fast when Redis cannot be reached) and starts the node's pub/sub
    /// reader, its supervisor and its upkeep task; they end when the broker is dropped.
    pub async fn connect(
        options: RedisOptions,
        hub: Arc<Hub>,
        policies: Arc<LivePolicies>,
    ) -> Result<Arc<Self>, ConnectError> {
        let keys = Keys::new(&options.prefix).map_err(ConnectError::Url)?;
        let tls_ca = match &options.tls_ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                ConnectError::Url(format!("broker.tls_ca_file {}: {e}", path.display()))
            })?),
            None => None,
        };
        let (endpoint, commands) = connection::open(&options.urls, tls_ca).await?;
        let (inbox, rx) = Inbox::new();
        let shared = Arc::new(Shared {
            hub,
            policies,
            keys,
            endpoint,
            commands,
            inbox,
            link: Mutex::new(Link::default()),
            current_generation: AtomicU64::new(0),
            installed: tokio::sync::Notify::new(),
            subs: Mutex::new(HashMap::new()),
            presence: Mutex::new(HashMap::new()),
        });
        let stop = CancellationToken::new();
        tokio::spawn(run_reader(shared.clone(), rx, stop.clone()));
        tokio::spawn(run_supervisor(shared.clone(), stop.clone()));
        tokio::spawn(run_upkeep(shared.clone(), stop.clone()));
        let broker = Arc::new(Self { shared, stop });
        // The command connection is up; a node is only useful once pub/sub is too.
        let deadline = tokio::time::Instant::now() + 2 * RESPONSE_TIMEOUT;
        let up = loop {
            let installed = broker.shared.installed.notified();
            tokio::pin!(installed);
            installed.as_mut().enable();
            if broker.shared.connected() {
                break true;
            }
            if tokio::time::timeout_at(deadline, installed).await.is_err() {
                break false;
            }
        };
        if up {
            Ok(broker)
        } else {
            Err(ConnectError::Connect(
                "the pub/sub connection did not come up".into(),
            ))
        }
    }

    /// Whether this broker talks to a Redis Cluster (sharded pub/sub).
    pub fn is_cluster(&self) -> bool {
        self.shared.endpoint.is_cluster()
    }

    /// Whether the node's pub/sub connection is up now.
    pub fn connected(&self) -> bool {
        self.shared.connected()
    }

    fn sharded(&self) -> &'static str {
        if self.is_cluster() { "1" } else { "0" }
    }
}

impl Shared {
    async fn stats(&self, channel: &ChannelName) -> Result<Option<ChannelStats>, BrokerError> {
        let policy = self.policies.for_channel(channel);
        let mut inv = scripts::STATS.prepare_invoke();
        inv.key(self.keys.meta(channel))
            .key(self.keys.stream(channel))
            .arg(millis(policy.history_ttl))
            .arg(policy.history_size);
        let reply = timed("reading channel stats", self.commands.invoke(&inv)).await?;
        let Some(mut parts) = codec::array(reply) else {
            return Ok(None);
        };
        if parts.len() != 3 {
            return Err(malformed("stats"));
        }
        let len = codec::integer(&parts[2]).ok_or_else(|| malformed("stats length"))?;
        let top = codec::integer(&parts[1]).ok_or_else(|| malformed("stats offset"))?;
        let epoch = codec::epoch(parts.swap_remove(0)).ok_or_else(|| malformed("stats epoch"))?;
        Ok(Some(ChannelStats {
            top: Position { epoch, offset: top },
            history_len: usize::try_from(len).unwrap_or(usize::MAX),
        }))
    }

    /// Masters of the cluster as `(host, port)`, or the one server.
    async fn scan_targets(&self) -> Result<Vec<(String, u16)>, BrokerError> {
        if !self.endpoint.is_cluster() {
            return Ok(vec![(String::new(), 0)]);
        }
        let nodes = timed(
            "listing cluster nodes",
            self.commands.query(redis::cmd("CLUSTER").arg("NODES")),
        )
        .await?;
        let text = codec::bytes(nodes).ok_or_else(|| malformed("CLUSTER NODES"))?;
        let text = String::from_utf8_lossy(&text);
        Ok(text
            .lines()
            .filter_map(|line| {
                let mut fields = line.split(' ');
                let addr = fields.nth(1)?;
                let flags = fields.next()?;
                if !flags.split(',').any(|f| f == "master") || flags.contains("fail") {
                    return None;
                }
                // `host:port@cport[,hostname]`
                let hostport = addr.split('@').next()?;
                let (host, port) = hostport.rsplit_once(':')?;
                Some((host.to_owned(), port.parse().ok()?))
            })
            .collect())
    }

    async fn channels(&self) -> Result<Vec<ChannelName>, BrokerError> {
        let pattern = self.keys.meta_pattern();
        let mut out = Vec::new();
        for (host, port) in self.scan_targets().await? {
            let mut cursor = 0u64;
            for _ in 0..SCAN_PAGES_MAX {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000);
                let reply = timed(
                    "listing channels",
                    self.commands.query_on(scan, &host, port),
                )
                .await?;
                let mut page = codec::array(reply).ok_or_else(|| malformed("SCAN"))?;
                if page.len() != 2 {
                    return Err(malformed("SCAN"));
                }
                let keys = page
                    .pop()
                    .and_then(codec::array)
                    .ok_or_else(|| malformed("SCAN keys"))?;
                cursor = codec::integer(&page[0]).ok_or_else(|| malformed("SCAN cursor"))?;
                out.extend(
                    keys.into_iter()
                        .filter_map(codec::bytes)
                        .filter_map(|k| self.keys.channel_of_meta(&k)),
                );
                if cursor == 0 || out.len() >= LIST_MAX {
                    break;
                }
            }
        }
        out.sort();
        out.dedup();
        out.truncate(LIST_MAX);
        Ok(out)
    }
}

#[async_trait]
impl Broker for RedisBroker {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn publish(
        &self,
        channel: &ChannelName,
        event: Option<EventName>,
        data: Data,
    ) -> Result<Arc<Message>, BrokerError> {
        let s = &self.shared;
        let policy = s.policies.for_channel(channel);
        let mut inv = scripts::PUBLISH.prepare_invoke();
        inv.key(s.keys.meta(channel))
            .key(s.keys.stream(channel))
            .arg(Epoch::random().as_str())
            .arg(policy.history_size)
            .arg(millis(policy.history_ttl))
            .arg(meta_ttl(&policy))
            .arg(s.keys.pubsub(channel))
            .arg(self.sharded())
            .arg(kind_of(&data))
            .arg(event.as_ref().map_or("", |e| e.as_str()))
            .arg(&data.raw()[..]);
        let reply = timed("publishing", s.commands.invoke(&inv)).await?;
        let parts = codec::array(reply).ok_or_else(|| malformed("publish"))?;
        let [epoch, offset, time] =
            <[Value; 3]>::try_from(parts).map_err(|_| malformed("publish"))?;
        let offset = codec::integer(&offset).ok_or_else(|| malformed("publish offset"))?;
        let time = codec::integer(&time).ok_or_else(|| malformed("publish time"))?;
        let epoch = codec::epoch(epoch).ok_or_else(|| malformed("publish epoch"))?;
        Ok(Arc::new(Message::new(
            channel.clone(),
            Position { epoch, offset },
            event,
            data,
            time,
        )))
    }

    async fn read(
        &self,
        channel: &ChannelName,
        since: &Since,
        limit: Option<usize>,
    ) -> Result<HistoryRead, BrokerError> {
        let s = &self.shared;
        if s.hub.subscriber_count(channel) > 0 {
            // A session joining: live delivery must be confirmed before the top is taken,
            // or messages between the two would reach nobody (a later joiner does not wait
            // for the first one's subscribe otherwise).
            s.reconcile(channel).await?;
        }
        let policy = s.policies.for_channel(channel);
        let limit = limit.unwrap_or(READ_MAX).min(READ_MAX);
        let (mode, n, epoch) = match since {
            Since::Now => ("now", 0, ""),
            Since::Last(n) => ("last", (*n).min(READ_MAX) as u64, ""),
            Since::After(p) => ("after", p.offset, p.epoch.as_str()),
        };
        let mut inv = scripts::READ.prepare_invoke();
        inv.key(s.keys.meta(channel))
            .key(s.keys.stream(channel))
            .arg(Epoch::random().as_str())
            .arg(millis(policy.history_ttl))
            .arg(meta_ttl(&policy))
            .arg(mode)
            .arg(n)
            .arg(epoch)
            .arg(limit)
            .arg(policy.history_size);
        let reply = timed("reading history", s.commands.invoke(&inv)).await?;
        let parts = codec::array(reply).ok_or_else(|| malformed("read"))?;
        let [epoch, top, reason, first, entries] =
            <[Value; 5]>::try_from(parts).map_err(|_| malformed("read"))?;
        let epoch = codec::epoch(epoch).ok_or_else(|| malformed("read epoch"))?;
        let top = codec::integer(&top).ok_or_else(|| malformed("read top"))?;
        let first = codec::integer(&first).ok_or_else(|| malformed("read first"))?;
        let reason = match codec::bytes(reason).as_deref() {
            Some(b"") => None,
            Some(b"trimmed") => Some(GapReason::Trimmed),
            Some(b"epoch_changed") => Some(GapReason::EpochChanged),
            _ => return Err(malformed("read gap reason")),
        };
        let entries = codec::array(entries).ok_or_else(|| malformed("read entries"))?;
        let mut messages = Vec::with_capacity(entries.len());
        for entry in entries {
            let m = entry_message(channel, &epoch, entry).map_err(malformed)?;
            messages.push(Arc::new(m));
        }
        let replay = match reason {
            None => Replay::Complete(messages),
            Some(reason) => Replay::Gap {
                gap: Gap {
                    channel: channel.as_str().to_owned(),
                    epoch: epoch.clone(),
                    next_offset: first,
                    reason,
                },
                messages,
            },
        };
        Ok(HistoryRead {
            top: Position { epoch, offset: top },
            replay,
        })
    }

    async fn subscribe(&self, channel: &ChannelName) -> Result<(), BrokerError> {
        self.shared.reconcile(channel).await
    }

    async fn unsubscribe(&self, channel: &ChannelName) -> Result<(), BrokerError> {
        self.shared.reconcile(channel).await
    }

    async fn stats(&self, channel: &ChannelName) -> Result<Option<ChannelStats>, BrokerError> {
        self.shared.stats(channel).await
    }

    async fn channels(&self) -> Result<Vec<ChannelName>, BrokerError> {
        self.shared.channels().await
    }

    async fn ready(&self) -> Result<(), BrokerError> {
        if !self.shared.connected() {
            return Err(BrokerError::Unavailable(
                "Redis pub/sub is not connected".into(),
            ));
        }
        timed("PING", self.shared.commands.query(&redis::cmd("PING")))
            .await
            .map(|_: Value| ())
    }

    async fn presence_join(
        &self,
        channel: &ChannelName,
        info: &ClientInfo,
        announce: bool,
    ) -> Result<(), BrokerError> {
        let s = &self.shared;
        // Recorded locally first: the upkeep task refreshes what this node holds.
        relock(&s.presence)
            .entry(channel.clone())
            .or_default()
            .insert(info.client.clone(), info.clone());
        let said = if announce {
            announcement(PresenceKind::Join, info)
        } else {
            Vec::new()
        };
        let mut inv = scripts::PRESENCE_JOIN.prepare_invoke();
        inv.key(s.keys.presence_expiry(channel))
            .key(s.keys.presence_info(channel))
            .arg(&info.client)
            .arg(client_json(info))
            .arg(millis(PRESENCE_TTL))
            .arg(s.keys.pubsub(channel))
            .arg(self.sharded())
            .arg(said);
        timed("recording presence", s.commands.invoke(&inv))
            .await
            .map(|_| ())
    }

    async fn presence_leave(
        &self,
        channel: &ChannelName,
        info: &ClientInfo,
        announce: bool,
    ) -> Result<(), BrokerError> {
        let s = &self.shared;
        {
            let mut all = relock(&s.presence);
            if let Some(clients) = all.get_mut(channel) {
                clients.remove(&info.client);
                if clients.is_empty() {
                    all.remove(channel);
                }
            }
        }
        if !s.connected() {
            // Sessions are being ended because Redis went away. This node no longer refreshes
            // the entry, so Redis drops it within PRESENCE_TTL anyway; trying now would only
            // fail (and log) once per session.
            return Ok(());
        }
        let said = if announce {
            announcement(PresenceKind::Leave, info)
        } else {
            Vec::new()
        };
        let mut inv = scripts::PRESENCE_LEAVE.prepare_invoke();
        inv.key(s.keys.presence_expiry(channel))
            .key(s.keys.presence_info(channel))
            .arg(&info.client)
            .arg(s.keys.pubsub(channel))
            .arg(self.sharded())
            .arg(said);
        timed("removing presence", s.commands.invoke(&inv))
            .await
            .map(|_| ())
    }

    async fn presence(&self, channel: &ChannelName) -> Result<Vec<ClientInfo>, BrokerError> {
        let s = &self.shared;
        let mut inv = scripts::PRESENCE_LIST.prepare_invoke();
        inv.key(s.keys.presence_expiry(channel))
            .key(s.keys.presence_info(channel))
            .arg(PRESENCE_MAX);
        let reply = timed("reading presence", s.commands.invoke(&inv)).await?;
        let infos = codec::array(reply).ok_or_else(|| malformed("presence"))?;
        Ok(infos
            .into_iter()
            .filter_map(codec::bytes)
            .filter_map(|raw| parse_client(&raw))
            .collect())
    }
}

/// Every `UPKEEP_EVERY`: keeps the epochs of channels with local subscribers alive, and
/// pushes the presence expiry of this node's clients forward.
async fn run_upkeep(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(UPKEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !shared.connected() {
            continue;
        }
        let s = &*shared;
        futures_util::stream::iter(s.hub.channels())
            .for_each_concurrent(UPKEEP_CONCURRENCY, |c| async move {
                let ttl = meta_ttl(&s.policies.for_channel(&c));
                let mut touch = redis::cmd("PEXPIRE");
                touch.arg(s.keys.meta(&c)).arg(ttl);
                if let Err(e) = timed("touching channel", s.commands.query(&touch)).await {
                    tracing::debug!(channel = %c, error = %e, "keep-alive failed");
                }
            })
            .await;
        let present: Vec<(ChannelName, String)> = relock(&s.presence)
            .iter()
            .flat_map(|(c, clients)| clients.keys().map(move |id| (c.clone(), id.clone())))
            .collect();
        futures_util::stream::iter(present)
            .for_each_concurrent(UPKEEP_CONCURRENCY, |(c, client)| async move {
                let mut inv = scripts::PRESENCE_REFRESH.prepare_invoke();
                inv.key(s.keys.presence_expiry(&c))
                    .key(s.keys.presence_info(&c))
                    .arg(&client)
                    .arg(millis(PRESENCE_TTL));
                if let Err(e) = timed("refreshing presence", s.commands.invoke(&inv)).await {
                    tracing::debug!(channel = %c, error = %e, "presence refresh failed");
                }
            })
            .await;
    }
}
