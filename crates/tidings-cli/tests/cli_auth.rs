//! `tidings token` and a secured `tidings serve`: the minted token works against the server,
//! and no secret from the configuration ever reaches the logs, even at debug level.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

const API_KEY: &str = "backend-key-do-not-log-0123456789";
const SECRET: &str = "jwt-secret-do-not-log-0123456789";

fn tidings() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidings"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TIDINGS_") {
            cmd.env_remove(key);
        }
    }
    cmd.kill_on_drop(true);
    cmd
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
    let mut server = tidings()
        .args(["--config", config.to_str().unwrap(), "serve"])
        .env("TIDINGS_LOG", "debug")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(server.stderr.take().unwrap());
    let mut log = String::new();
    let url = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let mut line = String::new();
            assert!(
                stderr.read_line(&mut line).await.unwrap() > 0,
                "server exited: {log}"
            );
            log.push_str(&line);
            if let Some(rest) = line.trim().strip_prefix("tidings listening on ") {
                return rest.to_owned();
            }
        }
    })
    .await
    .unwrap();

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
    server.start_kill().unwrap();
    let mut rest = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stderr.read_to_string(&mut rest)).await;
    log.push_str(&rest);
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
