//! The accept loop: HTTP/1.1 and h2c (prior knowledge) on one port, graceful shutdown.
//!
//! Concurrency: one task per TCP connection. Each connection carries a kill token in its
//! requests' extensions; a subscription whose queue overflows (a client that stopped
//! reading) fires it, and the connection is dropped after `SLOW_CLOSE_GRACE` if it has not
//! ended by itself — hyper cannot end a response whose body it is no longer polling.
//! Shutdown cancels `AppState::shutdown` (every stream writes its goodbye and ends), stops
//! accepting, and waits up to `SHUTDOWN_GRACE` for connections to drain.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tidings_core::Node;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::config::Config;
use crate::metrics::Metrics;

const SLOW_CLOSE_GRACE: Duration = Duration::from_secs(2);
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub node: Arc<Node>,
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the server shuts down: open streams say goodbye and end.
    pub shutdown: CancellationToken,
}

impl AppState {
    /// A state on the broker the config names.
    pub fn new(config: Config) -> Result<Self, crate::config::ConfigError> {
        if config.broker.url != "memory" {
            return Err(crate::config::ConfigError::Invalid(format!(
                "broker.url = {:?}: only the in-memory broker (\"memory\") is available in this build",
                config.broker.url
            )));
        }
        if config.broker.data_dir.is_some() {
            return Err(crate::config::ConfigError::Invalid(
                "broker.data_dir: durable history is not available in this build; remove the key to run in memory".into(),
            ));
        }
        let node = Node::memory(config.policies());
        Ok(Self {
            node,
            config: Arc::new(config),
            metrics: Arc::new(Metrics::default()),
            shutdown: CancellationToken::new(),
        })
    }
}

/// Per-connection facts handed to handlers through request extensions.
#[derive(Clone)]
pub struct ConnectionCtx {
    pub peer: SocketAddr,
    /// Cancel to drop this connection (after a short grace).
    pub kill: CancellationToken,
}

/// Serves until `shutdown` resolves, then drains.
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let router = crate::api::router(state.clone());
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    // Lets WebSockets ride HTTP/2 streams (RFC 8441).
    builder.http2().enable_connect_protocol();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning on a full descriptor table.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let ctx = ConnectionCtx {
            peer,
            kill: CancellationToken::new(),
        };
        let kill = ctx.kill.clone();
        let svc =
            router
                .clone()
                .map_request(move |mut req: http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ctx.clone());
                    req
                });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(svc))
            .into_owned();
        let conn = graceful.watch(conn);
        let metrics = state.metrics.clone();
        tokio::spawn(async move {
            metrics.http_connections.fetch_add(1, Relaxed);
            metrics.http_connections_total.fetch_add(1, Relaxed);
            tokio::pin!(conn);
            tokio::select! {
                _ = &mut conn => {}
                _ = kill.cancelled() => {
                    let _ = tokio::time::timeout(SLOW_CLOSE_GRACE, &mut conn).await;
                }
            }
            metrics.http_connections.fetch_sub(1, Relaxed);
        });
    }
    drop(listener);
    state.shutdown.cancel();
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace period; closing them");
    }
    Ok(())
}
