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
//! is answered from the publishing side. Its `HeldPoll` (a spare of the thread's, reused
//! from poll to poll) is the hub's hook (`tidings_core::hub::Held`) and carries the socket
//! the connection lends it (`net::held`): when the channel's next message comes, the publisher's `deliver` writes
//! the poll's answer — the message's shared body and its own head — straight to the socket,
//! and the poll's task, woken once, only takes the socket back. A message that does not
//! simply follow the poll's position (a gap, or one the join replayed), a socket that takes
//! nothing now, or a poll that is not held (several channels, CORS, the access log, TLS,
//! h2, `HEAD`) goes through the session's queue as before: each message is answered by the
//! hook or queued, never both and never neither (the hub's rule). `wait` always takes the
//! hook back before it answers any other way, so an answer is never written twice.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;

use axum::response::IntoResponse;
use tidings_core::hub::Held;
use tidings_core::{Message, Position, Subscription};

use crate::metrics::SessionGauge;
use crate::net::Answer;
use crate::net::held::HeldSocket;
use crate::state::AppState;
use crate::transport::short_poll::{self, PollReply};

/// A long poll's wait, answered when it ends: by the message's publisher through `held`
/// (`Answer::Sent`), or from what the subscription collected (`short_poll::finish`).
///
/// Not generic (as `short_poll::poll` is), so that every wait is one type and the box it
/// lives in is reused (`Wait`). One async block, with no function of its own awaited
/// inside: a nested future would keep a reference to each of these beside them.
pub fn later(
    state: AppState,
    mut sub: Subscription,
    gauge: SessionGauge,
    mut reply: PollReply,
    wait: Duration,
    held: Option<Arc<HeldPoll>>,
) -> Wait {
    let hook = held.clone();
    // Kept across the wait in 8 bytes, not 16: each 16 bytes of the box is one step of
    // malloc's size classes.
    let wait = Wait32::of(wait);
    let answer = async move {
        // The deadline on the node's one timer, not a `Sleep` of its own (`transport::due`):
        // it wakes the queue once the wait is over.
        // Shutdown reaches it the same way: the timer's task closes every waiting poll's
        // queue (no shutdown wait in the box, and no entry in the hub's watch).
        let due = state
            .polls_due
            .add(sub.id(), sub.queue(), wait.get(), &state.shutdown);
        // A flag, not a reference to the hook, and the socket's answer polled in place:
        // each local kept across the wait is in every waiting poll's box (issue 17).
        let is_held = hook
            .as_ref()
            .is_some_and(|h| h.socket.attached() && sub.hold(Arc::clone(h) as Arc<dyn Held>));
        while reply.is_empty() && !reply.ended() {
            let ready = tokio::select! {
                biased;
                _ = std::future::poll_fn(|cx| match held_hook(&hook, is_held) {
                    Some(h) => h.socket.poll_answered(cx),
                    None => Poll::Pending,
                }) => false,
                _ = sub.ready() => true,
            };
            if !ready || held_hook(&hook, is_held).is_some_and(|h| h.socket.answered()) {
                break;
            }
            reply.collect(&mut sub, &gauge);
            if reply.is_empty() && due.passed() {
                break;
            }
        }
        drop(due);
        if let Some(held) = held_hook(&hook, is_held) {
            // Only `deliver` answers, and it took the hook out first: nothing to release
            // then. Otherwise a release that finds the hook says no message went to it and
            // none will; one that does not comes after `deliver` used it (under the same
            // lock), so `answered` is then final.
            if held.socket.answered() || !sub.release() {
                if held.socket.answered() {
                    gauge.delivered(1);
                    return Answer::Sent;
                }
                // The hook declined its message, which is queued: answered the usual way.
                reply.collect(&mut sub, &gauge);
            }
        }
        // Ended by shutdown (its queue closed: `collect` ended the reply): say so, and when
        // to come back (SPEC §13).
        let goodbye = state
            .shutdown
            .is_cancelled()
            .then(|| crate::lifecycle::shutdown_notice(&state));
        short_poll::finish(&sub, reply, Some(wait.get()), goodbye)
            .unwrap_or_else(|e| e.into_response().into())
    };
    Wait::new(answer, held)
}

/// The poll's hook when the hub holds it (`is_held`): a function, so the wait keeps the
/// flag alone across its awaits, not a reference beside the hook.
fn held_hook(hook: &Option<Arc<HeldPoll>>, is_held: bool) -> Option<&Arc<HeldPoll>> {
    hook.as_ref().filter(|_| is_held)
}

/// A held poll: the hub's hook for it, and the socket its answer goes to (see the module).
pub struct HeldPoll {
    pub socket: HeldSocket,
    /// The poll's position: the message that follows it is answered here, with its own
    /// cursor as the whole reply's (`short_poll::shared_reply`).
    after: Position,
    wait: Wait32,
}

/// The poll's wait in 8 bytes, not a `Duration`'s 16 (the hook's and the wait's size,
/// `app::parked`): a wait is at most `long_poll_max_wait`, far under 2^32 seconds (longer
/// is kept as that).
#[derive(Clone, Copy)]
struct Wait32 {
    secs: u32,
    nanos: u32,
}

impl Wait32 {
    fn of(wait: Duration) -> Self {
        Self {
            secs: u32::try_from(wait.as_secs()).unwrap_or(u32::MAX),
            nanos: wait.subsec_nanos(),
        }
    }

    fn get(self) -> Duration {
        Duration::new(u64::from(self.secs), self.nanos)
    }
}

// Spare held polls, per thread (as `net::pool` keeps read buffers): a connection that
// long-polls again takes one back instead of allocating a hook per poll (issue 17).
// Touched only by the task running on the thread, with no lock; at most `KEEP_HELD`.
thread_local! {
    static SPARE_HELD: std::cell::RefCell<Vec<Arc<HeldPoll>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

const KEEP_HELD: usize = 32;

impl HeldPoll {
    fn new(after: Position, wait: Duration) -> Self {
        Self {
            socket: HeldSocket::default(),
            after,
            wait: Wait32::of(wait),
        }
    }

    /// A hook for a poll held at `after`: a spare one of this thread's when there is one.
    pub fn take(after: Position, wait: Duration) -> Arc<Self> {
        if let Some(mut spare) = SPARE_HELD.try_with(|s| s.borrow_mut().pop()).ok().flatten()
            && let Some(h) = Arc::get_mut(&mut spare)
        {
            h.after = after;
            h.wait = Wait32::of(wait);
            return spare;
        }
        Arc::new(Self::new(after, wait))
    }

    /// Gives a hook back once its poll is over. Kept only when nothing else holds it: the
    /// hub lets go of it under the channel's lock (`release`, or `deliver` right after the
    /// answer), and a publisher still holding it just has it freed.
    fn give(mut held: Arc<Self>) {
        let Some(h) = Arc::get_mut(&mut held) else {
            return;
        };
        // Fresh state: a socket still lent (the client hung up while held) closes here, not
        // in the pool.
        h.socket = HeldSocket::default();
        // `try_with`: a poll dropped as its thread ends finds no spares; it is just freed.
        let _ = SPARE_HELD.try_with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < KEEP_HELD {
                s.push(held);
            }
        });
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
            .answer(&short_poll::shared_reply(message, Some(self.wait.get())))
    }
}

/// A long poll's answer, still to come, and its hook when it can be held.
///
/// The answer's future (~390 bytes: the subscription, the reply, the deadline's place on
/// the node's timer) is boxed, so that a parked connection's task does not carry it in
/// every state (`app::parked`). The box is not allocated per poll (issue 17): a poll that
/// ends gives it back to its thread's spares (`SPARE_WAITS`, as `net::pool` keeps read buffers)
/// and the next long poll on the thread writes its future into it in place (`Slot::refill`).
pub struct Wait {
    answer: Option<Pin<Box<dyn Slot>>>,
    held: Option<Arc<HeldPoll>>,
}

/// A box a long poll's future is written into, and emptied from, in place: `Option<F>`
/// pinned in its box. `dyn`, so that the spares need not name the future's type; a spare
/// holding another type is refused by `refill` (there is one in practice: `short_poll`'s).
trait Slot: Send {
    fn poll_answer(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Answer>;
    /// Moves `next` (an `Option` of this slot's future) in: `false` when it is another type.
    fn refill(self: Pin<&mut Self>, next: &mut dyn Any) -> bool;
    /// Drops the future: what it holds (the subscription, the hook) goes now.
    fn clear(self: Pin<&mut Self>);
}

impl<F: Future<Output = Answer> + Send + 'static> Slot for Option<F> {
    fn poll_answer(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Answer> {
        match self.as_pin_mut() {
            Some(answer) => answer.poll(cx),
            None => Poll::Pending,
        }
    }

    fn refill(mut self: Pin<&mut Self>, next: &mut dyn Any) -> bool {
        match next.downcast_mut::<Option<F>>() {
            Some(next) => {
                self.set(next.take());
                true
            }
            None => false,
        }
    }

    fn clear(mut self: Pin<&mut Self>) {
        self.set(None);
    }
}

// Spare answer boxes, per thread: touched only by the task running on the thread, with no
// lock; at most `KEEP_WAITS` (each ~390 bytes).
thread_local! {
    static SPARE_WAITS: std::cell::RefCell<Vec<Pin<Box<dyn Slot>>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

const KEEP_WAITS: usize = 32;

impl Wait {
    pub fn new<F>(answer: F, held: Option<Arc<HeldPoll>>) -> Self
    where
        F: Future<Output = Answer> + Send + 'static,
    {
        let mut next = Some(answer);
        let answer = match SPARE_WAITS
            .try_with(|s| s.borrow_mut().pop())
            .ok()
            .flatten()
        {
            Some(mut slot) => {
                if slot.as_mut().refill(&mut next) {
                    slot
                } else {
                    Box::pin(next)
                }
            }
            None => Box::pin(next),
        };
        Self {
            answer: Some(answer),
            held,
        }
    }

    /// The boxed answer's size (`app::parked`).
    #[cfg(test)]
    pub fn answer_size(&self) -> usize {
        self.answer.as_deref().map_or(0, std::mem::size_of_val)
    }

    /// Where the connection lends its socket, if this poll can be held.
    pub fn held(&self) -> Option<&HeldSocket> {
        self.held.as_deref().map(|h| &h.socket)
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        // The answer's future (and its subscription, which keeps the hook in the hub) goes
        // first, so the hook is then this wait's alone.
        if let Some(mut answer) = self.answer.take() {
            answer.as_mut().clear();
            let _ = SPARE_WAITS.try_with(|s| {
                let mut s = s.borrow_mut();
                if s.len() < KEEP_WAITS {
                    s.push(answer);
                }
            });
        }
        if let Some(held) = self.held.take() {
            HeldPoll::give(held);
        }
    }
}

impl Future for Wait {
    type Output = Answer;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Answer> {
        match self.answer.as_mut() {
            Some(answer) => answer.as_mut().poll_answer(cx),
            None => Poll::Pending,
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tidings_core::Epoch;

    fn at(offset: u64) -> Position {
        Position {
            epoch: Epoch::new("h3k9").unwrap_or_else(|| panic!("an epoch")),
            offset,
        }
    }

    /// One future type for every wait of a test, as `short_poll::later` has in the server.
    async fn answering(status: Option<axum::http::StatusCode>) -> Answer {
        match status {
            Some(status) => Answer::from(crate::net::reply::Reply::new(
                status,
                "text/plain",
                crate::net::reply::ReplyBody::joined(&[b""]),
            )),
            None => Answer::Sent,
        }
    }

    fn slot_of(wait: &Wait) -> *const u8 {
        wait.answer
            .as_ref()
            .map_or(std::ptr::null(), |a| &**a as *const dyn Slot as *const u8)
    }

    #[test]
    fn a_finished_wait_s_box_and_hook_serve_the_next_poll_on_the_thread() {
        let first = Wait::new(
            answering(None),
            Some(HeldPoll::take(at(1), Duration::from_secs(5))),
        );
        let (slot, hook) = (slot_of(&first), first.held.clone());
        drop(hook);
        let held = first.held.as_ref().map(Arc::as_ptr);
        drop(first);
        let second = Wait::new(
            answering(None),
            Some(HeldPoll::take(at(7), Duration::from_secs(9))),
        );
        assert_eq!(slot_of(&second), slot, "the answer's box is reused");
        let h = second.held.as_ref().unwrap_or_else(|| panic!("a hook"));
        assert_eq!(Some(Arc::as_ptr(h)), held, "the hook is reused");
        assert_eq!(h.after.offset, 7);
        assert_eq!(h.wait.get(), Duration::from_secs(9));
        assert!(
            !h.socket.attached() && !h.socket.answered(),
            "a reused hook starts fresh"
        );
    }

    #[test]
    fn a_hook_something_else_still_holds_is_never_reused() {
        let first = Wait::new(
            answering(None),
            Some(HeldPoll::take(at(1), Duration::from_secs(5))),
        );
        let kept = first.held.clone().unwrap_or_else(|| panic!("a hook"));
        drop(first);
        let second = HeldPoll::take(at(2), Duration::from_secs(5));
        assert!(!Arc::ptr_eq(&kept, &second));
        assert_eq!(kept.after.offset, 1, "the held one is untouched");
    }

    /// Shutdown reaches a waiting poll through its queue (the node's one pass over the hub),
    /// not a wait of its own: it answers at once, with the notice of SPEC §13.
    #[tokio::test]
    async fn a_waiting_long_poll_answers_with_the_shutdown_notice_when_the_node_shuts_down() {
        let mut config = crate::config::Config::default();
        config.server.reconnect_spread = Duration::ZERO;
        let state = AppState::new(config).unwrap_or_else(|e| panic!("{e}"));
        let headers = axum::http::HeaderMap::new();
        let polled =
            short_poll::poll(&state, None, Some("p"), Some("wait=300"), &headers, true).await;
        let Ok(short_poll::Polled::Later(wait)) = polled else {
            panic!("a long poll with nothing to answer waits");
        };
        let answered = tokio::spawn(wait);
        state.shutdown.cancel();
        let answer = answered.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(answer.status(), axum::http::StatusCode::OK);
        let body = axum::body::to_bytes(answer.into_response().into_body(), 1 << 16)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let reply: serde_json::Value =
            serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(reply["messages"], serde_json::json!([]));
        assert_eq!(
            reply["disconnect"],
            serde_json::json!({"reason": "shutdown", "reconnect": true, "reconnect_after_ms": 0})
        );
    }

    #[tokio::test]
    async fn a_reused_box_answers_with_its_new_future() {
        let first = Wait::new(answering(None), None);
        let slot = slot_of(&first);
        drop(first);
        let second = Wait::new(answering(Some(axum::http::StatusCode::NO_CONTENT)), None);
        assert_eq!(slot_of(&second), slot);
        let answer = second.await;
        assert_eq!(answer.status(), axum::http::StatusCode::NO_CONTENT);
    }
}
