//! WebSocket: `/ws/{channel}` (raw: frames out are payloads, frames in are published) and
//! `/ws` (the JSON protocol of SPEC §5: any number of channels, publish with acks, history,
//! presence, ping). Over HTTP/1.1 upgrades and HTTP/2 extended CONNECT (RFC 8441) alike.
//!
//! Concurrency: each socket is split. The reader task parses frames and answers what needs
//! no subscription state (publish, history, presence, ping) by sending ready-made frames to
//! the writer; subscribe and unsubscribe go to the writer as commands, because the writer
//! owns the `Subscription`. The writer is the only task that touches the sink: it drains
//! commands and the subscription's queue, feeds every frame, then flushes once. The two
//! halves never wait for each other except through the bounded command channel, whose
//! backpressure is the client's own TCP window. A client that stops reading overflows its
//! queue; the overflow hook cancels the session's kill token, which the writer watches even
//! while a flush is stuck, so the session ends (4008) instead of hanging.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tidings_core::{
    ChannelName, Cursor, Data, Disconnect, DisconnectReason, Event, EventName, Message, Since,
    Start, Subscription,
};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::api::error::ApiError;
use crate::api::publish::{self, position_json};
use crate::auth::Principal;
use crate::limits::RateLimiter;
use crate::metrics::SessionGauge;
use crate::server::{AppState, ConnectionCtx};
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
const MAX_MALFORMED: u32 = 10;
/// Commands waiting for the writer; the reader waits when the writer is this far behind.
const COMMAND_QUEUE: usize = 64;
/// How long a goodbye (disconnect frame + close) may take before the socket is just dropped.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);
/// tungstenite's buffers: reads grow on demand from here (a frame's whole length is reserved
/// once its header is read, so small only costs a few more reads for bursts of small
/// frames); writes are batched up to this before they go out (a flush always writes
/// everything). The 128 KiB defaults would cost ~256 KiB per idle connection.
const READ_BUFFER: usize = 512;
const WRITE_BUFFER: usize = 16 * 1024;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Raw,
    Json,
}

/// The reader's end of the command queue. Commands travel boxed: tokio's channel allocates
/// its slots 32 at a time up front, and unboxed (128 bytes each) that block alone was 4 KiB
/// of every idle connection.
#[derive(Clone)]
struct Commands(mpsc::Sender<Box<Command>>);

impl Commands {
    async fn send(&self, cmd: Command) -> Result<(), ()> {
        self.0.send(Box::new(cmd)).await.map_err(|_| ())
    }
}

enum Command {
    Frame(WsMessage),
    Subscribe {
        id: Option<Value>,
        channel: ChannelName,
        since: Since,
    },
    Unsubscribe {
        id: Option<Value>,
        channel: ChannelName,
    },
    Close(u16, &'static str),
}

fn upgrade_error(method: &Method) -> ApiError {
    if method != Method::GET && method != Method::CONNECT {
        ApiError::method_not_allowed()
    } else {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "websocket_required",
            "this route speaks WebSocket: send an Upgrade: websocket request (or HTTP/2 extended CONNECT)",
        )
    }
}

fn configure(ws: WebSocketUpgrade, state: &AppState) -> WebSocketUpgrade {
    let max = state.config.server.max_message_bytes;
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(state.config.server.queue_max_bytes.max(WRITE_BUFFER * 4))
        .max_message_size(max)
        .max_frame_size(max)
}

/// `GET /ws/{channel}`: raw mode.
pub async fn raw(
    State(state): State<AppState>,
    conn: Option<axum::Extension<ConnectionCtx>>,
    method: Method,
    Path(channel): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let p = params::parse(
        Some(&channel),
        query.as_deref(),
        &headers,
        &state.config.server,
        false,
    )?;
    let who = params::authorize(&state, &p, &headers, query.as_deref())?;
    let ws = ws.map_err(|_| upgrade_error(&method))?;
    let channel = p.channels[0].clone();
    let mut sub = state.node.session(
        state.config.server.queue_max_bytes,
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
    // Boxed: axum keeps the callback's captures for the socket's whole life, beside the
    // writer they are moved into.
    let session = Box::new((state.clone(), sub, channel, peer));
    Ok(configure(ws, &state).on_upgrade(move |mut socket| {
        use futures_util::future::Either;
        if gap {
            Either::Left(async move {
                let goodbye = socket.send(close_frame(close::GAP, "gap"));
                let _ = tokio::time::timeout(GOODBYE_TIMEOUT, goodbye).await;
            })
        } else {
            let (state, sub, channel, peer) = *session;
            Either::Right(run(state, socket, sub, Mode::Raw, Some(channel), peer))
        }
    }))
}

/// `GET /ws`: the JSON protocol.
pub async fn json(
    State(state): State<AppState>,
    conn: Option<axum::Extension<ConnectionCtx>>,
    method: Method,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // Bad credentials are refused before the upgrade (401/400); what they allow is checked
    // per op, so one socket can follow public channels and granted ones.
    let who = state.auth.authenticate(&headers, query.as_deref())?;
    let ws = ws.map_err(|_| upgrade_error(&method))?;
    let sub = state.node.session(
        state.config.server.queue_max_bytes,
        true,
        Some(who.client_info()),
    );
    let peer = Peer::new(&state, who, conn.as_deref());
    let session = Box::new((state.clone(), sub, peer));
    Ok(configure(ws, &state).on_upgrade(move |socket| {
        let (state, sub, peer) = *session;
        run(state, socket, sub, Mode::Json, None, peer)
    }))
}

/// Who is on the other end, and how fast they may publish.
#[derive(Clone)]
struct Peer {
    who: Arc<Principal>,
    publish_rate: Arc<RateLimiter>,
    limited: bool,
}

impl Peer {
    fn new(state: &AppState, who: Principal, conn: Option<&ConnectionCtx>) -> Self {
        let publish_rate = conn.map_or_else(
            || Arc::new(RateLimiter::new(state.config.server.client_publish_rate)),
            |c| c.publish_rate.clone(),
        );
        Self {
            limited: state.auth.enabled() && who != Principal::ApiKey,
            who: Arc::new(who),
            publish_rate,
        }
    }

    /// API keys (backends) are not rate limited, nor is anyone in open mode (development);
    /// with `[auth]`, everyone else shares the connection's bucket.
    fn may_publish_now(&self) -> bool {
        !self.limited || self.publish_rate.try_take()
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

fn close_frame(code: u16, reason: &'static str) -> WsMessage {
    WsMessage::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

fn text(value: &Value) -> WsMessage {
    WsMessage::Text(Utf8Bytes::from(value.to_string()))
}

/// When the peer was last heard from (any frame, pongs included: it is alive) and last
/// active (a frame of its own: it is using the socket). Shared by the reader, which records,
/// and the writer, which pings and enforces the idle timeout.
#[derive(Clone)]
struct Liveness {
    epoch: Instant,
    heard: Arc<AtomicU64>,
    active: Arc<AtomicU64>,
}

impl Liveness {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            heard: Arc::new(AtomicU64::new(0)),
            active: Arc::new(AtomicU64::new(0)),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn heard(&self, data: bool) {
        let now = self.now();
        self.heard.store(now, Relaxed);
        if data {
            self.active.store(now, Relaxed);
        }
    }

    fn silent_for(&self) -> Duration {
        Duration::from_millis(self.now().saturating_sub(self.heard.load(Relaxed)))
    }

    fn idle_for(&self) -> Duration {
        Duration::from_millis(self.now().saturating_sub(self.active.load(Relaxed)))
    }
}

/// Sets the session up and returns the writer's future. Not `async` itself: its arguments
/// would stay in the future beside the `Writer` they were moved into, doubling what every
/// connection holds.
fn run(
    state: AppState,
    socket: WebSocket,
    sub: Subscription,
    mode: Mode,
    raw_channel: Option<ChannelName>,
    peer: Peer,
) -> impl Future<Output = ()> + Send {
    let mut gauge = state.metrics.session(TransportKind::WebSocket, 0);
    gauge.channels_changed(sub.channels().len() as i64);
    let kill = CancellationToken::new();
    {
        let kill = kill.clone();
        let metrics = state.metrics.clone();
        sub.on_overflow(move || {
            metrics.slow_disconnects[TransportKind::WebSocket as usize].fetch_add(1, Relaxed);
            kill.cancel();
        });
    }
    let (sink, stream) = socket.split();
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let tx = Commands(tx);
    let liveness = Liveness::new();
    let expires = peer
        .who
        .expires_at()
        .map(crate::transport::stream::deadline_for);
    let reader = tokio::spawn(read_loop(
        state.clone(),
        stream,
        tx,
        mode,
        raw_channel,
        liveness.clone(),
        peer,
    ));
    let mut writer = Writer {
        state,
        sink,
        sub,
        gauge,
        mode,
        kill,
        liveness,
        expires,
    };
    // Uses the captured `writer` in place (an `async fn` taking it would hold a copy).
    async move {
        writer.run(rx).await;
        reader.abort();
    }
}

struct Writer {
    state: AppState,
    sink: SplitSink<WebSocket, WsMessage>,
    sub: Subscription,
    gauge: SessionGauge,
    mode: Mode,
    kill: CancellationToken,
    liveness: Liveness,
    /// The token's expiry: the session ends then (disconnect `token_expired`, close 1008).
    expires: Option<Instant>,
}

enum Wake {
    Kill,
    Shutdown,
    Expired,
    Command(Option<Box<Command>>),
    Ready,
    Ping,
}

/// What the writer does after handling an event.
enum Next {
    Continue,
    Goodbye(Option<DisconnectReason>, u16, &'static str),
    /// The reader is gone (the peer closed or broke the socket): flush what tungstenite
    /// owes it (its close reply) and stop.
    Finish,
}

impl Writer {
    async fn run(&mut self, mut rx: mpsc::Receiver<Box<Command>>) {
        let every = self.state.config.server.ping_interval;
        let mut ping = tokio::time::interval_at(Instant::now() + every, every);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let shutdown = self.state.shutdown.clone();
        // Whatever the join queued (raw mode's replay) goes out first.
        let mut next = self.write_ready().await;
        loop {
            if let Next::Continue = next {
                let flushed = tokio::select! {
                    r = self.sink.flush() => r.is_ok(),
                    _ = self.kill.cancelled() => false,
                };
                if !flushed {
                    next = Next::Goodbye(Some(DisconnectReason::Slow), close::SLOW, "slow");
                }
            }
            match next {
                Next::Continue => {}
                Next::Finish => {
                    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, self.sink.close()).await;
                    return;
                }
                Next::Goodbye(reason, code, why) => {
                    self.goodbye(reason, code, why).await;
                    return;
                }
            }
            let wake = tokio::select! {
                biased;
                _ = self.kill.cancelled() => Wake::Kill,
                _ = shutdown.cancelled() => Wake::Shutdown,
                _ = crate::transport::stream::sleep_until_opt(self.expires) => Wake::Expired,
                cmd = rx.recv() => Wake::Command(cmd),
                _ = self.sub.ready() => Wake::Ready,
                _ = ping.tick() => Wake::Ping,
            };
            next = match wake {
                Wake::Kill => Next::Goodbye(Some(DisconnectReason::Slow), close::SLOW, "slow"),
                Wake::Shutdown => {
                    Next::Goodbye(Some(DisconnectReason::Shutdown), close::RESTART, "shutdown")
                }
                Wake::Expired => {
                    let (code, why) = close_for(DisconnectReason::TokenExpired);
                    Next::Goodbye(Some(DisconnectReason::TokenExpired), code, why)
                }
                Wake::Command(None) => Next::Finish,
                Wake::Command(Some(cmd)) => {
                    // Boxed: rare, and its future is large (a join) — inline, every
                    // connection's task would be sized for it.
                    let mut next = Box::pin(self.command(*cmd)).await;
                    // Take whatever else is already waiting, so one flush covers it all.
                    while let Next::Continue = next {
                        match rx.try_recv() {
                            Ok(cmd) => next = Box::pin(self.command(*cmd)).await,
                            Err(_) => break,
                        }
                    }
                    next
                }
                Wake::Ready => self.write_ready().await,
                Wake::Ping => self.ping().await,
            };
        }
    }

    async fn ping(&mut self) -> Next {
        let every = self.state.config.server.ping_interval;
        if self.liveness.silent_for() > every * 2 {
            return Next::Goodbye(None, close::GOING_AWAY, "ping timeout");
        }
        // Idle: subscribed to nothing and sending nothing but pongs.
        if self.mode == Mode::Json
            && self.sub.channels().is_empty()
            && self.liveness.idle_for() > self.state.config.server.idle_timeout
        {
            return Next::Goodbye(None, close::NORMAL, "idle");
        }
        self.feed(WsMessage::Ping(Bytes::new())).await
    }

    /// Buffers one frame (tungstenite writes out once its buffer passes WRITE_BUFFER; the
    /// flush after each batch writes the rest). Waiting for room is cut short by the kill
    /// token, so a client that stopped reading cannot pin the writer here.
    async fn feed(&mut self, frame: WsMessage) -> Next {
        tokio::select! {
            r = self.sink.feed(frame) => match r {
                Ok(()) => Next::Continue,
                Err(_) => Next::Finish,
            },
            _ = self.kill.cancelled() => Next::Goodbye(Some(DisconnectReason::Slow), close::SLOW, "slow"),
        }
    }

    async fn command(&mut self, cmd: Command) -> Next {
        match cmd {
            Command::Frame(frame) => self.feed(frame).await,
            Command::Close(code, why) => Next::Goodbye(None, code, why),
            Command::Subscribe { id, channel, since } => {
                let max = self.state.config.server.max_channels_per_subscription;
                if self.sub.channels().len() >= max {
                    return self
                        .feed(error_reply(
                            &id,
                            "too_many_channels",
                            &format!("at most {max} channels per connection (max_channels_per_subscription)"),
                        ))
                        .await;
                }
                match self.sub.add(&channel, &since).await {
                    Ok(Some(joined)) => {
                        self.gauge.channels_changed(1);
                        // After a gap the client must keep its own cursor: were it to adopt
                        // `begin` and drop before the gap frame, the notice would be lost.
                        let at = match (&joined.gap, &since) {
                            (Some(_), Since::After(p)) => p.clone(),
                            _ => joined.begin,
                        };
                        let cursor = Cursor::single(&channel, at).encode();
                        let reply =
                            json!({"type": "reply", "id": id, "ok": true, "cursor": cursor});
                        match self.feed(text(&reply)).await {
                            Next::Continue => self.write_ready().await,
                            other => other,
                        }
                    }
                    Ok(None) => {
                        self.feed(error_reply(
                            &id,
                            "already_subscribed",
                            &format!("already subscribed to {channel}"),
                        ))
                        .await
                    }
                    Err(e) => {
                        // The half-done join is undone so a retry starts clean.
                        self.sub.remove(&channel);
                        let e = ApiError::from(e);
                        self.feed(error_reply(&id, e.code, &e.message)).await
                    }
                }
            }
            Command::Unsubscribe { id, channel } => {
                if self.sub.remove(&channel) {
                    self.gauge.channels_changed(-1);
                    self.feed(text(&json!({"type": "reply", "id": id, "ok": true})))
                        .await
                } else {
                    self.feed(error_reply(
                        &id,
                        "not_subscribed",
                        &format!("not subscribed to {channel}"),
                    ))
                    .await
                }
            }
        }
    }

    /// Feeds every event that is ready. Raw mode cannot express a gap: it closes with 4010.
    async fn write_ready(&mut self) -> Next {
        let mut frames: Vec<WsMessage> = Vec::new();
        let mut gap = false;
        let mode = self.mode;
        let gauge = &self.gauge;
        let drained = self.sub.drain(|event, cursor| match event {
            Event::Message(m) => frames.push(match mode {
                Mode::Raw => raw_frame(m),
                Mode::Json => envelope_frame(m),
            }),
            Event::Presence(e) => {
                if mode == Mode::Json {
                    frames.push(text(&typed(e.kind.as_str(), e.body())));
                }
            }
            Event::Gap(g) => {
                gauge.gap();
                if mode == Mode::Raw {
                    gap = true;
                } else {
                    let mut v = typed("gap", serde_json::to_value(g).unwrap_or_default());
                    v["cursor"] = json!(String::from_utf8_lossy(cursor));
                    frames.push(text(&v));
                }
            }
        });
        let delivered = frames.len() as u64;
        for frame in frames {
            match self.feed(frame).await {
                Next::Continue => {}
                other => return other,
            }
        }
        match drained {
            Ok(_) if gap => Next::Goodbye(None, close::GAP, "gap"),
            Ok(_) => {
                self.gauge.delivered(delivered);
                Next::Continue
            }
            Err(reason) => {
                let (code, why) = close_for(reason);
                Next::Goodbye(Some(reason), code, why)
            }
        }
    }

    /// Best effort: the disconnect frame (JSON mode), the close frame, bounded in time.
    async fn goodbye(&mut self, reason: Option<DisconnectReason>, code: u16, why: &'static str) {
        let sink = &mut self.sink;
        let mode = self.mode;
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async move {
            if let (Some(reason), Mode::Json) = (reason, mode) {
                let d = Disconnect::from(reason);
                let v = json!({"type": "disconnect", "reason": d.reason, "reconnect": d.reconnect});
                sink.feed(text(&v)).await?;
            }
            sink.send(close_frame(code, why)).await?;
            sink.close().await
        })
        .await;
    }
}

fn raw_frame(m: &Message) -> WsMessage {
    match &m.data {
        Data::Binary(b) => WsMessage::Binary(b.clone()),
        // Validated UTF-8 at publish: this only re-checks, it never fails.
        Data::Json(b) | Data::Text(b) => match Utf8Bytes::try_from(b.clone()) {
            Ok(t) => WsMessage::Text(t),
            Err(_) => WsMessage::Binary(b.clone()),
        },
    }
}

/// `{"type":"message",…envelope}` with the message's own cursor, encoded once per message.
fn envelope_frame(m: &Message) -> WsMessage {
    let bytes = m.cached_frame(frame_slot::WS_ENVELOPE, |m| {
        let envelope = m.envelope();
        let mut b = BytesMut::with_capacity(envelope.len() + 16);
        b.put_slice(b"{\"type\":\"message\",");
        b.put_slice(&envelope[1..]);
        b.freeze()
    });
    match Utf8Bytes::try_from(bytes.clone()) {
        Ok(t) => WsMessage::Text(t),
        Err(_) => WsMessage::Binary(bytes.clone()),
    }
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

fn error_reply(id: &Option<Value>, code: &str, message: &str) -> WsMessage {
    text(&json!({"type": "reply", "id": id, "error": {"code": code, "message": message}}))
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

impl From<(Option<Value>, ApiError)> for Malformed {
    fn from((id, e): (Option<Value>, ApiError)) -> Self {
        Self {
            id,
            code: e.code,
            message: e.message,
        }
    }
}

async fn read_loop(
    state: AppState,
    mut stream: SplitStream<WebSocket>,
    tx: Commands,
    mode: Mode,
    raw_channel: Option<ChannelName>,
    liveness: Liveness,
    peer: Peer,
) {
    let mut malformed = 0u32;
    while let Some(frame) = stream.next().await {
        let data = matches!(frame, Ok(WsMessage::Text(_) | WsMessage::Binary(_)));
        liveness.heard(data);
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                // tungstenite's errors are matched by message: axum hides their types. An
                // over-limit frame is a capacity error.
                let text = e.to_string();
                let code = if text.contains("too long") || text.contains("Space limit") {
                    close::TOO_BIG
                } else if text.contains("UTF-8") {
                    // RFC 6455 §7.4.1: a text message that is not UTF-8 is 1007, not 1002.
                    close::INVALID_PAYLOAD
                } else {
                    close::PROTOCOL
                };
                let _ = tx.send(Command::Close(code, "bad frame")).await;
                return;
            }
        };
        let outcome = match (mode, frame) {
            (_, WsMessage::Close(_)) => return,
            (_, WsMessage::Ping(_) | WsMessage::Pong(_)) => continue,
            (Mode::Raw, WsMessage::Text(t)) => {
                raw_publish(&state, &raw_channel, Data::Text(t.into()), &peer).await
            }
            (Mode::Raw, WsMessage::Binary(b)) => {
                raw_publish(&state, &raw_channel, Data::Binary(b), &peer).await
            }
            // Boxed for the same reason as the writer's commands.
            (Mode::Json, WsMessage::Text(t)) => {
                match Box::pin(request(&state, &tx, t.as_str(), &peer)).await {
                    Ok(()) => {
                        malformed = 0;
                        Ok(())
                    }
                    Err(m) => {
                        malformed += 1;
                        if tx
                            .send(Command::Frame(error_reply(&m.id, m.code, &m.message)))
                            .await
                            .is_err()
                        {
                            return;
                        }
                        if malformed >= MAX_MALFORMED {
                            Err((close::POLICY, "too many malformed frames"))
                        } else {
                            Ok(())
                        }
                    }
                }
            }
            (Mode::Json, WsMessage::Binary(_)) => {
                malformed += 1;
                let reply = error_reply(
                    &None,
                    "invalid_frame",
                    "the /ws protocol takes JSON text frames",
                );
                if tx.send(Command::Frame(reply)).await.is_err() {
                    return;
                }
                if malformed >= MAX_MALFORMED {
                    Err((close::POLICY, "too many malformed frames"))
                } else {
                    Ok(())
                }
            }
        };
        if let Err((code, why)) = outcome {
            let _ = tx.send(Command::Close(code, why)).await;
            return;
        }
    }
}

/// Raw mode: every frame in is a publish to the socket's channel, when its namespace lets
/// clients publish. A refused or failed publish closes the socket: raw mode has no replies.
async fn raw_publish(
    state: &AppState,
    channel: &Option<ChannelName>,
    data: Data,
    peer: &Peer,
) -> Result<(), (u16, &'static str)> {
    let Some(channel) = channel else {
        return Err((close::INTERNAL, "no channel"));
    };
    let policy = state.node.policies.for_channel(channel);
    if state
        .auth
        .check_publish(&peer.who, channel, policy)
        .is_err()
    {
        return Err((close::POLICY, "publishing to this channel is not allowed"));
    }
    if !peer.may_publish_now() {
        // Raw mode has no error frame to say "slow down": the policy close is the answer.
        return Err((close::POLICY, "publish rate limit exceeded"));
    }
    if data.len() > state.config.server.max_message_bytes {
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
    },
    History {
        channel: ChannelName,
        since: Since,
        /// At most 10,000.
        limit: usize,
    },
    Presence {
        channel: ChannelName,
    },
}

/// The pure half of a `/ws` request: JSON to a validated op, with no server state but the
/// message size limit. `Err` is a malformed frame (it counts toward 1008). The fuzz target
/// `ws_request` runs exactly this.
pub fn parse_request(frame: &str, max_message_bytes: usize) -> Result<ParsedRequest, Malformed> {
    let req: Request = serde_json::from_str(frame).map_err(|e| {
        Malformed::new(
            &None,
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
            Op::Publish {
                channel: v.channel,
                event: v.event,
                data: v.data,
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

/// Handles one JSON request. `Err` is a malformed frame; operational failures (a broker
/// error, a forbidden publish) are error replies that do not count toward 1008.
async fn request(
    state: &AppState,
    tx: &Commands,
    frame: &str,
    peer: &Peer,
) -> Result<(), Malformed> {
    let ParsedRequest { id, op } = parse_request(frame, state.config.server.max_message_bytes)?;
    let send = |m: WsMessage| async { tx.send(Command::Frame(m)).await.is_ok() };
    match op {
        Op::Ping => {
            send(text(&json!({"type": "pong", "id": id}))).await;
        }
        Op::Subscribe { channel, since } => {
            let policy = state.node.policies.for_channel(&channel);
            match state.auth.check_subscribe(&peer.who, &channel, policy) {
                Ok(()) => {
                    let _ = tx.send(Command::Subscribe { id, channel, since }).await;
                }
                Err(e) => {
                    send(error_reply(&id, e.code, &e.message)).await;
                }
            }
        }
        Op::Unsubscribe { channel } => {
            let _ = tx.send(Command::Unsubscribe { id, channel }).await;
        }
        Op::Publish {
            channel,
            event,
            data,
        } => {
            let policy = state.node.policies.for_channel(&channel);
            let reply = if let Err(e) = state.auth.check_publish(&peer.who, &channel, policy) {
                error_reply(&id, e.code, &e.message)
            } else if !peer.may_publish_now() {
                error_reply(
                    &id,
                    "rate_limited",
                    "too many publishes on this connection (client_publish_rate); slow down",
                )
            } else {
                match publish::publish(state, &channel, event, data).await {
                    Ok(m) => {
                        let mut reply = typed("reply", json!({"id": id, "ok": true}));
                        if let (Some(r), Value::Object(position)) =
                            (reply.as_object_mut(), position_json(&m))
                        {
                            r.extend(position);
                        }
                        text(&reply)
                    }
                    Err(e) => error_reply(&id, e.code, &e.message),
                }
            };
            send(reply).await;
        }
        Op::History {
            channel,
            since,
            limit,
        } => {
            let policy = state.node.policies.for_channel(&channel);
            if let Err(e) = state.auth.check_subscribe(&peer.who, &channel, policy) {
                send(error_reply(&id, e.code, &e.message)).await;
                return Ok(());
            }
            let reply = match state.node.read(&channel, &since, Some(limit)).await {
                Ok(read) => {
                    let messages: Vec<Value> = read
                        .replay
                        .messages()
                        .iter()
                        .map(|m| serde_json::from_slice(&m.envelope()).unwrap_or_default())
                        .collect();
                    let end = read
                        .replay
                        .messages()
                        .last()
                        .map_or(read.top.clone(), |m| m.position());
                    let gaps: Vec<_> = read.replay.gap().into_iter().collect();
                    text(&json!({
                        "type": "reply", "id": id, "ok": true,
                        "messages": messages,
                        "cursor": Cursor::single(&channel, end).encode(),
                        "gaps": gaps,
                    }))
                }
                Err(e) => {
                    let e = ApiError::from(e);
                    error_reply(&id, e.code, &e.message)
                }
            };
            send(reply).await;
        }
        Op::Presence { channel } => {
            let policy = state.node.policies.for_channel(&channel);
            if let Err(e) = state.auth.check_subscribe(&peer.who, &channel, policy) {
                send(error_reply(&id, e.code, &e.message)).await;
                return Ok(());
            }
            let reply = match crate::api::channels::presence_of(state, &channel).await {
                Ok(clients) => {
                    text(&json!({"type": "reply", "id": id, "ok": true, "clients": clients}))
                }
                Err(e) => error_reply(&id, e.code, &e.message),
            };
            send(reply).await;
        }
    }
    Ok(())
}
