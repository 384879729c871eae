//! Allocations per request on the server side (issue 17: "≤ 5 each"), counted by a global
//! allocator that counts only on the server's thread. A bench binary, not a test: it prints
//! numbers and asserts nothing.
//!
//! ```text
//! CARGO_TARGET_DIR=target/alloc cargo run --release --manifest-path bench/alloc/Cargo.toml [-- ROUNDS]
//! ```
//!
//! The server runs in this process on a current-thread runtime of its own thread (the only
//! thread whose allocations are counted); the client is plain blocking `std::net` on the
//! main thread, over keep-alive connections on loopback, so none of its work is counted.
//! Cells:
//! - `publish`: one `POST /publish/{channel}` with a 100-byte text body, no subscriber;
//! - `long-poll round trip`: a held `GET /poll/{channel}?wait=10` answered by one publish
//!   from a second connection — the counts are for both requests together, and the line
//!   below subtracts a plain publish to give the poll's own share;
//! - `… resuming from its cursor`: the same, each poll with `&since=` the cursor (`ETag`) of
//!   the answer before it, as a long-poll client (`tidings bench`, the JS client) polls.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tidings_server::transport::TransportKind;
use tidings_server::{AppState, Config};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

static TRACING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

thread_local! {
    static COUNTED: Cell<bool> = const { Cell::new(false) };
    static IN_TRACE: Cell<bool> = const { Cell::new(false) };
}

fn count(size: usize) {
    if COUNTED.with(Cell::get) {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(size as u64, Relaxed);
        if TRACING.load(Relaxed) && !IN_TRACE.with(|t| t.replace(true)) {
            trace(size);
            IN_TRACE.with(|t| t.set(false));
        }
    }
}

/// `ALLOC_TRACE=1`: where each counted allocation of one traced request comes from (the
/// first frames of this workspace's code, and the frame that allocated).
fn trace(size: usize) {
    let bt = std::backtrace::Backtrace::force_capture().to_string();
    let frames: Vec<&str> = bt
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("at ") && l.contains(": "))
        .map(|l| l.split_once(": ").map_or(l, |(_, f)| f))
        .filter(|f| {
            !f.starts_with("std::")
                && !f.starts_with("alloc::")
                && !f.starts_with("core::")
                && !f.starts_with("tidings_alloc_count::")
                && !f.starts_with("<tidings_alloc_count")
                && !f.starts_with("__rustc")
        })
        .take(std::env::var("ALLOC_FRAMES").ok().and_then(|v| v.parse().ok()).unwrap_or(6))
        .collect();
    eprintln!("{size:6} B  {}", frames.join("  <  "));
}

// SAFETY: every call is forwarded to `System` unchanged; counting touches only atomics and
// a const-initialised thread-local (neither allocates).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn snapshot() -> (u64, u64) {
    (ALLOCS.load(Relaxed), BYTES.load(Relaxed))
}

/// Reads one HTTP/1.1 response with a `content-length` (all the cells answer with one).
fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> String {
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let out = String::from_utf8_lossy(&buf[..end + 4 + len]).into_owned();
                buf.drain(..end + 4 + len);
                return out;
            }
        }
        let n = s.read(&mut chunk).unwrap_or(0);
        assert!(n > 0, "the server closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn main() {
    let rounds: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (state_tx, state_rx) = std::sync::mpsc::channel::<AppState>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async move {
            let mut config = Config::default();
            config.server.listen = "127.0.0.1:0".into();
            let state = AppState::new(config).expect("a memory-broker state");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("binding loopback");
            addr_tx
                .send(listener.local_addr().expect("an address"))
                .expect("main waits");
            state_tx.send(state.clone()).expect("main waits");
            COUNTED.with(|c| c.set(true));
            let _ = tidings_server::serve(state, listener, std::future::pending()).await;
        });
    });
    let addr = addr_rx.recv().expect("the server's address");
    let state = state_rx.recv().expect("the server's state");
    let body = "x".repeat(100);
    let publish = format!(
        "POST /publish/bench HTTP/1.1\r\nhost: bench\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let poll = "GET /poll/bench?wait=10 HTTP/1.1\r\nhost: bench\r\n\r\n";
    let mut publisher = TcpStream::connect(addr).expect("connecting");
    let mut poller = TcpStream::connect(addr).expect("connecting");
    let _ = publisher.set_nodelay(true);
    let _ = poller.set_nodelay(true);
    let mut buf = Vec::new();

    // Publish: warm up (channel created, buffers sized), then count.
    for _ in 0..100 {
        publisher.write_all(publish.as_bytes()).expect("writing");
        read_response(&mut publisher, &mut buf);
    }
    let before = snapshot();
    for _ in 0..rounds {
        publisher.write_all(publish.as_bytes()).expect("writing");
        let res = read_response(&mut publisher, &mut buf);
        assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    }
    let after = snapshot();
    if std::env::var_os("ALLOC_TRACE").is_some() {
        eprintln!("--- one publish");
        TRACING.store(true, Relaxed);
        publisher.write_all(publish.as_bytes()).expect("writing");
        read_response(&mut publisher, &mut buf);
        TRACING.store(false, Relaxed);
    }
    let publish_allocs = (after.0 - before.0) as f64 / rounds as f64;
    let publish_bytes = (after.1 - before.1) as f64 / rounds as f64;
    println!("publish                 {publish_allocs:6.1} allocations  {publish_bytes:8.0} bytes per request");

    // Long-poll round trip: the poll is held (its session counted), then a publish answers it.
    let held = || state.metrics.connections[TransportKind::LongPoll as usize].load(Relaxed);
    let round = |poller: &mut TcpStream,
                 publisher: &mut TcpStream,
                 buf: &mut Vec<u8>,
                 poll: &str|
     -> String {
        poller.write_all(poll.as_bytes()).expect("writing");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while held() == 0 {
            assert!(std::time::Instant::now() < deadline, "the poll was never held");
            std::thread::yield_now();
        }
        publisher.write_all(publish.as_bytes()).expect("writing");
        read_response(publisher, buf);
        let res = read_response(poller, buf);
        assert!(res.starts_with("HTTP/1.1 200") && res.contains("xxxx"), "{res}");
        while held() != 0 {
            std::thread::yield_now();
        }
        res
    };
    for _ in 0..100 {
        round(&mut poller, &mut publisher, &mut buf, poll);
    }
    let before = snapshot();
    for _ in 0..rounds {
        round(&mut poller, &mut publisher, &mut buf, poll);
    }
    let after = snapshot();
    if std::env::var_os("ALLOC_TRACE").is_some() {
        eprintln!("--- one long-poll round trip");
        TRACING.store(true, Relaxed);
        round(&mut poller, &mut publisher, &mut buf, poll);
        TRACING.store(false, Relaxed);
    }
    let trip_allocs = (after.0 - before.0) as f64 / rounds as f64;
    let trip_bytes = (after.1 - before.1) as f64 / rounds as f64;
    println!("long-poll round trip    {trip_allocs:6.1} allocations  {trip_bytes:8.0} bytes (poll + the publish that answers it)");
    println!(
        "  of which the poll     {:6.1} allocations  {:8.0} bytes",
        trip_allocs - publish_allocs,
        trip_bytes - publish_bytes
    );

    // The same, resuming: each poll names the cursor its last answer gave (the client
    // builds the text, uncounted).
    let resuming = |res: &str| {
        let etag = res
            .lines()
            .find_map(|l| l.strip_prefix("etag: "))
            .expect("a poll answer has an ETag");
        format!(
            "GET /poll/bench?wait=10&since={} HTTP/1.1\r\nhost: bench\r\n\r\n",
            etag.trim().trim_matches('"')
        )
    };
    let mut next = resuming(&round(&mut poller, &mut publisher, &mut buf, poll));
    for _ in 0..100 {
        next = resuming(&round(&mut poller, &mut publisher, &mut buf, &next));
    }
    let before = snapshot();
    for _ in 0..rounds {
        next = resuming(&round(&mut poller, &mut publisher, &mut buf, &next));
    }
    let after = snapshot();
    if std::env::var_os("ALLOC_TRACE").is_some() {
        eprintln!("--- one long-poll round trip resuming from its cursor");
        TRACING.store(true, Relaxed);
        round(&mut poller, &mut publisher, &mut buf, &next);
        TRACING.store(false, Relaxed);
    }
    let allocs = (after.0 - before.0) as f64 / rounds as f64;
    let bytes = (after.1 - before.1) as f64 / rounds as f64;
    println!("long-poll, resuming     {allocs:6.1} allocations  {bytes:8.0} bytes (the same, since= the last answer's ETag)");
    println!(
        "  of which the poll     {:6.1} allocations  {:8.0} bytes",
        allocs - publish_allocs,
        bytes - publish_bytes
    );
}
