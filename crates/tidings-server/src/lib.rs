//! # Tidings server
//!
//! The HTTP edge over `tidings-core`: configuration, the publish and channel API, the
//! transports, metrics and the accept loop. A library so tests (and the CLI) can run a real
//! server on any listener: `serve(AppState::connect(config).await?, listener, shutdown)`
//! (`connect` builds the broker the config names: memory, or Redis via `tidings-redis`).
//!
//! ## Layout
//! - `config`: the TOML/env configuration and its validation; `config_keys` reads the keys'
//!   defaults and meanings for `config explain` and checks the docs against them.
//! - `server`: `AppState`, the accept loop (HTTP/1.1 + h2c), graceful shutdown.
//! - `lifecycle`: drain for rolling deploys (SIGTERM) and live reload (SIGHUP).
//! - `auth/`: API keys, JWTs, grants; the 400/401/403 mapping.
//! - `api/`: `app` (what every connection runs: CORS, the hot routes dispatched directly, the
//!   router for the rest), publishing, channel reads, health and metrics, `ApiError`.
//! - `transport/`: one file per transport (`sse`, `http_stream`, `long_poll`, `short_poll`),
//!   `stream.rs` for the lifecycle SSE and NDJSON share, `params.rs` for subscribe parameters.
//! - `metrics`: Prometheus counters and gauges.
//! - `assets`: the embedded web side (pages, demos, admin console, `/tidings.js`).
//! - `stats`: the server's own stats, published each second to `admin:stats` for `/admin`.
//! - `demo`: what `tidings serve --demo` publishes to `demo:` channels.
//! - `query`: query strings, decoded only where they need it.
//! - `wsframe`: RFC 6455 framing (the decoder and encoder WebSocket sessions run).

#[path = "app/mod.rs"]
pub mod api;
pub mod assets;
pub mod auth;
pub mod config;
pub mod config_keys;
#[path = "net/deadline.rs"]
pub mod deadline;
pub mod demo;
#[path = "net/h1.rs"]
pub mod h1;
pub mod lifecycle;
#[path = "net/limits.rs"]
pub mod limits;
pub mod metrics;
pub mod query;
#[path = "net/listener.rs"]
pub mod server;
pub mod stats;
pub mod tls;
pub mod transport;
#[path = "net/wsframe.rs"]
pub mod wsframe;

pub use config::{Config, ConfigError};
pub use server::{AppState, serve};
