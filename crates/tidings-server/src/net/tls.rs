//! TLS on buffers of our own: rustls' unbuffered API under an `AsyncRead`/`AsyncWrite` stream.
//!
//! Why not `tokio_rustls`: its stream is rustls' buffered `ServerConnection`, which keeps a
//! 4 KiB deframer buffer for the connection's whole life (`DeframerVecBuffer::prepare_read`
//! sizes it before every read and never frees it) and a queue for plaintext written during
//! the handshake. A parked TLS connection — an SSE stream, a WebSocket waiting for its
//! next message — reads nothing for minutes, and that buffer was a third of what it cost
//! (docs/benchmarks.md, *Idle memory*). With the unbuffered API the caller owns the bytes:
//! - TLS bytes are read into a chunk on the stack, and records are decrypted from there; only
//!   a record still arriving (or records a reader had no room for yet) is copied to the heap
//!   (`incoming`), and that buffer is freed once they are processed, as the plain path does
//!   for request heads and WebSocket frames;
//! - plaintext goes straight into the reader's buffer; what a record holds beyond the room
//!   the reader gave waits in `plain`, freed once taken;
//! - encrypted bytes wait in `outgoing` only until the socket takes them.
//!
//! So between reads a connection holds rustls' connection state, its record keys, the
//! socket and nothing else.
//!
//! What stays as it was: the handshake (ALPN h2 / http/1.1, under the listener's timeout),
//! close_notify on shutdown, a fatal alert on a bad record (sent best-effort before the error
//! is returned; the stream ends there, both ways, which rustls alone would not do), TLS 1.2
//! and 1.3 alike, an end of stream without close_notify read as `UnexpectedEof` (what
//! `tokio_rustls` reports). Early data is not enabled, so none arrives.
//!
//! Back-pressure: a write is taken only once everything encrypted before it is out, so at
//! most one write's records (`WRITE_MAX` of plaintext) wait here; the write deadline
//! (`deadline.rs`) sits under this stream and sees every refused socket write.
//!
//! Concurrency: one connection, one owner (the connection's task); nothing shared but the
//! server's `rustls::ServerConfig`.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError,
    UnbufferedStatus, WriteTraffic,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::net::deadline::Conn;

/// The server's TLS settings (certificate and key, ALPN `h2` then `http/1.1`).
pub type Acceptor = Arc<rustls::ServerConfig>;

/// TLS bytes read from the socket at once: the largest record rustls accepts (16 KiB of
/// plaintext, 2 KiB of expansion, the 5-byte header), so a whole record is decrypted from
/// the stack.
pub const READ_CHUNK: usize = 16 * 1024 + 2048 + 5;
/// Plaintext encrypted per write: four full records.
pub const WRITE_MAX: usize = 64 * 1024;
/// A vectored write up to this is encrypted as one record (an HTTP chunk's size line, its
/// data and its CRLF), through a copy on the stack; larger ones record by slice.
const JOIN_MAX: usize = 4096;
/// What a record adds to its plaintext, at most (header, explicit nonce, content type, tag).
pub const RECORD_OVERHEAD: usize = 5 + 8 + 1 + 16;
pub const RECORD_PLAINTEXT: usize = 16 * 1024;

/// Runs the TLS handshake on `io`; the stream is ready for HTTP once it returns. The caller
/// bounds the time (`listener::TLS_HANDSHAKE_TIMEOUT`).
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    config: Acceptor,
) -> io::Result<TlsStream<S>> {
    let conn = UnbufferedServerConnection::new(config).map_err(io::Error::other)?;
    let mut tls = TlsStream {
        io,
        incoming: Vec::new(),
        unprocessed: false,
        core: Core {
            conn,
            plain: BytesMut::new(),
            outgoing: Vec::new(),
            read_end: ReadEnd::Open,
        },
        sent: 0,
        write_closed: false,
    };
    std::future::poll_fn(|cx| tls.poll_handshake(cx)).await?;
    Ok(tls)
}

/// What a stream holds between calls, in bytes (`TlsStream::held`).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub incoming: usize,
    pub unprocessed: bool,
    pub plain: usize,
    /// Encrypted and not yet taken by the socket.
    pub outgoing: usize,
}

/// A TLS connection after its handshake: over a socket (`Conn`), or over an in-memory pipe
/// in the fuzz target (`fuzz/fuzz_targets/tls.rs`).
pub struct TlsStream<S = Conn> {
    io: S,
    /// TLS bytes received and not yet processed: a record still arriving, or records a reader
    /// had no room for (`unprocessed`). Empty, and unallocated, otherwise.
    incoming: Vec<u8>,
    /// `incoming` holds whole records still to process (not only the start of one, which
    /// needs more bytes from the socket first).
    unprocessed: bool,
    core: Core,
    /// How much of `core.outgoing` the socket has taken.
    sent: usize,
    /// Our close_notify is queued: nothing more is written.
    write_closed: bool,
}

/// rustls and what it hands out; apart from `incoming` so records can be processed from a
/// buffer that is not ours (the stack chunk) or from `incoming` alike.
struct Core {
    conn: UnbufferedServerConnection,
    /// Plaintext decrypted and not yet read: the rest of a record larger than the reader's
    /// room, or, when a write comes while whole records wait in `incoming` for a reader's
    /// room, all of theirs (rustls processes every record it is given before it encrypts),
    /// so less than `READ_CHUNK` and one record.
    plain: BytesMut,
    /// Records encrypted (or handshake messages, alerts) not yet all written.
    outgoing: Vec<u8>,
    read_end: ReadEnd,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ReadEnd {
    Open,
    /// The peer's close_notify: a clean end of stream.
    Closed,
    /// The socket ended without one.
    Eof,
    /// A TLS error (a record that does not decrypt, a message out of place): the stream is
    /// over both ways, whoever reads or writes next.
    Failed,
}

/// Where processing stopped.
enum Stop {
    /// Every whole record is processed: what is left needs more bytes.
    NeedMore,
    /// The reader's room is full: whole records may be left.
    Full,
}

/// Where decrypted plaintext goes: the reader's buffer, up to the room it gave; what is
/// left of a record goes to `Core::plain`.
struct Sink<'a, 'b> {
    to: To<'a, 'b>,
    room: usize,
    given: usize,
}

enum To<'a, 'b> {
    Bytes(&'a mut BytesMut),
    Read(&'a mut ReadBuf<'b>),
    /// During the handshake: everything waits in `plain`.
    Nowhere,
}

impl Sink<'_, '_> {
    fn full(&self) -> bool {
        self.given >= self.room
    }

    fn put(&mut self, payload: &[u8], rest: &mut BytesMut) {
        let n = payload.len().min(self.room - self.given);
        match &mut self.to {
            To::Bytes(b) => keep(b, &payload[..n]),
            To::Read(r) => r.put_slice(&payload[..n]),
            To::Nowhere => {}
        }
        self.given += n;
        rest.extend_from_slice(&payload[n..]);
    }

    /// Takes what waits in `plain` first, up to the room.
    fn take(&mut self, plain: &mut BytesMut) {
        let n = plain.len().min(self.room - self.given);
        match &mut self.to {
            To::Bytes(b) => keep(b, &plain[..n]),
            To::Read(r) => r.put_slice(&plain[..n]),
            To::Nowhere => return,
        }
        self.given += n;
        plain.advance(n);
        if plain.is_empty() {
            // Freed, not kept for the next record: a parked connection holds no buffer.
            *plain = BytesMut::new();
        }
    }
}

/// Appends plaintext to the lean path's buffer, which takes a pooled one if it has none
/// (as a bare socket's read does: `net/pool.rs`).
fn keep(buf: &mut BytesMut, data: &[u8]) {
    if buf.capacity() == 0 && !data.is_empty() {
        *buf = crate::net::pool::read_buffer();
    }
    buf.extend_from_slice(data);
}

/// Every TLS error is `InvalidData`, and no other error here is: `write_traffic` tells them
/// apart by that.
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// What a read or write gets once the stream has failed.
fn failed() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "TLS: the stream failed")
}

impl Core {
    /// Runs rustls over `data` (TLS bytes received, in order) until every whole record is
    /// processed or the reader's room is full. Returns how many bytes of `data` are done
    /// with; the rest must be kept, in order, ahead of what is read next.
    fn process(&mut self, data: &mut [u8], sink: &mut Sink) -> (usize, Result<Stop, io::Error>) {
        let mut at = 0;
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut data[at..]);
            let state = match state {
                Ok(state) => state,
                Err(e) => return (at + discard, Err(tls_error(e))),
            };
            let stop = match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    let mut failed = None;
                    while let Some(record) = traffic.next_record() {
                        match record {
                            Ok(record) => {
                                discard += record.discard;
                                sink.put(record.payload, &mut self.plain);
                            }
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        }
                    }
                    if let Some(e) = failed {
                        return (at + discard, Err(tls_error(e)));
                    }
                    (sink.full() || !self.plain.is_empty()).then_some(Stop::Full)
                }
                // Not enabled (`max_early_data_size` is 0): dropped if it ever came.
                ConnectionState::ReadEarlyData(mut early) => {
                    while let Some(Ok(record)) = early.next_record() {
                        discard += record.discard;
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    if let Err(e) = encode_into(&mut encode, &mut self.outgoing) {
                        return (at + discard, Err(e));
                    }
                    None
                }
                // The bytes are in `outgoing`, which the socket takes before anything
                // encrypted later: for rustls they are as good as sent.
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    None
                }
                ConnectionState::PeerClosed => {
                    self.read_end = ReadEnd::Closed;
                    None
                }
                ConnectionState::Closed => {
                    self.read_end = ReadEnd::Closed;
                    Some(Stop::NeedMore)
                }
                // The handshake waits for the peer, or the connection has nothing more to
                // do with these bytes: both mean "read more".
                _ => Some(Stop::NeedMore),
            };
            at += discard;
            if let Some(stop) = stop {
                return (at, Ok(stop));
            }
        }
    }
}

/// Appends a handshake message (or alert) to `out`, growing it to what it needs.
fn encode_into(
    encode: &mut EncodeTlsData<'_, ServerConnectionData>,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let len = out.len();
    let need = match encode.encode(&mut []) {
        Ok(_) => return Ok(()),
        Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
            required_size
        }
        Err(e) => return Err(io::Error::other(e.to_string())),
    };
    out.resize(len + need, 0);
    let written = encode.encode(&mut out[len..]);
    keep_written(out, len, written)
}

/// Encrypts `data` at the end of `out` (after anything rustls queued to go first).
fn encrypt_into(
    traffic: &mut WriteTraffic<'_, ServerConnectionData>,
    data: &[u8],
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let len = out.len();
    let records = data.len().div_ceil(RECORD_PLAINTEXT).max(1);
    out.resize(len + data.len() + records * RECORD_OVERHEAD, 0);
    let written = match traffic.encrypt(data, &mut out[len..]) {
        Ok(n) => Ok(n),
        // A key update queued ahead of the data: sized by rustls, once more.
        Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
            out.resize(len + required_size, 0);
            traffic.encrypt(data, &mut out[len..])
        }
        Err(e) => Err(e),
    };
    keep_written(out, len, written)
}

/// Keeps the `n` bytes rustls wrote after `out`'s first `len`, or none of them on an error.
fn keep_written<E: std::fmt::Display>(
    out: &mut Vec<u8>,
    len: usize,
    written: Result<usize, E>,
) -> io::Result<()> {
    match written {
        Ok(n) => {
            out.truncate(len + n);
            Ok(())
        }
        Err(e) => {
            out.truncate(len);
            Err(io::Error::other(e.to_string()))
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream<S> {
    /// The protocol ALPN chose (`h2`, `http/1.1`), if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.core.conn.alpn_protocol()
    }

    /// What the stream holds between calls: the fuzz target (`fuzz/fuzz_targets/tls.rs`)
    /// checks it against the bounds above.
    #[doc(hidden)]
    pub fn held(&self) -> Held {
        Held {
            incoming: self.incoming.len(),
            unprocessed: self.unprocessed,
            plain: self.core.plain.len(),
            outgoing: self.core.outgoing.len() - self.sent,
        }
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_send(cx))?;
            if !self.core.conn.is_handshaking() {
                // What the handshake read is gone unless records followed it.
                if self.incoming.is_empty() {
                    self.incoming = Vec::new();
                }
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut read = ReadBuf::uninit(&mut chunk);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tls handshake eof",
                )));
            }
            // A handshake's messages may span reads: they go through the heap, which is
            // freed once it is done.
            self.incoming.extend_from_slice(read.filled());
            let mut sink = Sink {
                to: To::Nowhere,
                room: 0,
                given: 0,
            };
            let (done, result) = self.core.process(&mut self.incoming, &mut sink);
            self.incoming.drain(..done);
            match result {
                Ok(stop) => self.unprocessed = matches!(stop, Stop::Full),
                Err(e) => return Poll::Ready(Err(self.fail(cx, e))),
            }
        }
    }

    /// Calls `f` with rustls ready to encrypt, after queueing what rustls has to send first
    /// (a key update's answer).
    ///
    /// rustls is handed `incoming`, not an empty buffer: a handshake message split over
    /// records is kept there, in place, until its last piece comes, and rustls indexes into
    /// the buffer it is given on every call. Whole records still waiting there are processed
    /// on the way (their plaintext goes to `plain`, in order).
    fn write_traffic<R>(
        &mut self,
        f: impl FnOnce(&mut WriteTraffic<'_, ServerConnectionData>, &mut Vec<u8>) -> io::Result<R>,
    ) -> io::Result<R> {
        if self.core.read_end == ReadEnd::Failed {
            return Err(failed());
        }
        let mut f = Some(f);
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.core.conn.process_tls_records(&mut self.incoming);
            let done = match state.map_err(tls_error) {
                Ok(ConnectionState::WriteTraffic(mut traffic)) => match f.take() {
                    Some(f) => Some(f(&mut traffic, &mut self.core.outgoing)),
                    None => Some(Err(io::Error::other("TLS: written twice"))),
                },
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    encode_into(&mut encode, &mut self.core.outgoing)
                        .err()
                        .map(Err)
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    None
                }
                Ok(ConnectionState::PeerClosed) => {
                    self.core.read_end = ReadEnd::Closed;
                    None
                }
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    let mut failed = None;
                    while let Some(record) = traffic.next_record() {
                        match record {
                            Ok(record) => {
                                discard += record.discard;
                                self.core.plain.extend_from_slice(record.payload);
                            }
                            Err(e) => {
                                failed = Some(Err(tls_error(e)));
                                break;
                            }
                        }
                    }
                    failed
                }
                Ok(ConnectionState::ReadEarlyData(mut early)) => {
                    while let Some(Ok(record)) = early.next_record() {
                        discard += record.discard;
                    }
                    None
                }
                Ok(ConnectionState::Closed) => Some(Err(io::ErrorKind::BrokenPipe.into())),
                Ok(_) => Some(Err(io::Error::other("TLS: not ready to send"))),
                Err(e) => Some(Err(e)),
            };
            self.incoming.drain(..discard);
            if let Some(done) = done {
                // Every whole record is processed once rustls is ready to write.
                self.unprocessed = false;
                if self.incoming.is_empty() {
                    self.incoming = Vec::new();
                }
                if let Err(e) = &done
                    && e.kind() == io::ErrorKind::InvalidData
                {
                    // A bad record among those processed: the alert goes out with the next
                    // send (the caller's), and the stream is over.
                    self.broken();
                }
                return done;
            }
        }
    }

    /// Queues the fatal alert rustls has for the peer after an error, if it has one.
    fn queue_alert(&mut self) {
        let status = self.core.conn.process_tls_records(&mut self.incoming);
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) = status.state {
            let _ = encode_into(&mut encode, &mut self.core.outgoing);
        }
    }

    /// After a TLS error: the alert rustls has for the peer goes out if the socket takes it
    /// now; the error is returned either way, and the stream is over. rustls does not
    /// remember a record that failed to decrypt (the next one may decrypt under the same
    /// keys), so this stream does: nothing is read or written after the error and the alert,
    /// and plaintext still waiting in `plain` is dropped (a read that met the error gives
    /// what it decrypted before the bad record: `read_failed`).
    fn fail(&mut self, cx: &mut Context<'_>, e: io::Error) -> io::Error {
        self.broken();
        let _ = self.poll_send(cx);
        e
    }

    /// The stream is over after a TLS error: the alert is queued, and nothing is processed
    /// again (rustls would answer the same bad record with a second fatal alert).
    fn broken(&mut self) {
        if self.core.read_end == ReadEnd::Failed {
            return;
        }
        self.queue_alert();
        self.core.read_end = ReadEnd::Failed;
        self.write_closed = true;
        self.incoming = Vec::new();
        self.unprocessed = false;
        self.core.plain = BytesMut::new();
    }

    /// Writes what is encrypted until the socket has all of it, then frees the buffer.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.core.outgoing.len() {
            let n =
                ready!(Pin::new(&mut self.io).poll_write(cx, &self.core.outgoing[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        if self.core.outgoing.capacity() > 0 {
            self.core.outgoing = Vec::new();
        }
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Decrypts what the peer sent into `sink`, reading the socket as needed: `Ready` with
    /// something given, at a clean end of stream (nothing given), or with an error.
    fn poll_plain(&mut self, cx: &mut Context<'_>, sink: &mut Sink) -> Poll<io::Result<()>> {
        if sink.room == 0 {
            return Poll::Ready(Ok(()));
        }
        if !self.core.plain.is_empty() {
            sink.take(&mut self.core.plain);
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.unprocessed {
                let mut incoming = std::mem::take(&mut self.incoming);
                let (done, result) = self.core.process(&mut incoming, sink);
                incoming.drain(..done);
                if !incoming.is_empty() {
                    self.incoming = incoming;
                }
                match result {
                    Ok(stop) => self.unprocessed = matches!(stop, Stop::Full),
                    Err(e) => return Poll::Ready(self.read_failed(cx, e, sink)),
                }
                if let Some(ready) = self.settled(cx, sink) {
                    return ready;
                }
            }
            match self.core.read_end {
                ReadEnd::Open => {}
                ReadEnd::Closed => return Poll::Ready(Ok(())),
                ReadEnd::Eof => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                ReadEnd::Failed => return Poll::Ready(Err(failed())),
            }
            let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut read = ReadBuf::uninit(&mut chunk);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // No close_notify: a truncation as far as TLS can tell.
                self.core.read_end = ReadEnd::Eof;
                self.incoming = Vec::new();
                self.unprocessed = false;
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            let (done, result) = if self.incoming.is_empty() {
                // The common case: whole records, decrypted from the stack.
                let data = read.filled_mut();
                let (done, result) = self.core.process(data, sink);
                if done < data.len() {
                    self.incoming = data[done..].to_vec();
                }
                (done, result)
            } else {
                // The rest of a record that started in an earlier read.
                self.incoming.extend_from_slice(read.filled());
                let mut incoming = std::mem::take(&mut self.incoming);
                let (done, result) = self.core.process(&mut incoming, sink);
                incoming.drain(..done);
                if !incoming.is_empty() {
                    self.incoming = incoming;
                }
                (done, result)
            };
            let _ = done;
            match result {
                Ok(stop) => self.unprocessed = matches!(stop, Stop::Full),
                Err(e) => return Poll::Ready(self.read_failed(cx, e, sink)),
            }
            if let Some(ready) = self.settled(cx, sink) {
                return ready;
            }
        }
    }

    /// A read met a TLS error. What decrypted before the bad record (in the same read) is the
    /// peer's and is given now; the error comes with the next read (`ReadEnd::Failed`).
    fn read_failed(&mut self, cx: &mut Context<'_>, e: io::Error, sink: &Sink) -> io::Result<()> {
        let e = self.fail(cx, e);
        if sink.given > 0 { Ok(()) } else { Err(e) }
    }

    /// After records were processed: sends what rustls queued (an answer to a key update),
    /// and says whether the read is done.
    fn settled(&mut self, cx: &mut Context<'_>, sink: &Sink) -> Option<Poll<io::Result<()>>> {
        if self.sent < self.core.outgoing.len() {
            // Not waited for: a reader does not block on a write; the next read or write
            // carries on, and the write deadline watches it meanwhile.
            if let Poll::Ready(Err(e)) = self.poll_send(cx) {
                return Some(Poll::Ready(Err(e)));
            }
        }
        if sink.given > 0 || self.core.read_end != ReadEnd::Open {
            return Some(Poll::Ready(Ok(())));
        }
        None
    }

    /// Reads plaintext into `buf`, up to `room` bytes (more if `buf` already has the space):
    /// the lean path's read (`h1::Socket`).
    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        room: usize,
    ) -> Poll<io::Result<usize>> {
        let room = room.max(buf.capacity() - buf.len());
        let mut sink = Sink {
            to: To::Bytes(buf),
            room,
            given: 0,
        };
        ready!(self.poll_plain(cx, &mut sink))?;
        Poll::Ready(Ok(sink.given))
    }

    /// A write found a TLS error in the records it had to process first (`write_traffic`
    /// ended the stream): the alert goes out if the socket takes it now.
    fn write_failed(&mut self, cx: &mut Context<'_>, e: io::Error) -> io::Error {
        let _ = self.poll_send(cx);
        e
    }

    /// Encrypts `data` (up to `WRITE_MAX` of it) once what was encrypted before is out.
    fn poll_encrypt(&mut self, cx: &mut Context<'_>, data: &[&[u8]]) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        ready!(self.poll_send(cx))?;
        let total: usize = data.iter().map(|d| d.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let taken = if data.len() > 1 && total <= JOIN_MAX {
            let mut joined = [0u8; JOIN_MAX];
            let mut at = 0;
            for d in data {
                joined[at..at + d.len()].copy_from_slice(d);
                at += d.len();
            }
            if let Err(e) = self.write_traffic(|t, out| encrypt_into(t, &joined[..at], out)) {
                return Poll::Ready(Err(self.write_failed(cx, e)));
            }
            total
        } else {
            let mut left = WRITE_MAX;
            let encrypted = self.write_traffic(|t, out| {
                for d in data {
                    let d = &d[..d.len().min(left)];
                    if !d.is_empty() {
                        encrypt_into(t, d, out)?;
                        left -= d.len();
                    }
                }
                Ok(())
            });
            if let Err(e) = encrypted {
                return Poll::Ready(Err(self.write_failed(cx, e)));
            }
            WRITE_MAX - left
        };
        // Started now; what the socket does not take yet goes out at the next write or flush.
        if let Poll::Ready(Err(e)) = self.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let room = buf.remaining();
        let mut sink = Sink {
            to: To::Read(buf),
            room,
            given: 0,
        };
        this.poll_plain(cx, &mut sink)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_encrypt(cx, &[buf])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut parts: [&[u8]; 4] = [&[]; 4];
        let n = bufs.len().min(parts.len());
        for (part, buf) in parts.iter_mut().zip(bufs) {
            *part = &**buf;
        }
        self.get_mut().poll_encrypt(cx, &parts[..n])
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            // Queued once; sent below with anything still waiting ahead of it.
            // A connection rustls already closed (a fatal alert sent) just ends.
            this.write_closed = true;
            let _ = this.write_traffic(|t, out| {
                let len = out.len();
                out.resize(len + 64, 0);
                let n = match t.queue_close_notify(&mut out[len..]) {
                    Err(EncryptError::InsufficientSize(InsufficientSizeError {
                        required_size,
                    })) => {
                        out.resize(len + required_size, 0);
                        t.queue_close_notify(&mut out[len..])
                    }
                    r => r,
                };
                match n {
                    Ok(n) => out.truncate(len + n),
                    Err(_) => out.truncate(len),
                }
                Ok(())
            });
        }
        ready!(this.poll_send(cx))?;
        Poll::Ready(match ready!(Pin::new(&mut this.io).poll_shutdown(cx)) {
            // A peer already gone: the stream is as shut as it gets.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            r => r,
        })
    }
}

/// The lean path reads through the same buffers (`h1::Socket`). Boxed: the connection's
/// task then holds a pointer, not rustls' state inline (kept twice, were it moved into a
/// WebSocket session later).
impl<S: AsyncRead + AsyncWrite + Unpin + Send> crate::net::h1::Socket for Box<TlsStream<S>> {
    fn poll_read_more(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        room: usize,
    ) -> Poll<io::Result<usize>> {
        self.poll_read_into(cx, buf, room)
    }
}
