//! Read-only channel API: `GET /api/channels`, `/api/channels/{channel}`,
//! `/api/channels/{channel}/history?since=&limit=`.

use std::collections::BTreeMap;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, BytesMut};
use tidings_core::{ChannelName, Cursor, Since};

use crate::app::error::ApiError;
use crate::state::AppState;

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 10_000;

pub async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    let mut channels: BTreeMap<ChannelName, usize> = BTreeMap::new();
    for c in state.node.broker.channels().await? {
        channels.insert(c, 0);
    }
    for c in state.node.hub.channels() {
        let n = state.node.hub.subscriber_count(&c);
        channels.insert(c, n);
    }
    let list: Vec<_> = channels
        .into_iter()
        .map(|(c, n)| serde_json::json!({"channel": c.as_str(), "subscribers": n}))
        .collect();
    Ok(axum::Json(serde_json::json!({ "channels": list })).into_response())
}

pub async fn one(
    State(state): State<AppState>,
    Path(channel): Path<String>,
) -> Result<Response, ApiError> {
    let channel = ChannelName::new(&channel)?;
    let subscribers = state.node.hub.subscriber_count(&channel);
    let Some(stats) = state.node.broker.stats(&channel).await? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "channel_not_found",
            format!("no channel {channel} exists now (nothing published and nobody subscribed)"),
        ));
    };
    let cursor = Cursor::single(&channel, stats.top.clone()).encode();
    Ok(axum::Json(serde_json::json!({
        "channel": channel.as_str(),
        "epoch": stats.top.epoch.as_str(),
        "offset": stats.top.offset,
        "cursor": cursor,
        "subscribers": subscribers,
        "history_length": stats.history_len,
    }))
    .into_response())
}

pub async fn history(
    State(state): State<AppState>,
    Path(channel): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let channel = ChannelName::new(&channel)?;
    let mut since = None;
    let mut limit = DEFAULT_LIMIT;
    for (k, v) in crate::query::pairs(query.as_deref()) {
        match &*k {
            "since" if !v.is_empty() => {
                let cursor = Cursor::decode(&v)?;
                since = Some(cursor.get(&channel).cloned().ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_cursor",
                        format!("the cursor does not cover channel {channel}"),
                    )
                })?);
            }
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_parameter",
                            format!("limit must be 1 to {MAX_LIMIT}"),
                        )
                    })?;
            }
            _ => {}
        }
    }
    let since = since.map_or(Since::Last(limit), Since::After);
    let read = state.node.read(&channel, &since, Some(limit)).await?;
    let mut body = BytesMut::new();
    body.put_slice(b"{\"messages\":[");
    for (i, m) in read.replay.messages().iter().enumerate() {
        if i > 0 {
            body.put_u8(b',');
        }
        m.write_envelope(&mut body, m.cursor());
    }
    // The cursor resumes after the last message returned (or at the top when none were).
    let end = read
        .replay
        .messages()
        .last()
        .map_or(read.top.clone(), |m| m.position());
    let cursor = Cursor::single(&channel, end).encode();
    body.put_slice(b"],\"cursor\":\"");
    body.put_slice(cursor.as_bytes());
    body.put_slice(b"\",\"gaps\":");
    let gaps: Vec<_> = read.replay.gap().into_iter().collect();
    let _ = serde_json::to_writer((&mut body).writer(), &gaps);
    body.put_u8(b'}');
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.freeze(),
    )
        .into_response())
}

/// Clients per presence page, by default and at most.
pub const PRESENCE_PAGE: usize = 1000;
/// Presence reads per second one client (token subject, else address) may make; API keys
/// are exempt. A read is a page of up to `PRESENCE_PAGE` entries serialised under no lock,
/// but a client looping on it would still cost a core.
pub const PRESENCE_READS_PER_SEC: u32 = 10;

/// One page of who is present on `channel` (by client id, after `after`) and the client id
/// the next page starts after, if there is one; 409 `presence_disabled` where the namespace
/// keeps none.
pub async fn presence_of(
    state: &AppState,
    channel: &ChannelName,
    after: Option<&str>,
    limit: usize,
) -> Result<(Vec<tidings_core::ClientInfo>, Option<String>), ApiError> {
    if !state.node.policies.for_channel(channel).presence {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "presence_disabled",
            format!("the namespace of {channel} keeps no presence; set presence = true for it"),
        ));
    }
    let (clients, more) = state
        .node
        .broker
        .presence_page(channel, after, limit.clamp(1, PRESENCE_PAGE))
        .await?;
    let next = more
        .then(|| clients.last().map(|c| c.client.clone()))
        .flatten();
    Ok((clients, next))
}

/// 429 for a client over `PRESENCE_READS_PER_SEC`.
pub fn presence_rate_limited() -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("more than {PRESENCE_READS_PER_SEC} presence reads per second; slow down"),
    )
}

/// `GET /api/channels/{channel}/presence?after=CLIENT&limit=N`: one page, ordered by client
/// id; `next` (when present) is the `after` of the next page.
pub async fn presence(
    State(state): State<AppState>,
    conn: Option<axum::Extension<crate::net::ConnectionCtx>>,
    Path(channel): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let channel = ChannelName::new(&channel)?;
    let mut after = None;
    let mut limit = PRESENCE_PAGE;
    for (k, v) in crate::query::pairs(query.as_deref()) {
        match &*k {
            "after" if !v.is_empty() => after = Some(v.into_owned()),
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=PRESENCE_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_parameter",
                            format!("limit must be 1 to {PRESENCE_PAGE}"),
                        )
                    })?;
            }
            _ => {}
        }
    }
    // With [auth] only API keys get here (`/api/*`), and they are exempt; in open mode the
    // address pays.
    if !state.auth().enabled()
        && let Some(conn) = conn
        && !state.may_read_presence(&crate::auth::Principal::Anonymous, conn.peer.ip())
    {
        return Err(presence_rate_limited());
    }
    let (clients, next) = presence_of(&state, &channel, after.as_deref(), limit).await?;
    Ok(axum::Json(
        serde_json::json!({"channel": channel.as_str(), "clients": clients, "next": next}),
    )
    .into_response())
}
