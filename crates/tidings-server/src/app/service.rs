//! The whole HTTP application as one service: CORS around a direct dispatch of the routes
//! every message and every subscriber goes through, and the axum router for the rest.
//!
//! Why a dispatch of our own in front of the router: per request, axum's router clones its
//! boxed services, boxes a future per layer, records the matched path and the URL
//! parameters in the request's extensions and clones the header map for the handler — in
//! a profile of one publish delivered to two SSE subscribers (callgrind), about a quarter
//! of the server's instructions. The hot routes are few and have one path parameter at
//! most, so they are matched here by hand and the handlers called with what they need.
//!
//! Anything unusual — another method (`HEAD` included), a percent-encoded or empty
//! channel, a trailing slash — goes to the router, which answers exactly as it always did:
//! the direct dispatch is a shortcut for requests it would route the same way, never a
//! second set of rules.

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::{HeaderValue, Method};
use tower::ServiceExt;

use crate::api::error::ApiError;
use crate::api::{cors, publish};
use crate::server::{AppState, ConnectionCtx};
use crate::transport::short_poll::Polled;
use crate::transport::{http_stream, long_poll, short_poll, sse};

/// Cheap to clone: two reference counts.
#[derive(Clone)]
pub struct App {
    state: AppState,
    router: Router,
}

/// A route served without the router, with its channel segment if it has one.
enum Hot<'a> {
    Publish(&'a str),
    Sse(Option<&'a str>),
    Stream(Option<&'a str>),
    Poll(Option<&'a str>),
}

/// Matches the hot routes; `None` sends the request to the router.
fn hot<'a>(method: &Method, path: &'a str) -> Option<Hot<'a>> {
    // A segment the router would decode or not match goes to the router.
    let channel = |rest: &'a str| (!rest.is_empty() && !rest.contains(['/', '%'])).then_some(rest);
    if *method == Method::POST {
        return path
            .strip_prefix("/publish/")
            .and_then(channel)
            .map(Hot::Publish);
    }
    if *method != Method::GET {
        return None;
    }
    let (route, rest): (fn(Option<&'a str>) -> Hot<'a>, _) = match path.as_bytes().get(1..4)? {
        b"sse" => (Hot::Sse, &path[4..]),
        _ if path.starts_with("/stream") => (Hot::Stream, &path[7..]),
        _ if path.starts_with("/poll") => (Hot::Poll, &path[5..]),
        _ => return None,
    };
    match rest {
        "" => Some(route(None)),
        _ => rest
            .strip_prefix('/')
            .and_then(channel)
            .map(|c| route(Some(c))),
    }
}

/// What `App::handle` answers.
pub enum Handled {
    Ready(Response),
    /// A long poll: its answer comes when `wait` ends, and `cors` goes on it then
    /// (`App::finish`). The caller waits on it beside the socket.
    Wait(long_poll::Wait, Option<HeaderValue>),
}

impl App {
    pub fn new(state: AppState) -> Self {
        let router = crate::api::routes(state.clone());
        Self { state, router }
    }

    /// Answers `req`, which came over `conn`.
    pub async fn handle(&self, req: Request, conn: &ConnectionCtx) -> Handled {
        let origin = match cors::check(&self.state, &req) {
            cors::Verdict::Route(origin) => origin,
            cors::Verdict::Answer(answer) => return Handled::Ready(answer),
        };
        let (parts, body) = req.into_parts();
        let answered = match hot(&parts.method, parts.uri.path()) {
            Some(route) => self.dispatch(route, &parts, body, conn).await,
            None => Ok(self.route(Request::from_parts(parts, body), conn).await),
        };
        let mut res = match answered {
            Ok(Polled::Now(res)) => res,
            Ok(Polled::Later(wait)) => return Handled::Wait(wait, origin),
            Err(e) => e.into_response(),
        };
        cors::decorate(origin, &mut res);
        Handled::Ready(res)
    }

    /// A long poll's answer, once its wait ended (`Handled::Wait`).
    pub fn finish(mut res: Response, cors: Option<HeaderValue>) -> Response {
        cors::decorate(cors, &mut res);
        res
    }

    /// `handle` with long polls finished in place (hyper's connections).
    pub async fn handle_resolved(&self, req: Request, conn: &ConnectionCtx) -> Response {
        match self.handle(req, conn).await {
            Handled::Ready(res) => res,
            Handled::Wait(wait, cors) => Self::finish(wait.await, cors),
        }
    }

    /// A hot route: its handler's core, with the request's parts by reference.
    async fn dispatch(
        &self,
        route: Hot<'_>,
        parts: &Parts,
        body: Body,
        conn: &ConnectionCtx,
    ) -> Result<Polled, ApiError> {
        let (state, conn) = (&self.state, Some(conn));
        let (query, headers) = (parts.uri.query(), &parts.headers);
        let now = match route {
            Hot::Poll(c) => return short_poll::poll(state, c, query, headers).await,
            Hot::Publish(c) => publish::publish_body(state, conn, c, query, headers, body).await,
            Hot::Sse(c) => sse::subscribe(state, conn, c, query, headers).await,
            Hot::Stream(c) => http_stream::subscribe(state, conn, c, query, headers).await,
        };
        now.map(Polled::Now)
    }

    /// Any other route: the router, whose handlers find the connection in the extensions
    /// and return a long poll as a placeholder.
    async fn route(&self, mut req: Request, conn: &ConnectionCtx) -> Polled {
        req.extensions_mut().insert(conn.clone());
        let res = match self.router.clone().oneshot(req).await {
            Ok(res) => res,
            Err(never) => match never {},
        };
        match long_poll::take_deferred(&res) {
            Some(wait) => Polled::Later(wait),
            None => Polled::Now(res),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(method: Method, path: &str) -> Option<String> {
        hot(&method, path).map(|r| match r {
            Hot::Publish(c) => format!("publish {c}"),
            Hot::Sse(c) => format!("sse {c:?}"),
            Hot::Stream(c) => format!("stream {c:?}"),
            Hot::Poll(c) => format!("poll {c:?}"),
        })
    }

    #[test]
    fn the_hot_routes_are_matched_by_method_and_path() {
        assert_eq!(
            route(Method::POST, "/publish/a:b").as_deref(),
            Some("publish a:b")
        );
        assert_eq!(
            route(Method::GET, "/sse/x").as_deref(),
            Some("sse Some(\"x\")")
        );
        assert_eq!(route(Method::GET, "/sse").as_deref(), Some("sse None"));
        assert_eq!(
            route(Method::GET, "/stream/x").as_deref(),
            Some("stream Some(\"x\")")
        );
        assert_eq!(
            route(Method::GET, "/stream").as_deref(),
            Some("stream None")
        );
        assert_eq!(
            route(Method::GET, "/poll/x").as_deref(),
            Some("poll Some(\"x\")")
        );
        assert_eq!(route(Method::GET, "/poll").as_deref(), Some("poll None"));
    }

    #[test]
    fn anything_the_router_would_treat_differently_goes_to_the_router() {
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
            assert_eq!(route(method.clone(), path), None, "{method} {path}");
        }
    }
}
