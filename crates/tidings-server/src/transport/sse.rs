//! Server-Sent Events (`text/event-stream`).
//!
//! `/sse/{channel}` is raw: `data:` carries the payload exactly as published (JSON text or
//! the string; binary as base64), so a plain `EventSource` needs no library. `/sse?channel=`
//! carries envelopes. Every message's `id:` is the cursor, so the browser's automatic
//! reconnect sends it back as `Last-Event-ID` and resumes without loss.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use tidings_core::{Disconnect, Gap, Message, PresenceEvent};

use crate::app::error::ApiError;
use crate::net::ConnectionCtx;
use crate::state::AppState;
use crate::transport::stream::{self, Framing};
use crate::transport::{TransportKind, frame_slot};

/// How long the browser waits before reconnecting (the `retry:` field).
const RETRY_MS: &str = "2000";

pub struct SseFraming {
    raw: bool,
}

impl SseFraming {
    /// Payloads exactly as published (`/sse/{channel}`).
    pub fn raw() -> Self {
        Self { raw: true }
    }

    /// Envelopes (`/sse?channel=`).
    pub fn envelopes() -> Self {
        Self { raw: false }
    }
}

impl Framing for SseFraming {
    const KIND: TransportKind = TransportKind::Sse;
    const CONTENT_TYPE: &'static str = "text/event-stream";

    fn preamble(&mut self, out: &mut BytesMut) {
        out.put_slice(b"retry: ");
        out.put_slice(RETRY_MS.as_bytes());
        out.put_slice(b"\n\n");
    }

    fn shared_frame<'m>(&self, m: &'m Arc<Message>, single: bool) -> Option<&'m Bytes> {
        if self.raw {
            Some(m.cached_frame(frame_slot::SSE_RAW, raw_frame))
        } else if single {
            Some(m.cached_frame(frame_slot::SSE_ENVELOPE, |m| {
                let mut b = BytesMut::new();
                envelope_frame(m, m.cursor(), &mut b);
                b.freeze()
            }))
        } else {
            None
        }
    }

    fn own_frame(&mut self, m: &Arc<Message>, cursor: &[u8], out: &mut BytesMut) {
        envelope_frame(m, cursor, out);
    }

    fn gap(&mut self, gap: &Gap, cursor: &[u8], out: &mut BytesMut) {
        out.put_slice(b"id: ");
        out.put_slice(cursor);
        out.put_slice(b"\nevent: tidings.gap\ndata: ");
        write_json(gap, out);
        out.put_slice(b"\n\n");
    }

    /// `event: tidings.join` / `tidings.leave` in envelope mode; raw mode carries payloads only.
    fn presence(&mut self, event: &PresenceEvent, out: &mut BytesMut) {
        if self.raw {
            return;
        }
        out.put_slice(b"event: tidings.");
        out.put_slice(event.kind.as_str().as_bytes());
        out.put_slice(b"\ndata: ");
        write_json(&event.body(), out);
        out.put_slice(b"\n\n");
    }

    /// An `id:`-only block: no event fires, but EventSource records it as the last event ID.
    fn opened(&mut self, cursor: &[u8], out: &mut BytesMut) {
        out.put_slice(b"id: ");
        out.put_slice(cursor);
        out.put_slice(b"\n\n");
    }

    /// With advice on when to come back (a shutdown), `retry:` carries the same delay, so a
    /// plain EventSource waits it too before its automatic reconnect.
    fn disconnect(&mut self, d: Disconnect, out: &mut BytesMut) {
        if let Some(ms) = d.reconnect_after_ms {
            out.put_slice(b"retry: ");
            out.put_slice(itoa::Buffer::new().format(ms).as_bytes());
            out.put_u8(b'\n');
        }
        out.put_slice(b"event: tidings.disconnect\ndata: ");
        write_json(&d, out);
        out.put_slice(b"\n\n");
    }

    fn heartbeat(&mut self, out: &mut BytesMut) {
        out.put_slice(b": ping\n\n");
    }
}

fn write_json<T: serde::Serialize>(value: &T, out: &mut BytesMut) {
    // Serializing these small derived structs into memory cannot fail.
    let _ = serde_json::to_writer(out.writer(), value);
}

fn head(m: &Message, cursor: &[u8], out: &mut BytesMut) {
    out.put_slice(b"id: ");
    out.put_slice(cursor);
    out.put_u8(b'\n');
    if let Some(event) = &m.event {
        out.put_slice(b"event: ");
        out.put_slice(event.as_str().as_bytes());
        out.put_u8(b'\n');
    }
}

/// Raw frame: the payload split into `data:` lines (any of CRLF, CR, LF ends a line in SSE).
fn raw_frame(m: &Message) -> Bytes {
    let text = m.data.as_text();
    let mut out = BytesMut::with_capacity(text.len() + 64);
    head(m, m.cursor(), &mut out);
    // Most payloads are one line. `contains` on bytes is core's word-at-a-time `memchr`;
    // the scan below goes a byte at a time: ~530 of the ~27,000 instructions a 100-byte
    // publish cost in channels-5k-sse (docs/benchmarks.md, session 10).
    let bytes = text.as_bytes();
    if !bytes.contains(&b'\n') && !bytes.contains(&b'\r') {
        out.put_slice(b"data: ");
        out.put_slice(bytes);
        out.put_slice(b"\n\n");
        return out.freeze();
    }
    let mut rest = text.as_ref();
    loop {
        // A byte scan: CR and LF are ASCII, so their byte index is a char boundary.
        let end = rest
            .bytes()
            .position(|b| b == b'\r' || b == b'\n')
            .unwrap_or(rest.len());
        out.put_slice(b"data: ");
        out.put_slice(&rest.as_bytes()[..end]);
        out.put_u8(b'\n');
        if end == rest.len() {
            break;
        }
        let skip = if rest[end..].starts_with("\r\n") {
            2
        } else {
            1
        };
        rest = &rest[end + skip..];
    }
    out.put_u8(b'\n');
    out.freeze()
}

fn envelope_frame(m: &Message, cursor: &[u8], out: &mut BytesMut) {
    head(m, cursor, out);
    out.put_slice(b"data: ");
    m.write_envelope(out, cursor);
    out.put_slice(b"\n\n");
}

/// `GET /sse/{channel}` (`channel`: raw payloads) or `GET /sse?channel=a&channel=b`
/// (envelopes).
pub async fn subscribe(
    state: &AppState,
    conn: Option<&ConnectionCtx>,
    channel: Option<&str>,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let framing = if channel.is_some() {
        SseFraming::raw()
    } else {
        SseFraming::envelopes()
    };
    stream::subscribe(state, conn, channel, query, headers, framing).await
}

/// `GET /sse/{channel}`, the router's handler.
pub async fn raw(
    State(state): State<AppState>,
    conn: Option<axum::Extension<ConnectionCtx>>,
    Path(channel): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let conn = conn.as_deref();
    subscribe(&state, conn, Some(&channel), query.as_deref(), &headers).await
}

/// `GET /sse?channel=a&channel=b`, the router's handler.
pub async fn envelopes(
    State(state): State<AppState>,
    conn: Option<axum::Extension<ConnectionCtx>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    subscribe(&state, conn.as_deref(), None, query.as_deref(), &headers).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidings_core::{ChannelName, Data, Epoch, Position};

    fn msg(data: Data) -> Message {
        Message::new(
            ChannelName::new("c").unwrap(),
            Position {
                epoch: Epoch::new("e").unwrap(),
                offset: 1,
            },
            None,
            data,
            0,
        )
    }

    #[test]
    fn a_multi_line_string_becomes_several_data_lines() {
        let m = msg(Data::Text(Bytes::from_static(b"one\r\ntwo\nthree\rfour")));
        let f = raw_frame(&m);
        let text = std::str::from_utf8(&f).unwrap();
        assert!(
            text.ends_with("data: one\ndata: two\ndata: three\ndata: four\n\n"),
            "{text}"
        );
        assert!(text.starts_with("id: "));
    }

    #[test]
    fn a_one_line_payload_and_an_empty_one_are_one_data_line_each() {
        for (data, line) in [
            (&b"one line"[..], "data: one line\n\n"),
            (b"", "data: \n\n"),
        ] {
            let m = msg(Data::Text(Bytes::copy_from_slice(data)));
            let f = raw_frame(&m);
            let text = std::str::from_utf8(&f).unwrap();
            assert!(text.starts_with("id: ") && text.ends_with(line), "{text}");
            assert_eq!(text.matches("data: ").count(), 1, "{text}");
        }
        let m = msg(Data::Text(Bytes::from_static(b"ends in cr\r")));
        let f = raw_frame(&m);
        assert!(
            std::str::from_utf8(&f)
                .unwrap()
                .ends_with("data: ends in cr\ndata: \n\n")
        );
    }

    #[test]
    fn raw_json_is_sent_as_its_text() {
        let m = msg(Data::Json(Bytes::from_static(b"{\"title\":\"hi\"}")));
        let f = raw_frame(&m);
        assert!(
            std::str::from_utf8(&f)
                .unwrap()
                .contains("data: {\"title\":\"hi\"}\n\n")
        );
    }
}
