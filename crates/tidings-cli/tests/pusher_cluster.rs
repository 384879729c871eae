//! The Pusher protocol on two `tidings serve` processes sharing one real `redis-server`:
//! unmodified pusher-js presence members on each node (`tests/clients/pusher_node.mjs
//! member`), the HTTP API asked on either node, a webhook endpoint counting what it gets,
//! and one node killed with SIGKILL (no goodbye, no release: only the reap can notice).
//!
//! What must hold: one member list across the nodes, `member_added` once per user however
//! many sockets and nodes it has, the HTTP API's counts cluster-wide, every webhook exactly
//! once per cluster, and the killed node's member removed once, within the documented
//! 12 s (docs/pusher.md, "Several nodes").
//!
//! Every wait is bounded and waits for a line, a webhook or an exit; nothing sleeps.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../tidings-redis/tests/support/mod.rs"]
mod redis_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tidings_testkit::{Proc, Served, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(20);
const BIN: &str = env!("CARGO_BIN_EXE_tidings");
const KEY: &str = "app-key";
const SECRET: &str = "app-secret";
/// docs/pusher.md: a killed node's members are removed within 10 s liveness + 2 s reap.
const REAP_BOUND: Duration = Duration::from_secs(12);
const INSTALL_HINT: &str = "run scripts/test.sh once: it installs tests/clients/node_modules \
                            (pusher-js, pusher)";

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/clients")
}

async fn node(dir: &TempDir, name: &str, redis: &str, prefix: &str, hook: &str) -> Served {
    let config = Path::new(dir.path()).join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[broker]\nurl = \"{redis}\"\nprefix = \"{prefix}\"\n\n[[pusher.apps]]\nid = \"1001\"\n\
             key = \"{KEY}\"\nsecret = \"{SECRET}\"\nwebhook_url = \"{hook}\"\n"
        ),
    )
    .unwrap();
    let mut cmd = tidings_testkit::command(BIN);
    cmd.stdout(Stdio::null()).args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--config",
        config.to_str().unwrap(),
    ]);
    Served::listening(cmd, WAIT).await
}

/// A pusher-js presence member `user` on the node at `url`.
fn member(url: &str, user: &str) -> Proc {
    assert!(
        clients_dir()
            .join("node_modules/pusher-js/package.json")
            .is_file(),
        "{INSTALL_HINT}"
    );
    let mut cmd = Command::new("node");
    cmd.arg(clients_dir().join("pusher_node.mjs"))
        .args([url, "1001", KEY, SECRET, "member", user]);
    Proc::spawn(&format!("pusher-js member {user}"), cmd, INSTALL_HINT)
}

async fn next_step(p: &mut Proc, within: Duration) -> Value {
    let line = tokio::time::timeout(within, p.line())
        .await
        .unwrap_or_else(|_| panic!("{}: no line within {within:?}; {}", p.name, p.context()));
    serde_json::from_str(&line).unwrap()
}

/// The members a newly subscribed client was given.
async fn joined(p: &mut Proc) -> Vec<String> {
    let v = next_step(p, WAIT).await;
    assert_eq!(v["step"], "subscribed", "{v}");
    serde_json::from_value(v["members"].clone()).unwrap()
}

/// Every webhook event the endpoint receives, as `(name, channel, user_id)`.
async fn webhook_endpoint() -> (String, mpsc::UnboundedReceiver<(String, String, String)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let body = loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if buf.len() >= i + 4 + len {
                        break buf[i + 4..i + 4 + len].to_vec();
                    }
                };
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
                let v: Value = serde_json::from_slice(&body).unwrap();
                for e in v["events"].as_array().unwrap() {
                    let field = |k: &str| e[k].as_str().unwrap_or("").to_owned();
                    let _ = tx.send((field("name"), field("channel"), field("user_id")));
                }
            });
        }
    });
    (url, rx)
}

/// Receives webhook events until `until` has been seen, counting all of them.
async fn hooks_until(
    rx: &mut mpsc::UnboundedReceiver<(String, String, String)>,
    seen: &mut BTreeMap<(String, String), usize>,
    until: (&str, &str),
) {
    loop {
        let (name, _, user) = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no webhook {until:?} within {WAIT:?}; had {seen:?}"))
            .unwrap();
        let hit = name == until.0 && user == until.1;
        *seen.entry((name, user)).or_default() += 1;
        if hit {
            return;
        }
    }
}

/// A signed `GET` of the HTTP API on `base`.
async fn api_get(base: &str, path: &str, extra: &[(&str, &str)]) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut query: Vec<(String, String)> = vec![
        ("auth_key".into(), KEY.into()),
        ("auth_timestamp".into(), now.to_string()),
        ("auth_version".into(), "1.0".into()),
    ];
    query.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let sig = tidings_pusher::sign::sign_request(SECRET, "GET", path, &query);
    query.push(("auth_signature".into(), sig));
    let q: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let res = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{base}{path}?{}", q.join("&")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{path}");
    serde_json::from_str(&res.text().await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_js_members_on_two_nodes_see_one_presence_and_webhooks_come_once_even_when_a_node_is_killed()
 {
    let redis = redis_support::shared();
    let prefix = redis_support::unique_prefix("pusherc");
    let dir = TempDir::new("pusher-cluster");
    std::fs::create_dir_all(&dir.0).unwrap();
    let (hook, mut hooks) = webhook_endpoint().await;
    let a = node(&dir, "a", &redis.url(), &prefix, &hook).await;
    let b = node(&dir, "b", &redis.url(), &prefix, &hook).await;
    let mut seen = BTreeMap::new();

    let mut ann = member(&a.url, "ann");
    assert_eq!(joined(&mut ann).await, ["ann"]);
    // A member on the other node is given the whole cluster's list, and announced to ann.
    let mut bob_b = member(&b.url, "bob");
    assert_eq!(joined(&mut bob_b).await, ["ann", "bob"]);
    assert_eq!(
        next_step(&mut ann, WAIT).await["id"],
        "bob",
        "ann hears of bob"
    );
    // bob's second socket, on ann's node: one member, no second member_added. cy (on b)
    // is the next thing ann hears, so nothing came in between.
    let mut bob_a = member(&a.url, "bob");
    assert_eq!(joined(&mut bob_a).await, ["ann", "bob"]);
    let mut cy = member(&b.url, "cy");
    assert_eq!(joined(&mut cy).await, ["ann", "bob", "cy"]);
    let next = next_step(&mut ann, WAIT).await;
    assert_eq!(
        (&next["step"], &next["id"]),
        (&"member_added".into(), &"cy".into())
    );
    assert_eq!(
        next["info"]["name"], "name of cy",
        "the info travels across nodes"
    );

    // The HTTP API counts both nodes, asked on either.
    for base in [&a.url, &b.url] {
        let c = api_get(
            base,
            "/apps/1001/channels/presence-room",
            &[("info", "user_count,subscription_count")],
        )
        .await;
        assert_eq!(c["occupied"], true);
        assert_eq!(c["user_count"], 3, "{c}");
        assert_eq!(c["subscription_count"], 4, "{c}");
        let users = api_get(base, "/apps/1001/channels/presence-room/users", &[]).await;
        assert_eq!(
            users["users"],
            serde_json::json!([{"id": "ann"}, {"id": "bob"}, {"id": "cy"}])
        );
    }
    hooks_until(&mut hooks, &mut seen, ("member_added", "cy")).await;

    // Node b dies without a word: cy (only there) goes, once, within the bound; bob stays
    // (his other socket is on a).
    b.signal("KILL");
    let killed = Instant::now();
    let gone = next_step(&mut ann, REAP_BOUND + Duration::from_secs(3)).await;
    let took = killed.elapsed();
    assert_eq!(
        (&gone["step"], &gone["id"]),
        (&"member_removed".into(), &"cy".into()),
        "{gone}"
    );
    assert!(took <= REAP_BOUND + Duration::from_secs(2), "took {took:?}");
    eprintln!("killed node's member removed after {took:?}");
    let mut dee = member(&a.url, "dee");
    assert_eq!(joined(&mut dee).await, ["ann", "bob", "dee"]);
    let next = next_step(&mut ann, WAIT).await;
    assert_eq!(
        (&next["step"], &next["id"]),
        (&"member_added".into(), &"dee".into()),
        "bob was not removed: {next}"
    );
    let c = api_get(
        &a.url,
        "/apps/1001/channels/presence-room",
        &[("info", "user_count,subscription_count")],
    )
    .await;
    assert_eq!(
        (c["user_count"].as_u64(), c["subscription_count"].as_u64()),
        (Some(3), Some(3))
    );
    drop(cy);
    drop(bob_b);

    // Everyone leaves: the last one vacates the channel, once. Node a's single webhook
    // sender sends in order, so when channel_vacated arrives everything before it has too.
    drop((ann, bob_a, dee));
    hooks_until(&mut hooks, &mut seen, ("channel_vacated", "")).await;
    let count = |name: &str, user: &str| seen.get(&(name.into(), user.into())).copied();
    assert_eq!(count("channel_occupied", ""), Some(1), "{seen:?}");
    assert_eq!(count("channel_vacated", ""), Some(1), "{seen:?}");
    for user in ["ann", "bob", "cy", "dee"] {
        assert_eq!(count("member_added", user), Some(1), "{user}: {seen:?}");
        assert_eq!(count("member_removed", user), Some(1), "{user}: {seen:?}");
    }
    assert_eq!(seen.len(), 10, "nothing else: {seen:?}");
    drop(b);
    drop(a);
}
