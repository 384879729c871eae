//! Read-only channel API: `GET /api/channels`, `/api/channels/{channel}`,
//! `/api/channels/{channel}/history?since=&limit=`.

use std::collections::BTreeMap;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, BytesMut};
use tidings_core::{ChannelName, Cursor, Since};

use crate::api::error::ApiError;
use crate::server::AppState;

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

/// Who is present on `channel`; 409 `presence_disabled` where the namespace keeps none.
pub async fn presence_of(
    state: &AppState,
    channel: &ChannelName,
) -> Result<Vec<tidings_core::ClientInfo>, ApiError> {
    if !state.node.policies.for_channel(channel).presence {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "presence_disabled",
            format!("the namespace of {channel} keeps no presence; set presence = true for it"),
        ));
    }
    Ok(state.node.broker.presence(channel).await?)
}

/// `GET /api/channels/{channel}/presence`.
pub async fn presence(
    State(state): State<AppState>,
    Path(channel): Path<String>,
) -> Result<Response, ApiError> {
    let channel = ChannelName::new(&channel)?;
    let clients = presence_of(&state, &channel).await?;
    Ok(
        axum::Json(serde_json::json!({"channel": channel.as_str(), "clients": clients}))
            .into_response(),
    )
}
