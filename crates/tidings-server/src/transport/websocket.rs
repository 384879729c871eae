//! WebSocket: `/ws/{channel}` (raw: frames out are payloads, frames in are published) and
//! `/ws` (the JSON protocol of SPEC §5: any number of channels, publish with acks, history,
//! presence, ping). Over HTTP/1.1 upgrades and HTTP/2 extended CONNECT (RFC 8441) alike.
//!
//! Framing is ours (`crate::net::wsframe`); this module does the handshake and runs sessions.
//! The handshake's answer carries the session (`net::upgrade::Pending`); the protocol layer
//! hands it the socket once the answer is out: in the connection's own task for HTTP/1.1
//! (the lean path, or a connection hyper owns), in a task of its own for an HTTP/2 stream.
//!
//! Concurrency: one task owns the socket and the `Subscription`, and waits on everything at
//! once — the socket's read readiness, the subscription's queue (which also carries the
//! overflow, shutdown and reload signals, and the node's ping tick: `lifecycle::follow`)
//! and the token's expiry. Frames in are handled in order (a publish awaits the
//! broker before the next frame is read); frames out are appended to one buffer and
//! written with as few calls as the kernel takes. While that buffer drains, the socket is not
//! read: a client's flood is paced by its own TCP window. A client that stops reading
//! overflows its queue; the overflow cuts the session (`Subscription::cut`), which the write
//! loop also watches, so the session ends instead of hanging: what was queued and not yet
//! sent is dropped (but a frame already half sent is finished, or the stream would be
//! garbage), the `slow` disconnect frame and the 4008 close go behind what the kernel holds,
//! and they get `write_timeout` to be taken before the socket is dropped. Every write has
//! that deadline (`write_timeout`, no progress → the session ends), and while a write waits,
//! shutdown, token expiry and the overflow still end the session: the timers that live in the
//! main loop are not needed then, since the deadline bounds the wait. Nothing is shared
//! between sessions but the hub.
//!
//! Memory: a parked socket holds its `Session` and the task; the read buffer exists only
//! while a frame is half-received, the write buffer only while bytes are unsent, and
//! everything rare (joins, publishes, history reads) runs in boxed futures.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Version, header, request::Parts};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tidings_core::{
    ChannelName, Cursor, Data, Disconnect, DisconnectReason, Event, EventName, IdempotencyKey,
    Message, Since, Start, Subscription,
};
use tokio::time::Instant;

use crate::app::access_log::Claim;
use crate::app::error::ApiError;
use crate::app::publish::{self, position_json};
use crate::auth::Principal;
use crate::metrics::SessionCount;
use crate::net::ConnectionCtx;
use crate::net::upgrade::{Pending, SessionIo, StartFn, Upgradable};
use crate::net::wsframe::{self, Decoder, Incoming, OP_BINARY, OP_PING, OP_PONG, OP_TEXT};
use crate::state::AppState;
use crate::transport::stream::{self, poll_expired};
use crate::transport::ws_socket::{Flushed, GOODBYE_TIMEOUT, WsSocket};
use crate::transport::{TransportKind, frame_slot, params};

/// Close codes (SPEC §5).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const RESTART: u16 = 1012;
    pub const TRY_AGAIN: u16 = 1013;
    pub const SLOW: u16 = 4008;
    pub const GAP: u16 = 4010;
}

/// Malformed frames in a row before the connection is closed with 1008.
const MAX_MALFORMED: u8 = 10;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Raw,
    Json,
}

/// A valid WebSocket handshake request, and where its socket will come from.
pub struct WsUpgrade {
    /// HTTP/1.1: the client's key (the answer is 101 with its accept key). HTTP/2: `None`
    /// (the answer to extended CONNECT is 200).
    key: Option<HeaderValue>,
    /// The request's access-log entry: the session writes its line when it closes.
    access: Option<Claim>,
}

/// Whether a request asks for a WebSocket: `Upgrade` lists the `websocket` token (as the
/// lean path and the handshake read it: any token list), or it is an HTTP/2 extended
/// CONNECT. The one predicate for both the Origin check (`app::cors`) and the handshake, so
/// no request is accepted as a handshake that the Origin check did not see as one.
pub fn asks_for_websocket(
    method: &Method,
    headers: &HeaderMap,
    extensions: &http::Extensions,
) -> bool {
    has_token(headers, header::UPGRADE, "websocket")
        || (method == Method::CONNECT && extensions.get::<hyper::ext::Protocol>().is_some())
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

fn upgrade_error(method: &Method) -> ApiError {
    if method != Method::GET && method != Method::CONNECT {
        // GET is the HTTP/1.1 handshake; CONNECT is RFC 8441's, over HTTP/2.
        ApiError::method_not_allowed_allowing("GET, CONNECT")
    } else {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "websocket_required",
            "this route speaks WebSocket: send an Upgrade: websocket request with Sec-WebSocket-Version: 13 (or HTTP/2 extended CONNECT)",
        )
    }
}

impl<S: Send + Sync> FromRequestParts<S> for WsUpgrade {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let refuse = || upgrade_error(&parts.method);
        if !asks_for_websocket(&parts.method, &parts.headers, &parts.extensions) {
            return Err(refuse());
        }
        let key = if parts.version <= Version::HTTP_11 {
            let h = &parts.headers;
            if parts.method != Method::GET
                || !has_token(h, header::CONNECTION, "upgrade")
                || !has_token(h, header::UPGRADE, "websocket")
            {
                return Err(refuse());
            }
            Some(h.get(header::SEC_WEBSOCKET_KEY).ok_or_else(refuse)?.clone())
        } else {
            let websocket = parts
                .extensions
                .get::<hyper::ext::Protocol>()
                .is_some_and(|p| p.as_str() == "websocket");
            if parts.method != Method::CONNECT || !websocket {
                return Err(refuse());
            }
            None
        };
        if parts
            .headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            return Err(refuse());
        }
        if parts.extensions.get::<Upgradable>().is_none() {
            return Err(ApiError::bad_request(
                "websocket_unavailable",
                "this connection cannot be upgraded",
            ));
        }
        let access = parts.extensions.get::<Claim>().cloned();
        Ok(Self { key, access })
    }
}

impl WsUpgrade {
    /// The handshake's answer; `start` runs on the socket once the answer is out.
    pub(crate) fn accept<F, Fut>(self, start: F) -> Response
    where
        F: FnOnce(SessionIo, Bytes) -> Fut + Send + 'static,
        Fut: Future<Output = u64> + Send + 'static,
    {
        // Taken here, not by the extractor: a handshake refused after it is logged as the
        // request it then is.
        // Boxed, with the status it will log: inline, the entry (~100 bytes) would be in
        // every session's future, whether or not the access log is on.
        let status: u16 = if self.key.is_some() { 101 } else { 200 };
        let entry = self
            .access
            .as_ref()
            .and_then(Claim::take)
            .map(|entry| Box::new((entry, status)));
        // A combinator, not an `async` block: the block kept the socket and the first bytes
        // a second time (its captures, ~100 bytes of every session) when it called `start`,
        // and the whole session twice had it awaited a session made outside it (`.await`
        // moves it out of the capture). `map` holds the session's future in place.
        let start = move |io, pre| {
            futures_util::FutureExt::map(start(io, pre), move |written| {
                if let Some(entry) = entry {
                    let (entry, status) = *entry;
                    entry.finish(status, written, "websocket");
                }
            })
        };
        let mut res = match &self.key {
            Some(key) => {
                let mut res = StatusCode::SWITCHING_PROTOCOLS.into_response();
                let h = res.headers_mut();
                h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                if let Ok(accept) = HeaderValue::from_str(&wsframe::accept_key(key.as_bytes())) {
                    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
                }
                res
            }
            None => StatusCode::OK.into_response(),
        };
        // The protocol layer runs the session on the socket once this answer is out.
        let start: StartFn = Box::new(move |io, pre| Box::pin(start(io, pre)));
        res.extensions_mut().insert(Pending::new(start));
        res
    }
}

/// `GET /ws/{channel}`: raw mode.
pub async fn raw(
    State(state): State<AppState>,
    conn: Option<axum::Extension<ConnectionCtx>>,
    Path(channel): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ws: Result<WsUpgrade, ApiError>,
) -> Result<Response, ApiError> {
    let p = params::parse(
        Some(&channel),
        query.as_deref(),
        &headers,
        &state.config().server,
        false,
    )?;
    let who = params::authorize(&state, &p, &headers, query.as_deref())?;
    let ws = ws?;
    let channel = p.channels[0].clone();
    let mut sub = state.node.session_on(
        crate::net::kill::session_queue(conn.as_deref(), state.config().server.queue_max_bytes),
        false,
        Some(who.client_info()),
    );
    let peer = Peer::new(&state, who, conn.as_deref());
    let joined = sub
        .add(&channel, &p.start.since(&channel))
        .await?
        .ok_or_else(|| ApiError::bad_request("invalid_request", "channel given twice"))?;
    // A raw stream cannot carry a gap notice: refuse to continue silently (SPEC §10).
    let gap = matches!(p.start, Start::Cursor(_)) && joined.gap.is_some();
    // Boxed: the start closure lives until the handshake's answer is out.
    let session = Box::new((state, sub, peer));
    Ok(ws.accept(move |io, pre| {
        let (state, sub, peer) = *session;
        run(state, (io, pre), sub, Mode::Raw, peer, gap)
    }))
}

/// `GET /ws`: the JSON protocol.
pub async fn json(
    State(state): State<AppState>,
    conn: Option<axum::Extension<ConnectionCtx>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ws: Result<WsUpgrade, ApiError>,
) -> Result<Response, ApiError> {
    // Bad credentials are refused before the upgrade (401/400); what they allow is checked
    // per op, so one socket can follow public channels and granted ones.
    let who = state.auth().authenticate(&headers, query.as_deref())?;
    let ws = ws?;
    let sub = state.node.session_on(
        crate::net::kill::session_queue(conn.as_deref(), state.config().server.queue_max_bytes),
        true,
        Some(who.client_info()),
    );
    let peer = Peer::new(&state, who, conn.as_deref());
    let session = Box::new((state, sub, peer));
    Ok(ws.accept(move |io, pre| {
        let (state, sub, peer) = *session;
        run(state, (io, pre), sub, Mode::Json, peer, false)
    }))
}

/// Who is on the other end, and how fast they may publish. A token's claims, its address
/// and its expiry's timer are in one box: most sessions have no token, and inline they
/// would be in every session (an enum of 24 bytes, where the principal, the address, the
/// flag and the timer were 48; issue 17). An API key needs no address: it is never rate
/// limited.
enum Peer {
    Anonymous {
        /// `None` when the session has no connection (tests).
        ip: Option<std::net::IpAddr>,
        limited: bool,
    },
    ApiKey,
    User(Box<User>),
}

struct User {
    who: Principal,
    ip: Option<std::net::IpAddr>,
    limited: bool,
    /// The token's expiry: the session ends then (disconnect `token_expired`, close 1008).
    /// Boxed, and only for a token that expires.
    expires: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

static ANONYMOUS: Principal = Principal::Anonymous;
static API_KEY: Principal = Principal::ApiKey;

impl Peer {
    fn new(state: &AppState, who: Principal, conn: Option<&ConnectionCtx>) -> Self {
        let limited = state.auth().enabled() && who != Principal::ApiKey;
        let ip = conn.map(|c| c.peer.ip());
        match who {
            Principal::Anonymous => Self::Anonymous { ip, limited },
            Principal::ApiKey => Self::ApiKey,
            who => {
                let expires = who
                    .expires_at()
                    .map(|at| Box::pin(tokio::time::sleep_until(stream::deadline_for(at))));
                Self::User(Box::new(User {
                    who,
                    ip,
                    limited,
                    expires,
                }))
            }
        }
    }

    fn who(&self) -> &Principal {
        match self {
            Self::Anonymous { .. } => &ANONYMOUS,
            Self::ApiKey => &API_KEY,
            Self::User(user) => &user.who,
        }
    }

    fn ip(&self) -> Option<std::net::IpAddr> {
        match self {
            Self::Anonymous { ip, .. } => *ip,
            Self::ApiKey => None,
            Self::User(user) => user.ip,
        }
    }

    /// The token's expiry, if it has one.
    fn expires(&self) -> Option<Instant> {
        match self {
            Self::User(user) => user.expires.as_ref().map(|timer| timer.deadline()),
            _ => None,
        }
    }

    /// API keys (backends) are not rate limited, nor is anyone in open mode (development);
    /// with `[auth]`, everyone else draws from their client's bucket (token subject, else
    /// address), shared with their other connections.
    fn may_publish_now(&self, state: &AppState) -> bool {
        let (ip, limited) = match self {
            Self::Anonymous { ip, limited } => (*ip, *limited),
            Self::ApiKey => return true,
            Self::User(user) => (user.ip, user.limited),
        };
        match ip {
            Some(ip) if limited => state.may_publish(self.who(), ip),
            _ => true,
        }
    }
}

/// The close code that goes with each reason a session is ended for (SPEC §5, §12).
fn close_for(reason: DisconnectReason) -> (u16, &'static str) {
    match reason {
        DisconnectReason::Slow => (close::SLOW, "slow"),
        DisconnectReason::Shutdown => (close::RESTART, "shutdown"),
        DisconnectReason::BrokerUnavailable => (close::TRY_AGAIN, "broker unavailable"),
        DisconnectReason::TokenExpired => (close::POLICY, "token expired"),
    }
}

/// What the session does after handling an event.
enum Next {
    Continue,
    /// End the session: a disconnect frame (JSON mode, with a reason), then a close frame.
    Goodbye(Option<DisconnectReason>, u16, &'static str),
    /// The client sent a close frame: answer it (echoing its code) and end.
    Echo(Option<u16>),
    /// The socket is gone or broken: nothing more can be said.
    Gone,
}

enum Wake {
    /// The queue overflowed (`Slow`) or the server is shutting down.
    Cut(DisconnectReason),
    Expired,
    Read(io::Result<usize>),
    Ready,
}

struct Session {
    /// The socket, what was read from it and what is queued for it.
    ws: WsSocket,
    decoder: Decoder,
    state: AppState,
    sub: Subscription,
    /// This session's part of the WebSocket gauges, taken off them when it drops. Not a
    /// `SessionGauge`: that keeps a pointer to the metrics the state has (16 bytes where
    /// this is 4).
    count: SessionCount,
    mode: Mode,
    peer: Peer,
    /// When the client was last heard from (any frame, pongs included: it is alive) and
    /// last active (a data frame: it is using the socket), in `Shared::millis`: 8 bytes
    /// where two `Instant`s were 32.
    heard: u32,
    active: u32,
    malformed: u8,
}

/// The WebSocket gauges' index in `Metrics`.
const WS: usize = TransportKind::WebSocket as usize;

impl Drop for Session {
    fn drop(&mut self) {
        self.count
            .close(&self.state.metrics, TransportKind::WebSocket);
    }
}

/// Sets the session up and returns its future. Not `async` itself: its arguments would
/// stay in the future beside the `Session` they were moved into.
fn run(
    state: AppState,
    (io, pre): (SessionIo, Bytes),
    sub: Subscription,
    mode: Mode,
    peer: Peer,
    gap: bool,
) -> impl Future<Output = u64> + Send {
    let count = SessionCount::open(
        &state.metrics,
        TransportKind::WebSocket,
        sub.channels().len(),
    );
    // The overflow reaches the session through its queue (`Subscription::cut`), which
    // counts it at its goodbye: no kill switch (a session that owns its socket needs none)
    // and no overflow hook.
    let mut sub = sub;
    crate::lifecycle::follow(&state, &mut sub, Some(tidings_core::Tick::Ping));
    let now = state.millis();
    let mut session = Session {
        ws: WsSocket::new(io, &pre),
        decoder: Decoder::new(),
        state,
        sub,
        count,
        mode,
        peer,
        heard: now,
        active: now,
        malformed: 0,
    };
    // Uses the captured `session` in place (an `async fn` taking it would hold a copy).
    async move {
        session.run(gap).await;
        session.ws.written
    }
}

impl Session {
    /// `gap`: raw mode's join found a gap, which a raw stream cannot carry (a `bool`, not a
    /// `Next`: 24 bytes kept twice in every parked session's future).
    async fn run(&mut self, gap: bool) {
        // Whatever the join queued (raw mode's replay) goes out first.
        let mut next = if gap {
            Next::Goodbye(None, close::GAP, "gap")
        } else if !self.ws.rbuf.is_empty() {
            // Frames a client sent right behind its handshake are handled first.
            Box::pin(self.handle_input()).await
        } else {
            self.queue_ready()
        };
        // The writes and the goodbyes are boxed: inline, their futures (timers, a select of
        // their own) would be in this one for every parked session.
        loop {
            // What the socket takes at once goes without `flush`'s machinery.
            if let Next::Continue = next
                && !self.ws.out.is_empty()
                && !self.ws.write_now()
            {
                next = Box::pin(self.flush()).await;
            }
            // Moved out (`identity`), so it is not kept across the wait below.
            match std::convert::identity(next) {
                Next::Continue => {}
                Next::Gone => return,
                Next::Echo(code) => return Box::pin(self.echo_close(code)).await,
                Next::Goodbye(reason, code, why) => {
                    return Box::pin(self.goodbye(reason, code, why)).await;
                }
            }
            // One poll of everything, not a `select!` of four futures: a parked session's
            // future keeps only `self` for it.
            let wake = std::future::poll_fn(|cx| self.poll_wake(cx)).await;
            next = match wake {
                Wake::Cut(reason) => {
                    let (code, why) = close_for(reason);
                    Next::Goodbye(Some(reason), code, why)
                }
                Wake::Expired => {
                    let (code, why) = close_for(DisconnectReason::TokenExpired);
                    Next::Goodbye(Some(DisconnectReason::TokenExpired), code, why)
                }
                // A reload re-checks what this session follows; revoked, it gets the same
                // goodbye as an expired token.
                Wake::Ready
                    if self.sub.take_reload()
                        && !crate::lifecycle::still_allowed(
                            &self.state,
                            self.peer.who(),
                            self.sub.channels(),
                        ) =>
                {
                    let (code, why) = close_for(DisconnectReason::TokenExpired);
                    Next::Goodbye(Some(DisconnectReason::TokenExpired), code, why)
                }
                Wake::Read(Ok(0) | Err(_)) => Next::Gone,
                // Boxed: publishes and joins make this future large, and it is rare next
                // to waiting.
                Wake::Read(Ok(_)) => Box::pin(self.handle_input()).await,
                // The node's ping tick (`lifecycle::follow`); what is queued goes behind
                // the ping, in the same write.
                Wake::Ready if self.sub.take_tick() => match self.ping() {
                    Next::Continue => self.queue_ready(),
                    other => other,
                },
                Wake::Ready => self.queue_ready(),
            };
        }
    }

    /// What the parked session waits for, in order: the cut, the token's expiry, the
    /// socket, the queue.
    fn poll_wake(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Wake> {
        use std::task::Poll;
        if let Poll::Ready(reason) = self.sub.poll_cut(cx) {
            return Poll::Ready(Wake::Cut(reason));
        }
        if let Peer::User(user) = &mut self.peer
            && poll_expired(&mut user.expires, cx)
        {
            return Poll::Ready(Wake::Expired);
        }
        // A poll, not `read_more`'s future: that was 88 bytes of every session.
        if let Poll::Ready(r) = self.ws.io.poll_read_more(cx, &mut self.ws.rbuf) {
            return Poll::Ready(Wake::Read(r));
        }
        self.sub.poll_ready(cx).map(|()| Wake::Ready)
    }

    /// Writes everything queued. An overflow cuts a write to a client that stopped
    /// reading short, as do shutdown and token expiry; what was not sent stays in `out`, behind
    /// which a goodbye may still go. A write that makes no progress for `write_timeout`
    /// ends the session (the socket has the same deadline; this one also covers a WebSocket
    /// over an HTTP/2 stream, whose window the client may keep shut).
    async fn flush(&mut self) -> Next {
        let timeout = self.state.config().server.write_timeout;
        let expires = self.peer.expires();
        let sub = &self.sub;
        let stop = async {
            tokio::select! {
                reason = sub.cut() => reason,
                _ = crate::transport::stream::sleep_until_opt(expires) => DisconnectReason::TokenExpired,
            }
        };
        match self.ws.flush(timeout, stop).await {
            Flushed::Done => Next::Continue,
            Flushed::Gone => Next::Gone,
            Flushed::Stopped(reason) => {
                let (code, why) = close_for(reason);
                Next::Goodbye(Some(reason), code, why)
            }
        }
    }

    /// Handles every complete frame read so far.
    async fn handle_input(&mut self) -> Next {
        // Read here, not kept in the decoder: 8 bytes of every parked session.
        let max_message = self.state.config().server.max_message_bytes;
        loop {
            let incoming = match self.decoder.next(&mut self.ws.rbuf, max_message) {
                Ok(Some(incoming)) => incoming,
                Ok(None) => break,
                Err(fail) => return Next::Goodbye(None, fail.code, fail.reason),
            };
            let now = self.state.millis();
            self.heard = now;
            let next = match incoming {
                Incoming::Ping(payload) => {
                    wsframe::encode(&mut self.ws.out, OP_PONG, &payload);
                    Next::Continue
                }
                Incoming::Pong => Next::Continue,
                Incoming::Close(got) => return Next::Echo(got.map(|(code, _)| code)),
                Incoming::Text(text) => {
                    self.active = now;
                    self.on_data(Data::Text(text)).await
                }
                Incoming::Binary(data) => {
                    self.active = now;
                    self.on_data(Data::Binary(data)).await
                }
            };
            if !matches!(next, Next::Continue) {
                return next;
            }
            if self.ws.batch_full() {
                match self.flush().await {
                    Next::Continue => {}
                    other => return other,
                }
            }
        }
        self.ws.release_read_buffer();
        // Echoes of what was just published (raw mode) go out in the same write.
        self.queue_ready()
    }

    async fn on_data(&mut self, data: Data) -> Next {
        if self.mode == Mode::Raw {
            return match raw_publish(&self.state, self.sub.channels().first(), data, &self.peer)
                .await
            {
                Ok(()) => Next::Continue,
                Err((code, why)) => Next::Goodbye(None, code, why),
            };
        }
        let outcome = match &data {
            Data::Text(text) => match std::str::from_utf8(text) {
                Ok(frame) => self.request(frame).await,
                Err(_) => Err(Malformed::new(&None, "invalid_frame", "not UTF-8")),
            },
            _ => Err(Malformed::new(
                &None,
                "invalid_frame",
                "the /ws protocol takes JSON text frames",
            )),
        };
        match outcome {
            Ok(next) => {
                self.malformed = 0;
                next
            }
            Err(m) => {
                self.malformed += 1;
                self.push(error_reply(&m.id, m.code, &m.message));
                if self.malformed >= MAX_MALFORMED {
                    Next::Goodbye(None, close::POLICY, "too many malformed frames")
                } else {
                    Next::Continue
                }
            }
        }
    }

    fn channels_changed(&mut self, delta: i64) {
        self.count
            .channels_changed(&self.state.metrics, TransportKind::WebSocket, delta);
    }

    fn push(&mut self, value: Value) {
        wsframe::encode(&mut self.ws.out, OP_TEXT, value.to_string().as_bytes());
    }

    fn ping(&mut self) -> Next {
        let every = self.state.config().server.ping_interval;
        if self.state.since(self.heard) > every * 2 {
            return Next::Goodbye(None, close::GOING_AWAY, "ping timeout");
        }
        // Idle: subscribed to nothing and sending nothing but pongs.
        if self.mode == Mode::Json
            && self.sub.channels().is_empty()
            && self.state.since(self.active) > self.state.config().server.idle_timeout
        {
            return Next::Goodbye(None, close::NORMAL, "idle");
        }
        wsframe::encode(&mut self.ws.out, OP_PING, b"");
        Next::Continue
    }

    /// Queues every event that is ready, each message's frame encoded once for all its
    /// subscribers. Raw mode cannot express a gap: it closes with 4010.
    fn queue_ready(&mut self) -> Next {
        let mut gap = false;
        let mut delivered = 0u64;
        let mode = self.mode;
        let metrics = &self.state.metrics;
        let out = &mut self.ws.out;
        let drained = self.sub.drain(|event, cursor| match event {
            // Raw mode: nothing after a gap is written; the 4010 close comes first.
            _ if gap => {}
            Event::Message(m) => {
                delivered += 1;
                out.extend_from_slice(match mode {
                    Mode::Raw => raw_frame(m),
                    Mode::Json => envelope_frame(m),
                });
            }
            Event::Presence(e) => {
                if mode == Mode::Json {
                    let v = typed(e.kind.as_str(), e.body());
                    wsframe::encode(out, OP_TEXT, v.to_string().as_bytes());
                }
            }
            Event::Gap(g) => {
                metrics.gaps[WS].fetch_add(1, Relaxed);
                if mode == Mode::Raw {
                    gap = true;
                } else {
                    let mut v = typed("gap", serde_json::to_value(g).unwrap_or_default());
                    v["cursor"] = json!(String::from_utf8_lossy(cursor));
                    wsframe::encode(out, OP_TEXT, v.to_string().as_bytes());
                }
            }
        });
        match drained {
            Ok(_) if gap => Next::Goodbye(None, close::GAP, "gap"),
            Ok(_) => {
                self.state.metrics.delivered[WS].fetch_add(delivered, Relaxed);
                Next::Continue
            }
            Err(reason) => {
                let (code, why) = close_for(reason);
                Next::Goodbye(Some(reason), code, why)
            }
        }
    }

    /// Best effort, bounded in time: the disconnect frame (JSON mode) and the close frame,
    /// then the server closes its side first (RFC 6455 §7.1.1) and discards what still
    /// comes (the client's close reply) until the client closes too: closing with unread
    /// bytes would send a reset, which can destroy the close frame before it is read.
    ///
    /// A slow client's goodbye drops what it was not sent yet (SPEC §2.4: it resumes from
    /// its cursor) and gets `write_timeout`, not a second: its kernel buffers are full, and
    /// the goodbye goes out only as it reads.
    async fn goodbye(&mut self, reason: Option<DisconnectReason>, code: u16, why: &'static str) {
        let slow = reason == Some(DisconnectReason::Slow);
        if slow {
            self.state.metrics.slow_disconnects[WS].fetch_add(1, Relaxed);
            self.ws.drop_backlog();
        }
        if let (Some(reason), Mode::Json) = (reason, self.mode) {
            // A shutdown tells each client its own delay (SPEC §13), spreading the reconnects.
            let d = match reason {
                DisconnectReason::Shutdown => crate::lifecycle::shutdown_notice(&self.state),
                other => Disconnect::from(other),
            };
            let mut frame =
                json!({"type": "disconnect", "reason": d.reason, "reconnect": d.reconnect});
            if let Some(ms) = d.reconnect_after_ms {
                frame["reconnect_after_ms"] = json!(ms);
            }
            self.push(frame);
        }
        wsframe::encode_close(&mut self.ws.out, code, why);
        self.leave_all();
        let write_for = if slow {
            self.state.config().server.write_timeout
        } else {
            GOODBYE_TIMEOUT
        };
        self.ws.close(write_for).await;
    }

    /// Leaves every channel now: the goodbye may take a second, and the session must not
    /// count as a subscriber (or be present) meanwhile.
    fn leave_all(&mut self) {
        let channels = self.sub.channels().to_vec();
        for channel in &channels {
            self.sub.remove(channel);
        }
        self.channels_changed(-(channels.len() as i64));
    }

    /// Answers the client's close frame with its own code (none if it gave none) and ends.
    async fn echo_close(&mut self, code: Option<u16>) {
        match code {
            Some(code) => wsframe::encode_close(&mut self.ws.out, code, ""),
            None => wsframe::encode(&mut self.ws.out, wsframe::OP_CLOSE, b""),
        }
        self.leave_all();
        self.ws.send_and_shut().await;
    }
}

/// Where the frame holding byte `at` of `out` ends (`at` itself when a frame starts there).
/// The frames are the server's own: unmasked, well formed.
pub(crate) fn frame_end(out: &[u8], at: usize) -> usize {
    let mut i = 0usize;
    while i < out.len() && i < at {
        let Some(&len7) = out.get(i + 1) else {
            return out.len();
        };
        let (len, head) = match len7 & 0x7f {
            126 => match out.get(i + 2..i + 4) {
                Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
                None => return out.len(),
            },
            127 => match out
                .get(i + 2..i + 10)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
            {
                Some(b) => (u64::from_be_bytes(b), 10),
                None => return out.len(),
            },
            n => (u64::from(n), 2),
        };
        let end = usize::try_from(len)
            .ok()
            .and_then(|len| (i + head).checked_add(len))
            .unwrap_or(usize::MAX);
        if end > at {
            return end.min(out.len());
        }
        i = end;
    }
    i.min(out.len())
}

/// The first messages of `all` that fit in `budget` bytes (at least one, however large).
pub fn page(all: &[Arc<Message>], budget: usize) -> &[Arc<Message>] {
    let mut used = 0usize;
    let n = all
        .iter()
        .take_while(|m| {
            let first = used == 0;
            used = used.saturating_add(m.weight());
            first || used <= budget
        })
        .count();
    &all[..n]
}

/// A raw-mode message's whole frame, encoded once per message.
fn raw_frame(m: &Message) -> &Bytes {
    m.cached_frame(frame_slot::WS_RAW, |m| match &m.data {
        Data::Binary(b) => wsframe::encode_bytes(OP_BINARY, b),
        // Validated UTF-8 at publish: this only re-checks, once per message.
        Data::Json(b) | Data::Text(b) => {
            let opcode = if std::str::from_utf8(b).is_ok() {
                OP_TEXT
            } else {
                OP_BINARY
            };
            wsframe::encode_bytes(opcode, b)
        }
    })
}

/// The frame of `{"type":"message",…envelope}` with the message's own cursor, encoded once
/// per message.
fn envelope_frame(m: &Message) -> &Bytes {
    m.cached_frame(frame_slot::WS_ENVELOPE, |m| {
        let envelope = m.envelope();
        let mut text = Vec::with_capacity(envelope.len() + 16);
        text.extend_from_slice(b"{\"type\":\"message\",");
        text.extend_from_slice(&envelope[1..]);
        wsframe::encode_bytes(OP_TEXT, &text)
    })
}

/// `{"type": kind, …body}`: `type` first, as every server frame starts.
fn typed(kind: &str, body: Value) -> Value {
    let mut v = serde_json::Map::new();
    v.insert("type".into(), json!(kind));
    if let Value::Object(fields) = body {
        v.extend(fields);
    }
    Value::Object(v)
}

fn error_reply(id: &Option<Value>, code: &str, message: &str) -> Value {
    json!({"type": "reply", "id": id, "error": {"code": code, "message": message}})
}

/// One `/ws` request frame.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    #[serde(default)]
    id: Option<Value>,
    op: String,
    channel: Option<String>,
    since: Option<String>,
    history: Option<usize>,
    data: Option<Box<RawValue>>,
    event: Option<String>,
    encoding: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
    idempotency_key: Option<String>,
}

/// A frame that is not a valid request: an error reply, and it counts toward 1008.
#[derive(Debug)]
pub struct Malformed {
    pub id: Option<Value>,
    pub code: &'static str,
    pub message: String,
}

impl Malformed {
    fn new(id: &Option<Value>, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            id: id.clone(),
            code,
            message: message.into(),
        }
    }
}

/// The `id` of a frame that is JSON but not a valid request (a missing `op`, a field of the
/// wrong type), so its error reply can still be matched to the request; `None` when the frame
/// is not a JSON object at all.
fn id_of_unparsed(frame: &str) -> Option<Value> {
    #[derive(Deserialize)]
    struct IdOnly {
        #[serde(default)]
        id: Option<Value>,
    }
    serde_json::from_str::<IdOnly>(frame)
        .ok()
        .and_then(|r| r.id)
}

impl From<(Option<Value>, ApiError)> for Malformed {
    fn from((id, e): (Option<Value>, ApiError)) -> Self {
        Self {
            id,
            code: e.code,
            message: e.message,
        }
    }
}

/// Raw mode: every frame in is a publish to the socket's channel, when its namespace lets
/// clients publish. A refused or failed publish closes the socket: raw mode has no replies.
async fn raw_publish(
    state: &AppState,
    channel: Option<&ChannelName>,
    data: Data,
    peer: &Peer,
) -> Result<(), (u16, &'static str)> {
    let Some(channel) = channel else {
        return Err((close::INTERNAL, "no channel"));
    };
    let policy = state.node.policies.for_channel(channel);
    if state
        .auth()
        .check_publish(peer.who(), channel, &policy)
        .is_err()
    {
        return Err((close::POLICY, "publishing to this channel is not allowed"));
    }
    if !peer.may_publish_now(state) {
        // Raw mode has no error frame to say "slow down": the policy close is the answer.
        return Err((close::POLICY, "publish rate limit exceeded"));
    }
    if data.len() > state.config().server.max_message_bytes {
        return Err((close::TOO_BIG, "message too big"));
    }
    match publish::publish(state, channel, None, data).await {
        Ok(_) => Ok(()),
        Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => {
            Err((close::TRY_AGAIN, "broker unavailable"))
        }
        Err(_) => Err((close::INTERNAL, "publish failed")),
    }
}

fn channel_of(id: &Option<Value>, channel: Option<&str>) -> Result<ChannelName, Malformed> {
    let name = channel
        .ok_or_else(|| Malformed::new(id, "missing_channel", "this op needs \"channel\""))?;
    ChannelName::new(name).map_err(|e| Malformed::from((id.clone(), ApiError::from(e))))
}

fn since_of(id: &Option<Value>, channel: &ChannelName, req: &Request) -> Result<Since, Malformed> {
    match (&req.since, req.history) {
        (Some(text), _) => {
            let cursor = Cursor::decode(text)
                .map_err(|e| Malformed::from((id.clone(), ApiError::from(e))))?;
            cursor
                .get(channel)
                .cloned()
                .map(Since::After)
                .ok_or_else(|| {
                    Malformed::new(
                        id,
                        "invalid_cursor",
                        format!("the cursor does not cover channel {channel}"),
                    )
                })
        }
        (None, Some(n)) => Ok(Since::Last(n)),
        (None, None) => Ok(Since::Now),
    }
}

/// One `/ws` request frame, parsed and validated: `op` with its fields checked.
#[derive(Debug)]
pub struct ParsedRequest {
    pub id: Option<Value>,
    pub op: Op,
}

#[derive(Debug)]
pub enum Op {
    Ping,
    Subscribe {
        channel: ChannelName,
        since: Since,
    },
    Unsubscribe {
        channel: ChannelName,
    },
    Publish {
        channel: ChannelName,
        event: Option<EventName>,
        data: Data,
        idempotency_key: Option<IdempotencyKey>,
    },
    History {
        channel: ChannelName,
        since: Since,
        /// At most 10,000.
        limit: usize,
    },
    /// One page: clients after the client id `after`, at most `limit`.
    Presence {
        channel: ChannelName,
        after: Option<String>,
        limit: usize,
    },
}

/// The pure half of a `/ws` request: JSON to a validated op, with no server state but the
/// message size limit. `Err` is a malformed frame (it counts toward 1008). The fuzz target
/// `ws_request` runs exactly this.
pub fn parse_request(frame: &str, max_message_bytes: usize) -> Result<ParsedRequest, Malformed> {
    let req: Request = serde_json::from_str(frame).map_err(|e| {
        Malformed::new(
            &id_of_unparsed(frame),
            "invalid_request",
            format!("expected a JSON request object: {e}"),
        )
    })?;
    let id = req.id.clone();
    let op = match req.op.as_str() {
        "ping" => Op::Ping,
        "subscribe" => {
            let channel = channel_of(&id, req.channel.as_deref())?;
            let since = since_of(&id, &channel, &req)?;
            Op::Subscribe { channel, since }
        }
        "unsubscribe" => Op::Unsubscribe {
            channel: channel_of(&id, req.channel.as_deref())?,
        },
        "publish" => {
            let channel = channel_of(&id, req.channel.as_deref())?;
            let data = req
                .data
                .as_deref()
                .ok_or_else(|| Malformed::new(&id, "invalid_request", "publish needs \"data\""))?;
            let v = publish::validate_within(
                max_message_bytes,
                channel.as_str(),
                data,
                req.event.as_deref(),
                req.encoding.as_deref(),
            )
            .map_err(|e| Malformed::from((id.clone(), e)))?;
            let idempotency_key = req
                .idempotency_key
                .as_deref()
                .map(publish::idempotency_key)
                .transpose()
                .map_err(|e| Malformed::from((id.clone(), e)))?;
            Op::Publish {
                channel: v.channel,
                event: v.event,
                data: v.data,
                idempotency_key,
            }
        }
        "history" => {
            let channel = channel_of(&id, req.channel.as_deref())?;
            let since = match since_of(&id, &channel, &req)? {
                Since::Now => Since::Last(req.limit.unwrap_or(100)),
                s => s,
            };
            let limit = req.limit.unwrap_or(100).min(10_000);
            Op::History {
                channel,
                since,
                limit,
            }
        }
        "presence" => Op::Presence {
            channel: channel_of(&id, req.channel.as_deref())?,
            after: req.after,
            limit: req
                .limit
                .unwrap_or(crate::app::channels::PRESENCE_PAGE)
                .clamp(1, crate::app::channels::PRESENCE_PAGE),
        },
        other => {
            return Err(Malformed::new(
                &id,
                "unknown_op",
                format!(
                    "unknown op {other:?}; use subscribe, unsubscribe, publish, history, presence or ping"
                ),
            ));
        }
    };
    Ok(ParsedRequest { id, op })
}

impl Session {
    /// Handles one JSON request, its reply queued in `out`. `Err` is a malformed frame;
    /// operational failures (a broker error, a forbidden publish) are error replies that do
    /// not count toward 1008.
    async fn request(&mut self, frame: &str) -> Result<Next, Malformed> {
        let state = &self.state;
        let ParsedRequest { id, op } =
            parse_request(frame, state.config().server.max_message_bytes)?;
        let reply = match op {
            Op::Ping => json!({"type": "pong", "id": id}),
            Op::Subscribe { channel, since } => {
                let policy = state.node.policies.for_channel(&channel);
                match state
                    .auth()
                    .check_subscribe(self.peer.who(), &channel, &policy)
                {
                    Ok(()) => return Ok(self.subscribe(id, channel, since).await),
                    Err(e) => error_reply(&id, e.code, &e.message),
                }
            }
            Op::Unsubscribe { channel } => {
                if self.sub.remove(&channel) {
                    self.channels_changed(-1);
                    json!({"type": "reply", "id": id, "ok": true})
                } else {
                    error_reply(
                        &id,
                        "not_subscribed",
                        &format!("not subscribed to {channel}"),
                    )
                }
            }
            Op::Publish {
                channel,
                event,
                data,
                idempotency_key,
            } => {
                let policy = state.node.policies.for_channel(&channel);
                if let Err(e) = state
                    .auth()
                    .check_publish(self.peer.who(), &channel, &policy)
                {
                    error_reply(&id, e.code, &e.message)
                } else if !self.peer.may_publish_now(&self.state) {
                    error_reply(
                        &id,
                        "rate_limited",
                        "too many publishes from this client (client_publish_rate); slow down",
                    )
                } else {
                    match publish::publish_keyed(state, &channel, event, data, idempotency_key)
                        .await
                    {
                        Ok(p) => {
                            let mut reply = typed("reply", json!({"id": id, "ok": true}));
                            if let (Some(r), Value::Object(position)) =
                                (reply.as_object_mut(), position_json(&p.message))
                            {
                                r.extend(position);
                            }
                            reply
                        }
                        Err(e) => error_reply(&id, e.code, &e.message),
                    }
                }
            }
            Op::History {
                channel,
                since,
                limit,
            } => {
                let policy = state.node.policies.for_channel(&channel);
                if let Err(e) = state
                    .auth()
                    .check_subscribe(self.peer.who(), &channel, &policy)
                {
                    error_reply(&id, e.code, &e.message)
                } else {
                    match state.node.read(&channel, &since, Some(limit)).await {
                        Ok(read) => {
                            // One reply holds at most the session's byte budget; its cursor
                            // says where the next page starts.
                            let page = page(
                                read.replay.messages(),
                                state.config().server.queue_max_bytes,
                            );
                            let messages: Vec<Value> = page
                                .iter()
                                .map(|m| serde_json::from_slice(m.envelope()).unwrap_or_default())
                                .collect();
                            let end = page.last().map_or(read.top.clone(), |m| m.position());
                            let gaps: Vec<_> = read.replay.gap().into_iter().collect();
                            json!({
                                "type": "reply", "id": id, "ok": true,
                                "messages": messages,
                                "cursor": Cursor::single(&channel, end).encode(),
                                "gaps": gaps,
                            })
                        }
                        Err(e) => {
                            let e = ApiError::from(e);
                            error_reply(&id, e.code, &e.message)
                        }
                    }
                }
            }
            Op::Presence {
                channel,
                after,
                limit,
            } => {
                let policy = state.node.policies.for_channel(&channel);
                if let Err(e) = state
                    .auth()
                    .check_subscribe(self.peer.who(), &channel, &policy)
                {
                    error_reply(&id, e.code, &e.message)
                } else if let Some(ip) = self.peer.ip()
                    && !state.may_read_presence(self.peer.who(), ip)
                {
                    let e = crate::app::channels::presence_rate_limited();
                    error_reply(&id, e.code, &e.message)
                } else {
                    match crate::app::channels::presence_of(
                        state,
                        &channel,
                        after.as_deref(),
                        limit,
                    )
                    .await
                    {
                        Ok((clients, next)) => {
                            json!({"type": "reply", "id": id, "ok": true, "clients": clients, "next": next})
                        }
                        Err(e) => error_reply(&id, e.code, &e.message),
                    }
                }
            }
        };
        self.push(reply);
        Ok(Next::Continue)
    }

    /// Joins `channel`: the reply with the cursor to resume from, then whatever the join
    /// queued (history, a gap notice).
    async fn subscribe(&mut self, id: Option<Value>, channel: ChannelName, since: Since) -> Next {
        let max = self.state.config().server.max_channels_per_subscription;
        if self.sub.channels().len() >= max {
            self.push(error_reply(
                &id,
                "too_many_channels",
                &format!("at most {max} channels per connection (max_channels_per_subscription)"),
            ));
            return Next::Continue;
        }
        if let Some(other) = tidings_core::cursor::collision(self.sub.channels(), &channel) {
            let message = tidings_core::cursor::collision_message(other, &channel);
            self.push(error_reply(&id, "channel_collision", &message));
            return Next::Continue;
        }
        match self.sub.add(&channel, &since).await {
            Ok(Some(joined)) => {
                self.channels_changed(1);
                // After a gap the client must keep its own cursor: were it to adopt `begin`
                // and drop before the gap frame, the notice would be lost.
                let at = match (&joined.gap, &since) {
                    (Some(_), Since::After(p)) => p.clone(),
                    _ => joined.begin,
                };
                let cursor = Cursor::single(&channel, at).encode();
                self.push(json!({"type": "reply", "id": id, "ok": true, "cursor": cursor}));
                self.queue_ready()
            }
            Ok(None) => {
                self.push(error_reply(
                    &id,
                    "already_subscribed",
                    &format!("already subscribed to {channel}"),
                ));
                Next::Continue
            }
            Err(e) => {
                // The half-done join is undone so a retry starts clean.
                self.sub.remove(&channel);
                let e = ApiError::from(e);
                self.push(error_reply(&id, e.code, &e.message));
                Next::Continue
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::config::Config;

    /// What a parked WebSocket holds beside its connection's task: the box its session runs
    /// in (`net::upgrade`). Measured with `size_of_val`, not RSS, so it is exact; the bound
    /// has a little room over today's size (docs/benchmarks.md, *Idle memory*).
    #[tokio::test]
    async fn a_parked_websocket_session_stays_small() {
        let state = AppState::new(Config::default()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (socket, _) = listener.accept().await.unwrap();
        let io = SessionIo::Tcp(crate::net::deadline::Deadline::new(
            socket,
            std::time::Duration::from_secs(1),
        ));
        let sub = state.node.session(1 << 20, true, None);
        let peer = Peer::new(&state, Principal::Anonymous, None);
        // As `json` makes it: the handshake's answer carries the session, started on the
        // socket the way the protocol layer starts it (the box it runs in is what is held).
        let ws = WsUpgrade {
            key: Some(HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ==")),
            access: None,
        };
        let parts = Box::new((state, sub, peer));
        let res = ws.accept(move |io, pre| {
            let (state, sub, peer) = *parts;
            run(state, (io, pre), sub, Mode::Json, peer, false)
        });
        let pending = res.extensions().get::<Pending>().unwrap().clone();
        let session = pending.start(io, Bytes::new()).unwrap();
        let size = std::mem::size_of_val(&*session);
        let bound = SESSION_BOUND;
        eprintln!("a parked WebSocket session: {size} bytes");
        assert!(
            size <= bound,
            "a parked WebSocket session is {size} bytes (bound {bound})"
        );
    }

    /// Today: 432 bytes in a debug build (448 while it kept a `SessionGauge`, the metrics'
    /// pointer beside the state's, and a 32-bit count of malformed frames; 536 while the
    /// session kept two tokio `Instant`s,
    /// the decoder its limit, the peer its address and flag inline beside the token's timer,
    /// the subscription its `ClientInfo` as given, the gauge a 64-bit count and kind, and the
    /// access log's map its status beside the entry; 680 while the parked access-log entry
    /// was inline in the map around the session, ~100 bytes whether or not the log is on; 728 while
    /// the wait was a `select!` of four futures, and the first step, a `Next`, was kept
    /// twice beside a `next` that stayed across the wait; 760 with the raw channel beside the
    /// subscription that holds it and a second `AppState` in the peer; 928 while the
    /// parked select kept `read_more`'s
    /// future, 88 bytes, and the access log's wrapper was an `async` block that kept the
    /// socket and the first bytes a second time; 1,400 with the queue's `Notify`, a kill token,
    /// a shutdown wait and a reload watch of its own; 1,024 with a ping timer of its own
    /// instead of the node's shared tick; 976 before the subscription's replay list was
    /// boxed and its cursor text a local). Awaiting the session from a capture (it is then
    /// kept twice) made it ~2,500.
    // One bound for debug and release builds: the sizes differ by a few bytes.
    const SESSION_BOUND: usize = 440;
}
