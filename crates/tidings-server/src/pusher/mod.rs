//! The Pusher Channels protocol's glue (SPEC §13, docs/pusher.md): the protocol's logic is
//! the `tidings-pusher` crate; this module owns the sockets and the routes.
//!
//! - `session`: `GET /app/{key}?protocol=7`, one WebSocket session per connection, on the
//!   same hub as Tidings' own transports (a Pusher channel `NAME` is `pusher:ID:NAME`).
//! - `http`: the signed HTTP API under `/apps/{id}/…`.
//! - `webhook`: one sender task per app with a `webhook_url`.
//! - `cluster`: the roster's broadcasts handed to this node's hub, and dead nodes reaped.
//!
//! The routes are rows of the one route table (`app/routes.rs`). With no `[[pusher.apps]]`
//! they still exist and answer as for an unknown app
//! (close 4001 / 404): nothing else changes.

pub mod cluster;
pub mod http;
pub mod session;
pub mod webhook;
