//! HTTP streaming: newline-delimited JSON (`application/x-ndjson`) over a chunked response
//! (or HTTP/2 DATA frames). One envelope per line; control records carry a `type`; an empty
//! line is the heartbeat.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use tidings_core::{Disconnect, Gap, Message, PresenceEvent};

use crate::app::error::ApiError;
use crate::net::ConnectionCtx;
use crate::state::AppState;
use crate::transport::stream::{self, Framing};
use crate::transport::{TransportKind, frame_slot};

pub struct NdjsonFraming;

#[derive(Serialize)]
struct Control<'a, T: Serialize> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(flatten)]
    body: &'a T,
    #[serde(skip_serializing_if = "Option::is_none")]
    cursor: Option<&'a str>,
}

fn write_control<T: Serialize>(
    kind: &'static str,
    body: &T,
    cursor: Option<&[u8]>,
    out: &mut BytesMut,
) {
    let cursor = cursor.and_then(|c| std::str::from_utf8(c).ok());
    // Serializing into memory cannot fail for these derived structs.
    let _ = serde_json::to_writer(out.writer(), &Control { kind, body, cursor });
    out.put_u8(b'\n');
}

impl Framing for NdjsonFraming {
    const KIND: TransportKind = TransportKind::HttpStream;
    const CONTENT_TYPE: &'static str = "application/x-ndjson";

    fn shared_frame<'m>(&self, m: &'m Arc<Message>, single: bool) -> Option<&'m Bytes> {
        single.then(|| {
            m.cached_frame(frame_slot::NDJSON, |m| {
                let mut b = BytesMut::new();
                m.write_envelope(&mut b, m.cursor());
                b.put_u8(b'\n');
                b.freeze()
            })
        })
    }

    fn own_frame(&mut self, m: &Arc<Message>, cursor: &[u8], out: &mut BytesMut) {
        m.write_envelope(out, cursor);
        out.put_u8(b'\n');
    }

    fn gap(&mut self, gap: &Gap, cursor: &[u8], out: &mut BytesMut) {
        write_control("gap", gap, Some(cursor), out);
    }

    fn presence(&mut self, event: &PresenceEvent, out: &mut BytesMut) {
        write_control(event.kind.as_str(), &event.body(), None, out);
    }

    fn opened(&mut self, cursor: &[u8], out: &mut BytesMut) {
        out.put_slice(b"{\"type\":\"ready\",\"cursor\":\"");
        out.put_slice(cursor);
        out.put_slice(b"\"}\n");
    }

    fn disconnect(&mut self, d: Disconnect, out: &mut BytesMut) {
        write_control("disconnect", &d, None, out);
    }

    fn heartbeat(&mut self, out: &mut BytesMut) {
        out.put_u8(b'\n');
    }
}

/// `GET /stream/{channel}` (`channel`) or `GET /stream?channel=a&channel=b`.
pub async fn subscribe(
    state: &AppState,
    conn: Option<&ConnectionCtx>,
    channel: Option<&str>,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    stream::subscribe(state, conn, channel, query, headers, NdjsonFraming).await
}

/// `GET /stream/{channel}`, the router's handler.
pub async fn one(
    State(state): State<AppState>,
    conn: Option<axum::Extension<ConnectionCtx>>,
    Path(channel): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let conn = conn.as_deref();
    subscribe(&state, conn, Some(&channel), query.as_deref(), &headers).await
}

/// `GET /stream?channel=a&channel=b`, the router's handler.
pub async fn many(
    State(state): State<AppState>,
    conn: Option<axum::Extension<ConnectionCtx>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    subscribe(&state, conn.as_deref(), None, query.as_deref(), &headers).await
}
