//! Long polling: hold a poll until at least one message (or gap) exists, the wait runs out, or
//! the server shuts down. The subscription was registered before history was read, so a
//! message published at any moment after the request arrived ends the wait.
//!
//! Memory: a waiting poll is a parked connection, and waiting inside the handler would keep
//! the handler's future (extractors, the request's headers, and through the router its
//! whole chain of futures) alive with it. So a poll answers at once with its `Wait`, and
//! the connection then holds only that: `app::service` gets it straight from `short_poll`, and
//! through the router (which has no other way to return it) as a placeholder response that
//! carries it as a `Deferred` extension (`take_deferred`).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;

use tidings_core::Subscription;
use tokio_util::sync::CancellationToken;

use crate::metrics::SessionGauge;
use crate::net::Answer;
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

/// A long poll's answer, still to come.
pub type Wait = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// A response still to come (the extension on a placeholder response).
#[derive(Clone)]
struct Deferred(Arc<Mutex<Option<Wait>>>);

/// A placeholder response whose real answer is `wait`'s output.
pub fn deferred(wait: Wait) -> Response {
    let mut res = Response::new(Body::empty());
    res.extensions_mut()
        .insert(Deferred(Arc::new(Mutex::new(Some(wait)))));
    res
}

/// Takes the wait out of a placeholder; `None` for any other response.
pub fn take_deferred(res: &Response) -> Option<Wait> {
    res.extensions()
        .get::<Deferred>()
        .and_then(|d| d.0.lock().ok()?.take())
}
