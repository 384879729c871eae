//! `AppState`: what every handler, transport and session shares — the node (hub + broker),
//! the configuration and credentials in force, metrics, client rates and the shutdown signal.
//!
//! A module of its own because every layer above the protocol layer takes it, and the
//! accept loop does not: `net/` reaches the application only through its `Service`.
//!
//! Concurrency: `AppState` is one `Arc`; the live configuration is swapped whole by a
//! reload (`ArcSwap`: readers take one atomic load, never a lock); counters are atomics;
//! `Rates` holds a std `Mutex` for a lookup, never across an `.await`.

use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use tidings_core::Node;
use tokio_util::sync::CancellationToken;

use crate::app::access_log::{AccessLog, Target};
use crate::auth::Auth;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::net::limits::ConnectionLimits;
use crate::rates::{RateKey, Rates};

/// What every handler shares: one pointer, so the clone each request and session takes is
/// one reference count (its fields are reached through `Deref`).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub node: Arc<Node>,
    /// The configuration and credentials in force; a reload (`lifecycle::reload`) swaps them
    /// whole. Read with `config()` / `auth()`: one atomic load, never a lock.
    live: ArcSwap<Live>,
    /// Counts reloads that took effect: sessions watch it to re-check what they follow.
    pub reloads: tokio::sync::watch::Sender<u64>,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the server shuts down: open streams say goodbye and end (they learn
    /// of it through the hub: `lifecycle::follow`).
    pub shutdown: CancellationToken,
    /// Whether the task that passes a shutdown on to the sessions was started.
    pub shutdown_pass: std::sync::atomic::AtomicBool,
    /// Waiting long polls' deadlines, on one timer (`transport::due`).
    pub polls_due: Arc<crate::transport::due::Deadlines>,
    /// Set when a stop signal starts the drain (`lifecycle::drain`): `/readyz` answers 503.
    pub draining: std::sync::atomic::AtomicBool,
    pub limits: Arc<ConnectionLimits>,
    /// Client publishes per token subject or IP address (`client_publish_rate`).
    pub publish_rates: Rates,
    /// Presence reads, keyed the same way (`app::channels::PRESENCE_READS_PER_SEC`).
    pub presence_rates: Rates,
    /// `[server] access_log`, when set: one line per request or stream.
    pub access_log: Option<Arc<AccessLog>>,
    /// The Pusher apps (`[[pusher.apps]]`) and what this node knows of them (`crate::pusher`).
    pub pusher: Arc<tidings_pusher::Apps>,
    /// When the node started: sessions keep their times as milliseconds from it (`millis`).
    clock: tokio::time::Instant,
}

/// What a reload replaces: the whole configuration (settings that need a restart keep their
/// values from the start) and the credentials built from it.
pub struct Live {
    pub config: Config,
    pub auth: Auth,
}

/// The configuration in force when it was taken (`Shared::config`).
pub struct ConfigRef(Guard<Arc<Live>>);

impl std::ops::Deref for ConfigRef {
    type Target = Config;

    fn deref(&self) -> &Config {
        &self.0.config
    }
}

/// The credentials in force when they were taken (`Shared::auth`).
pub struct AuthRef(Guard<Arc<Live>>);

impl std::ops::Deref for AuthRef {
    type Target = Auth;

    fn deref(&self) -> &Auth {
        &self.0.auth
    }
}

impl Shared {
    /// Milliseconds since the node started, wrapping every ~49.7 days: 4 bytes where a
    /// tokio `Instant` is 16, for times every idle session keeps (a WebSocket's last frame
    /// heard). Compared only through `since`, over spans far shorter than the wrap: a ping
    /// timeout is two ping intervals, and a session idle with no channels can only have
    /// left them by sending a frame.
    pub fn millis(&self) -> u32 {
        self.clock.elapsed().as_millis() as u32
    }

    /// How long ago `then` (`millis`) was.
    pub fn since(&self, then: u32) -> std::time::Duration {
        std::time::Duration::from_millis(u64::from(self.millis().wrapping_sub(then)))
    }

    /// The configuration in force. Take it once per request where several settings are read.
    pub fn config(&self) -> ConfigRef {
        ConfigRef(self.live.load())
    }

    /// The credentials in force.
    pub fn auth(&self) -> AuthRef {
        AuthRef(self.live.load())
    }

    /// Both, consistent with each other.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Puts a new configuration in force (`lifecycle::reload` decides what may change).
    pub(crate) fn swap_live(&self, live: Live) {
        self.live.store(Arc::new(live));
    }
}

/// A state that does not keep it alive (`AppState::downgrade`): for a task that outlives
/// no server, such as the node's shared timers (`lifecycle::follow`).
pub struct WeakState(std::sync::Weak<Shared>);

impl WeakState {
    pub fn upgrade(&self) -> Option<AppState> {
        self.0.upgrade().map(AppState)
    }
}

impl AppState {
    pub fn downgrade(&self) -> WeakState {
        WeakState(Arc::downgrade(&self.0))
    }

    /// A state on the in-memory broker (`AppState::connect` also knows Redis).
    pub fn new(config: Config) -> Result<Self, crate::config::ConfigError> {
        if config.broker.url != "memory" {
            return Err(crate::config::ConfigError::Invalid(format!(
                "broker.url = {:?}: a remote broker is started by AppState::connect",
                tidings_redis::masked_url(&config.broker.url)
            )));
        }
        if config.broker.data_dir.is_some() {
            return Err(crate::config::ConfigError::Invalid(
                "broker.data_dir: a data dir is opened by AppState::connect".into(),
            ));
        }
        let hub = Arc::new(tidings_core::Hub::new());
        let policies = tidings_core::LivePolicies::new(config.policies());
        let broker = tidings_core::broker::memory::MemoryBroker::new(hub.clone(), policies.clone());
        broker.set_max_channels(config.server.max_channels);
        let node = Node::new(hub, broker, policies);
        Self::with_node(config, node)
    }

    /// A state on the broker the config names: in memory, or Redis (`redis://`, `rediss://`,
    /// comma-separated URLs for a Redis Cluster), connected before this returns so a wrong
    /// address fails at startup rather than at the first request.
    pub async fn connect(config: Config) -> Result<Self, StartError> {
        if !tidings_redis::is_redis_url(&config.broker.url) {
            return match config.broker.data_dir.clone() {
                Some(dir) => Self::durable(config, &dir).await,
                None => Ok(Self::new(config)?),
            };
        }
        if config.broker.data_dir.is_some() {
            return Err(crate::config::ConfigError::Invalid(
                "broker.data_dir keeps history for the memory broker; with Redis, history lives in Redis: remove the key".into(),
            )
            .into());
        }
        let hub = Arc::new(tidings_core::Hub::new());
        let policies = tidings_core::LivePolicies::new(config.policies());
        let mut options =
            tidings_redis::RedisOptions::from_url(&config.broker.url, &config.broker.prefix);
        options.tls_ca_file = config.broker.tls_ca_file.clone();
        let broker =
            tidings_redis::RedisBroker::connect(options, hub.clone(), policies.clone()).await?;
        let node = Node::new(hub, broker, policies);
        Ok(Self::with_node(config, node)?)
    }

    /// A state on the memory broker writing through the data dir at `dir`: opened (locked,
    /// scanned, a torn tail cut off) before this returns, so a locked, unwritable or newer
    /// dir fails at startup.
    async fn durable(config: Config, dir: &std::path::Path) -> Result<Self, StartError> {
        let hub = Arc::new(tidings_core::Hub::new());
        let policies = tidings_core::LivePolicies::new(config.policies());
        let opened = {
            let dir = dir.to_owned();
            let (policies, cache) = (policies.clone(), config.broker.history_cache);
            // Reading a large log is blocking work: off the runtime's threads.
            tokio::task::spawn_blocking(move || {
                let mut restore =
                    tidings_core::broker::memory::Restore::new(policies).with_cache(cache);
                let opened =
                    tidings_store::open(&dir, tidings_store::Options::default(), &mut |r| {
                        restore.apply(r)
                    });
                opened.map(|(store, report)| (store, report, restore))
            })
            .await
            .map_err(|e| StartError::Store(format!("opening the data dir: {e}")))?
        };
        let (store, report, restore) = opened.map_err(|e| StartError::Store(e.to_string()))?;
        log_report(dir, &report, restore.len());
        let broker = tidings_core::broker::memory::MemoryBroker::durable(
            hub.clone(),
            policies.clone(),
            restore,
            Box::new(store),
            config.broker.fsync,
        )
        .map_err(|e| StartError::Store(format!("starting the data dir's writer: {e}")))?;
        broker.set_max_channels(config.server.max_channels);
        let node = Node::new(hub, broker, policies);
        Ok(Self::with_node(config, node)?)
    }

    /// A state on a node built elsewhere (another broker).
    pub fn with_node(config: Config, node: Arc<Node>) -> Result<Self, crate::config::ConfigError> {
        let auth = Auth::from_config(&config.auth)?;
        crate::pusher::webhook::check(&config.pusher)?;
        let config_rate = config.server.client_publish_rate;
        // Only a node with Pusher apps asks for the roster (the Redis one opens a connection).
        let roster: Arc<dyn tidings_core::Roster> = match node.broker.roster() {
            Some(r) if !config.pusher.apps.is_empty() => r,
            _ => Arc::new(tidings_core::LocalRoster::default()),
        };
        let pusher = Arc::new(tidings_pusher::Apps::new(&config.pusher, roster));
        let limits = ConnectionLimits::new(
            config.server.max_connections,
            config.server.max_connections_per_ip,
        );
        let access_log = match &config.server.access_log {
            Some(target) => {
                let json = config.server.log_format == crate::config::LogFormat::Json;
                let log = AccessLog::start(Target::parse(target), json).map_err(|e| {
                    crate::config::ConfigError::Invalid(format!(
                        "server.access_log: cannot open {e}"
                    ))
                })?;
                Some(Arc::new(log))
            }
            None => None,
        };
        Ok(Self(Arc::new(Shared {
            clock: tokio::time::Instant::now(),
            access_log,
            node,
            live: ArcSwap::from_pointee(Live { config, auth }),
            reloads: tokio::sync::watch::Sender::new(0),
            metrics: Arc::new(Metrics::default()),
            shutdown: CancellationToken::new(),
            shutdown_pass: std::sync::atomic::AtomicBool::new(false),
            polls_due: Arc::default(),
            draining: std::sync::atomic::AtomicBool::new(false),
            limits,
            publish_rates: Rates::new(config_rate),
            presence_rates: Rates::new(crate::app::channels::PRESENCE_READS_PER_SEC),
            pusher,
        })))
    }
}

/// Why `AppState::connect` could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Redis(#[from] tidings_redis::ConnectError),
    #[error("{0}")]
    Store(String),
}

/// What opening the data dir found: damage is a warning or an error in the log, never silent.
fn log_report(dir: &std::path::Path, report: &tidings_store::Report, channels: usize) {
    tracing::info!(
        dir = %dir.display(),
        segments = report.segments,
        records = report.records,
        bytes = report.bytes,
        channels,
        "data dir opened"
    );
    if let Some(t) = &report.torn {
        tracing::warn!(
            file = %t.file.display(),
            bytes_cut = t.bytes_cut,
            channels = %t.channels.join(", "),
            "data dir: cut {} bytes of a torn tail (a write cut short by a crash; never acknowledged) off {} (channels: {})",
            t.bytes_cut,
            t.file.display(),
            if t.channels.is_empty() { "unknown".to_owned() } else { t.channels.join(", ") }
        );
    }
    for d in &report.damaged {
        tracing::error!(
            file = %d.file.display(),
            at = d.at,
            bytes = d.bytes_skipped,
            "data dir: a damaged record at byte {} of {} ({} bytes) was skipped and is not served; readers across it get a gap",
            d.at,
            d.file.display(),
            d.bytes_skipped
        );
    }
}

impl Shared {
    /// Takes one client publish for `who` from `peer`: per token subject, else per address.
    pub fn may_publish(&self, who: &crate::auth::Principal, peer: std::net::IpAddr) -> bool {
        self.publish_rates.try_take(&rate_key(who, peer))
    }

    /// Takes one presence read for `who` from `peer` (API keys are exempt).
    pub fn may_read_presence(&self, who: &crate::auth::Principal, peer: std::net::IpAddr) -> bool {
        *who == crate::auth::Principal::ApiKey || self.presence_rates.try_take(&rate_key(who, peer))
    }
}

/// Whose bucket a client's request draws from: its token's subject, else its address.
fn rate_key(who: &crate::auth::Principal, peer: std::net::IpAddr) -> RateKey {
    match who {
        crate::auth::Principal::User(claims) => match &claims.sub {
            Some(sub) => RateKey::Subject(sub.clone()),
            None => RateKey::Ip(peer),
        },
        _ => RateKey::Ip(peer),
    }
}
