//! The application layer: what the server answers. It sits on the protocol layer (`net/`)
//! and reaches it through one door: `service::App` implements `net::Service`, and `serve`
//! hands it to `net::listener`.
//!
//! - `routes`: **the** route table, for every path a request arrives by;
//! - `service`: `App`, CORS around the table, the direct calls of the rows marked for it;
//! - `publish`, `channels`, `health`: the HTTP API besides the transports (`transport/`);
//! - `cors`: the Origin policy; `error`: `ApiError`, the one error answer;
//! - `pages`: the route table's fallback — the files of `--static DIR`, then the built-in
//!   pages — and what a page's subresources are sent ahead as (`Link`, `net::push::Preload`).

pub mod access_log;
pub mod channels;
pub mod cors;
pub mod error;
pub mod health;
pub mod pages;
#[cfg(test)]
mod parked;
pub mod publish;
pub mod routes;
pub mod service;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::state::AppState;

/// Serves plain HTTP (HTTP/1.1 + h2c) until `shutdown` resolves, then drains.
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve_all(state, listener, None, shutdown).await
}

/// Serves the plain listener and, when given, a TLS one (ALPN h2 / http/1.1) until
/// `shutdown` resolves, then drains (`net::listener` has the details).
pub async fn serve_all(
    state: AppState,
    listener: TcpListener,
    tls: Option<(TcpListener, crate::net::tls::Acceptor)>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let app = Arc::new(service::App::new(state.clone()));
    // The admin console's feed; ends with `state.shutdown`.
    // Pusher webhooks: one sender per app with a webhook_url; they end with `state.shutdown`.
    crate::pusher::webhook::spawn_all(&state);
    // Pusher across nodes: member broadcasts and the dead-node reaper (`state.shutdown`).
    crate::pusher::cluster::spawn(&state);
    tokio::spawn(crate::stats::run(state));
    crate::net::listener::serve(app, listener, tls, shutdown).await
}
