//! Handing a connection's socket to a session (a WebSocket) once the handshake's answer is
//! written: the protocol layer owns the sockets, the application owns the sessions.
//!
//! The protocol layer marks requests whose socket it can hand over (`Upgradable`); a handler
//! that accepts puts a `Pending` session in its answer's extensions (a 101, or a 200 to an
//! HTTP/2 extended CONNECT), and the layer runs it once the answer is out:
//! - the lean path on the bare socket, in the connection's task (`SessionIo::Tcp`/`Tls`);
//! - hyper's HTTP/1.1 in the connection's task too, on hyper's upgraded stream;
//! - HTTP/2 (`http2`, our driver) as one of the connection's stream futures, on the stream's
//!   two halves (`SessionIo::H2`), keeping the stream's places against the connection limits
//!   until the session ends (the connection task, which the listener tracks, outlives it).
//!
//! In each case the session lives where the connection's place (permit) and gauge live, so
//! an upgraded socket is counted for exactly as long as it is open.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

/// Room made per read. On a bare socket it is reserved only once bytes are waiting, and
/// freed once they are parsed; over TLS or hyper's upgraded stream readiness cannot be
/// asked separately, so a smaller buffer waits there.
const TCP_READ: usize = 4096;
const UPGRADED_READ: usize = 512;

/// The socket a session owns.
pub enum SessionIo {
    /// A plaintext connection upgraded by the lean path.
    Tcp(crate::net::deadline::Conn),
    /// A TLS connection upgraded by the lean path (boxed: plaintext sessions are the many).
    Tls(Box<crate::net::tls::TlsStream>),
    /// An upgrade through hyper: a connection hyper owned (HTTP/1.1 handed off).
    Upgraded(TokioIo<hyper::upgrade::Upgraded>),
    /// HTTP/2 extended CONNECT (RFC 8441): a stream of our HTTP/2 driver (`http2`).
    H2(Box<crate::net::http2::Tunnel>),
}

impl SessionIo {
    /// `read_more` as a poll: a parked session waits on it without keeping a read future
    /// (88 bytes of every WebSocket session's) in its own.
    pub fn poll_read_more(
        &mut self,
        cx: &mut std::task::Context<'_>,
        buf: &mut BytesMut,
    ) -> std::task::Poll<io::Result<usize>> {
        use crate::net::h1::Socket;
        match self {
            SessionIo::Tcp(s) => s.poll_read_more(cx, buf, TCP_READ),
            SessionIo::Tls(s) => s.poll_read_more(cx, buf, UPGRADED_READ),
            SessionIo::Upgraded(s) => {
                buf.reserve(UPGRADED_READ);
                tokio_util::io::poll_read_buf(Pin::new(s), cx, buf)
            }
            SessionIo::H2(s) => {
                buf.reserve(UPGRADED_READ);
                tokio_util::io::poll_read_buf(Pin::new(&mut **s), cx, buf)
            }
        }
    }

    /// Reads what is waiting into `buf`; `Ok(0)` at end of stream. Cancel-safe.
    pub async fn read_more(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read_more(cx, buf)).await
    }

    /// Cancel-safe: either `Ok(n)` bytes went out or none did.
    pub async fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            SessionIo::Tcp(s) => s.write(data).await,
            SessionIo::Tls(s) => s.write(data).await,
            SessionIo::Upgraded(s) => s.write(data).await,
            SessionIo::H2(s) => s.write(data).await,
        }
    }

    /// A write that never waits, where the socket has one (a bare TCP socket); `None`
    /// elsewhere (TLS, hyper's or HTTP/2's streams): write through `write` there.
    pub fn try_write(&mut self, data: &[u8]) -> Option<io::Result<usize>> {
        match self {
            SessionIo::Tcp(s) => Some(s.try_write(data)),
            _ => None,
        }
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        match self {
            SessionIo::Tcp(_) => Ok(()),
            SessionIo::Tls(s) => s.flush().await,
            SessionIo::Upgraded(s) => s.flush().await,
            SessionIo::H2(s) => s.flush().await,
        }
    }

    pub async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            SessionIo::Tcp(s) => s.shutdown().await,
            SessionIo::Tls(s) => s.shutdown().await,
            SessionIo::Upgraded(s) => s.shutdown().await,
            SessionIo::H2(s) => s.shutdown().await,
        }
    }
}

pub type SessionFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
pub type StartFn = Box<dyn FnOnce(SessionIo, Bytes) -> SessionFuture + Send>;

/// Marks a request whose socket can be handed to a session (`h1.rs` and `listener.rs`
/// insert it).
#[derive(Clone, Copy)]
pub struct Upgradable;

/// A session waiting for its socket: put in the answer's extensions; the protocol layer
/// writes the answer and then runs it on the socket.
#[derive(Clone)]
pub struct Pending(Arc<Mutex<Option<StartFn>>>);

impl Pending {
    pub fn new(start: StartFn) -> Self {
        Self(Arc::new(Mutex::new(Some(start))))
    }

    /// The session's future on `io` (`pre`: bytes read past the request head), or `None`
    /// when it was already taken.
    pub fn start(&self, io: SessionIo, pre: Bytes) -> Option<SessionFuture> {
        let start = self.0.lock().ok()?.take()?;
        Some(start(io, pre))
    }
}
