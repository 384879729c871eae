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
use tidings_core::idempotency::{PublishOptions, Published};
use tidings_core::presence::{ClientInfo, PresenceKind};
use tidings_core::{
    ChannelName, ChannelPolicy, Data, Epoch, EventName, Hub, LivePolicies, Message, Position,
};
use tokio_util::sync::CancellationToken;

use crate::codec::{self, announcement, client_json, entry_message, kind_of, parse_client};
use crate::connection::{self, Commands, Endpoint, RESPONSE_TIMEOUT};
use crate::keys::Keys;
use crate::pubsub::{Inbox, Link, Recovered, recovery_channel, run_reader, run_supervisor};
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
/// Channels whose last seen position a node remembers (see `Shared::seen`).
const SEEN_MAX: usize = 100_000;
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
    /// The publish script's connection: it never resends by itself (see `publish_with`).
    pub(crate) publisher: Commands,
    pub(crate) inbox: Arc<Inbox>,
    pub(crate) link: Mutex<Link>,
    pub(crate) current_generation: AtomicU64,
    /// Woken whenever a pub/sub connection is installed.
    pub(crate) installed: tokio::sync::Notify,
    /// Per channel: the generation of the connection it is subscribed on (see `reconcile`).
    pub(crate) subs: Mutex<HashMap<ChannelName, Arc<tokio::sync::Mutex<u64>>>>,
    /// Recovery tasks report to the reader here (see `pubsub::recover`).
    pub(crate) recovered: tokio::sync::mpsc::Sender<Recovered>,
    /// Per channel, the highest position this node has seen Redis acknowledge or deliver:
    /// the evidence that lets the scripts notice a Redis restored from an older copy
    /// (`regressed` in `common.lua`). Bounded by `SEEN_MAX`.
    seen: Mutex<HashMap<ChannelName, Position>>,
    /// This node's present clients, refreshed in Redis by `run_upkeep`.
    presence: Mutex<HashMap<ChannelName, HashMap<String, ClientInfo>>>,
}

/// Tidings channels in Redis, shared by every node pointed at the same Redis and prefix.
pub struct RedisBroker {
    shared: Arc<Shared>,
    stop: CancellationToken,
    /// Started on the first `roster()` call: a node with no use for it opens no second
    /// pub/sub connection.
    roster: std::sync::OnceLock<Arc<crate::roster::RedisRoster>>,
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
pub(crate) async fn timed<T>(
    what: &str,
    call: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(RESPONSE_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(what, e)),
        Err(_) => Err(unavailable(what, "Redis did not answer in time")),
    }
}

/// The masters to ask about the whole keyspace: on a cluster every master that is not
/// failing (`host`, `port`); on one server (or behind Sentinel) one target with an empty host,
/// which `Commands::query_on` takes as the connection's own server.
pub(crate) async fn masters(
    endpoint: &Endpoint,
    commands: &Commands,
) -> Result<Vec<(String, u16)>, BrokerError> {
    if !endpoint.is_cluster() {
        return Ok(vec![(String::new(), 0)]);
    }
    let nodes = timed(
        "listing cluster nodes",
        commands.query(redis::cmd("CLUSTER").arg("NODES")),
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

/// Warnings about an `INFO memory` + `INFO persistence` text (see `configuration_warnings`).
pub(crate) fn config_warnings(info: &str) -> Vec<String> {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let mut out = Vec::new();
    let maxmemory = field("maxmemory")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let policy = field("maxmemory_policy").unwrap_or("noeviction");
    if maxmemory > 0 && policy != "noeviction" {
        out.push(format!(
            "Redis may evict Tidings' keys (maxmemory {maxmemory} bytes, maxmemory-policy {policy}): \
             an evicted channel silently restarts in a new epoch and loses its history; \
             set maxmemory-policy noeviction (publishes then fail with 503 when memory is full)"
        ));
    }
    if field("loading") == Some("1") {
        out.push("Redis is still loading its data".to_owned());
    }
    out
}

/// What a failed publish script call says about whether it ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PublishFailure {
    /// Redis did not run it, and may well run it in a moment (a redirect during a slot
    /// migration, a failover, a loading replica, a connection being re-established).
    NotRunRetry,
    /// Redis refused it (out of memory, no permission, a script error before any write).
    NotRun,
    /// The request may have been executed: the connection dropped or the reply was lost.
    Unknown,
}

fn publish_failure(e: &redis::RedisError) -> PublishFailure {
    use redis::{ErrorKind, ServerErrorKind};
    match e.kind() {
        ErrorKind::Server(
            ServerErrorKind::Moved
            | ServerErrorKind::Ask
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::BusyLoading
            | ServerErrorKind::ReadOnly,
        ) => PublishFailure::NotRunRetry,
        // A server error answers the request: a script that fails does so before writing
        // (Redis refuses a write script under OOM before running it).
        ErrorKind::Server(_) => PublishFailure::NotRun,
        // The same for the server's error codes redis-rs has no name for: `OOM` under
        // noeviction, `NOREPLICAS` under min-replicas-to-write (an old primary back before
        // Sentinel demoted it), `BUSY`, `NOAUTH`. Redis answered, and refused before writing.
        // (Found by scripts/chaos.sh: these used to answer `outcome_unknown`.)
        ErrorKind::Extension => PublishFailure::NotRun,
        ErrorKind::ClusterConnectionNotFound => PublishFailure::NotRunRetry,
        // Redis is down: fail fast rather than wait for it.
        ErrorKind::Io if e.is_connection_refusal() => PublishFailure::NotRun,
        ErrorKind::InvalidClientConfig | ErrorKind::AuthenticationFailed => PublishFailure::NotRun,
        // Sentinel named no reachable primary: nothing was sent.
        ErrorKind::MasterNameNotFoundBySentinel => PublishFailure::NotRun,
        _ => PublishFailure::Unknown,
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
        let connection::Opened {
            endpoint,
            commands,
            publisher,
        } = connection::open(&options.urls, tls_ca).await?;
        let (inbox, rx) = Inbox::new();
        let (recovered, recovered_rx) = recovery_channel();
        let shared = Arc::new(Shared {
            hub,
            policies,
            keys,
            endpoint,
            commands,
            publisher,
            inbox,
            link: Mutex::new(Link::default()),
            current_generation: AtomicU64::new(0),
            installed: tokio::sync::Notify::new(),
            subs: Mutex::new(HashMap::new()),
            recovered,
            seen: Mutex::new(HashMap::new()),
            presence: Mutex::new(HashMap::new()),
        });
        let stop = CancellationToken::new();
        tokio::spawn(run_reader(shared.clone(), rx, recovered_rx, stop.clone()));
        tokio::spawn(run_supervisor(shared.clone(), stop.clone()));
        tokio::spawn(run_upkeep(shared.clone(), stop.clone()));
        if let Some(sentinel) = shared.endpoint.sentinel() {
            tokio::spawn(crate::sentinel::run_watcher(sentinel.clone(), stop.clone()));
        }
        let broker = Arc::new(Self {
            shared,
            stop,
            roster: std::sync::OnceLock::new(),
        });
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
            match broker.configuration_warnings().await {
                Ok(warnings) => {
                    for w in warnings {
                        tracing::warn!("{w}");
                    }
                }
                Err(e) => tracing::info!(error = %e, "could not check Redis' configuration"),
            }
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

    /// What in Redis' configuration can break Tidings' guarantees, one sentence each (empty
    /// when nothing does). Read from `INFO memory` and `INFO persistence` of every master,
    /// which the documented ACL already allows; see `docs/redis.md`.
    pub async fn configuration_warnings(&self) -> Result<Vec<String>, BrokerError> {
        let s = &self.shared;
        let mut out = Vec::new();
        for (host, port) in s.scan_targets().await? {
            let at = if host.is_empty() {
                String::new()
            } else {
                format!(" on {host}:{port}")
            };
            let mut info = redis::cmd("INFO");
            info.arg("memory").arg("persistence");
            let reply = timed(
                "reading Redis' configuration",
                s.commands.query_on(info, &host, port),
            )
            .await?;
            let text = codec::bytes(reply).ok_or_else(|| malformed("INFO"))?;
            out.extend(
                config_warnings(&String::from_utf8_lossy(&text))
                    .into_iter()
                    .map(|w| format!("{w}{at}")),
            );
        }
        Ok(out)
    }

    fn sharded(&self) -> &'static str {
        if self.is_cluster() { "1" } else { "0" }
    }
}

impl Shared {
    pub(crate) fn seen(&self, channel: &ChannelName) -> Option<Position> {
        relock(&self.seen).get(channel).cloned()
    }

    /// Records `at` as seen (a later offset of the same epoch, or any other epoch: the newest
    /// word on the channel is what counts).
    pub(crate) fn note_seen(&self, channel: &ChannelName, at: &Position) {
        let mut seen = relock(&self.seen);
        match seen.get_mut(channel) {
            Some(p) if p.epoch == at.epoch => p.offset = p.offset.max(at.offset),
            Some(p) => *p = at.clone(),
            None => {
                if seen.len() >= SEEN_MAX {
                    // Forgetting only weakens the check for a while; it never misleads it.
                    seen.clear();
                }
                seen.insert(channel.clone(), at.clone());
            }
        }
    }

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

    /// `read.lua`: the replay and the channel's top in one atomic step (no subscribing).
    pub(crate) async fn read_history(
        &self,
        channel: &ChannelName,
        since: &Since,
        limit: Option<usize>,
    ) -> Result<HistoryRead, BrokerError> {
        let s = self;
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
        let seen = s.seen(channel);
        inv.arg(seen.as_ref().map_or("", |p| p.epoch.as_str()))
            .arg(seen.as_ref().map_or(0, |p| p.offset));
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
        let top = Position { epoch, offset: top };
        s.note_seen(channel, &top);
        Ok(HistoryRead { top, replay })
    }

    /// Masters of the cluster as `(host, port)`, or the one server.
    async fn scan_targets(&self) -> Result<Vec<(String, u16)>, BrokerError> {
        masters(&self.endpoint, &self.commands).await
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
    fn roster(&self) -> Option<Arc<dyn tidings_core::Roster>> {
        let r = self.roster.get_or_init(|| {
            crate::roster::RedisRoster::start(self.shared.clone(), self.stop.clone())
        });
        Some(r.clone())
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn publish_with(
        &self,
        channel: &ChannelName,
        event: Option<EventName>,
        data: Data,
        options: &PublishOptions,
    ) -> Result<Published, BrokerError> {
        let s = &self.shared;
        if !s.connected() {
            // Redis went away (the supervisor noticed): nothing is sent, so this is a clean
            // "not stored", where a command on the dead connection could only be "unknown".
            return Err(BrokerError::Unavailable(
                "Redis pub/sub is not connected".into(),
            ));
        }
        let policy = s.policies.for_channel(channel);
        let [keys_even, keys_odd] = s.keys.idempotency(channel);
        let key = options.idempotency_key.as_ref();
        let mut inv = scripts::PUBLISH.prepare_invoke();
        inv.key(s.keys.meta(channel))
            .key(s.keys.stream(channel))
            .key(keys_even)
            .key(keys_odd)
            .arg(Epoch::random().as_str())
            .arg(policy.history_size)
            .arg(millis(policy.history_ttl))
            .arg(meta_ttl(&policy))
            .arg(s.keys.pubsub(channel))
            .arg(self.sharded())
            .arg(kind_of(&data))
            .arg(event.as_ref().map_or("", |e| e.as_str()))
            .arg(&data.raw()[..])
            .arg(key.map_or("", |k| k.as_str()))
            .arg(millis(options.idempotency_window));
        let seen = s.seen(channel);
        inv.arg(seen.as_ref().map_or("", |p| p.epoch.as_str()))
            .arg(seen.as_ref().map_or(0, |p| p.offset));
        // Never a blind retry: the script is sent again only when Redis certainly did not run
        // it (a redirect, a refused connection, LOADING…), or when it carries an idempotency
        // key (then running it twice stores it once). Otherwise a lost answer is reported as
        // such: the caller cannot be told "not stored" when it may have been.
        let deadline = tokio::time::Instant::now() + RESPONSE_TIMEOUT;
        let mut pause = Duration::from_millis(10);
        let reply = loop {
            let failure = match tokio::time::timeout_at(deadline, s.publisher.invoke(&inv)).await {
                Ok(Ok(reply)) => break reply,
                Ok(Err(e)) => e,
                Err(_) => {
                    return Err(BrokerError::OutcomeUnknown(
                        "Redis did not answer the publish in time".into(),
                    ));
                }
            };
            let outcome = publish_failure(&failure);
            let retry = match outcome {
                PublishFailure::NotRunRetry => true,
                PublishFailure::NotRun => false,
                PublishFailure::Unknown => key.is_some(),
            };
            if !retry || tokio::time::Instant::now() + pause >= deadline {
                return Err(match outcome {
                    PublishFailure::Unknown => BrokerError::OutcomeUnknown(format!(
                        "publishing: {failure} (Redis may have stored it)"
                    )),
                    _ => unavailable("publishing", failure),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        };
        let parts = codec::array(reply).ok_or_else(|| malformed("publish"))?;
        let [epoch, offset, time, replayed] =
            <[Value; 4]>::try_from(parts).map_err(|_| malformed("publish"))?;
        let offset = codec::integer(&offset).ok_or_else(|| malformed("publish offset"))?;
        let time = codec::integer(&time).ok_or_else(|| malformed("publish time"))?;
        let epoch = codec::epoch(epoch).ok_or_else(|| malformed("publish epoch"))?;
        let replayed = codec::integer(&replayed) == Some(1);
        if !replayed {
            s.note_seen(
                channel,
                &Position {
                    epoch: epoch.clone(),
                    offset,
                },
            );
        }
        Ok(Published {
            message: Arc::new(Message::new(
                channel.clone(),
                Position { epoch, offset },
                event,
                data,
                time,
            )),
            replayed,
        })
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
        s.read_history(channel, since, limit).await
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
