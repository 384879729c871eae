//! The accept loop: HTTP/1.1 and h2c (prior knowledge) on one port, graceful shutdown.
//!
//! A connection starts on the lean HTTP/1.1 path (`h1.rs`), which serves bodiless requests
//! and WebSocket upgrades itself (so a parked stream holds a few KB, not hyper's buffers)
//! and hands the connection, with the bytes already read, to our HTTP/2 driver (`http2`)
//! for h2c, and to hyper for bodies, other upgrades and HTTP/1.0. TLS connections do the
//! same after the handshake, unless ALPN chose h2: those go to the HTTP/2 driver directly.
//!
//! Concurrency: one task per TCP connection. Each connection carries a kill token in its
//! requests' extensions; a subscription whose queue overflows (a client that stopped
//! reading) fires it, and the connection is dropped after `SLOW_CLOSE_GRACE` if it has not
//! ended by itself — hyper cannot end a response whose body it is no longer polling.
//! Shutdown (once `shutdown` resolves: with `lifecycle::drain`, after the drain grace) stops
//! accepting, cancels `Service::shutdown` (every stream writes its goodbye and ends), and
//! waits up to `SHUTDOWN_GRACE` for connections to drain.
//!
//! Every request, whichever way it arrived (lean path, hyper's HTTP/1.1, h2, h2c, TLS), goes
//! to the one `Service` (`net/mod.rs`); nothing here knows what a route is.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::net::h1;
use crate::net::limits::{Placed, Refused};
use crate::net::tls::Acceptor as TlsAcceptor;
use crate::net::upgrade::{Pending, SessionIo, Upgradable};
use crate::net::{ConnectionCtx, Handled, Service};

const SLOW_CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long connections get to end after shutdown (the bound `docs/operations.md` gives).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// A client gets this long to finish the TLS handshake (a slowloris variant otherwise).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the plain listener and, when given, a TLS one (ALPN h2 / http/1.1) with `service`
/// until `shutdown` resolves, then drains.
pub async fn serve<S: Service>(
    service: Arc<S>,
    listener: TcpListener,
    tls: Option<(TcpListener, TlsAcceptor)>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    // Every connection task, so shutdown can wait for them all; hyper's learn of the
    // shutdown from `Service::shutdown`, as the lean path and HTTP/2 do (`Edge::hyper`).
    let tasks = TaskTracker::new();
    let acceptor = tls.as_ref().map(|(_, a)| a.clone());
    let edge = Arc::new(Edge::new(service.clone(), acceptor));
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
        let permit = match service.limits().try_acquire(peer.ip()) {
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
            kill: crate::net::kill::Kill::new(),
            http2: false,
        };
        let stream = super::deadline::Deadline::new(stream, service.settings().write_timeout);
        let edge = edge.clone();
        tasks.spawn(connection(edge, stream, permit.keep_with(ctx), secure));
    }
    drop(listener);
    drop(tls);
    service.shutdown().cancel();
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace period; closing them");
    }
    Ok(())
}

/// One connection's task, from accept to close. What a parked connection costs is mostly
/// this future's size (the task is allocated at it), so it is a function of its own, whose
/// size `app::parked` checks.
///
/// Memory: an `async` block keeps a slot for each value it captured for its whole life,
/// even after moving it into a callee's future, which then holds its own copy. So the
/// socket and the context stay here and the lean path borrows them (`Edge::lean_phase`);
/// only what follows it (hyper, a WebSocket session) takes them by value (the context
/// cloned: it stays here with the connection's place, `Placed`, which gives the place
/// back for the context's address). The TLS acceptor is the edge's: `secure` is a byte
/// where an `Option<Arc>` was 8.
// Not an `async fn`: its arguments would be moved into bindings of their own, a second copy.
#[allow(clippy::manual_async_fn)]
pub(crate) fn connection<Svc: Service>(
    edge: Arc<Edge<Svc>>,
    mut stream: super::deadline::Conn,
    ctx: Placed<ConnectionCtx>,
    secure: bool,
) -> impl Future<Output = ()> + Send + 'static {
    async move {
        edge.service.connection(true);
        match secure {
            // A plaintext connection: the lean HTTP/1.1 path first, hyper if it hands off.
            false => {
                match edge.lean_phase(&mut stream, &ctx).await {
                    // A WebSocket session, in this task (its future is boxed already).
                    Some(h1::Outcome::Upgrade(pending, pre)) => {
                        let session = pending.start(SessionIo::Tcp(stream), pre);
                        // Its box is empty now: not kept for the session's life.
                        drop(pending);
                        if let Some(session) = session {
                            session.await;
                        }
                    }
                    // Boxed: hyper runs once the lean path is done, and inline its future
                    // would be a second copy of the socket and the context in every task.
                    outcome => {
                        let ctx = ConnectionCtx::clone(&ctx);
                        Box::pin(edge.after_lean(outcome, stream, ctx, SessionIo::Tcp)).await
                    }
                }
            }
            // TLS: the handshake (and, for h2, the HTTP/2 driver) in a box freed once it is
            // done; HTTP/1.1 then takes the lean path here as on plaintext, on the boxed
            // TLS stream: in a box of its own too, a second lean path would be paid for
            // beside the one this task already has room for.
            true => {
                let accepted = Box::pin(edge.tls(stream, &ctx)).await;
                if let Some(mut tls) = accepted {
                    match edge.lean_phase(&mut tls, &ctx).await {
                        Some(h1::Outcome::Upgrade(pending, pre)) => {
                            let session = pending.start(SessionIo::Tls(tls), pre);
                            drop(pending);
                            if let Some(session) = session {
                                session.await;
                            }
                        }
                        outcome => {
                            let ctx = ConnectionCtx::clone(&ctx);
                            Box::pin(edge.after_lean(outcome, tls, ctx, SessionIo::Tls)).await
                        }
                    }
                }
            }
        }
        edge.service.connection(false);
        drop(ctx);
    }
}

/// A TLS connection after its handshake (boxed: rustls' state is large, and the plaintext
/// connections are the many). Its buffers exist only while bytes are in flight (`tls.rs`).
type TlsConn = Box<super::tls::TlsStream>;

/// What every connection task shares.
pub(crate) struct Edge<Svc> {
    service: Arc<Svc>,
    /// hyper serves HTTP/1.1 only: every HTTP/2 connection (h2c, ALPN h2) goes to our driver
    /// before hyper could see it (`after_lean`, `tls`).
    builder: http1::Builder,
    /// The TLS listener's (`None` without one).
    acceptor: Option<TlsAcceptor>,
}

impl<Svc: Service> Edge<Svc> {
    pub(crate) fn new(service: Arc<Svc>, acceptor: Option<TlsAcceptor>) -> Self {
        let server = service.settings();
        let mut builder = http1::Builder::new();
        // hyper (1.12) restarts this timer whenever a connection goes idle after an answer,
        // so it bounds both a slow head and the wait between keep-alive requests, as the
        // lean path's one deadline does.
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(server.request_header_timeout);
        Self {
            service,
            builder,
            acceptor,
        }
    }

    /// The lean HTTP/1.1 path on a borrowed socket, until it ends or the socket goes on
    /// (`None`: killed).
    async fn lean_phase<S: h1::Socket>(
        &self,
        stream: &mut S,
        ctx: &ConnectionCtx,
    ) -> Option<h1::Outcome> {
        let lean = h1::Lean {
            service: &*self.service,
            ctx,
        };
        drive(std::pin::pin!(lean.serve(stream)), &ctx.kill).await
    }

    /// Where a connection goes after the lean path: hyper, or a WebSocket session.
    async fn after_lean<S>(
        &self,
        outcome: Option<h1::Outcome>,
        stream: S,
        ctx: ConnectionCtx,
        ws: fn(S) -> SessionIo,
    ) where
        S: h1::Socket + 'static,
    {
        match outcome {
            Some(h1::Outcome::Handoff(read)) => {
                // Boxed: hyper's connection state is large, and without the box every lean
                // connection's task would be sized for it.
                let h2 = read.starts_with(h1::HTTP2_PREFACE);
                let io = h1::Rewind::new(stream, read);
                if h2 {
                    // h2c with prior knowledge: our HTTP/2 driver (push, 103).
                    Box::pin(self.http2(io, ctx)).await
                } else {
                    Box::pin(self.hyper(io, ctx)).await
                }
            }
            Some(h1::Outcome::Upgrade(pending, pre)) => {
                // The WebSocket session runs in this task (its future is boxed already).
                let session = pending.start(ws(stream), pre);
                drop(pending);
                if let Some(session) = session {
                    session.await;
                }
            }
            Some(h1::Outcome::Done) | None => {}
        }
    }

    /// A TLS connection's handshake. HTTP/1.1 comes back to take the lean
    /// path as on plaintext (a parked stream then holds rustls' state but not hyper's too);
    /// h2 is served here, by our HTTP/2 driver.
    async fn tls(&self, stream: super::deadline::Conn, ctx: &ConnectionCtx) -> Option<TlsConn> {
        let peer = ctx.peer;
        let acceptor = self.acceptor.clone()?;
        // Boxed, like hyper's state below: the handshake lives only until it is done. The
        // stream comes out boxed for the same reason: held inline it would be a slot of
        // its own in every task.
        let accepted = Box::pin(async move {
            let handshake = super::tls::accept(stream, acceptor);
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, handshake).await {
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
        let mut tls = accepted?;
        if tls.alpn_protocol() != Some(b"h2") {
            return Some(tls);
        }
        // The preface comes within the request-head deadline, as on the plain port
        // (hyper has no timer for it).
        let mut read = bytes::BytesMut::new();
        let deadline = tokio::time::Instant::now() + self.service.settings().request_header_timeout;
        while read.len() < h1::HTTP2_PREFACE.len() {
            let want = h1::HTTP2_PREFACE.len() - read.len();
            let got =
                tokio::time::timeout_at(deadline, h1::read_more(&mut tls, &mut read, want)).await;
            if !matches!(got, Ok(Ok(n)) if n > 0) {
                return None;
            }
        }
        let io = h1::Rewind::new(tls, read.freeze());
        Box::pin(self.http2(io, ctx.clone())).await;
        None
    }

    /// An HTTP/2 connection (`http2`): drained by `Service::shutdown` rather than hyper's
    /// watcher, and dropped like the others when its kill token fires.
    async fn http2<IO>(&self, io: IO, ctx: ConnectionCtx)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let kill = ctx.kill.clone();
        let conn = super::http2::serve(io, self.service.clone(), ctx);
        drive(std::pin::pin!(conn), &kill).await;
    }

    async fn hyper<IO>(&self, io: IO, ctx: ConnectionCtx)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let kill = ctx.kill.clone();
        let service = self.service.clone();
        // An HTTP/1.1 upgrade's session, run in this task once hyper lets the socket go.
        let upgraded: Arc<std::sync::Mutex<Option<Takeover>>> = Arc::default();
        let take_over = upgraded.clone();
        let svc =
            hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                let ctx = ctx.clone();
                let service = service.clone();
                let take_over = take_over.clone();
                // hyper's handle on the socket after an upgrade stays here; the service only
                // learns that this request may hand its socket to a session.
                let on_upgrade = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
                if on_upgrade.is_some() {
                    req.extensions_mut().insert(Upgradable);
                }
                async move {
                    let req = req.map(axum::body::Body::new);
                    let mut res = match service.call(req, &ctx).await {
                        Handled::Ready(answer) => answer.into_response(),
                        Handled::Later(later) => later.await.into_response(),
                    };
                    let session = res.extensions_mut().remove::<Pending>();
                    if let (Some(on), Some(session)) = (on_upgrade, session) {
                        // hyper ends the connection's future once the 101 is out; the
                        // session then runs in the connection's task, which holds the
                        // connection's place and gauge.
                        if let Ok(mut slot) = take_over.lock() {
                            *slot = Some(Takeover { on, session });
                        }
                    }
                    Ok::<_, std::convert::Infallible>(res)
                }
            });
        let conn = self
            .builder
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades();
        let shutdown = self.service.shutdown().clone();
        let conn = async move {
            let mut conn = std::pin::pin!(conn);
            // Shutdown has hyper finish what is in flight and close. (hyper_util's graceful
            // watcher did this, at 16 bytes in every connection's task for the few that
            // hyper takes.) Between requests hyper's own header-read timer closes an idle
            // connection: it starts as soon as an answer is out (`Edge::new`).
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = shutdown.cancelled() => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        };
        // Killed (`None`): the connection is dropped, upgraded or not.
        if drive(std::pin::pin!(conn), &kill).await.is_none() {
            return;
        }
        let takeover = upgraded.lock().ok().and_then(|mut slot| slot.take());
        if let Some(takeover) = takeover {
            takeover.run().await;
        }
    }
}

/// A session waiting for hyper to let go of its socket.
struct Takeover {
    on: hyper::upgrade::OnUpgrade,
    session: Pending,
}

impl Takeover {
    async fn run(self) {
        if let Ok(upgraded) = self.on.await
            && let Some(session) = self
                .session
                .start(SessionIo::Upgraded(TokioIo::new(upgraded)), Bytes::new())
        {
            session.await;
        }
    }
}

/// The reason a connection or stream over a limit is given.
pub(crate) fn refusal(why: Refused) -> &'static str {
    match why {
        Refused::Total => "the server is at max_connections; retry later",
        Refused::PerIp => {
            "too many connections from your address (max_connections_per_ip); retry later"
        }
    }
}

/// Runs a connection to its end, or drops it `SLOW_CLOSE_GRACE` after its kill token fires
/// (`None` then).
///
/// Takes the connection pinned by the caller: moved in, it would be stored twice in this
/// future (once as the argument, once pinned), doubling every parked connection's task.
pub(crate) async fn drive<F: Future>(
    mut conn: Pin<&mut F>,
    kill: &crate::net::kill::Kill,
) -> Option<F::Output> {
    // Biased, the connection first: unbiased, every poll of every connection's task drew a
    // random number to pick the first branch (a stream's every delivery; ~100 instructions
    // of the ~13,400 a delivery cost in channels-5k-sse). The kill is still seen on the
    // first poll after it fires that finds the connection pending.
    tokio::select! {
        biased;
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
    let _ = h1::answer_and_close(
        &mut stream,
        http::StatusCode::SERVICE_UNAVAILABLE,
        "too_many_connections",
        refusal(why),
        "retry-after: 1\r\n",
    )
    .await;
}
