//! `tidings bench`: a load generator for Tidings and its peers (Nchan, Pushpin).
//!
//! N subscribers over one transport (SSE, NDJSON stream, WebSocket, long poll) follow C
//! channels; P publishers post at a fixed rate or as fast as the server answers. Each payload
//! carries a marker `#<channel>:<seq>:<micros>#` padded with `x` to the payload size, so a
//! subscriber needs no framing parser at all: it scans the bytes it reads for markers, which
//! works the same for SSE `data:` lines, JSON envelopes, WebSocket frames and poll bodies of
//! any server. Per subscriber it counts deliveries, duplicates and reorderings (sequence
//! numbers), and records publish→receive latency into HDR histograms (one lock per socket
//! read, not per message). With `--server-pid` it samples the server's CPU
//! (utime+stime from /proc/PID/stat, with the kernel's part, stime, apart: on loopback
//! that is most of a delivery) and RSS (/proc/PID/status), and it reports its own CPU
//! the same way, so a run where the load generator saturates shows it.
//!
//! Everything is hand-written HTTP/1.1 over plain sockets (or rustls over them for `https://`,
//! with the trust `--ca-file`/`--insecure` set up): no per-message allocation on the receive
//! side, one reused buffer per connection.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::MaybeTlsStream;

use crate::tls::{self, TlsArgs};

/// Which server is measured: it decides the subscribe paths and how to publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// `/sse/{c}`, `/stream/{c}`, `/ws/{c}`, `/poll/{c}?wait=30`; `POST /publish/{c}`.
    Tidings,
    /// `/sub/{sse,stream,ws,lp}/{c}`; `POST /pub/{c}` (see bench/nchan.conf).
    Nchan,
    /// `/{sse,stream,ws,poll}/{c}` through Pushpin to a GRIP origin; publish to
    /// `--publish-url` (Pushpin's HTTP publish port) with `POST /publish/`.
    Pushpin,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchTransport {
    Sse,
    Stream,
    Ws,
    LongPoll,
    /// The Pusher protocol (`/app/{key}?protocol=7`, one `pusher:subscribe` per connection),
    /// Tidings only: channel `NAME` is published as `pusher:{app-id}:NAME`.
    Pusher,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Base URL of the server that subscribers connect to.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Where publishes go (defaults to --url; Pushpin: its publish port, http://127.0.0.1:5561).
    #[arg(long)]
    publish_url: Option<String>,
    #[arg(long, value_enum, default_value_t = Target::Tidings)]
    target: Target,
    #[arg(long, value_enum, default_value_t = BenchTransport::Sse)]
    transport: BenchTransport,
    /// Subscriber connections (one channel each: subscriber i follows channel i mod C).
    #[arg(long, short = 'n', default_value_t = 100)]
    subscribers: usize,
    #[arg(long, short = 'c', default_value_t = 1)]
    channels: usize,
    /// Publisher connections (each owns every P-th channel, so per-channel order holds).
    #[arg(long, short = 'p', default_value_t = 1)]
    publishers: usize,
    /// Messages per second over all publishers; 0 = as fast as the server answers.
    #[arg(long, default_value_t = 100)]
    rate: u64,
    /// Payload size in bytes (at least the marker, ~30 bytes).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Seconds of publishing; 0 = connect, measure idle memory, stop.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds to wait after every subscriber connected, before measuring idle RSS.
    #[arg(long, default_value_t = 1.0)]
    settle: f64,
    /// Seconds to wait for outstanding deliveries after the last publish.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
    /// Server process ids (comma-separated; CPU and RSS are summed over them).
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Connections opened at once while connecting.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Subscribers per loopback source address (127.0.0.1, .2, …) past the port range.
    #[arg(long, default_value_t = 25_000)]
    per_source_ip: usize,
    /// Channel name prefix (default: a fresh one per run, so history is empty).
    #[arg(long)]
    channel_prefix: Option<String>,
    /// `--transport pusher`: the app's key and id (`[[pusher.apps]]`).
    #[arg(long, default_value = "app-key")]
    pusher_key: String,
    #[arg(long, default_value = "1001")]
    pusher_app_id: String,
    #[command(flatten)]
    tls: TlsArgs,
    /// Free text copied into the JSON result (scenario name).
    #[arg(long)]
    label: Option<String>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Check every delivery instead of measuring latency (see `bench_verify.rs`): `--url` may
    /// list several nodes (comma-separated), subscribers reconnect to the next node and resume
    /// from their cursors, and the run fails on any silent loss, duplicate or reordering.
    #[arg(long)]
    verify: bool,
    /// With --verify: the transports, subscriber i using the (i mod T)-th.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "sse,stream,ws,long-poll,poll"
    )]
    transports: Vec<crate::cmd::subscribe::Transport>,
    /// With --verify: seconds between short polls.
    #[arg(long, default_value_t = 1.0)]
    poll_interval: f64,
    /// With --verify: `SECS:COMMAND` runs COMMAND with `sh -c` SECS into the publishing (a
    /// fault); the first one starts the recovery clock. Repeatable.
    #[arg(long)]
    event: Vec<String>,
    /// With --verify: also write the result as JSON to this file.
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
}

#[path = "bench_verify.rs"]
mod verify;

/// One subscriber's counters; only its own task writes them.
#[derive(Default)]
struct SubStats {
    /// Set once its subscription was answered (long poll: once its first request went out).
    connected: AtomicBool,
    received: AtomicU64,
    duplicates: AtomicU64,
    reordered: AtomicU64,
    /// Gap notices the server sent it (long poll, Tidings): a skip it was told of, because
    /// history no longer held what lay between its cursor and the next message.
    gap_notices: AtomicU64,
    /// Messages published before its first one, when that was not message 1: a long poll's
    /// first request (no cursor: from now on) that the server took in after publishing had
    /// started. Loss at the start, which `lost` counts too, and no fault of the server's.
    missed_at_start: AtomicU64,
}

struct Ctx {
    args: BenchArgs,
    sub_addr: SocketAddr,
    pub_addr: SocketAddr,
    /// Set for `https://` URLs: how to wrap a subscriber's or a publisher's socket.
    sub_tls: Option<Tls>,
    pub_tls: Option<Tls>,
    host: String,
    pub_host: String,
    prefix: String,
    start: Instant,
    connected: AtomicUsize,
    failed: AtomicUsize,
    closed: AtomicUsize,
    first_error: Mutex<Option<String>>,
    delivered: AtomicU64,
    last_receive_us: AtomicU64,
    published: Vec<AtomicU64>,
    publish_errors: AtomicU64,
    subs: Vec<SubStats>,
    hists: Vec<Mutex<Histogram<u64>>>,
    stop: AtomicBool,
}

impl Ctx {
    fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    fn error(&self, e: impl std::fmt::Display) {
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(e.to_string());
        }
    }

    fn channel(&self, c: usize) -> String {
        if self.args.transport == BenchTransport::Pusher {
            return format!("pusher:{}:{}", self.args.pusher_app_id, self.pusher_name(c));
        }
        format!("{}{c}", self.prefix)
    }

    /// The Pusher name of channel `c` (Pusher names have no `:`).
    fn pusher_name(&self, c: usize) -> String {
        format!("{}{c}", self.prefix.replace(':', "-"))
    }
}

const HIST_SHARDS: usize = 16;
const READ_BUFFER: usize = 16 * 1024;
const LONG_POLL_WAIT: u32 = 30;

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.verify {
        return verify::run(args).await;
    }
    if args.subscribers == 0 || args.channels == 0 || args.publishers == 0 {
        bail!("--subscribers, --channels and --publishers must be at least 1");
    }
    let (sub_addr, host, sub_https) = resolve(&args.url).await?;
    let default_pub = match args.target {
        Target::Pushpin => "http://127.0.0.1:5561",
        _ => args.url.as_str(),
    };
    let (pub_addr, pub_host, pub_https) =
        resolve(args.publish_url.as_deref().unwrap_or(default_pub)).await?;
    let connector = if sub_https || pub_https {
        Some(TlsConnector::from(Arc::new(
            args.tls.client_config(tls::HTTP1)?,
        )))
    } else {
        None
    };
    let tls_for = |https: bool, host: &str| -> anyhow::Result<Option<Tls>> {
        match (&connector, https) {
            (Some(connector), true) => Ok(Some(Tls::new(connector.clone(), host)?)),
            _ => Ok(None),
        }
    };
    let sub_tls = tls_for(sub_https, &host)?;
    let pub_tls = tls_for(pub_https, &pub_host)?;
    let prefix = args.channel_prefix.clone().unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        format!("b{}_", t % 100_000_000)
    });
    let channels = args.channels;
    let publishers = args.publishers.min(channels);
    let hists = (0..HIST_SHARDS)
        .map(|_| Histogram::new_with_bounds(1, 120_000_000, 3).map(Mutex::new))
        .collect::<Result<Vec<_>, _>>()?;
    let ctx = Arc::new(Ctx {
        sub_addr,
        pub_addr,
        sub_tls,
        pub_tls,
        host,
        pub_host,
        prefix,
        start: Instant::now(),
        connected: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        closed: AtomicUsize::new(0),
        first_error: Mutex::new(None),
        delivered: AtomicU64::new(0),
        last_receive_us: AtomicU64::new(0),
        published: (0..channels).map(|_| AtomicU64::new(0)).collect(),
        publish_errors: AtomicU64::new(0),
        subs: (0..args.subscribers).map(|_| SubStats::default()).collect(),
        hists,
        stop: AtomicBool::new(false),
        args,
    });
    let n = ctx.args.subscribers;
    let server = ServerSample::take(&ctx.args.server_pid);
    let own0 = cpu_ticks(std::process::id()).unwrap_or(0);
    let bar = progress(&ctx.args, n as u64, "connecting");

    // Connect every subscriber, a bounded number at a time.
    let gate = Arc::new(Semaphore::new(ctx.args.connect_concurrency.max(1)));
    let mut tasks = Vec::with_capacity(n);
    let t_connect = Instant::now();
    for i in 0..n {
        let (ctx, gate) = (ctx.clone(), gate.clone());
        tasks.push(tokio::spawn(async move { subscriber(i, ctx, gate).await }));
    }
    loop {
        let done = ctx.connected.load(Relaxed) + ctx.failed.load(Relaxed);
        bar.set_position(done as u64);
        if done >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_s = t_connect.elapsed().as_secs_f64();
    bar.set_message("settling");
    tokio::time::sleep(Duration::from_secs_f64(ctx.args.settle)).await;
    let idle = ServerSample::take(&ctx.args.server_pid);
    let own_idle = cpu_ticks(std::process::id()).unwrap_or(0);
    let connected = ctx.connected.load(Relaxed);

    // Publish.
    let duration = Duration::from_secs_f64(ctx.args.duration.max(0.0));
    let mut publish_s = 0.0;
    let mut deliver_s = 0.0;
    let t_pub = ctx.now_us();
    if !duration.is_zero() {
        bar.set_length(duration.as_millis() as u64);
        bar.set_position(0);
        let deadline = Instant::now() + duration;
        let per_pub_rate = ctx.args.rate as f64 / publishers as f64;
        let started = Instant::now();
        let mut pubs = Vec::new();
        for j in 0..publishers {
            let owned: Vec<usize> = (j..channels).step_by(publishers).collect();
            let ctx = ctx.clone();
            pubs.push(tokio::spawn(async move {
                publisher(ctx, owned, per_pub_rate, deadline).await
            }));
        }
        let mut last = (Instant::now(), 0u64);
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let d = ctx.delivered.load(Relaxed);
            let rate = (d - last.1) as f64 / last.0.elapsed().as_secs_f64();
            last = (Instant::now(), d);
            bar.set_position(started.elapsed().as_millis() as u64);
            bar.set_message(format!("{rate:.0} deliveries/s"));
        }
        for p in pubs {
            let _ = p.await;
        }
        publish_s = started.elapsed().as_secs_f64();
        // Wait for what is still on its way.
        bar.set_message("draining");
        let expected = expected_deliveries(&ctx);
        let drain_until = Instant::now() + Duration::from_secs_f64(ctx.args.drain);
        while ctx.delivered.load(Relaxed) < expected && Instant::now() < drain_until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        deliver_s = (ctx.last_receive_us.load(Relaxed).saturating_sub(t_pub)) as f64 / 1e6;
    }
    let end = ServerSample::take(&ctx.args.server_pid);
    let own1 = cpu_ticks(std::process::id()).unwrap_or(0);
    ctx.stop.store(true, Relaxed);
    for t in &tasks {
        t.abort();
    }
    bar.finish_and_clear();

    let report = report(
        &ctx,
        Samples {
            server,
            idle,
            end,
            own: own1.saturating_sub(own0),
            own_load: own1.saturating_sub(own_idle),
        },
        connected,
        connect_s,
        publish_s,
        deliver_s,
    );
    println!("{report}");
    Ok(())
}

fn progress(args: &BenchArgs, len: u64, msg: &'static str) -> ProgressBar {
    if args.quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} {elapsed:>4} [{bar:30}] {pos}/{len} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(msg);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// What every connected subscriber should have received by now.
fn expected_deliveries(ctx: &Ctx) -> u64 {
    let c = ctx.args.channels;
    ctx.subs
        .iter()
        .enumerate()
        .filter(|(_, s)| s.connected.load(Relaxed))
        .map(|(i, _)| ctx.published[i % c].load(Relaxed))
        .sum()
}

struct Samples {
    server: Option<ServerSample>,
    idle: Option<ServerSample>,
    end: Option<ServerSample>,
    /// The generator's own CPU ticks: the whole run, and from the end of connecting on.
    own: u64,
    own_load: u64,
}

fn report(
    ctx: &Ctx,
    s: Samples,
    connected: usize,
    connect_s: f64,
    publish_s: f64,
    deliver_s: f64,
) -> serde_json::Value {
    let a = &ctx.args;
    let published: u64 = ctx.published.iter().map(|p| p.load(Relaxed)).sum();
    let deliveries = ctx.delivered.load(Relaxed);
    let mut lost = 0u64;
    let mut duplicates = 0u64;
    let mut reordered = 0u64;
    let mut gap_notices = 0u64;
    let (mut missed_at_start, mut late_starts) = (0u64, 0u64);
    let mut subs_with_loss = 0u64;
    // Subscribers that never connected count under `connect_failed`, not as loss.
    for (i, st) in ctx
        .subs
        .iter()
        .enumerate()
        .filter(|(_, s)| s.connected.load(Relaxed))
    {
        let expected = ctx.published[i % a.channels].load(Relaxed);
        let got = st.received.load(Relaxed);
        let dups = st.duplicates.load(Relaxed);
        duplicates += dups;
        reordered += st.reordered.load(Relaxed);
        gap_notices += st.gap_notices.load(Relaxed);
        let missed = st.missed_at_start.load(Relaxed);
        missed_at_start += missed;
        late_starts += u64::from(missed > 0);
        let unique = got - dups;
        if unique < expected {
            lost += expected - unique;
            subs_with_loss += 1;
        }
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).ok();
    if let Some(h) = hist.as_mut() {
        for shard in &ctx.hists {
            let _ = h.add(&*shard.lock().unwrap_or_else(|e| e.into_inner()));
        }
    }
    let latency = hist.map(|h| {
        json!({
            "count": h.len(),
            "p50": h.value_at_quantile(0.50),
            "p90": h.value_at_quantile(0.90),
            "p99": h.value_at_quantile(0.99),
            "p999": h.value_at_quantile(0.999),
            "max": h.max(),
            "mean": (h.mean() * 10.0).round() / 10.0,
        })
    });
    let per_delivery =
        |ticks: u64| (deliveries > 0).then(|| round2(ticks as f64 * tick_us() / deliveries as f64));
    let server = match (&s.server, &s.idle, &s.end) {
        (Some(before), Some(idle), Some(end)) => {
            let cpu = end.ticks.saturating_sub(idle.ticks);
            let per_conn = |idle_kb: u64, before_kb: u64| {
                (connected > 0)
                    .then(|| (idle_kb as f64 - before_kb as f64) * 1024.0 / connected as f64)
            };
            let anon_per_conn = per_conn(idle.anon_kb, before.anon_kb);
            let per_conn = per_conn(idle.rss_kb, before.rss_kb);
            json!({
                "pids": a.server_pid,
                "cpu_s": round2(cpu as f64 * tick_us() / 1e6),
                "cpu_us_per_delivery": per_delivery(cpu),
                "sys_us_per_delivery": per_delivery(end.sys_ticks.saturating_sub(idle.sys_ticks)),
                "cpu_pct": (publish_s > 0.0).then(|| round2(cpu as f64 * tick_us() / 1e4 / deliver_s.max(publish_s))),
                "connect_cpu_s": round2(idle.ticks.saturating_sub(before.ticks) as f64 * tick_us() / 1e6),
                "rss_before_kb": before.rss_kb,
                "rss_idle_kb": idle.rss_kb,
                "rss_end_kb": end.rss_kb,
                "rss_per_conn_bytes": per_conn.map(|b| b.round()),
                "anon_before_kb": before.anon_kb,
                "anon_idle_kb": idle.anon_kb,
                // The idle-memory target's number: what each connection costs, without the
                // code pages that the first ones fault in.
                "anon_per_conn_bytes": anon_per_conn.map(|b| b.round()),
                "rss_projected_1m_gib": anon_per_conn.map(|b| round2(b * 1e6 / (1u64 << 30) as f64)),
            })
        }
        _ => serde_json::Value::Null,
    };
    json!({
        "label": a.label,
        "target": format!("{:?}", a.target).to_lowercase(),
        "transport": match a.transport {
            BenchTransport::Sse => "sse",
            BenchTransport::Stream => "stream",
            BenchTransport::Ws => "ws",
            BenchTransport::LongPoll => "long-poll",
            BenchTransport::Pusher => "pusher",
        },
        "url": a.url,
        "subscribers": a.subscribers,
        "connected": connected,
        "connect_failed": ctx.failed.load(Relaxed),
        "closed_by_server": ctx.closed.load(Relaxed),
        "connect_s": round2(connect_s),
        "channels": a.channels,
        "publishers": a.publishers.min(a.channels),
        "rate": a.rate,
        "payload": a.payload,
        "duration_s": round2(publish_s),
        "published": published,
        "publish_per_s": (publish_s > 0.0).then(|| (published as f64 / publish_s).round()),
        "publish_errors": ctx.publish_errors.load(Relaxed),
        "expected": expected_deliveries(ctx),
        "deliveries": deliveries,
        "deliveries_per_s": (deliver_s > 0.0).then(|| (deliveries as f64 / deliver_s).round()),
        // Loss and duplicates are counted over the subscribers that connected.
        "loss_basis": "connected",
        "lost": lost,
        "duplicates": duplicates,
        "reordered": reordered,
        // Skips the server announced (history too short for a poll's lag): still loss for
        // the bench's verdict, but told, not silent (SPEC §10).
        "gap_notices": gap_notices,
        // Of `lost`: messages published before a subscriber's first poll reached the
        // server (it asked from "now"), over `late_starts` subscribers.
        "missed_at_start": missed_at_start,
        "late_starts": late_starts,
        "subscribers_with_loss": subs_with_loss,
        "latency_us": latency,
        "server": server,
        "bench": {
            "cpu_s": round2(s.own as f64 * tick_us() / 1e6),
            "cpu_us_per_delivery": per_delivery(s.own),
            // Its core's share while publishing, on the server's clock: near 100 means the
            // generator, not the server, set the pace (one core when pinned with taskset).
            "cpu_pct": (publish_s > 0.0).then(|| round2(s.own_load as f64 * tick_us() / 1e4 / deliver_s.max(publish_s))),
        },
        "first_error": ctx.first_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
    })
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

// ---- /proc sampling ----

/// Microseconds per clock tick (USER_HZ is 100 on every Linux this runs on).
fn tick_us() -> f64 {
    10_000.0
}

/// utime + stime of a process (all its threads, dead ones included), in ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    user_sys_ticks(pid).map(|(u, s)| u + s)
}

/// utime and stime of a process, in ticks: user space against the kernel's work for it
/// (system calls, and on loopback the receiving side of every TCP send too).
fn user_sys_ticks(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the `(comm)`, which may hold spaces: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut f = rest.split(' ').skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some((utime, stime))
}

/// `VmRSS` and `RssAnon` in KiB. The anonymous part is the one that grows with connections:
/// `VmRSS` also counts the binary's code pages, which the first connections fault in once
/// (~0.6–0.7 MB, 120–150 bytes "per connection" at 5,000; docs/benchmarks.md, idle memory).
fn rss_kb(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some((field("VmRSS:")?, field("RssAnon:")?))
}

struct ServerSample {
    ticks: u64,
    /// The kernel's part of `ticks`.
    sys_ticks: u64,
    rss_kb: u64,
    /// `RssAnon`: `rss_kb` without the file-backed pages.
    anon_kb: u64,
}

impl ServerSample {
    fn take(pids: &[u32]) -> Option<Self> {
        if pids.is_empty() {
            return None;
        }
        let mut s = ServerSample {
            ticks: 0,
            sys_ticks: 0,
            rss_kb: 0,
            anon_kb: 0,
        };
        for &pid in pids {
            let (user, sys) = user_sys_ticks(pid)?;
            s.ticks += user + sys;
            s.sys_ticks += sys;
            let (rss, anon) = rss_kb(pid)?;
            s.rss_kb += rss;
            s.anon_kb += anon;
        }
        Some(s)
    }
}

// ---- connections ----

/// The address, `host:port` and whether it is `https://` (`ws`/`wss` name the same servers).
async fn resolve(url: &str) -> anyhow::Result<(SocketAddr, String, bool)> {
    let u = url::Url::parse(url).with_context(|| format!("bad URL {url}"))?;
    let https = match u.scheme() {
        "http" | "ws" => false,
        "https" | "wss" => true,
        _ => bail!("only http:// and https:// URLs are supported by the bench ({url})"),
    };
    let host = u.host_str().context("URL without a host")?.to_owned();
    let port = u.port_or_known_default().unwrap_or(80);
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await?
        .next()
        .with_context(|| format!("cannot resolve {host}"))?;
    Ok((addr, format!("{host}:{port}"), https))
}

/// How to start TLS on a socket to one server.
struct Tls {
    connector: TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
}

impl Tls {
    fn new(connector: TlsConnector, host_port: &str) -> anyhow::Result<Self> {
        let host = host_port
            .rsplit_once(':')
            .map_or(host_port, |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .with_context(|| format!("{host} is not a valid TLS server name"))?;
        Ok(Self { connector, name })
    }
}

type Stream = MaybeTlsStream<TcpStream>;

async fn connect(
    addr: SocketAddr,
    source: Option<Ipv4Addr>,
    tls: Option<&Tls>,
) -> io::Result<Stream> {
    let stream = match (source, addr) {
        (Some(src), SocketAddr::V4(_)) => {
            let sock = TcpSocket::new_v4()?;
            sock.bind(SocketAddr::new(IpAddr::V4(src), 0))?;
            sock.connect(addr).await?
        }
        _ => TcpStream::connect(addr).await?,
    };
    stream.set_nodelay(true)?;
    match tls {
        None => Ok(MaybeTlsStream::Plain(stream)),
        Some(tls) => match tls.connector.connect(tls.name.clone(), stream).await {
            Ok(stream) => Ok(MaybeTlsStream::Rustls(stream)),
            // Keep the reason readable in the run's `first_error`.
            Err(err) => Err(match tls::explain(&err) {
                Some(why) => io::Error::other(why),
                None => err,
            }),
        },
    }
}

/// A connection with one reused read buffer.
struct Conn {
    stream: Stream,
    buf: Vec<u8>,
    /// Bytes held in `buf`.
    len: usize,
}

/// What a response head said that the bench needs.
struct Head {
    status: u16,
    /// Where the body starts in `buf`.
    end: usize,
    content_length: Option<usize>,
    chunked: bool,
    etag: Option<String>,
    last_modified: Option<String>,
    /// `Connection: close`: the server ends the connection after this response.
    close: bool,
}

impl Conn {
    fn new(stream: Stream) -> Self {
        Self {
            stream,
            buf: vec![0; READ_BUFFER],
            len: 0,
        }
    }

    async fn fill(&mut self) -> io::Result<usize> {
        if self.len == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let n = self.stream.read(&mut self.buf[self.len..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.len += n;
        Ok(n)
    }

    /// Reads until a whole response head is buffered and parses it.
    async fn head(&mut self) -> io::Result<Head> {
        loop {
            if let Some(i) = find(&self.buf[..self.len], b"\r\n\r\n") {
                return parse_head(&self.buf[..i + 4]).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "bad response head")
                });
            }
            self.fill().await?;
        }
    }

    /// Reads a whole body (Content-Length, chunked, or none); returns its end in `buf`.
    async fn body(&mut self, h: &Head) -> io::Result<usize> {
        if let Some(n) = h.content_length {
            while self.len < h.end + n {
                self.fill().await?;
            }
            return Ok(h.end + n);
        }
        if h.chunked {
            loop {
                let body = &self.buf[h.end..self.len];
                if body.starts_with(b"0\r\n\r\n") {
                    return Ok(h.end + 5);
                }
                if let Some(i) = find(body, b"\r\n0\r\n\r\n") {
                    return Ok(h.end + i + 7);
                }
                self.fill().await?;
            }
        }
        Ok(h.end)
    }

    /// Drops the first `n` buffered bytes.
    fn consume(&mut self, n: usize) {
        self.buf.copy_within(n..self.len, 0);
        self.len -= n;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_head(head: &[u8]) -> Option<Head> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let mut h = Head {
        status,
        end: head.len(),
        content_length: None,
        chunked: false,
        etag: None,
        last_modified: None,
        close: false,
    };
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            h.content_length = v.parse().ok();
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            h.chunked = v.eq_ignore_ascii_case("chunked");
        } else if k.eq_ignore_ascii_case("etag") {
            h.etag = Some(v.to_owned());
        } else if k.eq_ignore_ascii_case("last-modified") {
            h.last_modified = Some(v.to_owned());
        } else if k.eq_ignore_ascii_case("connection") {
            h.close = v.eq_ignore_ascii_case("close");
        }
    }
    Some(h)
}

// ---- markers ----

/// A marker `#c:s:t#` found in received bytes.
struct Marker {
    channel: u64,
    seq: u64,
    t_us: u64,
}

enum Parse {
    Found(Marker, usize),
    Incomplete,
    Invalid,
}

fn parse_marker(b: &[u8], i: usize) -> Parse {
    let mut nums = [0u64; 3];
    let mut j = i + 1;
    for (k, num) in nums.iter_mut().enumerate() {
        let start = j;
        while j < b.len() && b[j].is_ascii_digit() {
            *num = num.wrapping_mul(10).wrapping_add(u64::from(b[j] - b'0'));
            j += 1;
        }
        if j == b.len() {
            return Parse::Incomplete;
        }
        let want = if k == 2 { b'#' } else { b':' };
        if j == start || b[j] != want {
            return Parse::Invalid;
        }
        j += 1;
    }
    Parse::Found(
        Marker {
            channel: nums[0],
            seq: nums[1],
            t_us: nums[2],
        },
        j,
    )
}

/// Calls `on` for every complete marker in `b`; returns where an unfinished marker at the end
/// starts (the bytes to keep for the next read), or `b.len()`.
fn scan(b: &[u8], mut on: impl FnMut(Marker)) -> usize {
    let mut i = 0;
    while let Some(p) = memchr_hash(&b[i..]) {
        let at = i + p;
        match parse_marker(b, at) {
            Parse::Found(m, end) => {
                on(m);
                i = end;
            }
            Parse::Incomplete if b.len() - at < 64 => return at,
            _ => i = at + 1,
        }
    }
    b.len()
}

fn memchr_hash(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'#')
}

/// One subscriber's receive-side state.
struct Receiver<'a> {
    ctx: &'a Ctx,
    stats: &'a SubStats,
    channel: u64,
    last_seq: u64,
    lat: Vec<u64>,
    shard: usize,
}

impl Receiver<'_> {
    /// Scans `b`, records what it found; returns the bytes to keep.
    fn take(&mut self, b: &[u8]) -> usize {
        let now = self.ctx.now_us();
        let (mut got, mut dups, mut reord) = (0u64, 0u64, 0u64);
        let keep = scan(b, |m| {
            if m.channel != self.channel {
                return;
            }
            got += 1;
            if m.seq <= self.last_seq {
                dups += 1;
                return;
            }
            if m.seq != self.last_seq + 1 {
                reord += 1;
                if self.last_seq == 0 {
                    self.stats.missed_at_start.store(m.seq - 1, Relaxed);
                }
            }
            self.last_seq = m.seq;
            self.lat.push(now.saturating_sub(m.t_us).max(1));
        });
        if got > 0 {
            let s = self.stats;
            s.received.fetch_add(got, Relaxed);
            if dups > 0 {
                s.duplicates.fetch_add(dups, Relaxed);
            }
            if reord > 0 {
                s.reordered.fetch_add(reord, Relaxed);
            }
            self.ctx.delivered.fetch_add(got, Relaxed);
            self.ctx.last_receive_us.store(now, Relaxed);
            let mut h = self.ctx.hists[self.shard]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for &v in &self.lat {
                h.saturating_record(v);
            }
            drop(h);
            self.lat.clear();
        }
        keep
    }
}

fn subscribe_path(ctx: &Ctx, channel: &str) -> String {
    use BenchTransport::*;
    match (ctx.args.target, ctx.args.transport) {
        (Target::Tidings, Sse) => format!("/sse/{channel}"),
        (Target::Tidings, Stream) => format!("/stream/{channel}"),
        (Target::Tidings, Ws) => format!("/ws/{channel}"),
        (Target::Tidings, LongPoll) => format!("/poll/{channel}?wait={LONG_POLL_WAIT}"),
        (Target::Nchan, Sse) => format!("/sub/sse/{channel}"),
        (Target::Nchan, Stream) => format!("/sub/stream/{channel}"),
        (Target::Nchan, Ws) => format!("/sub/ws/{channel}"),
        (Target::Nchan, LongPoll) => format!("/sub/lp/{channel}"),
        (Target::Pushpin, Sse) => format!("/sse/{channel}"),
        (Target::Pushpin, Stream) => format!("/stream/{channel}"),
        (Target::Pushpin, Ws) => format!("/ws/{channel}"),
        (Target::Pushpin, LongPoll) => format!("/poll/{channel}"),
        (_, Pusher) => format!("/app/{}?protocol=7", ctx.args.pusher_key),
    }
}

async fn subscriber(i: usize, ctx: Arc<Ctx>, gate: Arc<Semaphore>) {
    let ch = i % ctx.args.channels;
    let source = (ctx.args.subscribers > ctx.args.per_source_ip)
        .then(|| Ipv4Addr::new(127, 0, 0, 1 + (i / ctx.args.per_source_ip.max(1)) as u8));
    let path = subscribe_path(&ctx, &ctx.channel(ch));
    let pusher = (ctx.args.transport == BenchTransport::Pusher).then(|| ctx.pusher_name(ch));
    let mut rx = Receiver {
        ctx: &ctx,
        stats: &ctx.subs[i],
        channel: ch as u64,
        last_seq: 0,
        lat: Vec::with_capacity(16),
        shard: i % HIST_SHARDS,
    };
    let opened = {
        let _permit = gate.acquire().await;
        open(&ctx, source, &path, pusher.as_deref()).await
    };
    let mut conn = match opened {
        Ok(c) => c,
        Err(e) => {
            ctx.failed.fetch_add(1, Relaxed);
            ctx.error(format_args!("subscriber {i}: {e}"));
            return;
        }
    };
    ctx.subs[i].connected.store(true, Relaxed);
    let result = if ctx.args.transport == BenchTransport::LongPoll {
        ctx.connected.fetch_add(1, Relaxed);
        long_poll(&ctx, &mut conn, &path, &mut rx).await
    } else {
        stream_loop(&ctx, &mut conn, &mut rx).await
    };
    if let Err(e) = result
        && !ctx.stop.load(Relaxed)
    {
        ctx.closed.fetch_add(1, Relaxed);
        ctx.error(format_args!("subscriber {i}: {e}"));
    }
}

/// Connects and, for streaming transports, sends the request and reads the response head.
async fn open(
    ctx: &Ctx,
    source: Option<Ipv4Addr>,
    path: &str,
    pusher: Option<&str>,
) -> io::Result<Conn> {
    let stream = connect(ctx.sub_addr, source, ctx.sub_tls.as_ref()).await?;
    let mut conn = Conn::new(stream);
    if ctx.args.transport == BenchTransport::LongPoll {
        return Ok(conn);
    }
    let extra = match ctx.args.transport {
        BenchTransport::Sse => "Accept: text/event-stream\r\n",
        BenchTransport::Ws | BenchTransport::Pusher => {
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        }
        _ => "",
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n{extra}\r\n", ctx.host);
    conn.stream.write_all(req.as_bytes()).await?;
    let head = conn.head().await?;
    let ok = match ctx.args.transport {
        BenchTransport::Ws | BenchTransport::Pusher => head.status == 101,
        _ => head.status == 200,
    };
    if !ok {
        return Err(io::Error::other(format!("status {}", head.status)));
    }
    if let Some(name) = pusher {
        let frame = format!(r#"{{"event":"pusher:subscribe","data":{{"channel":"{name}"}}}}"#);
        conn.stream
            .write_all(&masked_text(frame.as_bytes()))
            .await?;
    }
    ctx.connected.fetch_add(1, Relaxed);
    conn.consume(head.end);
    Ok(conn)
}

/// A client text frame (clients must mask; a zero key leaves the payload as it is).
fn masked_text(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x81];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n.min(usize::from(u16::MAX)) as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

async fn stream_loop(ctx: &Ctx, conn: &mut Conn, rx: &mut Receiver<'_>) -> io::Result<()> {
    let keep = rx.take(&conn.buf[..conn.len]);
    conn.consume(keep);
    loop {
        conn.fill().await?;
        let keep = rx.take(&conn.buf[..conn.len]);
        conn.consume(keep);
        if ctx.stop.load(Relaxed) {
            return Ok(());
        }
    }
}

async fn long_poll(
    ctx: &Ctx,
    conn: &mut Conn,
    path: &str,
    rx: &mut Receiver<'_>,
) -> io::Result<()> {
    // Tidings: the ETag is the cursor; Nchan: Last-Modified + ETag name the last message.
    let mut since: Option<String> = None;
    let mut nchan: Option<(String, String)> = None;
    let mut req = String::with_capacity(256);
    while !ctx.stop.load(Relaxed) {
        req.clear();
        req.push_str("GET ");
        req.push_str(path);
        if let Some(c) = &since {
            req.push_str("&since=");
            req.push_str(c);
        }
        req.push_str(" HTTP/1.1\r\nHost: ");
        req.push_str(&ctx.host);
        req.push_str("\r\n");
        if let Some((lm, etag)) = &nchan {
            req.push_str("If-Modified-Since: ");
            req.push_str(lm);
            req.push_str("\r\nIf-None-Match: ");
            req.push_str(etag);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        conn.stream.write_all(req.as_bytes()).await?;
        let head = conn.head().await?;
        let end = conn.body(&head).await?;
        if head.status == 200 {
            let body = &conn.buf[head.end..end];
            rx.take(body);
            if ctx.args.target == Target::Tidings {
                count_gap_notices(body, rx.stats);
            }
        }
        match ctx.args.target {
            Target::Tidings => {
                if let Some(e) = &head.etag {
                    since = Some(e.trim_matches('"').to_owned());
                }
            }
            Target::Nchan => {
                if let (Some(lm), Some(e)) = (&head.last_modified, &head.etag) {
                    nchan = Some((lm.clone(), e.clone()));
                }
            }
            Target::Pushpin => {}
        }
        conn.consume(end);
        if head.status >= 500 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// A Tidings poll reply ends `"gaps":[]}` unless it carries notices (SPEC §10), so the
/// common reply costs one comparison; a notice names its `next_offset` once.
fn count_gap_notices(body: &[u8], stats: &SubStats) {
    const NONE: &[u8] = b"\"gaps\":[]}";
    const NOTICE: &[u8] = b"\"next_offset\":";
    if body.ends_with(NONE) {
        return;
    }
    let n = body.windows(NOTICE.len()).filter(|w| *w == NOTICE).count() as u64;
    if n > 0 {
        stats.gap_notices.fetch_add(n, Relaxed);
    }
}

// ---- publishing ----

fn build_publish(ctx: &Ctx, channel: usize, seq: u64, out: &mut Vec<u8>, payload: &mut Vec<u8>) {
    use std::io::Write;
    payload.clear();
    let _ = write!(payload, "#{channel}:{seq}:{}#", ctx.now_us());
    if payload.len() < ctx.args.payload {
        payload.resize(ctx.args.payload, b'x');
    }
    let name = ctx.channel(channel);
    out.clear();
    match ctx.args.target {
        Target::Tidings | Target::Nchan => {
            let path = if ctx.args.target == Target::Tidings {
                "/publish/"
            } else {
                "/pub/"
            };
            let _ = write!(
                out,
                "POST {path}{name} HTTP/1.1\r\nHost: {}\r\nContent-Type: text/plain\r\n\
                 Content-Length: {}\r\n\r\n",
                ctx.pub_host,
                payload.len()
            );
            out.extend_from_slice(payload);
        }
        Target::Pushpin => {
            // The payload is ASCII without quotes or backslashes: no JSON escaping needed.
            let p = String::from_utf8_lossy(payload);
            let body = format!(
                "{{\"items\":[{{\"channel\":\"{name}\",\"formats\":{{\
                 \"http-stream\":{{\"content\":\"data: {p}\\n\\n\"}},\
                 \"ws-message\":{{\"content\":\"{p}\"}},\
                 \"http-response\":{{\"body\":\"{p}\"}}}}}}]}}"
            );
            let _ = write!(
                out,
                "POST /publish/ HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                ctx.pub_host,
                body.len()
            );
        }
    }
}

async fn publisher(ctx: Arc<Ctx>, owned: Vec<usize>, rate: f64, deadline: Instant) {
    let mut conn: Option<Conn> = None;
    let (mut req, mut payload) = (Vec::with_capacity(1024), Vec::with_capacity(1024));
    let interval = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
    let start = Instant::now();
    let mut k: u64 = 0;
    let mut failures_in_row = 0u32;
    let mut seqs: HashMap<usize, u64> = HashMap::new();
    while Instant::now() < deadline {
        if let Some(iv) = interval {
            let at = start + iv.mul_f64(k as f64);
            if at >= deadline {
                break;
            }
            if at > Instant::now() {
                tokio::time::sleep_until(at).await;
            }
        }
        let ch = owned[(k as usize) % owned.len()];
        k += 1;
        let seq = seqs.get(&ch).copied().unwrap_or(0) + 1;
        build_publish(&ctx, ch, seq, &mut req, &mut payload);
        let ok = match publish_once(&ctx, &mut conn, &req).await {
            Ok(status) if (200..300).contains(&status) => true,
            Ok(status) => {
                ctx.error(format_args!("publish: status {status}"));
                false
            }
            Err(e) => {
                ctx.error(format_args!("publish: {e}"));
                conn = None;
                false
            }
        };
        if ok {
            seqs.insert(ch, seq);
            ctx.published[ch].store(seq, Relaxed);
            failures_in_row = 0;
        } else {
            ctx.publish_errors.fetch_add(1, Relaxed);
            failures_in_row += 1;
            if failures_in_row > 100 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn publish_once(ctx: &Ctx, conn: &mut Option<Conn>, req: &[u8]) -> io::Result<u16> {
    // A kept-alive connection the server has meanwhile closed fails at once: retry it on a
    // fresh one (the request cannot have been processed).
    let reused = conn.is_some();
    match publish_on(ctx, conn, req).await {
        Err(_) if reused => {
            *conn = None;
            publish_on(ctx, conn, req).await
        }
        r => r,
    }
}

async fn publish_on(ctx: &Ctx, conn: &mut Option<Conn>, req: &[u8]) -> io::Result<u16> {
    if conn.is_none() {
        *conn = Some(Conn::new(
            connect(ctx.pub_addr, None, ctx.pub_tls.as_ref()).await?,
        ));
    }
    let Some(c) = conn.as_mut() else {
        return Err(io::ErrorKind::NotConnected.into());
    };
    let res = async {
        c.stream.write_all(req).await?;
        let head = c.head().await?;
        let end = c.body(&head).await?;
        c.consume(end);
        Ok::<_, io::Error>(head)
    }
    .await;
    match res {
        Ok(head) => {
            if head.close {
                *conn = None;
            }
            Ok(head.status)
        }
        Err(e) => {
            *conn = None;
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn markers(b: &[u8]) -> (Vec<(u64, u64, u64)>, usize) {
        let mut v = Vec::new();
        let keep = scan(b, |m| v.push((m.channel, m.seq, m.t_us)));
        (v, keep)
    }

    #[test]
    fn a_poll_reply_s_gap_notices_are_counted_and_a_reply_without_any_costs_nothing() {
        let stats = SubStats::default();
        count_gap_notices(
            br##"{"messages":[{"data":"#0:9:1#"}],"cursor":"c","gaps":[]}"##,
            &stats,
        );
        assert_eq!(stats.gap_notices.load(Relaxed), 0);
        // SPEC §10's notice, as a poll reply lists it.
        count_gap_notices(
            br#"{"messages":[],"cursor":"c","gaps":[{"channel":"a","epoch":"e","next_offset":57,"reason":"trimmed"},{"channel":"b","epoch":"e","next_offset":3,"reason":"epoch_changed"}]}"#,
            &stats,
        );
        assert_eq!(stats.gap_notices.load(Relaxed), 2);
    }

    #[test]
    fn markers_are_found_in_any_framing_and_a_split_one_is_kept() {
        let (v, keep) = markers(b"id: x\ndata: #3:7:123#xxxx\n\n\x81##0:1:9#xx#1:2");
        assert_eq!(v, vec![(3, 7, 123), (0, 1, 9)]);
        assert_eq!(
            &b"id: x\ndata: #3:7:123#xxxx\n\n\x81##0:1:9#xx#1:2"[keep..],
            b"#1:2"
        );
        let text = b"{\"data\":\"#1:2:3#\"} # not:a:marker#";
        let (v, keep) = markers(text);
        assert_eq!(v, vec![(1, 2, 3)]);
        // The last `#` may open a marker the next read completes: it is kept.
        assert_eq!(keep, text.len() - 1);
    }

    #[test]
    fn a_response_head_gives_status_length_and_etag() {
        let h =
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nETag: \"abc\"\r\n\r\n").unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(h.content_length, Some(12));
        assert_eq!(h.etag.as_deref(), Some("\"abc\""));
    }
}
