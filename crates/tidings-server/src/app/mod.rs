//! The HTTP API besides the transports: publishing, channels, health and metrics, and the
//! router that puts every route together (`app` puts CORS and the hot routes in front of it).

#[path = "service.rs"]
pub mod app;
pub mod channels;
pub mod cors;
pub mod error;
pub mod publish;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Router, middleware};

use crate::api::error::ApiError;
use crate::server::AppState;
use crate::transport::{http_stream, short_poll, sse, websocket};

/// Every route, with long polls answered by a placeholder (see `transport/long_poll.rs`).
/// CORS and the hot routes' shortcut sit in front of it in `app::App`, which is what the
/// server runs.
pub fn routes(state: AppState) -> Router {
    Router::new()
        .route("/publish", post(publish::document))
        .route("/publish/{channel}", post(publish::to_channel))
        .route("/sse", get(sse::envelopes))
        .route("/sse/{channel}", get(sse::raw))
        .route("/stream", get(http_stream::many))
        .route("/stream/{channel}", get(http_stream::one))
        .route("/poll", get(short_poll::many))
        .route("/poll/{channel}", get(short_poll::one))
        // `any`: HTTP/1.1 upgrades arrive as GET, HTTP/2 ones as extended CONNECT.
        .route("/ws", any(websocket::json))
        .route("/ws/{channel}", any(websocket::raw))
        .merge(admin_api(state.clone()))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        // The landing page, demos, admin console and JS client (embedded files).
        .merge(crate::assets::routes())
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .with_state(state)
}

/// `/api/*`: with `[auth]`, API keys only (SPEC §10).
fn admin_api(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/api/channels", get(channels::list))
        .route("/api/channels/{channel}", get(channels::one))
        .route("/api/channels/{channel}/history", get(channels::history))
        .route("/api/channels/{channel}/presence", get(channels::presence))
        .route_layer(middleware::from_fn_with_state(state, require_api_key))
}

async fn require_api_key(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    let who = state.auth().authenticate(req.headers(), req.uri().query());
    match who.and_then(|who| state.auth().check_admin(&who)) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

async fn healthz() -> Response {
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    // Draining (SPEC §13): out of the load balancer's rotation, whatever the broker says.
    if state.draining.load(std::sync::atomic::Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"status": "draining"})),
        )
            .into_response();
    }
    let broker = state.node.broker.kind();
    match state.node.broker.ready().await {
        Ok(()) => {
            axum::Json(serde_json::json!({"status": "ready", "broker": broker})).into_response()
        }
        Err(e) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker_unavailable",
            format!("the {broker} broker is not ready: {e}"),
        )
        .into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        {
            let mut text = state.metrics.render();
            if let Some(bytes) = state.node.broker.bytes_on_disk() {
                text.push_str(&format!(
                    "# HELP tidings_store_bytes Bytes the data dir's log occupies on disk.\n# TYPE tidings_store_bytes gauge\ntidings_store_bytes {bytes}\n"
                ));
            }
            text
        },
    )
        .into_response()
}
