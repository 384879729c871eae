//! The Pusher HTTP API (`/apps/{id}/…`): every request's signature is checked first
//! (`tidings_pusher::sign::verify_request`: key, version, timestamp within 600 s, `body_md5`,
//! HMAC in constant time), then the body is parsed whole (`tidings_pusher::api`) before
//! anything is published, so a refusal means nothing was delivered.
//!
//! Statuses: 401 for anything wrong with the signature (the SDKs surface the status and the
//! body), 404 for an unknown app id, 400 for a malformed body or query, 413 for data over the
//! app's `max_event_bytes`, 503 when the broker could not take the publish. Bodies are the
//! server's `{"error":{"code","message"}}`.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use tidings_pusher::api::{self, Refusal, Trigger};
use tidings_pusher::sign::{self, SignError, SignedRequest};
use tidings_pusher::{App, bridge};

use crate::app::error::ApiError;
use crate::state::AppState;

fn refusal(r: Refusal) -> ApiError {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST);
    ApiError::new(status, r.code, r.message)
}

fn sign_error(e: SignError) -> ApiError {
    let code = match e {
        SignError::Missing(_) => "missing_auth_parameter",
        SignError::WrongKey => "invalid_key",
        SignError::Version(_) => "invalid_auth_version",
        SignError::Timestamp { .. } => "timestamp_expired",
        SignError::BodyMd5 => "body_md5_mismatch",
        SignError::Signature(_) | SignError::Malformed => "invalid_signature",
    };
    ApiError::new(StatusCode::UNAUTHORIZED, code, e.to_string())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A request that passed the signature check: its app, decoded query and body.
struct Verified {
    app: Arc<App>,
    query: Vec<(String, String)>,
    body: Bytes,
}

impl Verified {
    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Finds the app, reads the body (bounded in size and time) and checks the signature.
async fn verify(state: &AppState, id: &str, req: Request) -> Result<Verified, ApiError> {
    let Some(app) = state.pusher.by_id(id) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_app",
            format!("no Pusher app with id {id:?} ([[pusher.apps]])"),
        ));
    };
    let (parts, body) = req.into_parts();
    // Room for a full batch of maximal events, with their JSON escaping.
    let limit = (app.config.max_event_bytes * 2 * api::MAX_BATCH_EVENTS + 65_536)
        .max(state.config().server.max_message_bytes);
    let body = read_body(state, body, limit).await.inspect_err(|_| {
        app.counters.api_refused.fetch_add(1, Relaxed);
    })?;
    let query: Vec<(String, String)> = parts
        .uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let signed = SignedRequest {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: &query,
        body: &body,
    };
    if let Err(e) = sign::verify_request(&app.config.key, &app.config.secret.0, &signed, now_secs())
    {
        app.counters.api_refused.fetch_add(1, Relaxed);
        return Err(sign_error(e));
    }
    app.counters.api_requests.fetch_add(1, Relaxed);
    Ok(Verified { app, query, body })
}

async fn read_body(state: &AppState, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let timeout = state.config().server.request_body_timeout;
    let Ok(collected) = tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await
    else {
        return Err(ApiError::body_timeout(timeout));
    };
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large(limit)),
        Err(e) => Err(ApiError::bad_request(
            "invalid_body",
            format!("could not read the request body: {e}"),
        )),
    }
}

fn json(v: serde_json::Value) -> Response {
    axum::Json(v).into_response()
}

/// Publishes one trigger on each of its channels. A `socket_id` travels in the message
/// (`bridge::to_tidings_from`), so the node holding that socket, whichever it is, skips it.
async fn publish(state: &AppState, app: &App, t: &Trigger) -> Result<(), ApiError> {
    for channel in &t.channels {
        let p = bridge::to_tidings_from(
            &app.config.id,
            channel,
            &t.name,
            &t.data,
            None,
            t.socket_id.as_deref(),
        )
        .map_err(|e| ApiError::bad_request("invalid_channel", e.to_string()))?;
        crate::app::publish::publish(state, &p.channel, p.event, p.data).await?;
        app.counters.events_triggered.fetch_add(1, Relaxed);
    }
    Ok(())
}

/// `POST /apps/{id}/events`.
pub async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let v = verify(&state, &id, req).await?;
    let t = api::parse_trigger(&v.app, &v.body).map_err(refusal)?;
    publish(&state, &v.app, &t).await?;
    api::trigger_answer(&v.app, &t)
        .await
        .map(json)
        .map_err(refusal)
}

/// `POST /apps/{id}/batch_events`: the whole batch is checked before the first publish.
pub async fn batch_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let v = verify(&state, &id, req).await?;
    let batch = api::parse_batch(&v.app, &v.body).map_err(refusal)?;
    for t in &batch {
        publish(&state, &v.app, t).await?;
    }
    api::batch_answer(&v.app, &batch)
        .await
        .map(json)
        .map_err(refusal)
}

/// `GET /apps/{id}/channels?filter_by_prefix=&info=`.
pub async fn channels(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let v = verify(&state, &id, req).await?;
    api::channels_answer(&v.app, v.param("filter_by_prefix"), v.param("info"))
        .await
        .map(json)
        .map_err(refusal)
}

/// `GET /apps/{id}/channels/{name}?info=`.
pub async fn channel(
    State(state): State<AppState>,
    Path((id, name)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    let v = verify(&state, &id, req).await?;
    api::channel_answer(&v.app, &name, v.param("info"))
        .await
        .map(json)
        .map_err(refusal)
}

/// `GET /apps/{id}/channels/{name}/users`.
pub async fn users(
    State(state): State<AppState>,
    Path((id, name)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    let v = verify(&state, &id, req).await?;
    api::users_answer(&v.app, &name)
        .await
        .map(json)
        .map_err(refusal)
}

/// `POST /apps/{id}/users/{user}/terminate_connections`: ends every connection signed in
/// (`pusher:signin`) as that user, on every node (a roster broadcast).
pub async fn terminate_connections(
    State(state): State<AppState>,
    Path((id, user)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    let v = verify(&state, &id, req).await?;
    v.app
        .terminate_user(&user)
        .await
        .map_err(|e| refusal(api::Refusal::unavailable(e)))?;
    Ok(json(serde_json::json!({})))
}
