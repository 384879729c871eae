//! The Pusher Channels protocol against unmodified clients: pusher-js and the `pusher` Node
//! SDK (`tests/clients/pusher_node.mjs`, which also runs the app's auth endpoint), the
//! Python `pusher` SDK (`tests/clients/pusher_python.py`), and a bare WebSocket
//! (tokio-tungstenite) for the protocol's edges. Each test runs a real server on port 0.
//!
//! These tests need what `scripts/test.sh` installs (`tests/clients/node_modules/` with
//! pusher-js and pusher, `.venv/` with pusher). A missing tool fails the test with a message
//! that says so. No test sleeps: each step waits, with a timeout, for a line or a frame.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../../tidings-redis/tests/support/mod.rs"]
mod redis_support;

use std::path::{Path, PathBuf};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::process::Command;
use tokio_tungstenite::tungstenite::Message as Ws;

use common::{TIMEOUT, TestServer};
use tidings_server::Config;
use tidings_testkit::Proc;

const INSTALL_HINT: &str = "run scripts/test.sh once: it installs tests/clients/node_modules \
                            (pusher-js, pusher) and the Python venv .venv/ (pusher)";
const APP_ID: &str = "1001";
const KEY: &str = "app-key";
const SECRET: &str = "app-secret";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn clients_dir() -> PathBuf {
    std::env::var_os("TIDINGS_CLIENTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("tests/clients"))
}

fn app(config: &mut Config, edit: impl FnOnce(&mut tidings_pusher::AppConfig)) {
    let mut app = tidings_pusher::AppConfig {
        id: APP_ID.into(),
        key: KEY.into(),
        secret: tidings_pusher::config::AppSecret(SECRET.into()),
        client_events: true,
        max_connections: 0,
        max_event_bytes: tidings_pusher::config::DEFAULT_MAX_EVENT_BYTES,
        webhook_url: None,
        webhook_ca_file: None,
    };
    edit(&mut app);
    config.pusher.apps.push(app);
}

async fn pusher_server() -> TestServer {
    TestServer::with(|c| app(c, |_| {})).await
}

/// `pusher_node.mjs` running `scenario` against `server`.
fn node_scenario(server: &TestServer, scenario: &str) -> Proc {
    let modules = std::env::var_os("TIDINGS_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| clients_dir().join("node_modules"));
    assert!(
        modules.join("pusher-js/package.json").is_file()
            && modules.join("pusher/package.json").is_file(),
        "pusher-js and pusher are not installed in {}; {INSTALL_HINT}",
        modules.display()
    );
    let mut cmd = Command::new("node");
    cmd.arg(clients_dir().join("pusher_node.mjs")).args([
        &server.url,
        APP_ID,
        KEY,
        SECRET,
        scenario,
    ]);
    Proc::spawn(&format!("pusher-js {scenario}"), cmd, INSTALL_HINT)
}

fn python_sdk(server: &TestServer, args: &[&str]) -> Proc {
    let python = std::env::var_os("TIDINGS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"));
    let mut cmd = Command::new(python);
    cmd.arg(clients_dir().join("pusher_python.py"))
        .args([&server.url, APP_ID, KEY, SECRET])
        .args(args);
    Proc::spawn("python pusher SDK", cmd, INSTALL_HINT)
}

/// Runs a scenario to its end and returns its steps by name.
async fn steps(mut proc: Proc) -> Vec<Value> {
    let lines = proc.finish_ok().await;
    let all: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(all.last(), Some(&json!({"ok": true})), "{all:?}");
    all
}

fn step<'a>(all: &'a [Value], name: &str) -> &'a Value {
    all.iter()
        .find(|v| v["step"] == name)
        .unwrap_or_else(|| panic!("no step {name:?} in {all:?}"))
}

// ---------------------------------------------------------------------------------------------
// pusher-js + the Node SDK
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_js_receives_sdk_triggers_and_tidings_publishes_and_tidings_sse_sees_pusher_events()
{
    let server = pusher_server().await;
    let all = steps(node_scenario(&server, "basic")).await;
    let env = &step(&all, "sdk trigger reached Tidings SSE")["envelope"];
    assert_eq!(env["channel"], "pusher:1001:news");
    assert_eq!(env["event"], "greet");
    assert_eq!(
        step(&all, "tidings publish reached pusher-js")["data"]["via"],
        "tidings"
    );
    step(&all, "multi-channel trigger with a Laravel event name");
    step(&all, "batch trigger");
    let list = &step(&all, "channel queries")["list"]["channels"];
    assert_eq!(list["news"]["subscription_count"], 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_members_are_one_per_user_and_client_events_reach_others_but_never_the_sender() {
    let server = pusher_server().await;
    let all = steps(node_scenario(&server, "presence")).await;
    assert_eq!(step(&all, "member_added")["member"]["id"], "u2");
    let users = &step(&all, "one member per user_id")["users"]["users"];
    assert_eq!(users, &json!([{"id": "u1"}, {"id": "u2"}]));
    step(&all, "client event relayed, not echoed");
    step(&all, "socket_id exclusion");
    assert_eq!(step(&all, "member_removed")["member"]["id"], "u2");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signatures_timestamps_bodies_channel_auth_and_oversized_events_are_refused_and_nothing_is_delivered()
 {
    let server = pusher_server().await;
    let all = steps(node_scenario(&server, "bad")).await;
    assert_eq!(step(&all, "forged auth refused")["error"]["status"], 401);
    assert_eq!(
        step(&all, "presence without user_id refused")["error"]["type"],
        "AuthError"
    );
    let api = step(&all, "HTTP API refusals");
    assert_eq!(
        (
            &api["old"],
            &api["tampered"],
            &api["replayed"],
            &api["oversized"]
        ),
        (&json!(401), &json!(401), &json!(401), &json!(413))
    );
    step(&all, "oversized client event refused");
    step(&all, "nothing delivered");
    assert_eq!(step(&all, "unknown key closed 4001")["error"]["code"], 4001);
    // The refusals were counted per app.
    assert!(
        server
            .metric("tidings_pusher_api_refused_total{app_id=\"1001\"}")
            .await
            >= 4.0
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_connections_closes_a_signed_in_user_with_4009() {
    let server = pusher_server().await;
    let all = steps(node_scenario(&server, "terminate")).await;
    assert_eq!(step(&all, "terminated")["error"]["code"], 4009);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_to_user_reaches_the_signed_in_pusher_js_and_only_the_user_may_follow_its_channel() {
    let server = pusher_server().await;
    let all = steps(node_scenario(&server, "send_to_user")).await;
    assert_eq!(
        step(&all, "sent to the user")["data"]["text"],
        "just for carol"
    );
    // A connection not signed in as carol cannot follow her channel, signed or not.
    let mut raw = Raw::connect(&server, "/app/app-key?protocol=7").await;
    raw.send(json!({"event": "pusher:subscribe", "data": {"channel": "#server-to-user-carol"}}))
        .await;
    let refused = raw.next_event("pusher:subscription_error").await;
    assert_eq!(refused["channel"], "#server-to-user-carol");
    // Nor can Tidings' own transports.
    let sse = server
        .http
        .get(format!(
            "{}/poll/pusher:1001:=23server-to-user-carol",
            server.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 403);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_js_reconnects_and_resubscribes_after_the_server_restarts() {
    let first = pusher_server().await;
    let addr = first.addr;
    let mut client = node_scenario(&first, "reconnect");
    client
        .line_where("subscribed", |l| l.contains("\"subscribed\""))
        .await;
    // Shutdown closes Pusher sockets with 4100: pusher-js retries after a second.
    first.shutdown().await;
    // The same address again: pusher-js reconnects to the host and port it knows.
    let mut config = Config::default();
    app(&mut config, |_| {});
    let state = tidings_server::AppState::connect(config).await.unwrap();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let second = tokio::spawn(tidings_server::serve(state, listener, async {
        let _ = stopped.await;
    }));
    client
        .line_where("the second connection", |l| l.contains("\"n\":2"))
        .await;
    client
        .line_where("the second subscription", |l| l.contains("\"subscribed\""))
        .await;
    let res = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!(
            "http://{addr}/publish/pusher:1001:lobby?event=hello"
        ))
        .header("content-type", "application/json")
        .body(r#"{"last":true}"#)
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success());
    let last = client
        .line_where("the event", |l| l.contains("\"event\""))
        .await;
    assert!(last.contains("\"last\":true"), "{last}");
    client.finish_ok().await;
    let _ = stop.send(());
    tokio::time::timeout(TIMEOUT * 2, second)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// The Python SDK
// ---------------------------------------------------------------------------------------------

/// A bare Pusher protocol connection.
struct Raw {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    socket_id: String,
}

impl Raw {
    async fn connect(server: &TestServer, path: &str) -> Self {
        let url = format!("ws://{}{path}", server.addr);
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let mut raw = Self {
            ws,
            socket_id: String::new(),
        };
        let hello = raw.next().await;
        if hello["event"] == "pusher:connection_established" {
            let data: Value = serde_json::from_str(hello["data"].as_str().unwrap()).unwrap();
            raw.socket_id = data["socket_id"].as_str().unwrap().to_owned();
            assert_eq!(data["activity_timeout"], 120);
        } else {
            raw.socket_id = hello.to_string();
        }
        raw
    }

    async fn send(&mut self, v: Value) {
        self.ws.send(Ws::text(v.to_string())).await.unwrap();
    }

    /// The next text frame as JSON, or `{"close": code}`.
    async fn next(&mut self) -> Value {
        loop {
            let frame = tokio::time::timeout(TIMEOUT, self.ws.next())
                .await
                .expect("no frame within the timeout");
            match frame {
                Some(Ok(Ws::Text(t))) => return serde_json::from_str(&t).unwrap(),
                Some(Ok(Ws::Close(c))) => {
                    return json!({"close": c.map(|c| u16::from(c.code))});
                }
                Some(Ok(_)) => continue,
                other => return json!({"closed": format!("{other:?}")}),
            }
        }
    }

    async fn next_event(&mut self, event: &str) -> Value {
        for _ in 0..100 {
            let v = self.next().await;
            if v["event"] == event {
                return v;
            }
            assert!(
                v.get("close").is_none(),
                "closed while waiting for {event}: {v}"
            );
        }
        panic!("no {event}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_signs_auth_the_server_accepts_and_its_triggers_reach_pusher_and_tidings_subscribers()
 {
    let server = pusher_server().await;
    let mut raw = Raw::connect(&server, "/app/app-key?protocol=7").await;
    let mut auth = python_sdk(&server, &["auth", &raw.socket_id]);
    let signed: Value = serde_json::from_str(&auth.line().await).unwrap();
    auth.finish_ok().await;
    raw.send(json!({"event": "pusher:subscribe", "data": {"channel": "private-py", "auth": signed["private"]}}))
        .await;
    let ok = raw
        .next_event("pusher_internal:subscription_succeeded")
        .await;
    assert_eq!(ok["channel"], "private-py");
    let presence = &signed["presence"];
    raw.send(json!({"event": "pusher:subscribe", "data": {"channel": "presence-py", "auth": presence["auth"], "channel_data": presence["channel_data"]}}))
        .await;
    let ok = raw
        .next_event("pusher_internal:subscription_succeeded")
        .await;
    let members: Value = serde_json::from_str(ok["data"].as_str().unwrap()).unwrap();
    assert_eq!(members["presence"]["hash"]["py-user"]["lang"], "python");
    raw.send(json!({"event": "pusher:subscribe", "data": {"channel": "py-news"}}))
        .await;
    raw.next_event("pusher_internal:subscription_succeeded")
        .await;
    // A Tidings subscriber of the same channel, by SSE.
    let mut sse = common::subscribe(
        &server,
        common::Kind::Sse,
        &["pusher:1001:py-news"],
        common::Start::Now,
    )
    .await;
    let mut trigger = python_sdk(&server, &["trigger"]);
    let lines: Vec<Value> = trigger
        .finish_ok()
        .await
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let event = raw.next_event("py-event").await;
    assert_eq!(event["channel"], "py-news");
    let data: Value = serde_json::from_str(event["data"].as_str().unwrap()).unwrap();
    assert_eq!(data["from"], "python");
    assert_eq!(raw.next_event("py-batch").await["data"], "{\"n\": 1}");
    assert_eq!(raw.next_event("py-batch").await["data"], "{\"n\": 2}");
    let seen = sse.messages(3).await;
    assert_eq!(seen[0].0, "pusher:1001:py-news");
    assert!(
        lines.iter().any(|l| l["step"] == "channels_info"
            && l["answer"]["channels"]["py-news"]["subscription_count"] == 1),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l["step"] == "wrong secret refused"));
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// The protocol's edges, on a bare WebSocket
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn unsupported_or_missing_protocol_versions_and_unknown_keys_close_with_pusher_codes() {
    let server = pusher_server().await;
    for (path, code) in [
        ("/app/app-key?protocol=8", 4007),
        ("/app/app-key?protocol=seven", 4006),
        ("/app/app-key", 4008),
        ("/app/nope?protocol=7", 4001),
    ] {
        let mut raw = Raw::connect(&server, path).await;
        let error: Value = serde_json::from_str(&raw.socket_id).unwrap();
        assert_eq!(error["event"], "pusher:error", "{path}");
        assert_eq!(error["data"]["code"], code, "{path}");
        assert_eq!(raw.next().await, json!({"close": code}), "{path}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn connections_over_the_app_quota_are_closed_with_4004() {
    let server = TestServer::with(|c| app(c, |a| a.max_connections = 1)).await;
    let _first = Raw::connect(&server, "/app/app-key?protocol=7").await;
    let mut second = Raw::connect(&server, "/app/app-key?protocol=7").await;
    let error: Value = serde_json::from_str(&second.socket_id).unwrap();
    assert_eq!(error["data"]["code"], 4004);
    assert_eq!(second.next().await, json!({"close": 4004}));
    server.shutdown().await;
}

#[tokio::test]
async fn ping_gets_pong_and_client_events_are_refused_when_the_app_does_not_allow_them() {
    let server = TestServer::with(|c| app(c, |a| a.client_events = false)).await;
    let mut raw = Raw::connect(&server, "/app/app-key?protocol=7").await;
    raw.send(json!({"event": "pusher:ping", "data": {}})).await;
    assert_eq!(raw.next().await["event"], "pusher:pong");
    let channel = "private-x";
    let sig = tidings_pusher::sign::sign(SECRET, &format!("{}:{channel}", raw.socket_id));
    raw.send(json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": format!("{KEY}:{sig}")}}))
        .await;
    raw.next_event("pusher_internal:subscription_succeeded")
        .await;
    raw.send(json!({"event": "client-x", "channel": channel, "data": {}}))
        .await;
    let err = raw.next_event("pusher:error").await;
    assert!(
        err["data"]["message"]
            .as_str()
            .unwrap()
            .contains("client_events = false"),
        "{err}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_cache_channel_replays_its_last_event_on_subscribe_and_says_cache_miss_when_empty() {
    let server = pusher_server().await;
    let mut a = Raw::connect(&server, "/app/app-key?protocol=7").await;
    a.send(json!({"event": "pusher:subscribe", "data": {"channel": "cache-weather"}}))
        .await;
    a.next_event("pusher_internal:subscription_succeeded").await;
    assert_eq!(a.next().await["event"], "pusher:cache_miss");
    for n in [1, 2] {
        let res = server
            .http
            .post(format!(
                "{}/publish/pusher:1001:cache-weather?event=temp",
                server.url
            ))
            .header("content-type", "application/json")
            .body(format!("{{\"n\":{n}}}"))
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success());
    }
    let mut b = Raw::connect(&server, "/app/app-key?protocol=7").await;
    b.send(json!({"event": "pusher:subscribe", "data": {"channel": "cache-weather"}}))
        .await;
    b.next_event("pusher_internal:subscription_succeeded").await;
    let last = b.next().await;
    assert_eq!(last["event"], "temp");
    assert_eq!(last["data"], "{\"n\":2}");
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Webhooks
// ---------------------------------------------------------------------------------------------

/// One webhook request as received: its headers (lowercased names) and body.
struct Hook {
    headers: std::collections::HashMap<String, String>,
    body: String,
}

/// Accepts one request on `listener`, answers `status`, returns what came.
async fn receive_hook(listener: &tokio::net::TcpListener, status: u16) -> Hook {
    let (s, _) = tokio::time::timeout(TIMEOUT, listener.accept())
        .await
        .expect("no webhook within the timeout")
        .unwrap();
    read_hook(s, status).await
}

/// Reads one webhook request from `s` and answers `status`.
async fn read_hook<S>(mut s: S, status: u16) -> Hook
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head_end, length) = loop {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the webhook request ended early");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            break (i + 4, length);
        }
    };
    while buf.len() < head_end + length {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the webhook body ended early");
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).into_owned();
    let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    s.write_all(answer.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    Hook { headers, body }
}

/// A webhook endpoint speaking TLS with a certificate for `localhost` made for this test:
/// its listener, its acceptor, and the certificate's PEM file (the CA a test may trust).
struct TlsHooks {
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    ca_file: PathBuf,
    dir: PathBuf,
}

impl TlsHooks {
    async fn start() -> Self {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let dir = std::env::temp_dir().join(format!(
            "tidings-tls-hooks-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, cert.cert.pem()).unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        Self {
            listener: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            acceptor: tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)),
            ca_file,
            dir,
        }
    }

    /// The URL names `localhost`, the name in the certificate (and the SNI expected).
    fn url(&self) -> String {
        format!(
            "https://localhost:{}/pusher/webhook",
            self.listener.local_addr().unwrap().port()
        )
    }

    /// The next connection's TLS handshake: the stream and the SNI the client sent, or the
    /// handshake's error.
    async fn accept(
        &self,
    ) -> Result<
        (
            tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
            String,
        ),
        String,
    > {
        let (tcp, _) = tokio::time::timeout(TIMEOUT, self.listener.accept())
            .await
            .expect("no webhook connection within the timeout")
            .unwrap();
        let tls = tokio::time::timeout(TIMEOUT, self.acceptor.accept(tcp))
            .await
            .expect("no TLS handshake within the timeout")
            .map_err(|e| e.to_string())?;
        let sni = tls.get_ref().1.server_name().unwrap_or_default().to_owned();
        Ok((tls, sni))
    }
}

impl Drop for TlsHooks {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Subscribes a fresh connection to the public channel `channel` (a `channel_occupied`).
async fn occupy(server: &TestServer, channel: &str) -> Raw {
    let mut raw = Raw::connect(server, "/app/app-key?protocol=7").await;
    raw.send(json!({"event": "pusher:subscribe", "data": {"channel": channel}}))
        .await;
    raw.next_event("pusher_internal:subscription_succeeded")
        .await;
    raw
}

#[tokio::test]
async fn https_webhooks_reach_an_endpoint_whose_ca_is_configured_signed_and_with_its_name_as_sni() {
    let hooks = TlsHooks::start().await;
    let (url, ca) = (hooks.url(), hooks.ca_file.clone());
    let server = TestServer::with(|c| {
        app(c, |a| {
            a.webhook_url = Some(url);
            a.webhook_ca_file = Some(ca);
        })
    })
    .await;
    let _raw = occupy(&server, "secure-news").await;
    let (tls, sni) = hooks.accept().await.expect("the handshake succeeds");
    assert_eq!(sni, "localhost");
    let hook = read_hook(tls, 200).await;
    assert_eq!(hook.headers["x-pusher-key"], KEY);
    assert_eq!(
        hook.headers["x-pusher-signature"],
        tidings_pusher::sign::sign(SECRET, &hook.body)
    );
    let body: Value = serde_json::from_str(&hook.body).unwrap();
    assert_eq!(body["events"][0]["name"], "channel_occupied", "{body}");
    assert_eq!(body["events"][0]["channel"], "secure-news", "{body}");
    server
        .await_metric("tidings_pusher_webhooks_sent_total{app_id=\"1001\"}", 1.0)
        .await;
    assert_eq!(
        server
            .metric("tidings_pusher_webhooks_failed_total{app_id=\"1001\"}")
            .await,
        0.0
    );
    server.shutdown().await;
}

#[tokio::test]
async fn an_https_webhook_endpoint_with_an_untrusted_certificate_is_refused_counted_as_failed_and_retried()
 {
    let hooks = TlsHooks::start().await;
    let url = hooks.url();
    // No webhook_ca_file: the system's roots do not know this certificate.
    let server = TestServer::with(|c| app(c, |a| a.webhook_url = Some(url))).await;
    let _raw = occupy(&server, "secure-news").await;
    for attempt in 1..=2 {
        let refused = hooks.accept().await.err().unwrap_or_else(|| {
            panic!("attempt {attempt}: the sender went on with an untrusted certificate")
        });
        // The sender's alert: it did not trust the certificate.
        assert!(
            refused.contains("UnknownCA") || refused.contains("BadCertificate"),
            "attempt {attempt}: {refused}"
        );
    }
    let failed = "tidings_pusher_webhooks_failed_total{app_id=\"1001\"}";
    tidings_testkit::eventually(
        "two failed webhook attempts counted",
        TIMEOUT,
        std::time::Duration::from_millis(20),
        async || server.metric(failed).await >= 2.0,
    )
    .await;
    assert_eq!(
        server
            .metric("tidings_pusher_webhooks_sent_total{app_id=\"1001\"}")
            .await,
        0.0
    );
    server.shutdown().await;
}

#[tokio::test]
async fn an_https_webhook_endpoint_whose_certificate_names_another_host_is_refused_even_with_its_ca()
 {
    let hooks = TlsHooks::start().await;
    // The certificate is for localhost; the URL names 127.0.0.1.
    let url = hooks.url().replace("localhost", "127.0.0.1");
    let ca = hooks.ca_file.clone();
    let server = TestServer::with(|c| {
        app(c, |a| {
            a.webhook_url = Some(url);
            a.webhook_ca_file = Some(ca);
        })
    })
    .await;
    let _raw = occupy(&server, "secure-news").await;
    let Err(refused) = hooks.accept().await else {
        panic!("the sender went on with a certificate for another name");
    };
    assert!(refused.contains("BadCertificate"), "{refused}");
    let failed = "tidings_pusher_webhooks_failed_total{app_id=\"1001\"}";
    tidings_testkit::eventually(
        "the failed attempt counted",
        TIMEOUT,
        std::time::Duration::from_millis(20),
        async || server.metric(failed).await >= 1.0,
    )
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_webhook_ca_file_that_cannot_be_read_refuses_the_server_with_the_key_named() {
    let mut config = Config::default();
    app(&mut config, |a| {
        a.webhook_url = Some("https://hooks.example/h".into());
        a.webhook_ca_file = Some("/nonexistent/tidings-ca.pem".into());
    });
    let e = tidings_server::AppState::new(config)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("pusher.apps[0]") && e.contains("webhook_ca_file"),
        "{e}"
    );
}

#[tokio::test]
async fn webhooks_are_signed_batched_and_retried_until_the_endpoint_accepts_them() {
    let hooks = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/pusher/webhook", hooks.local_addr().unwrap());
    let server = TestServer::with(|c| app(c, |a| a.webhook_url = Some(url))).await;
    let mut raw = Raw::connect(&server, "/app/app-key?protocol=7").await;
    let channel = "presence-hooked";
    let data = r#"{"user_id":"u9"}"#;
    let sig = tidings_pusher::sign::sign(SECRET, &format!("{}:{channel}:{data}", raw.socket_id));
    raw.send(json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": format!("{KEY}:{sig}"), "channel_data": data}}))
        .await;
    raw.next_event("pusher_internal:subscription_succeeded")
        .await;
    // The endpoint fails the first time: the same batch comes again.
    let first = receive_hook(&hooks, 500).await;
    let again = receive_hook(&hooks, 200).await;
    assert_eq!(first.body, again.body);
    assert_eq!(again.headers["x-pusher-key"], KEY);
    assert_eq!(
        again.headers["x-pusher-signature"],
        tidings_pusher::sign::sign(SECRET, &again.body)
    );
    let body: Value = serde_json::from_str(&again.body).unwrap();
    let names: Vec<&str> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["channel_occupied", "member_added"], "{body}");
    assert_eq!(body["events"][1]["user_id"], "u9");
    // Leaving sends the other half.
    raw.send(json!({"event": "pusher:unsubscribe", "data": {"channel": channel}}))
        .await;
    let left: Value = serde_json::from_str(&receive_hook(&hooks, 200).await.body).unwrap();
    let names: Vec<&str> = left["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["member_removed", "channel_vacated"], "{left}");
    server
        .await_metric("tidings_pusher_webhooks_sent_total{app_id=\"1001\"}", 2.0)
        .await;
    server
        .await_metric("tidings_pusher_webhooks_failed_total{app_id=\"1001\"}", 1.0)
        .await;
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

#[test]
fn pusher_apps_parse_from_toml_and_bad_ones_are_refused_with_the_key_named() {
    let ok = Config::from_toml(
        "[[pusher.apps]]\nid = 1001\nkey = \"k\"\nsecret = \"s\"\nclient_events = true\n\n[[pusher.apps]]\nid = \"1002\"\nkey = \"k2\"\nsecret = \"s2\"\nwebhook_url = \"http://127.0.0.1:9/h\"\n",
    )
    .unwrap();
    assert_eq!(ok.pusher.apps.len(), 2);
    assert_eq!(ok.pusher.apps[0].id, "1001");
    assert!(ok.pusher.apps[0].client_events);
    assert!(!format!("{ok:?}").contains("\"s2\""), "secrets are masked");
    for (toml, names) in [
        (
            "[[pusher.apps]]\nid = \"x\"\nkey = \"k\"\nsecret = \"s\"\n",
            "pusher.apps[0].id",
        ),
        ("[[pusher.apps]]\nid = \"1\"\nkey = \"k\"\n", "secret"),
        (
            "[[pusher.apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\nbogus = 1\n",
            "bogus",
        ),
        (
            "[[pusher.apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\nwebhook_url = \"ftp://x/\"\n",
            "webhook_url",
        ),
        (
            "[[pusher.apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\nwebhook_url = \"http://x/\"\nwebhook_ca_file = \"ca.pem\"\n",
            "webhook_ca_file",
        ),
    ] {
        let e = Config::from_toml(toml).unwrap_err().to_string();
        assert!(e.contains(names), "{toml}: {e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Two nodes on one Redis
// ---------------------------------------------------------------------------------------------

/// POSTs `body` to the HTTP API path `path`, signed as the SDKs sign.
async fn signed_post(server: &TestServer, path: &str, body: &str) -> u16 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut query = vec![
        ("auth_key".to_owned(), KEY.to_owned()),
        ("auth_timestamp".to_owned(), now.to_string()),
        ("auth_version".to_owned(), "1.0".to_owned()),
        (
            "body_md5".to_owned(),
            tidings_pusher::sign::md5_hex(body.as_bytes()),
        ),
    ];
    let sig = tidings_pusher::sign::sign_request(SECRET, "POST", path, &query);
    query.push(("auth_signature".to_owned(), sig));
    let q: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
    server
        .http
        .post(format!("{}{path}?{}", server.url, q.join("&")))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_two_nodes_sharing_redis_triggers_client_events_socket_id_exclusion_and_terminations_cross_nodes()
 {
    let redis = redis_support::shared();
    let prefix = redis_support::unique_prefix("pusher");
    let node = || {
        let (url, prefix) = (redis.url(), prefix.clone());
        TestServer::with(move |c| {
            c.broker.url = url;
            c.broker.prefix = prefix;
            app(c, |_| {});
        })
    };
    let (a, b) = (node().await, node().await);
    let mut on_b = Raw::connect(&b, "/app/app-key?protocol=7").await;
    let mut on_a = Raw::connect(&a, "/app/app-key?protocol=7").await;
    for raw in [&mut on_a, &mut on_b] {
        let sig = tidings_pusher::sign::sign(SECRET, &format!("{}:private-x", raw.socket_id));
        raw.send(json!({"event": "pusher:subscribe", "data": {"channel": "private-x", "auth": format!("{KEY}:{sig}")}}))
            .await;
        raw.next_event("pusher_internal:subscription_succeeded")
            .await;
    }
    let body =
        json!({"name": "across", "channels": ["private-x"], "data": "{\"n\":1}"}).to_string();
    assert_eq!(signed_post(&a, "/apps/1001/events", &body).await, 200);
    assert_eq!(on_b.next_event("across").await["data"], "{\"n\":1}");
    on_a.send(json!({"event": "client-hi", "channel": "private-x", "data": {"from": "a"}}))
        .await;
    let hi = on_b.next_event("client-hi").await;
    assert_eq!(hi["data"], "{\"from\":\"a\"}");
    // A trigger on a excluding the socket on b: b skips it (the exclusion travels in the
    // message), and the next event b gets is the one after.
    let skip = json!({"name": "skipped", "channels": ["private-x"], "data": "1", "socket_id": on_b.socket_id}).to_string();
    assert_eq!(signed_post(&a, "/apps/1001/events", &skip).await, 200);
    let after = json!({"name": "after", "channels": ["private-x"], "data": "2"}).to_string();
    assert_eq!(signed_post(&a, "/apps/1001/events", &after).await, 200);
    assert_eq!(on_a.next_event("skipped").await["data"], "1");
    let next = on_b.next().await;
    assert_eq!(next["event"], "after", "{next}");
    a.await_metric(
        "tidings_pusher_events_triggered_total{app_id=\"1001\"}",
        3.0,
    )
    .await;
    // terminate_connections asked on a ends the user's connection on b.
    let user_data = r#"{"id":"u7"}"#;
    let sig = tidings_pusher::sign::sign(SECRET, &format!("{}::user::{user_data}", on_b.socket_id));
    on_b.send(json!({"event": "pusher:signin", "data": {"auth": format!("{KEY}:{sig}"), "user_data": user_data}}))
        .await;
    on_b.next_event("pusher:signin_success").await;
    assert_eq!(
        signed_post(&a, "/apps/1001/users/u7/terminate_connections", "{}").await,
        200
    );
    loop {
        let v = on_b.next().await;
        if v.get("close").is_some() {
            assert_eq!(v["close"], 4009, "{v}");
            break;
        }
    }
    a.shutdown().await;
    b.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Pusher's private and presence channels on Tidings' own transports
// ---------------------------------------------------------------------------------------------

/// The status and error code of a request that is answered at once (a refusal), or the
/// status of one that starts streaming.
async fn status_of(req: reqwest::RequestBuilder) -> (u16, String) {
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    if status == 200 {
        return (status, String::new());
    }
    let body: Value = serde_json::from_str(&res.text().await.unwrap()).unwrap();
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_owned(),
    )
}

#[tokio::test]
async fn pusher_private_and_presence_channels_refuse_tidings_transports_without_an_api_key_or_a_grant()
 {
    let protected = [
        "pusher:1001:private-x",
        "pusher:1001:presence-room",
        "pusher:1001:private-encrypted-y",
    ];
    // Open mode: nobody can show a grant, so nobody reads or writes them.
    let open = pusher_server().await;
    for c in protected {
        for path in [
            format!("/sse/{c}"),
            format!("/poll/{c}"),
            format!("/stream/{c}"),
        ] {
            let got = status_of(open.http.get(format!("{}{path}", open.url))).await;
            assert_eq!(got, (403, "pusher_channel_protected".into()), "{path}");
        }
    }
    let public = status_of(open.http.get(format!("{}/sse/pusher:1001:news", open.url))).await;
    assert_eq!(public.0, 200, "public Pusher channels stay open");
    open.shutdown().await;

    // With [auth]: an API key, or a token whose grants name the channel.
    let jwt = "jwt-secret-for-the-pusher-test-0123456789";
    let secured = TestServer::with(|c| {
        app(c, |_| {});
        c.auth.api_keys = vec![tidings_server::config::Secret(
            "api-key-for-the-pusher-test".into(),
        )];
        c.auth.jwt_secret = Some(tidings_server::config::Secret(jwt.into()));
    })
    .await;
    let token = |grants: &[&str]| {
        tidings_server::auth::jwt::mint_hs256(
            jwt,
            &tidings_server::auth::jwt::Claims {
                sub: Some("ann".into()),
                exp: Some(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs()
                        + 600,
                ),
                nbf: None,
                iat: None,
                tidings: tidings_server::auth::jwt::Grants {
                    subscribe: grants.iter().map(|g| (*g).to_owned()).collect(),
                    publish: Vec::new(),
                },
            },
        )
        .unwrap()
    };
    let sse = |bearer: String| {
        secured
            .http
            .get(format!("{}/poll/pusher:1001:private-x", secured.url))
            .bearer_auth(bearer)
    };
    assert_eq!(
        status_of(sse("api-key-for-the-pusher-test".into())).await.0,
        200
    );
    assert_eq!(
        status_of(sse(token(&["pusher:1001:private-*"]))).await.0,
        200
    );
    assert_eq!(
        status_of(sse(token(&["pusher:1001:news"]))).await,
        (403, "pusher_channel_protected".into())
    );
    secured.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Reloading apps (SIGHUP)
// ---------------------------------------------------------------------------------------------

/// Waits for the connection's close frame and returns its code.
async fn close_code(raw: &mut Raw) -> Value {
    loop {
        let v = raw.next().await;
        if let Some(code) = v.get("close") {
            return code.clone();
        }
    }
}

#[tokio::test]
async fn a_reload_keeps_unchanged_apps_closes_changed_ones_4200_removed_ones_4001_and_serves_new_ones()
 {
    let with = |c: &mut Config, id: &str, key: &str| {
        app(c, |a| {
            a.id = id.into();
            a.key = key.into();
        })
    };
    let server = TestServer::with(|c| {
        app(c, |_| {});
        with(c, "1002", "changed-key");
        with(c, "1003", "gone-key");
    })
    .await;
    let mut kept = Raw::connect(&server, "/app/app-key?protocol=7").await;
    let mut changed = Raw::connect(&server, "/app/changed-key?protocol=7").await;
    let mut gone = Raw::connect(&server, "/app/gone-key?protocol=7").await;
    let mut config = (*server.state.config()).clone();
    config.pusher.apps.retain(|a| a.id != "1003");
    config.pusher.apps[1].client_events = false;
    with(&mut config, "1004", "new-key");
    let done = tidings_server::lifecycle::reload(&server.state, config).unwrap();
    assert!(done.needs_restart.is_empty(), "{:?}", done.needs_restart);
    assert_eq!(close_code(&mut changed).await, 4200);
    assert_eq!(close_code(&mut gone).await, 4001);
    kept.send(json!({"event": "pusher:ping", "data": {}})).await;
    assert_eq!(kept.next().await["event"], "pusher:pong");
    let fresh = Raw::connect(&server, "/app/new-key?protocol=7").await;
    assert!(!fresh.socket_id.contains("close"), "{}", fresh.socket_id);
    let mut refused = Raw::connect(&server, "/app/gone-key?protocol=7").await;
    assert_eq!(close_code(&mut refused).await, 4001);
    // The changed app runs with its new settings: client events are refused now.
    let mut again = Raw::connect(&server, "/app/changed-key?protocol=7").await;
    let sig = tidings_pusher::sign::sign(SECRET, &format!("{}:private-r", again.socket_id));
    again
        .send(json!({"event": "pusher:subscribe", "data": {"channel": "private-r", "auth": format!("changed-key:{sig}")}}))
        .await;
    again
        .next_event("pusher_internal:subscription_succeeded")
        .await;
    again
        .send(json!({"event": "client-x", "channel": "private-r", "data": {}}))
        .await;
    let err = again.next_event("pusher:error").await;
    assert!(err.to_string().contains("disabled"), "{err}");
    server.shutdown().await;
}

/// Shutdown reaches Pusher sockets the way it reaches `/ws` sessions: through their queues,
/// in the hub's one pass (`lifecycle::follow`), not a shutdown wait of their own. Each one,
/// idle or following a channel, is watched by the hub while it is open and closed with 4100
/// ("Server is restarting": pusher-js retries after a second) when the server stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_shutdown_every_pusher_socket_is_closed_with_4100_through_the_hubs_one_pass() {
    let server = pusher_server().await;
    let mut idle = Raw::connect(&server, "/app/app-key?protocol=7").await;
    let mut following = Raw::connect(&server, "/app/app-key?protocol=7").await;
    following
        .send(json!({"event": "pusher:subscribe", "data": {"channel": "news"}}))
        .await;
    following
        .next_event("pusher_internal:subscription_succeeded")
        .await;
    let hub = server.state.node.hub.clone();
    tidings_testkit::eventually(
        "both sockets watched by the hub",
        TIMEOUT,
        std::time::Duration::from_millis(10),
        async || hub.watched() == 2,
    )
    .await;
    let stopping = tokio::spawn(server.shutdown());
    assert_eq!(close_code(&mut idle).await, 4100);
    assert_eq!(close_code(&mut following).await, 4100);
    tokio::time::timeout(TIMEOUT, stopping)
        .await
        .expect("the server stopped")
        .unwrap();
}
