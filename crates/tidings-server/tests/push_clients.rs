//! Server push and Early Hints against other people's HTTP/2 clients: nghttp2's `nghttp`,
//! curl, and Python's `h2` (`tests/clients/push_h2.py`), each against a real server on port 0
//! serving a `static_dir`.
//!
//! These need the tools `scripts/test.sh` installs (`nghttp2-client`, curl, `.venv/` with
//! `h2`). A missing tool fails the test with a message that says so; nothing is skipped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{TIMEOUT, TestServer, eventually};
use tidings_server::config::PushMode;
use tokio::process::Command;

const INSTALL_HINT: &str = "run scripts/test.sh once: it installs nghttp2-client, curl and the \
                            Python venv (.venv/ with h2) these tests spawn";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python() -> PathBuf {
    let python = std::env::var_os("TIDINGS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/python"));
    let ok = std::process::Command::new(&python)
        .args(["-c", "import h2"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "{} cannot import h2; {INSTALL_HINT}", python.display());
    python
}

async fn run(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Output {
    let program = program.as_ref().to_owned();
    let mut cmd = Command::new(&program);
    cmd.args(args).kill_on_drop(true);
    let out = tokio::time::timeout(TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{program:?} {args:?} timed out"))
        .unwrap_or_else(|e| panic!("cannot run {program:?} ({e}); {INSTALL_HINT}"));
    assert!(
        out.status.success(),
        "{program:?} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

const CSS: &[u8] = b"/* site.css */ body { color: rebeccapurple }\n";
const JS: &[u8] = b"/* app.js */ console.log('app');\n";
const PAGE: &[u8] = br#"<!doctype html><html><head>
<link rel="stylesheet" href="/site.css">
<script src="/app.js"></script>
</head><body><p>page</p></body></html>"#;

fn site(extra: &[(&str, Vec<u8>)]) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tidings-push-clients-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("index.html"), PAGE).unwrap();
    std::fs::write(dir.join("site.css"), CSS).unwrap();
    std::fs::write(dir.join("app.js"), JS).unwrap();
    for (name, body) in extra {
        std::fs::write(dir.join(name), body).unwrap();
    }
    dir
}

async fn serve(dir: &Path, push: PushMode) -> TestServer {
    let dir = dir.to_owned();
    TestServer::with(move |c| {
        c.server.static_dir = Some(dir);
        c.server.push = push;
    })
    .await
}

#[tokio::test]
async fn nghttp_sees_push_promises_and_pushed_bodies_byte_equal_to_the_files() {
    let dir = site(&[]);
    let server = serve(&dir, PushMode::Auto).await;
    let url = format!("{}/", server.url);
    let verbose = run("nghttp", &["-v", "-n", &url]).await;
    let log = String::from_utf8_lossy(&verbose.stdout);
    assert_eq!(log.matches("recv PUSH_PROMISE frame").count(), 2, "{log}");
    assert!(log.contains(":status: 103"), "{log}");
    assert!(
        log.contains("link: </site.css>; rel=preload; as=style"),
        "{log}"
    );
    // Without -v, nghttp writes every response body, pushed ones included, as it arrives:
    // the pushed files first (they go before the page's body), then the page.
    let bodies = run("nghttp", &[&url]).await.stdout;
    assert_eq!(bodies.len(), CSS.len() + JS.len() + PAGE.len());
    assert!(bodies.ends_with(PAGE));
    let pushed = &bodies[..CSS.len() + JS.len()];
    assert!(
        pushed == [CSS, JS].concat() || pushed == [JS, CSS].concat(),
        "{}",
        String::from_utf8_lossy(pushed)
    );
}

#[tokio::test]
async fn nghttp_with_push_disabled_gets_no_push_promise() {
    let dir = site(&[]);
    let server = serve(&dir, PushMode::Auto).await;
    let url = format!("{}/", server.url);
    let log = run("nghttp", &["-v", "-n", "--no-push", &url]).await.stdout;
    let log = String::from_utf8_lossy(&log);
    assert!(!log.contains("PUSH_PROMISE"), "{log}");
    assert!(log.contains(":status: 103"), "the hints still come: {log}");
    let bodies = run("nghttp", &["--no-push", &url]).await.stdout;
    assert_eq!(bodies, PAGE);
}

#[tokio::test]
async fn curl_shows_the_103_with_its_links_over_http11_and_http2() {
    let dir = site(&[]);
    let server = serve(&dir, PushMode::Hints).await;
    let url = format!("{}/", server.url);
    for flag in ["--http1.1", "--http2-prior-knowledge"] {
        let out = run("curl", &["-si", flag, &url]).await.stdout;
        let text = String::from_utf8_lossy(&out);
        let (hints, rest) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            hints.starts_with("HTTP/1.1 103") || hints.starts_with("HTTP/2 103"),
            "{flag}: {text}"
        );
        assert!(
            hints.contains("link: </site.css>; rel=preload; as=style"),
            "{text}"
        );
        assert!(
            hints.contains("link: </app.js>; rel=preload; as=script"),
            "{text}"
        );
        assert!(rest.contains(" 200"), "{text}");
        assert!(text.ends_with(std::str::from_utf8(PAGE).unwrap()), "{text}");
    }
    let out = run("curl", &["-si", "--http1.0", &url]).await.stdout;
    let text = String::from_utf8_lossy(&out);
    assert!(!text.contains(" 103"), "no 103 to HTTP/1.0: {text}");
}

async fn push_h2(server: &TestServer, args: &[&str]) -> serde_json::Value {
    let script = workspace_root().join("tests/clients/push_h2.py");
    let mut all = vec![script.to_str().unwrap(), &server.url];
    all.extend_from_slice(args);
    let out = run(python(), &all).await;
    serde_json::from_slice(&out.stdout).unwrap()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn python_h2_accepts_the_pushes_byte_equal_and_with_push_disabled_sees_none() {
    let dir = site(&[]);
    let server = serve(&dir, PushMode::Auto).await;
    let got = push_h2(&server, &["/"]).await;
    assert_eq!(got["status"], 200);
    assert_eq!(got["page"], hex(PAGE));
    assert_eq!(got["pushed"]["/site.css"], hex(CSS), "{got}");
    assert_eq!(got["pushed"]["/app.js"], hex(JS), "{got}");
    assert_eq!(got["informational"][0][":status"], "103");
    assert_eq!(got["informational"][0]["link"].as_array().unwrap().len(), 2);

    let got = push_h2(&server, &["/", "--no-push"]).await;
    assert_eq!(got["pushed"], serde_json::json!({}));
    assert_eq!(got["page"], hex(PAGE));
}

#[tokio::test]
async fn python_h2_resetting_large_pushes_still_loads_the_page_and_frees_every_stream() {
    // Larger than the initial window: the server must wait for the client, which resets.
    let big = vec![b'z'; 300_000];
    let page = br#"<!doctype html><link rel=stylesheet href="/big.css"><script src="/big.js"></script><p>big</p>"#;
    let dir = site(&[
        ("big.html", page.to_vec()),
        ("big.css", big.clone()),
        ("big.js", big),
    ]);
    let server = serve(&dir, PushMode::Auto).await;
    for _ in 0..3 {
        let got = push_h2(&server, &["/big.html", "--reset-pushes"]).await;
        assert_eq!(got["status"], 200);
        assert_eq!(got["page"], hex(page));
        assert_eq!(got["resets"], 2, "{got}");
    }
    eventually("every stream and connection closed", async || {
        server.state.limits.open() == 0
    })
    .await;
}
