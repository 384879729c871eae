//! A held long poll's socket, for answering it from the publishing side (issue 17): when a
//! message reaches a channel with N held one-channel polls, the publisher's `deliver` has
//! each poll's hook write its answer (`HeldSocket::answer`) instead of queuing the message
//! and waking N tasks that each build a reply.
//!
//! The socket is the connection's own, moved here while the poll is held (`Socket::lend`)
//! and moved back when it is over (`detach`): tokio's `TcpStream` reads and writes through
//! `&self`, so the publisher writes (`try_write`, never waiting: what the kernel does not
//! take now is `WouldBlock`, and the hook declines, so the message is queued as without a
//! hook) while the connection's task goes on watching for a hang-up through it
//! (`poll_read`). Only the lean path's plain TCP connections lend their socket: TLS, h2 and
//! hyper connections never do.
//!
//! Concurrency: one lock, taken by the publisher's write (under the channel's lock, inside
//! the hub) and by the connection's task (attach, `poll_answered`, detach); never held
//! across an `.await` or a blocking call. The write happens under it, so a detach waits for
//! a write in progress and can never take the socket from under one. Whether a message went
//! to the hook at all is the hub's to say (`Subscription::release`), not this state's.

use std::io;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use crate::net::reply::Reply;

/// The socket of a held poll and what became of its answer.
#[derive(Default)]
pub struct HeldSocket {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Lent by the connection while its poll is held (`attach`).
    socket: Option<tokio::net::TcpStream>,
    keep_alive: bool,
    /// The connection's task, while it waits (`poll_answered`).
    waker: Option<Waker>,
    answered: Option<Answered>,
}

/// An answer written from the publishing side.
pub enum Answered {
    /// Whole: the connection reads its next request.
    Whole,
    /// In part (the socket took only some): the connection's task writes the rest of the
    /// head, from the offset. Boxed, as it is rare: inline, its 32 bytes were in every held
    /// poll's hook (`long_poll::HeldPoll`, issue 17); boxed, 16 with the `Option`.
    Partial(Box<(Vec<u8>, usize)>),
}

impl HeldSocket {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain field updates and one non-blocking write under it: a poisoned lock holds
        // valid data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lends the connection's socket to the poll; its answers say `close` unless
    /// `keep_alive`.
    pub fn attach(&self, socket: tokio::net::TcpStream, keep_alive: bool) {
        let mut s = self.lock();
        s.socket = Some(socket);
        s.keep_alive = keep_alive;
    }

    /// Whether the connection lent its socket: only then can the poll be held.
    pub fn attached(&self) -> bool {
        self.lock().socket.is_some()
    }

    /// Writes `reply` as the poll's answer, now or not at all: `false` (nothing sent) when
    /// no socket is lent, an answer was already written, or the socket takes nothing now.
    /// Wakes the connection's task when it wrote.
    pub fn answer(&self, reply: &Reply) -> bool {
        let mut s = self.lock();
        if s.answered.is_some() {
            return false;
        }
        let keep_alive = s.keep_alive;
        let Some(socket) = &s.socket else {
            return false;
        };
        let mut out = crate::net::h1::reply_head(reply, keep_alive, false);
        let sent = match socket.try_write(&out) {
            Ok(n) if n > 0 => n,
            // `WouldBlock`, or the peer is gone: the connection's task finds out for itself.
            _ => {
                crate::net::pool::give_write(&mut out);
                return false;
            }
        };
        s.answered = Some(if sent == out.len() {
            crate::net::pool::give_write(&mut out);
            Answered::Whole
        } else {
            Answered::Partial(Box::new((out, sent)))
        });
        let waker = s.waker.take();
        drop(s);
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }

    /// `Ready` once an answer was written (`answer`); the task's waker is kept until then.
    pub fn poll_answered(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.lock();
        if s.answered.is_some() {
            return Poll::Ready(());
        }
        match &mut s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Whether an answer was written.
    pub fn answered(&self) -> bool {
        self.lock().answered.is_some()
    }

    /// Reads what the client sent while its poll is held (a hang-up, or a pipelined
    /// request); `Ready(Ok(0))` at end of stream.
    pub fn poll_read(&self, cx: &mut Context<'_>, out: &mut [u8]) -> Poll<io::Result<usize>> {
        let s = self.lock();
        let Some(socket) = &s.socket else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        loop {
            std::task::ready!(socket.poll_read_ready(cx))?;
            match socket.try_read(out) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    /// Takes the lent socket back, with what was written of an answer, if one was.
    pub fn detach(&self) -> (Option<tokio::net::TcpStream>, Option<Answered>) {
        let mut s = self.lock();
        s.waker = None;
        (s.socket.take(), s.answered.take())
    }
}
