//! `tidings token` and a secured `tidings serve`: the minted token works against the server,
//! and no secret from the configuration ever reaches the logs, even at debug level.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;
use tidings_testkit::Served;

use tokio::process::Command;

const API_KEY: &str = "backend-key-do-not-log-0123456789";
const SECRET: &str = "jwt-secret-do-not-log-0123456789";

fn tidings() -> Command {
    tidings_testkit::command(env!("CARGO_BIN_EXE_tidings"))
}

fn config_file() -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "tidings-auth-{}-{}.toml",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::write(
        &path,
        format!("[server]\nlisten = \"127.0.0.1:0\"\n[auth]\napi_keys = [\"{API_KEY}\"]\njwt_secret = \"{SECRET}\"\n"),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minted_token_publishes_and_secrets_never_reach_the_logs() {
    let config = config_file();
    let mut cmd = tidings();
    cmd.args(["--config", config.to_str().unwrap(), "serve"])
        .env("TIDINGS_LOG", "debug")
        .stdout(Stdio::null());
    let server = Served::listening(cmd, Duration::from_secs(20)).await;
    let url = server.url.clone();

    let out = tidings()
        .args([
            "--config",
            config.to_str().unwrap(),
            "token",
            "--sub",
            "alice",
            "--publish",
            "chat:*",
            "--ttl",
            "10m",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "a JWT");
    let publish = |channel: &'static str, token: String| {
        let url = url.clone();
        async move {
            tidings()
                .args([
                    "publish",
                    channel,
                    "{\"n\":1}",
                    "--url",
                    &url,
                    "--token",
                    &token,
                ])
                .output()
                .await
                .unwrap()
        }
    };
    assert!(publish("chat:lobby", token.clone()).await.status.success());
    let denied = publish("news", token.clone()).await;
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("forbidden"));
    assert!(publish("news", API_KEY.into()).await.status.success());

    // Collect whatever the server logged during all that, then look for the secrets.
    let log = server.kill_and_log(Duration::from_secs(10)).await;
    assert!(log.contains("listening"), "the log was captured: {log}");
    assert!(
        !log.contains(API_KEY) && !log.contains(SECRET),
        "a secret was logged:\n{log}"
    );
    assert!(!log.contains(&token), "a token was logged");
    let _ = std::fs::remove_file(config);
}

#[tokio::test]
async fn token_without_a_secret_says_what_to_configure() {
    let out = tidings()
        .args(["token", "--sub", "x"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("jwt_secret"));
}

/// Reads `path` until it holds a line starting with `prefix`, returns the rest of that line.
async fn wait_for_line(path: &std::path::Path, prefix: &str) -> String {
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if let Some(line) = text.lines().find_map(|l| l.strip_prefix(prefix)) {
                return line.trim().to_owned();
            }
        }
    })
    .await;
    found.unwrap_or_else(|_| {
        panic!(
            "no line {prefix:?} in {}",
            std::fs::read_to_string(path).unwrap_or_default()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_to_a_file_have_no_colour_codes_json_lines_parse_and_carry_no_secret() {
    let config = config_file();
    let dir = std::env::temp_dir();
    let stamp = format!("{}-{:?}", std::process::id(), std::thread::current().id());
    let text_log = dir.join(format!("tidings-text-{stamp}.log"));
    let json_log = dir.join(format!("tidings-json-{stamp}.log"));
    let token_out = tidings()
        .args([
            "--config",
            config.to_str().unwrap(),
            "token",
            "--sub",
            "carol",
        ])
        .args(["--subscribe", "*", "--publish", "*", "--ttl", "10m"])
        .output()
        .await
        .unwrap();
    let token = String::from_utf8(token_out.stdout)
        .unwrap()
        .trim()
        .to_owned();
    for (log_path, format) in [(&text_log, "text"), (&json_log, "json")] {
        let mut server = tidings()
            .args(["--config", config.to_str().unwrap(), "serve"])
            .env("TIDINGS_LOG", "debug")
            .env("TIDINGS_LOG_FORMAT", format)
            .stderr(std::fs::File::create(log_path).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let url = wait_for_line(log_path, "tidings listening on ").await;
        let http = reqwest::Client::new();
        // The token in the query, in the cookie and in the header; the API key in the header.
        let sse = http
            .get(format!("{url}/poll/chat:a?token={token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(sse.status(), 200);
        let cookie = http
            .get(format!("{url}/poll/chat:a"))
            .header("cookie", format!("tidings_token={token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(cookie.status(), 200);
        for key in [API_KEY, "wrong-key-also-secret-0123456789"] {
            http.post(format!("{url}/publish/chat:a"))
                .bearer_auth(key)
                .header("content-type", "text/plain")
                .body("x")
                .send()
                .await
                .unwrap();
        }
        server.start_kill().unwrap();
        let _ = server.wait().await;
        let log = std::fs::read_to_string(log_path).unwrap();
        assert!(log.contains("listening"), "{log}");
        assert!(
            !log.contains('\u{1b}'),
            "escape sequences in a file:\n{log}"
        );
        for secret in [API_KEY, SECRET, &token, "wrong-key-also-secret"] {
            assert!(!log.contains(secret), "{secret} was logged:\n{log}");
        }
        if format == "json" {
            for line in log
                .lines()
                .filter(|l| !l.starts_with("tidings listening on "))
            {
                let v: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                assert!(
                    v["level"].is_string() && v["timestamp"].is_string(),
                    "{line}"
                );
            }
        }
        let _ = std::fs::remove_file(log_path);
    }
    // A Redis password in the broker URL is masked in the startup error and every log line.
    let out = tidings()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(["--broker", "redis://user:redis-pass-do-not-log@127.0.0.1:1"])
        .env("TIDINGS_LOG", "debug")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
    assert!(!stderr.contains("redis-pass-do-not-log"), "{stderr}");
    let _ = std::fs::remove_file(config);
}
