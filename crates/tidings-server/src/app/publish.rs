//! Publishing over HTTP: `POST /publish/{channel}` (the body is the data) and `POST /publish`
//! (a JSON document naming channels, for one message, a fan-in to several channels, or a
//! batch). A batch is validated whole before anything is published, so a 400 means nothing
//! was stored.

use std::sync::atomic::Ordering::Relaxed;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use serde_json::value::RawValue;
use tidings_core::{
    ChannelName, Data, EventName, IdempotencyKey, Message, PublishOptions, Published,
};

use crate::app::error::ApiError;
use crate::auth::Principal;
use crate::net::reply::{Reply, ReplyBody, Text};
use crate::net::{ConnectionCtx, Headers};
use crate::state::AppState;

/// A batch body may hold this many messages' worth of `max_message_bytes`.
const BATCH_BODY_FACTOR: usize = 16;
const MAX_BATCH: usize = 1000;

/// Reads a body of at most `limit` bytes within the configured time; more answers 413
/// without reading it all, slower answers 408 (a client trickling a body holds a task).
async fn read_body(state: &AppState, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let timeout = state.config().server.request_body_timeout;
    let Ok(collected) = tokio::time::timeout(timeout, collect(Limited::new(body, limit))).await
    else {
        return Err(ApiError::body_timeout(timeout));
    };
    match collected {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large(limit)),
        Err(e) => Err(ApiError::bad_request(
            "invalid_body",
            format!("could not read the request body: {e}"),
        )),
    }
}

/// A body's data frames as one buffer. Most bodies are one frame (the lean path reads them
/// whole): that one is returned as it is, without the list `BodyExt::collect` keeps (an
/// allocation per publish).
async fn collect<B>(mut body: B) -> Result<Bytes, B::Error>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    let mut one: Option<Bytes> = None;
    let mut many: Option<BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if let Some(many) = &mut many {
            many.extend_from_slice(&data);
        } else if let Some(first) = one.take() {
            let mut joined = BytesMut::with_capacity(first.len() + data.len());
            joined.extend_from_slice(&first);
            joined.extend_from_slice(&data);
            many = Some(joined);
        } else {
            one = Some(data);
        }
    }
    Ok(many.map(BytesMut::freeze).or(one).unwrap_or_default())
}

/// Deeper JSON is refused: subscribers' parsers commonly stop at 128 levels (serde_json
/// does), and a message some subscribers cannot parse is as good as lost.
pub const MAX_JSON_DEPTH: usize = 128;

/// What one pass over JSON text finds for the checks below: every publish's data goes through
/// all three, so they share one scan (strings skipped, escapes followed) and at most one full
/// parse, which only the rare suspect inputs need.
struct Scan {
    /// The deepest nesting of brackets outside strings.
    depth: usize,
    /// A `\u` escape of a UTF-16 surrogate (`\uD800`–`\uDFFF`) somewhere.
    surrogate_escape: bool,
    /// A number with an exponent, or 300 digits in a row: it may be beyond a double.
    suspect_number: bool,
}

fn scan(json: &[u8]) -> Scan {
    let mut out = Scan {
        depth: 0,
        surrogate_escape: false,
        suspect_number: false,
    };
    let (mut depth, mut in_string, mut escaped, mut digits, mut prev) =
        (0usize, false, false, 0usize, 0u8);
    for (i, &b) in json.iter().enumerate() {
        if b == b'\\'
            && !out.surrogate_escape
            && let [b'u', d, n, ..] = json[i + 1..]
        {
            out.surrogate_escape =
                matches!(d, b'd' | b'D') && matches!(n, b'8'..=b'9' | b'a'..=b'f' | b'A'..=b'F');
        }
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                out.depth = out.depth.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        match b {
            b'0'..=b'9' => digits += 1,
            b'e' | b'E' if prev.is_ascii_digit() => out.suspect_number = true,
            b'"' => {}
            _ => digits = 0,
        }
        if digits >= 300 {
            out.suspect_number = true;
        }
        prev = b;
    }
    out
}

/// Whether strict parsers read the text: the one full parse the suspect cases need.
fn strictly_parses(json: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(json).is_ok()
}

/// Why JSON `what` ("the body", "data") is refused, checked in this order: a lone surrogate
/// escape, a number beyond a double, nesting deeper than `MAX_JSON_DEPTH`. `None` if none.
fn json_fault(json: &[u8], what: &str) -> Option<ApiError> {
    let found = scan(json);
    let parses = (found.surrogate_escape || found.suspect_number).then(|| strictly_parses(json));
    if found.surrogate_escape && parses == Some(false) {
        return Some(lone_surrogate());
    }
    if found.suspect_number && parses == Some(false) {
        return Some(number_out_of_range());
    }
    if found.depth > MAX_JSON_DEPTH {
        return Some(ApiError::bad_request(
            "invalid_json",
            format!("{what} nested deeper than {MAX_JSON_DEPTH} levels is refused"),
        ));
    }
    None
}

/// Whether brackets nest at most `max` deep (strings skipped).
#[cfg(test)]
fn depth_within(json: &[u8], max: usize) -> bool {
    scan(json).depth <= max
}

/// Whether the JSON's `\u` escapes are well paired. `RawValue` checks syntax only and lets a
/// lone surrogate (`"\ud800"`) through; strict parsers (serde_json among them) then refuse the
/// whole message, so it would reach some subscribers and not others.
#[cfg(test)]
fn surrogates_paired(json: &[u8]) -> bool {
    !scan(json).surrogate_escape || strictly_parses(json)
}

/// Whether every number fits a double. `RawValue` checks syntax only and lets `1e400` (or an
/// integer of 309 digits) through; strict parsers (serde_json among them) refuse the whole
/// message, others read infinity.
#[cfg(test)]
fn numbers_in_range(json: &[u8]) -> bool {
    !scan(json).suspect_number || strictly_parses(json)
}

fn number_out_of_range() -> ApiError {
    ApiError::bad_request(
        "invalid_json",
        "a number is beyond the range of a double (about 1.8e308); many JSON parsers refuse it",
    )
}

fn lone_surrogate() -> ApiError {
    ApiError::bad_request(
        "invalid_json",
        "a \\u escape encodes a lone UTF-16 surrogate; many JSON parsers refuse that",
    )
}

/// Validates JSON text and returns the value without surrounding whitespace.
fn json_data(body: Bytes) -> Result<Data, ApiError> {
    if let Some(fault) = json_fault(&body, "JSON") {
        return Err(fault);
    }
    if let Err(e) = serde_json::from_slice::<&RawValue>(&body) {
        return Err(ApiError::bad_request(
            "invalid_json",
            format!("the body is not valid JSON: {e}"),
        ));
    }
    let start = body
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(0);
    let end = body
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    Ok(Data::Json(body.slice(start..end)))
}

/// SPEC §10: the content type decides what kind of data the body is.
pub(crate) fn data_from<H: Headers + ?Sized>(headers: &H, body: Bytes) -> Result<Data, ApiError> {
    let ct = headers.text("content-type").and_then(Result::ok).map(|v| {
        let t = v.split(';').next().unwrap_or("").trim();
        // Lowercased only when it must be: a copy per publish otherwise.
        if t.bytes().any(|b| b.is_ascii_uppercase()) {
            std::borrow::Cow::Owned(t.to_ascii_lowercase())
        } else {
            std::borrow::Cow::Borrowed(t)
        }
    });
    match ct.as_deref() {
        Some("application/json") => json_data(body),
        Some(t) if t.ends_with("+json") => json_data(body),
        None | Some("") => text_data(body),
        Some(t) if t.starts_with("text/") => text_data(body),
        Some("application/octet-stream") => Ok(Data::Binary(body)),
        Some(other) => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "content type {other:?} is not accepted; use application/json, text/plain or application/octet-stream"
            ),
        )),
    }
}

fn text_data(body: Bytes) -> Result<Data, ApiError> {
    match std::str::from_utf8(&body) {
        Ok(_) => Ok(Data::Text(body)),
        Err(e) => Err(ApiError::bad_request(
            "invalid_utf8",
            format!(
                "text data must be UTF-8 (invalid byte at {}); send binary as application/octet-stream",
                e.valid_up_to()
            ),
        )),
    }
}

pub(crate) fn event_from_query(query: Option<&str>) -> Result<Option<EventName>, ApiError> {
    for (k, v) in crate::query::pairs(query) {
        if k == "event" {
            return Ok(Some(EventName::new(&v)?));
        }
    }
    Ok(None)
}

/// The `Idempotency-Key` request header, validated.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Set on a reply that repeats an earlier publish's answer (nothing was published now).
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

pub(crate) fn idempotency_key(key: &str) -> Result<IdempotencyKey, ApiError> {
    IdempotencyKey::new(key)
        .map_err(|e| ApiError::bad_request("invalid_idempotency_key", e.to_string()))
}

fn header_key<H: Headers + ?Sized>(headers: &H) -> Result<Option<IdempotencyKey>, ApiError> {
    let mut values = headers.all(IDEMPOTENCY_KEY);
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::bad_request(
            "invalid_idempotency_key",
            "give one Idempotency-Key header, not several",
        ));
    }
    let text = crate::net::request::text(value).map_err(|_| {
        ApiError::bad_request(
            "invalid_idempotency_key",
            "the Idempotency-Key is not ASCII",
        )
    })?;
    idempotency_key(text.trim()).map(Some)
}

pub fn position_json(m: &Message) -> serde_json::Value {
    serde_json::json!({
        "channel": m.channel.as_str(),
        "offset": m.offset,
        "epoch": m.epoch.as_str(),
        "cursor": String::from_utf8_lossy(m.cursor()),
        "time": m.time,
    })
}

/// `POST /publish/{channel}` (the router's handler; `publish_body` does the work).
pub async fn to_channel(
    State(state): State<AppState>,
    conn: Option<axum::Extension<ConnectionCtx>>,
    Path(channel): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    publish_body(
        &state,
        conn.as_deref(),
        &channel,
        query.as_deref(),
        &headers,
        body,
    )
    .await
    .map(Reply::into_response)
}

/// Publishes the request body to `channel` and answers with its position.
pub async fn publish_body(
    state: &AppState,
    conn: Option<&ConnectionCtx>,
    channel: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Reply, ApiError> {
    let (channel, event, key) = checked(state, conn, channel, query, headers)?;
    let body = read_body(state, body, state.config().server.max_message_bytes).await?;
    let data = data_from(headers, body)?;
    let published = publish_keyed(state, &channel, event, data, key).await?;
    Ok(single_reply(&published))
}

/// `publish_body` for a body already read whole (the lean path's, `net::request`): the same
/// checks in the same order, and the same 413 past `max_message_bytes`. The data is a copy,
/// so history keeps none of the request's buffer.
pub async fn publish_bytes<H: Headers + Sync + ?Sized>(
    state: &AppState,
    conn: Option<&ConnectionCtx>,
    channel: &str,
    query: Option<&str>,
    headers: &H,
    body: &[u8],
) -> Result<Reply, ApiError> {
    let (channel, event, key) = checked(state, conn, channel, query, headers)?;
    let limit = state.config().server.max_message_bytes;
    if body.len() > limit {
        return Err(ApiError::too_large(limit));
    }
    let data = data_from(headers, Bytes::copy_from_slice(body))?;
    let published = publish_keyed(state, &channel, event, data, key).await?;
    Ok(single_reply(&published))
}

/// What a publish checks before its body: the channel's name, who asks and whether they
/// may, the `event` parameter and the `Idempotency-Key`.
fn checked<H: Headers + ?Sized>(
    state: &AppState,
    conn: Option<&ConnectionCtx>,
    channel: &str,
    query: Option<&str>,
    headers: &H,
) -> Result<(ChannelName, Option<EventName>, Option<IdempotencyKey>), ApiError> {
    let channel = ChannelName::new(channel)?;
    let who = gate(state, conn, headers, query)?;
    let policy = state.node.policies.for_channel(&channel);
    state.auth().check_publish(&who, &channel, &policy)?;
    let event = event_from_query(query)?;
    let key = header_key(headers)?;
    Ok((channel, event, key))
}

/// The reply to one publish; a replayed key says so in a header (the body is the first
/// publish's answer, unchanged).
fn single_reply(p: &Published) -> Reply {
    let mut reply = position_reply(&p.message);
    if p.replayed {
        reply.header(IDEMPOTENT_REPLAYED, Text::Static("true"));
    }
    reply
}

/// `position_json` written straight to bytes (same fields, same order) for the hot
/// single-message publish: no `Value` tree, no map. Every field is already JSON-safe: channel
/// names, epochs and cursors are drawn from URL-safe ASCII. A lean reply (`net::reply`): the
/// text is kept in the reply when it is short (most are), so it costs no allocation.
fn position_reply(m: &Message) -> Reply {
    let (mut offset, mut time) = (itoa::Buffer::new(), itoa::Buffer::new());
    let body = ReplyBody::joined(&[
        b"{\"channel\":\"",
        m.channel.as_str().as_bytes(),
        b"\",\"offset\":",
        offset.format(m.offset).as_bytes(),
        b",\"epoch\":\"",
        m.epoch.as_str().as_bytes(),
        b"\",\"cursor\":\"",
        m.cursor(),
        b"\",\"time\":",
        time.format(m.time).as_bytes(),
        b"}",
    ]);
    Reply::new(StatusCode::OK, "application/json", body)
}

pub(crate) async fn publish(
    state: &AppState,
    channel: &ChannelName,
    event: Option<EventName>,
    data: Data,
) -> Result<std::sync::Arc<Message>, ApiError> {
    publish_keyed(state, channel, event, data, None)
        .await
        .map(|p| p.message)
}

/// Publishes with an optional idempotency key (remembered for `[broker] idempotency_window`).
pub(crate) async fn publish_keyed(
    state: &AppState,
    channel: &ChannelName,
    event: Option<EventName>,
    data: Data,
    idempotency_key: Option<IdempotencyKey>,
) -> Result<Published, ApiError> {
    let options = PublishOptions {
        idempotency_key,
        idempotency_window: state.config().broker.idempotency_window,
    };
    match state
        .node
        .publish_with(channel, event, data, &options)
        .await
    {
        Ok(p) => {
            if !p.replayed {
                state.metrics.published.fetch_add(1, Relaxed);
            }
            Ok(p)
        }
        Err(e) => {
            state.metrics.publish_errors.fetch_add(1, Relaxed);
            Err(e.into())
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    channel: Option<String>,
    channels: Option<Vec<String>>,
    data: Option<Box<RawValue>>,
    event: Option<String>,
    encoding: Option<String>,
    messages: Option<Vec<Entry>>,
    idempotency_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    channel: String,
    data: Box<RawValue>,
    event: Option<String>,
    encoding: Option<String>,
    idempotency_key: Option<String>,
}

pub(crate) struct Validated {
    pub channel: ChannelName,
    pub event: Option<EventName>,
    pub data: Data,
    pub idempotency_key: Option<IdempotencyKey>,
}

/// Validates one message of a document; `max_message_bytes` is `server.max_message_bytes`.
pub(crate) fn validate_within(
    max_message_bytes: usize,
    channel: &str,
    data: &RawValue,
    event: Option<&str>,
    encoding: Option<&str>,
) -> Result<Validated, ApiError> {
    let channel = ChannelName::new(channel)?;
    let event = event.map(EventName::new).transpose()?;
    let data = match encoding {
        None => {
            if let Some(fault) = json_fault(data.get().as_bytes(), "data") {
                return Err(fault);
            }
            Data::Json(Bytes::copy_from_slice(data.get().as_bytes()))
        }
        Some("base64") => {
            let s: String = serde_json::from_str(data.get()).map_err(|_| {
                ApiError::bad_request(
                    "invalid_data",
                    "with \"encoding\":\"base64\", data must be a string",
                )
            })?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(s.as_bytes())
                .map_err(|_| ApiError::bad_request("invalid_data", "data is not valid base64"))?;
            Data::Binary(Bytes::from(bytes))
        }
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_data",
                format!("unknown encoding {other:?}; only \"base64\" is supported"),
            ));
        }
    };
    if data.len() > max_message_bytes {
        return Err(ApiError::too_large(max_message_bytes));
    }
    Ok(Validated {
        channel,
        event,
        data,
        idempotency_key: None,
    })
}

/// `POST /publish` with a JSON document.
pub async fn document(
    State(state): State<AppState>,
    conn: Option<axum::Extension<ConnectionCtx>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let who = gate(&state, conn.as_deref(), &headers, query.as_deref())?;
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.is_empty() && !ct.to_ascii_lowercase().contains("json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "POST /publish takes a JSON document; to publish a raw body use POST /publish/{channel}",
        ));
    }
    let limit = state
        .config()
        .server
        .max_message_bytes
        .saturating_mul(BATCH_BODY_FACTOR);
    let body = read_body(&state, body, limit).await?;
    let max = state.config().server.max_message_bytes;
    match parse_document(max, header_key(&headers)?, &body)? {
        Parsed::One(v) => {
            allowed(&state, &who, std::slice::from_ref(&v), "channel")?;
            let p = publish_keyed(&state, &v.channel, v.event, v.data, v.idempotency_key).await?;
            Ok(single_reply(&p).into_response())
        }
        Parsed::Batch(batch, what) => {
            allowed(&state, &who, &batch, what)?;
            publish_batch(&state, batch).await
        }
    }
}

/// A `POST /publish` document, validated whole: nothing of it is published yet.
pub(crate) enum Parsed {
    /// `{"channel","data"}`.
    One(Validated),
    /// `{"channels":[…],"data"}` or `{"messages":[…]}` (the field named, for errors).
    Batch(Vec<Validated>, &'static str),
}

/// Parses and validates a `POST /publish` body (`header_key`: the `Idempotency-Key` header).
/// Synchronous, and all of it: a refusal here means nothing of the document is published.
pub(crate) fn parse_document(
    max_message_bytes: usize,
    header_key: Option<IdempotencyKey>,
    body: &[u8],
) -> Result<Parsed, ApiError> {
    let validate = |c: &str, d: &RawValue, e: Option<&str>, enc: Option<&str>| {
        validate_within(max_message_bytes, c, d, e, enc)
    };
    let doc: Document = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!(
                "expected {{\"channel\",\"data\"}}, {{\"channels\":[…],\"data\"}} or {{\"messages\":[…]}}: {e}"
            ),
        )
    })?;
    // One key for the request: the header, or "idempotency_key" in the document (with
    // "channels", the key applies per channel: keys are remembered per channel).
    let doc_key = match (header_key, doc.idempotency_key.as_deref()) {
        (Some(h), Some(b)) if h.as_str() != b => {
            return Err(ApiError::bad_request(
                "invalid_idempotency_key",
                "the Idempotency-Key header and \"idempotency_key\" differ",
            ));
        }
        (Some(h), _) => Some(h),
        (None, Some(b)) => Some(idempotency_key(b)?),
        (None, None) => None,
    };
    let shape_error = || {
        ApiError::bad_request(
            "invalid_request",
            "give exactly one of \"channel\", \"channels\" or \"messages\"; \"data\" goes with the first two",
        )
    };
    match (doc.channel, doc.channels, doc.messages) {
        (Some(channel), None, None) => {
            let data = doc.data.ok_or_else(shape_error)?;
            let v = validate(
                &channel,
                &data,
                doc.event.as_deref(),
                doc.encoding.as_deref(),
            )?;
            Ok(Parsed::One(Validated {
                idempotency_key: doc_key,
                ..v
            }))
        }
        (None, Some(channels), None) => {
            let data = doc.data.ok_or_else(shape_error)?;
            check_batch_len(channels.len())?;
            let batch = channels
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    validate(c, &data, doc.event.as_deref(), doc.encoding.as_deref())
                        .map(|v| Validated {
                            idempotency_key: doc_key.clone(),
                            ..v
                        })
                        .map_err(|e| e.context(&format!("channels[{i}]")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Parsed::Batch(batch, "channels"))
        }
        (None, None, Some(messages)) => {
            if doc.data.is_some() || doc.event.is_some() || doc.encoding.is_some() {
                return Err(shape_error());
            }
            if doc_key.is_some() {
                return Err(ApiError::bad_request(
                    "invalid_idempotency_key",
                    "a batch takes \"idempotency_key\" per entry, not one for the whole request",
                ));
            }
            check_batch_len(messages.len())?;
            let batch = messages
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    // The key before the channel, as for a single document: an entry wrong
                    // in both is refused with the same code either way.
                    let key = m
                        .idempotency_key
                        .as_deref()
                        .map(idempotency_key)
                        .transpose();
                    key.and_then(|key| {
                        let v = validate(
                            &m.channel,
                            &m.data,
                            m.event.as_deref(),
                            m.encoding.as_deref(),
                        )?;
                        Ok(Validated {
                            idempotency_key: key,
                            ..v
                        })
                    })
                    .map_err(|e| e.context(&format!("messages[{i}]")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Parsed::Batch(batch, "messages"))
        }
        _ => Err(shape_error()),
    }
}

/// Authenticates a publishing request and spends one unit of the client's publish rate (per
/// token subject, else per IP address; API keys, being backends, are exempt): 401/400 for
/// credentials, 429 for the rate.
fn gate<H: Headers + ?Sized>(
    state: &AppState,
    conn: Option<&ConnectionCtx>,
    headers: &H,
    query: Option<&str>,
) -> Result<Principal, ApiError> {
    // Open mode has no credentials to tell a backend by, so the HTTP publish API is taken to
    // be the backend ("server" rights, no rate limit); WebSocket frames remain the clients'.
    let auth = state.auth();
    if !auth.enabled() {
        return Ok(Principal::ApiKey);
    }
    let who = auth.authenticate(headers, query)?;
    // A browser sends the cookie with any site's form or fetch: a publish it authenticates
    // must come from a page of an allowed origin (cross-site request forgery otherwise).
    if crate::auth::cookie_only(headers, query)
        && !crate::app::cors::same_site_request(state, headers)
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "a publish authenticated by the tidings_token cookie must come from an allowed Origin \
             (server.cors_origins or the server's own); send the token as Authorization: Bearer instead",
        ));
    }
    if who != Principal::ApiKey
        && let Some(conn) = conn
        && !state.may_publish(&who, conn.peer.ip())
    {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "more than {} publishes per second from this client (client_publish_rate); slow down",
                state.config().server.client_publish_rate
            ),
        ));
    }
    Ok(who)
}

/// Checks the whole batch before anything is published (403/401 naming the entry).
fn allowed(
    state: &AppState,
    who: &Principal,
    batch: &[Validated],
    what: &str,
) -> Result<(), ApiError> {
    for (i, v) in batch.iter().enumerate() {
        let policy = state.node.policies.for_channel(&v.channel);
        state
            .auth()
            .check_publish(who, &v.channel, &policy)
            .map_err(|e| {
                if batch.len() > 1 {
                    e.context(&format!("{what}[{i}]"))
                } else {
                    e
                }
            })?;
    }
    Ok(())
}

fn check_batch_len(n: usize) -> Result<(), ApiError> {
    if n == 0 || n > MAX_BATCH {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("a batch holds 1 to {MAX_BATCH} messages, not {n}"),
        ));
    }
    Ok(())
}

/// Publishes a validated batch in order. A broker failure part-way is reported per entry, so
/// the client knows exactly which positions were stored.
async fn publish_batch(state: &AppState, batch: Vec<Validated>) -> Result<Response, ApiError> {
    let mut results = Vec::with_capacity(batch.len());
    for v in batch {
        let published = publish_keyed(state, &v.channel, v.event, v.data, v.idempotency_key);
        results.push(match published.await {
            Ok(p) => position_json(&p.message),
            Err(e) => serde_json::json!({"error": {"code": e.code, "message": e.message}}),
        });
    }
    Ok(axum::Json(serde_json::json!({ "results": results })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_depth_ignores_brackets_inside_strings() {
        assert!(depth_within(b"[[1]]", 2));
        assert!(!depth_within(b"[[[1]]]", 2));
        assert!(depth_within(br#"["[[[[\"]]]]"]"#, 1));
    }

    #[test]
    fn lone_surrogate_escapes_are_refused_and_pairs_pass() {
        assert!(!surrogates_paired(br#""\ud800""#));
        assert!(!surrogates_paired(br#"{"a":"\uDC00x"}"#));
        assert!(surrogates_paired(br#""\ud83d\ude00""#));
        assert!(surrogates_paired(br#""\u00e9 plain""#));
    }

    #[test]
    fn numbers_beyond_a_double_are_refused_and_large_ones_within_it_pass() {
        // Found by the publish_body fuzzer: `1e400` is valid JSON syntax.
        assert!(!numbers_in_range(b"22222.22E2222222"));
        assert!(!numbers_in_range(br#"{"a":[1e400]}"#));
        assert!(!numbers_in_range(
            format!("[{}]", "9".repeat(400)).as_bytes()
        ));
        assert!(numbers_in_range(b"[1e308, -2.5E-300, 0.1e1, true, false]"));
        assert!(numbers_in_range(
            format!("0.{}", "1".repeat(400)).as_bytes()
        ));
        // Inside strings nothing is a number.
        assert!(numbers_in_range(br#"{"1e400":"9e999 \" 1e400"}"#));
    }

    #[tokio::test]
    async fn the_fast_publish_reply_is_exactly_position_json() {
        let m = Message::new(
            ChannelName::new("chat:lobby@x=1").unwrap(),
            tidings_core::Position {
                epoch: tidings_core::Epoch::new("h3k9").unwrap(),
                offset: 42,
            },
            None,
            Data::Text(Bytes::from_static(b"hi")),
            1_732_200_000_123,
        );
        let res = position_reply(&m).into_response();
        assert_eq!(res.headers()[header::CONTENT_TYPE], "application/json");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, serde_json::to_string(&position_json(&m)).unwrap());
    }
}
