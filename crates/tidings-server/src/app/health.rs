//! Health and metrics: `/healthz` (the process answers), `/readyz` (the broker is ready and
//! the server is not draining), `/metrics` (Prometheus text).

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::app::error::ApiError;
use crate::state::AppState;

pub async fn healthz() -> Response {
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

pub async fn readyz(State(state): State<AppState>) -> Response {
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

pub async fn metrics(State(state): State<AppState>) -> Response {
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
            let held = state.node.hub.held_answers();
            text.push_str(&format!(
                "# HELP tidings_long_poll_held_answers_total Long-poll deliveries written from the publishing side to held polls (one pass per message).\n# TYPE tidings_long_poll_held_answers_total counter\ntidings_long_poll_held_answers_total {held}\n"
            ));
            if let Some(log) = &state.access_log {
                let dropped = log.dropped.load(std::sync::atomic::Ordering::Relaxed);
                text.push_str(&format!(
                    "# HELP tidings_access_log_dropped_total Access-log lines dropped because the writer fell behind.\n# TYPE tidings_access_log_dropped_total counter\ntidings_access_log_dropped_total {dropped}\n"
                ));
            }
            text.push_str(&state.pusher.render_metrics());
            text
        },
    )
        .into_response()
}
