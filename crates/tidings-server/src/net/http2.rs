//! HTTP/2 connections (h2c with prior knowledge, and TLS with ALPN `h2`), driven with the
//! `h2` crate directly.
//!
//! Why not hyper, which served them before: hyper's server exposes neither server push nor
//! informational (1xx) responses, and the two reasons HTTP/2 has for a page — `PUSH_PROMISE`
//! and `103 Early Hints` (SPEC §13) — are exactly those. The `h2` crate underneath hyper has
//! both (`SendResponse::push_request`, `send_informational`) and extended CONNECT
//! (`enable_connect_protocol`, RFC 8441), so this module does the part of hyper's job we use:
//! turn streams into requests for the one `Service`, send responses with flow control, watch
//! for resets, keep the connection alive with pings, close it when idle, and drain it on
//! shutdown.
//! (Patching hyper, or forking it, would leave us carrying a fork; a second HTTP/2 stack
//! would be a second set of rules. HTTP/1.x handoffs still go to hyper.)
//!
//! What this keeps from the hyper setup (`listener.rs` before): `SETTINGS_MAX_CONCURRENT_STREAMS`
//! = `max_streams_per_connection`, each open stream counting against the connection limits
//! (503 over them), pings every `ping_interval` with the connection closed when one goes
//! unanswered for as long, a connection with no open stream closed after
//! `request_header_timeout`, the preface read under that deadline before this starts (the
//! callers do it), `write_timeout` on the socket (`deadline.rs`), and a drain: on shutdown a
//! GOAWAY, then the open streams end (they say goodbye on `Service::shutdown`).
//!
//! The idle close is that same drain, never a drop. A stream's future ends when its last
//! bytes are *queued* in `h2` (as much as the peer's window and `MAX_SEND_BUFFER` allow),
//! not when the socket took them; "no stream open" can mean hundreds of KB still to send to
//! a client that paused reading. So the idle timer sends a GOAWAY and the connection is
//! polled on until `h2` has sent what it holds and closes: a client that reads on gets every
//! byte, and one that does not is closed by the existing bounds — no write progress for
//! `write_timeout`, or a keepalive ping unanswered for `ping_interval` (`h2` itself waits
//! for the ack of the ping it sends with the GOAWAY without a limit) — so a peer that asked
//! something and then went silent now costs up to 2 × `ping_interval` after the idle close
//! rather than none. One that never opened a stream has nothing queued and is closed at the
//! idle timer, as before (a bare preface stays bounded by `request_header_timeout`).
//!
//! Concurrency: one task per connection, as before. The connection and all of its streams
//! are polled by that task (a `FuturesUnordered`), so dropping the task — the kill token's
//! grace, or the end of the connection — drops every stream with it: nothing a client opened
//! or a push started can outlive its connection. A pushed stream the client resets ends at
//! once (its reset is watched like a request's). The pushed streams a connection has open
//! are counted in one atomic its streams share (`PushRoom`; one task, so `Relaxed`).
//! WebSockets over extended CONNECT run as one of these stream futures, on a `Tunnel` over
//! the stream's two halves.
//!
//! Push (`push::Preload`): only to a client whose SETTINGS allowed it (`push_request` fails
//! otherwise and nothing is pushed), only the candidates the application chose (within the
//! budgets, not in the client's push cookie); each pushed response is produced by the same
//! `Service` as if the client had asked, and pushed bodies go out before the page's body.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use bytes::{Buf, Bytes};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::net::upgrade::{Pending, SessionIo, Upgradable};
use crate::net::{ConnectionCtx, Handled, Service};

/// hyper's server defaults, kept: what a peer may have in flight per stream and connection.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 1024 * 1024;
const MAX_SEND_BUFFER: usize = 400 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;

type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serves one HTTP/2 connection on `io` (the preface is next, or already in `io`'s rewind
/// buffer) until it closes, goes idle, stops answering pings, or drains on shutdown.
pub async fn serve<S, IO>(io: IO, service: Arc<S>, ctx: ConnectionCtx)
where
    S: Service,
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let settings = service.settings();
    let (ping_interval, idle) = (settings.ping_interval, settings.request_header_timeout);
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(settings.max_streams_per_connection)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_LIST)
        // Lets WebSockets ride HTTP/2 streams (RFC 8441).
        .enable_connect_protocol();
    let handshake = tokio::time::timeout(idle, builder.handshake::<_, Bytes>(io)).await;
    let mut conn = match handshake {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(peer = %ctx.peer, error = %e, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => return,
    };
    let mut keepalive = std::pin::pin!(keepalive(conn.ping_pong(), ping_interval));
    let mut streams: FuturesUnordered<StreamFuture> = FuturesUnordered::new();
    let idle_sleep = tokio::time::sleep(idle);
    tokio::pin!(idle_sleep);
    let mut draining = false;
    // Whether a stream was ever opened: until then nothing but SETTINGS and acks can be
    // queued, and an idle close needs no drain.
    let mut served = false;
    let pushes_open = Arc::new(AtomicUsize::new(0));
    loop {
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    served = true;
                    let mut ctx = ctx.clone();
                    ctx.http2 = true;
                    let room = PushRoom {
                        max: conn.max_concurrent_send_streams(),
                        open: pushes_open.clone(),
                    };
                    streams.push(Box::pin(stream(service.clone(), ctx, req, respond, room)));
                }
                Some(Err(e)) => {
                    tracing::debug!(peer = %ctx.peer, error = %e, "HTTP/2 connection error");
                    break;
                }
                None => break,
            },
            Some(()) = streams.next(), if !streams.is_empty() => {
                if streams.is_empty() {
                    idle_sleep.as_mut().reset(tokio::time::Instant::now() + idle);
                }
            }
            // A connection with no stream open is waiting for a request: it gets what an
            // HTTP/1.1 connection gets between requests, then it is closed the way a drain
            // closes it, not dropped with its streams' last bytes still queued in `h2`
            // (see the module's notes). One that never opened a stream (a preface, then
            // silence) has nothing to lose and is dropped at once.
            () = &mut idle_sleep, if streams.is_empty() && !draining => {
                if !served {
                    break;
                }
                go_away(&mut conn, &mut draining);
            }
            () = &mut keepalive => {
                tracing::debug!(peer = %ctx.peer, "HTTP/2 peer stopped answering pings");
                break;
            }
            () = service.shutdown().cancelled(), if !draining => go_away(&mut conn, &mut draining),
        }
    }
}

/// Starts the graceful close (GOAWAY, then the connection ends once its open streams have
/// ended and what they queued is sent): on shutdown and when the connection goes idle.
fn go_away<IO, B>(conn: &mut h2::server::Connection<IO, B>, draining: &mut bool)
where
    IO: AsyncRead + AsyncWrite + Unpin,
    B: Buf,
{
    *draining = true;
    conn.graceful_shutdown();
}

/// Resolves when a ping goes unanswered for `interval` (never when pings are unavailable).
async fn keepalive(pings: Option<h2::PingPong>, interval: Duration) {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(interval, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
    }
}

/// One request stream: through the app, then its answer (and what it pushes) out.
async fn stream<S: Service>(
    service: Arc<S>,
    ctx: ConnectionCtx,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    room: PushRoom,
) {
    // An HTTP/2 stream costs what a connection does: it counts against the same limits
    // while it is open (the connection itself holds one place already).
    let _permit = match service.limits().try_acquire(ctx.peer.ip()) {
        Ok(p) => p,
        Err(why) => {
            let res = super::error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_connections",
                super::listener::refusal(why),
            );
            send(&mut respond, res, false).await;
            return;
        }
    };
    let (mut parts, recv) = req.into_parts();
    let head_only = parts.method == Method::HEAD;
    let tunnel = parts.method == Method::CONNECT;
    if let Some(protocol) = parts.extensions.remove::<h2::ext::Protocol>() {
        // The app reads RFC 8441's `:protocol` as hyper presents it, and hands over a
        // `Pending` session the way it does on every path, run on the `Tunnel` made below.
        let p = if protocol.as_str().eq_ignore_ascii_case("websocket") {
            hyper::ext::Protocol::from_static("websocket")
        } else {
            hyper::ext::Protocol::from_static("unsupported")
        };
        parts.extensions.insert(p);
        parts.extensions.insert(Upgradable);
    }
    // A tunnel's request stream is its read half, not a body for the handler.
    let (body, recv) = if tunnel {
        (Body::empty(), Some(recv))
    } else {
        (Body::new(Incoming(recv)), None)
    };
    let request_headers = parts.headers.clone();
    let uri = parts.uri.clone();
    let mut res = call(&*service, Request::from_parts(parts, body), &ctx).await;
    if let (Some(recv), true) = (recv, res.status() == StatusCode::OK) {
        let Some(pending) = res.extensions_mut().remove::<Pending>() else {
            send(&mut respond, res, head_only).await;
            return;
        };
        let (parts, _) = res.into_parts();
        let Ok(send) = respond.send_response(head(parts), false) else {
            return;
        };
        let io = SessionIo::H2(Box::new(Tunnel::new(send, recv)));
        if let Some(session) = pending.start(io, Bytes::new()) {
            session.await;
        }
        return;
    }
    let preload = res.extensions_mut().remove::<super::push::Preload>();
    let mut pushes = Vec::new();
    if let Some(preload) = &preload {
        let mut hints = Response::new(());
        *hints.status_mut() = StatusCode::EARLY_HINTS;
        for l in &preload.links {
            hints.headers_mut().append(header::LINK, l.clone());
        }
        let _ = respond.send_informational(hints);
        // Every pushed response is produced *before* its PUSH_PROMISE is queued, and its
        // head is queued right after the promise, with no await between: see `push`.
        let promised: Vec<(u32, Request<()>)> = preload
            .push
            .iter()
            .filter_map(|p| Some((p.mark, promise(&uri, &request_headers, &p.path)?)))
            .take(room.left())
            .collect();
        let answers = futures_util::future::join_all(promised.iter().map(|(_, promised)| {
            let (service, ctx) = (service.clone(), ctx.clone());
            let req = Request::from_parts(promised.clone().into_parts().0, Body::empty());
            async move { call(&*service, req, &ctx).await }
        }))
        .await;
        let mut pushed = Vec::new();
        for ((mark, promised), answer) in promised.into_iter().zip(answers) {
            // Another page on this connection may have pushed meanwhile.
            if room.left() == 0 {
                break;
            }
            match push(&mut respond, promised, answer) {
                Ok(out) => {
                    pushed.push(mark);
                    let open = room.take();
                    pushes.extend(out.map(|(out, body)| (out, body, open)));
                }
                // The client disabled push, or allows no more streams: nothing more goes.
                Err(e) => {
                    tracing::debug!(error = %e, "push refused");
                    break;
                }
            }
        }
        if let Some(cookie) = preload.cookie(&pushed) {
            res.headers_mut().append(header::SET_COOKIE, cookie);
        }
    }
    if pushes.is_empty() {
        send(&mut respond, res, head_only).await;
        return;
    }
    // The page's head now, the pushed responses' bodies, then the page's body.
    let (parts, body) = res.into_parts();
    let Ok(mut out) = respond.send_response(head(parts), false) else {
        return;
    };
    // Each pushed stream counts in `PushRoom` until its body is queued whole: the guard
    // moves into the future that sends it (bound as `_open` in the closure alone, it was
    // dropped as the future was made, before a byte was sent). Queued, not flushed: `h2`
    // tells a sender nothing when END_STREAM has gone out, so for what is still in its send
    // buffer the room is up to one page's pushes generous; `push` copes with a refusal.
    futures_util::future::join_all(pushes.into_iter().map(|(mut out, body, open)| async move {
        send_body(&mut out, body).await;
        drop(open);
    }))
    .await;
    send_body(&mut out, body).await;
}

/// How many more streams this connection may push: the client's
/// `SETTINGS_MAX_CONCURRENT_STREAMS` less the pushed streams still sending. Over it, `h2`
/// would queue a pushed stream as "pending open", where the client's reset of it is taken
/// for a connection error (see `push`); so nothing is pushed over it.
struct PushRoom {
    max: usize,
    open: Arc<AtomicUsize>,
}

impl PushRoom {
    fn left(&self) -> usize {
        self.max.saturating_sub(self.open.load(Ordering::Relaxed))
    }

    /// One more pushed stream open until the returned guard is dropped.
    fn take(&self) -> PushOpen {
        self.open.fetch_add(1, Ordering::Relaxed);
        PushOpen(self.open.clone())
    }
}

struct PushOpen(Arc<AtomicUsize>);

impl Drop for PushOpen {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Promises `promised` on the page's stream and queues `answer`'s head on the pushed stream
/// at once; the body (if any) is the caller's to send.
///
/// Why at once, with the answer ready beforehand: the `h2` crate (0.4.20) puts a pushed
/// stream whose head is queued *after* its PUSH_PROMISE went out on its "pending open"
/// queue until the connection's next flush, and a RST_STREAM the client sends for it in
/// that window (a client that refuses pushes sends one as soon as it reads the promise)
/// is taken for a frame on an idle stream: a connection error (GOAWAY PROTOCOL_ERROR)
/// that killed the page's stream too, mid-body. Queued while the promise is still
/// unsent, the head makes `h2` open the stream as it writes the promise, so a reset for
/// it is an ordinary stream reset. The connection is polled by this same task, so nothing
/// is written between the two calls.
fn push(
    respond: &mut SendResponse<Bytes>,
    promised: Request<()>,
    answer: Response<Body>,
) -> Result<Option<(SendStream<Bytes>, Body)>, h2::Error> {
    let mut pushed = respond.push_request(promised)?;
    let (parts, body) = answer.into_parts();
    let empty = body.is_end_stream();
    // A failure here is the client's reset of this pushed stream (or of the page's):
    // the promise stands, nothing more goes on it.
    Ok(pushed
        .send_response(head(parts), empty)
        .ok()
        .filter(|_| !empty)
        .map(|out| (out, body)))
}

/// The service's answer, a long poll's included.
async fn call<S: Service>(service: &S, req: Request<Body>, ctx: &ConnectionCtx) -> Response<Body> {
    match service.call(req, ctx).await {
        Handled::Ready(answer) => answer.into_response(),
        Handled::Later(later) => later.await.into_response(),
    }
}

/// The pushed request for `path`: a GET on the page's origin, with the page request's
/// `Accept-Encoding` (so a precompressed file can be pushed) and nothing that identifies
/// the user.
fn promise(page: &http::Uri, headers: &http::HeaderMap, path: &str) -> Option<Request<()>> {
    let mut uri = http::uri::Builder::new().path_and_query(path);
    if let Some(scheme) = page.scheme() {
        uri = uri.scheme(scheme.clone());
    }
    if let Some(authority) = page.authority() {
        uri = uri.authority(authority.clone());
    }
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(uri.build().ok()?);
    if let Some(ae) = headers.get(header::ACCEPT_ENCODING) {
        req = req.header(header::ACCEPT_ENCODING, ae.clone());
    }
    req.body(()).ok()
}

/// A response head as HTTP/2 carries it: without HTTP/1.1's connection headers (which
/// HTTP/2 forbids), with a `date` as hyper added.
fn head(mut parts: http::response::Parts) -> Response<()> {
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        parts.headers.remove(name);
    }
    if !parts.headers.contains_key(header::DATE)
        && let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(SystemTime::now()))
    {
        parts.headers.insert(header::DATE, v);
    }
    parts.extensions.clear();
    Response::from_parts(parts, ())
}

use http::header::HeaderName;

/// Sends a whole response on `respond`.
async fn send(respond: &mut SendResponse<Bytes>, res: Response<Body>, head_only: bool) {
    let (parts, body) = res.into_parts();
    let empty = head_only || body.is_end_stream();
    match respond.send_response(head(parts), empty) {
        Ok(mut out) if !empty => send_body(&mut out, body).await,
        _ => {}
    }
}

/// Streams `body` out with flow control, until its end, a failure, or the client's reset
/// (watched while the body has nothing to send, so an idle SSE stream the client cancels
/// ends now and frees its subscription).
async fn send_body(out: &mut SendStream<Bytes>, mut body: Body) {
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            _ = std::future::poll_fn(|cx| out.poll_reset(cx)) => return,
        };
        let data = match frame {
            None => {
                let _ = out.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "a response body failed; resetting its stream");
                out.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = out.send_trailers(trailers);
                        return;
                    }
                    continue;
                }
            },
        };
        if write(out, data).await.is_err() {
            return;
        }
    }
}

/// Writes `data` as the peer's window allows.
async fn write(out: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), h2::Error> {
    while !data.is_empty() {
        out.reserve_capacity(data.len());
        let granted = std::future::poll_fn(|cx| {
            if out.capacity() > 0 {
                return Poll::Ready(Some(Ok(out.capacity())));
            }
            out.poll_capacity(cx)
        })
        .await;
        let n = match granted {
            Some(Ok(n)) => n.min(data.len()),
            Some(Err(e)) => return Err(e),
            None => return Err(h2::Error::from(h2::Reason::CANCEL)),
        };
        if n == 0 {
            continue;
        }
        out.send_data(data.split_to(n), false)?;
    }
    Ok(())
}

/// A request body as the app reads it; what is read is given back to the peer's window.
struct Incoming(RecvStream);

impl http_body::Body for Incoming {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, h2::Error>>> {
        match std::task::ready!(self.0.poll_data(cx)) {
            Some(Ok(data)) => {
                let _ = self.0.flow_control().release_capacity(data.len());
                Poll::Ready(Some(Ok(http_body::Frame::data(data))))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
            None => match std::task::ready!(self.0.poll_trailers(cx)) {
                Ok(Some(t)) => Poll::Ready(Some(Ok(http_body::Frame::trailers(t)))),
                Ok(None) => Poll::Ready(None),
                Err(e) => Poll::Ready(Some(Err(e))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
}

/// An extended CONNECT stream as a byte stream (a WebSocket's socket over HTTP/2).
pub struct Tunnel {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Bytes received and not yet read.
    pending: Bytes,
}

impl Tunnel {
    fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
        }
    }
}

fn broken(e: h2::Error) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, e)
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pending.is_empty() {
            match std::task::ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.pending = data;
                }
                Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => {
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => return Poll::Ready(Err(broken(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        self.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        let n = if self.send.capacity() > 0 {
            self.send.capacity()
        } else {
            match std::task::ready!(self.send.poll_capacity(cx)) {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Poll::Ready(Err(broken(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        };
        if n == 0 {
            // Capacity was granted and taken back (a SETTINGS change): ask again.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let n = n.min(buf.len());
        self.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(broken)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Frames go out as the connection is polled; there is nothing held here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}
