//! `tidings doctor`'s look at Redis: connect the way the broker does (one server, cluster
//! seeds or Sentinel), then read what decides whether Tidings keeps its promises there —
//! version, persistence, eviction, and, behind Sentinel, `min-replicas-to-write`. Nothing is
//! written to Redis. `CONFIG GET` may be refused by an ACL; the check then says it could not
//! tell rather than guess.

use std::time::Duration;

use crate::broker::{config_warnings, masters, timed};
use crate::connection::{self, Commands};
use crate::{ConnectError, RedisOptions};

/// What the broker would connect to, and what in it deserves a warning.
#[derive(Debug, Default)]
pub struct Diagnosis {
    /// "one server", "a cluster (N masters)" or "behind Sentinel".
    pub topology: String,
    /// `redis_version` of each server asked, with its address on a cluster.
    pub versions: Vec<String>,
    /// One sentence each, saying what to change.
    pub warnings: Vec<String>,
    /// Settings read that are fine, for the report (`maxmemory-policy noeviction`, `AOF on`).
    pub notes: Vec<String>,
}

/// Connects (bounded in time) and reads Redis' settings; an error means it cannot be used.
pub async fn diagnose(options: &RedisOptions) -> Result<Diagnosis, ConnectError> {
    let tls_ca = match &options.tls_ca_file {
        Some(path) => Some(std::fs::read(path).map_err(|e| {
            ConnectError::Url(format!("broker.tls_ca_file {}: {e}", path.display()))
        })?),
        None => None,
    };
    let what = options
        .urls
        .iter()
        .map(|u| connection::masked(u))
        .collect::<Vec<_>>()
        .join(",");
    let opened = tokio::time::timeout(
        connection::CONNECT_TIMEOUT * 3,
        connection::open(&options.urls, tls_ca),
    )
    .await
    .map_err(|_| ConnectError::Connect(format!("{what}: no answer in time")))??;
    let (endpoint, commands) = (opened.endpoint, opened.commands);
    let unavailable =
        |e: tidings_core::broker::BrokerError| ConnectError::Connect(format!("{what}: {e}"));
    // The command connection may be lazy: a PING proves Redis answers before anything else.
    timed("PING", commands.query(&redis::cmd("PING")))
        .await
        .map_err(unavailable)?;
    let targets = masters(&endpoint, &commands).await.map_err(unavailable)?;
    let sentinel = endpoint.sentinel().is_some();
    let mut d = Diagnosis {
        topology: if endpoint.is_cluster() {
            format!("a cluster ({} masters)", targets.len())
        } else if sentinel {
            "behind Sentinel".to_owned()
        } else {
            "one server".to_owned()
        },
        ..Diagnosis::default()
    };
    for (host, port) in targets {
        let at = if host.is_empty() {
            String::new()
        } else {
            format!(" on {host}:{port}")
        };
        let mut info = redis::cmd("INFO");
        info.arg("server").arg("memory").arg("persistence");
        let reply = timed("INFO", commands.query_on(info, &host, port))
            .await
            .map_err(unavailable)?;
        let text = crate::codec::bytes(reply).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        d.versions.push(format!(
            "{}{at}",
            field("redis_version").unwrap_or("unknown")
        ));
        d.warnings.extend(
            config_warnings(&text)
                .into_iter()
                .map(|w| format!("{w}{at}")),
        );
        let policy = field("maxmemory_policy").unwrap_or("unknown");
        if field("maxmemory").is_some_and(|m| m == "0") || policy == "noeviction" {
            d.notes
                .push(format!("maxmemory-policy {policy}{at} (nothing evicted)"));
        }
        let aof = field("aof_enabled") == Some("1");
        let save = config_get(&commands, "save", &host, port).await;
        let rdb = save.as_deref().map(|s| !s.trim().is_empty());
        match (aof, rdb) {
            (true, _) => d.notes.push(format!("AOF on{at}")),
            (false, Some(true)) => d.notes.push(format!(
                "RDB snapshots{at} (save {:?}; AOF off: a restart loses what came after the last snapshot)",
                save.unwrap_or_default()
            )),
            (false, Some(false)) => d.warnings.push(format!(
                "Redis persists nothing{at} (appendonly no, save \"\"): a Redis restart loses every channel's history \
                 and subscribers get gap notices; set `appendonly yes` (docs/redis.md)"
            )),
            (false, None) => d.warnings.push(format!(
                "AOF is off{at} and `CONFIG GET save` was refused, so RDB is unknown: without either a Redis \
                 restart loses history (gap notices); set `appendonly yes`"
            )),
        }
        if sentinel {
            match config_get(&commands, "min-replicas-to-write", &host, port).await {
                Some(n) if n.trim() != "0" => d
                    .notes
                    .push(format!("min-replicas-to-write {}{at}", n.trim())),
                Some(_) => d.warnings.push(format!(
                    "min-replicas-to-write is 0{at}: after a failover the old primary can accept \
                     publishes that are then lost; set `min-replicas-to-write 1` and \
                     `min-replicas-max-lag 10` on every Redis server (docs/redis.md)"
                )),
                None => d.warnings.push(format!(
                    "`CONFIG GET min-replicas-to-write` was refused{at}: check it is 1 on every \
                     Redis server behind Sentinel (docs/redis.md)"
                )),
            }
        }
    }
    Ok(d)
}

/// One `CONFIG GET` value; `None` when refused (an ACL) or not answered.
async fn config_get(commands: &Commands, key: &str, host: &str, port: u16) -> Option<String> {
    let mut cmd = redis::cmd("CONFIG");
    cmd.arg("GET").arg(key);
    let reply = tokio::time::timeout(Duration::from_secs(3), commands.query_on(cmd, host, port))
        .await
        .ok()?
        .ok()?;
    let mut parts = crate::codec::array(reply)?;
    if parts.len() != 2 {
        return None;
    }
    crate::codec::bytes(parts.swap_remove(1)).map(|b| String::from_utf8_lossy(&b).into_owned())
}
