//! Redis Sentinel: which server is the primary now, and noticing when that changes.
//!
//! `redis+sentinel://[user[:password]@]host:port[,host:port…]/MASTER[/db]` lists the sentinels
//! (port 26379 when left out) and the master name they watch. User, password and db are the
//! primary's; the sentinels themselves are asked without authentication.
//!
//! The broker treats a Sentinel deployment as one server whose address moves: the pub/sub
//! supervisor (`pubsub::run_supervisor`) asks the sentinels for the primary each time it
//! (re)connects, checks with `ROLE` that the server really is a primary, then points the
//! command connection at the same server before it installs the pub/sub connection. Until a
//! primary is reachable the node has no pub/sub link, so publishes and new subscriptions
//! answer 503 `broker_unavailable` (nothing is stored, nothing is lost silently), exactly as
//! when a single Redis is down.
//!
//! Which sentinel to believe: all are asked at once (`SENTINEL MASTER`), and the answer with
//! the highest configuration epoch wins, once a majority of the listed sentinels answered
//! (or all that could). Sentinel raises the epoch with every failover a majority of them
//! authorizes, so a sentinel that missed one (it was down, partitioned, or cannot hear the
//! others) names the old primary with an older epoch and is outvoted; asking them in order
//! and taking the first answer would follow it back to a demoted primary. A sentinel that
//! is down fails at connect; one that accepts connections and never answers is not waited
//! for once the majority is in.
//!
//! # Concurrency rules
//! - `primary` (the command connection to the current primary) is a std mutex held only for a
//!   clone or a swap, never across an `.await`. Only the supervisor swaps it, and it does so
//!   before installing the matching pub/sub connection, so a publish that sees the new link
//!   also uses the new primary.
//! - One watcher task (`run_watcher`) per broker reads the sentinels' `+switch-master`
//!   announcements. It decides nothing: it records that the master moved and wakes the
//!   supervisor, which drops its connection (every local session is ended with
//!   `broker_unavailable`, clients resume from their cursors) and connects again. The
//!   supervisor also asks the sentinels on every health check, so a missed announcement (the
//!   watcher was reconnecting) costs at most one health interval.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering::AcqRel, Ordering::Release};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::{Client, ConnectionAddr, ConnectionInfo, ErrorKind, IntoConnectionInfo, RedisResult};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::ConnectError;
use crate::broker::relock;
use crate::connection::{CONNECT_TIMEOUT, RESPONSE_TIMEOUT};

pub const SCHEME: &str = "redis+sentinel://";
const DEFAULT_PORT: u16 = 26379;
/// How long the watcher waits before it tries the next sentinel.
const WATCH_RETRY: Duration = Duration::from_millis(500);

/// The sentinels, the master they watch, and the connection to the primary they named last.
pub struct Sentinel {
    sentinels: Vec<ConnectionInfo>,
    master: String,
    /// The primary's address is filled in from the sentinels' answer; the rest (auth, db)
    /// comes from the URL.
    primary_info: ConnectionInfo,
    /// The primary the current connections go to.
    current: Mutex<Option<(String, u16)>>,
    primary: Mutex<Option<ConnectionManager>>,
    /// One open connection per sentinel (same order as `sentinels`), kept between questions:
    /// the health check asks every second, and a connection per question would cost each
    /// sentinel a connect and a client slot per node per second. A connection that fails
    /// or does not answer in time is dropped and made again at the next question.
    asking: Vec<Mutex<Option<MultiplexedConnection>>>,
    /// Set by the watcher when a `+switch-master` for our master arrived.
    switched: AtomicBool,
    pub wake: Notify,
}

/// Parses a `redis+sentinel://` URL (see the module comment).
pub fn parse(url: &str) -> Result<Sentinel, ConnectError> {
    let bad = |why: &str| ConnectError::Url(format!("{}: {why}", crate::masked_url(url)));
    let rest = url
        .trim()
        .strip_prefix(SCHEME)
        .ok_or_else(|| bad("not a redis+sentinel:// URL"))?;
    let (authority, path) = rest
        .split_once('/')
        .ok_or_else(|| bad("the master name is missing (redis+sentinel://host:port/MASTER)"))?;
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let mut segments = path.split('/');
    let master = segments.next().unwrap_or_default();
    if master.is_empty() {
        return Err(bad(
            "the master name is missing (redis+sentinel://host:port/MASTER)",
        ));
    }
    let db = match segments.next() {
        None | Some("") => 0,
        Some(db) => db
            .parse::<i64>()
            .map_err(|_| bad("the database after the master name must be a number"))?,
    };
    if segments.next().is_some() {
        return Err(bad("expected /MASTER or /MASTER/db after the sentinels"));
    }
    let mut sentinels = Vec::new();
    for host in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
        let (name, port) = match host.rsplit_once(':') {
            Some((name, port)) if !name.ends_with(']') || host.starts_with('[') => (
                name,
                port.parse::<u16>()
                    .map_err(|_| bad("a sentinel's port is not a number"))?,
            ),
            _ => (host, DEFAULT_PORT),
        };
        let name = name.trim_start_matches('[').trim_end_matches(']');
        let info = ConnectionAddr::Tcp(name.to_owned(), port)
            .into_connection_info()
            .map_err(|e| bad(&e.to_string()))?;
        sentinels.push(info);
    }
    if sentinels.is_empty() {
        return Err(bad("no sentinel given"));
    }
    // The primary's auth and db, parsed the way redis-rs parses any URL (percent-decoding
    // included); its host is a placeholder until a sentinel names the primary.
    let template = match userinfo {
        Some(u) => format!("redis://{u}@127.0.0.1:6379/{db}"),
        None => format!("redis://127.0.0.1:6379/{db}"),
    };
    let primary_info = template
        .as_str()
        .into_connection_info()
        .map_err(|e| bad(&e.to_string()))?;
    Ok(Sentinel {
        asking: sentinels.iter().map(|_| Mutex::new(None)).collect(),
        sentinels,
        master: master.to_owned(),
        primary_info,
        current: Mutex::new(None),
        primary: Mutex::new(None),
        switched: AtomicBool::new(false),
        wake: Notify::new(),
    })
}

fn no_primary(detail: String) -> redis::RedisError {
    (
        ErrorKind::MasterNameNotFoundBySentinel,
        "no Redis primary",
        detail,
    )
        .into()
}

/// One sentinel's answer: where the primary is, and the configuration epoch that placed it
/// there (each failover a majority of sentinels authorizes raises it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub addr: (String, u16),
    pub epoch: u64,
}

/// Reads `SENTINEL MASTER`'s reply: field/value pairs (a flat array in RESP2, a map in RESP3).
fn answer_of(reply: redis::Value) -> Option<Answer> {
    let pairs: Vec<(redis::Value, redis::Value)> = match reply {
        redis::Value::Map(m) => m,
        redis::Value::Array(a) => {
            let mut it = a.into_iter();
            std::iter::from_fn(|| Some((it.next()?, it.next()?))).collect()
        }
        _ => return None,
    };
    let text = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => std::str::from_utf8(b).ok().map(str::to_owned),
        redis::Value::SimpleString(s) => Some(s.clone()),
        redis::Value::Int(i) => Some(i.to_string()),
        _ => None,
    };
    let (mut ip, mut port, mut epoch) = (None, None, 0);
    for (k, v) in &pairs {
        match text(k).as_deref() {
            Some("ip") => ip = text(v),
            Some("port") => port = text(v).and_then(|p| p.parse().ok()),
            Some("config-epoch") => epoch = text(v).and_then(|e| e.parse().ok()).unwrap_or(0),
            _ => {}
        }
    }
    Some(Answer {
        addr: (ip?, port?),
        epoch,
    })
}

impl Sentinel {
    /// Asks every sentinel at once where the primary is, and believes the answer with the
    /// highest configuration epoch: a sentinel that was down, partitioned or deaf to the
    /// others during a failover still names the old primary, with the old epoch. It stops
    /// waiting once a majority of the listed sentinels answered, so a sentinel that accepts
    /// connections but never answers (stopped, or behind a black hole) costs nothing while
    /// the others are up; a dead one fails at connect.
    pub async fn ask(&self) -> RedisResult<Answer> {
        let mut pending: futures_util::stream::FuturesUnordered<_> = self
            .sentinels
            .iter()
            .enumerate()
            .map(|(i, info)| async move {
                let r =
                    tokio::time::timeout(CONNECT_TIMEOUT + RESPONSE_TIMEOUT, self.ask_one(i, info))
                        .await;
                if !matches!(r, Ok(Ok(_))) {
                    // Whatever went wrong, the next question starts on a new connection.
                    *relock(&self.asking[i]) = None;
                }
                r
            })
            .collect();
        let majority = self.sentinels.len() / 2 + 1;
        let (mut best, mut answers, mut last) = (None::<Answer>, 0, None);
        while let Some(r) = pending.next().await {
            match r {
                Ok(Ok(Some(a))) => {
                    answers += 1;
                    if best.as_ref().is_none_or(|b| a.epoch > b.epoch) {
                        best = Some(a);
                    }
                    if answers >= majority {
                        break;
                    }
                }
                Ok(Ok(None)) => {
                    last = Some(format!(
                        "a sentinel does not know the master {:?}",
                        self.master
                    ))
                }
                Ok(Err(e)) => last = Some(e.to_string()),
                Err(_) => last = Some("a sentinel did not answer".into()),
            }
        }
        best.ok_or_else(|| no_primary(last.unwrap_or_default()))
    }

    async fn ask_one(&self, i: usize, info: &ConnectionInfo) -> RedisResult<Option<Answer>> {
        let kept = relock(&self.asking[i]).clone();
        let mut conn = match kept {
            Some(conn) => conn,
            None => {
                let client = Client::open(info.clone())?;
                let conn = client.get_multiplexed_async_connection().await?;
                *relock(&self.asking[i]) = Some(conn.clone());
                conn
            }
        };
        let reply: RedisResult<redis::Value> = redis::cmd("SENTINEL")
            .arg("MASTER")
            .arg(&self.master)
            .query_async(&mut conn)
            .await;
        match reply {
            Ok(v) => Ok(answer_of(v)),
            // "ERR No such master with that name".
            Err(e) if matches!(e.kind(), ErrorKind::Server(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The primary's connection info at `addr`, with the URL's auth and db.
    pub fn primary_at(&self, addr: &(String, u16)) -> ConnectionInfo {
        self.primary_info
            .clone()
            .set_addr(ConnectionAddr::Tcp(addr.0.clone(), addr.1))
    }

    /// Connects the command connection to the primary the sentinels name now and checks that
    /// it is one (a restarted old primary answers as a primary until Sentinel turns it into
    /// a replica; the sentinels no longer name it by then). Returns its address.
    pub async fn connect_primary(&self) -> RedisResult<(String, u16)> {
        self.switched.store(false, Release);
        let addr = self.ask().await?.addr;
        let client = Client::open(self.primary_at(&addr))?;
        let manager = crate::connection::command_manager(client)
            .await
            .ok_or_else(|| no_primary(format!("{}:{} timed out", addr.0, addr.1)))??;
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut manager.clone()).await?;
        let is_primary = matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master")
            || matches!(role.first(), Some(redis::Value::SimpleString(r)) if r == "master");
        if !is_primary {
            return Err(no_primary(format!(
                "{}:{} is not a primary (yet)",
                addr.0, addr.1
            )));
        }
        *relock(&self.primary) = Some(manager);
        *relock(&self.current) = Some(addr.clone());
        Ok(addr)
    }

    /// The command connection to the current primary.
    pub fn commands(&self) -> RedisResult<ConnectionManager> {
        relock(&self.primary)
            .clone()
            .ok_or_else(|| no_primary("not connected to a primary yet".into()))
    }

    /// Whether the primary moved since the last `connect_primary`: a `+switch-master`
    /// arrived, or (with `ask_now`) the sentinels name another address.
    pub async fn moved(&self, ask_now: bool) -> bool {
        if self.switched.swap(false, AcqRel) {
            return true;
        }
        if !ask_now {
            return false;
        }
        let current = relock(&self.current).clone();
        match self.ask().await {
            Ok(answer) => current.as_ref() != Some(&answer.addr),
            // The sentinels being unreachable says nothing about the primary.
            Err(_) => false,
        }
    }

    fn announced(&self, payload: &str) {
        // `+switch-master <master> <old ip> <old port> <new ip> <new port>`
        if payload.split(' ').next() == Some(self.master.as_str()) {
            tracing::info!(switch = payload, "Sentinel switched the Redis primary");
            self.switched.store(true, Release);
            self.wake.notify_one();
        }
    }
}

/// Follows the sentinels' `+switch-master` channel for as long as the broker lives, moving to
/// the next sentinel when one goes away.
pub async fn run_watcher(sentinel: std::sync::Arc<Sentinel>, stop: CancellationToken) {
    let mut next = 0usize;
    loop {
        let info = sentinel.sentinels[next % sentinel.sentinels.len()].clone();
        next += 1;
        let watch = async {
            let client = Client::open(info)?;
            let mut pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
                .await
                .map_err(|_| no_primary("a sentinel did not answer".into()))??;
            // Bounded too: a sentinel that accepts connections but never answers (stopped,
            // or behind a black hole) would hold the watcher forever.
            tokio::time::timeout(RESPONSE_TIMEOUT, pubsub.subscribe("+switch-master"))
                .await
                .map_err(|_| no_primary("a sentinel did not answer".into()))??;
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                if let Ok(payload) = msg.get_payload::<String>() {
                    sentinel.announced(&payload);
                }
            }
            RedisResult::Ok(())
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            r = watch => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "watching a sentinel failed; trying the next");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(WATCH_RETRY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sentinel_master_reply_gives_the_address_and_epoch_in_resp2_and_resp3() {
        let b = |s: &str| redis::Value::BulkString(s.as_bytes().to_vec());
        let fields = [
            ("name", "m"),
            ("ip", "10.0.0.7"),
            ("port", "6380"),
            ("flags", "master"),
            ("config-epoch", "4"),
        ];
        let flat = redis::Value::Array(fields.iter().flat_map(|(k, v)| [b(k), b(v)]).collect());
        let map = redis::Value::Map(fields.iter().map(|(k, v)| (b(k), b(v))).collect());
        let expected = Answer {
            addr: ("10.0.0.7".into(), 6380),
            epoch: 4,
        };
        assert_eq!(answer_of(flat), Some(expected.clone()));
        assert_eq!(answer_of(map), Some(expected));
        // Without an epoch (an old sentinel) the answer still counts, as the oldest.
        let old = redis::Value::Array(vec![b("ip"), b("h"), b("port"), b("1")]);
        assert_eq!(answer_of(old).map(|a| a.epoch), Some(0));
        assert_eq!(answer_of(redis::Value::Array(vec![b("ip"), b("h")])), None);
        assert_eq!(answer_of(redis::Value::Nil), None);
    }

    #[test]
    fn a_sentinel_url_names_its_sentinels_the_master_and_the_primarys_auth_and_db() {
        let s = parse("redis+sentinel://:pw@10.0.0.1:26380,10.0.0.2,[::1]:5/mymaster/3")
            .map_err(|e| e.to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        let addrs: Vec<String> = s.sentinels.iter().map(|i| i.addr().to_string()).collect();
        assert_eq!(addrs, vec!["10.0.0.1:26380", "10.0.0.2:26379", "::1:5"]);
        assert_eq!(s.master, "mymaster");
        let p = s.primary_at(&("127.0.0.9".into(), 7000));
        assert_eq!(p.addr().to_string(), "127.0.0.9:7000");
        assert_eq!(p.redis_settings().password(), Some("pw"));
        assert_eq!(p.redis_settings().db(), 3);
    }

    #[test]
    fn a_sentinel_url_without_a_master_or_with_a_bad_port_is_refused_without_its_password() {
        for bad in [
            "redis+sentinel://:secret@h:1",
            "redis+sentinel://:secret@h:1/",
            "redis+sentinel://:secret@h:x/m",
            "redis+sentinel://:secret@/m",
            "redis+sentinel://:secret@h:1/m/notadb",
        ] {
            let e = parse(bad).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.starts_with("invalid Redis settings"), "{bad}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }
}
