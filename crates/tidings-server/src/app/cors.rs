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
//!
//! Two plain functions around the handler (`app::service` calls them) rather than a middleware:
//! a `from_fn` layer boxes a future and clones the router's services on every request.

use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::app::error::ApiError;
use crate::net::Headers;
use crate::state::AppState;

const ALLOW_METHODS: &str = "GET, POST, OPTIONS";
const ALLOW_HEADERS: &str =
    "authorization, content-type, last-event-id, prefer, if-none-match, idempotency-key";
const EXPOSE_HEADERS: &str = "etag, preference-applied, retry-after";

fn origin_host(origin: &str) -> Option<&str> {
    origin.split_once("://").map(|(_, rest)| rest)
}

/// `host`: the request's own authority (the `Host` header, or `:authority` in HTTP/2).
pub fn allowed(state: &AppState, origin: &str, host: Option<&str>) -> bool {
    let own = host.is_some_and(|host| origin_host(origin) == Some(host));
    let list = &state.config().server.cors_origins;
    own || list.iter().any(|o| o == "*" || o == origin)
        || (list.is_empty() && !state.auth().enabled())
}

/// Whether a browser says this request comes from an allowed page: its `Origin` is allowed
/// (the allow-list, or the server's own host), or it sends `Sec-Fetch-Site: same-origin`
/// (which also covers HTTP/2, where there is no `Host` header to compare with). Both headers
/// are set by the browser alone — a page cannot forge them — so a request with neither is not
/// from a browser page, and a cookie-authenticated state change then is refused
/// (`app::publish`). An unparseable `Origin`, or `null`, is not allowed.
pub fn same_site_request<H: Headers + ?Sized>(state: &AppState, headers: &H) -> bool {
    let origin_ok = headers.text("origin").is_some_and(|origin| {
        origin.is_ok_and(|origin| {
            let host = headers.text("host").and_then(Result::ok);
            origin != "null" && allowed_origin(state, origin, host)
        })
    });
    origin_ok
        || headers
            .first("sec-fetch-site")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"same-origin"))
}

/// An allowed origin for a state change: the list (`"*"` included) or the server's own;
/// unlike `allowed`, an empty list in open mode does not allow every origin (open mode
/// reads no cookie anyway).
fn allowed_origin(state: &AppState, origin: &str, host: Option<&str>) -> bool {
    let own = host.is_some_and(|host| origin_host(origin) == Some(host));
    own || state
        .config()
        .server
        .cors_origins
        .iter()
        .any(|o| o == "*" || o == origin)
}

fn is_websocket_handshake(req: &Request) -> bool {
    crate::transport::websocket::asks_for_websocket(req.method(), req.headers(), req.extensions())
}

fn forbidden(origin: &str) -> Response {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "origin_not_allowed",
        format!("origin {origin} is not in server.cors_origins"),
    )
    .into_response()
}

/// What `check` decided before the request is routed.
pub enum Verdict {
    /// Route the request; the origin (if allowed) goes on the answer (`decorate`).
    Route(Option<HeaderValue>),
    /// This is the whole answer: a preflight, or a request refused for its origin.
    Answer(Response),
}

pub fn check(state: &AppState, req: &Request) -> Verdict {
    let Some(value) = req.headers().get(header::ORIGIN) else {
        return Verdict::Route(None);
    };
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    // An Origin that is not even text matches no allowed origin: refused where the check
    // refuses, never taken for "no Origin".
    let Ok(origin) = value.to_str() else {
        if preflight || is_websocket_handshake(req) {
            return Verdict::Answer(forbidden(&String::from_utf8_lossy(value.as_bytes())));
        }
        return Verdict::Route(None);
    };
    // HTTP/2 requests carry their authority in the URI, not in a Host header.
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    let ok = allowed(state, origin, host);
    if !ok && (preflight || is_websocket_handshake(req)) {
        return Verdict::Answer(forbidden(origin));
    }
    let allow = ok.then(|| value.clone());
    if preflight {
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
        decorate(allow, &mut res);
        return Verdict::Answer(res);
    }
    Verdict::Route(allow)
}

/// After the handler: the CORS headers for an allowed origin (`Verdict::Route(Some(_))`).
pub fn decorate(origin: Option<HeaderValue>, res: &mut Response) {
    let Some(origin) = origin else {
        return;
    };
    let h = res.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
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
