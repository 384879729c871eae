//! The accept loop: HTTP/1.1 and h2c (prior knowledge) on one port, graceful shutdown.
//!
//! A connection starts on the lean HTTP/1.1 path (`h1.rs`), which serves bodiless requests
//! and WebSocket upgrades itself (so a parked stream holds a few KB, not hyper's buffers)
//! and hands the connection to hyper, with the bytes already read, for bodies, other
//! upgrades and h2c. TLS connections do the same after the handshake, unless ALPN chose h2:
//! those go to hyper directly.
//!
//! Concurrency: one task per TCP connection. Each connection carries a kill token in its
//! requests' extensions; a subscription whose queue overflows (a client that stopped
//! reading) fires it, and the connection is dropped after `SLOW_CLOSE_GRACE` if it has not
//! ended by itself — hyper cannot end a response whose body it is no longer polling.
//! Shutdown (once `shutdown` resolves: with `lifecycle::drain`, after the drain grace) stops
//! accepting, cancels `AppState::shutdown` (every stream writes its goodbye and ends), and
//! waits up to `SHUTDOWN_GRACE` for connections to drain.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tidings_core::Node;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::config::Config;
use crate::limits::{ConnectionLimits, RateKey, Rates, Refused};
use crate::metrics::Metrics;
use crate::transport::websocket::WsIo;

const SLOW_CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long connections get to end after shutdown (the bound `docs/operations.md` gives).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// A client gets this long to finish the TLS handshake (a slowloris variant otherwise).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Cancelled when the server shuts down: open streams say goodbye and end.
    pub shutdown: CancellationToken,
    /// Set when a stop signal starts the drain (`lifecycle::drain`): `/readyz` answers 503.
    pub draining: std::sync::atomic::AtomicBool,
    pub limits: Arc<ConnectionLimits>,
    /// Client publishes per token subject or IP address (`client_publish_rate`).
    pub publish_rates: Rates,
    /// Presence reads, keyed the same way (`api::channels::PRESENCE_READS_PER_SEC`).
    pub presence_rates: Rates,
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

impl AppState {
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
            let policies = policies.clone();
            // Reading a large log is blocking work: off the runtime's threads.
            tokio::task::spawn_blocking(move || {
                let mut restore = tidings_core::broker::memory::Restore::new(policies);
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
        let config_rate = config.server.client_publish_rate;
        let limits = ConnectionLimits::new(
            config.server.max_connections,
            config.server.max_connections_per_ip,
        );
        Ok(Self(Arc::new(Shared {
            node,
            live: ArcSwap::from_pointee(Live { config, auth }),
            reloads: tokio::sync::watch::Sender::new(0),
            metrics: Arc::new(Metrics::default()),
            shutdown: CancellationToken::new(),
            draining: std::sync::atomic::AtomicBool::new(false),
            limits,
            publish_rates: Rates::new(config_rate),
            presence_rates: Rates::new(crate::api::channels::PRESENCE_READS_PER_SEC),
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

/// Per-connection facts handed to handlers through request extensions.
#[derive(Clone)]
pub struct ConnectionCtx {
    pub peer: SocketAddr,
    /// Cancel to drop this connection (after a short grace).
    pub kill: CancellationToken,
    /// Whether this request came over HTTP/2 (set per request: one connection, one version).
    pub http2: bool,
}

/// Serves plain HTTP (HTTP/1.1 + h2c) until `shutdown` resolves, then drains.
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve_all(state, listener, None, shutdown).await
}

/// Serves the plain listener and, when given, a TLS one (ALPN h2 / http/1.1) until
/// `shutdown` resolves, then drains.
pub async fn serve_all(
    state: AppState,
    listener: TcpListener,
    tls: Option<(TcpListener, TlsAcceptor)>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let app = crate::api::app::App::new(state.clone());
    // The admin console's feed; ends with `state.shutdown`.
    tokio::spawn(crate::stats::run(state.clone()));
    let graceful = GracefulShutdown::new();
    // Every connection task, so shutdown can wait for lean ones too (hyper's are also
    // watched by `graceful`, which tells them to finish).
    let tasks = tokio_util::task::TaskTracker::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state.config().server.request_header_timeout);
    let config = state.config();
    let server = &config.server;
    builder
        .http2()
        // Lets WebSockets ride HTTP/2 streams (RFC 8441).
        .enable_connect_protocol()
        .timer(TokioTimer::new())
        .max_concurrent_streams(server.max_streams_per_connection)
        // A peer that stops answering pings (a preface, SETTINGS, then silence) is closed;
        // one that answers them but opens no stream is closed by `hyper`'s idle watch.
        .keep_alive_interval(server.ping_interval)
        .keep_alive_timeout(server.ping_interval);
    let edge = Arc::new(Edge {
        app,
        builder,
        state: state.clone(),
    });
    tokio::pin!(shutdown);
    loop {
        let (accepted, secure) = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => (a, false),
            a = accept_tls(&tls) => (a, true),
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Usually EMFILE: back off instead of spinning on a full descriptor table.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let permit = match state.limits.try_acquire(peer.ip()) {
            Ok(p) => p,
            // A plaintext answer would be garbage to a TLS client: there, just close.
            Err(why) if !secure => {
                tokio::spawn(refuse(stream, why));
                continue;
            }
            Err(_) => continue,
        };
        let ctx = ConnectionCtx {
            peer,
            kill: CancellationToken::new(),
            http2: false,
        };
        let stream = crate::deadline::Deadline::new(stream, state.config().server.write_timeout);
        let watcher = graceful.watcher();
        let edge = edge.clone();
        let acceptor = tls.as_ref().filter(|_| secure).map(|(_, a)| a.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let metrics = &edge.state.metrics;
            metrics.http_connections.fetch_add(1, Relaxed);
            metrics.http_connections_total.fetch_add(1, Relaxed);
            match acceptor {
                // A plaintext connection: the lean HTTP/1.1 path first, hyper if it hands off.
                None => edge.lean(stream, ctx, watcher, WsIo::Tcp).await,
                // Boxed: a TLS session and its handshake are large, and without the box every
                // plain connection's task would be sized for them too (idle memory).
                Some(acceptor) => Box::pin(edge.tls(stream, acceptor, ctx, watcher)).await,
            }
            metrics.http_connections.fetch_sub(1, Relaxed);
        });
    }
    drop(listener);
    drop(tls);
    state.shutdown.cancel();
    tasks.close();
    let drained = async {
        graceful.shutdown().await;
        tasks.wait().await;
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, drained).await.is_err() {
        tracing::warn!("connections still open after the shutdown grace period; closing them");
    }
    Ok(())
}

/// What every connection task shares.
struct Edge {
    app: crate::api::app::App,
    builder: auto::Builder<TokioExecutor>,
    state: AppState,
}

impl Edge {
    /// Serves `stream` on the lean path; hyper takes over if it hands off, a WebSocket
    /// session if it upgrades (`ws` makes the socket the session's).
    async fn lean<S>(&self, mut stream: S, ctx: ConnectionCtx, watcher: Watcher, ws: fn(S) -> WsIo)
    where
        S: crate::h1::Socket + 'static,
    {
        let outcome = {
            let lean = crate::h1::Lean {
                app: &self.app,
                ctx: &ctx,
                header_timeout: self.state.config().server.request_header_timeout,
                body_timeout: self.state.config().server.request_body_timeout,
                shutdown: &self.state.shutdown,
            };
            drive(std::pin::pin!(lean.serve(&mut stream)), &ctx.kill).await
        };
        match outcome {
            Some(crate::h1::Outcome::Handoff(read)) => {
                // Boxed: hyper's connection state is large, and without the box every lean
                // connection's task would be sized for it.
                let io = crate::h1::Rewind::new(stream, read);
                Box::pin(self.hyper(io, ctx, watcher)).await
            }
            Some(crate::h1::Outcome::Upgrade(pending, pre)) => {
                // The WebSocket session runs in this task (its future is boxed already).
                if let Some(session) = pending.start(ws(stream), pre) {
                    session.await;
                }
            }
            Some(crate::h1::Outcome::Done) | None => {}
        }
    }

    /// A TLS connection: HTTP/1.1 goes the lean path as on plaintext (a parked stream then
    /// holds rustls' state but not hyper's too); h2 goes to hyper.
    async fn tls(
        &self,
        stream: crate::deadline::Conn,
        acceptor: TlsAcceptor,
        ctx: ConnectionCtx,
        watcher: Watcher,
    ) {
        let peer = ctx.peer;
        // Boxed, like hyper's state below: the handshake lives only until it is done, and
        // inline every TLS connection's task would keep room for it. The stream comes out
        // boxed for the same reason: held inline it would be a slot of its own.
        let accepted = Box::pin(async move {
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => Some(Box::new(tls)),
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    None
                }
            }
        })
        .await;
        let Some(tls) = accepted else {
            return;
        };
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            // The preface comes within the request-head deadline, as on the plain port
            // (hyper has no timer for it).
            let mut tls = tls;
            let mut read = bytes::BytesMut::new();
            let deadline =
                tokio::time::Instant::now() + self.state.config().server.request_header_timeout;
            while read.len() < crate::h1::HTTP2_PREFACE.len() {
                let want = crate::h1::HTTP2_PREFACE.len() - read.len();
                let got = tokio::time::timeout_at(
                    deadline,
                    crate::h1::read_more(&mut tls, &mut read, want),
                )
                .await;
                if !matches!(got, Ok(Ok(n)) if n > 0) {
                    return;
                }
            }
            let io = crate::h1::Rewind::new(tls, read.freeze());
            Box::pin(self.hyper(io, ctx, watcher)).await
        } else {
            self.lean(tls, ctx, watcher, WsIo::Tls).await
        }
    }

    async fn hyper<IO>(&self, io: IO, ctx: ConnectionCtx, watcher: Watcher)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let kill = ctx.kill.clone();
        let app = self.app.clone();
        let state = self.state.clone();
        let (open, mut streams) = tokio::sync::watch::channel(0usize);
        let open = Arc::new(open);
        let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let mut ctx = ctx.clone();
            ctx.http2 = req.version() == http::Version::HTTP_2;
            let app = app.clone();
            // An HTTP/2 stream costs what a connection does: it counts against the same
            // limits while it is open (the connection itself holds one place already).
            let permit = if ctx.http2 {
                match state.limits.try_acquire(ctx.peer.ip()) {
                    Ok(p) => Some(p),
                    Err(why) => {
                        let res = crate::api::error::ApiError::new(
                            http::StatusCode::SERVICE_UNAVAILABLE,
                            "too_many_connections",
                            refusal(why),
                        );
                        return futures_util::future::Either::Left(std::future::ready(Ok::<
                            _,
                            std::convert::Infallible,
                        >(
                            axum::response::IntoResponse::into_response(res),
                        )));
                    }
                }
            } else {
                None
            };
            let upgrade = req.method() == http::Method::CONNECT
                || req.headers().contains_key(http::header::UPGRADE);
            let guard = StreamGuard::new(&open, upgrade);
            futures_util::future::Either::Right(async move {
                let req = req.map(axum::body::Body::new);
                let res = app.handle_resolved(req, &ctx).await;
                // The stream's places are given back when hyper drops its body: at its end,
                // or when the client resets it.
                Ok::<_, std::convert::Infallible>(
                    res.map(|body| axum::body::Body::new(Held::new(body, (guard, permit)))),
                )
            })
        });
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), svc);
        let idle = self.state.config().server.request_header_timeout;
        let conn = async move {
            let conn = std::pin::pin!(watcher.watch(conn.into_owned()));
            // A connection with no stream open is waiting for a request: it gets what an
            // HTTP/1.1 connection gets between requests, then it is closed.
            tokio::select! {
                _ = conn => {}
                _ = idle_for(&mut streams, idle) => {}
            }
        };
        drive(std::pin::pin!(conn), &kill).await;
    }
}

/// The reason a connection or stream over a limit is given.
fn refusal(why: Refused) -> &'static str {
    match why {
        Refused::Total => "the server is at max_connections; retry later",
        Refused::PerIp => {
            "too many connections from your address (max_connections_per_ip); retry later"
        }
    }
}

/// Resolves once no stream has been open for `idle` (never while one is). Requests that
/// upgraded (a WebSocket over HTTP/2) keep their stream open beyond their response, so a
/// connection that ever carried one is left to its keep-alive pings instead.
async fn idle_for(streams: &mut tokio::sync::watch::Receiver<usize>, idle: Duration) {
    loop {
        if *streams.borrow_and_update() == 0 {
            match tokio::time::timeout(idle, streams.changed()).await {
                Err(_) => return,
                Ok(Err(_)) => return std::future::pending().await,
                Ok(Ok(())) => continue,
            }
        }
        if streams.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// One open stream of a hyper connection, counted while it lives.
struct StreamGuard {
    open: Arc<tokio::sync::watch::Sender<usize>>,
    upgrade: bool,
}

impl StreamGuard {
    fn new(open: &Arc<tokio::sync::watch::Sender<usize>>, upgrade: bool) -> Self {
        open.send_modify(|n| *n += 1);
        Self {
            open: open.clone(),
            upgrade,
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.upgrade {
            self.open.send_modify(|n| *n -= 1);
        }
    }
}

/// A response body that holds something (a stream's guard and permit) until hyper drops it.
struct Held<T> {
    body: axum::body::Body,
    _held: T,
}

impl<T> Held<T> {
    fn new(body: axum::body::Body, held: T) -> Self {
        Self { body, _held: held }
    }
}

impl<T: Send + Unpin + 'static> http_body::Body for Held<T> {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Runs a connection to its end, or drops it `SLOW_CLOSE_GRACE` after its kill token fires
/// (`None` then).
///
/// Takes the connection pinned by the caller: moved in, it would be stored twice in this
/// future (once as the argument, once pinned), doubling every parked connection's task.
async fn drive<F: Future>(mut conn: Pin<&mut F>, kill: &CancellationToken) -> Option<F::Output> {
    tokio::select! {
        out = &mut conn => return Some(out),
        _ = kill.cancelled() => {}
    }
    // Boxed: the grace timer is rarely needed, and inline it would sit in every task.
    let grace = Box::pin(tokio::time::sleep(SLOW_CLOSE_GRACE));
    tokio::select! {
        out = conn => Some(out),
        _ = grace => None,
    }
}

async fn accept_tls(
    tls: &Option<(TcpListener, TlsAcceptor)>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match tls {
        Some((listener, _)) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Answers a connection over a limit with a JSON 503 and closes it (no request is read: the
/// point is to spend as little as possible on it).
async fn refuse(mut stream: tokio::net::TcpStream, why: Refused) {
    let _ = crate::h1::answer_and_close(
        &mut stream,
        http::StatusCode::SERVICE_UNAVAILABLE,
        "too_many_connections",
        refusal(why),
        "retry-after: 1\r\n",
    )
    .await;
}
