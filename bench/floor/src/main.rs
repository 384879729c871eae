//! The floor server: the least work any user-space server could do to pass the
//! `tidings bench` cells that `bench/run.py` runs (SSE subscribers, long polls, publishes),
//! answering with Tidings' wire format so the generator's loss, duplicate and latency checks
//! work unchanged. A yardstick for issue 17, not a product: what remains of a delivery's CPU
//! when user space does almost nothing is the kernel's (recv, send, epoll, and on loopback
//! the receiver's TCP path run on the sender's CPU).
//!
//! ```text
//! CARGO_TARGET_DIR=target/floor cargo build --release --manifest-path bench/floor/Cargo.toml
//! target/floor/release/tidings-floor [127.0.0.1:8070]
//! ```
//!
//! What it does, and no more:
//! - one thread, one epoll (mio, edge-triggered); per request one `recv` (a read shorter
//!   than the room left means the socket is drained: more data raises a new edge) and per
//!   reply one `send`; what a full socket does not take waits in that connection's buffer;
//! - `GET /sse/{c}`: the response head, then every message's SSE frame;
//! - `GET /poll/{c}?wait=N[&since=CURSOR]`: the messages after the cursor at once if the
//!   channel's ring still holds them, else the poll is held until the next publish (or `wait`
//!   seconds, answered with no messages); the reply's `ETag` is the cursor to resume from;
//! - `POST /publish/{c}` (`Content-Length` body): the message gets the channel's next
//!   sequence number, is encoded once (SSE frame, one-message poll reply with its head, both
//!   in a ring slot whose buffers are reused), and the same bytes go to every subscriber.
//!
//! No allocation per request or per delivery once buffers have grown to their working size:
//! connections, channels and ring slots keep their buffers; a channel is allocated the first
//! time it is named. Channels never go away (a bench run names a bounded set).
//!
//! Concurrency: none; everything runs on the one thread, in the order epoll reports it
//! (unless `FLOOR_PUBLISHER_FIRST` is set: see `main`).

// The repository's clippy.toml asks for tokio's Instant (paused time in tests); there is no
// tokio here.
#![allow(clippy::disallowed_types)]

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

const LISTENER: Token = Token(usize::MAX);
/// Messages kept per channel, so a long poll that resumes from its cursor loses nothing
/// while it was between two requests (the bench's cells publish at most a few per poll).
const RING: usize = 64;
/// One request's head must fit (the bench's are ~150 bytes; a publish is head + 100 bytes).
const READ_BUFFER: usize = 4096;
/// The epoch in every cursor and envelope (Tidings' is a random id per node start).
const EPOCH: &[u8] = b"floor";

fn main() -> io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8070".into())
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut poll = Poll::new()?;
    let mut listener = TcpListener::bind(addr)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut server = Server::new();
    let mut events = Events::with_capacity(1024);
    let mut last_sweep = Instant::now();
    // `FLOOR_PUBLISHER_FIRST=K` (issue 17, session 10; off by default): the connections
    // that have published are read again after every K events, so a publish waits behind at
    // most K re-arriving polls instead of behind every event epoll returned before it. A
    // publish read sooner finds the polls still on their way back, and each then carries
    // several messages: what the publisher's place in line is worth, measured.
    let publisher_first: usize = std::env::var("FLOOR_PUBLISHER_FIRST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    loop {
        match poll.poll(&mut events, Some(Duration::from_secs(1))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for (i, ev) in events.iter().enumerate() {
            if publisher_first > 0 && i % publisher_first == publisher_first - 1 {
                for k in 0..server.publishers.len() {
                    let p = server.publishers[k];
                    server.readable(p);
                }
            }
            if ev.token() == LISTENER {
                server.accept(&listener, &poll);
                continue;
            }
            let t = ev.token().0;
            if ev.is_writable() {
                server.flush(t, &poll);
            }
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                server.readable(t);
            }
            server.close_dead(&poll);
        }
        // Held polls whose wait ran out: a scan once a second is cheaper than a timer each.
        if last_sweep.elapsed() >= Duration::from_secs(1) {
            last_sweep = Instant::now();
            server.expire(last_sweep);
            server.close_dead(&poll);
        }
    }
}

/// One message, encoded once for every transport; the slot's buffers are reused.
#[derive(Default)]
struct Slot {
    seq: u64,
    /// `{"channel":…,"data":…,"time":…}` with its own cursor.
    envelope: Vec<u8>,
    /// The SSE frame.
    sse: Vec<u8>,
    /// The whole one-message poll reply (head and body): what every held poll gets.
    poll: Vec<u8>,
}

struct Channel {
    name: Box<[u8]>,
    /// The last message's sequence number (0: none yet); cursors are sequence numbers.
    seq: u64,
    ring: Vec<Slot>,
    /// Connections streaming SSE (each knows its index here, so leaving is a swap_remove).
    streams: Vec<usize>,
    /// Held long polls, all at cursor `seq`.
    waiters: Vec<usize>,
}

enum State {
    /// Waiting for (or reading) a request.
    Request,
    /// An SSE stream of channel `ch`, at index `at` of its `streams`.
    Stream { ch: usize, at: usize },
    /// A held long poll on channel `ch`, at index `at` of its `waiters`.
    Held {
        ch: usize,
        at: usize,
        until: Instant,
    },
}

struct Conn {
    sock: TcpStream,
    buf: Box<[u8]>,
    len: usize,
    /// What the socket did not take yet (empty almost always).
    out: Vec<u8>,
    state: State,
    dead: bool,
}

/// Connections to close, and connections whose socket did not take a whole reply: only
/// those are registered for writability (every socket registered for it would raise an
/// event each time its peer's ACKs free send space: one more wake-up per reply).
#[derive(Default)]
struct Queues {
    dead: Vec<usize>,
    stalled: Vec<usize>,
}

struct Server {
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    channels: Vec<Channel>,
    by_name: HashMap<Box<[u8]>, usize>,
    q: Queues,
    /// Scratch for the replies that are not shared (publish answers, catch-up polls).
    scratch: Vec<u8>,
    /// A whole reply (head and body) that is not shared.
    reply: Vec<u8>,
    /// The held polls being answered (swapped with a channel's list, capacity kept).
    taken: Vec<usize>,
    /// Connections that have published (`FLOOR_PUBLISHER_FIRST`).
    publishers: Vec<usize>,
}

impl Server {
    fn new() -> Self {
        Self {
            conns: Vec::with_capacity(20_000),
            free: Vec::new(),
            channels: Vec::new(),
            by_name: HashMap::new(),
            q: Queues::default(),
            scratch: Vec::with_capacity(64 * 1024),
            reply: Vec::with_capacity(64 * 1024),
            taken: Vec::new(),
            publishers: Vec::new(),
        }
    }

    fn accept(&mut self, listener: &TcpListener, poll: &Poll) {
        loop {
            let (mut sock, _) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Out of descriptors and the like: the next readiness edge retries.
                Err(_) => return,
            };
            let _ = sock.set_nodelay(true);
            let t = self.free.pop().unwrap_or_else(|| {
                self.conns.push(None);
                self.conns.len() - 1
            });
            if poll
                .registry()
                .register(&mut sock, Token(t), Interest::READABLE)
                .is_err()
            {
                self.free.push(t);
                continue;
            }
            self.conns[t] = Some(Conn {
                sock,
                buf: vec![0; READ_BUFFER].into_boxed_slice(),
                len: 0,
                out: Vec::new(),
                state: State::Request,
                dead: false,
            });
        }
    }

    fn readable(&mut self, t: usize) {
        loop {
            let Some(c) = self.conns.get_mut(t).and_then(Option::as_mut) else {
                return;
            };
            if c.dead {
                return;
            }
            let room = c.buf.len() - c.len;
            if room == 0 {
                // A request head larger than the buffer: not something the bench sends.
                self.kill(t);
                return;
            }
            let n = match c.sock.read(&mut c.buf[c.len..]) {
                Ok(0) => {
                    self.kill(t);
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.kill(t);
                    return;
                }
            };
            c.len += n;
            self.requests(t);
            if n < room {
                return;
            }
        }
    }

    /// Answers every complete request in the connection's buffer (while it is not holding
    /// a poll or streaming).
    fn requests(&mut self, t: usize) {
        loop {
            let Some(c) = self.conns[t].as_mut() else {
                return;
            };
            if c.dead || !matches!(c.state, State::Request) {
                return;
            }
            let Some(head_end) = find(&c.buf[..c.len], b"\r\n\r\n").map(|i| i + 4) else {
                return;
            };
            let head = &c.buf[..head_end];
            let line_end = find(head, b"\r\n").unwrap_or(head.len());
            let mut parts = head[..line_end].split(|&b| b == b' ');
            let method = parts.next().unwrap_or(b"");
            let target = parts.next().unwrap_or(b"");
            let body_len = if method == b"POST" {
                content_length(&head[line_end..]).unwrap_or(0)
            } else {
                0
            };
            let total = head_end + body_len;
            if total > c.buf.len() {
                self.kill(t);
                return;
            }
            if c.len < total {
                return;
            }
            // Copy what the handlers need off the connection buffer onto the stack.
            let mut path = [0u8; 256];
            let target_len = target.len().min(path.len());
            path[..target_len].copy_from_slice(&target[..target_len]);
            let is_post = method == b"POST";
            let is_get = method == b"GET";
            let path = &path[..target_len];
            if is_post && let Some(name) = path.strip_prefix(b"/publish/") {
                let ch = self.channel(name);
                if !self.publishers.contains(&t) {
                    self.publishers.push(t);
                }
                self.publish(t, ch, head_end, body_len);
            } else if is_get && let Some(name) = path.strip_prefix(b"/sse/") {
                let ch = self.channel(name);
                self.stream(t, ch);
            } else if is_get && let Some(rest) = path.strip_prefix(b"/poll/") {
                let (name, query) = match rest.iter().position(|&b| b == b'?') {
                    Some(i) => (&rest[..i], &rest[i + 1..]),
                    None => (rest, &b""[..]),
                };
                let ch = self.channel(name);
                self.long_poll(t, ch, query);
            } else {
                self.reply_status(t, b"404 Not Found");
            }
            let Some(c) = self.conns[t].as_mut() else {
                return;
            };
            c.buf.copy_within(total..c.len, 0);
            c.len -= total;
        }
    }

    fn channel(&mut self, name: &[u8]) -> usize {
        if let Some(&i) = self.by_name.get(name) {
            return i;
        }
        let i = self.channels.len();
        self.channels.push(Channel {
            name: name.into(),
            seq: 0,
            ring: (0..RING).map(|_| Slot::default()).collect(),
            streams: Vec::new(),
            waiters: Vec::new(),
        });
        self.by_name.insert(name.into(), i);
        i
    }

    fn stream(&mut self, t: usize, ch: usize) {
        let chan = &mut self.channels[ch];
        let at = chan.streams.len();
        chan.streams.push(t);
        if let Some(c) = self.conns[t].as_mut() {
            c.state = State::Stream { ch, at };
            // The head and the first chunk (reconnect delay, the cursor now) in one write.
            let r = &mut self.reply;
            r.clear();
            r.extend_from_slice(SSE_HEAD);
            hex(r, 13 + 4 + 26 + 2);
            r.extend_from_slice(b"\r\nretry: 2000\n\nid: ");
            cursor(r, chan.seq);
            r.extend_from_slice(b"\n\n\r\n");
            send(c, r, &mut self.q, t);
        }
    }

    fn long_poll(&mut self, t: usize, ch: usize, query: &[u8]) {
        let mut wait = 30u64;
        let mut since = None;
        for pair in query.split(|&b| b == b'&') {
            if let Some(v) = pair.strip_prefix(b"wait=") {
                wait = parse_u64(v).unwrap_or(30);
            } else if let Some(v) = pair.strip_prefix(b"since=") {
                since = parse_cursor(v);
            }
        }
        let chan = &mut self.channels[ch];
        // No cursor: from now on (what Tidings does for a poll without `since`).
        let since = since.unwrap_or(chan.seq).min(chan.seq);
        let Some(c) = self.conns[t].as_mut() else {
            return;
        };
        if since == chan.seq {
            let at = chan.waiters.len();
            chan.waiters.push(t);
            c.state = State::Held {
                ch,
                at,
                until: Instant::now() + Duration::from_secs(wait),
            };
            return;
        }
        if since + 1 == chan.seq {
            let slot = &chan.ring[(chan.seq as usize) % RING];
            send(c, &slot.poll, &mut self.q, t);
            return;
        }
        // Several messages (or some no longer in the ring: reported as a gap, as Tidings
        // does, and the generator counts them lost).
        let first = since.max(chan.seq.saturating_sub(RING as u64)) + 1;
        let s = &mut self.scratch;
        s.clear();
        s.extend_from_slice(b"{\"messages\":[");
        for seq in first..=chan.seq {
            if seq > first {
                s.push(b',');
            }
            s.extend_from_slice(&chan.ring[(seq as usize) % RING].envelope);
        }
        s.extend_from_slice(b"],\"cursor\":\"");
        cursor(s, chan.seq);
        s.extend_from_slice(b"\",\"gaps\":[");
        if first > since + 1 {
            s.extend_from_slice(b"{\"channel\":\"");
            s.extend_from_slice(&chan.name);
            s.extend_from_slice(b"\",\"from\":");
            number(s, since + 1);
            s.extend_from_slice(b",\"to\":");
            number(s, first - 1);
            s.push(b'}');
        }
        s.extend_from_slice(b"]}");
        let body_len = s.len();
        let r = &mut self.reply;
        r.clear();
        poll_head(r, chan.seq, body_len);
        r.extend_from_slice(&self.scratch);
        send(c, r, &mut self.q, t);
    }

    fn publish(&mut self, t: usize, ch: usize, body_at: usize, body_len: usize) {
        let Some(c) = self.conns[t].as_mut() else {
            return;
        };
        let data = &c.buf[body_at..body_at + body_len];
        let chan = &mut self.channels[ch];
        chan.seq += 1;
        let seq = chan.seq;
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let slot = &mut chan.ring[(seq as usize) % RING];
        slot.seq = seq;
        encode(slot, &chan.name, seq, data, time);
        // The publisher's answer first: its latency is the publish's.
        let r = &mut self.reply;
        r.clear();
        r.extend_from_slice(PUBLISH_HEAD);
        self.scratch.clear();
        publish_body(&mut self.scratch, &chan.name, seq, time);
        number(r, self.scratch.len() as u64);
        r.extend_from_slice(b"\r\n\r\n");
        r.extend_from_slice(&self.scratch);
        send(c, r, &mut self.q, t);
        // Every SSE stream of the channel, the same bytes.
        let slot = &chan.ring[(seq as usize) % RING];
        for &s in &chan.streams {
            if let Some(c) = self.conns[s].as_mut() {
                send(c, &slot.sse, &mut self.q, s);
            }
        }
        // Every held poll, the same reply; each goes back to reading requests.
        std::mem::swap(&mut self.taken, &mut chan.waiters);
        for &w in &self.taken {
            if let Some(c) = self.conns[w].as_mut() {
                c.state = State::Request;
                send(c, &slot.poll, &mut self.q, w);
            }
        }
        std::mem::swap(&mut self.taken, &mut chan.waiters);
        // A held poll's connection may have a request behind it (pipelining): answer it.
        for i in 0..self.channels[ch].waiters.len() {
            let w = self.channels[ch].waiters[i];
            if self.conns[w].as_ref().is_some_and(|c| c.len > 0) {
                self.taken.push(w);
            }
        }
        self.channels[ch].waiters.clear();
        while let Some(w) = self.taken.pop() {
            self.requests(w);
        }
    }

    fn reply_status(&mut self, t: usize, status: &[u8]) {
        let Some(c) = self.conns[t].as_mut() else {
            return;
        };
        let r = &mut self.reply;
        r.clear();
        r.extend_from_slice(b"HTTP/1.1 ");
        r.extend_from_slice(status);
        r.extend_from_slice(b"\r\ncontent-length: 0\r\n\r\n");
        send(c, r, &mut self.q, t);
    }

    /// Answers the held polls whose wait ran out, with no messages.
    fn expire(&mut self, now: Instant) {
        for t in 0..self.conns.len() {
            let Some(c) = self.conns[t].as_mut() else {
                continue;
            };
            let State::Held { ch, at, until } = c.state else {
                continue;
            };
            if until > now {
                continue;
            }
            self.unlist(t);
            let chan = &self.channels[ch];
            let _ = at;
            self.scratch.clear();
            self.scratch
                .extend_from_slice(b"{\"messages\":[],\"cursor\":\"");
            cursor(&mut self.scratch, chan.seq);
            self.scratch.extend_from_slice(b"\",\"gaps\":[]}");
            let r = &mut self.reply;
            r.clear();
            poll_head(r, chan.seq, self.scratch.len());
            r.extend_from_slice(&self.scratch);
            if let Some(c) = self.conns[t].as_mut() {
                c.state = State::Request;
                send(c, r, &mut self.q, t);
            }
            self.requests(t);
        }
    }

    /// Takes the connection off its channel's list (swap_remove, fixing the moved one's index).
    fn unlist(&mut self, t: usize) {
        let Some(c) = self.conns[t].as_mut() else {
            return;
        };
        let (ch, at, held) = match c.state {
            State::Stream { ch, at } => (ch, at, false),
            State::Held { ch, at, .. } => (ch, at, true),
            State::Request => return,
        };
        c.state = State::Request;
        let list = if held {
            &mut self.channels[ch].waiters
        } else {
            &mut self.channels[ch].streams
        };
        if list.get(at) != Some(&t) {
            return;
        }
        list.swap_remove(at);
        if let Some(&moved) = list.get(at)
            && let Some(m) = self.conns[moved].as_mut()
        {
            match &mut m.state {
                State::Stream { at: a, .. } | State::Held { at: a, .. } => *a = at,
                State::Request => {}
            }
        }
    }

    /// Writes what a stalled connection queued; once it is all out, back to reads only.
    fn flush(&mut self, t: usize, poll: &Poll) {
        let Some(c) = self.conns.get_mut(t).and_then(Option::as_mut) else {
            return;
        };
        while !c.out.is_empty() && !c.dead {
            match c.sock.write(&c.out) {
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    c.dead = true;
                    self.q.dead.push(t);
                    return;
                }
            }
        }
        if !c.dead
            && poll
                .registry()
                .reregister(&mut c.sock, Token(t), Interest::READABLE)
                .is_err()
        {
            c.dead = true;
            self.q.dead.push(t);
        }
    }

    fn kill(&mut self, t: usize) {
        if let Some(c) = self.conns[t].as_mut()
            && !c.dead
        {
            c.dead = true;
            self.q.dead.push(t);
        }
    }

    fn close_dead(&mut self, poll: &Poll) {
        while let Some(t) = self.q.stalled.pop() {
            if let Some(c) = self.conns[t].as_mut()
                && !c.dead
                && !c.out.is_empty()
                && poll
                    .registry()
                    .reregister(
                        &mut c.sock,
                        Token(t),
                        Interest::READABLE | Interest::WRITABLE,
                    )
                    .is_err()
            {
                c.dead = true;
                self.q.dead.push(t);
            }
        }
        while let Some(t) = self.q.dead.pop() {
            self.unlist(t);
            self.publishers.retain(|&p| p != t);
            if let Some(mut c) = self.conns[t].take() {
                let _ = poll.registry().deregister(&mut c.sock);
                self.free.push(t);
            }
        }
    }
}

/// Writes `bytes` now if nothing is queued, and queues what the socket does not take.
fn send(c: &mut Conn, bytes: &[u8], q: &mut Queues, t: usize) {
    if c.dead {
        return;
    }
    if !c.out.is_empty() {
        c.out.extend_from_slice(bytes);
        return;
    }
    let mut at = 0;
    while at < bytes.len() {
        match c.sock.write(&bytes[at..]) {
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                c.dead = true;
                q.dead.push(t);
                return;
            }
        }
    }
    if at < bytes.len() {
        c.out.extend_from_slice(&bytes[at..]);
        q.stalled.push(t);
    }
}

// ---- the wire format: Tidings' bytes (`date` left out), cursors of Tidings' length ----

const SSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
cache-control: no-cache\r\nx-accel-buffering: no\r\ntransfer-encoding: chunked\r\n\r\n";
const PUBLISH_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: ";
const CURSOR_PREFIX: &[u8] = b"floor-";

/// `floor-` and 20 digits: 26 bytes, the length of a Tidings cursor.
fn cursor(out: &mut Vec<u8>, seq: u64) {
    out.extend_from_slice(CURSOR_PREFIX);
    let mut digits = [b'0'; 20];
    let mut n = seq;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&digits);
}

fn parse_cursor(v: &[u8]) -> Option<u64> {
    parse_u64(v.strip_prefix(CURSOR_PREFIX)?)
}

fn parse_u64(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

fn number(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

fn hex(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n % 16];
        n /= 16;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// A JSON string's content (the bench's payloads need no escaping; others get it).
fn json_str(out: &mut Vec<u8>, s: &[u8]) {
    for &b in s {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f => {
                out.extend_from_slice(b"\\u00");
                out.push(b"0123456789abcdef"[usize::from(b >> 4)]);
                out.push(b"0123456789abcdef"[usize::from(b & 15)]);
            }
            _ => out.push(b),
        }
    }
}

/// The message's three encodings, into the slot's reused buffers.
fn encode(slot: &mut Slot, channel: &[u8], seq: u64, data: &[u8], time: u64) {
    let e = &mut slot.envelope;
    e.clear();
    e.extend_from_slice(b"{\"channel\":\"");
    json_str(e, channel);
    e.extend_from_slice(b"\",\"offset\":");
    number(e, seq);
    e.extend_from_slice(b",\"epoch\":\"");
    e.extend_from_slice(EPOCH);
    e.extend_from_slice(b"\",\"cursor\":\"");
    cursor(e, seq);
    e.extend_from_slice(b"\",\"data\":\"");
    json_str(e, data);
    e.extend_from_slice(b"\",\"time\":");
    number(e, time);
    e.push(b'}');

    // SSE, raw mode as Tidings sends it: `id:`, the payload's lines as `data:`, one chunk.
    let s = &mut slot.sse;
    s.clear();
    let mut frame_len = 4 + 26 + 1 + 1;
    for line in data.split(|&b| b == b'\n') {
        frame_len += 6 + line.len() + 1;
    }
    hex(s, frame_len);
    s.extend_from_slice(b"\r\nid: ");
    cursor(s, seq);
    s.push(b'\n');
    for line in data.split(|&b| b == b'\n') {
        s.extend_from_slice(b"data: ");
        s.extend_from_slice(line);
        s.push(b'\n');
    }
    s.extend_from_slice(b"\n\r\n");

    let p = &mut slot.poll;
    p.clear();
    let body_len = 13 + slot.envelope.len() + 12 + 26 + 12;
    poll_head(p, seq, body_len);
    p.extend_from_slice(b"{\"messages\":[");
    p.extend_from_slice(&slot.envelope);
    p.extend_from_slice(b"],\"cursor\":\"");
    cursor(p, seq);
    p.extend_from_slice(b"\",\"gaps\":[]}");
}

fn poll_head(out: &mut Vec<u8>, seq: u64, body_len: usize) {
    out.extend_from_slice(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncache-control: no-cache\r\netag: \"",
    );
    cursor(out, seq);
    // The bench always asks `wait=30`; the header is there for the same bytes as Tidings'.
    out.extend_from_slice(b"\"\r\npreference-applied: wait=30\r\ncontent-length: ");
    number(out, body_len as u64);
    out.extend_from_slice(b"\r\n\r\n");
}

fn publish_body(out: &mut Vec<u8>, channel: &[u8], seq: u64, time: u64) {
    out.extend_from_slice(b"{\"channel\":\"");
    json_str(out, channel);
    out.extend_from_slice(b"\",\"offset\":");
    number(out, seq);
    out.extend_from_slice(b",\"epoch\":\"");
    out.extend_from_slice(EPOCH);
    out.extend_from_slice(b"\",\"cursor\":\"");
    cursor(out, seq);
    out.extend_from_slice(b"\",\"time\":");
    number(out, time);
    out.push(b'}');
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn content_length(headers: &[u8]) -> Option<usize> {
    for line in headers.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(i) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if line[..i].eq_ignore_ascii_case(b"content-length") {
            let v = &line[i + 1..];
            let v = &v[v.iter().position(|&b| b != b' ').unwrap_or(v.len())..];
            return parse_u64(v).map(|n| n as usize);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunk size and `content-length` the floor writes are computed, not measured: a
    /// wrong one would make the generator misread every reply after it.
    #[test]
    fn a_message_encodes_to_a_well_framed_chunk_and_poll_reply() {
        let mut slot = Slot::default();
        encode(&mut slot, b"ch", 7, b"#0:7:123#xx\"y", 1);
        let sse = &slot.sse;
        let crlf = find(sse, b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&sse[..crlf]).unwrap(), 16).unwrap();
        assert_eq!(&sse[crlf + 2 + size..], b"\r\n");
        assert!(sse[crlf + 2..].starts_with(b"id: floor-00000000000000000007\ndata: #0:7:"));

        let p = &slot.poll;
        let end = find(p, b"\r\n\r\n").unwrap() + 4;
        assert_eq!(content_length(&p[..end]), Some(p.len() - end));
        assert!(p[end..].ends_with(b"],\"cursor\":\"floor-00000000000000000007\",\"gaps\":[]}"));
        assert!(find(p, b"\"data\":\"#0:7:123#xx\\\"y\"").is_some());
    }

    #[test]
    fn a_cursor_reads_back_as_its_sequence_number() {
        let mut c = Vec::new();
        cursor(&mut c, 1234);
        assert_eq!(c.len(), 26);
        assert_eq!(parse_cursor(&c), Some(1234));
        assert_eq!(parse_cursor(b"floor-x"), None);
        assert_eq!(parse_cursor(b"floor-99999999999999999999999"), None);
    }
}
