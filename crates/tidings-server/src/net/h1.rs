//! A lean HTTP/1.1 server for requests without a body: pages, short polls and, above all,
//! the connections that sit parked for minutes — SSE and NDJSON streams and long polls.
//!
//! Why not hyper for these: hyper keeps its connection state, an 8 KiB read buffer and an
//! 8 KiB header write buffer for the whole life of a connection: about 16 KiB of a parked
//! stream's 24. Here the request head is read into a buffer that is freed once parsed, the
//! response head is written and dropped, and a parked stream holds its socket, its body
//! (the session writer) and little else.
//!
//! WebSocket upgrades are answered here too: the service's 101 carries the session
//! (`upgrade::Pending`), which then runs on the bare socket in this same task.
//!
//! Requests with a small body of declared length (`Content-Length` up to `LEAN_BODY`:
//! publishes) are read whole here, under `request_body_timeout`, and handed to the handler
//! as one buffer: a publisher's connection stays on this path too.
//!
//! Everything else is handed over together with the bytes read so far (`Rewind`), and
//! kept there from then on: the HTTP/2 preface (h2c) to our HTTP/2 driver (`http2.rs`); a
//! chunked or larger body, another upgrade, `Expect`, HTTP/1.0 and `CONNECT` to hyper.
//!
//! Plaintext and TLS connections alike (`Socket`): over TLS, a parked stream still holds
//! rustls' state, but not hyper's as well. TLS connections that negotiate h2 go to the
//! HTTP/2 driver directly.
//!
//! Concurrency: one task per connection (spawned by `listener.rs`, which also wraps it in the
//! kill-token grace). While a response streams, the task waits on the body and on the
//! socket's read readiness at once, so a client that hangs up ends its stream now rather
//! than at the next heartbeat. Bytes a client sends during a response (pipelining) are kept
//! for the next request, at most `MAX_HEAD` of them; past that the socket is not read until
//! the response ends.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::net::pool;
use crate::net::reply::Reply;
use crate::net::request::{self, LeanHead, LeanRequest, MAX_LEAN, Span};
use crate::net::upgrade::{Pending, Upgradable};
use crate::net::{Answer, ConnectionCtx, Handled, Hold, Service};

/// The largest request head read here (request line and headers); over it: 431.
pub const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;
/// Bodies of a known length up to this are written with the head in one call.
const COALESCE: usize = 64 * 1024;
/// The whole HTTP/2 connection preface: read here, under the request-head deadline, before
/// hyper (which has no timer for it) gets the connection.
pub const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Bodies of a declared length up to this are read here; larger ones go to hyper, which
/// streams them to the handler (and its 413 comes before the whole body is read).
pub const LEAN_BODY: usize = 64 * 1024;

/// How a connection left the lean path.
pub enum Outcome {
    /// The connection is finished (closed by either side, or after an error reply).
    Done,
    /// hyper takes over; these bytes were read from the socket and come first.
    Handoff(Bytes),
    /// A WebSocket handshake was answered: the session takes the socket, and these bytes
    /// (read past the request) are its first.
    Upgrade(Pending, Bytes),
}

/// The lean path of one connection. Two references and nothing else: it lives in the
/// connection's task for its whole life, so the timeouts and the shutdown token are read
/// from the service when a request needs them (a reload's `request_body_timeout` then
/// applies from the next request on, as for every other connection).
pub struct Lean<'a, Svc> {
    pub service: &'a Svc,
    pub ctx: &'a ConnectionCtx,
}

// One lives briefly, inside the boxed `exchange` future: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Head {
    Request {
        req: Request<Body>,
        keep_alive: bool,
        head_only: bool,
        /// The declared body length; the body follows the head in the buffer.
        body: usize,
    },
    /// A plain request (`net::request`): parsed, nothing consumed; its body follows the head.
    Lean {
        head: LeanHead,
        keep_alive: bool,
        head_only: bool,
    },
    Handoff,
    Refuse(StatusCode, &'static str, &'static str),
    Closed,
}

/// A response ready to be written: its head, and the body still to come.
struct Exchange {
    head: Vec<u8>,
    framing: Framing,
    body: Body,
    keep_alive: bool,
    upgrade: Option<Pending>,
}

impl Exchange {
    fn of(answer: Answer, keep_alive: bool, head_only: bool) -> Self {
        match answer {
            Answer::Response(res) => Self::new(res, keep_alive, head_only),
            Answer::Reply(reply) => Self {
                head: reply_head(&reply, keep_alive, head_only),
                framing: Framing::None,
                body: Body::empty(),
                keep_alive,
                upgrade: None,
            },
            // Written by a held poll's hook where no socket was lent (a bug): nothing to
            // write, and the client cannot know where its request stands.
            Answer::Sent => Self {
                head: Vec::new(),
                framing: Framing::None,
                body: Body::empty(),
                keep_alive: false,
                upgrade: None,
            },
        }
    }

    fn new(res: Response<Body>, keep_alive: bool, head_only: bool) -> Self {
        let (mut parts, body) = res.into_parts();
        let upgrade = if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            parts.extensions.remove::<Pending>()
        } else {
            None
        };
        // A 101 with no session to run would leave the client talking to nobody.
        let keep_alive = keep_alive && (upgrade.is_some() || !parts.status.is_informational());
        // A page's subresources (`pages`): a `103 Early Hints` goes first (this path only
        // serves HTTP/1.1; HTTP/1.0 goes to hyper, which never sends one).
        let hints = parts.extensions.remove::<crate::net::push::Preload>();
        let (mut head, framing, keep_alive) = response_head(parts, &body, keep_alive, head_only);
        if let Some(hints) = hints {
            head.splice(0..0, crate::net::push::early_hints_h1(&hints.links));
        }
        Self {
            head,
            framing,
            body,
            keep_alive,
            upgrade,
        }
    }
}

/// Where a connection goes after a request's boxed part: its next request, a stream to
/// write, or a long poll to wait for.
enum Next<L> {
    Again,
    /// Shut the socket down and end.
    Close,
    Stream {
        body: Body,
        keep_alive: bool,
    },
    Wait {
        later: L,
        keep_alive: bool,
        head_only: bool,
    },
}

impl<Svc: Service> Lean<'_, Svc> {
    /// Serves requests on `stream` until it closes or hyper must take over.
    ///
    /// Memory: this future is most of what a parked connection's task costs (the task is
    /// allocated at its largest state, for the connection's whole life), so it keeps only
    /// the two states a connection parks in: a stream being written (`Streaming`, a
    /// hand-made future of a few words) and a long poll's wait. Everything else — reading
    /// and parsing the request, the service's future, writing an answer that is not a
    /// stream, a stream's head — runs in one boxed future per request (`exchange`), freed
    /// before the connection parks.
    ///
    /// That box is kept from one request to the next while a keep-alive connection is busy
    /// (a publisher's): `Pin::set` writes the next exchange into it, in place, without an
    /// allocation per request. The exchange takes the socket and the read buffer and gives
    /// them back, so the box borrows nothing of this loop between requests. It is freed
    /// before the connection parks in a stream or a long poll's wait, which keep only what
    /// they kept before.
    pub async fn serve<S: Socket>(&self, mut stream: &mut S) -> Outcome {
        let mut buf = BytesMut::new();
        let mut boxed = None;
        let mut next = Next::Again;
        loop {
            // The socket reference is moved in and given back: the box borrows nothing here.
            let exchange = self.exchange(stream, std::mem::take(&mut buf));
            let running = match &mut boxed {
                Some(running) => {
                    Pin::set(running, exchange);
                    running
                }
                None => boxed.insert(Box::pin(exchange)),
            };
            // The answer is written where it is kept (`next`, `buf`) as the exchange ends, so
            // no copy of it waits beside the box in this future, and what is handed back is
            // a temporary of this statement (a `let` would be kept until the loop's end,
            // beside the parked states: the parked task's size).
            stream = match std::future::poll_fn(|cx| {
                running.as_mut().poll(cx).map(|(given_back, read, result)| {
                    buf = read;
                    result.map(|answered| {
                        next = answered;
                        given_back
                    })
                })
            })
            .await
            {
                Ok(given_back) => given_back,
                Err(outcome) => return outcome,
            };
            if !matches!(next, Next::Again) {
                boxed = None;
            }
            // The request is consumed: an empty read buffer goes back before anything waits.
            pool::give_read(&mut buf);
            loop {
                // Each parked state is a future of its own (`stream_out`, `wait_out`), so
                // what one keeps is not laid out beside what the other does. A long poll
                // waits on its answer where it lies in `next` (it is `Unpin`): moved out and
                // pinned, it would be kept a second time beside `next`'s slot.
                let after = match &mut next {
                    Next::Again => break,
                    Next::Close => {
                        let _ = stream.shutdown().await;
                        return Outcome::Done;
                    }
                    Next::Stream { body, keep_alive } => {
                        let (body, keep_alive) = (std::mem::take(body), *keep_alive);
                        self.stream_out(stream, &mut buf, body, keep_alive).await
                    }
                    Next::Wait {
                        later,
                        keep_alive,
                        head_only,
                    } => {
                        let (keep_alive, head_only) = (*keep_alive, *head_only);
                        match self
                            .wait_out(stream, &mut buf, Pin::new(later), keep_alive, head_only)
                            .await
                        {
                            Ok(next) => next,
                            Err(outcome) => return outcome,
                        }
                    }
                };
                next = after;
            }
        }
    }

    /// Writes a stream (its head is out) while the connection parks.
    async fn stream_out<S: Socket>(
        &self,
        stream: &mut S,
        buf: &mut BytesMut,
        body: Body,
        keep_alive: bool,
    ) -> Next<Svc::Later> {
        let mut streaming = Streaming::new(body);
        let mut watch = Watch::new(buf);
        let written = std::future::poll_fn(|cx| streaming.poll(cx, stream, &mut watch)).await;
        self.then(written, keep_alive)
    }

    /// Waits for a long poll's answer, watching for the client hanging up, and writes it.
    /// A poll that can be held is lent the socket (`net::held`) while it waits: its answer
    /// may then be written from the publishing side, and only what the socket did not take
    /// at once is written here.
    async fn wait_out<S: Socket>(
        &self,
        stream: &mut S,
        buf: &mut BytesMut,
        mut later: Pin<&mut Svc::Later>,
        keep_alive: bool,
        head_only: bool,
    ) -> Result<Next<Svc::Later>, Outcome> {
        let lending = !head_only && lend(stream, later.as_ref().get_ref(), keep_alive);
        // In a block of its own: the answer (a `Reply`, ~300 bytes) is not kept while its
        // bytes are written.
        let answer = {
            let mut watch = Watch::new(buf);
            // Not `select!`: it would keep the wait a second time in its future.
            let answered = std::future::poll_fn(|cx| {
                if let Poll::Ready(answer) = later.as_mut().poll(cx) {
                    return Poll::Ready(Some(answer));
                }
                if !lending {
                    return poll_hung_up(cx, stream, &mut watch).map(|_| None);
                }
                // The socket is the poll's now: watched where it lies.
                match later.as_ref().get_ref().held() {
                    Some(held) => poll_hung_up(cx, &mut Lent(held), &mut watch).map(|_| None),
                    None => Poll::Pending,
                }
            })
            .await;
            let Some(answer) = answered else {
                return Err(Outcome::Done);
            };
            // The poll is over (its subscription, and with it the hook, left the hub): the
            // socket comes back, with what was written of an answer from elsewhere.
            let sent = match later.as_ref().get_ref().held().filter(|_| lending) {
                Some(held) => {
                    let (socket, sent) = held.detach();
                    let Some(tcp) = socket else {
                        return Err(Outcome::Done);
                    };
                    stream.take_back(tcp);
                    sent
                }
                None => None,
            };
            match sent {
                Some(sent) => Ok(Ok(sent)),
                None => {
                    let exchange = Exchange::of(answer, keep_alive, head_only);
                    if matches!(exchange.framing, Framing::None) && exchange.upgrade.is_none() {
                        Ok(Err((exchange.head, exchange.keep_alive)))
                    } else {
                        Err(exchange)
                    }
                }
            }
        };
        match answer {
            Ok(Ok(crate::net::held::Answered::Whole)) => Ok(self.then(Ok(()), keep_alive)),
            Ok(Ok(crate::net::held::Answered::Partial(part))) => {
                let (mut head, sent) = *part;
                let written = write_all_flush(stream, &head[sent..]).await;
                pool::give_write(&mut head);
                Ok(self.then(written, keep_alive))
            }
            // A lean reply (a long poll's usual answer): head and body are one buffer,
            // written here without a second box per poll.
            Ok(Err((mut head, keep_alive))) => {
                let written = write_all_flush(stream, &head).await;
                pool::give_write(&mut head);
                Ok(self.then(written, keep_alive))
            }
            Err(exchange) => Box::pin(self.respond(stream, exchange, buf)).await,
        }
    }

    /// After an answer written in full: the next request, or close on an error, a `close`
    /// or shutdown.
    fn then(&self, written: io::Result<()>, keep_alive: bool) -> Next<Svc::Later> {
        if written.is_err() || !keep_alive || self.service.shutdown().is_cancelled() {
            Next::Close
        } else {
            Next::Again
        }
    }

    /// What follows a written answer: the connection closes (`Err(Done)`) on an error, a
    /// `close` or shutdown, or goes to its WebSocket session; `Ok` reads the next request.
    async fn after<S: Socket>(
        &self,
        stream: &mut S,
        written: io::Result<()>,
        keep_alive: bool,
        buf: &mut BytesMut,
        upgrade: Option<Pending>,
    ) -> Result<(), Outcome> {
        if written.is_err() || !keep_alive || self.service.shutdown().is_cancelled() {
            let _ = stream.shutdown().await;
            return Err(Outcome::Done);
        }
        if let Some(session) = upgrade {
            return Err(Outcome::Upgrade(session, buf.split().freeze()));
        }
        Ok(())
    }

    /// Writes an answer, whole unless it is a stream: then only its head, and the stream is
    /// handed back to be written as the connection parks (`Next::Stream`).
    async fn respond<S: Socket>(
        &self,
        stream: &mut S,
        mut exchange: Exchange,
        buf: &mut BytesMut,
    ) -> Result<Next<Svc::Later>, Outcome> {
        let keep_alive = exchange.keep_alive;
        let upgrade = exchange.upgrade.take();
        if matches!(exchange.framing, Framing::Chunked) {
            // Streams: the head goes now, so the client sees the response start before the
            // first event; its buffer is freed before the stream parks.
            let written = write_all_flush(stream, &exchange.head).await;
            pool::give_write(&mut exchange.head);
            let Exchange { body, .. } = exchange;
            if written.is_ok() && upgrade.is_none() {
                return Ok(Next::Stream { body, keep_alive });
            }
            self.after(stream, written, keep_alive, buf, upgrade)
                .await?;
            return Ok(Next::Again);
        }
        let length = match exchange.framing {
            Framing::Length(n) => Some(n),
            _ => None,
        };
        let written = write_body(stream, &mut exchange.head, length, &mut exchange.body, buf).await;
        pool::give_write(&mut exchange.head);
        drop(exchange);
        self.after(stream, written, keep_alive, buf, upgrade)
            .await?;
        Ok(Next::Again)
    }

    /// `request`, taking the socket and the read buffer and giving them back (`serve`).
    async fn exchange<'s, S: Socket>(
        &self,
        stream: &'s mut S,
        mut buf: BytesMut,
    ) -> (&'s mut S, BytesMut, Result<Next<Svc::Later>, Outcome>) {
        let result = self.request(stream, &mut buf).await;
        (stream, buf, result)
    }

    /// Reads the next request, has the service answer it and writes the answer unless it
    /// is to come later; `Err` when the connection ends here or goes on elsewhere.
    async fn request<S: Socket>(
        &self,
        stream: &mut S,
        buf: &mut BytesMut,
    ) -> Result<Next<Svc::Later>, Outcome> {
        let (handled, keep_alive, head_only) = match self.read_head(stream, buf).await {
            Head::Request {
                mut req,
                keep_alive,
                head_only,
                body,
            } => {
                if body > 0 {
                    *req.body_mut() = Body::from(self.read_body(stream, buf, body).await?);
                }
                (
                    self.service.call(req, self.ctx).await,
                    keep_alive,
                    head_only,
                )
            }
            Head::Lean {
                head,
                keep_alive,
                head_only,
            } => {
                // The request borrows the read buffer until the service is done with it; only
                // then are its bytes consumed (the buffer is the connection's, `net::pool`).
                let total = head.len + head.body;
                self.read_until(stream, buf, total).await?;
                let req = LeanRequest::new(&buf[..], &head);
                let handled = self.service.call_lean(req, self.ctx).await;
                buf.advance(total);
                (handled, keep_alive, head_only)
            }
            Head::Handoff => return Err(Outcome::Handoff(buf.split().freeze())),
            Head::Refuse(status, code, message) => {
                let _ = refuse(stream, status, code, message).await;
                return Err(Outcome::Done);
            }
            Head::Closed => return Err(Outcome::Done),
        };
        match handled {
            Handled::Ready(res) => {
                let exchange = Exchange::of(res, keep_alive, head_only);
                self.respond(stream, exchange, buf).await
            }
            Handled::Later(later) => Ok(Next::Wait {
                later,
                keep_alive,
                head_only,
            }),
        }
    }

    /// Reads a body of `len` bytes that follows the head in `buf` (at most `LEAN_BODY`).
    /// A body that does not arrive within `request_body_timeout` gets the same 408 a
    /// handler gives (`app::publish::read_body`): a client trickling bytes holds a task.
    async fn read_body<S: Socket>(
        &self,
        stream: &mut S,
        buf: &mut BytesMut,
        len: usize,
    ) -> Result<Bytes, Outcome> {
        self.read_until(stream, buf, len).await?;
        let body = buf.split_to(len).freeze();
        compact(buf);
        Ok(body)
    }

    /// Reads until `buf` holds `len` bytes (a head and its body), under the body deadline.
    async fn read_until<S: Socket>(
        &self,
        stream: &mut S,
        buf: &mut BytesMut,
        len: usize,
    ) -> Result<(), Outcome> {
        let body_timeout = self.service.settings().request_body_timeout;
        let deadline = Instant::now() + body_timeout;
        while buf.len() < len {
            match tokio::time::timeout_at(deadline, read_more(stream, buf, len - buf.len())).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return Err(Outcome::Done),
                Err(_) => {
                    let message = body_timeout_message(body_timeout);
                    let _ = refuse(
                        stream,
                        StatusCode::REQUEST_TIMEOUT,
                        "body_timeout",
                        &message,
                    )
                    .await;
                    return Err(Outcome::Done);
                }
            }
        }
        Ok(())
    }

    /// One deadline, from the moment the server starts waiting (after the accept, or after
    /// the previous response): the first byte and the rest of the head share it, so a
    /// client trickling a byte just before it cannot start a second one. The HTTP/2
    /// preface is read whole under it too before hyper gets the connection.
    async fn read_head<S: Socket>(&self, stream: &mut S, buf: &mut BytesMut) -> Head {
        let deadline = Instant::now() + self.service.settings().request_header_timeout;
        loop {
            if let Some(head) = parse(buf) {
                return head;
            }
            if buf.len() >= MAX_HEAD {
                return too_large();
            }
            let waiting = buf.is_empty();
            let room = if waiting { 1024 } else { 4096 };
            // A client that connects and says nothing, keeps a connection idle between
            // requests or never finishes a head (slowloris) would otherwise hold its slot
            // forever. Shutdown ends the wait for a request that has not started.
            // Biased: the read first, shutdown second. Unbiased, every wait for a request
            // drew a random number to pick the first branch (a keep-alive publisher's every
            // publish; ~250 instructions of ~27,000 in channels-5k-sse).
            let read = tokio::select! {
                biased;
                r = tokio::time::timeout_at(deadline, read_more(stream, buf, room)) => {
                    r.ok().and_then(Result::ok)
                }
                _ = self.service.shutdown().cancelled(), if waiting => None,
            };
            if !matches!(read, Some(n) if n > 0) {
                // EOF, a socket error, the deadline or shutdown: close.
                return Head::Closed;
            }
        }
    }
}

/// Lends `later` the connection's socket if it can be held (`net::held`); false when
/// nothing was lent (TLS, or a poll that is not held).
fn lend<S: Socket, L: Hold>(stream: &mut S, later: &L, keep_alive: bool) -> bool {
    let Some(held) = later.held() else {
        return false;
    };
    let Some(tcp) = stream.lend() else {
        return false;
    };
    held.attach(tcp, keep_alive);
    true
}

/// A connection the lean path can serve: plaintext TCP or TLS over it.
pub trait Socket: AsyncRead + AsyncWrite + Unpin + Send {
    /// Lends the plain TCP socket to a held long poll (`net::held`) until `take_back`;
    /// `None` when there is none to lend (TLS).
    fn lend(&mut self) -> Option<TcpStream> {
        None
    }

    fn take_back(&mut self, _tcp: TcpStream) {}

    /// This socket as the plain TCP socket it is, if it is one (what `lend` moves out).
    fn into_tcp(self) -> Result<TcpStream, Self>
    where
        Self: Sized,
    {
        Err(self)
    }

    fn from_tcp(_tcp: TcpStream) -> Option<Self>
    where
        Self: Sized,
    {
        None
    }

    /// Reads what is waiting into `buf`, making `room` for it; `Ready(Ok(0))` at end of
    /// stream. A bare socket reserves the room only once bytes are there, so a connection
    /// waiting for its next request holds no buffer.
    fn poll_read_more(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        room: usize,
    ) -> Poll<io::Result<usize>>;
}

impl Socket for TcpStream {
    fn into_tcp(self) -> Result<TcpStream, Self> {
        Ok(self)
    }

    fn from_tcp(tcp: TcpStream) -> Option<Self> {
        Some(tcp)
    }

    fn poll_read_more(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        room: usize,
    ) -> Poll<io::Result<usize>> {
        // tokio still reports a socket ready after a read that drained it (only a
        // `WouldBlock` clears that), so a wakeup may find nothing. Bytes therefore go
        // through the stack unless `buf` already has the room (a frame or head half read):
        // a parked connection that was woken for nothing keeps no buffer. The stack chunk
        // is left uninitialized: zeroing 4 KiB per read is a cost every request paid.
        if buf.capacity() - buf.len() < room {
            let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
            let mut read = ReadBuf::uninit(&mut chunk[..room.min(4096)]);
            std::task::ready!(Pin::new(self).poll_read(cx, &mut read))?;
            keep(buf, read.filled());
            return Poll::Ready(Ok(read.filled().len()));
        }
        loop {
            std::task::ready!(self.poll_read_ready(cx))?;
            match self.try_read_buf(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }
}

/// Appends bytes read through the stack to `buf`, which takes a pooled buffer if it has none.
fn keep(buf: &mut BytesMut, data: &[u8]) {
    if buf.capacity() == 0 && !data.is_empty() {
        *buf = pool::read_buffer();
    }
    buf.extend_from_slice(data);
}

pub async fn read_more<S: Socket>(
    stream: &mut S,
    buf: &mut BytesMut,
    room: usize,
) -> io::Result<usize> {
    std::future::poll_fn(|cx| stream.poll_read_more(cx, buf, room)).await
}

/// Parses a complete head at the start of `buf` (consuming it), or says why not.
/// `None`: incomplete, read more.
fn parse(buf: &mut BytesMut) -> Option<Head> {
    if buf.is_empty() {
        return None;
    }
    let preface_len = buf.len().min(HTTP2_PREFACE.len());
    if buf[..preface_len] == HTTP2_PREFACE[..preface_len] {
        return (buf.len() >= HTTP2_PREFACE.len()).then_some(Head::Handoff);
    }
    // Uninitialized: 100 empty headers would be 3 KiB written per request for nothing.
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match parsed.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Partial) => return None,
        // One read can complete a head over the limit: the limit holds all the same.
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
            return Some(too_large());
        }
        Ok(httparse::Status::Complete(len)) => len,
        Err(httparse::Error::TooManyHeaders) => {
            return Some(Head::Refuse(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "header_too_large",
                "the request has over 100 headers",
            ));
        }
        Err(_) => return Some(bad_request()),
    };
    let (Some(method), Some(path), Some(1)) = (parsed.method, parsed.path, parsed.version) else {
        return Some(Head::Handoff);
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Some(bad_request());
    };
    if method == Method::CONNECT {
        return Some(Head::Handoff);
    }
    let mut keep_alive = true;
    let mut websocket = false;
    let mut body = None;
    // Where each header's name and value lie in the head: httparse's slices borrow `buf`,
    // which must be split (below) before the values can be slices of it.
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let base = buf.as_ptr() as usize;
    // httparse's slices all lie in the head; checked anyway, so no input can panic here.
    let span = |part: &[u8]| {
        let start = (part.as_ptr() as usize).checked_sub(base)?;
        let end = start.checked_add(part.len()).filter(|&end| end <= len)?;
        Some((u32::try_from(start).ok()?, u32::try_from(end).ok()?))
    };
    let mut n = 0;
    for h in parsed.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"upgrade") {
            // WebSocket is upgraded here; any other protocol (h2c) is hyper's.
            if !has_token(h.value, b"websocket") {
                return Some(Head::Handoff);
            }
            websocket = true;
        }
        if name.eq_ignore_ascii_case(b"transfer-encoding") || name.eq_ignore_ascii_case(b"expect") {
            return Some(Head::Handoff);
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            // One plain length we take; anything else (a list, a repeat, a large body) is
            // hyper's to read or refuse.
            match (body, content_length(h.value)) {
                (None, Some(n)) if n <= LEAN_BODY => body = Some(n),
                _ => return Some(Head::Handoff),
            }
        }
        if name.eq_ignore_ascii_case(b"connection") && has_token(h.value, b"close") {
            keep_alive = false;
        }
        let (Some((ns, ne)), Some((vs, ve)), Some(slot)) =
            (span(name), span(h.value), spans.get_mut(n))
        else {
            return Some(bad_request());
        };
        *slot = (ns, ne, vs, ve);
        n += 1;
    }
    let Some((ps, pe)) = span(path.as_bytes()) else {
        return Some(bad_request());
    };
    let head_only = method == Method::HEAD;
    let body = body.unwrap_or(0);
    if let Some(head) = lean(
        buf,
        method.clone(),
        (ps, pe),
        &spans[..n],
        len,
        body,
        websocket,
    ) {
        return Some(Head::Lean {
            head,
            keep_alive,
            head_only,
        });
    }
    // One shared buffer for the head and what follows it (a body): the header values, the
    // URI and the body are slices of it, with no copy of the head (an allocation) and one
    // promotion to shared for all of them.
    let head = buf.split_to(len).freeze();
    let slice = |(s, e): (u32, u32)| head.slice(s as usize..e as usize);
    let mut map = HeaderMap::with_capacity(n);
    for &(ns, ne, vs, ve) in &spans[..n] {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&head[ns as usize..ne as usize]),
            HeaderValue::from_maybe_shared(slice((vs, ve))),
        ) else {
            return Some(unsplit(buf, &head, bad_request()));
        };
        map.append(name, value);
    }
    let Ok(uri) = http::Uri::from_maybe_shared(slice((ps, pe))) else {
        return Some(unsplit(buf, &head, bad_request()));
    };
    let mut req = Request::new(Body::empty());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = map;
    if websocket {
        req.extensions_mut().insert(Upgradable);
    }
    // A body is read next and `read_body` compacts after it: copying it here would be twice.
    if body == 0 {
        compact(buf);
    }
    Some(Head::Request {
        req,
        keep_alive,
        head_only,
        body,
    })
}

/// A plain head (`net::request`) as a `LeanHead`, or `None` for one that must be a full
/// `Request`: a target, a header name or value `http` might refuse or rewrite, or more
/// header lines than a lean request holds.
fn lean(
    buf: &[u8],
    method: Method,
    target: (u32, u32),
    spans: &[(u32, u32, u32, u32)],
    len: usize,
    body: usize,
    upgradable: bool,
) -> Option<LeanHead> {
    if spans.len() > MAX_LEAN {
        return None;
    }
    let at = |(s, e): (u32, u32)| buf.get(s as usize..e as usize).unwrap_or_default();
    let query_at = request::plain_target(at(target)).ok()?;
    let mut headers = [Span::default(); MAX_LEAN];
    let short = |n: u32| u16::try_from(n).ok();
    for (slot, &(ns, ne, vs, ve)) in headers.iter_mut().zip(spans) {
        if !request::plain_name(at((ns, ne))) || !request::plain_value(at((vs, ve))) {
            return None;
        }
        *slot = Span {
            name: (short(ns)?, short(ne)?),
            value: (short(vs)?, short(ve)?),
        };
    }
    Some(LeanHead {
        method,
        target,
        query_at: query_at.map(|q| target.0 + q as u32),
        headers,
        count: spans.len(),
        len,
        body,
        upgradable,
    })
}

/// Puts a head split off `buf` back in front of it, for an answer that consumes nothing.
/// Only on a head httparse took but `http` refuses: rare enough for a copy.
fn unsplit(buf: &mut BytesMut, head: &Bytes, answer: Head) -> Head {
    let mut whole = BytesMut::with_capacity(head.len() + buf.len());
    whole.extend_from_slice(head);
    whole.extend_from_slice(buf);
    *buf = whole;
    answer
}

/// Keeps only what is left in `buf` (a body or a pipelined request), in a buffer of its own
/// size: a parked connection must not hold the read buffer, nor a body the handler is done
/// with.
fn compact(buf: &mut BytesMut) {
    *buf = if buf.is_empty() {
        BytesMut::new()
    } else {
        BytesMut::from(&buf[..])
    };
}

/// A `Content-Length` value: digits only (RFC 9112 §6.3), and few enough to be small.
fn content_length(value: &[u8]) -> Option<usize> {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 9 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0, |n, d| n * 10 + usize::from(d - b'0')))
}

/// What `parse` made of a buffer, for the `h1_head` fuzz target: the properties it checks
/// are about what a parse leaves behind, which only this module can see.
#[doc(hidden)]
#[derive(Debug)]
pub enum FuzzHead {
    /// Incomplete: nothing was consumed.
    Partial,
    /// hyper's: nothing was consumed.
    Handoff,
    /// An error answer.
    Refuse(u16),
    /// A request, the bytes left after its head (its body first), and what it was built from.
    Request {
        rest: Vec<u8>,
        body: usize,
        method: String,
        uri: String,
        headers: Vec<(String, Vec<u8>)>,
        keep_alive: bool,
        head_only: bool,
    },
}

/// Runs the lean path's head parser on `input` (see `FuzzHead`).
#[doc(hidden)]
pub fn fuzz_parse(input: &[u8]) -> (FuzzHead, Vec<u8>) {
    let mut buf = BytesMut::from(input);
    let head = match parse(&mut buf) {
        None => FuzzHead::Partial,
        Some(Head::Handoff) => FuzzHead::Handoff,
        Some(Head::Refuse(status, _, _)) => FuzzHead::Refuse(status.as_u16()),
        Some(Head::Closed) => FuzzHead::Refuse(0),
        Some(Head::Lean {
            head,
            keep_alive,
            head_only,
        }) => {
            let req = LeanRequest::new(&buf[..], &head).to_full();
            // What the lean path consumes once the request is answered: its head (the body
            // is counted in `body`, as a full request's is).
            buf.advance(head.len);
            match req {
                Some(req) => fuzz_request(&req, &buf, head.body, keep_alive, head_only),
                // A lean head is one `http` takes: the fuzz target says otherwise if not.
                None => FuzzHead::Refuse(0),
            }
        }
        Some(Head::Request {
            req,
            keep_alive,
            head_only,
            body,
        }) => fuzz_request(&req, &buf, body, keep_alive, head_only),
    };
    (head, buf.to_vec())
}

/// What the fuzz target compares of a parsed request, whichever way it was parsed.
fn fuzz_request<B>(
    req: &http::Request<B>,
    rest: &[u8],
    body: usize,
    keep_alive: bool,
    head_only: bool,
) -> FuzzHead {
    FuzzHead::Request {
        rest: rest.to_vec(),
        body,
        method: req.method().to_string(),
        uri: req.uri().to_string(),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
        keep_alive,
        head_only,
    }
}

/// The 408's message, word for word what a handler's `ApiError::body_timeout` says.
pub fn body_timeout_message(timeout: Duration) -> String {
    format!(
        "the request body did not arrive within {}s",
        timeout.as_secs_f64()
    )
}

fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

fn too_large() -> Head {
    Head::Refuse(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "header_too_large",
        "the request line and headers are over 64 KiB",
    )
}

fn bad_request() -> Head {
    Head::Refuse(
        StatusCode::BAD_REQUEST,
        "bad_request",
        "the request is not valid HTTP/1.1",
    )
}

/// Writes a JSON error answer with `connection: close` and shuts the write side, within a
/// second (a client that does not read cannot keep the task). `extra_headers`: whole header
/// lines, e.g. `"retry-after: 1\r\n"`. Also the accept loop's 503 for connections over a limit.
pub async fn answer_and_close<S: Socket>(
    stream: &mut S,
    status: StatusCode,
    code: &str,
    message: &str,
    extra_headers: &str,
) -> io::Result<()> {
    let body = format!(r#"{{"error":{{"code":"{code}","message":"{message}"}}}}"#);
    let response = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra_headers}connection: close\r\ndate: {}\r\n\r\n{body}",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
        httpdate::fmt_http_date(SystemTime::now()),
    );
    tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(response.as_bytes()).await?;
        stream.flush().await?;
        stream.shutdown().await
    })
    .await
    .unwrap_or(Ok(()))
}

/// Refuses a request, then closes lingering: closing with the client's bytes unread would
/// send a reset, which can destroy the answer before the client reads it, so what is still
/// coming is discarded for a moment (at most 1 MiB, at most a second).
async fn refuse<S: Socket>(
    stream: &mut S,
    status: StatusCode,
    code: &str,
    message: &str,
) -> io::Result<()> {
    answer_and_close(stream, status, code, message, "").await?;
    use tokio::io::AsyncReadExt;
    let mut sink = [0u8; 4096];
    let mut left = 1usize << 20;
    let drain = async {
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(1), drain)
        .await
        .unwrap_or(Ok(()))
}

#[derive(Clone, Copy)]
pub(crate) enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// The response head, how the body is framed, and whether the connection stays open.
fn response_head(
    parts: http::response::Parts,
    body: &Body,
    mut keep_alive: bool,
    head_only: bool,
) -> (Vec<u8>, Framing, bool) {
    let status = parts.status;
    if let Some(v) = parts.headers.get(header::CONNECTION) {
        keep_alive &= !has_token(v.as_bytes(), b"close");
    }
    let bodyless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    let framing = if bodyless || head_only {
        Framing::None
    } else if let Some(n) = declared.or(body.size_hint().exact()) {
        Framing::Length(n)
    } else {
        Framing::Chunked
    };

    // Room for the head and, for a small body of known length, the body too (it goes out
    // in the same write): one allocation per answer.
    let body_room = match framing {
        Framing::Length(n) => usize::try_from(n).unwrap_or(COALESCE).min(COALESCE),
        _ => 0,
    };
    let mut out = pool::write_buffer(512 + body_room);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if name == header::TRANSFER_ENCODING || (name == header::CONTENT_LENGTH && bodyless) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !parts.headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&http_date());
        out.extend_from_slice(b"\r\n");
    }
    if !keep_alive && !parts.headers.contains_key(header::CONNECTION) {
        out.extend_from_slice(b"connection: close\r\n");
    }
    match framing {
        Framing::Length(n) if declared.is_none() => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    out.extend_from_slice(b"\r\n");
    (out, framing, keep_alive)
}

/// A lean reply's head with its body, in one buffer (one write, one allocation).
pub(crate) fn reply_head(reply: &Reply, keep_alive: bool, head_only: bool) -> Vec<u8> {
    let status = reply.status;
    let bodyless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let body = if bodyless || head_only {
        &[][..]
    } else {
        &reply.body[..]
    };
    let mut out = pool::write_buffer(128 + reply.headers_len() + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    reply.write_headers(&mut out);
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(&http_date());
    out.extend_from_slice(b"\r\n");
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !bodyless {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(reply.body.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// The `date:` value for now. It changes once a second, so each thread keeps the last one:
/// formatting it for every response showed in profiles of long-poll churn.
fn http_date() -> [u8; 29] {
    use std::cell::Cell;
    thread_local! {
        static LAST: Cell<(u64, [u8; 29])> = const { Cell::new((0, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    LAST.with(|last| {
        let (at, text) = last.get();
        if at == secs && at != 0 {
            return text;
        }
        let mut text = [b' '; 29];
        let formatted = httpdate::fmt_http_date(now);
        // Always 29 bytes ("Sun, 06 Nov 1994 08:49:37 GMT"); a shorter one is padded.
        let n = formatted.len().min(29);
        text[..n].copy_from_slice(&formatted.as_bytes()[..n]);
        last.set((secs, text));
        text
    })
}

/// Writes a whole answer: its head and a body of known length (`None`: no body). Runs in
/// the per-request box; a stream is written by `Streaming` instead.
///
/// Takes the head and the body by reference: an `async fn`'s arguments taken by value are
/// kept twice in its future.
async fn write_body<S: Socket>(
    stream: &mut S,
    out: &mut Vec<u8>,
    length: Option<u64>,
    body: &mut Body,
    pending: &mut BytesMut,
) -> io::Result<()> {
    let Some(n) = length else {
        return write_all_flush(stream, out).await;
    };
    let mut watch = Watch::new(pending);
    // Small bodies (pages, poll replies, errors) go out with the head in one write.
    let mut left = n;
    while let Some(data) = next_data(body, stream, &mut watch).await? {
        let Some(rest) = left.checked_sub(data.len() as u64) else {
            return Err(io::Error::other("body longer than its content-length"));
        };
        left = rest;
        if out.len() + data.len() <= COALESCE {
            out.extend_from_slice(&data);
        } else {
            // A large body (a page of replay) goes out as it is, not copied.
            if !out.is_empty() {
                stream.write_all(out).await?;
                pool::give_write(out);
            }
            stream.write_all(&data).await?;
        }
    }
    write_all_flush(stream, out).await?;
    if left != 0 {
        return Err(io::Error::other("body shorter than its content-length"));
    }
    Ok(())
}

async fn write_all_flush<S: Socket>(stream: &mut S, bytes: &[u8]) -> io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// A chunked response body being written while the connection parks: the state a parked
/// SSE or NDJSON stream's task keeps, so it is a hand-made future of a few words (the
/// body, the chunk being written) rather than an `async fn` with its own stack of futures.
struct Streaming {
    body: Body,
    chunk: Option<Chunk>,
    /// The empty last chunk (`0\r\n\r\n`) is the one being written.
    last: bool,
}

impl Streaming {
    fn new(body: Body) -> Self {
        Self {
            body,
            chunk: None,
            last: false,
        }
    }

    /// `Ready(Ok)` once the last chunk is out; an error when the client is gone or the
    /// body failed (the connection is then closed without the last chunk, so the client
    /// can tell the response was cut).
    fn poll<S: Socket>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut S,
        watch: &mut Watch<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if let Some(chunk) = &mut self.chunk {
                std::task::ready!(chunk.poll_write(cx, stream))?;
                // Its bytes are freed before the stream parks again.
                self.chunk = None;
                if self.last {
                    return Poll::Ready(Ok(()));
                }
            }
            let data = std::task::ready!(poll_next_data(cx, &mut self.body, stream, watch))?;
            self.last = data.is_none();
            self.chunk = Some(Chunk::new(data.unwrap_or_default()));
        }
    }
}

/// The read side of a connection while its response is being written.
pub(crate) struct Watch<'a> {
    pending: &'a mut BytesMut,
    reading: bool,
}

impl<'a> Watch<'a> {
    pub(crate) fn new(pending: &'a mut BytesMut) -> Self {
        let reading = pending.len() < MAX_HEAD;
        Self { pending, reading }
    }
}

/// The next non-empty data frame of `body`, while watching the socket for the client
/// hanging up. `Ok(None)` at the end of the body; an error when the client is gone or the
/// body failed (the connection is then closed without the final chunk, so the client can
/// tell the response was cut).
fn next_data<'a, S: Socket>(
    body: &'a mut Body,
    stream: &'a mut S,
    watch: &'a mut Watch<'_>,
) -> impl Future<Output = io::Result<Option<Bytes>>> + 'a {
    std::future::poll_fn(move |cx| poll_next_data(cx, body, stream, watch))
}

fn poll_next_data<S: Socket>(
    cx: &mut Context<'_>,
    body: &mut Body,
    stream: &mut S,
    watch: &mut Watch<'_>,
) -> Poll<io::Result<Option<Bytes>>> {
    loop {
        // The body first: what it has goes out before a hang-up is noticed.
        match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Ready(None) => return Poll::Ready(Ok(None)),
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(io::Error::other(e))),
            Poll::Ready(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data()
                    && !data.is_empty()
                {
                    return Poll::Ready(Ok(Some(data)));
                }
            }
            Poll::Pending => return poll_hung_up(cx, stream, watch).map(Err),
        }
    }
}

/// `Ready` when the client hangs up or the socket fails. Bytes the client sends meanwhile
/// (a pipelined request) are kept in `watch.pending`, up to `MAX_HEAD`; past that the
/// socket is no longer watched.
fn poll_hung_up<S: ReadMore>(
    cx: &mut Context<'_>,
    stream: &mut S,
    watch: &mut Watch<'_>,
) -> Poll<io::Error> {
    loop {
        if !watch.reading {
            return Poll::Pending;
        }
        match std::task::ready!(stream.poll_read_more(cx, watch.pending, 512)) {
            Ok(0) => return Poll::Ready(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => watch.reading = watch.pending.len() < MAX_HEAD,
            Err(e) => return Poll::Ready(e),
        }
    }
}

/// What `poll_hung_up` reads from: the connection's socket, or the one it lent (`Lent`).
trait ReadMore {
    fn poll_read_more(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        room: usize,
    ) -> Poll<io::Result<usize>>;
}

impl<S: Socket> ReadMore for S {
    fn poll_read_more(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        room: usize,
    ) -> Poll<io::Result<usize>> {
        Socket::poll_read_more(self, cx, buf, room)
    }
}

/// A socket lent to a held long poll, read through the poll's hold (`net::held`).
struct Lent<'a>(&'a crate::net::held::HeldSocket);

impl ReadMore for Lent<'_> {
    fn poll_read_more(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        room: usize,
    ) -> Poll<io::Result<usize>> {
        let mut chunk = [0u8; 512];
        let room = room.min(chunk.len());
        let n = std::task::ready!(self.0.poll_read(cx, &mut chunk[..room]))?;
        keep(buf, &chunk[..n]);
        Poll::Ready(Ok(n))
    }
}

/// One chunk being written: size line, data, CRLF, in vectored writes.
struct Chunk {
    line: [u8; 18],
    line_len: u8,
    flushing: bool,
    data: Bytes,
    /// Bytes of the whole chunk written so far.
    sent: usize,
}

impl Chunk {
    fn new(data: Bytes) -> Self {
        let (line, n) = chunk_size_line(data.len());
        Self {
            line,
            line_len: n as u8,
            flushing: false,
            data,
            sent: 0,
        }
    }

    /// Writes the rest of the chunk, then flushes (a no-op on TCP; TLS writes the records
    /// out here).
    fn poll_write<S: Socket>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut S,
    ) -> Poll<io::Result<()>> {
        let line = usize::from(self.line_len);
        let total = line + self.data.len() + 2;
        while !self.flushing && self.sent < total {
            let mut parts = [io::IoSlice::new(&[]); 3];
            let mut k = 0;
            let mut at = self.sent;
            for part in [&self.line[..line], &self.data[..], b"\r\n"] {
                if at < part.len() {
                    parts[k] = io::IoSlice::new(&part[at..]);
                    k += 1;
                    at = 0;
                } else {
                    at -= part.len();
                }
            }
            let n = std::task::ready!(Pin::new(&mut *stream).poll_write_vectored(cx, &parts[..k]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.flushing = true;
        Pin::new(&mut *stream).poll_flush(cx)
    }
}

/// A chunk's size line (hex digits, CRLF) and its length. By hand: `fmt` cost more than
/// the rest of the chunk.
fn chunk_size_line(len: usize) -> ([u8; 18], usize) {
    let mut line = [0u8; 18];
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, at) in (0..digits).rev().enumerate() {
        line[i] = b"0123456789abcdef"[(len >> (4 * at)) & 0xf];
    }
    line[digits..digits + 2].copy_from_slice(b"\r\n");
    (line, digits + 2)
}

/// The socket handed to hyper: the bytes already read come first.
pub struct Rewind<S> {
    pre: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(inner: S, pre: Bytes) -> Self {
        Self { pre, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            if self.pre.is_empty() {
                // An empty `Bytes` still holds its buffer; an upgraded WebSocket keeps this
                // socket for hours.
                self.pre = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_lines_are_lowercase_hex_without_leading_zeros() {
        for (len, want) in [
            (0usize, "0\r\n"),
            (1, "1\r\n"),
            (15, "f\r\n"),
            (16, "10\r\n"),
            (255, "ff\r\n"),
            (4096, "1000\r\n"),
            (0xabcdef, "abcdef\r\n"),
            (usize::MAX, "ffffffffffffffff\r\n"),
        ] {
            let (line, n) = chunk_size_line(len);
            assert_eq!(std::str::from_utf8(&line[..n]), Ok(want), "{len}");
        }
    }

    #[test]
    fn content_lengths_are_plain_digits() {
        assert_eq!(content_length(b"0"), Some(0));
        assert_eq!(content_length(b" 120 "), Some(120));
        assert_eq!(content_length(b"65536"), Some(65536));
        for bad in [
            &b""[..],
            b"-1",
            b"+5",
            b"1,1",
            b"0x10",
            b"1 2",
            b"9999999999",
        ] {
            assert_eq!(
                content_length(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
