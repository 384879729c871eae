//! `App`: the application as the protocol layer sees it (`net::Service`). CORS around the
//! route table (`routes.rs`): the rows marked `Direct` are called here without the router,
//! every other request goes through the router built from the same table.
//!
//! Why direct calls at all, and why they cannot disagree with the router: see `routes.rs`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::HeaderValue;
use http::request::Parts;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::app::access_log::{Claim, Entry};
use crate::app::error::ApiError;
use crate::app::routes::{self, Direct, DirectRoutes};
use crate::app::{cors, publish};
use crate::net::limits::ConnectionLimits;
use crate::net::{Answer, ConnectionCtx, Handled, Headers, LeanRequest, Settings};
use crate::state::AppState;
use crate::transport::short_poll::Polled;
use crate::transport::{http_stream, long_poll, short_poll, sse};

pub struct App {
    state: AppState,
    router: Router,
    direct: DirectRoutes,
}

impl App {
    pub fn new(state: AppState) -> Self {
        let table = routes::table(&state);
        let direct = DirectRoutes::new(&table);
        let router = routes::router(state.clone(), table);
        Self {
            state,
            router,
            direct,
        }
    }

    /// Answers `req`, which came over `conn`; with an access log, the answer carries the
    /// request's entry, written when its body ends (`access_log`).
    pub async fn handle(&self, mut req: Request, conn: &ConnectionCtx) -> Handled<Finish> {
        let Some(log) = &self.state.access_log else {
            return self.answer(req, conn).await;
        };
        let claim = Claim::new(log.open(req.method(), req.uri(), req.version(), Some(conn.peer)));
        req.extensions_mut().insert(claim.clone());
        match self.answer(req, conn).await {
            Handled::Ready(answer) => {
                Handled::Ready(logged(answer.into_response(), &claim, None).into())
            }
            Handled::Later(mut finish) => {
                finish.decor.get_or_insert_default().access = Some(claim);
                Handled::Later(finish)
            }
        }
    }

    /// A request the lean HTTP/1.1 path parsed (`net::request`). A publish or a poll with
    /// no `Origin` and no access log to write is answered from the request's slices: no
    /// `Request`, no `HeaderMap`, no boxed body. Everything else — CORS, the access log, any
    /// other route — goes the full way, as it did before.
    pub async fn handle_lean(&self, req: LeanRequest<'_>, conn: &ConnectionCtx) -> Handled<Finish> {
        if self.state.access_log.is_none()
            && !req.has("origin")
            && let Some((to, channel)) = self.direct.find(req.method(), req.path())
            && matches!(
                (to, channel),
                (Direct::Publish, Some(_)) | (Direct::Poll, _)
            )
        {
            let (state, query) = (&self.state, req.query());
            let answered = match (to, channel) {
                (Direct::Publish, Some(c)) => {
                    publish::publish_bytes(state, Some(conn), c, query, &req, req.body())
                        .await
                        .map(|reply| Polled::Now(reply.into()))
                }
                // No CORS and no access log: the answer goes out as it comes, and a long
                // poll may be answered from the publishing side (`long_poll`).
                (_, c) => short_poll::poll(state, Some(conn), c, query, &req, true).await,
            };
            return match answered {
                Ok(Polled::Now(answer)) => Handled::Ready(answer),
                Ok(Polled::Later(wait)) => Handled::Later(Finish { wait, decor: None }),
                Err(e) => Handled::Ready(e.into_response().into()),
            };
        }
        match req.to_full() {
            Some(full) => self.handle(full, conn).await,
            // `h1` keeps lean only what `http` takes; answered as `h1` refuses anything else.
            None => Handled::Ready(
                ApiError::bad_request("bad_request", "the request is not valid HTTP/1.1")
                    .into_response()
                    .into(),
            ),
        }
    }

    async fn answer(&self, req: Request, conn: &ConnectionCtx) -> Handled<Finish> {
        let origin = match cors::check(&self.state, &req) {
            cors::Verdict::Route(origin) => origin,
            cors::Verdict::Answer(answer) => return Handled::Ready(answer.into()),
        };
        let (parts, body) = req.into_parts();
        let answered = match self.direct.find(&parts.method, parts.uri.path()) {
            Some((to, param)) => self.call_direct(to, param, &parts, body, conn).await,
            None => Ok(self.route(Request::from_parts(parts, body), conn).await),
        };
        let answer = match answered {
            Ok(Polled::Now(answer)) => answer,
            Ok(Polled::Later(wait)) => {
                return Handled::Later(Finish {
                    wait,
                    decor: origin.map(|cors| {
                        Box::new(Decor {
                            cors: Some(cors),
                            access: None,
                        })
                    }),
                });
            }
            Err(e) => e.into_response().into(),
        };
        Handled::Ready(decorated(origin, answer))
    }

    /// A direct row: its handler's core, with the request's parts by reference.
    async fn call_direct(
        &self,
        to: Direct,
        channel: Option<&str>,
        parts: &Parts,
        body: Body,
        conn: &ConnectionCtx,
    ) -> Result<Polled, ApiError> {
        let (state, conn) = (&self.state, Some(conn));
        let (query, headers) = (parts.uri.query(), &parts.headers);
        let now = match (to, channel) {
            (Direct::Poll, c) => {
                return short_poll::poll(state, conn, c, query, headers, false).await;
            }
            (Direct::Publish, Some(c)) => {
                publish::publish_body(state, conn, c, query, headers, body)
                    .await
                    .map(Answer::from)
            }
            // The table marks only `/publish/{channel}` for `Publish`.
            (Direct::Publish, None) => Err(ApiError::not_found()),
            (Direct::Sse, c) => sse::subscribe(state, conn, c, query, headers)
                .await
                .map(Answer::from),
            (Direct::Stream, c) => http_stream::subscribe(state, conn, c, query, headers)
                .await
                .map(Answer::from),
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
            None => Polled::Now(res.into()),
        }
    }
}

/// A long poll's answer still to come, and what goes on it then.
pub struct Finish {
    wait: long_poll::Wait,
    /// Only the few long polls with a CORS header or an access-log line have it: boxed, so
    /// that every parked poll does not carry its ~48 bytes (the task is allocated at its
    /// largest state, `app::parked`).
    decor: Option<Box<Decor>>,
}

/// What goes on a long poll's answer when it comes: the CORS header, the access-log entry.
#[derive(Default)]
struct Decor {
    cors: Option<HeaderValue>,
    access: Option<Claim>,
}

impl Future for Finish {
    type Output = Answer;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answer> {
        let answer = std::task::ready!(Pin::new(&mut self.wait).poll(cx));
        let Some(decor) = self.decor.as_mut() else {
            // The lean case, without passing the answer (a reply, ~500 bytes) through by value.
            return Poll::Ready(answer);
        };
        let answer = decorated(decor.cors.take(), answer);
        Poll::Ready(match decor.access.take() {
            Some(claim) => logged(answer.into_response(), &claim, Some("long-poll")).into(),
            None => answer,
        })
    }
}

impl crate::net::Hold for Finish {
    fn held(&self) -> Option<&crate::net::held::HeldSocket> {
        // Decorated or logged answers are written by the connection's task.
        if self.decor.is_some() {
            return None;
        }
        self.wait.held()
    }
}

/// `answer` with the CORS headers for `origin`: a lean reply stays lean without one.
fn decorated(origin: Option<HeaderValue>, answer: Answer) -> Answer {
    if origin.is_none() {
        return answer;
    }
    let mut res = answer.into_response();
    cors::decorate(origin, &mut res);
    res.into()
}

/// `res` with the request's access-log entry tied to its body: the line is written when the
/// body is dropped (sent, or its stream ended). A WebSocket session that claimed the entry
/// writes its own line when it closes.
fn logged(res: Response, claim: &Claim, transport: Option<&'static str>) -> Response {
    let Some(entry) = claim.take() else {
        return res;
    };
    let transport = transport.unwrap_or_else(|| transport_of(&res));
    let status = res.status().as_u16();
    res.map(|body| {
        Body::new(LoggedBody {
            body,
            sent: 0,
            line: Some((entry, status, transport)),
        })
    })
}

/// What the access log calls a response's transport, from what it is.
fn transport_of(res: &Response) -> &'static str {
    let content_type = res
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(HeaderValue::as_bytes)
        .unwrap_or_default();
    if res.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        "websocket"
    } else if content_type.starts_with(b"text/event-stream") {
        "sse"
    } else if content_type.starts_with(b"application/x-ndjson") {
        "stream"
    } else {
        "http"
    }
}

/// A response body that counts what it yields and writes the access-log line when dropped.
struct LoggedBody {
    body: Body,
    sent: u64,
    line: Option<(Entry, u16, &'static str)>,
}

impl http_body::Body for LoggedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.sent += data.len() as u64;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some((entry, status, transport)) = self.line.take() {
            entry.finish(status, self.sent, transport);
        }
    }
}

impl crate::net::Service for App {
    type Later = Finish;

    fn call(
        &self,
        req: Request,
        conn: &ConnectionCtx,
    ) -> impl Future<Output = Handled<Finish>> + Send {
        self.handle(req, conn)
    }

    fn call_lean<'a>(
        &'a self,
        req: LeanRequest<'a>,
        conn: &'a ConnectionCtx,
    ) -> impl Future<Output = Handled<Finish>> + Send + 'a {
        self.handle_lean(req, conn)
    }

    fn settings(&self) -> Settings {
        let config = self.state.config();
        let s = &config.server;
        Settings {
            request_header_timeout: s.request_header_timeout,
            request_body_timeout: s.request_body_timeout,
            write_timeout: s.write_timeout,
            max_streams_per_connection: s.max_streams_per_connection,
            ping_interval: s.ping_interval,
        }
    }

    fn limits(&self) -> &Arc<ConnectionLimits> {
        &self.state.limits
    }

    fn shutdown(&self) -> &CancellationToken {
        &self.state.shutdown
    }

    fn connection(&self, open: bool) {
        let metrics = &self.state.metrics;
        if open {
            metrics.http_connections.fetch_add(1, Relaxed);
            metrics.http_connections_total.fetch_add(1, Relaxed);
        } else {
            metrics.http_connections.fetch_sub(1, Relaxed);
        }
    }
}
