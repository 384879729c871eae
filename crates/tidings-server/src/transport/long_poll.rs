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
//!
//! One pass for many pollers (issue 17): a held one-channel poll on the lean HTTP/1.1 path
//! is answered from the publishing side. Its `HeldPoll` (one allocation) is the hub's hook
//! (`tidings_core::hub::Held`) and carries the socket the connection lends it
//! (`net::held`): when the channel's next message comes, the publisher's `deliver` writes
//! the poll's answer — the message's shared body and its own head — straight to the socket,
//! and the poll's task, woken once, only takes the socket back. A message that does not
//! simply follow the poll's position (a gap, or one the join replayed), a socket that takes
//! nothing now, or a poll that is not held (several channels, CORS, the access log, TLS,
//! h2, `HEAD`) goes through the session's queue as before: each message is answered by the
//! hook or queued, never both and never neither (the hub's rule). `wait` always takes the
//! hook back before it answers any other way, so an answer is never written twice.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;

use tidings_core::hub::Held;
use tidings_core::{Message, Position, Subscription};
use tokio_util::sync::CancellationToken;

use crate::metrics::SessionGauge;
use crate::net::Answer;
use crate::net::held::HeldSocket;
use crate::transport::short_poll::{self, PollReply};

/// Waits for the poll's answer; `true` when `held` wrote it from the publishing side (the
/// poll is then answered, and `reply` is not).
pub async fn wait(
    sub: &mut Subscription,
    gauge: &SessionGauge,
    reply: &mut PollReply,
    wait: Duration,
    shutdown: &CancellationToken,
    held: Option<&Arc<HeldPoll>>,
) -> bool {
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    let held = held.filter(|h| h.socket.attached() && sub.hold(Arc::clone(h) as Arc<dyn Held>));
    let answered = std::future::poll_fn(|cx| match held {
        Some(h) => h.socket.poll_answered(cx),
        None => std::task::Poll::Pending,
    });
    tokio::pin!(answered);
    while reply.is_empty() && !reply.ended() {
        let ready = tokio::select! {
            biased;
            _ = shutdown.cancelled() => false,
            _ = &mut deadline => false,
            _ = &mut answered => false,
            _ = sub.ready() => true,
        };
        if !ready || held.is_some_and(|h| h.socket.answered()) {
            break;
        }
        reply.collect(sub, gauge);
    }
    let Some(held) = held else {
        return false;
    };
    // Only `deliver` answers, and it took the hook out first: nothing to release then.
    // Otherwise a release that finds the hook says no message went to it and none will;
    // one that does not comes after `deliver` used it (under the same lock), so `answered`
    // is then final.
    if !held.socket.answered() && sub.release() {
        return false;
    }
    if held.socket.answered() {
        gauge.delivered(1);
        return true;
    }
    // The hook declined its message, which is queued: answered the usual way.
    reply.collect(sub, gauge);
    false
}

/// A held poll: the hub's hook for it, and the socket its answer goes to (see the module).
pub struct HeldPoll {
    pub socket: HeldSocket,
    /// The poll's position: the message that follows it is answered here, with its own
    /// cursor as the whole reply's (`short_poll::shared_reply`).
    after: Position,
    wait: Duration,
}

impl HeldPoll {
    pub fn new(after: Position, wait: Duration) -> Self {
        Self {
            socket: HeldSocket::default(),
            after,
            wait,
        }
    }
}

impl Held for HeldPoll {
    fn answer(&self, message: &Arc<Message>) -> bool {
        if message.epoch != self.after.epoch
            || Some(message.offset) != self.after.offset.checked_add(1)
        {
            return false;
        }
        self.socket
            .answer(&short_poll::shared_reply(message, Some(self.wait)))
    }
}

/// A long poll's answer, still to come, and its hook when it can be held.
pub struct Wait {
    answer: Pin<Box<dyn Future<Output = Answer> + Send>>,
    held: Option<Arc<HeldPoll>>,
}

impl Wait {
    pub fn new(
        answer: Pin<Box<dyn Future<Output = Answer> + Send>>,
        held: Option<Arc<HeldPoll>>,
    ) -> Self {
        Self { answer, held }
    }

    /// Where the connection lends its socket, if this poll can be held.
    pub fn held(&self) -> Option<&HeldSocket> {
        self.held.as_deref().map(|h| &h.socket)
    }
}

impl Future for Wait {
    type Output = Answer;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Answer> {
        self.answer.as_mut().poll(cx)
    }
}

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
