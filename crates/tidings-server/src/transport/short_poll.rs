//! Polling: `GET /poll/{channel}` and `GET /poll?channel=…`. Without `wait` it is a short
//! poll that answers at once; with `wait=N` (or `Prefer: wait=N`) the long-poll part in
//! `long_poll.rs` holds the request until a message exists. Both answer
//! `200 {"messages":[envelopes],"cursor":"…","gaps":[…]}`, never 304, with the cursor as ETag.
//!
//! A long poll the server ends because it shuts down also carries
//! `"disconnect":{"reason":"shutdown","reconnect":true,"reconnect_after_ms":N}`: when to poll
//! again, and (the next poll goes to another node) that it will be somewhere else.
//!
//! A poll is a subscription that lives for one request: the same race-free join as the
//! streams, so a message published between two polls is in the next reply exactly once.

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use tidings_core::{BrokerError, Disconnect, DisconnectReason, Event, Subscription};

use crate::app::error::ApiError;
use crate::metrics::SessionGauge;
use crate::state::AppState;
use crate::transport::{TransportKind, long_poll, params};

/// The JSON reply being assembled: envelopes are written straight into the buffer that
/// becomes the body (no copy of a replay on its way out). A reply holds at most one page of
/// replay (`Subscription::drain`, about `queue_max_bytes`); its cursor resumes after it.
pub struct PollReply {
    messages: BytesMut,
    count: usize,
    gaps: Vec<serde_json::Value>,
    ended: Option<DisconnectReason>,
}

/// Opens a reply's body, with room for a small message, its cursor and the end (one
/// allocation for the common one-message answer).
fn start(body: &mut BytesMut) {
    body.reserve(REPLY_ROOM);
    body.put_slice(REPLY_START);
}

const REPLY_START: &[u8] = b"{\"messages\":[";
const REPLY_ROOM: usize = 512;

impl PollReply {
    fn new() -> Self {
        Self {
            // Empty until the first message: a long poll waits with no buffer at all.
            messages: BytesMut::new(),
            count: 0,
            gaps: Vec::new(),
            ended: None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0 && self.gaps.is_empty()
    }

    /// Takes what the subscription has ready. An overflow just ends the collection: the
    /// cursor covers exactly what was added, so the next poll reads the rest from history.
    pub fn collect(&mut self, sub: &mut Subscription, gauge: &SessionGauge) {
        let (messages, count, gaps) = (&mut self.messages, &mut self.count, &mut self.gaps);
        let drained = sub.drain(|event, cursor| match event {
            Event::Message(m) => {
                if *count > 0 {
                    messages.put_u8(b',');
                } else {
                    start(messages);
                }
                m.write_envelope(messages, cursor);
                *count += 1;
            }
            Event::Gap(g) => {
                gauge.gap();
                gaps.push(serde_json::to_value(g).unwrap_or_default());
            }
            Event::Presence(_) => {}
        });
        match drained {
            Ok(n) => gauge.delivered(n as u64),
            Err(reason) => {
                if reason == DisconnectReason::Slow {
                    gauge.slow();
                }
                self.ended = Some(reason);
            }
        }
    }

    /// The collection had to stop (overflow, broker gone): answer with what there is.
    pub fn ended(&self) -> bool {
        self.ended.is_some()
    }

    /// `goodbye`: the server is shutting down, and says when to poll again (the reply's
    /// `disconnect`, as a stream would have it).
    fn into_response(self, cursor: &str, goodbye: Option<Disconnect>) -> Response {
        let mut body = self.messages;
        if body.is_empty() {
            start(&mut body);
        }
        body.reserve(cursor.len() + 64);
        body.put_slice(b"],\"cursor\":\"");
        body.put_slice(cursor.as_bytes());
        body.put_slice(b"\",\"gaps\":");
        let _ = serde_json::to_writer((&mut body).writer(), &self.gaps);
        if let Some(goodbye) = goodbye {
            body.put_slice(b",\"disconnect\":");
            let _ = serde_json::to_writer((&mut body).writer(), &goodbye);
        }
        body.put_u8(b'}');
        let mut res = (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body.freeze(),
        )
            .into_response();
        let h = res.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        let mut etag = Vec::with_capacity(cursor.len() + 2);
        etag.push(b'"');
        etag.extend_from_slice(cursor.as_bytes());
        etag.push(b'"');
        if let Ok(etag) = HeaderValue::from_maybe_shared(Bytes::from(etag)) {
            h.insert(header::ETAG, etag);
        }
        res
    }
}

/// What a poll answers: now, or (a long poll with nothing yet) when its wait ends.
pub enum Polled {
    Now(Response),
    Later(long_poll::Wait),
}

impl Polled {
    /// As the router needs it: a long poll becomes a placeholder (`long_poll::deferred`).
    fn into_response(self) -> Response {
        match self {
            Polled::Now(res) => res,
            Polled::Later(wait) => long_poll::deferred(wait),
        }
    }
}

/// `GET /poll/{channel}` (`channel`) or `GET /poll?channel=…`, for callers that take a
/// long poll's wait directly (`app::service`).
pub async fn poll(
    state: &AppState,
    channel: Option<&str>,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Polled, ApiError> {
    let p = params::parse(channel, query, headers, &state.config().server, true)?;
    params::authorize(state, &p, headers, query)?;
    let wait = p.wait.filter(|w| !w.is_zero());
    let kind = if wait.is_some() {
        TransportKind::LongPoll
    } else {
        TransportKind::ShortPoll
    };
    let mut sub = state
        .node
        .subscribe(
            &p.channels,
            &p.start,
            state.config().server.queue_max_bytes,
            // A poll lasts one request: it is not "present" and carries no join/leave.
            None,
        )
        .await?;
    let gauge = state.metrics.session(kind, sub.channels().len());
    let mut reply = PollReply::new();
    reply.collect(&mut sub, &gauge);
    match wait {
        Some(wait) if reply.is_empty() => {
            let state = state.clone();
            Ok(Polled::Later(Box::pin(async move {
                long_poll::wait(&mut sub, &gauge, &mut reply, wait, &state.shutdown).await;
                // Ended by shutdown: say so, and when to come back (SPEC §13).
                let goodbye = state
                    .shutdown
                    .is_cancelled()
                    .then(|| crate::lifecycle::shutdown_notice(&state));
                finish(&sub, reply, Some(wait), goodbye).unwrap_or_else(IntoResponse::into_response)
            })))
        }
        _ => finish(&sub, reply, wait, None).map(Polled::Now),
    }
}

/// The poll's answer from what was collected.
fn finish(
    sub: &Subscription,
    reply: PollReply,
    wait: Option<std::time::Duration>,
    goodbye: Option<Disconnect>,
) -> Result<Response, ApiError> {
    if reply.is_empty() && reply.ended == Some(DisconnectReason::BrokerUnavailable) {
        return Err(BrokerError::Unavailable("the broker went away during the poll".into()).into());
    }
    let cursor = sub.cursor().encode();
    let mut res = reply.into_response(&cursor, goodbye);
    if let Some(wait) = wait
        && let Ok(v) = wait_preference(wait)
    {
        res.headers_mut()
            .insert(HeaderName::from_static("preference-applied"), v);
    }
    Ok(res)
}

/// `wait=30`, or `wait=2.5` for a fractional wait (no `fmt` for whole seconds: it cost
/// more than the rest of the header; and built on the stack, so the value is the one copy).
fn wait_preference(wait: std::time::Duration) -> Result<HeaderValue, header::InvalidHeaderValue> {
    if wait.subsec_nanos() == 0 {
        let mut v = [0u8; 32];
        let mut digits = itoa::Buffer::new();
        let secs = digits.format(wait.as_secs()).as_bytes();
        v[..5].copy_from_slice(b"wait=");
        v[5..5 + secs.len()].copy_from_slice(secs);
        HeaderValue::from_bytes(&v[..5 + secs.len()])
    } else {
        HeaderValue::from_str(&format!("wait={}", wait.as_secs_f64()))
    }
}

/// `GET /poll/{channel}`.
pub async fn one(
    State(state): State<AppState>,
    Path(channel): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    poll(&state, Some(&channel), query.as_deref(), &headers)
        .await
        .map(Polled::into_response)
}

/// `GET /poll?channel=a&channel=b`.
pub async fn many(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    poll(&state, None, query.as_deref(), &headers)
        .await
        .map(Polled::into_response)
}
