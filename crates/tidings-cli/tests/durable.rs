//! `tidings serve --data-dir`: history, offsets and epochs across restarts of the real binary
//! (SIGTERM and `kill -9`), read back over every transport by `tidings subscribe`, and the
//! data dir's faults (a lock held, a dir that cannot be written, a full disk, a torn tail).
//!
//! Every wait is bounded and waits for an event (a line, an exit, a count of acknowledged
//! publishes), never for a fixed time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tidings_testkit::TempDir;

use serde_json::Value;
use tidings_testkit::Served;
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(20);

/// `tidings` with a clean environment: no `TIDINGS_*` variable of the caller leaks in.
fn tidings() -> Command {
    tidings_testkit::command(env!("CARGO_BIN_EXE_tidings"))
}

/// A running `tidings serve --data-dir` (`tidings_testkit::Served`: killed when dropped).
struct Server {
    served: Served,
    url: String,
    http: reqwest::Client,
}

/// What `serve` printed before it exited or listened.
enum Started {
    Listening(Box<Server>),
    Exited(String),
}

async fn start(dir: &str, env: &[(&str, &str)]) -> Started {
    let mut cmd = tidings();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir", dir])
        .env("TIDINGS_LOG", "info")
        .stdout(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    match Served::start(cmd, WAIT).await {
        Ok(served) => Started::Listening(Box::new(Server {
            url: served.url.clone(),
            served,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        })),
        Err(log) => Started::Exited(log),
    }
}

async fn serve(dir: &str, env: &[(&str, &str)]) -> Server {
    match start(dir, env).await {
        Started::Listening(s) => *s,
        Started::Exited(log) => panic!("tidings serve exited at start:\n{log}"),
    }
}

async fn refused(dir: &str) -> String {
    match start(dir, &[]).await {
        Started::Listening(s) => panic!("started on {dir}: {}", s.url),
        Started::Exited(log) => log,
    }
}

impl Server {
    async fn publish(&self, channel: &str, data: &str) -> Result<Value, (u16, Value)> {
        publish_to(&self.http, &self.url, channel, data).await
    }

    async fn history(&self, channel: &str) -> Value {
        let res = self
            .http
            .get(format!(
                "{}/api/channels/{channel}/history?limit=10000",
                self.url
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        serde_json::from_str(&res.text().await.unwrap()).unwrap()
    }

    /// The string data of every message `channel`'s history holds, oldest first.
    async fn history_data(&self, channel: &str) -> Vec<String> {
        let history = self.history(channel).await;
        history["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["data"].as_str().unwrap().to_owned())
            .collect()
    }

    /// SIGTERM, then waits for the exit.
    async fn stop(mut self) -> String {
        self.served.signal("TERM");
        let exit = self.served.exit(WAIT).await;
        assert!(exit.success(), "{exit}\n{}", self.log());
        self.log()
    }

    /// `kill -9`, then waits for the exit.
    async fn crash(mut self) {
        self.served.child.start_kill().unwrap();
        self.served.exit(WAIT).await;
    }

    fn log(&self) -> String {
        self.served.log()
    }
}

/// Runs `tidings subscribe` to completion; returns its stdout lines.
async fn subscribe(args: &[&str]) -> Vec<String> {
    let mut cmd = tidings();
    cmd.arg("subscribe").args(args);
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("tidings subscribe {args:?} did not finish"))
        .unwrap();
    assert!(
        out.status.success(),
        "subscribe {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

const TRANSPORTS: [&str; 5] = ["sse", "stream", "long-poll", "poll", "ws"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigterm_restart_every_transport_resumes_with_what_was_missed_and_no_gap() {
    let dir = TempDir::new("restart");
    let server = serve(dir.path(), &[]).await;
    let mut cursors = Vec::new();
    let mut epochs = Vec::new();
    for t in TRANSPORTS {
        let channel = format!("restart:{t}");
        let first = server.publish(&channel, "m1").await.unwrap();
        cursors.push(first["cursor"].as_str().unwrap().to_owned());
        epochs.push(first["epoch"].as_str().unwrap().to_owned());
        for i in 2..=3 {
            server.publish(&channel, &format!("m{i}")).await.unwrap();
        }
    }
    server.stop().await;

    let server = serve(dir.path(), &[]).await;
    for (i, t) in TRANSPORTS.iter().enumerate() {
        let channel = format!("restart:{t}");
        for n in 4..=5 {
            let m = server.publish(&channel, &format!("m{n}")).await.unwrap();
            assert_eq!(m["offset"], n, "offsets continue on {channel}");
            assert_eq!(m["epoch"], epochs[i].as_str(), "the epoch is kept");
        }
    }
    for (i, t) in TRANSPORTS.iter().enumerate() {
        let channel = format!("restart:{t}");
        let lines = subscribe(&[
            &channel,
            "--transport",
            t,
            "--since",
            &cursors[i],
            "--count",
            "4",
            "--url",
            &server.url,
        ])
        .await;
        let got: Vec<(u64, String, String)> = lines
            .iter()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                assert_ne!(v["type"], "gap", "{t}: a gap after a restart: {l}");
                (
                    v["offset"].as_u64().unwrap(),
                    v["epoch"].as_str().unwrap().to_owned(),
                    v["data"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let want: Vec<(u64, String, String)> = (2..=5)
            .map(|n| (n, epochs[i].clone(), format!("m{n}")))
            .collect();
        assert_eq!(got, want, "{t}");
    }
    server.stop().await;
}

/// A random number (from std's per-process random hash keys).
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// Publishes `text/plain` to `url`; `Ok` with the reply only for a 200.
async fn publish_to(
    http: &reqwest::Client,
    url: &str,
    channel: &str,
    data: &str,
) -> Result<Value, (u16, Value)> {
    let res = http
        .post(format!("{url}/publish/{channel}"))
        .header("content-type", "text/plain")
        .body(data.to_owned())
        .send()
        .await
        .map_err(|_| (0, Value::Null))?;
    let status = res.status().as_u16();
    let text = res.text().await.map_err(|_| (status, Value::Null))?;
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if status == 200 {
        Ok(body)
    } else {
        Err((status, body))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_kill_9s_under_four_publishers_lose_no_acknowledged_publish() {
    let dir = TempDir::new("kill9");
    let env = [
        ("TIDINGS_BROKER__FSYNC", "always"),
        ("TIDINGS_CHANNELS__HISTORY_SIZE", "100000"),
    ];
    // (data, offset, epoch) of every publish that was answered 200.
    let acked: Arc<Mutex<Vec<(String, u64, String)>>> = Arc::default();
    for round in 0..20u64 {
        let server = serve(dir.path(), &env).await;
        let count = Arc::new(AtomicUsize::new(0));
        let mut publishers = Vec::new();
        for p in 0..4 {
            let (http, url, acked, count) = (
                server.http.clone(),
                server.url.clone(),
                acked.clone(),
                count.clone(),
            );
            publishers.push(tokio::spawn(async move {
                let mut last = 0;
                for i in 0.. {
                    let data = format!("r{round}-p{p}-{i}");
                    match publish_to(&http, &url, "kill:all", &data).await {
                        Ok(v) => {
                            let offset = v["offset"].as_u64().unwrap();
                            assert!(offset > last, "one publisher's offsets increase");
                            last = offset;
                            let epoch = v["epoch"].as_str().unwrap().to_owned();
                            acked.lock().unwrap().push((data, offset, epoch));
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        // The kill landed during this publish: its outcome is unknown.
                        Err(_) => return,
                    }
                }
            }));
        }
        // A random moment: after a random number of acknowledged publishes.
        let target = 5 + (rand_u64() % 40) as usize;
        tidings_testkit::eventually(
            "publishes acknowledged before the kill",
            WAIT,
            Duration::from_millis(1),
            async || count.load(Ordering::Relaxed) >= target,
        )
        .await;
        server.crash().await;
        for p in publishers {
            tokio::time::timeout(WAIT, p)
                .await
                .expect("publishers stop once the server is gone")
                .unwrap();
        }
    }
    let server = serve(dir.path(), &env).await;
    let history = server.history("kill:all").await;
    let messages = history["messages"].as_array().unwrap();
    assert_eq!(history["gaps"], serde_json::json!([]));
    let offsets: Vec<u64> = messages
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(
        offsets,
        (1..=offsets.len() as u64).collect::<Vec<_>>(),
        "offsets 1..n, no hole"
    );
    let epochs: std::collections::HashSet<&str> = messages
        .iter()
        .map(|m| m["epoch"].as_str().unwrap())
        .collect();
    assert_eq!(epochs.len(), 1, "one epoch across every kill: {epochs:?}");
    let datas: Vec<&str> = messages
        .iter()
        .map(|m| m["data"].as_str().unwrap())
        .collect();
    let unique: std::collections::HashSet<&&str> = datas.iter().collect();
    assert_eq!(unique.len(), datas.len(), "no payload stored twice");
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 20 * 5);
    for (data, offset, e) in acked.iter() {
        assert!(epochs.contains(e.as_str()), "{data} acked in another epoch");
        assert_eq!(
            datas.get(*offset as usize - 1),
            Some(&data.as_str()),
            "acknowledged {data} at offset {offset}"
        );
    }
    server.stop().await;
}

/// The newest segment file of a data dir.
fn last_segment(dir: &Path) -> PathBuf {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs.pop().expect("a segment")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_dir_is_refused_naming_the_lock_and_pid() {
    let dir = TempDir::new("lock");
    let first = serve(dir.path(), &[]).await;
    let log = refused(dir.path()).await;
    let pid = first.served.child.id().unwrap();
    assert!(
        log.contains("LOCK") && log.contains(&format!("pid {pid}")),
        "{log}"
    );
    first.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_that_cannot_be_created_is_refused_with_the_reason() {
    let dir = TempDir::new("notdir");
    std::fs::write(&dir.0, b"a file, not a directory").unwrap();
    let inside = dir.0.join("data");
    let log = refused(inside.to_str().unwrap()).await;
    assert!(
        log.contains("cannot be written") && log.contains("Not a directory"),
        "{log}"
    );
    let _ = std::fs::remove_file(&dir.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_cut_off_at_start_with_a_warning_naming_bytes_and_channel() {
    let dir = TempDir::new("torn");
    let server = serve(dir.path(), &[]).await;
    for i in 1..=3 {
        server
            .publish("torn:chan", &format!("message {i}"))
            .await
            .unwrap();
    }
    server.stop().await;
    let seg = last_segment(&dir.0);
    let len = std::fs::metadata(&seg).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 4)
        .unwrap();

    let server = serve(dir.path(), &[]).await;
    let log = server.log();
    assert!(
        log.contains("torn tail") && log.contains("torn:chan") && log.contains("cut"),
        "{log}"
    );
    let data = server.history_data("torn:chan").await;
    assert_eq!(data, ["message 1", "message 2"]);
    let next = server.publish("torn:chan", "after").await.unwrap();
    assert_eq!(next["offset"], 3);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_the_middle_is_reported_and_never_served() {
    let dir = TempDir::new("flip");
    let server = serve(dir.path(), &[]).await;
    for i in 1..=3 {
        server
            .publish("flip:chan", &format!("message-{i}"))
            .await
            .unwrap();
    }
    server.stop().await;
    let seg = last_segment(&dir.0);
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.windows(9).position(|w| w == b"message-2").unwrap();
    bytes[at + 2] ^= 0x20;
    std::fs::write(&seg, &bytes).unwrap();

    let server = serve(dir.path(), &[]).await;
    assert!(server.log().contains("damaged record"), "{}", server.log());
    let data = server.history_data("flip:chan").await;
    assert_eq!(data, ["message-3"], "nothing altered is served");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_a_newer_format_is_refused() {
    let dir = TempDir::new("newer");
    serve(dir.path(), &[]).await.stop().await;
    let seg = last_segment(&dir.0);
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&seg, &bytes).unwrap();
    let log = refused(dir.path()).await;
    assert!(
        log.contains("newer tidings") && log.contains("v99"),
        "{log}"
    );
}

/// A tmpfs of `size` mounted for the test (root only), unmounted when dropped.
struct SmallFs {
    dir: TempDir,
}

impl SmallFs {
    async fn mount(options: &str) -> Option<Self> {
        let dir = TempDir::new("fs");
        std::fs::create_dir_all(&dir.0).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tidings-test", dir.path()])
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success());
        ok.then_some(Self { dir })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.dir.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_data_dir_is_refused_with_the_reason() {
    let Some(fs) = SmallFs::mount("ro,size=64k").await else {
        eprintln!("SKIPPED: mounting a read-only tmpfs needs root");
        return;
    };
    let log = refused(fs.dir.path()).await;
    assert!(
        log.contains("cannot be written") && log.contains("Read-only file system"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_507_keeps_subscribers_and_publishing_resumes_when_space_returns() {
    let Some(fs) = SmallFs::mount("size=256k").await else {
        eprintln!("SKIPPED: mounting a small tmpfs needs root");
        return;
    };
    let data = fs.dir.0.join("data");
    let server = serve(data.to_str().unwrap(), &[]).await;
    let first = server.publish("full:chan", "before").await.unwrap();
    let mut sub = {
        let mut cmd = tidings();
        cmd.args([
            "subscribe",
            "full:chan",
            "--transport",
            "stream",
            "--since",
            first["cursor"].as_str().unwrap(),
            "--url",
            &server.url,
        ]);
        tidings_testkit::Proc::spawn("tidings subscribe", cmd, "built with the tests")
    };
    // Fill the filesystem from outside, as another process would.
    let filler = fs.dir.0.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    let big = "x".repeat(16 * 1024);
    let (status, body) = server.publish("full:chan", &big).await.unwrap_err();
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["error"]["code"], "storage_failed", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nothing was stored")
    );

    std::fs::remove_file(&filler).unwrap();
    let after = server.publish("full:chan", "after").await.unwrap();
    assert_eq!(after["offset"], 2, "the failed publish took no offset");
    let line = sub.line().await;
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (v["offset"].as_u64(), v["data"].as_str()),
        (Some(2), Some("after")),
        "{line}"
    );
    sub.kill().await;
    let log = server.stop().await;

    let server = serve(data.to_str().unwrap(), &[]).await;
    assert!(
        !server.log().contains("torn tail"),
        "{log}\n{}",
        server.log()
    );
    let got = server.history_data("full:chan").await;
    assert_eq!(got, ["before", "after"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_retried_after_a_kill_9_restart_publishes_nothing_and_answers_the_same()
{
    let dir = TempDir::new("idem");
    let keyed = |server: &Server, key: &str| {
        server
            .http
            .post(format!("{}/publish/orders", server.url))
            .header("content-type", "text/plain")
            .header("idempotency-key", key.to_owned())
            .body("shipped")
            .send()
    };
    let server = serve(dir.path(), &[]).await;
    let res = keyed(&server, "order-42").await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("idempotent-replayed").is_none());
    let first: Value = serde_json::from_str(&res.text().await.unwrap()).unwrap();
    server.publish("orders", "other").await.unwrap();
    // Acknowledged under fsync = "batch": on disk, key and all, before the answer.
    server.crash().await;

    let server = serve(dir.path(), &[]).await;
    let res = keyed(&server, "order-42").await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("true"),
        "the retry after the restart was recognised"
    );
    let again: Value = serde_json::from_str(&res.text().await.unwrap()).unwrap();
    assert_eq!(again, first, "the first answer, byte for byte");
    assert_eq!(
        server.history_data("orders").await,
        ["shipped", "other"],
        "published once"
    );
    // A fresh key still publishes.
    let res = keyed(&server, "order-43").await.unwrap();
    let third: Value = serde_json::from_str(&res.text().await.unwrap()).unwrap();
    assert_eq!(third["offset"], 3);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_taken_before_a_channel_existed_resumes_without_a_gap_after_a_restart() {
    let dir = TempDir::new("fresh");
    let server = serve(dir.path(), &[]).await;
    let res = server
        .http
        .get(format!("{}/poll/later", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let poll: Value = serde_json::from_str(&res.text().await.unwrap()).unwrap();
    let cursor = poll["cursor"].as_str().unwrap().to_owned();
    server.stop().await;

    let server = serve(dir.path(), &[]).await;
    server.publish("later", "first").await.unwrap();
    let lines = subscribe(&[
        "later",
        "--transport",
        "poll",
        "--since",
        &cursor,
        "--count",
        "1",
        "--url",
        &server.url,
    ])
    .await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    let v: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_ne!(v["type"], "gap", "{lines:?}");
    assert_eq!(v["data"], "first");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_far_behind_a_small_cache_gets_everything_missed_after_a_restart() {
    let dir = TempDir::new("cache");
    let env = [("TIDINGS_BROKER__HISTORY_CACHE", "10")];
    let server = serve(dir.path(), &env).await;
    let mut cursor = String::new();
    for i in 1..=100 {
        let m = server.publish("far", &format!("m{i}")).await.unwrap();
        if i == 50 {
            cursor = m["cursor"].as_str().unwrap().to_owned();
        }
    }
    server.stop().await;

    // Only the last 10 are in RAM after the restart: 51..=90 come from disk.
    let server = serve(dir.path(), &env).await;
    for t in ["sse", "ws", "poll"] {
        let lines = subscribe(&[
            "far",
            "--transport",
            t,
            "--since",
            &cursor,
            "--count",
            "50",
            "--url",
            &server.url,
        ])
        .await;
        let got: Vec<String> = lines
            .iter()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                assert_ne!(v["type"], "gap", "{t}: {l}");
                v["data"].as_str().unwrap().to_owned()
            })
            .collect();
        let want: Vec<String> = (51..=100).map(|i| format!("m{i}")).collect();
        assert_eq!(got, want, "{t}");
    }
    server.stop().await;
}
