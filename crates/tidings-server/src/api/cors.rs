//! CORS and the WebSocket Origin check, from one allow-list (`server.cors_origins`).
//!
//! An origin is allowed when it is the server's own (its host equals the request's `Host`),
//! when the list holds it exactly or holds `"*"`, or — with an empty list — in open mode only
//! (SPEC §10: "empty = any origin in open mode, none otherwise").
//! - A preflight from an allowed origin gets 204 with the methods and headers we take; from
//!   any other origin, 403 `origin_not_allowed`.
//! - Other requests from an allowed origin get `Access-Control-Allow-Origin` (the origin
//!   itself, with credentials allowed, so the token cookie works); from others, no CORS
//!   headers — the browser then hides the answer, as it should.
//! - A WebSocket handshake from a disallowed origin is refused with 403 before any upgrade:
//!   browsers do not apply CORS to WebSockets, so this check is the only protection there.

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::error::ApiError;
use crate::server::AppState;

const ALLOW_METHODS: &str = "GET, POST, OPTIONS";
const ALLOW_HEADERS: &str = "authorization, content-type, last-event-id, prefer, if-none-match";
const EXPOSE_HEADERS: &str = "etag, preference-applied, retry-after";

fn origin_host(origin: &str) -> Option<&str> {
    origin.split_once("://").map(|(_, rest)| rest)
}

/// `host`: the request's own authority (the `Host` header, or `:authority` in HTTP/2).
pub fn allowed(state: &AppState, origin: &str, host: Option<&str>) -> bool {
    let own = host.is_some_and(|host| origin_host(origin) == Some(host));
    let list = &state.config.server.cors_origins;
    own || list.iter().any(|o| o == "*" || o == origin)
        || (list.is_empty() && !state.auth.enabled())
}

fn is_websocket_handshake(req: &Request) -> bool {
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    upgrade
        || (req.method() == Method::CONNECT
            && req.extensions().get::<hyper::ext::Protocol>().is_some())
}

pub async fn layer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(origin) = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    else {
        return next.run(req).await;
    };
    // HTTP/2 requests carry their authority in the URI, not in a Host header.
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    let ok = allowed(&state, &origin, host);
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if !ok && (preflight || is_websocket_handshake(&req)) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            format!("origin {origin} is not in server.cors_origins"),
        )
        .into_response();
    }
    let mut res = if preflight {
        let mut res = StatusCode::NO_CONTENT.into_response();
        let h = res.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(ALLOW_METHODS),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(ALLOW_HEADERS),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        res
    } else {
        next.run(req).await
    };
    if ok && let Ok(value) = HeaderValue::from_str(&origin) {
        let h = res.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSE_HEADERS),
        );
        h.append(header::VARY, HeaderValue::from_static("origin"));
    }
    res
}
