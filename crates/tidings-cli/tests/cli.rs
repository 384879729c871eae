//! The `tidings` binary end to end: `serve` on port 0 (its address read from stderr), then
//! `publish`, `subscribe` over every transport, and `config` against it, as a user would run them.
//!
//! Every wait is bounded (`WAIT`), and each one waits for an event (a line on a pipe, an exit),
//! never for a fixed time. Every process is killed when its handle is dropped, so a failing test
//! leaves no server behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tidings_testkit::{Proc, Served, cli};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The longest any single wait (a line, an exit) may take before the test fails.
const WAIT: Duration = Duration::from_secs(20);

/// `tidings` with a clean environment: no `TIDINGS_*` variable of the caller leaks in.
fn tidings() -> Command {
    tidings_testkit::command(env!("CARGO_BIN_EXE_tidings"))
}

/// Runs `tidings ARGS` to completion (stdin from `input` when given), within `WAIT`.
async fn run(args: &[&str], input: Option<&str>) -> Output {
    cli::run(
        env!("CARGO_BIN_EXE_tidings"),
        args,
        input.map(str::as_bytes),
        WAIT,
    )
    .await
}

fn text(bytes: &[u8]) -> String {
    cli::text(bytes)
}

/// Runs `tidings ARGS`, expecting success; returns stdout.
async fn run_ok(args: &[&str], input: Option<&str>) -> String {
    cli::succeeded(args, &run(args, input).await)
}

/// Runs `tidings ARGS`, expecting failure; returns stderr.
async fn run_err(args: &[&str]) -> String {
    cli::failed(args, &run(args, None).await, false)
}

// ---------------------------------------------------------------------------------------------
// `tidings serve`
// ---------------------------------------------------------------------------------------------

/// A running `tidings serve` (`tidings_testkit::Served`: killed when dropped).
struct Server {
    served: Served,
    url: String,
    http: reqwest::Client,
}

impl Server {
    /// `tidings serve --listen 127.0.0.1:0`; returns once it printed its address.
    async fn start() -> Self {
        Self::start_with(&["serve", "--listen", "127.0.0.1:0"]).await
    }

    async fn start_with(args: &[&str]) -> Self {
        let mut cmd = tidings();
        cmd.args(args).stdout(Stdio::null());
        let served = Served::listening(cmd, WAIT).await;
        let url = served.url.clone();
        assert!(url.starts_with("http://"), "{url}");
        Self {
            served,
            url,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    async fn get_json(&self, path: &str) -> (u16, Value) {
        let res = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.served.log()));
        let status = res.status().as_u16();
        let body = res.text().await.unwrap();
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    /// `tidings publish CHANNEL DATA --url URL`; returns the printed position.
    async fn publish(&self, channel: &str, data: &str) -> Value {
        let out = run_ok(&["publish", channel, data, "--url", &self.url], None).await;
        parse_one_line(&out)
    }
}

fn parse_one_line(out: &str) -> Value {
    assert_eq!(out.lines().count(), 1, "one line expected: {out:?}");
    serde_json::from_str(out.trim_end()).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_prints_the_address_it_listens_on_and_answers_there() {
    let server = Server::start().await;
    let res = server
        .http
        .get(format!("{}/healthz", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let port: u16 = server.url.rsplit(':').next().unwrap().parse().unwrap();
    assert_ne!(
        port, 0,
        "the real port, not the requested 0: {}",
        server.url
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_open_mode_on_a_non_loopback_address_without_insecure() {
    let stderr = run_err(&["serve", "--listen", "0.0.0.0:0"]).await;
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0")
            && stderr.contains("open mode")
            && stderr.contains("--insecure"),
        "{stderr}"
    );
    assert!(!stderr.contains("tidings listening on"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_insecure_accepts_open_mode_on_a_non_loopback_address() {
    let server = Server::start_with(&["serve", "--listen", "0.0.0.0:0", "--insecure"]).await;
    let port = server.url.rsplit(':').next().unwrap();
    assert!(server.url.starts_with("http://0.0.0.0:"), "{}", server.url);
    let res = server
        .http
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

// ---------------------------------------------------------------------------------------------
// `tidings publish`
// ---------------------------------------------------------------------------------------------

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_prints_the_position_of_the_message_as_one_json_line() {
    let server = Server::start().await;
    let before = now_ms();
    let first = server.publish("news", r#"{"title":"hi"}"#).await;
    let after = now_ms();
    assert_eq!(first["channel"], "news", "{first}");
    assert_eq!(first["offset"], 1, "{first}");
    assert!(
        first["epoch"].as_str().is_some_and(|e| !e.is_empty()),
        "{first}"
    );
    let cursor = first["cursor"].as_str().unwrap();
    assert!(
        !cursor.is_empty() && cursor.bytes().all(|b| b.is_ascii_graphic() && b != b','),
        "a URL-safe cursor: {first}"
    );
    let time = first["time"].as_u64().unwrap();
    assert!(
        before <= time && time <= after,
        "{time} not in {before}..={after}"
    );
    let second = server.publish("news", r#"{"title":"again"}"#).await;
    assert_eq!(second["offset"], 2);
    assert_eq!(second["epoch"], first["epoch"]);
    let (_, history) = server.get_json("/api/channels/news/history").await;
    assert_eq!(history["messages"][0]["data"], json!({"title": "hi"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_with_a_dash_reads_the_message_from_stdin() {
    let server = Server::start().await;
    let out = run_ok(
        &["publish", "news", "-", "--url", &server.url],
        Some("{\"title\": \"from stdin\"}\n"),
    )
    .await;
    let position = parse_one_line(&out);
    assert_eq!(
        (position["channel"].clone(), position["offset"].clone()),
        (json!("news"), json!(1))
    );
    let out = run_ok(
        &["publish", "news", "-", "--url", &server.url],
        Some("plain text\n"),
    )
    .await;
    assert_eq!(parse_one_line(&out)["offset"], 2);
    let (_, history) = server.get_json("/api/channels/news/history").await;
    let data: Vec<Value> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"].clone())
        .collect();
    // JSON stays JSON; text loses the newline the shell added.
    assert_eq!(data, [json!({"title": "from stdin"}), json!("plain text")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_to_an_invalid_channel_name_fails_with_the_servers_message() {
    let server = Server::start().await;
    let out = run(&["publish", "bad name!", "x", "--url", &server.url], None).await;
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("400")
            && stderr.contains("invalid_channel")
            && stderr.contains(r#"invalid channel name "bad name!""#),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// `tidings subscribe`
// ---------------------------------------------------------------------------------------------

/// A running `tidings subscribe`, read line by line; killed when dropped.
fn subscriber(args: &[&str]) -> Proc {
    let mut cmd = tidings();
    cmd.arg("subscribe").args(args);
    Proc::spawn("tidings subscribe", cmd, "it is built with the tests")
}

/// Each printed line must be the envelope of the matching publish: same channel, offset,
/// epoch and time, and data equal to what was published.
fn assert_envelopes(lines: &[String], published: &[(Value, Value)]) {
    assert_eq!(
        lines.len(),
        published.len(),
        "exactly {} lines:\n{}",
        published.len(),
        lines.join("\n")
    );
    for (line, (position, data)) in lines.iter().zip(published) {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not an NDJSON line ({e}): {line:?}"));
        for key in ["channel", "offset", "epoch", "time"] {
            assert_eq!(v[key], position[key], "{key} of {line}");
        }
        assert!(v["cursor"].is_string(), "{line}");
        assert_eq!(&v["data"], data, "{line}");
        assert!(
            v.get("type").is_none(),
            "a control record among messages: {line}"
        );
    }
}

/// Publishes `{"n":1..=count}` to `news`; returns (position, data) per message.
async fn publish_numbered(
    server: &Server,
    range: std::ops::RangeInclusive<u64>,
) -> Vec<(Value, Value)> {
    let mut out = Vec::new();
    for i in range {
        let data = json!({ "n": i });
        out.push((server.publish("news", &data.to_string()).await, data));
    }
    out
}

fn transport_args(transport: &str) -> Vec<&str> {
    let mut args = vec!["--transport", transport];
    if transport == "poll" {
        // The default interval of 1 s would only make the test slow.
        args.extend(["--interval", "100ms"]);
    }
    args
}

/// 3 messages from `--history 3`, then 2 published live, then the exit at `--count 5`.
async fn subscribe_replays_history_then_prints_live_messages(transport: &str) {
    let server = Server::start().await;
    let mut published = publish_numbered(&server, 1..=3).await;
    let mut args = vec![
        "news",
        "--history",
        "3",
        "--count",
        "5",
        "--url",
        &server.url,
    ];
    args.extend(transport_args(transport));
    let mut sub = subscriber(&args);
    sub.wait_for_lines(3).await;
    assert_envelopes(&sub.seen, &published);
    if matches!(transport, "ws" | "sse" | "stream") {
        // A stream or WebSocket counts as a subscriber while it is open (a poll only while a
        // request is held); having replayed history, it is live.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (status, channel) = server.get_json("/api/channels/news").await;
            assert_eq!(status, 200, "{channel}");
            if channel["subscribers"] == 1 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the subscriber never showed in {channel}\n{}",
                sub.context()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    published.extend(publish_numbered(&server, 4..=5).await);
    let lines = sub.finish_ok().await;
    assert_envelopes(&lines, &published);
}

/// `--since` the cursor of message 1 prints messages 2 and 3 and nothing else.
async fn subscribe_since_a_cursor_prints_exactly_what_followed_it(transport: &str) {
    let server = Server::start().await;
    let published = publish_numbered(&server, 1..=3).await;
    let since = published[0].0["cursor"].as_str().unwrap().to_owned();
    let mut args = vec![
        "news",
        "--since",
        &since,
        "--count",
        "2",
        "--url",
        &server.url,
    ];
    args.extend(transport_args(transport));
    let lines = subscriber(&args).finish_ok().await;
    assert_envelopes(&lines, &published[1..]);
}

/// 3 messages from `--history 3`; then the connection is cut under the subscriber and 3 more are
/// published while it cannot reach the server; it must reconnect by itself and print all 6,
/// each once, in order.
async fn subscribe_reconnects_by_itself_and_resumes_without_loss(transport: &str) {
    let server = Server::start().await;
    let proxy = Proxy::start(&server.url).await;
    let mut published = publish_numbered(&server, 1..=3).await;
    let mut args = vec![
        "news",
        "--history",
        "3",
        "--count",
        "6",
        "--url",
        &proxy.url,
    ];
    args.extend(transport_args(transport));
    let mut sub = subscriber(&args);
    sub.wait_for_lines(3).await;
    proxy.cut();
    published.extend(publish_numbered(&server, 4..=6).await);
    proxy.restore();
    let lines = sub.finish_ok().await;
    assert_envelopes(&lines, &published);
    let connections = proxy.connections();
    assert!(
        connections >= 2,
        "the subscriber never reconnected ({connections} connection(s))\n{}",
        sub.context()
    );
}

/// Two node URLs (two proxies in front of one server, standing for two nodes of one
/// deployment): the subscriber starts on the first; that one goes away for good after 3
/// messages; it must move to the second with its cursor and print all 6, each once, in order.
async fn subscribe_moves_to_the_next_node_url_and_resumes_from_its_cursor(transport: &str) {
    let server = Server::start().await;
    let first = Proxy::start(&server.url).await;
    let second = Proxy::start(&server.url).await;
    let mut published = publish_numbered(&server, 1..=3).await;
    let urls = format!("{},{}", first.url, second.url);
    let mut args = vec!["news", "--history", "3", "--count", "6", "--url", &urls];
    args.extend(transport_args(transport));
    let mut sub = subscriber(&args);
    sub.wait_for_lines(3).await;
    first.stop();
    published.extend(publish_numbered(&server, 4..=6).await);
    let lines = sub.finish_ok().await;
    assert_envelopes(&lines, &published);
    assert!(
        second.connections() >= 1,
        "the subscriber never tried the second URL\n{}",
        sub.context()
    );
}

macro_rules! per_transport {
    ($($test:ident: $scenario:ident($transport:literal);)+) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                $scenario($transport).await;
            }
        )+
    };
}

per_transport! {
    subscribe_over_ws_replays_history_then_prints_live_messages_as_ndjson:
        subscribe_replays_history_then_prints_live_messages("ws");
    subscribe_over_ws_since_a_cursor_prints_exactly_what_followed_it:
        subscribe_since_a_cursor_prints_exactly_what_followed_it("ws");
    subscribe_over_ws_reconnects_by_itself_and_resumes_without_loss:
        subscribe_reconnects_by_itself_and_resumes_without_loss("ws");
    subscribe_over_sse_replays_history_then_prints_live_messages_as_ndjson:
        subscribe_replays_history_then_prints_live_messages("sse");
    subscribe_over_stream_replays_history_then_prints_live_messages_as_ndjson:
        subscribe_replays_history_then_prints_live_messages("stream");
    subscribe_over_long_poll_replays_history_then_prints_live_messages_as_ndjson:
        subscribe_replays_history_then_prints_live_messages("long-poll");
    subscribe_over_poll_replays_history_then_prints_live_messages_as_ndjson:
        subscribe_replays_history_then_prints_live_messages("poll");
    subscribe_over_sse_since_a_cursor_prints_exactly_what_followed_it:
        subscribe_since_a_cursor_prints_exactly_what_followed_it("sse");
    subscribe_over_stream_since_a_cursor_prints_exactly_what_followed_it:
        subscribe_since_a_cursor_prints_exactly_what_followed_it("stream");
    subscribe_over_long_poll_since_a_cursor_prints_exactly_what_followed_it:
        subscribe_since_a_cursor_prints_exactly_what_followed_it("long-poll");
    subscribe_over_poll_since_a_cursor_prints_exactly_what_followed_it:
        subscribe_since_a_cursor_prints_exactly_what_followed_it("poll");
    subscribe_over_sse_reconnects_by_itself_and_resumes_without_loss:
        subscribe_reconnects_by_itself_and_resumes_without_loss("sse");
    subscribe_over_stream_reconnects_by_itself_and_resumes_without_loss:
        subscribe_reconnects_by_itself_and_resumes_without_loss("stream");
    subscribe_over_long_poll_reconnects_by_itself_and_resumes_without_loss:
        subscribe_reconnects_by_itself_and_resumes_without_loss("long-poll");
    subscribe_over_poll_reconnects_by_itself_and_resumes_without_loss:
        subscribe_reconnects_by_itself_and_resumes_without_loss("poll");
    subscribe_over_sse_moves_to_the_next_node_url_and_resumes_from_its_cursor:
        subscribe_moves_to_the_next_node_url_and_resumes_from_its_cursor("sse");
    subscribe_over_ws_moves_to_the_next_node_url_and_resumes_from_its_cursor:
        subscribe_moves_to_the_next_node_url_and_resumes_from_its_cursor("ws");
    subscribe_over_long_poll_moves_to_the_next_node_url_and_resumes_from_its_cursor:
        subscribe_moves_to_the_next_node_url_and_resumes_from_its_cursor("long-poll");
}

// ---------------------------------------------------------------------------------------------
// A TCP proxy that can cut its connections: a dropped connection without a server restart
// (a restart would start a new epoch)
// ---------------------------------------------------------------------------------------------

struct Proxy {
    url: String,
    shared: Arc<ProxyShared>,
    task: tokio::task::JoinHandle<()>,
}

struct ProxyShared {
    upstream: String,
    /// Cancelled by `cut`: ends every connection accepted before it.
    generation: Mutex<CancellationToken>,
    /// `false` while cut: new connections are accepted but held, unforwarded, until `restore`.
    up: watch::Sender<bool>,
    /// Set by `stop`: every connection is closed as soon as it is accepted.
    gone: std::sync::atomic::AtomicBool,
    connections: AtomicUsize,
}

impl Proxy {
    async fn start(server_url: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(ProxyShared {
            upstream: server_url.strip_prefix("http://").unwrap().to_owned(),
            generation: Mutex::new(CancellationToken::new()),
            up: watch::channel(true).0,
            gone: std::sync::atomic::AtomicBool::new(false),
            connections: AtomicUsize::new(0),
        });
        let task = tokio::spawn({
            let shared = shared.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    if shared.gone.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let cut = shared.generation.lock().unwrap().clone();
                    tokio::spawn(forward(client, shared.clone(), cut));
                }
            }
        });
        Self { url, shared, task }
    }

    /// Closes every open connection and holds new ones until `restore`.
    fn cut(&self) {
        self.shared.up.send_replace(false);
        std::mem::take(&mut *self.shared.generation.lock().unwrap()).cancel();
    }

    /// The node goes away for good: every open connection is closed and every new one is closed
    /// as soon as it is accepted, as a stopped server's would be refused. (`cut` holds new
    /// connections instead, which is a hung node: a client's retry on the same URL, such as
    /// hyper's replay of a request on a pooled connection that was closed under it, would then
    /// wait for its whole request timeout.)
    fn stop(&self) {
        self.shared.gone.store(true, Ordering::SeqCst);
        self.cut();
    }

    fn restore(&self) {
        self.shared.up.send_replace(true);
    }

    /// Connections forwarded to the server so far.
    fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
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
        let Ok(mut server) = TcpStream::connect(&shared.upstream).await else {
            return;
        };
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    };
    // Dropping `work` closes both sockets.
    tokio::select! {
        biased;
        _ = cut.cancelled() => {}
        _ = work => {}
    }
}

/// A server whose `long_poll_max_wait` is below the subscriber's `--wait` (30 s by default)
/// holds each poll for its own maximum instead of refusing it: the subscriber keeps polling
/// and prints what is published, as against any other server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_over_long_poll_works_against_a_server_with_a_lower_long_poll_max_wait() {
    let config = TempFile::new("short-wait.toml", "[server]\nlong_poll_max_wait = \"1s\"\n");
    let server = Server::start_with(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--config",
        config.path(),
    ])
    .await;
    let (status, reply) = server.get_json("/poll/news?wait=30").await;
    assert_eq!(status, 200, "{reply}");
    let mut sub = subscriber(&[
        "news",
        "--transport",
        "long-poll",
        "--count",
        "2",
        "--url",
        &server.url,
    ]);
    // Held (and re-held) by the server: the subscriber is waiting, not gone.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = server
            .http
            .get(format!("{}/metrics", server.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("tidings_connections{transport=\"long_poll\"} 1") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the long poll was never held\n{}",
            sub.context()
        );
        tokio::task::yield_now().await;
    }
    let published = publish_numbered(&server, 1..=2).await;
    let lines = sub.finish_ok().await;
    assert_envelopes(&lines, &published);
}

// ---------------------------------------------------------------------------------------------
// `tidings config`
// ---------------------------------------------------------------------------------------------

/// A file under the temp dir with a name no other test (or run) uses; removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "tidings-cli-test-{}-{nanos}-{}-{name}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn default_config() -> String {
    let out = run_ok(&["config", "default"], None).await;
    for table in ["[server]", "[broker]", "[auth]", "[channels]"] {
        assert!(out.contains(table), "no {table} in\n{out}");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_default_output_passes_config_check() {
    let file = TempFile::new("default.toml", &default_config().await);
    let out = run_ok(&["config", "check", file.path()], None).await;
    assert!(out.starts_with("ok: "), "{out}");
    // The global --config flag names the file too.
    run_ok(&["--config", file.path(), "config", "check"], None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_check_rejects_an_unknown_key_and_names_it() {
    let config = default_config().await.replacen(
        "[server]\n",
        "[server]\nlisten_adress = \"127.0.0.1:9\"\n",
        1,
    );
    let file = TempFile::new("typo.toml", &config);
    let stderr = run_err(&["config", "check", file.path()]).await;
    assert!(stderr.contains("listen_adress"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_check_applies_environment_overrides_and_rejects_a_bad_listen_address() {
    let file = TempFile::new("env.toml", &default_config().await);
    let mut cmd = tidings();
    cmd.args(["config", "check", file.path()])
        .env("TIDINGS_SERVER__LISTEN", "nowhere");
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("config check did not exit")
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "accepted listen = nowhere: {}",
        text(&out.stdout)
    );
    assert!(
        stderr.contains("server.listen") && stderr.contains("nowhere"),
        "{stderr}"
    );
    // And a good override is applied, not merely tolerated.
    let mut cmd = tidings();
    cmd.args(["config", "check", file.path()])
        .env("TIDINGS_SERVER__LISTEN", "127.0.0.1:9999");
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("config check did not exit")
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("127.0.0.1:9999"),
        "{}",
        text(&out.stdout)
    );
}

/// The messages docs/configuration.md quotes, as `config check` and `serve` print them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_check_and_serve_refuse_what_the_docs_say_with_the_documented_messages() {
    let default = default_config().await;
    // `config check` checks [auth] (and TLS), not only the file's shape.
    let short_secret = TempFile::new("short-secret.toml", "[auth]\njwt_secret = \"short\"\n");
    let stderr = run_err(&["config", "check", short_secret.path()]).await;
    assert!(
        stderr.contains("auth.jwt_secret must be at least 16 characters"),
        "{stderr}"
    );
    // A bad prefix is refused whatever the broker, by `config check` and by `serve`.
    let bad_prefix = TempFile::new(
        "bad-prefix.toml",
        &default.replacen("prefix = \"tidings\"", "prefix = \"a{b}\"", 1),
    );
    let expected = "broker.prefix = \"a{b}\": use 1 to 64 of A-Z a-z 0-9 _ . : @ = -";
    let stderr = run_err(&["config", "check", bad_prefix.path()]).await;
    assert!(stderr.contains(expected), "{stderr}");
    let stderr = run_err(&["--config", bad_prefix.path(), "serve"]).await;
    assert!(stderr.contains(expected), "{stderr}");
    // A Redis that cannot be reached stops `serve` with the documented prefix.
    let stderr = run_err(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--broker",
        "redis://127.0.0.1:1",
    ])
    .await;
    assert!(
        stderr.contains("starting the server: cannot connect to Redis at redis://127.0.0.1:1"),
        "{stderr}"
    );
}

/// `Type=notify` in the packaged unit relies on this: `serve` sends READY=1 once it listens,
/// and STOPPING=1 when SIGTERM starts its shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_tells_systemd_when_it_is_ready_and_when_it_stops() {
    let dir = std::env::temp_dir().join(format!(
        "tidings-notify-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let socket_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&socket_path);
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let mut cmd = tidings();
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(WAIT, socket.recv(&mut buf))
        .await
        .expect("no READY=1 from serve")
        .unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let n = tokio::time::timeout(WAIT, socket.recv(&mut buf))
        .await
        .expect("no STOPPING=1 after SIGTERM")
        .unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    let _ = tokio::time::timeout(WAIT, child.wait()).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_explain_prints_a_keys_default_variable_and_meaning_and_lists_keys_when_unknown() {
    let out = run_ok(&["config", "explain", "server.heartbeat_interval"], None).await;
    assert!(out.starts_with("server.heartbeat_interval\n"), "{out}");
    assert!(out.contains("\"15s\""), "{out}");
    assert!(out.contains("TIDINGS_SERVER__HEARTBEAT_INTERVAL"), "{out}");
    let stderr = run_err(&["config", "explain", "heartbeat"]).await;
    assert!(stderr.contains("server.heartbeat_interval"), "{stderr}");
}

/// A loopback proxy to `target` that, on its first connection, lets the request through
/// but throws away the server's answer and closes: a publish stored, its reply lost.
async fn reply_losing_proxy(target: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(target).await.unwrap();
            let lose = std::mem::take(&mut first);
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                };
                let down = async move {
                    if lose {
                        let mut buf = [0u8; 4096];
                        let _ = sr.read(&mut buf).await;
                        let _ = cw.shutdown().await;
                    } else {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    }
                };
                tokio::select! {
                    () = up => {}
                    () = down => {}
                }
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_retries_a_lost_reply_with_its_idempotency_key_and_the_message_is_stored_once() {
    let server = Server::start().await;
    let target = server.url.trim_start_matches("http://").parse().unwrap();
    let proxy = reply_losing_proxy(target).await;
    let out = run(&["publish", "news", "once", "--url", &proxy], None).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let position = parse_one_line(&text(&out.stdout));
    assert!(
        text(&out.stderr).contains("trying again with the same Idempotency-Key"),
        "{}",
        text(&out.stderr)
    );
    let (_, history) = server.get_json("/api/channels/news/history").await;
    let messages = history["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1, "{history}");
    assert_eq!(messages[0]["offset"], position["offset"]);
    assert_eq!(messages[0]["data"], json!("once"));

    // An explicit key: a second invocation is answered with the first position.
    let again = |data: &'static str| {
        let url = server.url.clone();
        async move {
            let out = run_ok(
                &[
                    "publish",
                    "news",
                    data,
                    "--idempotency-key",
                    "job-1",
                    "--url",
                    &url,
                ],
                None,
            )
            .await;
            parse_one_line(&out)
        }
    };
    let first = again("a").await;
    assert_eq!(again("a").await, first);
    let bad = run(
        &[
            "publish",
            "news",
            "x",
            "--idempotency-key",
            "no spaces",
            "--url",
            &server.url,
        ],
        None,
    )
    .await;
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("idempotency"),
        "{}",
        text(&bad.stderr)
    );
}
