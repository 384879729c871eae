//! Connections to Redis: where they go (one server or a cluster), how they authenticate and
//! encrypt, and the two kinds a node holds — one multiplexed command connection that
//! reconnects by itself, and one pub/sub connection that `pubsub.rs` replaces when it is lost.
//!
//! URLs are redis-rs URLs: `redis://[user[:password]@]host[:port][/db]`, `rediss://…` for TLS
//! (add `#insecure` to skip certificate checks in development). Several URLs, or one URL of a
//! server with `cluster_enabled:1`, mean a Redis Cluster. Passwords never reach a log or an
//! error message: URLs are shown through `masked`.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{
    AsyncPushSender, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionInfo, IntoConnectionInfo, ProtocolVersion,
    RedisResult, ScriptInvocation, TlsCertificates, Value,
};

use crate::ConnectError;
use crate::sentinel::{self, Sentinel};

/// Time to open a TCP (and TLS) connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time for Redis to answer one command; also bounds every broker call on top of it, so a
/// Redis that stopped answering turns into 503s quickly instead of hung requests.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);

/// The command connection to one Redis server (a plain one, or the primary Sentinel names),
/// with the broker's timeouts; `None` when it did not connect within them.
pub(crate) async fn command_manager(client: Client) -> Option<RedisResult<ConnectionManager>> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        // Reconnects are retried a few times per attempt; the broker's own timeouts decide
        // when a request gives up.
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    tokio::time::timeout(
        CONNECT_TIMEOUT + RESPONSE_TIMEOUT,
        ConnectionManager::new_with_config(client, config),
    )
    .await
    .ok()
}

/// `redis://user:secret@host` → `redis://user:****@host`, for each URL of a comma-separated
/// list.
pub fn masked(url: &str) -> String {
    if url.contains(',') {
        return url.split(',').map(masked).collect::<Vec<_>>().join(",");
    }
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let user = userinfo.split_once(':').map_or("", |(u, _)| u);
    format!("{}{user}:****{}", &url[..scheme_end], &rest[at..])
}

/// Where the broker connects, kept so the pub/sub connection can be rebuilt after a loss.
pub enum Endpoint {
    Single {
        /// The server, with RESP3 selected (pushes need it).
        resp3: Client,
    },
    Cluster {
        nodes: Vec<ConnectionInfo>,
        tls_ca: Option<Vec<u8>>,
    },
    /// One primary at a time, named by Redis Sentinel (`sentinel.rs`).
    Sentinel(Arc<Sentinel>),
}

/// The command connection.
#[derive(Clone)]
pub enum Commands {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    /// The connection to whichever server Sentinel named last (swapped on failover).
    Sentinel(Arc<Sentinel>),
}

/// The pub/sub connection (RESP3; messages arrive through its push sender).
#[derive(Clone)]
pub enum PubSubConn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

fn client(info: ConnectionInfo, tls_ca: Option<&[u8]>) -> RedisResult<Client> {
    match tls_ca {
        Some(ca) => Client::build_with_tls(
            info,
            TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.to_vec()),
            },
        ),
        None => Client::open(info),
    }
}

fn with_resp3(info: &ConnectionInfo) -> ConnectionInfo {
    let redis = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    info.clone().set_redis_settings(redis)
}

/// `retries`: how often redis-rs may send a failed command again by itself (redirects
/// included). Only for commands that are safe to repeat: the publish script gets 0 (see
/// `RedisBroker::publish_with`).
fn cluster_builder(
    nodes: &[ConnectionInfo],
    tls_ca: Option<&[u8]>,
    retries: u32,
) -> ClusterClientBuilder {
    let mut b = ClusterClientBuilder::new(nodes.to_vec())
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT)
        .retries(retries)
        .min_retry_wait(50)
        .max_retry_wait(500);
    if let Some(ca) = tls_ca {
        b = b.certs(TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.to_vec()),
        });
    }
    b
}

fn connect_error(url: &str, e: impl std::fmt::Display) -> ConnectError {
    ConnectError::Connect(format!("{}: {e}", masked(url)))
}

/// What `open` connects.
pub struct Opened {
    pub endpoint: Endpoint,
    /// For everything that is safe to repeat (reads, presence, listing).
    pub commands: Commands,
    /// For the publish script, which is not: on a cluster a connection that never sends a
    /// command again by itself; on one server the same connection (a `ConnectionManager`
    /// reconnects but does not resend).
    pub publisher: Commands,
}

/// Opens the command connections and works out whether the target is a cluster.
pub async fn open(urls: &[String], tls_ca: Option<Vec<u8>>) -> Result<Opened, ConnectError> {
    let Some(first_url) = urls.first() else {
        return Err(ConnectError::Url("no Redis URL given".into()));
    };
    if first_url.trim_start().starts_with(sentinel::SCHEME) {
        return open_sentinel(first_url, tls_ca).await;
    }
    if urls.iter().any(|u| u.starts_with("rediss://")) {
        // rustls needs a process-wide crypto provider; another part of the process may
        // already have installed the same one, which is fine.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    } else if tls_ca.is_some() {
        return Err(ConnectError::Url(
            "broker.tls_ca_file is set but no URL uses rediss://".into(),
        ));
    }
    let mut nodes = Vec::with_capacity(urls.len());
    for url in urls {
        let info = url
            .as_str()
            .into_connection_info()
            .map_err(|e| ConnectError::Url(format!("{}: {e}", masked(url))))?;
        nodes.push(info);
    }
    if nodes.len() > 1 {
        return open_cluster(nodes, tls_ca, first_url).await;
    }
    let info = nodes.remove(0);
    let commands =
        client(info.clone(), tls_ca.as_deref()).map_err(|e| connect_error(first_url, e))?;
    let manager = command_manager(commands)
        .await
        .ok_or_else(|| connect_error(first_url, "timed out"))?
        .map_err(|e| connect_error(first_url, e))?;
    let mut probe = manager.clone();
    let cluster_info: String = tokio::time::timeout(
        RESPONSE_TIMEOUT,
        redis::cmd("INFO").arg("cluster").query_async(&mut probe),
    )
    .await
    .map_err(|_| connect_error(first_url, "INFO timed out"))?
    .map_err(|e| connect_error(first_url, e))?;
    if cluster_info.contains("cluster_enabled:1") {
        return open_cluster(vec![info], tls_ca, first_url).await;
    }
    let resp3 =
        client(with_resp3(&info), tls_ca.as_deref()).map_err(|e| connect_error(first_url, e))?;
    Ok(Opened {
        endpoint: Endpoint::Single { resp3 },
        commands: Commands::Single(manager.clone()),
        publisher: Commands::Single(manager),
    })
}

async fn cluster_connection(
    nodes: &[ConnectionInfo],
    tls_ca: Option<&[u8]>,
    retries: u32,
    first_url: &str,
) -> Result<ClusterConnection, ConnectError> {
    let client: ClusterClient = cluster_builder(nodes, tls_ca, retries)
        .build()
        .map_err(|e| connect_error(first_url, e))?;
    tokio::time::timeout(
        CONNECT_TIMEOUT + RESPONSE_TIMEOUT,
        client.get_async_connection(),
    )
    .await
    .map_err(|_| connect_error(first_url, "timed out"))?
    .map_err(|e| connect_error(first_url, e))
}

async fn open_cluster(
    nodes: Vec<ConnectionInfo>,
    tls_ca: Option<Vec<u8>>,
    first_url: &str,
) -> Result<Opened, ConnectError> {
    // Few retries: a request must fail fast (503) when the cluster is down, not queue up.
    let commands = cluster_connection(&nodes, tls_ca.as_deref(), 2, first_url).await?;
    let publisher = cluster_connection(&nodes, tls_ca.as_deref(), 0, first_url).await?;
    Ok(Opened {
        endpoint: Endpoint::Cluster { nodes, tls_ca },
        commands: Commands::Cluster(commands),
        publisher: Commands::Cluster(publisher),
    })
}

async fn open_sentinel(url: &str, tls_ca: Option<Vec<u8>>) -> Result<Opened, ConnectError> {
    if tls_ca.is_some() {
        return Err(ConnectError::Url(
            "broker.tls_ca_file is set but Sentinel URLs speak plain TCP".into(),
        ));
    }
    let target = Arc::new(sentinel::parse(url)?);
    target
        .connect_primary()
        .await
        .map_err(|e| connect_error(url, e))?;
    Ok(Opened {
        endpoint: Endpoint::Sentinel(target.clone()),
        commands: Commands::Sentinel(target.clone()),
        publisher: Commands::Sentinel(target),
    })
}

impl Endpoint {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Endpoint::Cluster { .. })
    }

    pub fn sentinel(&self) -> Option<&Arc<Sentinel>> {
        match self {
            Endpoint::Sentinel(s) => Some(s),
            _ => None,
        }
    }

    /// A new pub/sub connection whose pushes go to `sender`.
    pub async fn pubsub(&self, sender: impl AsyncPushSender) -> RedisResult<PubSubConn> {
        match self {
            Endpoint::Single { resp3 } => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_push_sender(sender);
                let conn = resp3
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                Ok(PubSubConn::Single(conn))
            }
            Endpoint::Cluster { nodes, tls_ca } => {
                let client = cluster_builder(nodes, tls_ca.as_deref(), 2)
                    .use_protocol(ProtocolVersion::RESP3)
                    .push_sender(sender)
                    .build()?;
                Ok(PubSubConn::Cluster(client.get_async_connection().await?))
            }
            Endpoint::Sentinel(target) => {
                // The command connection moves first, so a publish that finds the new
                // pub/sub link installed also writes to the new primary.
                let primary = target.connect_primary().await?;
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_push_sender(sender);
                let conn = Client::open(with_resp3(&target.primary_at(&primary)))?
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                Ok(PubSubConn::Single(conn))
            }
        }
    }
}

impl Commands {
    pub async fn invoke(&self, script: &ScriptInvocation<'_>) -> RedisResult<Value> {
        match self {
            Commands::Single(c) => script.invoke_async(&mut c.clone()).await,
            Commands::Cluster(c) => script.invoke_async(&mut c.clone()).await,
            Commands::Sentinel(s) => script.invoke_async(&mut s.commands()?).await,
        }
    }

    pub async fn query(&self, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            Commands::Single(c) => cmd.query_async(&mut c.clone()).await,
            Commands::Cluster(c) => cmd.query_async(&mut c.clone()).await,
            Commands::Sentinel(s) => cmd.query_async(&mut s.commands()?).await,
        }
    }

    /// Sends `cmd` to one cluster node (SCAN is per node); on one server, to the server.
    pub async fn query_on(&self, cmd: Cmd, host: &str, port: u16) -> RedisResult<Value> {
        match self {
            Commands::Single(c) => cmd.query_async(&mut c.clone()).await,
            Commands::Sentinel(s) => cmd.query_async(&mut s.commands()?).await,
            Commands::Cluster(c) => {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.to_owned(),
                    port,
                });
                c.clone().route_command(cmd, route).await
            }
        }
    }
}

impl PubSubConn {
    pub async fn subscribe(&self, name: &str) -> RedisResult<()> {
        match self {
            PubSubConn::Single(c) => c.clone().subscribe(name).await,
            PubSubConn::Cluster(c) => c.clone().ssubscribe(name).await,
        }
    }

    pub async fn unsubscribe(&self, name: &str) -> RedisResult<()> {
        match self {
            PubSubConn::Single(c) => c.clone().unsubscribe(name).await,
            PubSubConn::Cluster(c) => c.clone().sunsubscribe(name).await,
        }
    }

    pub async fn ping(&self) -> RedisResult<()> {
        let ping = redis::cmd("PING");
        match self {
            PubSubConn::Single(c) => ping.query_async::<Value>(&mut c.clone()).await,
            PubSubConn::Cluster(c) => ping.query_async::<Value>(&mut c.clone()).await,
        }
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show_in_a_masked_url() {
        assert_eq!(
            masked("redis://alice:s3cret@host:6379/0"),
            "redis://alice:****@host:6379/0"
        );
        assert_eq!(masked("rediss://:s3cret@host"), "rediss://:****@host");
        assert_eq!(masked("redis://host:6379"), "redis://host:6379");
        assert_eq!(masked("not a url"), "not a url");
        assert_eq!(
            masked("redis://:a@h1:1,redis://:b@h2:2"),
            "redis://:****@h1:1,redis://:****@h2:2"
        );
    }
}
