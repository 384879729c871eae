//! Configuration: one TOML file, overridden by `TIDINGS_<TABLE>__<KEY>` environment
//! variables, overridden by flags (applied by the CLI on the loaded value).
//!
//! Every table denies unknown keys so a typo is an error that names the key, not a silently
//! ignored setting. Durations are human strings (`"15s"`); secrets are masked in `Debug`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use thiserror::Error;
use tidings_core::{ChannelPolicy, Policies, PublishPolicy, SubscribePolicy};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole configuration, as `tidings config default` prints it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub broker: BrokerConfig,
    pub auth: AuthConfig,
    pub channels: ChannelsConfig,
    pub namespaces: BTreeMap<String, NamespaceConfig>,
    /// `[[pusher.apps]]`: Pusher Channels apps (docs/pusher.md).
    pub pusher: tidings_pusher::PusherConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    pub tls_listen: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_self_signed: bool,
    pub insecure: bool,
    /// How log lines look (read by the CLI before the rest of the configuration).
    pub log_format: LogFormat,
    /// `"stderr"` or a file path: one line per request or stream (`app::access_log`).
    pub access_log: Option<String>,
    pub cors_origins: Vec<String>,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Channels the memory broker may hold at once; a publish that would create one more is
    /// refused (503 `too_many_channels`).
    pub max_channels: usize,
    pub max_message_bytes: usize,
    pub max_channels_per_subscription: usize,
    pub queue_max_bytes: usize,
    #[serde(deserialize_with = "duration")]
    pub heartbeat_interval: Duration,
    #[serde(deserialize_with = "duration")]
    pub long_poll_max_wait: Duration,
    /// WebSocket ping interval; a peer silent for two intervals is closed.
    #[serde(deserialize_with = "duration")]
    pub ping_interval: Duration,
    /// A `/ws` connection with no subscription that sends nothing this long is closed.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// A client must send a request's headers within this (slowloris).
    #[serde(deserialize_with = "duration")]
    pub request_header_timeout: Duration,
    /// ... and its body within this (408 otherwise).
    #[serde(deserialize_with = "duration")]
    pub request_body_timeout: Duration,
    /// A connection whose writes make no progress this long (the client stopped reading) is
    /// closed and its memory freed, on every transport and protocol.
    #[serde(deserialize_with = "duration")]
    pub write_timeout: Duration,
    /// Concurrent streams one HTTP/2 connection may open; each also counts against
    /// `max_connections` and `max_connections_per_ip` while it is open.
    pub max_streams_per_connection: u32,
    /// Publishes per second one client may make (HTTP or WebSocket, all its connections
    /// together: per token `sub`, else per IP address) once `[auth]` is on; API keys are
    /// exempt, and open mode (development) is not limited. Bursts up to the same number.
    /// 0 = unlimited.
    pub client_publish_rate: u32,
    /// After SIGTERM/SIGINT, how long `/readyz` answers 503 while everything else keeps
    /// working, so a load balancer stops sending new clients before streams are ended.
    #[serde(deserialize_with = "duration")]
    pub drain_grace: Duration,
    /// The window over which the clients of a node that shuts down are told to come back:
    /// each gets its own `reconnect_after_ms`, drawn uniformly from it.
    #[serde(deserialize_with = "duration")]
    pub reconnect_spread: Duration,
    /// A directory served at `/` beside the API (the API's paths win over its files, its
    /// files over the built-in pages). Needs a restart.
    pub static_dir: Option<PathBuf>,
    /// `Cache-Control` on the files of `static_dir`.
    pub static_cache_control: String,
    /// What an HTML page's stylesheets and scripts get sent ahead as (`pages`).
    pub push: PushMode,
    /// At most this many of a page's subresources are hinted or pushed.
    pub push_max_assets: usize,
    /// At most this many bytes are pushed for one page.
    pub push_max_bytes: u64,
    /// Tasks each runtime worker runs between two looks at which sockets became ready
    /// (tokio's `event_interval`; read by the CLI when it builds the runtime). Lower reads a
    /// publisher sooner when the server is overloaded by re-arriving long polls, at an
    /// `epoll_wait` per task run (docs/benchmarks.md, issue 17, session 11). Needs a restart.
    pub runtime_event_interval: u32,
}

/// tokio's own `event_interval`: `[server] runtime_event_interval`'s default.
pub const DEFAULT_EVENT_INTERVAL: u32 = 61;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_self_signed: false,
            insecure: false,
            log_format: LogFormat::Auto,
            access_log: None,
            cors_origins: Vec::new(),
            max_connections: 100_000,
            max_connections_per_ip: 0,
            max_channels: 1_000_000,
            max_message_bytes: 65_536,
            max_channels_per_subscription: 64,
            queue_max_bytes: 1_048_576,
            heartbeat_interval: Duration::from_secs(15),
            long_poll_max_wait: Duration::from_secs(60),
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(300),
            request_header_timeout: Duration::from_secs(10),
            request_body_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            max_streams_per_connection: 100,
            client_publish_rate: 50,
            drain_grace: Duration::from_secs(5),
            reconnect_spread: Duration::from_secs(10),
            static_dir: None,
            static_cache_control: "no-cache".into(),
            push: PushMode::Auto,
            push_max_assets: 32,
            push_max_bytes: 1_048_576,
            runtime_event_interval: DEFAULT_EVENT_INTERVAL,
        }
    }
}

/// `[server] push`: how a page's subresources are sent ahead (SPEC §13).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PushMode {
    /// HTTP/2 push to a client that enabled it, `103 Early Hints` (and `Link`) to every client.
    #[default]
    Auto,
    /// `103 Early Hints` and `Link` only, never a push.
    Hints,
    /// Neither.
    Off,
}

/// `[server] log_format`: see the CLI's `logging` module for what each one writes.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Plain lines without timestamps under systemd (journald adds them), else `Text`.
    #[default]
    Auto,
    /// Timestamped lines; colours only on a terminal.
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The value of `TIDINGS_LOG_FORMAT`, case-insensitive; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(Self::Auto),
            "text" => Some(Self::Text),
            "json" => Some(Self::Json),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// `memory`, a `redis://` / `rediss://` URL, or comma-separated Redis Cluster seeds.
    pub url: String,
    /// Keeps history, offsets and epochs on disk (memory broker only).
    pub data_dir: Option<PathBuf>,
    /// When a publish is on disk before it is answered (with `data_dir`).
    pub fsync: tidings_core::Fsync,
    /// With `data_dir`: the most recent messages per channel kept in RAM (older ones are read
    /// from disk).
    pub history_cache: usize,
    pub prefix: String,
    /// PEM CA for a `rediss://` server whose certificate a private CA signed.
    pub tls_ca_file: Option<PathBuf>,
    /// How long a publish's `Idempotency-Key` is remembered per channel.
    #[serde(deserialize_with = "duration")]
    pub idempotency_window: Duration,
}

impl BrokerConfig {
    /// `url` with any password shown as `****`, for output and logs.
    pub fn masked_url(&self) -> String {
        tidings_redis::masked_url(&self.url)
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            url: "memory".into(),
            data_dir: None,
            fsync: tidings_core::Fsync::Batch,
            history_cache: tidings_core::broker::memory::DEFAULT_HISTORY_CACHE,
            prefix: "tidings".into(),
            tls_ca_file: None,
            idempotency_window: tidings_core::idempotency::DEFAULT_IDEMPOTENCY_WINDOW,
        }
    }
}

/// A secret that never shows in logs or `Debug` output.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"****\"")
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub api_keys: Vec<Secret>,
    pub jwt_secret: Option<Secret>,
    pub jwt_public_key_file: Option<PathBuf>,
}

impl AuthConfig {
    /// SPEC §12: auth is on when at least one credential source is configured.
    pub fn enabled(&self) -> bool {
        !self.api_keys.is_empty() || self.jwt_secret.is_some() || self.jwt_public_key_file.is_some()
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SubscribeSetting {
    Anyone,
    Token,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PublishSetting {
    Anyone,
    Token,
    Server,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChannelsConfig {
    pub history_size: usize,
    #[serde(deserialize_with = "duration")]
    pub history_ttl: Duration,
    pub subscribe: Option<SubscribeSetting>,
    pub publish: Option<PublishSetting>,
    pub presence: bool,
    pub join_leave: bool,
}

impl Default for ChannelsConfig {
    fn default() -> Self {
        Self {
            history_size: 100,
            history_ttl: Duration::from_secs(600),
            subscribe: None,
            publish: None,
            presence: false,
            join_leave: false,
        }
    }
}

/// `[namespaces.NAME]`: any `[channels]` key, overriding it for channels named `NAME:…`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NamespaceConfig {
    pub history_size: Option<usize>,
    #[serde(deserialize_with = "opt_duration")]
    pub history_ttl: Option<Duration>,
    pub subscribe: Option<SubscribeSetting>,
    pub publish: Option<PublishSetting>,
    pub presence: Option<bool>,
    pub join_leave: Option<bool>,
}

/// Upper bound on `drain_grace` and `reconnect_spread`.
pub const MAX_DRAIN: Duration = Duration::from_secs(600);

/// Upper bound on retained messages per channel, so one setting cannot exhaust memory silently.
pub const MAX_HISTORY_SIZE: usize = 1_000_000;

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    s.map(|s| parse_duration(&s).map_err(serde::de::Error::custom))
        .transpose()
}

/// Parses `"15s"`, `"10m"`, `"1h 30m"`, `"250ms"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("invalid duration {s:?} ({e}); write it like \"15s\", \"10m\" or \"250ms\"")
    })
}

impl Config {
    /// Loads `path` (or the defaults when `None`), then applies `TIDINGS_*__*` variables from
    /// `env`, then validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (mut table, origin) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?;
                let table = text
                    .parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse {
                        origin: p.display().to_string(),
                        message: e.to_string(),
                    })?;
                (table, p.display().to_string())
            }
            None => (toml::Table::new(), "defaults".to_owned()),
        };
        let overridden = apply_env(&mut table, env)?;
        let origin = if overridden.is_empty() {
            origin
        } else {
            format!("{origin} with {}", overridden.join(", "))
        };
        let config =
            Config::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::Parse {
                origin,
                message: e.to_string().trim().to_owned(),
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML text (used by tests and `config check`).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: "config".into(),
            message: e.to_string().trim().to_owned(),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let b = &self.broker;
        if b.url != "memory" && !tidings_redis::is_redis_broker_url(&b.url) {
            return invalid(format!(
                "broker.url = {:?}: use \"memory\", a redis://, rediss:// or redis+sentinel:// URL, or comma-separated Redis Cluster URLs",
                tidings_redis::masked_url(&b.url)
            ));
        }
        if let Err(e) = self.pusher.validate() {
            return invalid(e);
        }
        if let Err(e) = tidings_redis::validate_prefix(&b.prefix) {
            return invalid(e);
        }
        if b.history_cache > 100_000 {
            return invalid(format!(
                "broker.history_cache = {}: at most 100000 messages per channel (16 by default)",
                b.history_cache
            ));
        }
        if b.idempotency_window.is_zero() || b.idempotency_window > Duration::from_secs(86_400) {
            return invalid(
                "broker.idempotency_window must be between 1ms and 24h (\"2m\" by default)".into(),
            );
        }
        if parse_listen(&s.listen).is_none() {
            return invalid(format!(
                "server.listen = {:?} is not an address like \"127.0.0.1:8080\"",
                s.listen
            ));
        }
        if s.max_message_bytes == 0 || s.max_message_bytes > 64 << 20 {
            return invalid("server.max_message_bytes must be between 1 and 67108864".into());
        }
        if s.max_channels == 0 {
            return invalid("server.max_channels must be at least 1".into());
        }
        if s.max_channels_per_subscription == 0 {
            return invalid("server.max_channels_per_subscription must be at least 1".into());
        }
        if s.queue_max_bytes < 1024 {
            return invalid("server.queue_max_bytes must be at least 1024".into());
        }
        if s.heartbeat_interval < Duration::from_millis(100) {
            return invalid("server.heartbeat_interval must be at least 100ms".into());
        }
        if s.ping_interval < Duration::from_millis(100) {
            return invalid("server.ping_interval must be at least 100ms".into());
        }
        if s.drain_grace > MAX_DRAIN {
            return invalid(format!(
                "server.drain_grace is capped at {}s: a node that drains longer holds a deploy back",
                MAX_DRAIN.as_secs()
            ));
        }
        if s.reconnect_spread > MAX_DRAIN {
            return invalid(format!(
                "server.reconnect_spread is capped at {}s",
                MAX_DRAIN.as_secs()
            ));
        }
        if s.write_timeout < Duration::from_millis(100) {
            return invalid("server.write_timeout must be at least 100ms".into());
        }
        if let Some(dir) = &s.static_dir
            && !dir.is_dir()
        {
            return invalid(format!(
                "server.static_dir = {:?}: not a directory",
                dir.display().to_string()
            ));
        }
        if http::HeaderValue::from_str(&s.static_cache_control).is_err() {
            return invalid("server.static_cache_control is not a valid header value".into());
        }
        if s.max_streams_per_connection == 0 {
            return invalid("server.max_streams_per_connection must be at least 1".into());
        }
        if s.runtime_event_interval == 0 {
            return invalid("server.runtime_event_interval must be at least 1".into());
        }
        if self.channels.history_size > MAX_HISTORY_SIZE
            || self
                .namespaces
                .values()
                .any(|n| n.history_size.is_some_and(|h| h > MAX_HISTORY_SIZE))
        {
            return invalid(format!("history_size is capped at {MAX_HISTORY_SIZE}"));
        }
        // Without [auth] no token can ever be presented: such a channel could not be followed.
        if !self.auth.enabled() {
            let needs_token = self.channels.subscribe == Some(SubscribeSetting::Token)
                || self
                    .namespaces
                    .values()
                    .any(|n| n.subscribe == Some(SubscribeSetting::Token));
            if needs_token {
                return invalid(
                    "subscribe = \"token\" needs [auth] (api_keys, jwt_secret or jwt_public_key_file); \
                     without it nobody could subscribe"
                        .into(),
                );
            }
        }
        for name in self.namespaces.keys() {
            let ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.@=-".contains(&b));
            if !ok {
                return invalid(format!(
                    "namespaces.{name:?}: a namespace is a channel name part before ':' (A-Z a-z 0-9 _ . @ = -)"
                ));
            }
        }
        Ok(())
    }

    /// Channel policies with `[auth]`-dependent defaults resolved (SPEC §10).
    pub fn policies(&self) -> Policies {
        let auth = self.auth.enabled();
        let c = &self.channels;
        let subscribe = c.subscribe.unwrap_or(if auth {
            SubscribeSetting::Token
        } else {
            SubscribeSetting::Anyone
        });
        let publish = c.publish.unwrap_or(if auth {
            PublishSetting::Token
        } else {
            PublishSetting::Anyone
        });
        let default = ChannelPolicy {
            history_size: c.history_size,
            history_ttl: c.history_ttl,
            subscribe: subscribe.into(),
            publish: publish.into(),
            presence: c.presence,
            join_leave: c.join_leave,
        };
        let namespaces = self
            .namespaces
            .iter()
            .map(|(name, n)| {
                let p = ChannelPolicy {
                    history_size: n.history_size.unwrap_or(default.history_size),
                    history_ttl: n.history_ttl.unwrap_or(default.history_ttl),
                    subscribe: n.subscribe.map_or(default.subscribe, Into::into),
                    publish: n.publish.map_or(default.publish, Into::into),
                    presence: n.presence.unwrap_or(default.presence),
                    join_leave: n.join_leave.unwrap_or(default.join_leave),
                };
                (name.clone(), p)
            })
            .collect();
        Policies {
            default,
            namespaces,
        }
    }
}

pub fn parse_listen(s: &str) -> Option<SocketAddr> {
    if let Ok(a) = s.parse() {
        return Some(a);
    }
    // `localhost:PORT` is common in docs and muscle memory.
    let port = s.strip_prefix("localhost:")?.parse().ok()?;
    Some(SocketAddr::from(([127, 0, 0, 1], port)))
}

impl From<SubscribeSetting> for SubscribePolicy {
    fn from(s: SubscribeSetting) -> Self {
        match s {
            SubscribeSetting::Anyone => SubscribePolicy::Anyone,
            SubscribeSetting::Token => SubscribePolicy::Token,
        }
    }
}

impl From<PublishSetting> for PublishPolicy {
    fn from(s: PublishSetting) -> Self {
        match s {
            PublishSetting::Anyone => PublishPolicy::Anyone,
            PublishSetting::Token => PublishPolicy::Token,
            PublishSetting::Server => PublishPolicy::Server,
        }
    }
}

/// Applies `TIDINGS_<TABLE>__<KEY>=value` (value parsed as TOML when it is valid TOML, else a
/// string). Returns the variables applied, for error messages.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>, ConfigError> {
    let mut applied = Vec::new();
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("TIDINGS_") && k.contains("__"))
        .collect();
    vars.sort();
    for (key, raw) in vars {
        let path: Vec<String> = key["TIDINGS_".len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if path.iter().any(String::is_empty) || path.len() > 3 {
            return Err(ConfigError::Invalid(format!(
                "environment variable {key}: expected TIDINGS_<TABLE>__<KEY>"
            )));
        }
        let value = format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        let (last, parents) = path.split_last().ok_or_else(|| {
            ConfigError::Invalid(format!("environment variable {key}: empty key"))
        })?;
        let mut t = &mut *table;
        for p in parents {
            let entry = t
                .entry(p.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            t = entry.as_table_mut().ok_or_else(|| {
                ConfigError::Invalid(format!("environment variable {key}: {p} is not a table"))
            })?;
        }
        t.insert(last.clone(), value);
        applied.push(key);
    }
    Ok(applied)
}

/// What `tidings config default` prints: every key with its default and a comment.
pub const DEFAULT_TOML: &str = r#"# Tidings configuration. Every key is optional; shown here with its default.
# Environment variables override keys as TIDINGS_<TABLE>__<KEY> (e.g. TIDINGS_SERVER__LISTEN);
# command-line flags override both. Durations are strings like "15s", "10m", "250ms".

[server]
listen = "127.0.0.1:8080"          # plain HTTP/1.1 + h2c
# tls_listen = "0.0.0.0:8443"      # TLS port (ALPN h2, http/1.1), in addition to `listen`
# tls_cert = "cert.pem"            # with tls_key; or tls_self_signed = true
# tls_key = "key.pem"              # the certificate's private key (PEM)
tls_self_signed = false            # TLS with a certificate generated at start (development)
insecure = false                   # allow open mode on a non-loopback address
log_format = "auto"                # "auto" (plain under systemd, else text) | "text" | "json"; or TIDINGS_LOG_FORMAT
# access_log = "stderr"            # one line per request or stream: "stderr" or a file path; off when unset
cors_origins = []                  # CORS + WebSocket Origin allow-list; empty = any origin in open mode, none otherwise
max_connections = 100000
max_connections_per_ip = 0         # 0 = unlimited
max_channels = 1000000             # channels held at once (memory broker); a publish creating one more answers 503
max_message_bytes = 65536          # larger publishes answer 413
max_channels_per_subscription = 64 # more channels in one subscribe request answer 400
queue_max_bytes = 1048576          # per connection, then disconnect "slow"
heartbeat_interval = "15s"         # SSE comment / empty NDJSON line when idle
long_poll_max_wait = "60s"         # a larger ?wait= is held this long (Preference-Applied says so)
ping_interval = "25s"              # WebSocket pings; a peer silent for two intervals is closed
idle_timeout = "5m"                # a /ws connection with no subscription and no frames is closed
request_header_timeout = "10s"     # a client must send its request headers within this (slowloris)
request_body_timeout = "10s"       # ... and the body within this, else 408
write_timeout = "30s"              # a connection whose writes make no progress this long is closed
max_streams_per_connection = 100   # concurrent HTTP/2 streams per connection (each counts as a connection)
client_publish_rate = 50           # publishes/s per client (token sub, else IP) with [auth] (API keys exempt); 0 = unlimited
drain_grace = "5s"                 # on SIGTERM: /readyz answers 503 this long while all else keeps working
reconnect_spread = "10s"           # then clients are told to reconnect, each after its own delay within this
# static_dir = "./public"          # serve this directory at / beside the API (the API's paths win)
static_cache_control = "no-cache"  # Cache-Control on static_dir's files
push = "auto"                      # a page's CSS/JS: "auto" (HTTP/2 push where the client allows it,
                                   # 103 Early Hints for all), "hints" (103 only) or "off"
push_max_assets = 32               # at most this many of a page's assets hinted or pushed
push_max_bytes = 1048576           # at most this many bytes pushed per page
runtime_event_interval = 61        # tasks run between looks for ready sockets; 1 = a publisher read sooner
                                   # under long-poll overload, at more epoll_wait calls (restart)

[broker]
url = "memory"                     # or redis://[user:password@]host:port/db, rediss://… (TLS);
                                   # comma-separated URLs = seed nodes of a Redis Cluster
                                   # redis+sentinel://host:port,host:port/MASTER = behind Sentinel
# data_dir = "/var/lib/tidings"    # durable history with the memory broker
fsync = "batch"                    # with data_dir: "always" (an fsync per publish), "batch"
                                   # (publishes arriving together share one fsync) or "never"
                                   # (the OS decides); always/batch answer after the fsync
history_cache = 16                 # with data_dir: recent messages per channel kept in RAM; older from disk
prefix = "tidings"                 # Redis key prefix (deployments sharing one Redis use different ones)
# tls_ca_file = "redis-ca.pem"     # CA of a rediss:// server whose certificate a private CA signed
idempotency_window = "2m"          # a publish retried with the same Idempotency-Key within this is not stored twice

[auth]                             # absent or empty = open mode
# api_keys = ["…"]
# jwt_secret = "…"                 # HS256
# jwt_public_key_file = "key.pem"  # RS256 or ES256, chosen by the key

[channels]                         # defaults for every namespace
history_size = 100                 # messages kept per channel for resume (0 = none)
history_ttl = "10m"                # how long a message stays in history
# subscribe = "anyone"             # "anyone" | "token"      (default "anyone"; with [auth]: "token")
# publish = "anyone"               # "anyone" | "token" | "server"   (default "anyone"; with [auth]: "token")
presence = false
join_leave = false

# [[pusher.apps]]                  # a Pusher Channels app (docs/pusher.md); none by default
# id = "1001"                      # digits: several Pusher server SDKs refuse other app ids
# key = "app-key"                  # what pusher-js connects with: ws://host/app/KEY
# secret = "app-secret"            # signs channel auth, HTTP API requests and webhooks
# client_events = false            # relay client-* events on private and presence channels
# max_connections = 0              # open Pusher connections for this app; 0 = no own limit
# max_event_bytes = 10240          # largest event data (HTTP API and client events)
# webhook_url = "http://127.0.0.1:9000/pusher/webhook"   # or https://
# webhook_ca_file = "hooks-ca.pem" # trusted for an https:// webhook_url besides the system's CAs

# [namespaces.chat]                # overrides for channels named chat:…
# history_size = 500
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_default_parses_to_the_built_in_defaults() {
        let c = Config::from_toml(DEFAULT_TOML).unwrap();
        let d = Config::default();
        assert_eq!(c.server.listen, d.server.listen);
        assert_eq!(c.server.max_message_bytes, 65_536);
        assert_eq!(c.server.heartbeat_interval, Duration::from_secs(15));
        assert_eq!(c.channels.history_ttl, Duration::from_secs(600));
        assert_eq!(c.broker.url, "memory");
        assert!(!c.auth.enabled());
        assert_eq!(c.server.drain_grace, Duration::from_secs(5));
        assert_eq!(c.server.reconnect_spread, Duration::from_secs(10));
    }

    #[test]
    fn an_unknown_key_is_an_error_that_names_it() {
        let e = Config::from_toml("[server]\nlisten_port = 1\n").unwrap_err();
        assert!(e.to_string().contains("listen_port"), "{e}");
        let e = Config::from_toml("[bogus]\n").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn environment_variables_override_the_file_and_are_typed() {
        let env = vec![
            (
                "TIDINGS_SERVER__LISTEN".to_owned(),
                "127.0.0.1:9999".to_owned(),
            ),
            (
                "TIDINGS_SERVER__MAX_MESSAGE_BYTES".to_owned(),
                "1024".to_owned(),
            ),
            (
                "TIDINGS_NAMESPACES__CHAT__HISTORY_SIZE".to_owned(),
                "7".to_owned(),
            ),
            ("UNRELATED".to_owned(), "x".to_owned()),
        ];
        let c = Config::load(None, env).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:9999");
        assert_eq!(c.server.max_message_bytes, 1024);
        assert_eq!(c.namespaces["chat"].history_size, Some(7));
        let e = Config::load(None, vec![("TIDINGS_SERVER__NOPE".into(), "1".into())]).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        assert!(Config::from_toml("[server]\nheartbeat_interval = \"soon\"\n").is_err());
        assert!(Config::from_toml("[server]\nlisten = \"nowhere\"\n").is_err());
        assert!(Config::from_toml("[server]\nmax_message_bytes = 0\n").is_err());
        assert!(Config::from_toml("[namespaces.\"a:b\"]\n").is_err());
        let e = Config::from_toml("[server]\ndrain_grace = \"1h\"\n").unwrap_err();
        assert!(e.to_string().contains("drain_grace"), "{e}");
        assert!(Config::from_toml("[server]\nreconnect_spread = \"soon\"\n").is_err());
        assert!(Config::from_toml("[server]\ndrain_grace = \"0s\"\n").is_ok());
        let e = Config::from_toml("[server]\nruntime_event_interval = 0\n").unwrap_err();
        assert!(e.to_string().contains("runtime_event_interval"), "{e}");
        let c = Config::from_toml("[server]\nruntime_event_interval = 1\n").unwrap();
        assert_eq!(c.server.runtime_event_interval, 1);
    }

    #[test]
    fn namespace_overrides_resolve_onto_the_channel_defaults() {
        let c = Config::from_toml(
            "[channels]\nhistory_size = 5\n[namespaces.chat]\nhistory_ttl = \"1m\"\n",
        )
        .unwrap();
        let p = c.policies();
        let chat = p.for_channel(&tidings_core::ChannelName::new("chat:x").unwrap());
        assert_eq!(
            (chat.history_size, chat.history_ttl),
            (5, Duration::from_secs(60))
        );
        assert_eq!(chat.publish, PublishPolicy::Anyone);
    }

    #[test]
    fn the_broker_is_memory_or_redis_urls_and_a_bad_one_is_refused_without_its_password() {
        for ok in [
            "memory",
            "redis://127.0.0.1:6379/0",
            "rediss://user:pw@redis.internal",
            "redis://a:7000,redis://b:7001",
        ] {
            let c = Config::from_toml(&format!("[broker]\nurl = {ok:?}\n"));
            assert!(c.is_ok(), "{ok}: {c:?}");
        }
        let e = Config::from_toml("[broker]\nurl = \"redis://a:7000,http://:hunter2@b\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("broker.url") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn secrets_are_masked_in_debug_output() {
        let c =
            Config::from_toml("[auth]\njwt_secret = \"hunter2\"\napi_keys = [\"k1\"]\n").unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("k1"), "{dbg}");
        assert!(c.auth.enabled());
        assert_eq!(c.policies().default.publish, PublishPolicy::Token);
    }
}
