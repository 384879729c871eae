//! The route table: every route the server answers, in one list. **A new route is one line in
//! `table()`** (and its handler in the module that owns it: `app/`, `transport/`, or a new
//! file of its own). Whatever way a request arrived — the lean HTTP/1.1 path, hyper's
//! HTTP/1.1, h2, h2c, TLS — it is routed by this table (`app::service::App`).
//!
//! Each row is a path, its axum method router, and optionally a `Direct` mark: the handful of
//! routes every message and every subscriber goes through (publish, SSE, NDJSON, polls),
//! which `App` calls without the router. Why: per request, axum's router clones its boxed
//! services, boxes a future per layer, records the matched path and the URL parameters in
//! the request's extensions and clones the header map for the handler — in a profile of one
//! publish delivered to two SSE subscribers (callgrind), about a quarter of the server's
//! instructions. The direct matcher is built from the marked rows, so it cannot disagree
//! with the router about which path a row has: a marked row is `/literal` or
//! `/literal/{param}`, and anything the router would treat differently (another method,
//! `HEAD` included, a percent-encoded or empty segment, a trailing slash) goes to the router,
//! which answers exactly as it always did. The direct path is a shortcut for requests the
//! router would route the same way, never a second set of rules.
//!
//! What is not a row: the fallback for paths no row matches (`app::pages`: the files of
//! `static_dir`, then the built-in pages, else a 404), and the 405 for a known path with
//! another method.

use axum::Router;
use axum::extract::State;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any, get, post};
use http::Method;

use crate::app::error::ApiError;
use crate::app::{channels, health, publish};
use crate::pusher;
use crate::state::AppState;
use crate::transport::{http_stream, short_poll, sse, websocket};

/// A route `App` calls directly (see the module comment); `app::service` maps each to its
/// handler's core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direct {
    Publish,
    Sse,
    Stream,
    Poll,
}

/// One row of the table.
pub struct Route {
    pub path: &'static str,
    pub handler: MethodRouter<AppState>,
    pub direct: Option<(Method, Direct)>,
}

fn route(path: &'static str, handler: MethodRouter<AppState>) -> Route {
    Route {
        path,
        handler,
        direct: None,
    }
}

impl Route {
    /// Marks the row as called directly for `method` (its handler's core, without the router).
    fn direct(mut self, method: Method, to: Direct) -> Self {
        self.direct = Some((method, to));
        self
    }
}

/// Every route. Long polls answer through the router with a placeholder (see
/// `transport/long_poll.rs`); CORS is applied around the whole table by `App`.
pub fn table(state: &AppState) -> Vec<Route> {
    // `/api/*`: with `[auth]`, API keys only (SPEC §10).
    let api_key = || middleware::from_fn_with_state(state.clone(), require_api_key);
    vec![
        // Publishing (app/publish.rs).
        route("/publish", post(publish::document)),
        route("/publish/{channel}", post(publish::to_channel))
            .direct(Method::POST, Direct::Publish),
        // Transports (transport/).
        route("/sse", get(sse::envelopes)).direct(Method::GET, Direct::Sse),
        route("/sse/{channel}", get(sse::raw)).direct(Method::GET, Direct::Sse),
        route("/stream", get(http_stream::many)).direct(Method::GET, Direct::Stream),
        route("/stream/{channel}", get(http_stream::one)).direct(Method::GET, Direct::Stream),
        route("/poll", get(short_poll::many)).direct(Method::GET, Direct::Poll),
        route("/poll/{channel}", get(short_poll::one)).direct(Method::GET, Direct::Poll),
        // `any`: HTTP/1.1 upgrades arrive as GET, HTTP/2 ones as extended CONNECT.
        route("/ws", any(websocket::json)),
        route("/ws/{channel}", any(websocket::raw)),
        // The channel API (app/channels.rs).
        route("/api/channels", get(channels::list).route_layer(api_key())),
        route(
            "/api/channels/{channel}",
            get(channels::one).route_layer(api_key()),
        ),
        route(
            "/api/channels/{channel}/history",
            get(channels::history).route_layer(api_key()),
        ),
        route(
            "/api/channels/{channel}/presence",
            get(channels::presence).route_layer(api_key()),
        ),
        // Health and metrics (app/health.rs).
        route("/healthz", get(health::healthz)),
        route("/readyz", get(health::readyz)),
        route("/metrics", get(health::metrics)),
        // Not rows: the landing page, demos, admin console and JS client (assets.rs), served
        // with the files of `static_dir` by the fallback (`app::pages`), so a site's own
        // `index.html` can be `/`.
        // The Pusher Channels protocol (pusher/): sessions (`any`, as for /ws) and the HTTP API.
        route("/app/{key}", any(pusher::session::connect)),
        route("/apps/{id}/events", post(pusher::http::events)),
        route("/apps/{id}/batch_events", post(pusher::http::batch_events)),
        route("/apps/{id}/channels", get(pusher::http::channels)),
        route("/apps/{id}/channels/{name}", get(pusher::http::channel)),
        route("/apps/{id}/channels/{name}/users", get(pusher::http::users)),
        route(
            "/apps/{id}/users/{user}/terminate_connections",
            post(pusher::http::terminate_connections),
        ),
    ]
}

/// The router over the whole table (what every request not called directly goes through).
pub fn router(state: AppState, table: Vec<Route>) -> Router {
    table
        .into_iter()
        .fold(Router::new(), |router, r| router.route(r.path, r.handler))
        // A path no row matches: the files of `static_dir`, then the built-in pages, else 404.
        .fallback({
            let pages = crate::app::pages::Pages::new(state.clone());
            move |req: axum::extract::Request| async move { pages.handle(req).await }
        })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .with_state(state)
}

/// The rows marked `Direct`, as a matcher (built once, from the same table as the router).
pub struct DirectRoutes(Vec<DirectRow>);

struct DirectRow {
    method: Method,
    /// The path up to its parameter (or the whole path).
    literal: &'static str,
    /// Whether one `/{param}` segment follows the literal.
    param: bool,
    to: Direct,
}

impl DirectRoutes {
    /// The marked rows of `table`. A marked row whose path has another shape (a parameter
    /// in the middle, two parameters) is left to the router: `rows_marked_direct_have_a_shape_the_matcher_knows` checks there is none.
    pub fn new(table: &[Route]) -> Self {
        let rows = table
            .iter()
            .filter_map(|r| {
                let (method, to) = r.direct.clone()?;
                let (literal, param) = shape(r.path)?;
                Some(DirectRow {
                    method,
                    literal,
                    param,
                    to,
                })
            })
            .collect();
        Self(rows)
    }

    /// The direct route for `method` and `path`, with its parameter if it has one; `None`
    /// sends the request to the router.
    pub fn find<'a>(&self, method: &Method, path: &'a str) -> Option<(Direct, Option<&'a str>)> {
        // A segment the router would decode or not match goes to the router.
        let segment =
            |rest: &'a str| (!rest.is_empty() && !rest.contains(['/', '%'])).then_some(rest);
        self.0.iter().find_map(|row| {
            if row.method != *method {
                return None;
            }
            let rest = path.strip_prefix(row.literal)?;
            if row.param {
                rest.strip_prefix('/')
                    .and_then(segment)
                    .map(|p| (row.to, Some(p)))
            } else {
                rest.is_empty().then_some((row.to, None))
            }
        })
    }
}

/// `/a/b` → (`/a/b`, no parameter); `/a/{x}` → (`/a`, one parameter); anything else `None`.
fn shape(path: &'static str) -> Option<(&'static str, bool)> {
    match path.rfind("/{") {
        None if !path.contains('{') => Some((path, false)),
        Some(at) if path.ends_with('}') && !path[..at].contains('{') => {
            let name = &path[at + 2..path.len() - 1];
            (!name.is_empty() && !name.contains(['{', '}', '/'])).then_some((&path[..at], true))
        }
        _ => None,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> AppState {
        AppState::new(crate::config::Config::default()).expect("the default config is valid")
    }

    fn direct(method: Method, path: &str) -> Option<String> {
        let table = table(&state());
        DirectRoutes::new(&table)
            .find(&method, path)
            .map(|(to, p)| format!("{to:?} {p:?}"))
    }

    #[tokio::test]
    async fn rows_marked_direct_have_a_shape_the_matcher_knows() {
        for r in table(&state()) {
            if r.direct.is_some() {
                assert!(shape(r.path).is_some(), "{}", r.path);
            }
        }
    }

    #[tokio::test]
    async fn the_direct_routes_are_matched_by_method_and_path() {
        for (method, path, want) in [
            (Method::POST, "/publish/a:b", "Publish Some(\"a:b\")"),
            (Method::GET, "/sse/x", "Sse Some(\"x\")"),
            (Method::GET, "/sse", "Sse None"),
            (Method::GET, "/stream/x", "Stream Some(\"x\")"),
            (Method::GET, "/stream", "Stream None"),
            (Method::GET, "/poll/x", "Poll Some(\"x\")"),
            (Method::GET, "/poll", "Poll None"),
        ] {
            assert_eq!(
                direct(method.clone(), path).as_deref(),
                Some(want),
                "{method} {path}"
            );
        }
    }

    #[tokio::test]
    async fn anything_the_router_would_treat_differently_goes_to_the_router() {
        for (method, path) in [
            (Method::HEAD, "/sse/x"),
            (Method::POST, "/sse/x"),
            (Method::GET, "/publish/x"),
            (Method::POST, "/publish"),
            (Method::POST, "/publish/"),
            (Method::POST, "/publish/a%20b"),
            (Method::POST, "/publish/a/b"),
            (Method::GET, "/sse/"),
            (Method::GET, "/sse/a/"),
            (Method::GET, "/ssex"),
            (Method::GET, "/streams"),
            (Method::GET, "/polling/x"),
            (Method::GET, "/ws/x"),
            (Method::GET, "/"),
            (Method::GET, ""),
            (Method::GET, "/s"),
        ] {
            assert_eq!(direct(method.clone(), path), None, "{method} {path}");
        }
    }

    #[test]
    fn path_shapes_are_a_literal_and_at_most_one_trailing_parameter() {
        assert_eq!(shape("/sse"), Some(("/sse", false)));
        assert_eq!(shape("/sse/{channel}"), Some(("/sse", true)));
        assert_eq!(shape("/a/{x}/b"), None);
        assert_eq!(shape("/a/{x}/{y}"), None);
        assert_eq!(shape("/a/{}"), None);
    }
}
