//! # Tidings Pusher
//!
//! The Pusher Channels protocol (version 7) and HTTP API for Tidings, so unmodified
//! pusher-js, Laravel Echo and Pusher server SDKs work against a Tidings server on the same
//! channels as Tidings' own transports (SPEC §13, docs/pusher.md).
//!
//! This crate is the protocol's logic only: no HTTP server, no Redis, no CLI. The server
//! (`tidings-server`, `src/pusher/`) owns the sockets and the routes and calls in here.
//!
//! ## Layout
//! - `config`: `[[pusher.apps]]` and its validation.
//! - `names`: Pusher channel and event names, their kinds, and the one-to-one mapping onto
//!   Tidings names (`pusher:ID:NAME`).
//! - `bridge`: a Pusher event as a Tidings publish and a Tidings message as a Pusher event.
//! - `protocol`: the WebSocket messages (parsed client frames, rendered server frames), close
//!   codes, socket ids.
//! - `sign`: HMAC-SHA256 channel auth, user sign-in and HTTP API request signatures
//!   (constant-time compares, the timestamp window, `body_md5`).
//! - `api`: the HTTP API's bodies, limits and answers.
//! - `registry`: the apps; this node's sockets and signed-in users; channels and presence
//!   members cluster-wide through a `tidings_core::Roster`; the broadcasts nodes exchange.
//! - `webhooks`: the bounded per-app queue of webhook events, their body, signature and
//!   retry schedule.

pub mod api;
pub mod bridge;
pub mod config;
pub mod names;
pub mod protocol;
pub mod registry;
pub mod sign;
pub mod webhooks;

pub use config::{AppConfig, PusherConfig};
pub use registry::{App, Apps, Socket};
