//! The protocol layer: bytes in, requests out, responses back to bytes. It accepts
//! connections (plaintext and TLS), enforces the connection limits and deadlines, speaks
//! HTTP/1.1 itself on the lean path (`h1`) and HTTP/2 (h2, h2c) on the `h2` crate (`http2`:
//! server push and 103s, which hyper cannot send), hands the rest to hyper (chunked bodies,
//! HTTP/1.0), frames WebSocket traffic (`wsframe`) and runs graceful shutdown (`listener`).
//!
//! It knows nothing of routes, handlers, transports, auth or `AppState`: everything above
//! it is reached through one interface, [`Service`]. `tests/layers.rs` checks that no file
//! under `net/` names a module outside it, so an arrow pointing up fails the build's tests.
//!
//! ## Why a trait, not a struct of function pointers
//! The service is called once per request on the hottest path there is. A trait lets the
//! accept loop be generic over it: the call is static, the request future is stored inline
//! in the connection's (already boxed) exchange future, and a long poll's deferred answer
//! (`Service::Later`) is a concrete type. Function pointers would have to return boxed
//! futures — an allocation per request, which issue 17 is removing, not adding. There is
//! one implementation (`app::service::App`); tests of this layer can supply their own.
//!
//! ## What the layer gives the service, and takes from it
//! - in: a `Request<Body>` whose extensions may carry [`upgrade::Upgradable`] (this
//!   connection can hand its socket to a session), plus the connection's [`ConnectionCtx`];
//!   or, from the lean HTTP/1.1 path, a [`LeanRequest`] (`request.rs`: slices of the read
//!   buffer, no `HeaderMap`), which the service reads through [`Headers`] or turns into the
//!   same `Request<Body>`;
//! - out: a response or a lean [`Reply`] (`reply.rs`: the hot routes' answers, written by
//!   `h1` without a `Response`), or [`Handled::Later`] (answered when its future resolves, while the
//!   lean path watches the socket for the client hanging up); an answer whose extensions
//!   carry an [`upgrade::Pending`] session hands it the socket once it is written;
//! - settings, limits, the shutdown signal and the connection gauges come from the service
//!   too (`Service::settings` is read per connection, so a reload applies to new ones).

pub mod deadline;
pub mod h1;
pub mod held;
pub mod http2;
pub mod kill;
pub mod limits;
pub mod listener;
pub mod pool;
pub mod push;
pub mod reply;
pub mod request;
pub mod tls;
pub mod upgrade;
pub mod wsframe;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http::{Request, Response};
use tokio_util::sync::CancellationToken;

pub use listener::{SHUTDOWN_GRACE, serve};
pub use reply::{Answer, Reply};
pub use request::{Headers, LeanRequest};

/// The one interface the protocol layer calls; the application implements it.
pub trait Service: Send + Sync + 'static {
    /// An answer still to come (a long poll): resolves to the finished answer. `Unpin`: the
    /// lean path waits on it in place, where a parked connection's task keeps it once.
    type Later: Future<Output = Answer> + Send + Unpin + Hold + 'static;

    /// Answers `req`, which came over `conn`.
    fn call(
        &self,
        req: Request<Body>,
        conn: &ConnectionCtx,
    ) -> impl Future<Output = Handled<Self::Later>> + Send;

    /// Answers a plain request the lean HTTP/1.1 path parsed, which borrows the
    /// connection's read buffer until the answer (or its `Later`) is returned.
    fn call_lean<'a>(
        &'a self,
        req: LeanRequest<'a>,
        conn: &'a ConnectionCtx,
    ) -> impl Future<Output = Handled<Self::Later>> + Send + 'a;

    /// The connection settings in force (read once per connection).
    fn settings(&self) -> Settings;

    /// Admission control for connections and HTTP/2 streams.
    fn limits(&self) -> &Arc<limits::ConnectionLimits>;

    /// Cancelled when the server shuts down. The listener cancels it once it stops
    /// accepting (open streams then say goodbye); the lean path stops waiting for requests.
    fn shutdown(&self) -> &CancellationToken;

    /// A TCP connection was accepted (`true`) or ended (`false`): for the gauges.
    fn connection(&self, open: bool);
}

/// What `Service::call` answers.
// A `Reply` (504 bytes) lives briefly, on its way to being written; boxing it would
// be the allocation per answer that it exists to save.
#[allow(clippy::large_enum_variant)]
/// A long poll's answer-to-come that can be answered from the publishing side: the lean
/// path lends it the connection's socket while it waits (`held`).
pub trait Hold {
    /// Where to lend the socket; `None` when this answer must be written by the
    /// connection's task.
    fn held(&self) -> Option<&held::HeldSocket>;
}

// An answer (a `Reply`, ~500 bytes) lives briefly, on its way to being written; boxing it
// would be an allocation per request.
#[allow(clippy::large_enum_variant)]
pub enum Handled<L> {
    Ready(Answer),
    /// Answered when the future resolves; the caller waits on it beside the socket.
    Later(L),
}

/// The settings the protocol layer reads from the configuration (`[server]`).
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub request_header_timeout: Duration,
    pub request_body_timeout: Duration,
    pub write_timeout: Duration,
    pub max_streams_per_connection: u32,
    pub ping_interval: Duration,
}

/// Per-connection facts handed to handlers through request extensions.
#[derive(Clone)]
pub struct ConnectionCtx {
    pub peer: SocketAddr,
    /// Cancel to drop this connection (after a short grace).
    pub kill: kill::Kill,
    /// Whether this request came over HTTP/2 (set per request: one connection, one version).
    pub http2: bool,
}

impl limits::PeerIp for ConnectionCtx {
    fn peer_ip(&self) -> std::net::IpAddr {
        self.peer.ip()
    }
}

/// A JSON error answer in the application's format (`{"error":{"code","message"}}`), for the
/// few answers this layer gives itself (a refused HTTP/2 stream). 503s carry `Retry-After`.
pub fn error_response(status: http::StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    let mut res = Response::new(Body::from(body.to_string()));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if status == http::StatusCode::SERVICE_UNAVAILABLE {
        h.insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("1"),
        );
    }
    res
}
