//! The HTTP API besides the transports: publishing, channels, health and metrics, and the
//! router that puts every route together.

pub mod channels;
pub mod error;
pub mod publish;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};

use crate::api::error::ApiError;
use crate::server::AppState;
use crate::transport::{http_stream, short_poll, sse, websocket};

pub fn router(state: AppState) -> Router {
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
        .route("/api/channels", get(channels::list))
        .route("/api/channels/{channel}", get(channels::one))
        .route("/api/channels/{channel}/history", get(channels::history))
        .route("/api/channels/{channel}/presence", get(channels::presence))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .with_state(state)
}

async fn healthz() -> Response {
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
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
        state.metrics.render(),
    )
        .into_response()
}
