//! A WebSocket session's socket and the frames queued for it: the write and close paths that
//! Tidings' own `/ws` sessions (`websocket.rs`) and the Pusher sessions (`pusher/session.rs`)
//! share, so a fix to how a slow or vanished client is let go lands in both.
//!
//! Concurrency: owned by one session task; nothing here is shared.

use std::future::Future;
use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use crate::net::upgrade::SessionIo;
use crate::transport::websocket::frame_end;

/// How long a goodbye (the close frame out, the client's close read) may take before the
/// socket is dropped anyway.
pub(crate) const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

/// Output past this is written before more frames are read.
pub(crate) const WRITE_BATCH: usize = 64 * 1024;

pub(crate) struct WsSocket {
    pub io: SessionIo,
    /// Bytes read and not yet parsed; empty (no allocation) while the socket is idle.
    pub rbuf: BytesMut,
    /// Frames to send, and how much of them is already sent.
    pub out: Vec<u8>,
    pub sent: usize,
    /// Bytes written to the socket, for the access log.
    pub written: u64,
}

/// How a `flush` ended.
pub(crate) enum Flushed<S> {
    /// Everything queued is out.
    Done,
    /// The client is gone, or made no progress for the write timeout.
    Gone,
    /// `stop` resolved first; what was not sent stays queued.
    Stopped(S),
}

impl WsSocket {
    /// `pre`: bytes read past the handshake, the first to parse.
    pub fn new(io: SessionIo, pre: &Bytes) -> Self {
        Self {
            io,
            rbuf: BytesMut::from(&pre[..]),
            out: Vec::new(),
            sent: 0,
            written: 0,
        }
    }

    /// Writes everything queued. A write that makes no progress for `timeout` is `Gone` (the
    /// socket has the same deadline; this one also covers a WebSocket over an HTTP/2 stream,
    /// whose window the client may keep shut). `stop` (a kill token, shutdown, a token's
    /// expiry) cuts it short, leaving the rest queued so a goodbye can still go behind it.
    pub async fn flush<S>(
        &mut self,
        timeout: Duration,
        stop: impl Future<Output = S>,
    ) -> Flushed<S> {
        let mut stop = std::pin::pin!(stop);
        while self.sent < self.out.len() {
            let wrote = tokio::select! {
                r = tokio::time::timeout(timeout, self.io.write(&self.out[self.sent..])) => r,
                s = &mut stop => return Flushed::Stopped(s),
            };
            match wrote {
                Ok(Ok(0) | Err(_)) | Err(_) => return Flushed::Gone,
                Ok(Ok(n)) => {
                    self.sent += n;
                    self.written += n as u64;
                }
            }
        }
        if !self.out.is_empty() {
            if !matches!(
                tokio::time::timeout(timeout, self.io.flush()).await,
                Ok(Ok(()))
            ) {
                return Flushed::Gone;
            }
            // Freed, not cleared: an idle socket keeps no output buffer.
            self.out = Vec::new();
            self.sent = 0;
        }
        Flushed::Done
    }

    /// Writes what is queued without waiting, as far as the kernel takes it at once; true
    /// when everything went. The common case — a small batch, a socket with room — then
    /// costs the write alone, not `flush`'s future (a box, a `select!`, a timeout, and the
    /// stop signals' registrations on lists shared by every session: a quarter of a
    /// 10,000-subscriber fan-out's user time, docs/benchmarks.md). What is left (a full
    /// socket, TLS, an error) is `flush`'s, with its deadline and stop signals.
    pub fn write_now(&mut self) -> bool {
        while self.sent < self.out.len() {
            match self.io.try_write(&self.out[self.sent..]) {
                Some(Ok(n)) if n > 0 => {
                    self.sent += n;
                    self.written += n as u64;
                }
                _ => return false,
            }
        }
        // Freed, not cleared, as in `flush`.
        self.out = Vec::new();
        self.sent = 0;
        true
    }

    /// Like `flush`, with nothing to cut it short (goodbyes bound it with their own timeout).
    pub async fn write_out(&mut self) -> io::Result<()> {
        while self.sent < self.out.len() {
            match self.io.write(&self.out[self.sent..]).await? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => {
                    self.sent += n;
                    self.written += n as u64;
                }
            }
        }
        self.out = Vec::new();
        self.sent = 0;
        self.io.flush().await
    }

    /// Whether enough is queued to write it before reading more frames.
    pub fn batch_full(&self) -> bool {
        self.out.len() >= WRITE_BATCH
    }

    /// Frees the read buffer once everything read is parsed: a parked socket keeps none.
    pub fn release_read_buffer(&mut self) {
        if self.rbuf.is_empty() {
            self.rbuf = BytesMut::new();
        }
    }

    /// Drops the frames queued behind the one being written (a half-sent frame is finished):
    /// a slow client's backlog is not worth waiting for, its close is.
    pub fn drop_backlog(&mut self) {
        let end = frame_end(&self.out, self.sent);
        self.out.truncate(end);
    }

    /// Sends what is queued (the close frame last) within `write_for`, shuts the write side,
    /// then reads until the client closes too, within `GOODBYE_TIMEOUT`: closing with unread
    /// bytes would reset the connection, which can destroy the close frame before it is read.
    pub async fn close(&mut self, write_for: Duration) {
        let wrote = tokio::time::timeout(write_for, async {
            self.write_out().await?;
            self.io.shutdown().await
        })
        .await;
        if !matches!(wrote, Ok(Ok(()))) {
            return;
        }
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async {
            loop {
                self.rbuf.clear();
                if self.io.read_more(&mut self.rbuf).await? == 0 {
                    return Ok::<(), io::Error>(());
                }
            }
        })
        .await;
    }

    /// What is queued goes out and the write side is shut, within `GOODBYE_TIMEOUT` (a close
    /// answering the client's, or a refusal right after the handshake); no reading after.
    pub async fn send_and_shut(&mut self) {
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async {
            self.write_out().await?;
            self.io.shutdown().await
        })
        .await;
    }
}
