//! Tidings against other people's clients: curl, the npm `eventsource` package, and Python's
//! httpx / httpx-sse (the programs in `tests/clients/`), each against a real server on port 0.
//!
//! These tests need the tools `scripts/test.sh` installs (curl, `.venv/` with httpx and
//! httpx-sse, `tests/clients/node_modules/`). A missing tool fails the test with a message that
//! says so; nothing is skipped silently.
//!
//! No test sleeps and then asserts: each waits (with a timeout) for a line on the client's
//! stdout or for its exit. The only pacing sleep is the background publisher's for the pollers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use common::TestServer;
use tidings_testkit::Proc;

const INSTALL_HINT: &str = "run scripts/test.sh once: it installs curl, the Python venv (.venv/) \
                            and the Node modules (tests/clients/node_modules/) these tests spawn";

// ---------------------------------------------------------------------------------------------
// Finding the tools
// ---------------------------------------------------------------------------------------------

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn clients_dir() -> PathBuf {
    let dir = std::env::var_os("TIDINGS_CLIENTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("tests/clients"));
    assert!(
        dir.join("README.md").is_file(),
        "no test clients in {}; {INSTALL_HINT}",
        dir.display()
    );
    dir
}

/// The venv's python, checked to import the libraries the clients use.
fn python() -> PathBuf {
    let python = std::env::var_os("TIDINGS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/python"));
    let ok = std::process::Command::new(&python)
        .args(["-c", "import httpx, httpx_sse"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} cannot import httpx and httpx_sse (set TIDINGS_PYTHON or {INSTALL_HINT})",
        python.display()
    );
    python
}

/// `node`, checked to be runnable, with the `eventsource` package installed next to the clients.
fn node() -> PathBuf {
    let node = PathBuf::from("node");
    let ok = std::process::Command::new(&node)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "`node` is not on PATH; {INSTALL_HINT}");
    let modules = std::env::var_os("TIDINGS_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| clients_dir().join("node_modules"));
    assert!(
        modules.join("eventsource/package.json").is_file(),
        "the npm package eventsource is not installed in {}; {INSTALL_HINT}",
        modules.display()
    );
    node
}

/// `curl -V`'s feature list, or a failure telling how to install curl.
fn curl_features() -> String {
    let out = std::process::Command::new("curl")
        .arg("-V")
        .output()
        .unwrap_or_else(|e| panic!("cannot run curl ({e}); {INSTALL_HINT}"));
    assert!(out.status.success(), "curl -V failed; {INSTALL_HINT}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn curl() -> Command {
    curl_features();
    let mut cmd = Command::new("curl");
    // Never let an http_proxy from the environment sit between curl and the test server.
    cmd.arg("--noproxy").arg("*");
    cmd
}

fn json_line(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"))
}

/// Checks an envelope's shape and returns `(channel, offset, data)`.
fn envelope(v: &Value) -> (String, u64, Value) {
    assert!(v["epoch"].is_string(), "no epoch in {v}");
    assert!(v["cursor"].is_string(), "no cursor in {v}");
    assert!(v["time"].is_u64(), "no time in {v}");
    (
        v["channel"]
            .as_str()
            .unwrap_or_else(|| panic!("no channel in {v}"))
            .to_owned(),
        v["offset"]
            .as_u64()
            .unwrap_or_else(|| panic!("no offset in {v}")),
        v["data"].clone(),
    )
}

// ---------------------------------------------------------------------------------------------
// A TCP proxy that can cut its connections, to drop a stream without restarting the server
// ---------------------------------------------------------------------------------------------

struct Proxy {
    url: String,
    shared: Arc<ProxyShared>,
    task: tokio::task::JoinHandle<()>,
}

struct ProxyShared {
    upstream: SocketAddr,
    /// Cancelled by `cut`: ends every connection accepted before it.
    generation: Mutex<CancellationToken>,
    /// `false` while down: new connections are accepted but held, unforwarded, until `restore`.
    up: watch::Sender<bool>,
    /// The request head (request line and headers) of each forwarded connection, in order.
    requests: Mutex<Vec<String>>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(ProxyShared {
            upstream,
            generation: Mutex::new(CancellationToken::new()),
            up: watch::channel(true).0,
            requests: Mutex::new(Vec::new()),
        });
        let task = tokio::spawn({
            let shared = shared.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let cut = shared.generation.lock().unwrap().clone();
                    tokio::spawn(forward(client, shared.clone(), cut));
                }
            }
        });
        Self { url, shared, task }
    }

    /// Closes every open connection, and holds new ones until `restore`: the server keeps
    /// running, but every client of the proxy is cut off from it.
    fn cut(&self) {
        self.shared.up.send_replace(false);
        let old = std::mem::take(&mut *self.shared.generation.lock().unwrap());
        old.cancel();
    }

    /// Lets held and new connections through again.
    fn restore(&self) {
        self.shared.up.send_replace(true);
    }

    fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.shared.generation.lock().unwrap().cancel();
    }
}

async fn forward(mut client: TcpStream, shared: Arc<ProxyShared>, cut: CancellationToken) {
    let mut up = shared.up.subscribe();
    let work = async move {
        if up.wait_for(|up| *up).await.is_err() {
            return;
        }
        // Read the request head first, to record it (the test checks `Last-Event-ID`).
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        shared
            .requests
            .lock()
            .unwrap()
            .push(String::from_utf8_lossy(&head).into_owned());
        let Ok(mut server) = TcpStream::connect(shared.upstream).await else {
            return;
        };
        if server.write_all(&head).await.is_err() {
            return;
        }
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    };
    // Dropping `work` closes both sockets.
    tokio::select! {
        biased;
        _ = cut.cancelled() => {}
        _ = work => {}
    }
}

/// The value of `header` (case-insensitive) in a recorded request head.
fn header_of(request: &str, header: &str) -> Option<String> {
    request.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case(header)
            .then(|| value.trim().to_owned())
    })
}

// ---------------------------------------------------------------------------------------------
// curl
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_follows_an_ndjson_stream_and_receives_what_is_published_after_it_connects() {
    let server = TestServer::spawn().await;
    server.publish("news", json!("before")).await;
    let mut cmd = curl();
    cmd.args(["-sN", &format!("{}/stream/news", server.url)]);
    let mut curl = Proc::spawn("curl (NDJSON)", cmd, INSTALL_HINT);
    let ready = curl.line_where("the ready record", |l| !l.is_empty()).await;
    let ready = json_line(&ready);
    assert_eq!(ready["type"], "ready", "the first record is {ready}");
    assert!(ready["cursor"].is_string(), "{ready}");

    let mut published = Vec::new();
    for i in 1..=3 {
        published.push(server.publish("news", json!({"n": i})).await);
    }
    for (i, position) in (1..=3).zip(&published) {
        // Empty lines are heartbeats.
        let line = curl.line_where("an envelope", |l| !l.is_empty()).await;
        let v = json_line(&line);
        assert_eq!(
            envelope(&v),
            ("news".to_owned(), i + 1, json!({"n": i})),
            "{line}"
        );
        assert_eq!(v["epoch"], position["epoch"]);
        assert!(v.get("event").is_none(), "no event was set: {line}");
    }
    curl.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reads_raw_sse_with_the_payload_exactly_as_published_and_an_id_line() {
    let server = TestServer::spawn().await;
    let mut cmd = curl();
    cmd.args(["-sNi", &format!("{}/sse/news", server.url)]);
    let mut curl = Proc::spawn("curl (raw SSE)", cmd, INSTALL_HINT);

    // Response head (-i), then the body.
    let status = curl.line().await;
    assert!(status.starts_with("HTTP/1.1 200"), "status line {status:?}");
    let mut headers = Vec::new();
    loop {
        let line = curl.line().await;
        if line.is_empty() {
            break;
        }
        headers.push(line.to_ascii_lowercase());
    }
    for expected in [
        "content-type: text/event-stream",
        "cache-control: no-cache",
        "x-accel-buffering: no",
    ] {
        assert!(
            headers.iter().any(|h| h.starts_with(expected)),
            "no {expected:?} among {headers:?}"
        );
    }
    let first = curl.line().await;
    assert!(
        first.starts_with("retry: "),
        "the stream must open with retry:, got {first:?}"
    );
    // The `id:`-only block sent right after the (empty) replay: the subscription is live.
    curl.line_where("the opening id: line", |l| l.starts_with("id: "))
        .await;

    let position = server.publish("news", json!({"title": "hi"})).await;
    let id = curl
        .line_where("the message's id: line", |l| l.starts_with("id: "))
        .await;
    let id = id.strip_prefix("id: ").unwrap();
    assert!(!id.is_empty() && !id.contains(' '), "id {id:?}");
    assert_eq!(curl.line().await, r#"data: {"title":"hi"}"#);
    assert_eq!(curl.line().await, "", "one data line, then the blank line");
    // The id resumes right after this message (it is a cursor of the same position).
    let (code, history) = server
        .get_json(&format!("/api/channels/news/history?since={id}"))
        .await;
    assert_eq!(code, 200, "{history}");
    assert_eq!(history["messages"], json!([]), "{history}");
    assert_eq!(position["offset"], 1);
    curl.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_http2_prior_knowledge_streams_over_h2c_on_the_same_port() {
    let features = curl_features();
    let supports_h2 = features
        .lines()
        .filter(|l| l.starts_with("Features:"))
        .any(|l| l.split_whitespace().any(|f| f == "HTTP2"));
    assert!(
        supports_h2,
        "this machine's curl has no HTTP/2 support (curl -V lists no HTTP2), so h2c cannot be \
         checked; install a curl built with nghttp2 (Debian's is)\n{features}"
    );
    let server = TestServer::spawn().await;
    let mut cmd = curl();
    cmd.args([
        "--http2-prior-knowledge",
        "-sNi",
        &format!("{}/stream/news", server.url),
    ]);
    let mut curl = Proc::spawn("curl (h2c NDJSON)", cmd, INSTALL_HINT);
    let status = curl.line().await;
    assert!(
        status.starts_with("HTTP/2 200"),
        "expected an HTTP/2 answer, got {status:?}"
    );
    let mut headers = Vec::new();
    loop {
        let line = curl.line().await;
        if line.is_empty() {
            break;
        }
        headers.push(line.to_ascii_lowercase());
    }
    assert!(
        headers
            .iter()
            .any(|h| h.starts_with("content-type: application/x-ndjson")),
        "{headers:?}"
    );
    let ready = json_line(&curl.line_where("the ready record", |l| !l.is_empty()).await);
    assert_eq!(ready["type"], "ready", "{ready}");
    for i in 1..=2 {
        server.publish("news", json!({"h2": i})).await;
    }
    for i in 1..=2 {
        let v = json_line(&curl.line_where("an envelope", |l| !l.is_empty()).await);
        assert_eq!(envelope(&v), ("news".to_owned(), i, json!({"h2": i})));
    }
    curl.kill().await;
}

// ---------------------------------------------------------------------------------------------
// Node `eventsource`: the library's own reconnect with Last-Event-ID
// ---------------------------------------------------------------------------------------------

fn eventsource_client(url: &str, channel: &str, count: usize) -> Proc {
    let mut cmd = Command::new(node());
    cmd.arg(clients_dir().join("sse_reconnect.mjs"))
        .arg(url)
        .arg(channel)
        .arg(count.to_string());
    Proc::spawn("node sse_reconnect.mjs (eventsource)", cmd, INSTALL_HINT)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventsource_reconnects_by_itself_with_last_event_id_and_receives_every_missed_message() {
    let server = TestServer::spawn().await;
    let proxy = Proxy::start(server.addr).await;
    let mut client = eventsource_client(&proxy.url, "news", 6);
    assert_eq!(json_line(&client.line().await), json!({"open": true}));

    for i in 1..=3 {
        server.publish("news", json!({"n": i})).await;
    }
    let mut last_id = String::new();
    for i in 1..=3 {
        let v = json_line(&client.line().await);
        assert_eq!(v["data"], json!({"n": i}).to_string(), "{v}");
        last_id = v["id"].as_str().unwrap().to_owned();
    }

    // Drop the connection under the client; publish while it cannot be connected.
    proxy.cut();
    for i in 4..=6 {
        server.publish("news", json!({"n": i})).await;
    }
    proxy.restore();

    let lines = client.finish_ok().await;
    let opens = lines.iter().filter(|l| *l == r#"{"open":true}"#).count();
    assert_eq!(opens, 2, "one open, one reopen:\n{}", lines.join("\n"));
    let data: Vec<Value> = lines
        .iter()
        .map(|l| json_line(l))
        .filter(|v| v.get("data").is_some())
        .map(|v| v["data"].clone())
        .collect();
    let expected: Vec<Value> = (1..=6)
        .map(|i| json!(json!({"n": i}).to_string()))
        .collect();
    assert_eq!(
        data,
        expected,
        "every message exactly once, in order:\n{}",
        lines.join("\n")
    );
    assert!(
        !lines.iter().any(|l| l.contains("\"gap\"")),
        "no gap expected: {lines:?}"
    );

    // The second request carried the id of the last message received before the cut.
    let requests = proxy.requests();
    assert_eq!(requests.len(), 2, "{requests:#?}");
    assert_eq!(header_of(&requests[0], "last-event-id"), None);
    assert_eq!(
        header_of(&requests[1], "last-event-id").as_deref(),
        Some(last_id.as_str()),
        "{}",
        requests[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventsource_gets_a_gap_event_then_what_history_kept_when_it_fell_too_far_behind() {
    let server = TestServer::with(|c| c.channels.history_size = 2).await;
    let proxy = Proxy::start(server.addr).await;
    let mut client = eventsource_client(&proxy.url, "news", 3);
    assert_eq!(json_line(&client.line().await), json!({"open": true}));

    // JSON data: raw SSE carries its JSON text.
    let first = server.publish("news", json!({"m": 1})).await;
    let v = json_line(&client.line().await);
    assert_eq!(v["data"], r#"{"m":1}"#, "{v}");

    proxy.cut();
    for i in 2..=6 {
        server.publish("news", json!({"m": i})).await;
    }
    proxy.restore();

    let lines = client.finish_ok().await;
    let after_first: Vec<Value> = lines.iter().skip(2).map(|l| json_line(l)).collect();
    assert_eq!(
        after_first.len(),
        4,
        "reopen, gap, two messages:\n{}",
        lines.join("\n")
    );
    assert_eq!(after_first[0], json!({"open": true}));
    assert_eq!(
        after_first[1],
        json!({"gap": {
            "channel": "news",
            "epoch": first["epoch"],
            "next_offset": 5,
            "reason": "trimmed",
        }}),
        "{}",
        lines.join("\n")
    );
    assert_eq!(after_first[2]["data"], r#"{"m":5}"#);
    assert_eq!(after_first[3]["data"], r#"{"m":6}"#);
}

// ---------------------------------------------------------------------------------------------
// Python httpx: long poll, short poll, multi-channel SSE with httpx-sse
// ---------------------------------------------------------------------------------------------

fn python_client(script: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new(python());
    cmd.arg("-u").arg(clients_dir().join(script)).args(args);
    Proc::spawn(&format!("python {script}"), cmd, INSTALL_HINT)
}

/// Publishes 1, 2, 3… to `channel` (data = the number, so data = offset on a fresh channel)
/// until the poller has printed `count` messages and exited; checks it received a run of
/// consecutive offsets, each once, nothing else.
async fn poller_receives_a_consecutive_run(script: &str, count: usize) {
    let server = TestServer::spawn().await;
    let mut client = python_client(script, &[&server.url, "news", &count.to_string()]);
    let publishing = async {
        // Bounded only so the future has an end; the client's own timeout ends it much sooner.
        for i in 1..=5_000u64 {
            server.publish("news", json!(i)).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let lines = tokio::select! {
        lines = client.finish_ok() => lines,
        () = publishing => panic!("{script} never finished\n{}", client.context()),
    };
    assert_eq!(lines.len(), count, "{}", lines.join("\n"));
    let got: Vec<(String, u64, Value)> = lines.iter().map(|l| envelope(&json_line(l))).collect();
    let first = got[0].1;
    let expected: Vec<(String, u64, Value)> = (first..first + count as u64)
        .map(|o| ("news".to_owned(), o, json!(o)))
        .collect();
    assert_eq!(
        got,
        expected,
        "consecutive offsets, each once:\n{}",
        lines.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_httpx_long_poll_loop_receives_a_continuous_run_without_loss_or_duplicates() {
    poller_receives_a_consecutive_run("long_poll_httpx.py", 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_httpx_short_poll_loop_receives_a_continuous_run_without_loss_or_duplicates() {
    poller_receives_a_consecutive_run("short_poll_httpx.py", 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httpx_sse_receives_envelopes_from_two_channels_in_order_with_cursor_ids() {
    let server = TestServer::spawn().await;
    let mut client = python_client("sse_httpx.py", &[&server.url, "10", "a", "b"]);
    // Sent once the response head arrived: the server subscribes before answering.
    assert_eq!(json_line(&client.line().await), json!({"open": true}));
    for i in 1..=5 {
        server.publish("a", json!({"a": i})).await;
        server.publish("b", json!(format!("b{i}"))).await;
    }
    let lines = client.finish_ok().await;
    let events: Vec<Value> = lines.iter().skip(1).map(|l| json_line(l)).collect();
    assert_eq!(events.len(), 10, "{}", lines.join("\n"));
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    for e in &events {
        assert_eq!(e["event"], "message", "{e}");
        assert_eq!(
            e["id"], e["data"]["cursor"],
            "the SSE id is the cursor: {e}"
        );
        let (channel, offset, data) = envelope(&e["data"]);
        match channel.as_str() {
            "a" => got_a.push((offset, data)),
            "b" => got_b.push((offset, data)),
            other => panic!("a message on channel {other}: {e}"),
        }
    }
    assert_eq!(
        got_a,
        (1..=5).map(|i| (i, json!({"a": i}))).collect::<Vec<_>>()
    );
    assert_eq!(
        got_b,
        (1..=5)
            .map(|i| (i, json!(format!("b{i}"))))
            .collect::<Vec<_>>()
    );
    // Each id is a cursor for both channels: reading on from the last one misses nothing.
    let last = events.last().unwrap()["id"].as_str().unwrap().to_owned();
    server.publish("a", json!("after")).await;
    for (channel, expected) in [("a", json!(["after"])), ("b", json!([]))] {
        let (code, history) = server
            .get_json(&format!("/api/channels/{channel}/history?since={last}"))
            .await;
        assert_eq!(code, 200, "{history}");
        let data: Vec<Value> = history["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["data"].clone())
            .collect();
        assert_eq!(json!(data), expected, "{channel}: {history}");
    }
}
