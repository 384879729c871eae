//! The write deadline every connection carries (`[server] write_timeout`, SPEC §13).
//!
//! Why a socket wrapper rather than a timeout around each write: the writers are many — the
//! lean HTTP/1.1 path, hyper's HTTP/1.1 and HTTP/2 connections, rustls under both, WebSocket
//! sessions — and hyper's own writes cannot be wrapped from outside. Every one of them ends
//! up in `poll_write` on the TCP socket, so the deadline lives there: the first write the
//! kernel refuses (its send buffer full because the client stopped reading) arms a timer,
//! any write that goes through disarms it, and a write still refused when it fires fails
//! with `TimedOut`. The writer then ends the connection, which frees what it held.
//!
//! It measures progress, not idleness: a connection with nothing to write never arms it,
//! and a writer that gave up on a write (a `select!` that picked another branch) and comes
//! back later finds the timer still running only if the socket never took a byte meanwhile
//! — which is exactly "no progress".
//!
//! Own or lent: while a held long poll may be answered from the publishing side, the lean
//! path lends the plain TCP socket to it (`net::held`, `h1::Socket::lend`) and takes it back
//! when the poll is over; meanwhile the wrapper holds nothing, and I/O through it fails with
//! `NotConnected` (the lean path does none then: it watches for a hang-up through the lent
//! socket). Moving the socket, rather than sharing a duplicate descriptor, keeps one
//! descriptor per connection (the `nofile` budget `doctor` checks) and costs no system call.
//!
//! Concurrency: one connection, one owner; nothing shared. Memory: the timer is boxed and
//! exists only while a write is refused, so a parked connection pays a pointer for it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Every accepted TCP connection, under TLS where there is TLS.
pub type Conn = Deadline<tokio::net::TcpStream>;

pub struct Deadline<S> {
    /// `None` while lent to a held long poll (see the module).
    inner: Option<S>,
    timeout: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> Deadline<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        Self {
            inner: Some(inner),
            timeout,
            stalled: None,
        }
    }

    /// A write was refused: `Pending` until the deadline, then the error.
    fn refused<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let timeout = self.timeout;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no write progress within write_timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn outcome<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Pending => self.refused(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

fn lent() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the socket is lent to a held long poll",
    )
}

impl Deadline<tokio::net::TcpStream> {
    /// A write that never waits: what the kernel takes now, `WouldBlock` when it takes
    /// nothing. Progress disarms the deadline, as through `poll_write`.
    pub fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let wrote = self.inner.as_ref().ok_or_else(lent)?.try_write(buf);
        if wrote.is_ok() {
            self.stalled = None;
        }
        wrote
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Deadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_read(cx, buf),
            None => Poll::Ready(Err(lent())),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Deadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(Err(lent()));
        };
        let polled = Pin::new(inner).poll_write(cx, buf);
        self.outcome(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(Err(lent()));
        };
        let polled = Pin::new(inner).poll_write_vectored(cx, bufs);
        self.outcome(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(Err(lent()));
        };
        let polled = Pin::new(inner).poll_flush(cx);
        self.outcome(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(Err(lent()));
        };
        let polled = Pin::new(inner).poll_shutdown(cx);
        self.outcome(cx, polled)
    }
}

/// The lean path reads a bare socket its own way (`h1::Socket`); the deadline changes
/// nothing there.
impl<S: crate::net::h1::Socket> crate::net::h1::Socket for Deadline<S> {
    fn lend(&mut self) -> Option<tokio::net::TcpStream> {
        match self.inner.take()?.into_tcp() {
            Ok(tcp) => Some(tcp),
            Err(inner) => {
                self.inner = Some(inner);
                None
            }
        }
    }

    fn take_back(&mut self, tcp: tokio::net::TcpStream) {
        self.inner = S::from_tcp(tcp);
    }

    fn poll_read_more(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        room: usize,
    ) -> Poll<io::Result<usize>> {
        match self.inner.as_mut() {
            Some(inner) => inner.poll_read_more(cx, buf, room),
            None => Poll::Ready(Err(lent())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_takes_fails_after_the_timeout_and_progress_resets_it() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut a = Deadline::new(a, Duration::from_secs(30));
        // Fills the pipe; the next write waits.
        a.write_all(&[1; 64]).await.unwrap();
        let started = tokio::time::Instant::now();
        let stuck = tokio::spawn(async move {
            let r = a.write_all(&[2; 64]).await;
            (r, a)
        });
        // The reader takes a little after 20 s: progress, so the clock starts over.
        tokio::time::sleep(Duration::from_secs(20)).await;
        let mut got = [0u8; 64];
        b.read_exact(&mut got).await.unwrap();
        let (r, mut a) = stuck.await.unwrap();
        r.unwrap();
        assert!(started.elapsed() < Duration::from_secs(30));
        let err = a.write_all(&[3; 64]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(50));
    }
}
