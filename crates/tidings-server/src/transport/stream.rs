//! The streaming lifecycle SSE and NDJSON share: headers once, the replay, then one frame per
//! event, heartbeats when idle, a goodbye record before the server ends the stream, close.
//! Each transport supplies only its `Framing`.
//!
//! Concurrency: the response body *is* the session's writer. Hyper polls it when the socket
//! can take more; each poll drains everything queued into one buffer and yields it as one
//! chunk (one write, one flush per batch instead of per message). A client that stops
//! reading stops the polling; its queue then overflows on the publisher's side, which
//! fires the connection's kill switch (see `net/listener.rs`), so the connection ends even
//! though this writer never runs again. The writer counts its slow disconnect when it is
//! dropped (its queue says it overflowed): at its goodbye, or when the killed connection
//! drops it.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use tidings_core::{
    Disconnect, DisconnectReason, Event, Gap, Message, PresenceEvent, Subscription,
};
use tokio::time::Instant;

use crate::app::error::ApiError;
use crate::auth::Principal;
use crate::metrics::SessionGauge;
use crate::net::ConnectionCtx;
use crate::state::AppState;
use crate::transport::TransportKind;
use crate::transport::params::SubscribeParams;

pub trait Framing: Send + Unpin + 'static {
    const KIND: TransportKind;
    const CONTENT_TYPE: &'static str;

    /// Written once, right after the headers.
    fn preamble(&mut self, _out: &mut BytesMut) {}
    /// `single`: the subscription has one channel, so `cursor` is the message's own and a
    /// frame cached on the message can be shared with every other subscriber.
    fn message(&mut self, m: &Arc<Message>, cursor: &[u8], single: bool, out: &mut BytesMut) {
        match self.shared_frame(m, single) {
            Some(frame) => out.put_slice(frame),
            None => self.own_frame(m, cursor, out),
        }
    }
    /// The message's frame cached on it for every subscriber, where `single` allows one.
    fn shared_frame<'m>(&self, m: &'m Arc<Message>, single: bool) -> Option<&'m Bytes>;
    /// The message's frame with this subscription's own `cursor` (several channels).
    fn own_frame(&mut self, m: &Arc<Message>, cursor: &[u8], out: &mut BytesMut);
    fn gap(&mut self, gap: &Gap, cursor: &[u8], out: &mut BytesMut);
    /// A join or leave; framings without a place for it (raw payloads) write nothing.
    fn presence(&mut self, event: &PresenceEvent, out: &mut BytesMut);
    /// Written once after the replay: the subscription's cursor, so a client that drops
    /// before its first message still resumes from the moment it subscribed.
    fn opened(&mut self, cursor: &[u8], out: &mut BytesMut);
    fn disconnect(&mut self, d: Disconnect, out: &mut BytesMut);
    fn heartbeat(&mut self, out: &mut BytesMut);
}

/// The whole GET handler of a streaming transport: parse the subscribe parameters, check
/// the credentials for every channel, open the stream. `path_channel` is `Some` for the
/// one-channel routes (`/sse/{c}`, `/stream/{c}`).
pub async fn subscribe<F: Framing>(
    state: &AppState,
    conn: Option<&ConnectionCtx>,
    path_channel: Option<&str>,
    query: Option<&str>,
    headers: &axum::http::HeaderMap,
    framing: F,
) -> Result<Response, ApiError> {
    let p = crate::transport::params::parse(
        path_channel,
        query,
        headers,
        &state.config().server,
        false,
    )?;
    let who = crate::transport::params::authorize(state, &p, headers, query)?;
    open(state, conn, p, who, framing).await
}

/// Subscribes and answers with a streaming response framed by `framing`.
pub async fn open<F: Framing>(
    state: &AppState,
    conn: Option<&ConnectionCtx>,
    params: SubscribeParams,
    who: Principal,
    framing: F,
) -> Result<Response, ApiError> {
    let writer = writer(state, conn, params, who, framing).await?;
    let body = Body::new(writer);
    let mut res = Response::new(body);
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(F::CONTENT_TYPE),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(res)
}

/// Subscribes; the writer is the stream's body.
async fn writer<F: Framing>(
    state: &AppState,
    conn: Option<&ConnectionCtx>,
    params: SubscribeParams,
    who: Principal,
    framing: F,
) -> Result<Writer<F>, ApiError> {
    let mut sub = state
        .node
        .subscribe_on(
            &params.channels,
            &params.start,
            crate::net::kill::session_queue(conn, state.config().server.queue_max_bytes),
            Some(who.client_info()),
        )
        .await?;
    let gauge = state.metrics.session(F::KIND, sub.channels().len());
    // HTTP/1.1: an overflow also kills the connection, since a client that stopped reading
    // stops hyper from polling this writer. HTTP/2: only this stream is stuck (its flow
    // control window is shut); killing the connection would take its other streams down, so
    // the session just stays overflowed (its queue empty and refusing pushes) until the
    // client reads or goes.
    if let Some(c) = conn.filter(|c| !c.http2) {
        sub.on_overflow(c.kill.clone());
    }
    let expires = who.expires_at().map(deadline_for);
    crate::lifecycle::follow(state, &mut sub, Some(tidings_core::Tick::Heartbeat));
    let writer = Writer {
        single: sub.channels().len() == 1,
        sub,
        framing,
        gauge,
        state: state.clone(),
        started: false,
        done: false,
        buf: BytesMut::new(),
        expires: expires.map(|at| Box::pin(tokio::time::sleep_until(at))),
        who: Subscriber::new(who),
    };
    Ok(writer)
}

/// Sleeps until `at`, or forever when there is no deadline.
pub async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

struct Writer<F> {
    sub: Subscription,
    single: bool,
    framing: F,
    gauge: SessionGauge,
    /// Its config says how far to spread the reconnects after a shutdown, and who may still
    /// subscribe after a reload. Both reach the writer through its queue
    /// (`lifecycle::follow`), as its heartbeats do (the node's shared timer: no timer of its
    /// own): a parked stream waits on its queue and, for a token that expires, its expiry,
    /// and nothing else.
    state: AppState,
    started: bool,
    done: bool,
    buf: BytesMut,
    /// When the subscriber's token expires: the stream ends then, saying why. Boxed, and
    /// only for a token that expires: a timer inline would be in every parked stream.
    expires: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Who subscribed, re-checked after a reload: a reload that revokes its access ends the
    /// stream like an expiry.
    who: Subscriber,
}

impl<F> Drop for Writer<F> {
    fn drop(&mut self) {
        // Here rather than in an overflow hook on the publisher's thread (a boxed closure
        // per session): a writer that overflowed ends either way, at its goodbye or when
        // the killed connection drops it (`SLOW_CLOSE_GRACE`).
        if self.sub.overflowed() {
            self.gauge.slow();
        }
    }
}

/// Whether a token's expiry `timer` has fired (never without one); registers the waker
/// when not. For the hand-written waits of a stream's body and a WebSocket session.
pub fn poll_expired(
    timer: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    cx: &mut std::task::Context<'_>,
) -> bool {
    timer
        .as_mut()
        .is_some_and(|timer| timer.as_mut().poll(cx).is_ready())
}

/// Who a session stands for, kept for a reload to re-check: a token's claims in a box
/// (they are large, and only a reload reads them), the others in no allocation at all.
pub enum Subscriber {
    Anonymous,
    ApiKey,
    User(Box<Principal>),
}

static ANONYMOUS: Principal = Principal::Anonymous;
static API_KEY: Principal = Principal::ApiKey;

impl Subscriber {
    pub fn new(who: Principal) -> Self {
        match who {
            Principal::Anonymous => Self::Anonymous,
            Principal::ApiKey => Self::ApiKey,
            user => Self::User(Box::new(user)),
        }
    }

    pub fn get(&self) -> &Principal {
        match self {
            Self::Anonymous => &ANONYMOUS,
            Self::ApiKey => &API_KEY,
            Self::User(who) => who,
        }
    }
}

/// The tokio instant of a Unix time in seconds (now when it has passed).
pub fn deadline_for(unix_secs: u64) -> Instant {
    let now = tidings_core::broker::memory::now_millis() / 1000;
    Instant::now() + std::time::Duration::from_secs(unix_secs.saturating_sub(now))
}

enum Wake {
    /// Shutdown, or the queue overflowed: what is queued goes unsent.
    Cut(DisconnectReason),
    Expired,
    Ready,
}

/// The writer is the response body itself, polled by hand: no stream adapter, no future
/// per chunk. Through `Body::from_stream(unfold(..))` each delivery went through three more
/// layers and moved the writer into a new future and back out (~1,000 of the ~27,000
/// instructions a publish cost in channels-5k-sse, docs/benchmarks.md, session 10), and a
/// parked stream kept that future, larger than the writer.
impl<F: Framing> http_body::Body for Writer<F> {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .poll_chunk(cx)
            .map(|chunk| chunk.map(|c| Ok(http_body::Frame::data(c))))
    }
}

impl<F: Framing> Writer<F> {
    /// The body's next chunk; `None` once the goodbye is out.
    fn poll_chunk(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Bytes>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        if !self.started {
            self.started = true;
            self.framing.preamble(&mut self.buf);
            if let Some(lone) = self.write_ready() {
                self.buf.put_slice(&lone);
            }
            if !self.done {
                let cursor = self.sub.cursor().encode();
                self.framing.opened(cursor.as_bytes(), &mut self.buf);
            }
            return Poll::Ready(Some(self.buf.split().freeze()));
        }
        while self.buf.is_empty() && !self.done {
            if self.buf.capacity() > 0 {
                // Freed, not kept: a parked stream holds no output buffer (the next batch
                // allocates one).
                self.buf = BytesMut::new();
            }
            // In this order, as a biased `select!` would: an end first, then the token's
            // expiry, then what is queued. Each registers its waker when pending.
            let wake = if let Poll::Ready(reason) = self.sub.poll_cut(cx) {
                Wake::Cut(reason)
            } else if poll_expired(&mut self.expires, cx) {
                Wake::Expired
            } else if self.sub.poll_ready(cx).is_ready() {
                Wake::Ready
            } else {
                return Poll::Pending;
            };
            match wake {
                Wake::Cut(reason) => self.goodbye(reason),
                Wake::Expired => self.goodbye(DisconnectReason::TokenExpired),
                // A reload that revokes its access ends the stream like an expiry.
                Wake::Ready
                    if self.sub.take_reload()
                        && !crate::lifecycle::still_allowed(
                            &self.state,
                            self.who.get(),
                            self.sub.channels(),
                        ) =>
                {
                    self.goodbye(DisconnectReason::TokenExpired)
                }
                Wake::Ready => {
                    // The node's heartbeat tick (`lifecycle::follow`); what is queued goes
                    // behind it, in the same write.
                    if self.sub.take_tick() {
                        self.framing.heartbeat(&mut self.buf);
                    }
                    if let Some(lone) = self.write_ready() {
                        return Poll::Ready(Some(lone));
                    }
                }
            }
        }
        Poll::Ready(Some(self.buf.split().freeze()))
    }

    /// Frames everything that is ready into `buf`; on overflow, the goodbye and the end.
    /// A lone message whose frame is shared by every subscriber comes back as that frame,
    /// not copied into `buf`: the common case of a fan-out (one message per wake-up) then
    /// writes the frame every subscriber shares, with no buffer of its own to allocate,
    /// fill and free per delivery (docs/benchmarks.md, *Saturation*).
    fn write_ready(&mut self) -> Option<Bytes> {
        let (framing, buf, single, gauge) =
            (&mut self.framing, &mut self.buf, self.single, &self.gauge);
        let mut lone: Option<Bytes> = None;
        let drained = self.sub.drain(|event, cursor| {
            // Whatever follows a lone frame goes behind it, in `buf`.
            if let Some(frame) = lone.take() {
                buf.put_slice(&frame);
            }
            match event {
                Event::Message(m) => match framing.shared_frame(m, single) {
                    Some(frame) if buf.is_empty() => lone = Some(frame.clone()),
                    Some(frame) => buf.put_slice(frame),
                    None => framing.own_frame(m, cursor, buf),
                },
                Event::Gap(g) => {
                    gauge.gap();
                    framing.gap(g, cursor, buf);
                }
                Event::Presence(e) => framing.presence(e, buf),
            }
        });
        match drained {
            Ok(n) => {
                self.gauge.delivered(n as u64);
                lone
            }
            // Slow (counted when the writer is dropped), or ended from outside (broker
            // down, shutdown).
            Err(reason) => {
                if let Some(frame) = lone {
                    self.buf.put_slice(&frame);
                }
                self.goodbye(reason);
                None
            }
        }
    }

    /// The last record, and the end. A shutdown tells each client its own delay
    /// (`lifecycle::shutdown_notice`), spreading the reconnects.
    fn goodbye(&mut self, reason: DisconnectReason) {
        let notice = match reason {
            DisconnectReason::Shutdown => crate::lifecycle::shutdown_notice(&self.state),
            other => other.into(),
        };
        self.framing.disconnect(notice, &mut self.buf);
        self.done = true;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt;
    use tidings_core::{ChannelName, Start};

    use super::*;
    use crate::config::Config;
    use crate::transport::http_stream::NdjsonFraming;
    use crate::transport::sse::SseFraming;

    fn params() -> SubscribeParams {
        SubscribeParams {
            channels: crate::transport::params::Channels::One(ChannelName::new("quiet").unwrap()),
            start: Start::Now,
            wait: None,
        }
    }

    async fn next_frame(body: &mut Body) -> String {
        let frame = body.frame().await.unwrap().unwrap();
        String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap()
    }

    /// An anonymous SSE stream on the quiet channel, past its opening `retry:` frame.
    async fn open_sse(state: &AppState) -> Body {
        let res = open(
            state,
            None,
            params(),
            Principal::Anonymous,
            SseFraming::raw(),
        )
        .await
        .unwrap();
        let mut body = res.into_body();
        let first = next_frame(&mut body).await;
        assert!(first.starts_with("retry: "), "{first}");
        body
    }

    /// What a parked stream holds beside its connection's task: its writer (boxed as the
    /// response body). Measured with `size_of_val`, not RSS, so it is exact and
    /// repeatable; the bound has a little room over today's size (docs/benchmarks.md,
    /// *Idle memory*) and fails when a change makes every parked stream larger.
    #[tokio::test]
    async fn a_parked_stream_s_writer_stays_small() {
        let state = AppState::new(Config::default()).unwrap();
        let writer = writer(
            &state,
            None,
            params(),
            Principal::Anonymous,
            SseFraming::raw(),
        )
        .await
        .unwrap();
        let waiting = std::mem::size_of_val(&writer);
        let bound = WRITER_BOUND;
        eprintln!("a parked SSE writer: {waiting} bytes");
        assert!(
            waiting <= bound,
            "a parked SSE writer is {waiting} bytes (bound {bound})"
        );
    }

    /// Today: 280 bytes in a debug build (360 while the body was an `unfold` stream, whose
    /// parked state was a future holding the writer; 736 before the queue woke its writer through a
    /// waker slot instead of a `Notify`, 656 before shutdown and reloads came through the
    /// queue too, 456 before its heartbeats came from the node's shared tick, 408 before
    /// the subscription's replay list was boxed and its cursor text a local).
    // One bound for debug and release builds: the sizes differ by a few bytes.
    const WRITER_BOUND: usize = 290;

    /// SPEC §4: a heartbeat every `heartbeat_interval`. The node's one timer visits the
    /// streams one part at a time (`lifecycle::follow`, `Hub::tick_part`), so a stream gets
    /// its first heartbeat within one interval of opening, then exactly one every interval.
    #[tokio::test(start_paused = true)]
    async fn heartbeats_come_within_an_interval_of_the_start_then_every_interval() {
        let state = AppState::new(Config::default()).unwrap();
        let every = Duration::from_secs(15);
        let mut early = open_sse(&state).await;
        let early_open = Instant::now();
        tokio::time::advance(Duration::from_secs(5)).await;
        let mut late = open_sse(&state).await;
        let late_open = Instant::now();
        // Both streams are read at once: a tick is a flag, so a stream left unread would
        // fold its due beats into one when read later.
        let mut beats: [Vec<Instant>; 2] = [vec![early_open], vec![late_open]];
        while beats.iter().any(|b| b.len() < 4) {
            let (which, frame) = tokio::select! {
                f = next_frame(&mut early) => (0, f),
                f = next_frame(&mut late) => (1, f),
            };
            assert_eq!(frame, ": ping\n\n");
            beats[which].push(Instant::now());
        }
        // Two sessions opened one after the other sit in different parts of the tick.
        assert_ne!(
            beats[0][1], beats[1][1],
            "both beat in one burst: {beats:?}"
        );
        for (name, times) in ["early", "late"].iter().zip(&beats) {
            let first = times[1] - times[0];
            assert!(
                first > Duration::ZERO && first <= every,
                "{name}: first beat {first:?} after opening"
            );
            for pair in times[1..].windows(2) {
                assert_eq!(pair[1] - pair[0], every, "{name}: beats at {times:?}");
            }
        }
    }

    /// At the shortest interval allowed (100 ms), a part's step (~0.2 ms) is shorter than
    /// the timer's millisecond: each wake visits every part due, so a stream still beats
    /// once every interval, not once every `TICK_PARTS` timer wakes (~0.5 s).
    #[tokio::test(start_paused = true)]
    async fn heartbeats_keep_the_interval_when_its_parts_are_shorter_than_a_millisecond() {
        let mut config = Config::default();
        let every = Duration::from_millis(100);
        config.server.heartbeat_interval = every;
        let state = AppState::new(config).unwrap();
        let mut body = open_sse(&state).await;
        let mut beats = vec![Instant::now()];
        while beats.len() < 5 {
            assert_eq!(next_frame(&mut body).await, ": ping\n\n");
            beats.push(Instant::now());
        }
        assert!(beats[1] - beats[0] <= every, "first beat: {beats:?}");
        for pair in beats[1..].windows(2) {
            assert_eq!(pair[1] - pair[0], every, "beats at {beats:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_sends_the_goodbye_record_with_a_delay_and_ends_the_stream() {
        let mut config = Config::default();
        config.server.reconnect_spread = Duration::ZERO;
        let state = AppState::new(config).unwrap();
        let res = open(&state, None, params(), Principal::Anonymous, NdjsonFraming)
            .await
            .unwrap();
        let mut body = res.into_body();
        assert!(next_frame(&mut body).await.contains("\"ready\""));
        state.shutdown.cancel();
        assert_eq!(
            next_frame(&mut body).await,
            "{\"type\":\"disconnect\",\"reason\":\"shutdown\",\"reconnect\":true,\"reconnect_after_ms\":0}\n"
        );
        assert!(body.frame().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_sse_shutdown_sets_retry_to_the_advised_delay() {
        let mut config = Config::default();
        config.server.reconnect_spread = Duration::from_millis(5000);
        let state = AppState::new(config).unwrap();
        let mut body = open_sse(&state).await;
        state.shutdown.cancel();
        let goodbye = next_frame(&mut body).await;
        let retry: u64 = goodbye
            .strip_prefix("retry: ")
            .and_then(|r| r.split_once('\n'))
            .and_then(|(ms, _)| ms.parse().ok())
            .unwrap_or_else(|| panic!("no retry: first in {goodbye:?}"));
        assert!(retry <= 5000);
        assert!(
            goodbye.contains(&format!(
                "event: tidings.disconnect\ndata: {{\"reason\":\"shutdown\",\"reconnect\":true,\"reconnect_after_ms\":{retry}}}\n\n"
            )),
            "{goodbye:?}"
        );
        assert!(body.frame().await.is_none());
    }
}
