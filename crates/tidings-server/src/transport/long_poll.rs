//! Long polling: hold a poll until at least one message (or gap) exists, the wait runs out, or
//! the server shuts down. The subscription was registered before history was read, so a
//! message published at any moment after the request arrived ends the wait.
//!
//! Memory: a waiting poll is a parked connection, and waiting inside the handler would keep
//! the router's whole chain of futures (routing, middleware, extractors, the request's
//! headers) alive with it: ~6 KB. So the handler answers at once with a placeholder that
//! carries the wait as a `Deferred` extension; the connection then holds only the wait.
//! `resolve` finishes it: the lean HTTP/1.1 path calls it after the router has returned,
//! and for hyper's connections it is the router's outermost layer.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;

use tidings_core::Subscription;
use tokio_util::sync::CancellationToken;

use crate::metrics::SessionGauge;
use crate::transport::short_poll::PollReply;

pub async fn wait(
    sub: &mut Subscription,
    gauge: &SessionGauge,
    reply: &mut PollReply,
    wait: Duration,
    shutdown: &CancellationToken,
) {
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    while reply.is_empty() && !reply.ended() {
        let ready = tokio::select! {
            biased;
            _ = shutdown.cancelled() => false,
            _ = &mut deadline => false,
            _ = sub.ready() => true,
        };
        if !ready {
            return;
        }
        reply.collect(sub, gauge);
    }
}

type Wait = Pin<Box<dyn Future<Output = Response> + Send>>;

/// A response still to come (the extension on a placeholder response).
#[derive(Clone)]
struct Deferred(Arc<Mutex<Option<Wait>>>);

/// A placeholder response whose real answer is `wait`'s output.
pub fn deferred(wait: impl Future<Output = Response> + Send + 'static) -> Response {
    let mut res = Response::new(Body::empty());
    res.extensions_mut()
        .insert(Deferred(Arc::new(Mutex::new(Some(Box::pin(wait))))));
    res
}

/// Takes the wait (and the headers layers added) out of a placeholder; `None` for any
/// other response.
pub fn take_deferred(res: &mut Response) -> Option<(Wait, http::HeaderMap)> {
    let wait = res
        .extensions()
        .get::<Deferred>()
        .and_then(|d| d.0.lock().ok()?.take())?;
    Some((wait, std::mem::take(res.headers_mut())))
}

/// Headers the layers put on the placeholder (CORS) go on the real answer too; not those
/// describing the placeholder's own empty body (axum sets `content-length: 0` on it).
pub fn merge_headers(mut res: Response, layered: http::HeaderMap) -> Response {
    use http::header::{CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
    let headers = res.headers_mut();
    for (name, value) in &layered {
        let about_body =
            name == CONTENT_LENGTH || name == CONTENT_TYPE || name == TRANSFER_ENCODING;
        if !about_body && !headers.contains_key(name) {
            headers.insert(name.clone(), value.clone());
        }
    }
    res
}

/// Waits for a placeholder's real answer; other responses pass through.
pub async fn resolve(mut res: Response) -> Response {
    match take_deferred(&mut res) {
        Some((wait, layered)) => merge_headers(wait.await, layered),
        None => res,
    }
}
