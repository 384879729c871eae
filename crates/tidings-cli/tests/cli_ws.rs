//! `tidings publish --transport ws` and `tidings subscribe --transport ws` end to end, against a
//! real `tidings serve` on port 0 (its address read from stderr), as a user would run them.
//!
//! Every wait is bounded (`WAIT`) and waits for an event (a line on a pipe, an exit), never for
//! a fixed time. Every process is killed when its handle is dropped, so a failing test leaves no
//! server behind. The helpers follow those of `cli.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tidings_testkit::{Proc, Served, cli};
use tokio::process::Command;

/// The longest any single wait (a line, an exit) may take before the test fails.
const WAIT: Duration = Duration::from_secs(20);

/// `tidings` with a clean environment: no `TIDINGS_*` variable of the caller leaks in.
fn tidings() -> Command {
    tidings_testkit::command(env!("CARGO_BIN_EXE_tidings"))
}

/// Runs `tidings ARGS` to completion (stdin from `input` when given), within `WAIT`.
async fn run(args: &[&str], input: Option<&[u8]>) -> Output {
    cli::run(env!("CARGO_BIN_EXE_tidings"), args, input, WAIT).await
}

/// Runs `tidings ARGS`, expecting success; returns stdout.
async fn run_ok(args: &[&str], input: Option<&[u8]>) -> String {
    cli::succeeded(args, &run(args, input).await)
}

/// Runs `tidings ARGS`, expecting failure with nothing on stdout; returns stderr.
async fn run_err(args: &[&str]) -> String {
    cli::failed(args, &run(args, None).await, true)
}

/// A running `tidings serve --listen 127.0.0.1:0` (`tidings_testkit::Served`: killed when
/// dropped).
struct Server {
    _served: Served,
    url: String,
    http: reqwest::Client,
}

impl Server {
    /// Returns once the server printed `tidings listening on http://ADDR`.
    async fn start() -> Self {
        let mut cmd = tidings();
        cmd.args(["serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::null());
        let served = Served::listening(cmd, WAIT).await;
        let url = served.url.clone();
        assert!(url.starts_with("http://"), "{url}");
        Self {
            _served: served,
            url,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    /// `tidings publish CHANNEL DATA --transport ws`; returns the printed line.
    async fn publish_ws(&self, channel: &str, data: &str) -> String {
        let out = run_ok(
            &[
                "publish",
                channel,
                data,
                "--transport",
                "ws",
                "--url",
                &self.url,
            ],
            None,
        )
        .await;
        one_line(&out)
    }

    /// The data of every message in `channel`'s history, oldest first.
    async fn history_data(&self, channel: &str) -> Vec<Value> {
        let url = format!("{}/api/channels/{channel}/history", self.url);
        let history = self
            .http
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let history = parse(&history);
        history["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["data"].clone())
            .collect()
    }
}

fn one_line(out: &str) -> String {
    assert_eq!(out.lines().count(), 1, "one line expected: {out:?}");
    out.trim_end().to_owned()
}

fn parse(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
}

/// The top-level keys of a flat JSON object, in the order written (positions hold no nesting
/// and no commas or colons inside their strings).
fn keys_in_order(line: &str) -> Vec<String> {
    line.trim_matches(|c| c == '{' || c == '}')
        .split(',')
        .map(|member| {
            member
                .split(':')
                .next()
                .unwrap()
                .trim_matches('"')
                .to_owned()
        })
        .collect()
}

/// A running `tidings subscribe`, read line by line; killed when dropped.
fn subscriber(args: &[&str]) -> Proc {
    let mut cmd = tidings();
    cmd.arg("subscribe").args(args);
    Proc::spawn("tidings subscribe", cmd, "it is built with the tests")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_over_ws_prints_the_same_position_json_as_the_http_publish() {
    let server = Server::start().await;
    let over_ws = server.publish_ws("news", r#"{"title":"hi"}"#).await;
    let over_http = one_line(
        &run_ok(
            &[
                "publish",
                "news",
                r#"{"title":"again"}"#,
                "--url",
                &server.url,
            ],
            None,
        )
        .await,
    );
    assert_eq!(keys_in_order(&over_ws), keys_in_order(&over_http));
    let (ws, http) = (parse(&over_ws), parse(&over_http));
    assert_eq!(
        keys_in_order(&over_ws),
        ["channel", "offset", "epoch", "cursor", "time"]
    );
    assert_eq!((&ws["channel"], &ws["offset"]), (&json!("news"), &json!(1)));
    assert_eq!(http["offset"], 2);
    assert_eq!(ws["epoch"], http["epoch"]);
    assert!(ws["cursor"].as_str().is_some_and(|c| !c.is_empty()), "{ws}");
    assert!(ws["time"].as_u64().is_some_and(|t| t > 0), "{ws}");
    assert_eq!(
        server.history_data("news").await,
        [json!({"title": "hi"}), json!({"title": "again"})]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_over_ws_sends_text_as_a_string_and_binary_stdin_as_base64() {
    let server = Server::start().await;
    server.publish_ws("news", "plain text").await;
    let piped = [
        "publish",
        "news",
        "-",
        "--transport",
        "ws",
        "--url",
        &server.url,
    ];
    run_ok(&piped, Some(b"from stdin\n")).await;
    run_ok(&piped, Some(&[0xff, 0x00, 0x01])).await;
    assert_eq!(
        server.history_data("news").await,
        [json!("plain text"), json!("from stdin"), json!("/wAB")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_over_ws_replays_history_then_prints_the_live_message_and_exits_at_count() {
    let server = Server::start().await;
    let mut published = Vec::new();
    for n in 1..=2 {
        let data = json!({ "n": n, "x": 1.50 });
        published.push((
            parse(&server.publish_ws("news", &data.to_string()).await),
            data,
        ));
    }
    let mut sub = subscriber(&[
        "news",
        "--transport",
        "ws",
        "--history",
        "2",
        "--count",
        "3",
        "--url",
        &server.url,
    ]);
    sub.wait_for_lines(2).await;
    let data = json!({ "n": 3, "x": 1.50 });
    published.push((
        parse(&server.publish_ws("news", &data.to_string()).await),
        data,
    ));
    let lines = sub.finish_ok().await;

    assert_eq!(lines.len(), 3, "{}", sub.context());
    for (line, (position, data)) in lines.iter().zip(&published) {
        let envelope = parse(line);
        for key in ["channel", "offset", "epoch", "cursor", "time"] {
            assert_eq!(envelope[key], position[key], "{key} of {line}");
        }
        assert_eq!(&envelope["data"], data, "{line}");
        assert!(envelope.get("type").is_none(), "{line}");
        // The envelope as the server wrote it, numbers included.
        assert!(line.starts_with(r#"{"channel":"news","offset":"#), "{line}");
        assert!(line.contains(r#""x":1.5"#), "{line}");
    }

    // Byte for byte what the HTTP stream prints for the same messages.
    let over_stream = subscriber(&[
        "news",
        "--transport",
        "stream",
        "--history",
        "3",
        "--count",
        "3",
        "--url",
        &server.url,
    ])
    .finish_ok()
    .await;
    assert_eq!(lines, over_stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_errors_end_the_command_with_the_servers_message() {
    let server = Server::start().await;
    let stderr = run_err(&[
        "publish",
        "bad name!",
        "x",
        "--transport",
        "ws",
        "--url",
        &server.url,
    ])
    .await;
    assert!(
        stderr.contains("invalid_channel")
            && stderr.contains(r#"invalid channel name "bad name!""#),
        "{stderr}"
    );

    let stderr = subscriber(&[
        "news",
        "bad name!",
        "--transport",
        "ws",
        "--url",
        &server.url,
    ])
    .finish_err()
    .await;
    assert!(
        stderr.contains("invalid_channel") && stderr.contains(r#""bad name!""#),
        "{stderr}"
    );

    let stderr = run_err(&[
        "publish",
        "news",
        "x",
        "--transport",
        "ws",
        "--url",
        "wss://127.0.0.1:1",
    ])
    .await;
    // wss:// names the https:// server (cli_tls.rs covers one that listens).
    assert!(
        stderr.contains("https://127.0.0.1:1") && stderr.contains("connection refused"),
        "{stderr}"
    );
}
