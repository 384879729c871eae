//! Test support: real `redis-server` processes on free loopback ports, started by the tests
//! themselves (Debian's `redis-server` package; `scripts/test.sh` installs it).
//!
//! Each server runs under a tiny `sh` keeper that holds the read end of a pipe from the test
//! process: when the test process exits for any reason (pass, panic, abort), the pipe closes
//! and the keeper kills its server and removes its directory, so no `redis-server` outlives
//! the test that started it. No persistence (`--save '' --appendonly no`).
//!
//! Shared by the tidings-redis tests and the tidings-server end-to-end tests (`#[path]`).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

const READY_WITHIN: Duration = Duration::from_secs(10);

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A key prefix no other test (or test process) uses.
pub fn unique_prefix(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "t{}-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        rand_suffix()
    )
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos().into())
}

/// Sends one command (inline form) and returns the raw reply.
pub fn command(port: u16, line: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("{line}\r\n").as_bytes())?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

pub struct RedisServer {
    pub port: u16,
    pub pid: u32,
    dir: PathBuf,
    keeper: Child,
    keeper_stdin: Option<ChildStdin>,
}

impl RedisServer {
    /// A standalone server on a free port.
    pub fn start() -> Self {
        Self::start_on(free_port(), &[])
    }

    /// A server on `port` (say, the port of one that was killed) with extra arguments.
    pub fn start_on(port: u16, extra: &[&str]) -> Self {
        Self::start_in(port, Self::new_dir(port), Vec::new(), extra)
    }

    fn new_dir(port: u16) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tidings-redis-{}-{port}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A Redis Sentinel on a free port watching the primary on `primary_port` as `master`,
    /// quick to declare it down (`down_after_ms`).
    pub fn start_sentinel(master: &str, primary_port: u16, down_after_ms: u64) -> Self {
        Self::start_sentinel_with(master, primary_port, 1, down_after_ms, "")
    }

    /// A Redis Sentinel with a `quorum` and more lines of configuration (`extra`).
    pub fn start_sentinel_with(
        master: &str,
        primary_port: u16,
        quorum: u32,
        down_after_ms: u64,
        extra: &str,
    ) -> Self {
        let port = free_port();
        let dir = Self::new_dir(port);
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "sentinel monitor {master} 127.0.0.1 {primary_port} {quorum}\n\
                 sentinel down-after-milliseconds {master} {down_after_ms}\n\
                 sentinel failover-timeout {master} 5000\n{extra}"
            ),
        )
        .unwrap();
        let leading = vec![conf.display().to_string(), "--sentinel".into()];
        Self::start_in(port, dir, leading, &[])
    }

    fn start_in(port: u16, dir: PathBuf, leading: Vec<String>, extra: &[&str]) -> Self {
        let log = dir.join("redis.log");
        let mut args: Vec<String> = leading;
        args.extend([
            "--port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--logfile".into(),
            log.display().to_string(),
            "--daemonize".into(),
            "no".into(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let script = r#"redis-server "$@" </dev/null & pid=$!; echo "$pid"; read _; kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$TIDINGS_REDIS_DIR""#;
        let mut keeper = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .args(&args)
            .env("TIDINGS_REDIS_DIR", &dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot run sh");
        let stdout = keeper.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let pid: u32 = line
            .trim()
            .parse()
            .expect("the keeper prints the server's pid");
        let keeper_stdin = keeper.stdin.take();
        let server = Self {
            port,
            pid,
            dir,
            keeper,
            keeper_stdin,
        };
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            // NOAUTH: up, but the test configured users (the test authenticates itself).
            if command(port, "PING").is_ok_and(|r| r.starts_with("+PONG") || r.contains("NOAUTH")) {
                return server;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(server.dir.join("redis.log")).unwrap_or_default();
                panic!(
                    "redis-server did not start on port {port} (is the redis-server package installed? \
                     scripts/test.sh installs it). Its log:\n{log}"
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's working directory (its `dump.rdb` after a `SAVE`).
    pub fn dir(&self) -> String {
        self.dir.display().to_string()
    }

    /// SIGKILLs the server (the keeper stays until dropped); returns once the port is closed.
    pub fn kill(&mut self) {
        let _ = Command::new("kill")
            .arg("-9")
            .arg(self.pid.to_string())
            .status();
        let deadline = Instant::now() + READY_WITHIN;
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "redis-server {} did not die",
                self.pid
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn command(&self, line: &str) -> String {
        command(self.port, line).unwrap()
    }

    /// SIGSTOPs (`true`) or SIGCONTs the server: stopped, it still accepts connections (the
    /// kernel does) but answers nothing, like a host behind a black hole.
    pub fn pause(&self, stopped: bool) {
        let signal = if stopped { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .arg(signal)
            .arg(self.pid.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {}", self.pid);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Closing the pipe tells the keeper to kill the server and clean up.
        drop(self.keeper_stdin.take());
        let _ = self.keeper.wait();
    }
}

/// One standalone server for the whole test process.
pub fn shared() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(RedisServer::start)
}

/// A Redis Cluster of `n` masters (no replicas) on loopback ports.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(n: usize) -> Self {
        let nodes: Vec<RedisServer> = (0..n)
            .map(|_| {
                let bus = free_port().to_string();
                RedisServer::start_on(
                    free_port(),
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-port",
                        &bus,
                        "--cluster-node-timeout",
                        "2000",
                    ],
                )
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("cannot run redis-cli");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + READY_WITHIN;
        for node in &nodes {
            while !node.command("CLUSTER INFO").contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "the cluster never became ok");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Self { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Has every node announce the port of its proxy (`ports[i]` for `nodes[i]`), so clients
    /// that learn the topology from the cluster connect through the proxies; waits until
    /// every node tells every proxy port.
    pub fn announce(&self, ports: &[u16]) {
        for (node, port) in self.nodes.iter().zip(ports) {
            let r = node.command(&format!("CONFIG SET cluster-announce-port {port}"));
            assert!(r.starts_with("+OK"), "{r}");
        }
        let deadline = Instant::now() + READY_WITHIN;
        for node in &self.nodes {
            loop {
                let text = node.command("CLUSTER NODES");
                if ports.iter().all(|p| text.contains(&format!(":{p}@"))) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "announced ports never spread: {text}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// The hash slot of `key`.
    pub fn keyslot(&self, key: &str) -> u16 {
        let reply = self.nodes[0].command(&format!("CLUSTER KEYSLOT {key}"));
        reply.trim().trim_start_matches(':').parse().unwrap()
    }

    pub fn node_id(&self, i: usize) -> String {
        bulk_lines(&self.nodes[i].command("CLUSTER MYID"))
            .next()
            .unwrap()
    }

    /// Index (in `nodes`) of the master that owns `slot`, as node 0 sees it.
    pub fn owner(&self, slot: u16) -> usize {
        let text = self.nodes[0].command("CLUSTER NODES");
        for line in text.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.len() < 9 {
                continue;
            }
            let owns = fields[8..].iter().any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                match (lo.parse::<u16>(), hi.parse::<u16>()) {
                    (Ok(lo), Ok(hi)) => (lo..=hi).contains(&slot),
                    _ => false,
                }
            });
            if owns {
                let port: u16 = fields[1]
                    .split('@')
                    .next()
                    .and_then(|a| a.rsplit_once(':'))
                    .and_then(|(_, p)| p.parse().ok())
                    .unwrap();
                return self.nodes.iter().position(|n| n.port == port).unwrap();
            }
        }
        panic!("nobody owns slot {slot}: {text}");
    }

    /// Moves `slot` from node `from` to node `to` with the steps `redis-cli --cluster
    /// reshard` takes: IMPORTING on the target, MIGRATING on the source, MIGRATE of the
    /// slot's keys, then SETSLOT NODE on the target, the source and every other master.
    pub fn move_slot(&self, slot: u16, from: usize, to: usize) {
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let ok = |r: String| assert!(r.starts_with("+OK"), "{r}");
        ok(self.nodes[to].command(&format!("CLUSTER SETSLOT {slot} IMPORTING {from_id}")));
        ok(self.nodes[from].command(&format!("CLUSTER SETSLOT {slot} MIGRATING {to_id}")));
        loop {
            let keys: Vec<String> =
                bulk_lines(&self.nodes[from].command(&format!("CLUSTER GETKEYSINSLOT {slot} 100")))
                    .collect();
            if keys.is_empty() {
                break;
            }
            let reply = self.nodes[from].command(&format!(
                "MIGRATE 127.0.0.1 {} \"\" 0 5000 KEYS {}",
                self.nodes[to].port,
                keys.join(" ")
            ));
            assert!(
                reply.starts_with("+OK") || reply.starts_with("+NOKEY"),
                "{reply}"
            );
        }
        let mut order = vec![to, from];
        order.extend((0..self.nodes.len()).filter(|i| *i != to && *i != from));
        for i in order {
            ok(self.nodes[i].command(&format!("CLUSTER SETSLOT {slot} NODE {to_id}")));
        }
    }
}

/// The bulk strings of a RESP reply (`*2 $3 foo $3 bar` → foo, bar), one per line.
pub fn bulk_lines(reply: &str) -> impl Iterator<Item = String> + '_ {
    let mut lines = reply.split("\r\n");
    std::iter::from_fn(move || {
        loop {
            let line = lines.next()?;
            if line.starts_with('$') && line != "$-1" {
                return lines.next().map(str::to_owned);
            }
        }
    })
}

/// A private CA and a server certificate for 127.0.0.1, made with the `openssl` command.
pub struct TlsFiles {
    pub dir: PathBuf,
}

impl TlsFiles {
    pub fn generate() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tidings-tls-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        let steps: [&[&str]; 3] = [
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=tidings test CA",
            ],
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "2",
                "-extfile",
                "san.ext",
            ],
        ];
        for args in steps {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .stdin(Stdio::null())
                .output()
                .expect("the openssl command is needed to make test certificates");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Self { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// A server with TLS on `tls_port` (and plain TCP on its usual port, for readiness).
    pub fn server(&self, tls_port: u16) -> RedisServer {
        let port = tls_port.to_string();
        let (cert, key, ca) = (
            self.path("server.crt"),
            self.path("server.key"),
            self.path("ca.crt"),
        );
        RedisServer::start_on(
            free_port(),
            &[
                "--tls-port",
                &port,
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
                "--tls-ca-cert-file",
                &ca,
                "--tls-auth-clients",
                "no",
            ],
        )
    }
}

impl Drop for TlsFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP proxy on a loopback port in front of a Redis port that loses the reply to every
/// `drop_every`-th `EVALSHA` it forwards (counted over all its connections), the way a
/// network does: it lets the command through, waits for Redis' answer, throws it away and
/// closes the client's connection. Redis has run the command; the client cannot know.
pub struct LossyProxy {
    pub port: u16,
    /// Replies thrown away so far.
    pub dropped: std::sync::Arc<AtomicU64>,
    /// While false, nothing is dropped.
    pub lossy: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl LossyProxy {
    pub async fn start(target: u16, drop_every: u64) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let dropped = Arc::new(AtomicU64::new(0));
        let lossy = Arc::new(AtomicBool::new(true));
        let seen = Arc::new(AtomicU64::new(0));
        let (d, l) = (dropped.clone(), lossy.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                tokio::spawn(Self::pump(
                    client,
                    server,
                    drop_every,
                    seen.clone(),
                    d.clone(),
                    l.clone(),
                ));
            }
        });
        Self {
            port,
            dropped,
            lossy,
            task,
        }
    }

    async fn pump(
        client: tokio::net::TcpStream,
        server: tokio::net::TcpStream,
        drop_every: u64,
        seen: std::sync::Arc<AtomicU64>,
        dropped: std::sync::Arc<AtomicU64>,
        lossy: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) {
        use std::sync::atomic::AtomicBool;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client_rx, mut client_tx) = client.into_split();
        let (mut server_rx, mut server_tx) = server.into_split();
        let cut = std::sync::Arc::new(AtomicBool::new(false));
        let cut_up = cut.clone();
        let up = async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match client_rx.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let evalshas = buf[..n]
                    .windows(7)
                    .filter(|w| w.eq_ignore_ascii_case(b"EVALSHA"))
                    .count() as u64;
                for _ in 0..evalshas {
                    let k = seen.fetch_add(1, Ordering::Relaxed) + 1;
                    if k.is_multiple_of(drop_every) && lossy.load(Ordering::Relaxed) {
                        cut_up.store(true, Ordering::Release);
                    }
                }
                if server_tx.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        };
        let down = async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match server_rx.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if cut.load(Ordering::Acquire) {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    let _ = client_tx.shutdown().await;
                    return;
                }
                if client_tx.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        };
        // Either direction ending ends the connection (both halves are dropped).
        tokio::select! {
            () = up => {}
            () = down => {}
        }
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
