//! Tidings' WebSocket transports against other people's clients: the Python `websockets`
//! library (`tests/clients/ws_python.py`) and the npm `ws` package (`tests/clients/ws_node.mjs`),
//! each spawned against a real server on port 0.
//!
//! These tests need what `scripts/test.sh` installs (`.venv/` with `websockets`,
//! `tests/clients/node_modules/` with `ws`). A missing tool fails the test with a message that
//! says so; nothing is skipped silently.
//!
//! No test sleeps: each step waits (with a timeout) for a line on a client's stdout, or for its
//! exit, and only then does the next thing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::process::Command;

use common::TestServer;
use tidings_testkit::Proc;

const INSTALL_HINT: &str = "run scripts/test.sh once: it installs the Python venv (.venv/, with \
                            websockets) and the Node modules (tests/clients/node_modules/, with ws) \
                            these tests spawn";

// ---------------------------------------------------------------------------------------------
// The two clients
// ---------------------------------------------------------------------------------------------

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn clients_dir() -> PathBuf {
    let dir = std::env::var_os("TIDINGS_CLIENTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("tests/clients"));
    assert!(
        dir.join("ws_python.py").is_file() && dir.join("ws_node.mjs").is_file(),
        "no WebSocket test clients in {}; {INSTALL_HINT}",
        dir.display()
    );
    dir
}

#[derive(Clone, Copy, Debug)]
enum Client {
    /// `ws_python.py`, on the `websockets` library.
    Python,
    /// `ws_node.mjs`, on the `ws` package.
    Node,
}

impl Client {
    /// The text frame the client sends in raw mode, and the data it publishes in JSON mode.
    fn hello(self) -> &'static str {
        match self {
            Client::Python => "hello from websockets",
            Client::Node => "hello from ws",
        }
    }

    fn library(self) -> &'static str {
        match self {
            Client::Python => "websockets",
            Client::Node => "ws",
        }
    }

    /// The command line for `args` (after the base URL), checked to be runnable first.
    fn command(self, server: &TestServer, args: &[&str]) -> Command {
        let dir = clients_dir();
        let mut cmd = match self {
            Client::Python => {
                let mut cmd = Command::new(python());
                cmd.arg(dir.join("ws_python.py"));
                cmd
            }
            Client::Node => {
                let mut cmd = Command::new(node());
                cmd.arg(dir.join("ws_node.mjs"));
                cmd
            }
        };
        cmd.arg(&server.url).args(args);
        cmd
    }

    fn spawn(self, server: &TestServer, args: &[&str]) -> Proc {
        let name = format!("{self:?} client ({}) {}", self.library(), args.join(" "));
        Proc::spawn(&name, self.command(server, args), INSTALL_HINT)
    }
}

/// The venv's python, checked to import `websockets`.
fn python() -> PathBuf {
    let python = std::env::var_os("TIDINGS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/python"));
    let ok = std::process::Command::new(&python)
        .args(["-c", "import websockets.asyncio.client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} cannot import websockets (set TIDINGS_PYTHON or {INSTALL_HINT})",
        python.display()
    );
    python
}

/// `node`, checked to be runnable, with the `ws` package installed next to the clients.
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
        modules.join("ws/package.json").is_file(),
        "the npm package ws is not installed in {}; {INSTALL_HINT}",
        modules.display()
    );
    node
}

/// The Node and Python WebSocket clients print one JSON record per line.
trait JsonLines {
    /// The next stdout line, parsed as JSON; the output must not end here.
    async fn json(&mut self) -> Value;
    /// Skips JSON lines until one satisfies `pred`, and returns it.
    async fn json_where(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value;
    /// Reads stdout to its end, waits for the exit, which must be a success, and returns
    /// every line the client printed, parsed.
    async fn finish_json(&mut self) -> Vec<Value>;
}

impl JsonLines for Proc {
    async fn json(&mut self) -> Value {
        let line = self.line().await;
        serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!(
                "{} printed a line that is not JSON ({e}): {line:?}\n{}",
                self.name,
                self.context()
            )
        })
    }

    async fn json_where(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..1000 {
            let v = self.json().await;
            if pred(&v) {
                return v;
            }
        }
        panic!("{} never printed {what}\n{}", self.name, self.context());
    }

    async fn finish_json(&mut self) -> Vec<Value> {
        self.finish_ok()
            .await
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn text_frame(text: &str) -> Value {
    json!({"kind": "text", "data": text})
}

fn binary_frame(bytes: &[u8]) -> Value {
    json!({"kind": "binary", "data": base64::engine::general_purpose::STANDARD.encode(bytes)})
}

// ---------------------------------------------------------------------------------------------
// Raw mode: /ws/{channel}
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_and_node_ws_on_one_raw_channel_each_receive_both_hellos_then_binary_as_binary_and_json_as_text()
 {
    let server = TestServer::spawn().await;
    let (py, nd) = (Client::Python, Client::Node);

    // Python alone on the channel: raw mode echoes its hello back to it, the sender included.
    let mut python = py.spawn(&server, &["raw", "duet", "4"]);
    assert_eq!(
        python.json().await,
        text_frame(py.hello()),
        "{}",
        python.context()
    );

    // Node joins with history=10: Python's hello comes from history, then Node's own, live.
    let mut node = nd.spawn(&server, &["raw", "duet", "4", "10"]);
    assert_eq!(
        node.json().await,
        text_frame(py.hello()),
        "{}",
        node.context()
    );
    assert_eq!(
        node.json().await,
        text_frame(nd.hello()),
        "{}",
        node.context()
    );
    // ...and Python, subscribed all along, gets Node's hello live.
    assert_eq!(
        python.json().await,
        text_frame(nd.hello()),
        "{}",
        python.context()
    );

    // Binary published over HTTP (not valid UTF-8) reaches both as a binary frame; JSON data
    // reaches both as its JSON text, in a text frame.
    let bytes = [0x00, 0x9f, 0x92, 0x96, 0xff, b'\n'];
    let res = server
        .http
        .post(format!("{}/publish/duet", server.url))
        .header("content-type", "application/octet-stream")
        .body(bytes.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "binary publish: {:?}", res.text().await);
    server.publish("duet", json!({"n": 1})).await;

    let expected = vec![
        text_frame(py.hello()),
        text_frame(nd.hello()),
        binary_frame(&bytes),
        text_frame(r#"{"n":1}"#),
    ];
    assert_eq!(python.finish_json().await, expected, "{}", python.context());
    assert_eq!(node.finish_json().await, expected, "{}", node.context());

    // The text frames were published as strings, not as binary or JSON.
    let (status, history) = server.get_json("/api/channels/duet/history").await;
    assert_eq!(status, 200, "{history}");
    let messages = history["messages"].as_array().unwrap();
    let data: Vec<&Value> = messages.iter().map(|m| &m["data"]).collect();
    assert_eq!(
        data[..2],
        [&json!(py.hello()), &json!(nd.hello())],
        "{history}"
    );
    assert!(messages[0].get("encoding").is_none(), "{history}");
    assert_eq!(messages[2]["encoding"], "base64", "{history}");
}

// ---------------------------------------------------------------------------------------------
// The JSON protocol: /ws
// ---------------------------------------------------------------------------------------------

/// Two messages in history; the client subscribes with `history`, publishes its own, and takes
/// one more live message after that.
async fn json_protocol_history_then_own_publish_then_live(client: Client) {
    let server = TestServer::spawn().await;
    let channel = "room:json";
    server.publish(channel, json!({"n": 1})).await;
    server.publish(channel, json!({"n": 2})).await;

    let mut proc = client.spawn(&server, &["json", channel, "4", "5"]);
    let reply = proc.json().await;
    assert_eq!(reply["type"], "reply", "{}", proc.context());
    assert_eq!(reply["id"], 1, "{}", proc.context());
    assert_eq!(reply["ok"], true, "{}", proc.context());
    assert!(reply["cursor"].is_string(), "{}", proc.context());

    // Its own publish comes back over its subscription: from here on it is live.
    let own = json!({"from": client.library()});
    proc.json_where("its own message", |v| {
        v["type"] == "message" && v["data"] == own
    })
    .await;
    server.publish(channel, json!({"n": 3})).await;
    let frames = proc.finish_json().await;

    let messages: Vec<&Value> = frames.iter().filter(|v| v["type"] == "message").collect();
    let data: Vec<&Value> = messages.iter().map(|m| &m["data"]).collect();
    assert_eq!(
        data,
        [&json!({"n": 1}), &json!({"n": 2}), &own, &json!({"n": 3})],
        "{}",
        proc.context()
    );
    for (i, m) in messages.iter().enumerate() {
        assert_eq!(m["channel"], channel, "{m}");
        assert_eq!(m["offset"], i as u64 + 1, "{m}");
        assert!(m["epoch"].is_string() && m["cursor"].is_string(), "{m}");
        assert!(m["time"].is_u64(), "{m}");
    }
    let ack = frames
        .iter()
        .find(|v| v["type"] == "reply" && v["id"] == 2)
        .unwrap_or_else(|| panic!("no publish ack\n{}", proc.context()));
    assert_eq!(ack["ok"], true, "{ack}");
    assert_eq!(ack["offset"], 3, "{ack}");
    assert_eq!(ack["epoch"], messages[2]["epoch"], "{ack}");
    assert!(
        frames.iter().all(|v| v.get("error").is_none()),
        "{}",
        proc.context()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_speaks_the_json_protocol_history_first_then_its_acknowledged_publish_then_live_messages()
 {
    json_protocol_history_then_own_publish_then_live(Client::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ws_speaks_the_json_protocol_history_first_then_its_acknowledged_publish_then_live_messages()
 {
    json_protocol_history_then_own_publish_then_live(Client::Node).await;
}
