//! The access log (`[server] access_log = "stderr" | "PATH"`, off by default): one line per
//! request, or per stream when it ends — method, path with its secrets masked, protocol,
//! status, body bytes sent, duration, transport and the client's address.
//!
//! Where lines are made: `App::handle` opens an entry for each request and ties it to the
//! response body, whose drop writes the line (so a stream's line is written when the stream
//! ends, on the lean path and through hyper alike, and a long poll's when its answer is
//! sent). A WebSocket handshake hands its entry to the session (`Claim`), which writes it
//! when the socket closes, with the bytes the session wrote.
//!
//! Concurrency: connection tasks format a line and `try_send` it to one writer thread over a
//! bounded queue (`QUEUE` lines). A full queue (a disk slower than the traffic) drops the
//! line and counts it (`tidings_access_log_dropped_total`) rather than making requests wait
//! for the disk or memory grow. The writer batches what is waiting into one write and
//! flushes when the queue is empty; it reopens a file on SIGHUP (`reopen`), so logrotate's
//! move-then-HUP works. It ends when the last sender (the `AppState`) is dropped.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::time::Instant;

use http::{Method, Version};

/// Lines waiting for the writer, at most. About 200 bytes each: well under 1 MiB.
const QUEUE: usize = 4096;

/// Query keys whose values are masked: anything that looks like a credential.
const SECRET_KEYS: &[&str] = &[
    "token",
    "key",
    "secret",
    "pass",
    "auth",
    "sig",
    "session",
    "cookie",
    "credential",
];

/// Where lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Stderr,
    File(PathBuf),
}

impl Target {
    /// The config value: `"stderr"` or a path.
    pub fn parse(value: &str) -> Self {
        match value.trim() {
            "stderr" | "-" => Target::Stderr,
            path => Target::File(PathBuf::from(path)),
        }
    }
}

/// The log's handle, shared by every connection.
pub struct AccessLog {
    tx: SyncSender<String>,
    json: bool,
    reopen: Arc<AtomicBool>,
    pub dropped: AtomicU64,
}

impl AccessLog {
    /// Opens the target (a file is created or appended to) and starts the writer thread. A
    /// file that cannot be opened is an error at start, not a silent lack of lines.
    pub fn start(target: Target, json: bool) -> io::Result<Self> {
        let sink = Sink::open(&target)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let reopen = Arc::new(AtomicBool::new(false));
        let flag = reopen.clone();
        std::thread::Builder::new()
            .name("tidings-access-log".into())
            .spawn(move || write_lines(rx, sink, target, flag))?;
        Ok(Self {
            tx,
            json,
            reopen,
            dropped: AtomicU64::new(0),
        })
    }

    /// Reopens the file before the next line (SIGHUP: logrotate has moved it).
    pub fn reopen(&self) {
        self.reopen.store(true, Relaxed);
    }

    /// An entry for a request that starts now.
    pub fn open(
        self: &Arc<Self>,
        method: &Method,
        uri: &http::Uri,
        version: Version,
        peer: Option<std::net::SocketAddr>,
    ) -> Entry {
        Entry {
            log: self.clone(),
            started: Instant::now(),
            method: method.clone(),
            target: masked_target(uri),
            version,
            peer,
        }
    }

    fn send(&self, line: String) {
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Relaxed);
            }
        }
    }
}

/// A request whose line is still to be written.
pub struct Entry {
    log: Arc<AccessLog>,
    started: Instant,
    method: Method,
    target: String,
    version: Version,
    peer: Option<std::net::SocketAddr>,
}

impl Entry {
    /// Writes the line: the request is over (its body sent, or its stream ended).
    pub fn finish(self, status: u16, bytes: u64, transport: &str) {
        let line = self.line(status, bytes, transport, SystemTime::now());
        self.log.send(line);
    }

    fn line(&self, status: u16, bytes: u64, transport: &str, now: SystemTime) -> String {
        let millis = self.started.elapsed().as_secs_f64() * 1000.0;
        let ts = humantime::format_rfc3339_millis(now);
        let peer = self.peer.map_or_else(|| "-".to_owned(), |p| p.to_string());
        let version = version_str(self.version);
        if self.log.json {
            let v = serde_json::json!({
                "ts": ts.to_string(),
                "peer": peer,
                "method": self.method.as_str(),
                "path": self.target,
                "protocol": version,
                "status": status,
                "bytes": bytes,
                "duration_ms": (millis * 1000.0).round() / 1000.0,
                "transport": transport,
            });
            let mut s = v.to_string();
            s.push('\n');
            s
        } else {
            format!(
                "{ts} {peer} \"{} {} {version}\" {status} {bytes} {millis:.1}ms {transport}\n",
                self.method, self.target
            )
        }
    }
}

/// An entry a WebSocket session takes over from the request (`App::handle` keeps the other
/// end, and writes no line for a request whose entry was claimed).
#[derive(Clone)]
pub struct Claim(Arc<Mutex<Option<Entry>>>);

impl Claim {
    pub fn new(entry: Entry) -> Self {
        Self(Arc::new(Mutex::new(Some(entry))))
    }

    /// The entry, once: to the session, or back to the request if no session took it.
    pub fn take(&self) -> Option<Entry> {
        self.0.lock().ok()?.take()
    }
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// The path and query, each query value whose key looks like a credential replaced by
/// `redacted`, and anything that could break the line (quotes, controls, non-ASCII)
/// percent-encoded. A token in `?token=` must never reach a log file.
pub fn masked_target(uri: &http::Uri) -> String {
    let mut out = String::with_capacity(uri.path().len() + 16);
    push_escaped(&mut out, uri.path());
    if let Some(query) = uri.query() {
        out.push('?');
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            push_escaped(&mut out, key);
            if pair.contains('=') {
                out.push('=');
                if is_secret(key) {
                    out.push_str("redacted");
                } else {
                    push_escaped(&mut out, value);
                }
            }
        }
    }
    out
}

fn is_secret(raw_key: &str) -> bool {
    // Decoded first: `%74oken` is `token` to the server.
    let key: String = form_urlencoded::parse(raw_key.as_bytes())
        .next()
        .map(|(k, _)| k.to_ascii_lowercase())
        .unwrap_or_default();
    SECRET_KEYS.iter().any(|s| key.contains(s))
}

fn push_escaped(out: &mut String, s: &str) {
    for b in s.bytes() {
        if b.is_ascii_graphic() && b != b'"' && b != b'\\' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

enum Sink {
    Stderr,
    File(File),
}

impl Sink {
    fn open(target: &Target) -> io::Result<Self> {
        match target {
            Target::Stderr => Ok(Sink::Stderr),
            Target::File(path) => OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map(Sink::File)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Sink::Stderr => io::stderr().lock().write_all(buf),
            Sink::File(f) => f.write_all(buf),
        }
    }
}

/// The writer thread: what is waiting goes out in one write.
fn write_lines(rx: Receiver<String>, mut sink: Sink, target: Target, reopen: Arc<AtomicBool>) {
    let mut batch = String::new();
    let mut failing = false;
    while let Ok(first) = rx.recv() {
        batch.clear();
        batch.push_str(&first);
        while batch.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(line) => batch.push_str(&line),
                Err(_) => break,
            }
        }
        if reopen.swap(false, Relaxed) {
            match Sink::open(&target) {
                Ok(s) => sink = s,
                Err(e) => tracing::warn!("access log: cannot reopen: {e}; keeping the old file"),
            }
        }
        match sink.write_all(batch.as_bytes()) {
            Ok(()) => failing = false,
            // Said once per run of failures, not once per line.
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(
                    "access log: write failed: {e}; lines are lost until it works again"
                );
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_the_query_are_masked_and_the_rest_kept() {
        let uri: http::Uri = "/sse/chat?token=eyJhbGc.x.y&since=e1%3A5&API_KEY=k1&%74oken=t2&x"
            .parse()
            .unwrap_or_default();
        assert_eq!(
            masked_target(&uri),
            "/sse/chat?token=redacted&since=e1%3A5&API_KEY=redacted&%74oken=redacted&x"
        );
    }

    #[test]
    fn a_path_cannot_break_the_line() {
        let uri: http::Uri = "/ws/a%22b".parse().unwrap_or_default();
        assert_eq!(masked_target(&uri), "/ws/a%22b");
        let mut s = String::new();
        push_escaped(&mut s, "a\"b\\c d\u{e9}");
        assert_eq!(s, "a%22b%5Cc%20d%C3%A9");
    }
}
