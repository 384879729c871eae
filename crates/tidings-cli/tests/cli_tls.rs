//! `tidings subscribe`, `publish` and `bench` over `https://` and `wss://`, against a real
//! `tidings serve` with a TLS port (port 0) and a certificate made for the test, as a user would
//! run them: trusted through `--ca-file`, refused without it (with a message that names the
//! certificate problem), accepted with `--insecure`.
//!
//! Every wait is bounded (`WAIT`) and waits for an event (a line, an exit), never for a fixed
//! time; every process is killed when its handle is dropped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use tidings_testkit::{Served, TempDir, cli};
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(20);

fn tidings() -> Command {
    tidings_testkit::command(env!("CARGO_BIN_EXE_tidings"))
}

async fn run(args: &[&str]) -> Output {
    cli::run(env!("CARGO_BIN_EXE_tidings"), args, None, WAIT).await
}

async fn run_ok(args: &[&str]) -> String {
    cli::succeeded(args, &run(args).await)
}

async fn run_err(args: &[&str]) -> String {
    cli::failed(args, &run(args).await, true)
}

/// `tidings serve` with a plain port and a TLS port, both port 0, serving a self-signed
/// certificate for 127.0.0.1 whose PEM is `ca_file`.
struct TlsServer {
    served: Served,
    /// `https://127.0.0.1:PORT`.
    https: String,
    ca_file: String,
    _dir: TempDir,
}

impl TlsServer {
    async fn start() -> Self {
        let dir = TempDir::new("cli-tls");
        std::fs::create_dir_all(&dir.0).unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        let cert_path = PathBuf::from(dir.path()).join("cert.pem");
        let key_path = PathBuf::from(dir.path()).join("key.pem");
        std::fs::write(&cert_path, cert.cert.pem()).unwrap();
        std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
        let mut cmd = tidings();
        cmd.args(["serve", "--listen", "127.0.0.1:0"])
            .env("TIDINGS_SERVER__TLS_LISTEN", "127.0.0.1:0")
            .env("TIDINGS_SERVER__TLS_CERT", &cert_path)
            .env("TIDINGS_SERVER__TLS_KEY", &key_path)
            .stdout(Stdio::null());
        let served = Served::listening(cmd, WAIT).await;
        // The TLS port is announced right after the plain one.
        let https_line = |log: &str| {
            log.lines()
                .find_map(|l| l.strip_prefix("tidings listening on https://"))
                .map(|addr| format!("https://{}", addr.trim()))
        };
        tidings_testkit::eventually(
            "the https:// address",
            WAIT,
            Duration::from_millis(20),
            async || https_line(&served.log()).is_some(),
        )
        .await;
        let https = https_line(&served.log()).unwrap();
        Self {
            served,
            https,
            ca_file: cert_path.to_string_lossy().into_owned(),
            _dir: dir,
        }
    }

    fn wss(&self) -> String {
        self.https.replacen("https://", "wss://", 1)
    }

    /// Publishes `data` to `channel` over https, trusting the server through `--ca-file`.
    async fn publish(&self, channel: &str, data: &str) {
        let args = [
            "publish",
            channel,
            data,
            "--url",
            &self.https,
            "--ca-file",
            &self.ca_file,
        ];
        let out = run_ok(&args).await;
        assert!(out.contains("\"offset\""), "{out}");
    }
}

fn parse(line: &str) -> Value {
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
}

/// `tidings subscribe CHANNEL --transport T --history 1 --count 1 --url URL EXTRA…`: the one
/// message published before, as a record.
async fn subscribe_one(transport: &str, url: &str, channel: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "subscribe",
        channel,
        "--transport",
        transport,
        "--history",
        "1",
        "--count",
        "1",
        "--url",
        url,
    ];
    args.extend_from_slice(extra);
    parse(&run_ok(&args).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_over_wss_and_https_receives_when_the_ca_file_names_the_server() {
    let server = TlsServer::start().await;
    server.publish("secure", r#"{"n":1}"#).await;
    let ca = ["--ca-file", server.ca_file.as_str()];
    for (transport, url) in [
        ("ws", server.wss()),
        ("sse", server.https.clone()),
        ("long-poll", server.https.clone()),
    ] {
        let record = subscribe_one(transport, &url, "secure", &ca).await;
        assert_eq!(record["data"], serde_json::json!({"n":1}), "{transport}");
        assert_eq!(record["channel"], "secure", "{transport}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_without_the_ca_file_fails_at_once_naming_the_certificate_problem() {
    let server = TlsServer::start().await;
    for (transport, url) in [("ws", server.wss()), ("sse", server.https.clone())] {
        let err = run_err(&[
            "subscribe",
            "secure",
            "--transport",
            transport,
            "--url",
            &url,
        ])
        .await;
        assert!(
            err.contains("certificate")
                && err.contains("unknown issuer")
                && err.contains("--ca-file")
                && err.contains("--insecure"),
            "{transport}: {err}"
        );
        // Refused once and for all, not retried with a backoff.
        assert!(!err.contains("reconnecting"), "{transport}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_with_insecure_accepts_a_self_signed_server() {
    let server = TlsServer::start().await;
    server.publish("lax", "hello").await;
    for (transport, url) in [("ws", server.wss()), ("sse", server.https.clone())] {
        let record = subscribe_one(transport, &url, "lax", &["--insecure"]).await;
        assert_eq!(record["data"], "hello", "{transport}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_file_and_insecure_together_are_refused() {
    let err = run_err(&[
        "subscribe",
        "x",
        "--url",
        "https://127.0.0.1:1",
        "--ca-file",
        "ca.pem",
        "--insecure",
    ])
    .await;
    assert!(
        err.contains("--insecure") && err.contains("--ca-file"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_over_wss_delivers_every_message_without_loss() {
    let server = TlsServer::start().await;
    let pid = server.served.child.id().unwrap().to_string();
    let out = run_ok(&[
        "bench",
        "--quiet",
        "--url",
        &server.https,
        "--ca-file",
        &server.ca_file,
        "--transport",
        "ws",
        "-n",
        "20",
        "--rate",
        "50",
        "--duration",
        "1",
        "--settle",
        "0",
        "--drain",
        "5",
        "--server-pid",
        &pid,
    ])
    .await;
    let r = parse(out.lines().last().unwrap());
    assert_eq!(r["connected"], 20, "{r}");
    assert!(r["published"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["deliveries"], r["expected"], "{r}");
    assert_eq!(
        (r["lost"].as_u64(), r["duplicates"].as_u64()),
        (Some(0), Some(0)),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_without_the_ca_file_reports_the_certificate_problem() {
    let server = TlsServer::start().await;
    let out = run_ok(&[
        "bench",
        "--quiet",
        "--url",
        &server.https,
        "--transport",
        "sse",
        "-n",
        "2",
        "--duration",
        "0",
        "--settle",
        "0",
    ])
    .await;
    let r = parse(out.lines().last().unwrap());
    assert_eq!(
        (r["connected"].as_u64(), r["connect_failed"].as_u64()),
        (Some(0), Some(2)),
        "{r}"
    );
    let first = r["first_error"].as_str().unwrap_or_default();
    assert!(first.contains("unknown issuer"), "{r}");
}
