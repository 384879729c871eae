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

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use tidings_core::{BrokerError, Disconnect, DisconnectReason, Event, Message, Subscription};

use crate::app::error::ApiError;
use crate::metrics::SessionGauge;
use crate::net::reply::{Reply, ReplyBody, Text};
use crate::net::{Answer, Headers};
use crate::state::AppState;
use crate::transport::{TransportKind, long_poll, params};

/// The JSON reply being assembled: envelopes are written straight into the buffer that
/// becomes the body (no copy of a replay on its way out). A reply holds at most one page of
/// replay (`Subscription::drain`, about `queue_max_bytes`); its cursor resumes after it.
///
/// One pass for many pollers (issue 17): when a message reaches a channel with N held
/// one-channel polls, each of them answers with exactly the same bytes — the message, its
/// own cursor, no gaps. That body is encoded once per message (`Message::poll_reply`, kept
/// with the message's envelope; byte for byte what `into_body` writes for it, as a test
/// checks) and every poller's answer shares it; a poller only writes its response head.
/// So the first message is held back (`only`) until the reply turns out to need more.
pub struct PollReply {
    messages: BytesMut,
    count: usize,
    /// The reply's first message, not written yet: it came with its own cursor, so the
    /// whole reply may be its shared body.
    only: Option<Arc<Message>>,
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
            only: None,
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
        let (messages, count, only, gaps) = (
            &mut self.messages,
            &mut self.count,
            &mut self.only,
            &mut self.gaps,
        );
        let drained = sub.drain(|event, cursor| match event {
            Event::Message(m) => {
                if *count == 0 && cursor == m.cursor() {
                    *only = Some(m.clone());
                } else {
                    write_only(messages, only);
                    if messages.is_empty() {
                        start(messages);
                    } else {
                        messages.put_u8(b',');
                    }
                    m.write_envelope(messages, cursor);
                }
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

    /// The message whose shared body is this whole reply, if it is one (see the type).
    fn shared(&self) -> Option<&Arc<Message>> {
        self.only
            .as_ref()
            .filter(|_| self.count == 1 && self.gaps.is_empty())
    }

    /// `goodbye`: the server is shutting down, and says when to poll again (the reply's
    /// `disconnect`, as a stream would have it).
    fn into_body(mut self, cursor: &[u8], goodbye: Option<Disconnect>) -> BytesMut {
        write_only(&mut self.messages, &mut self.only);
        let mut body = self.messages;
        if body.is_empty() {
            start(&mut body);
        }
        body.reserve(cursor.len() + 64);
        body.put_slice(b"],\"cursor\":\"");
        body.put_slice(cursor);
        body.put_slice(b"\",\"gaps\":");
        let _ = serde_json::to_writer((&mut body).writer(), &self.gaps);
        if let Some(goodbye) = goodbye {
            body.put_slice(b",\"disconnect\":");
            let _ = serde_json::to_writer((&mut body).writer(), &goodbye);
        }
        body.put_u8(b'}');
        body
    }
}

/// Writes the held-back first message (`PollReply::only`), with its own cursor.
fn write_only(messages: &mut BytesMut, only: &mut Option<Arc<Message>>) {
    if let Some(first) = only.take() {
        start(messages);
        first.write_envelope(messages, first.cursor());
    }
}

/// What a poll answers: now, or (a long poll with nothing yet) when its wait ends.
// A `Reply` (504 bytes) lives briefly, on its way to being written; boxing it would
// be the allocation per answer that it exists to save.
#[allow(clippy::large_enum_variant)]
pub enum Polled {
    Now(Answer),
    Later(long_poll::Wait),
}

impl Polled {
    /// As the router needs it: a long poll becomes a placeholder (`long_poll::deferred`).
    fn into_response(self) -> Response {
        match self {
            Polled::Now(answer) => answer.into_response(),
            Polled::Later(wait) => long_poll::deferred(wait),
        }
    }
}

/// `GET /poll/{channel}` (`channel`) or `GET /poll?channel=…`, for callers that take a
/// long poll's wait directly (`app::service`).
///
/// `holdable`: the caller writes the answer as it comes (no CORS, no access log), so a long
/// poll may be held and answered from the publishing side (`long_poll`, `net::held`) if
/// the connection lends its socket.
pub async fn poll<H: Headers + Sync + ?Sized>(
    state: &AppState,
    conn: Option<&crate::net::ConnectionCtx>,
    channel: Option<&str>,
    query: Option<&str>,
    headers: &H,
    holdable: bool,
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
        .subscribe_on(
            &p.channels,
            &p.start,
            // The connection's queue (its kill switch's allocation), claimed for this poll:
            // no queue allocated per round trip.
            crate::net::kill::session_queue(conn, state.config().server.queue_max_bytes),
            // A poll lasts one request: it is not "present" and carries no join/leave.
            None,
        )
        .await?;
    let gauge = state.metrics.session(kind, sub.channels().len());
    let mut reply = PollReply::new();
    reply.collect(&mut sub, &gauge);
    match wait {
        Some(wait) if reply.is_empty() => {
            let held = holdable
                .then(|| sub.hold_position())
                .flatten()
                .map(|after| long_poll::HeldPoll::take(after.clone(), wait));
            Ok(Polled::Later(long_poll::later(
                state.clone(),
                sub,
                gauge,
                reply,
                wait,
                held,
            )))
        }
        _ => finish(&sub, reply, wait, None).map(Polled::Now),
    }
}

/// The poll's answer from what was collected: a lean reply (`net::reply`), its body shared
/// with the channel's other pollers when it is one message with its own cursor.
pub(crate) fn finish(
    sub: &Subscription,
    reply: PollReply,
    wait: Option<std::time::Duration>,
    goodbye: Option<Disconnect>,
) -> Result<Answer, ApiError> {
    if reply.is_empty() && reply.ended == Some(DisconnectReason::BrokerUnavailable) {
        return Err(BrokerError::Unavailable("the broker went away during the poll".into()).into());
    }
    if let Some(m) = reply.shared().filter(|_| goodbye.is_none()) {
        return Ok(shared_reply(m, wait).into());
    }
    let cursor = sub.cursor().encode();
    let body = ReplyBody::Owned(reply.into_body(cursor.as_bytes(), goodbye));
    let etag =
        Text::quoted_inline(cursor.as_bytes()).unwrap_or_else(|| Text::Quoted(Bytes::from(cursor)));
    Ok(poll_reply(body, etag, wait).into())
}

/// The answer of a poll whose reply is one message with its own cursor: the body shared
/// with the channel's other pollers. A held poll's hook writes exactly this
/// (`long_poll::HeldPoll`), from the publishing side.
pub fn shared_reply(m: &Arc<Message>, wait: Option<std::time::Duration>) -> Reply {
    // The cursor as the ETag: kept in the reply when short (a long epoch's is copied).
    let etag = Text::quoted_inline(m.cursor())
        .unwrap_or_else(|| Text::Quoted(Bytes::copy_from_slice(m.cursor())));
    poll_reply(ReplyBody::Shared(Arc::clone(m)), etag, wait)
}

fn poll_reply(body: ReplyBody, etag: Text, wait: Option<std::time::Duration>) -> Reply {
    let mut out = Reply::new(StatusCode::OK, "application/json", body);
    out.header("cache-control", Text::Static("no-cache"))
        .header("etag", etag);
    if let Some(wait) = wait.and_then(wait_preference) {
        out.header("preference-applied", wait);
    }
    out
}

/// `wait=30`, or `wait=2.5` for a fractional wait (no `fmt` for whole seconds: it cost
/// more than the rest of the header; built on the stack).
fn wait_preference(wait: std::time::Duration) -> Option<Text> {
    if wait.subsec_nanos() == 0 {
        let mut v = [0u8; 32];
        let mut digits = itoa::Buffer::new();
        let secs = digits.format(wait.as_secs()).as_bytes();
        v[..5].copy_from_slice(b"wait=");
        v[5..5 + secs.len()].copy_from_slice(secs);
        Text::inline(&v[..5 + secs.len()])
    } else {
        Text::inline(format!("wait={}", wait.as_secs_f64()).as_bytes())
    }
}

/// `GET /poll/{channel}`.
pub async fn one(
    State(state): State<AppState>,
    Path(channel): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    poll(
        &state,
        None,
        Some(&channel),
        query.as_deref(),
        &headers,
        false,
    )
    .await
    .map(Polled::into_response)
}

/// `GET /poll?channel=a&channel=b`.
pub async fn many(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    poll(&state, None, None, query.as_deref(), &headers, false)
        .await
        .map(Polled::into_response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidings_core::{ChannelName, Data, Epoch, Position};

    #[test]
    fn the_shared_body_is_byte_for_byte_the_reply_it_stands_for() {
        let m = Arc::new(Message::new(
            ChannelName::new("chat:lobby").unwrap_or_else(|e| panic!("{e}")),
            Position {
                epoch: Epoch::new("h3k9").unwrap_or_else(|| panic!("an epoch")),
                offset: 42,
            },
            None,
            Data::Text(Bytes::from_static(b"he said \"hi\"")),
            1_732_200_000_123,
        ));
        let mut reply = PollReply::new();
        reply.only = Some(m.clone());
        reply.count = 1;
        assert!(reply.shared().is_some());
        let written = reply.into_body(m.cursor(), None);
        assert_eq!(&written[..], m.poll_reply());
        let v: serde_json::Value =
            serde_json::from_slice(&written).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v["cursor"].as_str().map(str::as_bytes), Some(m.cursor()));
        assert_eq!(v["messages"][0]["data"], "he said \"hi\"");
    }
}
