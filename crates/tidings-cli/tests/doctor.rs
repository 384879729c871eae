//! `tidings doctor` against real things: a port another socket holds, a data dir a running
//! `tidings serve` has locked, a real `redis-server` without persistence (and one with AOF),
//! a Redis that is not there, and open-file limits lowered with `prlimit`.
//!
//! Every run is bounded by a timeout; nothing waits for a fixed time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../tidings-redis/tests/support/mod.rs"]
mod redis_support;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tidings_testkit::TempDir;

use tidings_testkit::Served;
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(30);
const BIN: &str = env!("CARGO_BIN_EXE_tidings");

/// What one `tidings doctor` run printed, and how it exited.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn lines(&self, tag: &str, what: &str) -> Vec<&str> {
        let prefix = format!("{tag} {what}:");
        self.stdout
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .collect()
    }

    fn fails(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with("FAIL"))
            .collect()
    }

    fn show(&self) -> String {
        format!(
            "exit {:?}\nstdout:\n{}stderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

async fn run(mut cmd: Command) -> Outcome {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("tidings doctor did not finish in time")
        .expect("running tidings doctor");
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `tidings doctor ARGS`, on a free loopback port unless ARGS name one (the default 8080 may
/// be anyone's).
async fn doctor(args: &[&str]) -> Outcome {
    let mut cmd = tidings_testkit::command(BIN);
    cmd.arg("doctor");
    if !args.contains(&"--listen") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    cmd.args(args);
    run(cmd).await
}

/// The same, through `prlimit --nofile=LIMIT` (soft:hard).
async fn doctor_with_nofile(limit: &str) -> Outcome {
    let mut cmd = tidings_testkit::command("prlimit");
    cmd.arg(format!("--nofile={limit}"))
        .args([BIN, "doctor", "--listen", "127.0.0.1:0"]);
    run(cmd).await
}

#[tokio::test]
async fn a_default_configuration_on_a_free_port_passes_with_every_check_printed() {
    let out = doctor(&[]).await;
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert!(out.fails().is_empty(), "{}", out.show());
    for what in ["config", "auth", "listen", "broker", "data_dir"] {
        assert_eq!(out.lines("ok  ", what).len(), 1, "{what}: {}", out.show());
    }
    assert_eq!(
        out.lines("ok  ", "nofile").len() + out.lines("warn", "nofile").len(),
        1,
        "{}",
        out.show()
    );
}

#[tokio::test]
async fn a_listen_address_another_socket_holds_fails_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = doctor(&["--listen", &addr]).await;
    assert_eq!(out.code, Some(1), "{}", out.show());
    let fails = out.fails();
    assert_eq!(fails.len(), 1, "{}", out.show());
    assert!(
        fails[0].starts_with("FAIL listen:") && fails[0].contains(&addr),
        "{}",
        out.show()
    );
}

#[tokio::test]
async fn a_data_dir_locked_by_a_running_server_fails_naming_its_pid() {
    let dir = TempDir::new("locked");
    let mut serve = tidings_testkit::command(BIN);
    serve.args(["serve", "--listen", "127.0.0.1:0", "--data-dir", dir.path()]);
    let served = Served::listening(serve, WAIT).await;
    let pid = served.child.id().unwrap();

    let out = doctor(&["--data-dir", dir.path()]).await;
    assert_eq!(out.code, Some(1), "{}", out.show());
    let fails = out.lines("FAIL", "data_dir");
    assert_eq!(fails.len(), 1, "{}", out.show());
    assert!(fails[0].contains(&format!("pid {pid}")), "{}", out.show());
    drop(served);
}

#[tokio::test]
async fn a_data_dir_nobody_holds_is_created_and_passes() {
    let dir = TempDir::new("free");
    let out = doctor(&["--data-dir", dir.path()]).await;
    assert_eq!(out.code, Some(0), "{}", out.show());
    let ok = out.lines("ok  ", "data_dir");
    assert!(
        ok.len() == 1 && ok[0].contains("not locked"),
        "{}",
        out.show()
    );
    assert!(dir.0.is_dir());
}

#[tokio::test]
async fn a_redis_without_aof_or_snapshots_is_reachable_with_a_warning_about_persistence() {
    // The test support starts Redis with `--save '' --appendonly no`.
    let redis = redis_support::RedisServer::start();
    let out = doctor(&["--broker", &redis.url()]).await;
    assert_eq!(out.code, Some(0), "{}", out.show());
    let ok = out.lines("ok  ", "redis");
    assert!(
        ok.iter()
            .any(|l| l.contains("reachable, one server, version ")),
        "{}",
        out.show()
    );
    let warns = out.lines("warn", "redis");
    assert!(
        warns
            .iter()
            .any(|l| l.contains("persists nothing") && l.contains("appendonly yes")),
        "{}",
        out.show()
    );
}

#[tokio::test]
async fn a_redis_with_aof_on_gets_no_persistence_warning() {
    let redis =
        redis_support::RedisServer::start_on(redis_support::free_port(), &["--appendonly", "yes"]);
    let out = doctor(&["--broker", &redis.url()]).await;
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert!(
        out.lines("ok  ", "redis")
            .iter()
            .any(|l| l.contains("AOF on")),
        "{}",
        out.show()
    );
    assert!(out.lines("warn", "redis").is_empty(), "{}", out.show());
}

#[tokio::test]
async fn a_redis_nobody_listens_for_fails() {
    let url = format!("redis://127.0.0.1:{}", redis_support::free_port());
    let out = doctor(&["--broker", &url]).await;
    assert_eq!(out.code, Some(1), "{}", out.show());
    let fails = out.lines("FAIL", "redis");
    assert!(
        fails.len() == 1 && fails[0].contains("127.0.0.1"),
        "{}",
        out.show()
    );
}

#[tokio::test]
async fn an_open_file_limit_below_max_connections_warns_with_how_to_raise_it() {
    let out = doctor_with_nofile("1000:1000").await;
    assert_eq!(out.code, Some(0), "{}", out.show());
    let warns = out.lines("warn", "nofile");
    assert!(
        warns.len() == 1
            && warns[0].contains("soft 1000 / hard 1000")
            && warns[0].contains("LimitNOFILE="),
        "{}",
        out.show()
    );
}

#[tokio::test]
async fn an_open_file_limit_too_low_to_serve_fails() {
    let out = doctor_with_nofile("64:64").await;
    assert_eq!(out.code, Some(1), "{}", out.show());
    let fails = out.lines("FAIL", "nofile");
    assert!(
        fails.len() == 1 && fails[0].contains("soft 64"),
        "{}",
        out.show()
    );
}

#[tokio::test]
async fn a_configuration_that_does_not_validate_fails_and_stops_there() {
    let dir = TempDir::new("badconfig");
    std::fs::create_dir_all(&dir.0).unwrap();
    let file = dir.0.join("tidings.toml");
    std::fs::write(&file, "[server]\nmax_connections = \"many\"\n").unwrap();
    let mut cmd = tidings_testkit::command(BIN);
    cmd.arg("--config").arg(&file).arg("doctor");
    let out = run(cmd).await;
    assert_eq!(out.code, Some(1), "{}", out.show());
    assert_eq!(out.lines("FAIL", "config").len(), 1, "{}", out.show());
    assert_eq!(out.stdout.lines().count(), 1, "{}", out.show());
}

#[tokio::test]
async fn a_redis_behind_sentinel_without_min_replicas_to_write_warns() {
    let primary = redis_support::RedisServer::start();
    let sentinel = redis_support::RedisServer::start_sentinel("mymaster", primary.port, 5000);
    let url = format!("redis+sentinel://127.0.0.1:{}/mymaster", sentinel.port);
    let out = doctor(&["--broker", &url]).await;
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert!(
        out.lines("ok  ", "redis")
            .iter()
            .any(|l| l.contains("reachable, behind Sentinel")),
        "{}",
        out.show()
    );
    assert!(
        out.lines("warn", "redis")
            .iter()
            .any(|l| l.contains("min-replicas-to-write is 0")),
        "{}",
        out.show()
    );

    primary.command("CONFIG SET min-replicas-to-write 1");
    let out = doctor(&["--broker", &url]).await;
    assert!(
        out.lines("ok  ", "redis")
            .iter()
            .any(|l| l.contains("min-replicas-to-write 1")),
        "{}",
        out.show()
    );
}

/// A self-signed certificate and key for `localhost`, written by `openssl`.
fn self_signed(dir: &std::path::Path, name: &str) -> (PathBuf, PathBuf) {
    let (crt, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-days",
            "1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .stderr(Stdio::null())
        .status()
        .expect("openssl (apt-get install openssl)");
    assert!(status.success());
    (crt, key)
}

#[tokio::test]
async fn a_tls_key_that_does_not_match_the_certificate_fails_and_a_matching_one_passes() {
    let dir = TempDir::new("tls");
    std::fs::create_dir_all(&dir.0).unwrap();
    let (a_crt, a_key) = self_signed(&dir.0, "a");
    let (_, b_key) = self_signed(&dir.0, "b");
    let tls = |key: &PathBuf| {
        vec![
            "--tls-listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--tls-cert".to_owned(),
            a_crt.display().to_string(),
            "--tls-key".to_owned(),
            key.display().to_string(),
        ]
    };
    let args = tls(&b_key);
    let out = doctor(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(out.code, Some(1), "{}", out.show());
    assert_eq!(out.lines("FAIL", "tls").len(), 1, "{}", out.show());

    let args = tls(&a_key);
    let out = doctor(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert_eq!(out.lines("ok  ", "tls").len(), 1, "{}", out.show());
    assert_eq!(out.lines("ok  ", "tls_listen").len(), 1, "{}", out.show());
}

#[tokio::test]
async fn a_redis_that_may_evict_tidings_keys_warns_naming_the_policy() {
    let redis = redis_support::RedisServer::start_on(
        redis_support::free_port(),
        &["--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru"],
    );
    let out = doctor(&["--broker", &redis.url()]).await;
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert!(
        out.lines("warn", "redis")
            .iter()
            .any(|l| l.contains("maxmemory-policy allkeys-lru") && l.contains("noeviction")),
        "{}",
        out.show()
    );
}

#[tokio::test]
async fn cluster_seeds_are_reported_as_a_cluster_with_every_master_asked() {
    let cluster = redis_support::RedisCluster::start(3);
    let url = cluster.urls().join(",");
    let out = doctor(&["--broker", &url]).await;
    assert_eq!(out.code, Some(0), "{}", out.show());
    let ok = out.lines("ok  ", "redis");
    assert!(
        ok.iter()
            .any(|l| l.contains("reachable, a cluster (3 masters)")),
        "{}",
        out.show()
    );
    // One persistence verdict per master, each naming it.
    let per_master = out
        .lines("warn", "redis")
        .into_iter()
        .filter(|l| l.contains("persists nothing on 127.0.0.1:"))
        .count();
    assert_eq!(per_master, 3, "{}", out.show());
}

#[tokio::test]
async fn a_data_dir_written_by_a_newer_tidings_fails_naming_the_file_and_version() {
    let dir = TempDir::new("newer");
    std::fs::create_dir_all(&dir.0).unwrap();
    let mut header = b"TIDINGS\0".to_vec();
    header.extend_from_slice(&99u32.to_le_bytes());
    std::fs::write(dir.0.join("0000000000000001.log"), header).unwrap();
    let out = doctor(&["--data-dir", dir.path()]).await;
    assert_eq!(out.code, Some(1), "{}", out.show());
    let fails = out.lines("FAIL", "data_dir");
    assert!(
        fails.len() == 1 && fails[0].contains("0000000000000001.log") && fails[0].contains("v99"),
        "{}",
        out.show()
    );
}

#[tokio::test]
async fn a_missing_static_dir_fails_the_configuration_and_an_unwritable_access_log_fails() {
    let dir = TempDir::new("files");
    std::fs::create_dir_all(&dir.0).unwrap();
    let file = dir.0.join("tidings.toml");
    let doctor_with = async |static_dir: &str, access_log: &str| {
        std::fs::write(
            &file,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nstatic_dir = \"{}/{static_dir}\"\naccess_log = \"{}/{access_log}\"\n",
                dir.path(),
                dir.path()
            ),
        )
        .unwrap();
        let mut cmd = tidings_testkit::command(BIN);
        cmd.arg("--config").arg(&file).arg("doctor");
        run(cmd).await
    };
    std::fs::create_dir_all(dir.0.join("www")).unwrap();

    let out = doctor_with("no-such-dir", "access.log").await;
    assert_eq!(out.code, Some(1), "{}", out.show());
    let fails = out.lines("FAIL", "config");
    assert!(
        fails.len() == 1 && fails[0].contains("static_dir"),
        "{}",
        out.show()
    );

    let out = doctor_with("www", "no-such-dir/access.log").await;
    assert_eq!(out.code, Some(1), "{}", out.show());
    assert_eq!(out.lines("ok  ", "static_dir").len(), 1, "{}", out.show());
    assert_eq!(out.lines("FAIL", "access_log").len(), 1, "{}", out.show());

    let out = doctor_with("www", "access.log").await;
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert_eq!(out.lines("ok  ", "access_log").len(), 1, "{}", out.show());
}
