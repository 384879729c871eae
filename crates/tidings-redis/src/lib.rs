//! # Tidings on Redis
//!
//! `RedisBroker` implements `tidings_core::Broker` on Redis (or a Redis Cluster), so several
//! Tidings nodes behind a load balancer share channels with the guarantees of one node:
//! offsets, history and epochs live in Redis, each publish is one atomic script per channel,
//! and every node receives every message of the channels it has local subscribers for, in
//! offset order. The core knows nothing of Redis; this crate is one more broker behind the
//! trait, checked by the same conformance suite as the memory broker.
//!
//! ## Layout
//! - `broker`: `RedisBroker` and its `Broker` implementation; presence; the upkeep task.
//! - `pubsub`: the node's one pub/sub connection, its single reader, its supervisor
//!   (reconnect, resubscribe, health) and per-channel subscription reconciling. Its
//!   concurrency rules are written at its top.
//! - `connection`: URLs, TLS, cluster detection; the command and pub/sub connections.
//! - `doctor`: `tidings doctor`'s read-only look at Redis' settings.
//! - `sentinel`: Redis Sentinel URLs, asking for the primary, following `+switch-master`.
//! - `roster`: `RedisRoster`, the cluster-wide `Roster` (counted membership, node liveness,
//!   a broadcast bus) the Pusher protocol keeps its channels and members in.
//! - `keys`: key and pub/sub names (hash-tagged per channel, under the configured prefix).
//! - `codec`: pub/sub payloads and stream entries, to and from `Message`.
//! - `scripts` + `lua/`: the Lua scripts, one `.lua` file each.
//!
//! Operations notes (keys, TTLs, failure behaviour, cluster setup) are in `docs/redis.md`.

mod broker;
mod codec;
mod connection;
mod doctor;
mod keys;
mod pubsub;
mod roster;
mod scripts;
mod sentinel;

/// What the fuzz targets (`fuzz/`) drive: the decoders of what Redis sends. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::codec::{Push, decode_push, entry_message};
}

use std::path::PathBuf;

pub use broker::{PRESENCE_TTL, RedisBroker};
pub use connection::masked as masked_url;
pub use doctor::{Diagnosis, diagnose};
pub use keys::MAX_PREFIX_LEN;
pub use roster::ALIVE_TTL;

/// Checks a `[broker] prefix` the way the broker will use it, so a bad one is refused by
/// `config check` and at startup whatever the broker (it matters once the config moves to
/// Redis).
pub fn validate_prefix(prefix: &str) -> Result<(), String> {
    keys::Keys::new(prefix).map(|_| ())
}

/// Where and how to connect.
#[derive(Clone, Debug, Default)]
pub struct RedisOptions {
    /// One `redis://` / `rediss://` URL, or the seed nodes of a Redis Cluster.
    pub urls: Vec<String>,
    /// Prefix of every key and pub/sub channel name (`[broker] prefix`).
    pub prefix: String,
    /// PEM file with the CA that signed the server's certificate, for `rediss://` with a
    /// private CA (the system's roots are used otherwise).
    pub tls_ca_file: Option<PathBuf>,
}

impl RedisOptions {
    /// Options from `[broker] url`: one URL, or a comma-separated list of cluster seeds.
    pub fn from_url(url: &str, prefix: &str) -> Self {
        if url.trim_start().starts_with(sentinel::SCHEME) {
            // Its commas separate sentinels, not cluster seeds.
            return Self {
                urls: vec![url.trim().to_owned()],
                prefix: prefix.to_owned(),
                tls_ca_file: None,
            };
        }
        Self {
            urls: url
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_owned)
                .collect(),
            prefix: prefix.to_owned(),
            tls_ca_file: None,
        }
    }
}

/// Why a `RedisBroker` could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid Redis settings: {0}")]
    Url(String),
    #[error("cannot connect to Redis at {0}")]
    Connect(String),
}

/// Whether `url` is one Redis URL: `redis://`, `rediss://` or `redis+sentinel://`.
pub fn is_redis_url(url: &str) -> bool {
    let url = url.trim_start();
    url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with(sentinel::SCHEME)
}

/// Whether `[broker] url` names Redis: one URL, comma-separated cluster seeds, or one
/// `redis+sentinel://` URL (whose commas separate sentinels).
pub fn is_redis_broker_url(url: &str) -> bool {
    if url.trim_start().starts_with(sentinel::SCHEME) {
        return true;
    }
    url.split(',').all(|u| {
        let u = u.trim_start();
        u.starts_with("redis://") || u.starts_with("rediss://")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comma_separated_url_is_a_list_of_cluster_seeds() {
        let o = RedisOptions::from_url("redis://a:7000, redis://b:7001,", "p");
        assert_eq!(o.urls, vec!["redis://a:7000", "redis://b:7001"]);
        assert!(is_redis_url("rediss://h"));
        assert!(!is_redis_url("memory"));
    }

    #[test]
    fn a_sentinel_url_is_one_url_whose_commas_separate_sentinels() {
        let url = "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster";
        let o = RedisOptions::from_url(url, "p");
        assert_eq!(o.urls, vec![url]);
        assert!(is_redis_broker_url(url));
        assert!(is_redis_broker_url("redis://a:1,rediss://b:2"));
        assert!(!is_redis_broker_url("redis://a:1,b:2"));
    }
}
