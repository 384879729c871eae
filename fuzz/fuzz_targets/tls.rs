//! The server's TLS stream (`tidings_server::net::tls`: our record reassembly and buffers
//! over rustls' unbuffered API) driven by a client that is partly real and partly arbitrary,
//! through an in-memory pipe whose reads end where the input says (a record split anywhere)
//! and whose writes take only as much as the input allows (a slow reader).
//!
//! The first byte picks the start: arbitrary bytes from the first one (a forged ClientHello,
//! or anything), or a real rustls client's handshake (TLS 1.3 or 1.2, its bytes cut into
//! pieces of a size the input picks). Then up to 128 operations, each an opcode and its
//! arguments: arbitrary bytes, the real client's data, key update or close_notify, the end of
//! the socket, server reads (through `AsyncRead` or the lean path's `h1::Socket`, with any
//! room), server writes (plain or vectored), flush, shutdown, how much the socket takes, and
//! everything waiting delivered in one read (a genuine record and a forged one together).
//!
//! Checked after every step:
//! - nothing panics;
//! - the buffers stay within their bounds: `incoming` holds less than one whole record
//!   unless whole records wait for a reader's room, `plain` at most the plaintext of what
//!   `incoming` held, `outgoing` at most one write's records;
//! - an error ends the stream: no read gives plaintext with or after one, no write is taken;
//! - the server reads only what the real client sent, in order (arbitrary bytes can end
//!   the stream, never add to it), and the client only what the server wrote;
//! - without arbitrary bytes, nothing fails, and at the end everything written reaches the
//!   other side.
#![no_main]

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice, Read, Write};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rustls::pki_types::ServerName;
use tidings_server::net::h1::Socket;
use tidings_server::net::tls::{
    self, Held, READ_CHUNK, RECORD_OVERHEAD, RECORD_PLAINTEXT, TlsStream, WRITE_MAX,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest record on the wire (rustls' `MAX_WIRE_SIZE`: 16 KiB of plaintext, 2 KiB of
/// expansion, the header).
const MAX_RECORD: usize = 16 * 1024 + 2048 + 5;

/// The socket's two directions, shared by the stream (through `Pipe`) and the test.
#[derive(Default)]
struct Wire {
    /// What the client sent, in the pieces a read returns (a read never spans two).
    to_server: VecDeque<Vec<u8>>,
    /// The client's end is shut once these are read.
    eof: bool,
    from_server: Vec<u8>,
    /// How many bytes the socket takes before it refuses (a client that stopped reading).
    room: usize,
    shut: bool,
}

#[derive(Clone, Default)]
struct Pipe(Arc<Mutex<Wire>>);

impl Pipe {
    fn wire(&self) -> std::sync::MutexGuard<'_, Wire> {
        match self.0.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

impl AsyncRead for Pipe {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut w = self.wire();
        let Some(front) = w.to_server.front_mut() else {
            return if w.eof {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            };
        };
        let n = front.len().min(buf.remaining());
        buf.put_slice(&front[..n]);
        front.drain(..n);
        if front.is_empty() {
            w.to_server.pop_front();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Pipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut w = self.wire();
        assert!(!w.shut, "written after shutdown");
        let n = buf.len().min(w.room);
        if n == 0 && !buf.is_empty() {
            return Poll::Pending;
        }
        w.room -= n;
        w.from_server.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.wire().shut = true;
        Poll::Ready(Ok(()))
    }
}

struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
}

struct Configs {
    server: tls::Acceptor,
    tls13: Arc<rustls::ClientConfig>,
    tls12: Arc<rustls::ClientConfig>,
}

fn configs() -> &'static Configs {
    static CONFIGS: OnceLock<Configs> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let (chain, key) = tidings_server::tls::self_signed().expect("a self-signed certificate");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(chain.clone(), key)
            .expect("the certificate fits its key");
        // As `tidings_server::tls::from_config` sets it.
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        roots.add(chain[0].clone()).expect("a root");
        let client = |version: &'static rustls::SupportedProtocolVersion| {
            let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[version])
                .expect("protocol version")
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(c)
        };
        Configs {
            server: Arc::new(server),
            tls13: client(&rustls::version::TLS13),
            tls12: client(&rustls::version::TLS12),
        }
    })
}

/// Everything one input does, and what it has seen.
struct Run {
    pipe: Pipe,
    client: Option<rustls::ClientConnection>,
    /// Cut the real client's bytes into pieces of this size (0: as it wrote them).
    split: usize,
    /// Arbitrary bytes went to the server, or the real client misbehaved (more key update
    /// requests in a row than rustls takes, 32 as BoringSSL): the server may fail, and the
    /// client with it.
    forged: bool,
    /// Key updates the client sent since its last data.
    key_updates: usize,
    /// The client's plaintext the server must see, in order (before any close_notify).
    client_sent: Vec<u8>,
    /// Sent after the client's close_notify or the end of its socket: never read.
    client_closed: bool,
    server_read: Vec<u8>,
    server_wrote: Vec<u8>,
    client_read: Vec<u8>,
    client_failed: bool,
    /// A read or write failed, or a read saw the end: nothing more comes in.
    read_ended: bool,
    failed: bool,
    shut: bool,
}

impl Run {
    fn push(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut w = self.pipe.wire();
        if w.eof {
            // The client's end is shut: nothing more reaches the server.
            return;
        }
        if self.split == 0 {
            w.to_server.push_back(bytes.to_vec());
        } else {
            for piece in bytes.chunks(self.split) {
                w.to_server.push_back(piece.to_vec());
            }
        }
    }

    /// What the real client has to send goes onto the wire.
    fn client_flush(&mut self) {
        let Some(client) = self.client.as_mut() else {
            return;
        };
        let mut out = Vec::new();
        while client.wants_write() {
            if client.write_tls(&mut out).is_err() {
                break;
            }
        }
        self.push(&out);
    }

    /// The client takes what the server wrote.
    fn client_recv(&mut self) {
        let bytes = std::mem::take(&mut self.pipe.wire().from_server);
        let Some(client) = self.client.as_mut() else {
            return;
        };
        if self.client_failed {
            return;
        }
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            match client.read_tls(&mut rest) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => panic!("the client cannot buffer what the server wrote: {e}"),
            }
            if let Err(e) = client.process_new_packets() {
                assert!(
                    self.forged,
                    "the client refused what the server wrote, with no forged bytes: {e}"
                );
                self.client_failed = true;
                return;
            }
            let mut plain = [0u8; 4096];
            loop {
                match client.reader().read(&mut plain) {
                    Ok(0) => break,
                    Ok(n) => self.client_read.extend_from_slice(&plain[..n]),
                    Err(_) => break,
                }
            }
        }
        assert!(
            self.server_wrote.starts_with(&self.client_read),
            "the client read what the server never wrote"
        );
        // A key update's answer, an alert: sent back.
        self.client_flush();
    }

    fn check(&self, tls: &TlsStream<Pipe>, after: &str) {
        let Held {
            incoming,
            unprocessed,
            plain,
            outgoing,
        } = tls.held();
        if unprocessed {
            assert!(
                incoming < READ_CHUNK + MAX_RECORD,
                "{after}: {incoming} bytes of whole records wait"
            );
        } else {
            assert!(
                incoming < MAX_RECORD,
                "{after}: {incoming} bytes wait for the rest of a record"
            );
        }
        // One record's rest after a read; after a write, the plaintext of every whole record
        // that waited for a reader's room (rustls processes them all before it encrypts).
        assert!(
            plain < READ_CHUNK + MAX_RECORD,
            "{after}: {plain} bytes of plaintext wait"
        );
        assert!(
            outgoing <= WRITE_MAX + (WRITE_MAX / RECORD_PLAINTEXT + 1) * RECORD_OVERHEAD + 1024,
            "{after}: {outgoing} bytes wait for the socket"
        );
        assert!(
            self.client_sent.starts_with(&self.server_read),
            "{after}: the server read what the client never sent"
        );
        if !self.forged {
            assert!(!self.failed, "{after}: failed with no forged bytes");
        }
    }

    fn read(
        &mut self,
        tls: &mut Box<TlsStream<Pipe>>,
        cx: &mut Context<'_>,
        room: usize,
        lean: bool,
    ) {
        if self.shut && self.forged {
            // rustls answers a bad record read after its own close_notify with a fatal alert
            // and a debug assertion that no alert was sent before (rustls/rustls#959; off in
            // release builds, where the alert goes out and the read fails as it should).
            return;
        }
        let mut got = Vec::new();
        let polled = if lean {
            // The lean path's read: into a BytesMut it may grow past `room`.
            let mut buf = BytesMut::new();
            let polled = tls.poll_read_more(cx, &mut buf, room);
            if let Poll::Ready(Ok(n)) = polled {
                assert_eq!(n, buf.len(), "read {n}, given {}", buf.len());
                assert!(n <= room, "read {n} into a room of {room}");
            }
            got.extend_from_slice(&buf);
            polled.map_ok(|_| ())
        } else {
            let mut space = vec![0u8; room];
            let mut rb = ReadBuf::new(&mut space);
            let polled = Pin::new(&mut **tls).poll_read(cx, &mut rb);
            got.extend_from_slice(rb.filled());
            polled
        };
        match polled {
            Poll::Pending => assert!(got.is_empty(), "data given with Pending"),
            Poll::Ready(Ok(())) => {
                if got.is_empty() {
                    self.read_ended = true;
                } else {
                    assert!(!self.read_ended, "{} bytes read after the end", got.len());
                }
            }
            Poll::Ready(Err(e)) => {
                assert!(got.is_empty(), "data given with an error");
                self.read_ended = true;
                // The end of the socket without close_notify is not a failure of the stream:
                // the server may still write (as over TCP's half-close).
                if e.kind() != io::ErrorKind::UnexpectedEof {
                    self.failed = true;
                }
            }
        }
        self.server_read.extend_from_slice(&got);
    }

    fn write(&mut self, tls: &mut Box<TlsStream<Pipe>>, cx: &mut Context<'_>, parts: &[&[u8]]) {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let polled = if parts.len() == 1 {
            Pin::new(&mut **tls).poll_write(cx, parts[0])
        } else {
            let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
            Pin::new(&mut **tls).poll_write_vectored(cx, &slices)
        };
        match polled {
            Poll::Ready(Ok(n)) => {
                assert!(n <= total && n <= WRITE_MAX, "took {n} of {total}");
                assert!(total == 0 || n > 0, "took nothing of {total}");
                assert!(!self.shut, "a write was taken after shutdown");
                assert!(!self.failed, "a write was taken after an error");
                let mut left = n;
                for p in parts {
                    let k = p.len().min(left);
                    self.server_wrote.extend_from_slice(&p[..k]);
                    left -= k;
                }
            }
            Poll::Ready(Err(_)) => {
                if !self.shut {
                    self.failed = true;
                }
            }
            Poll::Pending => {}
        }
    }
}

/// A real client's handshake with the server; None if the server refused it.
fn handshake(
    config: Arc<rustls::ClientConfig>,
    pipe: Pipe,
    split: usize,
) -> Option<(rustls::ClientConnection, TlsStream<Pipe>)> {
    let name = ServerName::try_from("localhost").expect("a server name");
    let mut client = rustls::ClientConnection::new(config, name).expect("a client");
    pipe.wire().room = usize::MAX;
    let mut accept = Box::pin(tls::accept(pipe.clone(), configs().server.clone()));
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..64 {
        let mut out = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut out).ok()?;
        }
        {
            let mut w = pipe.wire();
            if split == 0 {
                if !out.is_empty() {
                    w.to_server.push_back(out);
                }
            } else {
                w.to_server.extend(out.chunks(split).map(|c| c.to_vec()));
            }
        }
        let polled = accept.as_mut().poll(&mut cx);
        let from = std::mem::take(&mut pipe.wire().from_server);
        let mut rest = &from[..];
        while !rest.is_empty() {
            client.read_tls(&mut rest).ok()?;
            client.process_new_packets().ok()?;
        }
        match polled {
            Poll::Ready(Ok(tls)) if !client.is_handshaking() => return Some((client, tls)),
            Poll::Ready(Err(_)) => return None,
            _ => {}
        }
    }
    panic!("a real client's handshake did not finish");
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Some(start) = input.u8() else { return };
    let pipe = Pipe::default();
    let mut cx = Context::from_waker(Waker::noop());
    let split = input.u8().unwrap_or(0) as usize;
    let mut run = Run {
        pipe: pipe.clone(),
        client: None,
        split,
        forged: false,
        key_updates: 0,
        client_sent: Vec::new(),
        client_closed: false,
        server_read: Vec::new(),
        server_wrote: Vec::new(),
        client_read: Vec::new(),
        client_failed: false,
        read_ended: false,
        failed: false,
        shut: false,
    };
    let tls = match start % 3 {
        0 => {
            // Arbitrary bytes from the first one, in the pieces the input cuts.
            run.forged = true;
            pipe.wire().room = usize::MAX;
            let mut accept = Box::pin(tls::accept(pipe.clone(), configs().server.clone()));
            loop {
                let bytes = match input.u16() {
                    Some(len) => input.take(usize::from(len)),
                    None => input.take(1),
                };
                run.push(bytes);
                let last = input.0.is_empty();
                if last && start & 0x80 != 0 {
                    pipe.wire().eof = true;
                }
                match accept.as_mut().poll(&mut cx) {
                    Poll::Ready(Ok(tls)) => break tls,
                    Poll::Ready(Err(_)) => return,
                    Poll::Pending if last => return,
                    Poll::Pending => {}
                }
            }
        }
        v => {
            let config = if v == 1 {
                configs().tls13.clone()
            } else {
                configs().tls12.clone()
            };
            let Some((client, tls)) = handshake(config, pipe.clone(), split) else {
                panic!("the server refused a real client's handshake");
            };
            run.client = Some(client);
            tls
        }
    };
    let mut tls = Box::new(tls);
    run.check(&tls, "the handshake");

    let mut ops = 0;
    while let Some(op) = input.u8() {
        ops += 1;
        if ops > 128 {
            break;
        }
        let what = match op % 13 {
            0 => {
                let len = input.u16().map_or(0, usize::from);
                let bytes = input.take(len);
                if !bytes.is_empty() {
                    run.forged = true;
                }
                run.push(bytes);
                "arbitrary bytes"
            }
            1 => {
                let len = input.u16().map_or(0, |n| usize::from(n) % 20_000);
                let fill = input.u8().unwrap_or(b'x');
                if let Some(client) = run.client.as_mut() {
                    let data: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i as u8)).collect();
                    if client.writer().write_all(&data).is_ok() && !run.client_closed {
                        run.client_sent.extend_from_slice(&data);
                    }
                    if !data.is_empty() {
                        run.key_updates = 0;
                    }
                    run.client_flush();
                }
                "client data"
            }
            2 | 3 => {
                let room = input.u16().map_or(1, |n| usize::from(n) % 40_000 + 1);
                run.read(&mut tls, &mut cx, room, op % 13 == 3);
                "a read"
            }
            4 => {
                let len = input.u16().map_or(0, |n| usize::from(n) % 100_000);
                let fill = input.u8().unwrap_or(b'y');
                let data: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i as u8)).collect();
                run.write(&mut tls, &mut cx, &[&data]);
                "a write"
            }
            5 => {
                // A vectored write: up to four parts of sizes the input picks.
                let n = input.u8().map_or(2, |n| n % 4 + 1);
                let mut parts = Vec::new();
                for k in 0..n {
                    let len = input.u16().map_or(0, |n| usize::from(n) % 20_000);
                    parts.push(vec![b'a' + k; len]);
                }
                let refs: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
                run.write(&mut tls, &mut cx, &refs);
                "a vectored write"
            }
            6 => {
                let room = input.u16().map_or(0, usize::from);
                pipe.wire().room = room;
                "the socket's room"
            }
            7 => {
                run.client_recv();
                "the client's read"
            }
            8 => {
                if let Some(client) = run.client.as_mut() {
                    if client.refresh_traffic_keys().is_ok() {
                        run.key_updates += 1;
                        if run.key_updates > 32 {
                            run.forged = true;
                        }
                    }
                    run.client_flush();
                }
                "a key update"
            }
            9 => {
                if let Some(client) = run.client.as_mut() {
                    client.send_close_notify();
                    run.client_closed = true;
                    run.client_flush();
                }
                "close_notify"
            }
            10 => {
                pipe.wire().eof = true;
                run.client_closed = true;
                "the end of the socket"
            }
            12 => {
                // Everything waiting arrives in one read (up to the reader's chunk): a
                // genuine record and a forged one together, say.
                let mut w = pipe.wire();
                let joined: Vec<u8> = w.to_server.drain(..).flatten().collect();
                if !joined.is_empty() {
                    w.to_server.push_back(joined);
                }
                "records together"
            }
            _ => {
                if op & 0x80 != 0 {
                    match Pin::new(&mut *tls).poll_shutdown(&mut cx) {
                        Poll::Ready(Ok(())) | Poll::Pending => run.shut = true,
                        Poll::Ready(Err(_)) => run.failed = true,
                    }
                    "shutdown"
                } else {
                    if let Poll::Ready(Err(_)) = Pin::new(&mut *tls).poll_flush(&mut cx) {
                        run.failed = true;
                    }
                    "flush"
                }
            }
        };
        run.check(&tls, what);
    }

    // The end: the socket takes everything, each side reads what is there.
    pipe.wire().room = usize::MAX;
    for _ in 0..1024 {
        let before = (run.server_read.len(), run.client_read.len());
        let _ = if run.shut {
            Pin::new(&mut *tls).poll_shutdown(&mut cx)
        } else {
            Pin::new(&mut *tls).poll_flush(&mut cx)
        };
        run.client_recv();
        if !run.read_ended {
            run.read(&mut tls, &mut cx, 64 * 1024, false);
        }
        run.check(&tls, "the end");
        if before == (run.server_read.len(), run.client_read.len()) {
            break;
        }
    }
    if run.client.is_some() && !run.forged {
        if !run.client_closed {
            assert_eq!(
                run.server_read.len(),
                run.client_sent.len(),
                "the server read all the client sent"
            );
        }
        assert_eq!(
            run.client_read.len(),
            run.server_wrote.len(),
            "the client read all the server wrote"
        );
    }
});
