//! `RedisRoster`: `tidings_core::Roster` kept in Redis, so every node sees one count of
//! each member and exactly one node sees a member's first hold and last release.
//!
//! Layout (every key under the `{roster}` hash tag, so on a cluster one slot holds them and
//! the reap script can touch what a dead node held):
//!
//! | name                    | type   | holds                                             |
//! |-------------------------|--------|---------------------------------------------------|
//! | `P:{roster}:h:<set>`    | hash   | member → holds across the cluster                 |
//! | `P:{roster}:v:<set>`    | hash   | member → the value its first hold stored          |
//! | `P:{roster}:n:<node>`   | hash   | `<set>\n<member>` → holds by that node            |
//! | `P:{roster}:alive`      | zset   | node → liveness deadline (ms, Redis' clock)       |
//! | `P:{roster}:bus`        | pub/sub (sharded on a cluster) broadcasts           |
//!
//! - `hold`/`release` are one script each (`lua/roster_hold.lua`, `roster_release.lua`):
//!   the cluster-wide total and the node's own count change together.
//! - Liveness: a node pushes its deadline `ALIVE_TTL` ahead every `ALIVE_EVERY`. A node
//!   killed or cut off stops; after its deadline the next `reap` (`roster_reap.lua`, any node
//!   may run it) takes its holds back and returns the members that went with them, once.
//!   So a dead node's members are gone within `ALIVE_TTL` plus the caller's reap interval.
//! - Each node also keeps its own record of what it holds (`mine`). Its heartbeat
//!   (`roster_alive.lua`) returns what Redis holds for it; when that differs from the record
//!   — Redis lost its data, the node was taken for dead during a long pause and reaped, a
//!   release's answer was lost — `roster_restore.lua` makes Redis hold exactly the record,
//!   fixing the totals by the difference. Members whose last hold that takes away are
//!   reported by the next `reap`, like a dead node's. So the counts heal within one
//!   heartbeat (`ALIVE_EVERY`); members restored after a loss are not announced again.
//! - Broadcasts go over a pub/sub connection of the roster's own (not the broker's channel
//!   connection, whose reader delivers to the hub): PUBLISH to one name every node
//!   SUBSCRIBEs to. Broadcasts sent while a node's connection is down are lost to it.
//!
//! Concurrency: `gate` is an async RwLock: `hold` and `release` take it shared for their
//! script and their update of `mine`; the heartbeat takes it exclusively, so its comparison
//! never sees a hold Redis has and the record does not yet (or the reverse). `mine` and
//! `pending` are std mutexes held for map updates only. Two tasks, started on the first
//! `Broker::roster` call and stopped with the broker: `run_alive` (the heartbeat) and `run_bus` (connect, subscribe, forward messages
//! into the bounded local broadcast, reconnect with backoff). The push callback only
//! `try_send`s into a bounded queue; a full queue drops the broadcast and logs it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::{PushInfo, PushKind, Value};
use tidings_core::BrokerError;
use tidings_core::roster::{BROADCAST_CAPACITY, Held, Released, Roster};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::broker::{Shared, timed};
use crate::codec;
use crate::connection::RESPONSE_TIMEOUT;
use crate::scripts;

/// How long a node counts as alive after it last said so.
pub const ALIVE_TTL: Duration = Duration::from_secs(10);
/// How often a node says it is alive.
const ALIVE_EVERY: Duration = Duration::from_secs(2);
/// Dead nodes one reap takes back (the next reap takes the rest).
const REAP_NODES: usize = 16;
/// Members one `members` call returns.
pub const MEMBERS_MAX: usize = 10_000;
/// Pushes waiting between the bus connection and its task.
const BUS_QUEUE: usize = 4096;
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// The bus connection is PINGed this often when quiet.
const BUS_HEALTH_EVERY: Duration = Duration::from_secs(5);

pub struct RedisRoster {
    shared: Arc<Shared>,
    node: String,
    base: String,
    bus: broadcast::Sender<Arc<str>>,
    gate: tokio::sync::RwLock<()>,
    /// What this node holds: `set\nmember` → (value, holds).
    mine: std::sync::Mutex<HashMap<String, (String, u64)>>,
    /// Members a restore took the last hold of, for the next `reap`.
    pending: std::sync::Mutex<Vec<Released>>,
}

fn relock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Map updates only: a poisoned lock still holds valid data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl RedisRoster {
    /// A roster for this node, with its tasks running until `stop`.
    pub(crate) fn start(shared: Arc<Shared>, stop: CancellationToken) -> Arc<Self> {
        let base = shared.keys.roster_base();
        let roster = Arc::new(Self {
            shared,
            node: format!("{:016x}", rand::random::<u64>()),
            base,
            bus: broadcast::Sender::new(BROADCAST_CAPACITY),
            gate: tokio::sync::RwLock::new(()),
            mine: std::sync::Mutex::new(HashMap::new()),
            pending: std::sync::Mutex::new(Vec::new()),
        });
        tokio::spawn(run_alive(roster.clone(), stop.clone()));
        tokio::spawn(run_bus(roster.clone(), stop));
        roster
    }

    fn set_key(&self, kind: &str, set: &str) -> String {
        format!("{}{kind}:{set}", self.base)
    }

    fn node_key(&self) -> String {
        format!("{}n:{}", self.base, self.node)
    }

    fn alive_key(&self) -> String {
        format!("{}alive", self.base)
    }

    fn bus_name(&self) -> String {
        format!("{}bus", self.base)
    }

    fn is_cluster(&self) -> bool {
        self.shared.endpoint.is_cluster()
    }
}

fn malformed(what: &str) -> BrokerError {
    BrokerError::Unavailable(format!("unexpected reply from Redis to {what}"))
}

fn string(v: Value) -> String {
    codec::bytes(v)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn triples(reply: Value, what: &str) -> Result<Vec<[String; 3]>, BrokerError> {
    let items = codec::array(reply).ok_or_else(|| malformed(what))?;
    let mut out = Vec::with_capacity(items.len() / 3);
    let mut it = items.into_iter();
    while let (Some(a), Some(b), Some(c)) = (it.next(), it.next(), it.next()) {
        out.push([string(a), string(b), string(c)]);
    }
    Ok(out)
}

#[async_trait]
impl Roster for RedisRoster {
    async fn hold(&self, set: &str, member: &str, value: &str) -> Result<bool, BrokerError> {
        let _shared = self.gate.read().await;
        let field = format!("{set}\n{member}");
        let mut inv = scripts::ROSTER_HOLD.prepare_invoke();
        inv.key(self.set_key("h", set))
            .key(self.set_key("v", set))
            .key(self.node_key())
            .key(self.alive_key())
            .arg(member)
            .arg(value)
            .arg(&field)
            .arg(&self.node)
            .arg(millis(ALIVE_TTL));
        let reply = timed("roster hold", self.shared.commands.invoke(&inv)).await?;
        relock(&self.mine)
            .entry(field)
            .or_insert_with(|| (value.to_owned(), 0))
            .1 += 1;
        Ok(codec::integer(&reply) == Some(1))
    }

    async fn release(&self, set: &str, member: &str) -> Result<bool, BrokerError> {
        let _shared = self.gate.read().await;
        // The record drops the hold whatever Redis answers: the socket is gone either way,
        // and a release Redis did not take is put right by the next heartbeat.
        {
            let mut mine = relock(&self.mine);
            let field = format!("{set}\n{member}");
            if let Some(e) = mine.get_mut(&field) {
                e.1 = e.1.saturating_sub(1);
                if e.1 == 0 {
                    mine.remove(&field);
                }
            }
        }
        let mut inv = scripts::ROSTER_RELEASE.prepare_invoke();
        inv.key(self.set_key("h", set))
            .key(self.set_key("v", set))
            .key(self.node_key())
            .key(self.alive_key())
            .arg(member)
            .arg(format!("{set}\n{member}"));
        let reply = timed("roster release", self.shared.commands.invoke(&inv)).await?;
        Ok(codec::integer(&reply) == Some(1))
    }

    async fn members(&self, set: &str) -> Result<Vec<Held>, BrokerError> {
        let mut inv = scripts::ROSTER_MEMBERS.prepare_invoke();
        inv.key(self.set_key("h", set))
            .key(self.set_key("v", set))
            .arg(MEMBERS_MAX);
        let reply = timed("roster members", self.shared.commands.invoke(&inv)).await?;
        let mut out: Vec<Held> = triples(reply, "roster members")?
            .into_iter()
            .map(|[member, holds, value]| Held {
                member,
                holds: holds.parse().unwrap_or(0),
                value,
            })
            .collect();
        out.sort_unstable_by(|a, b| a.member.cmp(&b.member));
        Ok(out)
    }

    async fn member(&self, set: &str, member: &str) -> Result<Option<Held>, BrokerError> {
        let mut inv = scripts::ROSTER_MEMBERS.prepare_invoke();
        inv.key(self.set_key("h", set))
            .key(self.set_key("v", set))
            .arg(1)
            .arg(member);
        let reply = timed("roster member", self.shared.commands.invoke(&inv)).await?;
        Ok(triples(reply, "roster member")?
            .into_iter()
            .next()
            .map(|[member, holds, value]| Held {
                member,
                holds: holds.parse().unwrap_or(0),
                value,
            }))
    }

    async fn size(&self, set: &str) -> Result<u64, BrokerError> {
        let mut cmd = redis::cmd("HLEN");
        cmd.arg(self.set_key("h", set));
        let reply = timed("roster size", self.shared.commands.query(&cmd)).await?;
        Ok(codec::integer(&reply).unwrap_or(0))
    }

    async fn broadcast(&self, payload: &str) -> Result<(), BrokerError> {
        let mut cmd = redis::cmd(if self.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        });
        cmd.arg(self.bus_name()).arg(payload);
        timed("roster broadcast", self.shared.commands.query(&cmd))
            .await
            .map(|_| ())
    }

    fn listen(&self) -> broadcast::Receiver<Arc<str>> {
        self.bus.subscribe()
    }

    async fn reap(&self) -> Result<Vec<Released>, BrokerError> {
        let mut inv = scripts::ROSTER_REAP.prepare_invoke();
        inv.key(self.alive_key()).arg(&self.base).arg(REAP_NODES);
        let reply = timed("roster reap", self.shared.commands.invoke(&inv)).await?;
        let mut out = std::mem::take(&mut *relock(&self.pending));
        out.extend(
            triples(reply, "roster reap")?
                .into_iter()
                .map(|[set, member, value]| Released { set, member, value }),
        );
        Ok(out)
    }
}

/// The heartbeat: this node's liveness deadline, pushed forward every `ALIVE_EVERY`, and
/// what Redis holds for it put right when it differs from the node's record.
async fn run_alive(roster: Arc<RedisRoster>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(ALIVE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = heartbeat(&roster).await {
            tracing::debug!(error = %e, "roster heartbeat failed");
        }
    }
}

async fn heartbeat(roster: &RedisRoster) -> Result<(), BrokerError> {
    let _exclusive = roster.gate.write().await;
    let mut inv = scripts::ROSTER_ALIVE.prepare_invoke();
    inv.key(roster.alive_key())
        .key(roster.node_key())
        .arg(&roster.node)
        .arg(millis(ALIVE_TTL));
    let reply = timed("roster heartbeat", roster.shared.commands.invoke(&inv)).await?;
    let counts = codec::array(reply).ok_or_else(|| malformed("roster heartbeat"))?;
    let has: Vec<u64> = counts.iter().filter_map(codec::integer).collect();
    let record: Vec<(String, String, u64)> = relock(&roster.mine)
        .iter()
        .map(|(f, (v, n))| (f.clone(), v.clone(), *n))
        .collect();
    let want = [
        record.len() as u64,
        record.iter().map(|(_, _, n)| n).sum::<u64>(),
    ];
    if has == want {
        return Ok(());
    }
    tracing::warn!(
        redis = ?has,
        node = ?want,
        "Redis' record of this node's Pusher holds differs from the node's (lost data, or the node was taken for dead); restoring it"
    );
    let mut inv = scripts::ROSTER_RESTORE.prepare_invoke();
    inv.key(roster.node_key()).arg(&roster.base);
    for (field, value, n) in &record {
        inv.arg(field).arg(n).arg(value);
    }
    let reply = timed("roster restore", roster.shared.commands.invoke(&inv)).await?;
    let released = triples(reply, "roster restore")?;
    relock(&roster.pending).extend(released.into_iter().map(|[set, member, value]| Released {
        set,
        member,
        value,
    }));
    Ok(())
}

/// The bus: one pub/sub connection subscribed to the broadcast name, rebuilt when it fails.
async fn run_bus(roster: Arc<RedisRoster>, stop: CancellationToken) {
    let mut backoff = RETRY_MIN;
    let mut failures = 0u32;
    loop {
        let (tx, mut rx) = mpsc::channel::<PushInfo>(BUS_QUEUE);
        let sender = move |info: PushInfo| -> Result<(), ()> {
            if tx.try_send(info).is_err() {
                tracing::warn!("roster broadcast dropped: the bus queue is full");
            }
            Ok(())
        };
        let connected = async {
            let conn = roster.shared.endpoint.pubsub(sender).await?;
            conn.subscribe(&roster.bus_name()).await?;
            Ok::<_, redis::RedisError>(conn)
        };
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(2 * RESPONSE_TIMEOUT, connected) => r,
        };
        let conn = match conn {
            Ok(Ok(c)) => c,
            failed => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(30) {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".into(),
                    };
                    tracing::warn!(%error, "roster bus cannot reach Redis; retrying");
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RETRY_MAX);
                continue;
            }
        };
        failures = 0;
        backoff = RETRY_MIN;
        loop {
            let push = tokio::select! {
                _ = stop.cancelled() => return,
                p = rx.recv() => p,
                _ = tokio::time::sleep(BUS_HEALTH_EVERY) => {
                    match tokio::time::timeout(RESPONSE_TIMEOUT, conn.ping()).await {
                        Ok(Ok(())) => continue,
                        _ => break,
                    }
                }
            };
            let Some(push) = push else { break };
            match push.kind {
                PushKind::Disconnection => break,
                PushKind::Message | PushKind::SMessage => {
                    // [channel, payload]
                    if let Some(payload) = push.data.into_iter().nth(1).and_then(codec::bytes) {
                        let text = String::from_utf8_lossy(&payload);
                        let _ = roster.bus.send(Arc::from(text.as_ref()));
                    }
                }
                _ => {}
            }
        }
        tracing::debug!("roster bus connection lost; reconnecting");
    }
}
