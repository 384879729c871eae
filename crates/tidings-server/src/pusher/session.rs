//! `GET /app/{key}?protocol=7`: one Pusher protocol session per WebSocket.
//!
//! The handshake is always accepted; what Pusher refuses is refused the Pusher way, with a
//! `pusher:error` and a close code pusher-js acts on: 4001 unknown app key, 4006/4007/4008
//! a bad protocol version, 4004 over the app's `max_connections`. Later ends: 4009 when the
//! app terminates the user's connections, 4100 when the client reads too slowly (its queue
//! overflowed) and on server shutdown, 4201 when the client stopped answering. 4100 ("reconnect
//! after backing off") rather than 4200 on shutdown: pusher-js then retries after a second,
//! which finds a restarted single node already listening, where an immediate retry hits the
//! closed port and leaves the client "unavailable" for pusher-js' 10 s timeout.
//!
//! Concurrency: as in `transport/websocket.rs`, one task owns the socket and the
//! `Subscription` and waits on everything at once (socket, queue, timer, kill, termination).
//! Shutdown reaches it through its queue, in the hub's one pass over every session
//! (`lifecycle::follow`), as it reaches `/ws` sessions: no shutdown wait of its own. Frames
//! in are handled in order; a client event awaits its publish before the next frame is read.
//! Frames out go to one buffer written with as few calls as the kernel takes. The app's registry (`tidings_pusher::registry`, cluster-wide through its roster) is
//! touched on subscribe, unsubscribe and close only, never per delivered message; the
//! per-message path copies one cached frame and compares the socket id it names, if any
//! (the `socket_id` a trigger excludes, a client event's sender: carried in the message, so
//! it works whichever node took the trigger).
//!
//! Presence: members live in the roster, one per `user_id` across the cluster. The first
//! socket of a user on a channel anywhere makes its node broadcast the join; every node
//! (`pusher/cluster.rs`) hands it to its hub (`Hub::deliver_presence`, a `PresenceEvent`
//! whose client is the socket id and whose user is the `user_id`), so every subscriber of the
//! channel, Tidings' own included, sees `member_added`; the last one's leave, or a dead
//! node's reap, `member_removed`. A session that ends without its goodbye (its future
//! dropped) leaves its channels from a spawned task.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use bytes::Bytes;
use serde_json::Value;
use tidings_core::{ChannelName, Event, PresenceKind, Since, Subscription};
use tidings_pusher::names::{ChannelKind, PusherChannel};
use tidings_pusher::protocol::{self, ClientMessage, code};
use tidings_pusher::{App, Socket, bridge, sign};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::app::error::ApiError;
use crate::net::upgrade::SessionIo as WsIo;
use crate::net::wsframe::{self, Decoder, Incoming, OP_PONG, OP_TEXT};
use crate::state::AppState;
use crate::transport::frame_slot;
use crate::transport::websocket::WsUpgrade;
use crate::transport::ws_socket::{Flushed, GOODBYE_TIMEOUT, WsSocket};

/// Channels one connection may follow.
const MAX_CHANNELS: usize = 500;
/// How often the session checks that the client is alive.
const CHECK_EVERY: Duration = Duration::from_secs(30);
/// Silence past the activity timeout plus this ends the session (4201).
const PONG_GRACE: Duration = Duration::from_secs(30);
/// Malformed frames in a row before the connection is closed.
const MAX_MALFORMED: u32 = 10;

/// `GET /app/{key}`.
pub async fn connect(
    State(state): State<AppState>,
    Path(key): Path<String>,
    RawQuery(query): RawQuery,
    ws: Result<WsUpgrade, ApiError>,
) -> Result<Response, ApiError> {
    let ws = ws?;
    let app = state.pusher.by_key(&key);
    let protocol = protocol::check_protocol(query.as_deref());
    Ok(ws.accept(move |io, pre| run(state, app, protocol, io, pre)))
}

/// A followed channel.
struct Followed {
    pusher: PusherChannel,
    /// The `user_id` this socket is present as (presence channels).
    member: Option<String>,
}

struct Session {
    /// The socket, what was read from it and what is queued for it.
    ws: WsSocket,
    decoder: Decoder,
    state: AppState,
    app: Arc<App>,
    socket: Arc<Socket>,
    sub: Subscription,
    /// A list, not a map: most connections follow a channel or two, and an idle socket's
    /// memory is what a map's buckets would add to.
    followed: Vec<(ChannelName, Followed)>,
    kill: tidings_core::Kill,
    terminated: CancellationToken,
    /// When the client was last heard from, in `Shared::millis` (4 bytes, not 16).
    heard: u32,
    pinged: bool,
    malformed: u32,
    /// Client events in the current one-second window.
    window: (u32, u32),
}

enum Next {
    Continue,
    Goodbye(u16, &'static str),
    Echo(Option<u16>),
    Gone,
}

/// Sets the session up and returns its future, or the refusal's. Not `async` itself: its
/// arguments would stay in the future beside the `Session` they were moved into (memory per
/// idle connection).
fn run(
    state: AppState,
    app: Option<Arc<App>>,
    protocol: Result<(), (u16, &'static str)>,
    io: WsIo,
    pre: Bytes,
) -> impl Future<Output = u64> + Send {
    use futures_util::future::Either;
    match setup(state, app, protocol, io, pre) {
        Ok(mut s) => Either::Left(async move {
            s.run().await;
            s.ws.written
        }),
        Err((io, code, why)) => Either::Right(refuse(io, code, why)),
    }
}

type Refusal = (WsIo, u16, &'static str);

fn setup(
    state: AppState,
    app: Option<Arc<App>>,
    protocol: Result<(), (u16, &'static str)>,
    io: WsIo,
    pre: Bytes,
) -> Result<Session, Refusal> {
    let Some(app) = app else {
        return Err((io, code::APP_NOT_FOUND, "App key not in this server"));
    };
    if let Err((c, why)) = protocol {
        return Err((io, c, why));
    }
    let terminated = CancellationToken::new();
    let socket_id = protocol::socket_id();
    let socket = {
        let t = terminated.clone();
        match app.connect(socket_id.clone(), move || t.cancel()) {
            Ok(s) => s,
            Err(_) => return Err((io, code::OVER_QUOTA, "Over connection quota")),
        }
    };
    let mut sub = state
        .node
        .session(state.config().server.queue_max_bytes, true, None);
    // Its own queue's switch: no allocation of its own (no connection's task waits on it).
    let kill = sub.own_kill();
    // Shutdown ends the queue (`drain` and `cut` say `Shutdown`); a reload only wakes it
    // (what a reload changes for Pusher, its apps, comes through `terminated`). No shared
    // tick: its liveness check keeps its own timer.
    crate::lifecycle::follow(&state, &mut sub, None);
    sub.on_overflow(kill.clone());
    let now = state.millis();
    let mut s = Session {
        ws: WsSocket::new(io, &pre),
        decoder: Decoder::new(),
        state,
        app,
        socket,
        sub,
        followed: Vec::new(),
        kill,
        terminated,
        heard: now,
        pinged: false,
        malformed: 0,
        window: (now, 0),
    };
    s.text(&protocol::connection_established(&socket_id));
    Ok(s)
}

/// However the session ends — its goodbye, a broken socket, or its future dropped — it
/// leaves its channels (presence included) and the app forgets the socket.
impl Drop for Session {
    fn drop(&mut self) {
        let left: Vec<Followed> = self.detach_all();
        if !left.is_empty()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let (app, socket) = (self.app.clone(), self.socket.id.clone());
            rt.spawn(async move {
                for f in left {
                    release(&app, &socket, f).await;
                }
            });
        }
        self.app.disconnect(&self.socket);
    }
}

/// `{}`, or a presence channel's members, cluster-wide. (A free function: a `&Session`
/// held across the await would make the session's future need `Session: Sync`.)
async fn succeeded_data(
    app: &App,
    channel: &PusherChannel,
) -> Result<String, tidings_core::BrokerError> {
    if channel.kind != ChannelKind::Presence {
        return Ok("{}".into());
    }
    let members = app.members(&channel.name).await?;
    Ok(protocol::presence_data(
        members.iter().map(|(id, info)| (id.as_str(), info)),
    ))
}

/// Counts a socket out of a channel it followed: presence first, then the channel.
async fn release(app: &App, socket_id: &str, f: Followed) {
    if let Some(user) = &f.member {
        app.presence_leave(&f.pusher.name, user, socket_id).await;
    }
    if f.pusher.kind != ChannelKind::ServerToUser {
        app.unsubscribed(&f.pusher.name).await;
    }
}

/// Says why the connection is refused and closes it with `code`; returns the bytes written.
async fn refuse(io: WsIo, code: u16, why: &'static str) -> u64 {
    let mut ws = WsSocket::new(io, &Bytes::new());
    wsframe::encode(
        &mut ws.out,
        OP_TEXT,
        protocol::error(Some(code), why).as_bytes(),
    );
    wsframe::encode_close(&mut ws.out, code, why);
    ws.send_and_shut().await;
    ws.written
}

impl Session {
    fn text(&mut self, text: &str) {
        wsframe::encode(&mut self.ws.out, OP_TEXT, text.as_bytes());
    }

    async fn run(&mut self) {
        let mut check = tokio::time::interval_at(Instant::now() + CHECK_EVERY, CHECK_EVERY);
        check.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let (kill, terminated) = (self.kill.clone(), self.terminated.clone());
        let mut next = if self.ws.rbuf.is_empty() {
            Next::Continue
        } else {
            Box::pin(self.handle_input()).await
        };
        loop {
            if let Next::Continue = next {
                next = self.flush().await;
            }
            match next {
                Next::Continue => {}
                Next::Gone => return,
                Next::Echo(code) => return self.echo_close(code).await,
                Next::Goodbye(code, why) => return self.goodbye(code, why).await,
            }
            next = tokio::select! {
                biased;
                _ = kill.cancelled() => Next::Goodbye(code::OVER_CAPACITY, "Client too slow: queue overflowed"),
                _ = terminated.cancelled() => match self.socket.close_code() {
                    code::APP_NOT_FOUND => Next::Goodbye(code::APP_NOT_FOUND, "App removed from this server"),
                    code::RECONNECT => Next::Goodbye(code::RECONNECT, "App settings changed: reconnect"),
                    _ => Next::Goodbye(code::UNAUTHORIZED, "Connection terminated by the app"),
                },
                // A poll, not `read_more`'s future (88 bytes of every session's).
                r = std::future::poll_fn(|cx| self.ws.io.poll_read_more(cx, &mut self.ws.rbuf)) => match r {
                    Ok(0) | Err(_) => Next::Gone,
                    Ok(_) => Box::pin(self.handle_input()).await,
                },
                _ = self.sub.ready() => self.queue_ready(),
                _ = check.tick() => self.check_alive(),
            };
        }
    }

    fn check_alive(&mut self) -> Next {
        let timeout = Duration::from_secs(protocol::ACTIVITY_TIMEOUT_SECS);
        let silent = self.state.since(self.heard);
        if silent > timeout + PONG_GRACE {
            return Next::Goodbye(code::PONG_NOT_RECEIVED, "Pong reply not received");
        }
        if silent >= timeout && !self.pinged {
            self.pinged = true;
            self.text(&protocol::ping());
        }
        Next::Continue
    }

    async fn flush(&mut self) -> Next {
        let timeout = self.state.config().server.write_timeout;
        let (kill, sub) = (self.kill.clone(), &self.sub);
        let stop = async {
            tokio::select! {
                _ = kill.cancelled() => (code::OVER_CAPACITY, "Client too slow: queue overflowed"),
                reason = sub.cut() => match reason {
                    tidings_core::DisconnectReason::Shutdown => (code::OVER_CAPACITY, "Server is restarting"),
                    _ => (code::OVER_CAPACITY, "Client too slow: queue overflowed"),
                },
            }
        };
        match self.ws.flush(timeout, stop).await {
            Flushed::Done => Next::Continue,
            Flushed::Gone => Next::Gone,
            Flushed::Stopped((code, why)) => Next::Goodbye(code, why),
        }
    }

    /// A slow client's queued frames are dropped (a half-sent one is finished); the close
    /// goes behind what the kernel holds, bounded in time.
    async fn goodbye(&mut self, code: u16, why: &'static str) {
        if code == code::OVER_CAPACITY {
            self.ws.drop_backlog();
        }
        wsframe::encode_close(&mut self.ws.out, code, why);
        self.leave_all().await;
        let wait = if code == code::OVER_CAPACITY {
            self.state.config().server.write_timeout
        } else {
            GOODBYE_TIMEOUT
        };
        self.ws.close(wait).await;
    }

    async fn echo_close(&mut self, code: Option<u16>) {
        match code {
            Some(code) => wsframe::encode_close(&mut self.ws.out, code, ""),
            None => wsframe::encode(&mut self.ws.out, wsframe::OP_CLOSE, b""),
        }
        self.leave_all().await;
        self.ws.send_and_shut().await;
    }

    async fn handle_input(&mut self) -> Next {
        // Read here, not kept in the decoder: 8 bytes of every parked session.
        let max_frame = self
            .state
            .config()
            .server
            .max_message_bytes
            .max(self.app.config.max_event_bytes + 4096);
        loop {
            let incoming = match self.decoder.next(&mut self.ws.rbuf, max_frame) {
                Ok(Some(i)) => i,
                Ok(None) => break,
                Err(fail) => return Next::Goodbye(fail.code, fail.reason),
            };
            self.heard = self.state.millis();
            self.pinged = false;
            let next = match incoming {
                Incoming::Ping(payload) => {
                    wsframe::encode(&mut self.ws.out, OP_PONG, &payload);
                    Next::Continue
                }
                Incoming::Pong => Next::Continue,
                Incoming::Close(got) => return Next::Echo(got.map(|(c, _)| c)),
                Incoming::Text(text) => match std::str::from_utf8(&text) {
                    Ok(frame) => self.on_frame(frame).await,
                    Err(_) => self.malformed("not UTF-8"),
                },
                Incoming::Binary(_) => self.malformed("the Pusher protocol takes JSON text frames"),
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
        self.queue_ready()
    }

    fn malformed(&mut self, why: &str) -> Next {
        self.malformed += 1;
        self.text(&protocol::error(Some(code::BAD_REQUEST), why));
        if self.malformed >= MAX_MALFORMED {
            Next::Goodbye(wsframe_policy(), "too many malformed frames")
        } else {
            Next::Continue
        }
    }

    async fn on_frame(&mut self, frame: &str) -> Next {
        let msg = match protocol::parse(frame) {
            Ok(m) => m,
            Err(r) => return self.malformed(&r.message),
        };
        self.malformed = 0;
        match msg {
            ClientMessage::Ping => self.text(&protocol::pong()),
            ClientMessage::Pong => {}
            ClientMessage::Subscribe {
                channel,
                auth,
                channel_data,
            } => {
                self.subscribe(&channel, auth.as_deref(), channel_data.as_deref())
                    .await
            }
            ClientMessage::Unsubscribe { channel } => {
                if let Ok(c) = PusherChannel::parse(&self.app.config.id, &channel)
                    && let Ok(t) = c.tidings(&self.app.config.id)
                {
                    self.leave(&t).await;
                }
            }
            ClientMessage::Signin { auth, user_data } => self.signin(&auth, &user_data).await,
            ClientMessage::ClientEvent {
                event,
                channel,
                data,
            } => self.client_event(&event, &channel, &data).await,
        }
        Next::Continue
    }

    fn sub_error(&mut self, channel: &str, kind: &str, why: &str, status: u16) {
        self.text(&protocol::subscription_error(channel, kind, why, status));
    }

    async fn subscribe(&mut self, name: &str, auth: Option<&str>, channel_data: Option<&str>) {
        let app = self.app.clone();
        let id = app.config.id.as_str();
        let channel = match PusherChannel::parse(id, name) {
            Ok(c) => c,
            Err(e) => {
                let why = e.to_string();
                return self.sub_error(name, "InvalidChannel", &why, 400);
            }
        };
        let Ok(tidings) = channel.tidings(id) else {
            return self.sub_error(name, "InvalidChannel", "invalid channel name", 400);
        };
        if self.followed.iter().any(|(c, _)| *c == tidings) {
            // pusher-js resubscribes after a reconnect only; answer as the first time.
            return match succeeded_data(&self.app, &channel).await {
                Ok(data) => self.text(&protocol::subscription_succeeded(name, &data)),
                Err(e) => self.sub_error(name, "ServerError", &e.to_string(), 503),
            };
        }
        if self.followed.len() >= MAX_CHANNELS {
            let why = format!("at most {MAX_CHANNELS} channels per connection");
            return self.sub_error(name, "LimitReached", &why, 400);
        }
        let mut member = None;
        if channel.kind == ChannelKind::ServerToUser {
            // `sendToUser`: pusher-js follows it after `pusher:signin`, without a signature;
            // the sign-in is the proof.
            let mine = self.socket.user().is_some_and(|u| {
                name.strip_prefix(tidings_pusher::names::SERVER_TO_USER) == Some(u.as_str())
            });
            if !mine {
                let why =
                    format!("{name} is the channel of a user this connection is not signed in as");
                return self.sub_error(name, "AuthError", &why, 401);
            }
        }
        if channel.kind.needs_auth() {
            let Some(auth) = auth else {
                let why = format!("Auth info required to subscribe to {name}");
                return self.sub_error(name, "AuthError", &why, 401);
            };
            let data = if channel.kind == ChannelKind::Presence {
                let Some(data) = channel_data else {
                    return self.sub_error(
                        name,
                        "AuthError",
                        "presence channels need channel_data with a user_id",
                        400,
                    );
                };
                match protocol::parse_member(data) {
                    Ok(m) => member = Some(m),
                    Err(why) => return self.sub_error(name, "AuthError", &why, 400),
                }
                Some(data)
            } else {
                None
            };
            let key = &app.config.key;
            let secret = &app.config.secret.0;
            if let Err(e) = sign::verify_channel(key, secret, &self.socket.id, name, data, auth) {
                return self.sub_error(name, "AuthError", &e.to_string(), 401);
            }
        }
        // A cache channel replays its last event; without one the client is told so.
        let since = if channel.cache {
            Since::Last(1)
        } else {
            Since::Now
        };
        let cache_miss = channel.cache
            && matches!(
                self.state.node.read(&tidings, &Since::Last(1), Some(1)).await,
                Ok(read) if read.replay.messages().is_empty()
            );
        match self.sub.add(&tidings, &since).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                return self.sub_error(
                    name,
                    "InvalidChannel",
                    "channel name collides with one already followed",
                    400,
                );
            }
            Err(e) => {
                self.sub.remove(&tidings);
                let e = ApiError::from(e);
                return self.sub_error(name, "ServerError", &e.message, 503);
            }
        }
        // A user's own channel is not an app channel: not counted, listed or webhooked.
        let counted = channel.kind != ChannelKind::ServerToUser;
        if counted && let Err(e) = app.subscribed(name).await {
            self.sub.remove(&tidings);
            return self.sub_error(name, "ServerError", &e.to_string(), 503);
        }
        if let Some(m) = &member
            && let Err(e) = app
                .presence_join(name, &m.user_id, &m.user_info, &self.socket.id)
                .await
        {
            self.sub.remove(&tidings);
            app.unsubscribed(name).await;
            return self.sub_error(name, "ServerError", &e.to_string(), 503);
        }
        self.followed.push((
            tidings.clone(),
            Followed {
                pusher: channel.clone(),
                member: member.map(|m| m.user_id),
            },
        ));
        let data = match succeeded_data(&self.app, &channel).await {
            Ok(data) => data,
            Err(e) => {
                self.leave(&tidings).await;
                return self.sub_error(name, "ServerError", &e.to_string(), 503);
            }
        };
        self.text(&protocol::subscription_succeeded(name, &data));
        if cache_miss {
            self.text(&protocol::cache_miss(name));
        }
    }

    /// Stops following a channel here (the hub); what the app counts is `release`'s.
    fn detach(&mut self, tidings: &ChannelName) -> Option<Followed> {
        let i = self.followed.iter().position(|(c, _)| c == tidings)?;
        let (_, f) = self.followed.swap_remove(i);
        self.sub.remove(tidings);
        Some(f)
    }

    fn detach_all(&mut self) -> Vec<Followed> {
        let all: Vec<ChannelName> = self.followed.iter().map(|(c, _)| c.clone()).collect();
        all.iter().filter_map(|c| self.detach(c)).collect()
    }

    /// Stops following a channel: the hub, the app's counts, presence.
    async fn leave(&mut self, tidings: &ChannelName) {
        if let Some(f) = self.detach(tidings) {
            release(&self.app, &self.socket.id, f).await;
        }
    }

    async fn leave_all(&mut self) {
        for f in self.detach_all() {
            release(&self.app, &self.socket.id, f).await;
        }
    }

    async fn signin(&mut self, auth: &str, user_data: &str) {
        let app = self.app.clone();
        let user = match protocol::parse_user(user_data) {
            Ok(u) => u,
            Err(why) => return self.text(&protocol::error(Some(code::UNAUTHORIZED), &why)),
        };
        let (key, secret) = (&app.config.key, &app.config.secret.0);
        if let Err(e) = sign::verify_user(key, secret, &self.socket.id, user_data, auth) {
            return self.text(&protocol::error(Some(code::UNAUTHORIZED), &e.to_string()));
        }
        app.signin(&self.socket, &user);
        self.text(&protocol::signin_success(user_data));
    }

    async fn client_event(&mut self, event: &str, name: &str, data: &str) {
        let app = self.app.clone();
        let refuse = |s: &mut Self, why: &str| s.text(&protocol::error(None, why));
        if !app.config.client_events {
            return refuse(
                self,
                "Client events are disabled for this app (client_events = false)",
            );
        }
        let channel = match PusherChannel::parse(&app.config.id, name) {
            Ok(c) => c,
            Err(e) => return refuse(self, &e.to_string()),
        };
        if !matches!(channel.kind, ChannelKind::Private | ChannelKind::Presence) {
            return refuse(
                self,
                "Client event rejected - only supported on private and presence channels",
            );
        }
        let Ok(tidings) = channel.tidings(&app.config.id) else {
            return refuse(self, "invalid channel name");
        };
        let Some((_, followed)) = self.followed.iter().find(|(c, _)| *c == tidings) else {
            return refuse(
                self,
                "Client event rejected - not subscribed to the channel",
            );
        };
        let user = followed.member.clone();
        let data = bridge::client_data(data);
        if data.len() > app.config.max_event_bytes {
            let why = format!(
                "Client event rejected - data is {} bytes; the limit is {} (max_event_bytes)",
                data.len(),
                app.config.max_event_bytes
            );
            return refuse(self, &why);
        }
        let now = self.state.millis();
        if self.state.since(self.window.0) >= Duration::from_secs(1) {
            self.window = (now, 0);
        }
        if self.window.1 >= protocol::CLIENT_EVENTS_PER_SEC {
            return self.text(&protocol::error(
                Some(code::CLIENT_EVENT_RATE),
                "Client event rejected due to rate limit",
            ));
        }
        self.window.1 += 1;
        // Never echoed to the sender: the message names the socket it is not for.
        let p = match bridge::to_tidings_from(
            &app.config.id,
            &channel,
            event,
            &data,
            user.as_deref(),
            Some(&self.socket.id),
        ) {
            Ok(p) => p,
            Err(e) => return refuse(self, &e.to_string()),
        };
        match crate::app::publish::publish(&self.state, &p.channel, p.event, p.data).await {
            Ok(_) => {
                app.counters.client_events.fetch_add(1, Relaxed);
                app.client_event_hook(name, event, &data, &self.socket.id, user.as_deref());
            }
            Err(e) => refuse(self, &e.message),
        }
    }

    /// Writes every ready event: messages as Pusher events (one cached frame per message),
    /// joins and leaves as member events. Gaps mean nothing to Pusher clients.
    fn queue_ready(&mut self) -> Next {
        let app_id = self.app.config.id.as_str();
        let (socket, app, out) = (&self.socket, &self.app, &mut self.ws.out);
        let mut delivered = 0u64;
        let drained = self.sub.drain(|event, _| match event {
            Event::Message(m) => {
                let cached = m.cached_frame(frame_slot::PUSHER, |m| {
                    bridge::to_pusher_except(app_id, m)
                        .map(|(text, except)| except_frame(except.as_deref(), text.as_bytes()))
                        .unwrap_or_default()
                });
                let Some((except, frame)) = split_except(cached) else {
                    return;
                };
                if except == socket.id.as_bytes() {
                    return;
                }
                delivered += 1;
                out.extend_from_slice(frame);
            }
            Event::Presence(e) => {
                let Some(user) = &e.info.user else { return };
                if e.info.client == socket.id {
                    return;
                }
                let Some(name) = tidings_pusher::names::pusher_name(app_id, e.channel.as_str())
                else {
                    return;
                };
                if !name.starts_with("presence-") {
                    return;
                }
                let text = match e.kind {
                    PresenceKind::Join => {
                        let info = app.member_info(&name, user).unwrap_or(Value::Null);
                        protocol::member_added(&name, user, &info)
                    }
                    PresenceKind::Leave => protocol::member_removed(&name, user),
                };
                wsframe::encode(out, OP_TEXT, text.as_bytes());
            }
            Event::Gap(_) => {}
        });
        app.counters.messages_sent.fetch_add(delivered, Relaxed);
        match drained {
            Ok(_) => Next::Continue,
            Err(tidings_core::DisconnectReason::Shutdown) => {
                Next::Goodbye(code::OVER_CAPACITY, "Server is restarting")
            }
            Err(_) => Next::Goodbye(code::OVER_CAPACITY, "Client too slow: queue overflowed"),
        }
    }
}

/// The cached form of a Pusher frame: the length of the socket id it is not for (one byte,
/// 0 for none), that id, then the WebSocket frame. One cache entry serves every socket; each
/// compares a few bytes.
fn except_frame(except: Option<&str>, text: &[u8]) -> Bytes {
    let except = except
        .filter(|e| e.len() <= usize::from(u8::MAX))
        .unwrap_or("")
        .as_bytes();
    let frame = wsframe::encode_bytes(OP_TEXT, text);
    let mut out = Vec::with_capacity(1 + except.len() + frame.len());
    out.push(except.len() as u8);
    out.extend_from_slice(except);
    out.extend_from_slice(&frame);
    Bytes::from(out)
}

/// `(excluded socket id, frame)` of a cached entry; `None` for a message that is not the
/// app's (cached empty).
fn split_except(cached: &[u8]) -> Option<(&[u8], &[u8])> {
    let (&n, rest) = cached.split_first()?;
    let n = usize::from(n);
    (rest.len() > n).then(|| rest.split_at(n))
}

fn wsframe_policy() -> u16 {
    crate::transport::websocket::close::POLICY
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::config::Config;

    /// What a parked Pusher socket's session future holds (the `Session` and the wait in
    /// `run`), measured with `size_of_val`, so exact (docs/benchmarks.md, *Idle memory*).
    #[tokio::test]
    async fn a_parked_pusher_session_stays_small() {
        let mut config = Config::default();
        config.pusher.apps.push(tidings_pusher::AppConfig {
            id: "1001".into(),
            key: "app-key".into(),
            secret: tidings_pusher::config::AppSecret("secret".into()),
            client_events: true,
            max_connections: 0,
            max_event_bytes: tidings_pusher::config::DEFAULT_MAX_EVENT_BYTES,
            webhook_url: None,
            webhook_ca_file: None,
        });
        let state = AppState::new(config).unwrap();
        let app = state.pusher.by_key("app-key");
        assert!(app.is_some());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (socket, _) = listener.accept().await.unwrap();
        let io = WsIo::Tcp(crate::net::deadline::Deadline::new(
            socket,
            std::time::Duration::from_secs(1),
        ));
        let session = run(state, app, Ok(()), io, Bytes::new());
        let size = std::mem::size_of_val(&session);
        eprintln!("a parked Pusher session: {size} bytes");
        assert!(
            size <= SESSION_BOUND,
            "a parked Pusher session is {size} bytes (bound {SESSION_BOUND})"
        );
    }

    /// Today: 1,232 bytes in a debug build (1,280 while the decoder kept its limit and the
    /// times were tokio `Instant`s; 1,312 while its select kept `read_more`'s future;
    /// 1,320 with a shutdown wait of its own in the session's select and its flush).
    const SESSION_BOUND: usize = 1240;
}
