//! # Tidings server
//!
//! The HTTP edge over `tidings-core`: configuration, the publish and channel API, the
//! transports, metrics and the accept loop. A library so tests (and the CLI) can run a real
//! server on any listener: `serve(AppState::connect(config).await?, listener, shutdown)`
//! (`connect` builds the broker the config names: memory, or Redis via `tidings-redis`).
//!
//! ## Layout: two layers, arrows pointing down
//! ```text
//!   application   app/ (routes, service, publish, channels, health, cors, error, pages)
//!                 transport/  auth/  lifecycle  stats  demo  assets  tls
//!        │        state (AppState)  metrics  rates  config  config_keys  query
//!        ▼
//!   protocol      net/ (listener, h1, upgrade, wsframe, deadline, limits, push)
//! ```
//! The protocol layer (`net/`) turns bytes into requests and responses into bytes and knows
//! no route: it calls the application through one interface, `net::Service`, which
//! `app::service::App` implements. `tests/layers.rs` fails when a file under `net/` names a
//! module outside it.
//!
//! Where things go:
//! - **a new route**: one line in `app/routes.rs` (`table()`), its handler in the module that
//!   owns it (`app/`, `transport/`, or a new file for a new protocol); a catch-all for paths
//!   no row matches replaces `routes::fallback`.
//! - **a new transport**: a file in `transport/`, its rows in the table.
//! - **something every connection does** (a deadline, a limit, a new wire protocol under
//!   HTTP): `net/`, taking what it needs from `net::Service` (never from `AppState`).
//! - **something every handler shares**: a field of `state::Shared`.
//!
//! ## Modules
//! - `net/`: the protocol layer. `listener` (accept loop, TLS handshake, hyper for HTTP/1.1
//!   bodies and HTTP/1.0, kill grace, graceful shutdown), `h1` (the lean HTTP/1.1 path),
//!   `http2` (our HTTP/2 driver for h2 and h2c: push, 103), `upgrade` (a
//!   socket handed to a session), `wsframe` (RFC 6455 framing), `deadline` (the write
//!   deadline), `limits` (connection admission), `push` (what a page's response asks the
//!   connection to send ahead: `103 Early Hints`, HTTP/2 pushes).
//! - `app/`: `routes` (the one route table), `service` (`App`: CORS, direct calls, the
//!   router), `publish`, `channels`, `health` (health and metrics), `cors`, `error`
//!   (`ApiError`), `pages` (`static_dir` and the built-in pages, the table's fallback; finds
//!   a page's subresources). `app::serve_all` starts a server.
//! - `transport/`: one file per transport (`sse`, `http_stream`, `long_poll`, `short_poll`,
//!   `websocket`), `stream.rs` for the lifecycle SSE and NDJSON share, `params.rs` for
//!   subscribe parameters.
//! - `state`: `AppState`, what every handler shares (node, live config and auth, metrics,
//!   rates, shutdown).
//! - `config`: the TOML/env configuration and its validation; `config_keys` reads the keys'
//!   defaults and meanings for `config explain` and checks the docs against them.
//! - `auth/`: API keys, JWTs, grants; the 400/401/403 mapping.
//! - `lifecycle`: drain for rolling deploys (SIGTERM) and live reload (SIGHUP).
//! - `metrics`: Prometheus counters and gauges. `rates`: client rates per identity.
//! - `tls`: the TLS settings built from the config (connections run on them in `net::tls`).
//! - `assets`: the embedded web side (pages, demos, admin console, `/tidings.js`).
//! - `stats`: the server's own stats, published each second to `admin:stats` for `/admin`.
//! - `demo`: what `tidings serve --demo` publishes to `demo:` channels.
//! - `query`: query strings, decoded only where they need it.
//! - `pusher/`: the Pusher Channels protocol (a protocol beside the transports, under the
//!   application): `/app/{key}` sessions, the `/apps/{id}` HTTP API, the webhook sender,
//!   over the `tidings-pusher` crate.
//! - `fuzzing` (hidden): the entry points the fuzz targets in `fuzz/` call.

pub mod app;
pub mod assets;
pub mod auth;
pub mod config;
pub mod config_keys;
pub mod demo;
#[doc(hidden)]
pub mod fuzzing;
pub mod lifecycle;
pub mod metrics;
pub mod net;
pub mod pusher;
pub mod query;
pub mod rates;
pub mod state;
pub mod stats;
pub mod tls;
pub mod transport;

pub use app::{serve, serve_all};
pub use config::{Config, ConfigError};
pub use state::AppState;
