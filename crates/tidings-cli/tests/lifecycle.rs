//! Drain and reload of a real `tidings serve` process (SPEC §13), driven by real signals.
//!
//! - Drain: two nodes share a real `redis-server`; a load balancer in miniature (a TCP proxy
//!   that sends each new connection to the first node whose `/readyz` answers 200, as nginx or
//!   HAProxy with health checks would) fronts them. SSE, WebSocket and long-poll clients
//!   (ours, plus `tidings subscribe` processes) follow a channel through it; the first node
//!   gets SIGTERM. `/readyz` must turn 503 before any client is told anything, every client
//!   must be told to reconnect with its own delay, the delays must spread over the window, and
//!   after reconnecting (through the proxy, to the second node) every client must hold every
//!   message exactly once, in order.
//! - Reload: SIGHUP with a changed file under live connections.
//!
//! Every wait is bounded and waits for an event (a line, an exit, a state seen by polling
//! with `eventually`), never for a fixed time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../tidings-redis/tests/support/mod.rs"]
mod redis_support;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tidings_testkit::{Proc, Served};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// The longest any single wait may take before the test fails.
const WAIT: Duration = Duration::from_secs(20);

fn tidings() -> Command {
    let mut cmd = tidings_testkit::command(env!("CARGO_BIN_EXE_tidings"));
    cmd.env("TIDINGS_LOG", "info").stdout(Stdio::null());
    cmd
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// A file under the temp dir, removed when dropped.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(name: &str, contents: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "tidings-lifecycle-{}-{}-{name}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }

    fn write(&self, contents: &str) {
        std::fs::write(&self.0, contents).unwrap();
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A running `tidings serve --config FILE --listen 127.0.0.1:0`
/// (`tidings_testkit::Served`: killed when dropped).
struct Node {
    served: Served,
    url: String,
}

impl Node {
    async fn start(config: &TempFile) -> Self {
        let mut cmd = tidings();
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--config",
            config.path(),
        ]);
        let served = Served::listening(cmd, WAIT).await;
        Self {
            url: served.url.clone(),
            served,
        }
    }

    fn addr(&self) -> String {
        self.served.addr().to_owned()
    }

    fn log(&self) -> String {
        self.served.log()
    }

    fn signal(&self, name: &str) {
        self.served.signal(name);
    }

    async fn metric(&self, http: &reqwest::Client, line_prefix: &str) -> f64 {
        let text = http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(line_prefix)
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no metric {line_prefix}"))
    }

    async fn await_log(&self, needle: &str) {
        tidings_testkit::eventually(
            &format!("the server logs {needle:?}"),
            WAIT,
            Duration::from_millis(10),
            async || self.log().contains(needle),
        )
        .await;
    }
}

/// A load balancer in miniature: each new connection goes to the first backend whose
/// `/readyz` answers 200 (checked per connection: the check interval is zero), then bytes are
/// copied both ways until either side closes.
struct Balancer {
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    async fn start(backends: Vec<String>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap();
            while let Ok((client, _)) = listener.accept().await {
                let mut target = None;
                for b in &backends {
                    let ready = http.get(format!("http://{b}/readyz")).send().await;
                    if ready.is_ok_and(|r| r.status() == 200) {
                        target = Some(b.clone());
                        break;
                    }
                }
                let Some(target) = target else { continue };
                tokio::spawn(async move {
                    let mut client = client;
                    if let Ok(mut upstream) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
            }
        });
        Self { url, task }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one of our clients saw: every message's `n`, and the goodbyes it was given.
#[derive(Default)]
struct Seen {
    ns: Vec<u64>,
    /// `(reason, reconnect, reconnect_after_ms)` of each disconnect notice.
    notices: Vec<(String, bool, Option<u64>)>,
    /// When the first notice came.
    first_notice: Option<Instant>,
    /// SSE: the `retry:` that came with the notice; `/ws`: the close code after it.
    extra: Vec<u64>,
}

type Shared = Arc<Mutex<Seen>>;

fn record_notice(seen: &Shared, v: &Value) {
    let mut s = seen.lock().unwrap();
    s.first_notice.get_or_insert_with(Instant::now);
    s.notices.push((
        v["reason"].as_str().unwrap_or_default().to_owned(),
        v["reconnect"].as_bool().unwrap_or(false),
        v["reconnect_after_ms"].as_u64(),
    ));
}

fn record_message(seen: &Shared, envelope: &Value) {
    let n = envelope["data"]["n"].as_u64().expect("a numbered message");
    seen.lock().unwrap().ns.push(n);
}

fn done(seen: &Shared, total: u64) -> bool {
    seen.lock().unwrap().ns.len() as u64 >= total
}

/// An SSE client (`/sse?channel=news`, envelopes) that resumes from its last `id:` whenever
/// its stream ends, until it holds `total` messages.
async fn sse_client(lb: String, mut cursor: String, total: u64, seen: Shared) {
    let http = http();
    while !done(&seen, total) {
        let res = http
            .get(format!("{lb}/sse?channel=news&since={cursor}"))
            .send()
            .await;
        let Ok(mut res) = res else { continue };
        let mut buf = String::new();
        while let Ok(Some(chunk)) = res.chunk().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let (mut event, mut data, mut retry) = (None, None, None);
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        cursor = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str::<Value>(v).unwrap());
                    } else if let Some(v) = line.strip_prefix("retry: ") {
                        retry = Some(v.parse::<u64>().unwrap());
                    }
                }
                match (event.as_deref(), data) {
                    (Some("tidings.disconnect"), Some(v)) => {
                        record_notice(&seen, &v);
                        if let Some(retry) = retry {
                            seen.lock().unwrap().extra.push(retry);
                        }
                    }
                    (None, Some(v)) => record_message(&seen, &v),
                    _ => {}
                }
            }
            if done(&seen, total) {
                return;
            }
        }
    }
}

/// A `/ws` client subscribed to `news` that resubscribes from its last cursor whenever the
/// socket ends, until it holds `total` messages.
async fn ws_client(lb: String, mut cursor: String, total: u64, seen: Shared) {
    let url = lb.replacen("http://", "ws://", 1) + "/ws";
    while !done(&seen, total) {
        let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url.as_str()).await else {
            continue;
        };
        let sub = json!({"op": "subscribe", "channel": "news", "since": cursor});
        if ws.send(WsMessage::text(sub.to_string())).await.is_err() {
            continue;
        }
        while let Some(Ok(frame)) = ws.next().await {
            match frame {
                WsMessage::Text(text) => {
                    let v: Value = serde_json::from_str(&text).unwrap();
                    match v["type"].as_str() {
                        Some("message") => {
                            cursor = v["cursor"].as_str().unwrap().to_owned();
                            record_message(&seen, &v);
                        }
                        Some("disconnect") => record_notice(&seen, &v),
                        _ => {}
                    }
                }
                WsMessage::Close(Some(c)) => {
                    seen.lock()
                        .unwrap()
                        .extra
                        .push(u64::from(u16::from(c.code)));
                }
                _ => {}
            }
            if done(&seen, total) {
                let _ = ws.close(None).await;
                return;
            }
        }
    }
}

/// A long-poll client: `/poll?channel=news&wait=30` from its cursor, until it holds `total`.
async fn long_poll_client(lb: String, mut cursor: String, total: u64, seen: Shared) {
    let http = http();
    while !done(&seen, total) {
        let res = http
            .get(format!("{lb}/poll?channel=news&wait=30&since={cursor}"))
            .send()
            .await;
        let Ok(res) = res else { continue };
        if res.status() != 200 {
            continue;
        }
        let Ok(reply) = res.text().await.map(|t| serde_json::from_str::<Value>(&t)) else {
            continue;
        };
        let Ok(reply) = reply else { continue };
        for m in reply["messages"].as_array().unwrap() {
            record_message(&seen, m);
        }
        cursor = reply["cursor"].as_str().unwrap().to_owned();
        if let Some(d) = reply.get("disconnect") {
            record_notice(&seen, d);
        }
    }
}

async fn publish(http: &reqwest::Client, url: &str, n: u64) -> Value {
    let res = http
        .post(format!("{url}/publish/news"))
        .header("content-type", "application/json")
        .body(json!({ "n": n }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "publish {n} to {url}");
    serde_json::from_str(&res.text().await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_every_client_reconnects_to_the_other_node_after_its_own_delay_losing_nothing()
 {
    const PER_KIND: usize = 8;
    const TOTAL: u64 = 12;
    let redis = redis_support::RedisServer::start();
    let prefix = redis_support::unique_prefix("drain");
    let config = TempFile::new(
        "drain.toml",
        &format!(
            "[server]\ndrain_grace = \"1s\"\nreconnect_spread = \"1s\"\n\
             [broker]\nurl = \"{}\"\nprefix = \"{prefix}\"\n\
             [channels]\nhistory_size = 1000\n",
            redis.url()
        ),
    );
    let mut a = Node::start(&config).await;
    let b = Node::start(&config).await;
    let lb = Balancer::start(vec![a.addr(), b.addr()]).await;
    let http = http();
    // Everyone starts from the same point: the cursor of a seed message.
    let seed = publish(&http, &b.url, 0).await;
    let since = seed["cursor"].as_str().unwrap().to_owned();

    let mut clients = Vec::new();
    let mut tasks = Vec::new();
    for kind in ["sse", "ws", "long-poll"] {
        for _ in 0..PER_KIND {
            let seen = Shared::default();
            let (lb, since) = (lb.url.clone(), since.clone());
            tasks.push(match kind {
                "sse" => tokio::spawn(sse_client(lb, since, TOTAL, seen.clone())),
                "ws" => tokio::spawn(ws_client(lb, since, TOTAL, seen.clone())),
                _ => tokio::spawn(long_poll_client(lb, since, TOTAL, seen.clone())),
            });
            clients.push((kind, seen));
        }
    }
    // And the CLI, over each kind of transport, honouring the advised delays by itself.
    let mut subscribers: Vec<Proc> = ["sse", "ws", "long-poll"]
        .iter()
        .map(|transport| {
            let mut cmd = tidings();
            cmd.stdout(Stdio::piped()).args([
                "subscribe",
                "news",
                "--transport",
                transport,
                "--since",
                &since,
                "--count",
                &TOTAL.to_string(),
                "--url",
                &lb.url,
            ]);
            Proc::spawn(
                &format!("tidings subscribe ({transport})"),
                cmd,
                "built with the tests",
            )
        })
        .collect();

    // Every client is on node A (B is not even asked while A is ready).
    let n = (PER_KIND + 1) as f64;
    tidings_testkit::eventually(
        "every client is on node A",
        WAIT,
        Duration::from_millis(20),
        async || {
            a.metric(&http, "tidings_connections{transport=\"sse\"}")
                .await
                == n
                && a.metric(&http, "tidings_connections{transport=\"websocket\"}")
                    .await
                    == n
                && a.metric(&http, "tidings_connections{transport=\"long_poll\"}")
                    .await
                    == n
        },
    )
    .await;
    for i in 1..=4 {
        publish(&http, &b.url, i).await;
    }

    a.signal("TERM");
    let terminated = Instant::now();
    // /readyz turns 503 first, while everything else keeps working.
    tidings_testkit::eventually(
        "node A's /readyz answers 503",
        WAIT,
        Duration::from_millis(5),
        async || {
            http.get(format!("{}/readyz", a.url))
                .send()
                .await
                .is_ok_and(|r| r.status() == 503)
        },
    )
    .await;
    let draining_seen = Instant::now();
    let (status, body) = {
        let r = http.get(format!("{}/readyz", a.url)).send().await.unwrap();
        (
            r.status().as_u16(),
            serde_json::from_str::<Value>(&r.text().await.unwrap()).unwrap(),
        )
    };
    assert_eq!((status, body), (503, json!({"status": "draining"})));
    assert_eq!(
        http.get(format!("{}/healthz", a.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    for i in 5..=6 {
        publish(&http, &a.url, i).await;
    }
    let fresh = http
        .get(format!("{}/sse/news", a.url))
        .send()
        .await
        .unwrap();
    assert_eq!(fresh.status(), 200, "a new subscription during the grace");
    drop(fresh);

    // Node A ends every stream, then exits by itself, within drain_grace + 10 s.
    let status = tokio::time::timeout(WAIT, a.served.child.wait())
        .await
        .expect("node A did not exit")
        .unwrap();
    assert!(status.success(), "node A exited with {status}\n{}", a.log());
    assert!(terminated.elapsed() < Duration::from_secs(12));
    for i in 7..=TOTAL {
        publish(&http, &b.url, i).await;
    }
    for t in tasks {
        if tokio::time::timeout(WAIT, t).await.is_err() {
            let report: Vec<String> = clients
                .iter()
                .map(|(kind, seen)| {
                    let s = seen.lock().unwrap();
                    format!("{kind}: {:?} {:?} {:?}", s.ns, s.notices, s.extra)
                })
                .collect();
            panic!(
                "a client never got every message:\n{}\n--- node B:\n{}",
                report.join("\n"),
                b.log()
            );
        }
    }
    for sub in &mut subscribers {
        let lines = sub.finish_ok().await;
        let ns: Vec<u64> = lines
            .iter()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["data"]["n"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(ns, (1..=TOTAL).collect::<Vec<_>>(), "{}", sub.context());
    }

    let mut delays = Vec::new();
    for (kind, seen) in &clients {
        let s = seen.lock().unwrap();
        // Nothing lost, nothing twice, in order — across the move from A to B.
        assert_eq!(s.ns, (1..=TOTAL).collect::<Vec<_>>(), "{kind} client");
        // Told to reconnect, once, after /readyz had turned.
        assert_eq!(s.notices.len(), 1, "{kind} client: {:?}", s.notices);
        let (reason, reconnect, after) = &s.notices[0];
        assert_eq!(
            (reason.as_str(), *reconnect),
            ("shutdown", true),
            "{kind} client"
        );
        let after = after.unwrap_or_else(|| panic!("{kind} client: no reconnect_after_ms"));
        assert!(
            after <= 1000,
            "{kind} client: {after} ms is outside the spread"
        );
        assert!(
            s.first_notice.unwrap() > draining_seen,
            "{kind} client told before /readyz turned"
        );
        match *kind {
            "sse" => assert_eq!(s.extra, vec![after], "SSE retry: carries the same delay"),
            "ws" => assert_eq!(s.extra, vec![1012], "/ws closes with 1012"),
            _ => {}
        }
        delays.push(after);
    }
    // The advised delays spread over the window: 24 draws from [0, 1000] ms.
    let (min, max) = (*delays.iter().min().unwrap(), *delays.iter().max().unwrap());
    assert!(
        max - min >= 500,
        "delays bunched in [{min}, {max}]: {delays:?}"
    );
    let quarters: BTreeSet<u64> = delays.iter().map(|d| (d / 250).min(3)).collect();
    assert!(
        quarters.len() >= 3,
        "delays in too few quarters of the window: {delays:?}"
    );
    let distinct: BTreeSet<u64> = delays.iter().copied().collect();
    assert!(
        distinct.len() >= delays.len() / 2,
        "delays repeat: {delays:?}"
    );
    drop(b);
}

// ---------------------------------------------------------------------------------------------
// SIGHUP
// ---------------------------------------------------------------------------------------------

const OLD_KEY: &str = "old-key-0123456789abcdef";
const NEW_KEY: &str = "new-key-0123456789abcdef";

fn auth_config(key: &str, origin: &str, open_subscribe: &str, prefix: &str) -> String {
    format!(
        "[server]\ncors_origins = [\"{origin}\"]\n\
         [broker]\nprefix = \"{prefix}\"\n\
         [auth]\napi_keys = [\"{key}\"]\n\
         [namespaces.open]\nsubscribe = \"{open_subscribe}\"\n"
    )
}

async fn publish_with(http: &reqwest::Client, url: &str, channel: &str, key: &str, n: u64) -> u16 {
    http.post(format!("{url}/publish/{channel}"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(json!({ "n": n }).to_string())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn preflight(http: &reqwest::Client, url: &str, origin: &str) -> u16 {
    http.request(reqwest::Method::OPTIONS, format!("{url}/publish/news"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Reads an SSE response until a block containing `needle`; returns that block.
async fn sse_until(res: &mut reqwest::Response, buf: &mut String, needle: &str) -> String {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(at) = buf.find(needle) {
                let start = buf[..at].rfind("\n\n").map_or(0, |i| i + 2);
                let end = buf[at..].find("\n\n").map_or(buf.len(), |i| at + i + 2);
                let block: String = buf[start..end].to_owned();
                buf.drain(..end);
                return block;
            }
            let chunk = res.chunk().await.unwrap().expect("the stream ended");
            buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("never saw {needle:?}; read:\n{buf}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_keys_cors_and_policies_under_live_connections_and_a_broken_file_changes_nothing()
 {
    let config = TempFile::new(
        "reload.toml",
        &auth_config(OLD_KEY, "https://old.example", "anyone", "tidings"),
    );
    let node = Node::start(&config).await;
    let http = http();
    assert_eq!(
        publish_with(&http, &node.url, "news", OLD_KEY, 1).await,
        200
    );
    assert_eq!(
        preflight(&http, &node.url, "https://old.example").await,
        204
    );
    assert_eq!(
        preflight(&http, &node.url, "https://new.example").await,
        403
    );

    // Live before the reload: a backend's stream (API key), an anonymous stream and an
    // anonymous /ws on the `open:` namespace, which the reload restricts to tokens.
    let mut kept = http
        .get(format!("{}/sse/news", node.url))
        .bearer_auth(OLD_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(kept.status(), 200);
    let mut kept_buf = String::new();
    sse_until(&mut kept, &mut kept_buf, "id: ").await;
    let mut revoked = http
        .get(format!("{}/sse/open:lobby", node.url))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    let mut revoked_buf = String::new();
    sse_until(&mut revoked, &mut revoked_buf, "id: ").await;
    let ws_url = node.url.replacen("http://", "ws://", 1) + "/ws";
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url.as_str())
        .await
        .unwrap();
    ws.send(WsMessage::text(
        json!({"id": 1, "op": "subscribe", "channel": "open:lobby"}).to_string(),
    ))
    .await
    .unwrap();
    let reply = ws.next().await.unwrap().unwrap();
    assert!(reply.to_text().unwrap().contains("\"ok\":true"), "{reply}");

    // The new file: another key, another origin, `open:` needs a token, and a broker prefix
    // change that cannot apply live.
    config.write(&auth_config(
        NEW_KEY,
        "https://new.example",
        "token",
        "elsewhere",
    ));
    node.signal("HUP");
    tidings_testkit::eventually(
        "the new key is accepted",
        WAIT,
        Duration::from_millis(10),
        async || publish_with(&http, &node.url, "news", NEW_KEY, 2).await == 200,
    )
    .await;
    assert_eq!(
        publish_with(&http, &node.url, "news", OLD_KEY, 3).await,
        401
    );
    assert_eq!(
        preflight(&http, &node.url, "https://new.example").await,
        204
    );
    assert_eq!(
        preflight(&http, &node.url, "https://old.example").await,
        403
    );
    node.await_log("needs a restart").await;
    assert!(node.log().contains("broker"), "{}", node.log());

    // The backend's stream kept flowing: it gets what the new key published.
    let block = sse_until(&mut kept, &mut kept_buf, "data: {\"n\":2}").await;
    assert!(block.contains("id: "), "{block}");
    // The anonymous ones lost their grant: the same goodbye as an expired token.
    let goodbye = sse_until(&mut revoked, &mut revoked_buf, "tidings.disconnect").await;
    assert!(
        goodbye.contains("\"reason\":\"token_expired\""),
        "{goodbye}"
    );
    let mut close_code = None;
    let mut reason = None;
    tokio::time::timeout(WAIT, async {
        while let Some(Ok(frame)) = ws.next().await {
            match frame {
                WsMessage::Text(t) if t.contains("disconnect") => {
                    reason = serde_json::from_str::<Value>(&t).ok();
                }
                WsMessage::Close(c) => {
                    close_code = c.map(|c| u16::from(c.code));
                    break;
                }
                _ => {}
            }
        }
    })
    .await
    .expect("the /ws session was never closed");
    assert_eq!(reason.unwrap()["reason"], "token_expired");
    assert_eq!(close_code, Some(1008));

    // A broken file is refused, logged, and the running configuration stays.
    config.write("[server\nthis is not toml");
    node.signal("HUP");
    node.await_log("configuration reload refused").await;
    assert_eq!(
        publish_with(&http, &node.url, "news", NEW_KEY, 4).await,
        200
    );
    assert_eq!(
        publish_with(&http, &node.url, "news", OLD_KEY, 5).await,
        401
    );
    assert_eq!(
        preflight(&http, &node.url, "https://new.example").await,
        204
    );
    sse_until(&mut kept, &mut kept_buf, "data: {\"n\":4}").await;
    // So is a valid file that is not a valid configuration (a key too short).
    config.write(&auth_config(
        "short",
        "https://new.example",
        "token",
        "tidings",
    ));
    node.signal("HUP");
    tidings_testkit::eventually(
        "the second refusal is logged",
        WAIT,
        Duration::from_millis(10),
        async || node.log().matches("configuration reload refused").count() >= 2,
    )
    .await;
    assert_eq!(
        publish_with(&http, &node.url, "news", NEW_KEY, 6).await,
        200
    );
}

/// `tidings serve 2>&1 | head`, or a log reader that died: the server's stdout and stderr
/// are a pipe nobody reads any more. It still serves, and SIGTERM still stops it: a log
/// line that cannot be written is dropped, where tracing's fallback `eprintln!` panicked
/// every task that logged, the stop signal's own task among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_log_pipe_was_closed_still_serves_and_stops_on_sigterm() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let config = TempFile::new(
        "closed-log.toml",
        "[server]\ndrain_grace = \"1s\"\nreconnect_spread = \"1s\"\n",
    );
    let mut cmd = tidings_testkit::command(env!("CARGO_BIN_EXE_tidings"));
    cmd.env("TIDINGS_LOG", "debug")
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--config",
            config.path(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = tokio::time::timeout(WAIT, async {
        loop {
            let line = lines.next_line().await.unwrap().expect("the server is up");
            if let Some(url) = line.split("listening on ").nth(1) {
                return url.trim().to_owned();
            }
        }
    })
    .await
    .expect("the server says where it listens");
    drop(lines);
    drop(child.stdout.take());

    let http = http();
    for n in 0..3 {
        publish(&http, &url, n).await;
    }
    let pid = child.id().unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("SIGTERM stops a server whose log pipe is closed")
        .unwrap();
    assert!(status.success(), "it stops cleanly: {status}");
}
