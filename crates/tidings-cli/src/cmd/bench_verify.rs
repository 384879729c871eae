//! `tidings bench --verify`: a load that checks everything it receives, for runs with faults
//! (`scripts/chaos.sh`, `docs/reliability.md`).
//!
//! Subscribers are `tidings subscribe` sessions (the same reconnect-and-resume code, every
//! transport) spread over several node URLs: subscriber i starts on node i mod N, follows
//! channel i mod C over transport i mod T, and after each failed attempt moves to the next
//! node with its cursor. Instead of printing, each session writes into its own `Check`, which
//! follows the channel's (epoch, offset) sequence:
//! - within an epoch every offset must be the previous one + 1; a jump is **lost silently**
//!   unless a gap notice announced it, a repeat is a duplicate, a step back a reordering;
//! - a new epoch must come after a gap notice naming it;
//! - every (epoch, offset) must carry the payload the publisher was acknowledged for (a Redis
//!   that forgot a write and handed its offset to another message is caught here: "offset
//!   reused");
//! - at the end every subscriber must have reached the last acknowledged position of its
//!   channel (or been told why not).
//!
//! Publishers (one per node) post at a fixed total rate, each owning every N-th channel so a
//! channel's publishes are sequential; a failed publish moves that publisher to the next
//! node. `--event SECS:COMMAND` runs a shell command at a time into the run (a fault); the
//! first one starts the recovery clock: a subscriber has recovered when it receives a message
//! published after it.
//!
//! # Concurrency rules
//! - A `Check` is written only by its session's task (through `CheckSink`); the main task
//!   reads it at the end and while draining. Its mutex is therefore uncontended.
//! - A channel's `Ledger` is shared by its publisher and its subscribers; each holds it for one
//!   map lookup or insert, never across an `.await`.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::BenchArgs;
use crate::client::Client;
use crate::cmd::subscribe::{self, Backoff, Session, SubscribeArgs, Transport};

const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Longest line a session may hand its check (far above any envelope of this load).
const MAX_LINE: usize = 1 << 20;

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// What the publisher and the subscribers of one channel know about its positions.
#[derive(Default)]
struct Ledger {
    /// (epoch, offset) → the payload sequence number the publisher was acknowledged for.
    acked: HashMap<(String, u64), u64>,
    /// (epoch, offset) → the sequence number the first subscriber to receive it saw.
    seen: HashMap<(String, u64), u64>,
    /// The last acknowledged position.
    last: Option<(String, u64)>,
    /// Positions that named two different payloads.
    conflicts: u64,
}

impl Ledger {
    fn acked(&mut self, epoch: &str, offset: u64, seq: u64) {
        let key = (epoch.to_owned(), offset);
        if self.seen.get(&key).is_some_and(|s| *s != seq) {
            self.conflicts += 1;
        }
        if let Some(old) = self.acked.insert(key, seq)
            && old != seq
        {
            self.conflicts += 1;
        }
        self.last = Some((epoch.to_owned(), offset));
    }

    fn delivered(&mut self, epoch: &str, offset: u64, seq: u64) {
        let key = (epoch.to_owned(), offset);
        if self.acked.get(&key).is_some_and(|s| *s != seq) {
            self.conflicts += 1;
        }
        match self.seen.get(&key) {
            Some(s) if *s != seq => self.conflicts += 1,
            Some(_) => {}
            None => {
                self.seen.insert(key, seq);
            }
        }
    }
}

/// One subscriber's view of its channel (see the module comment).
#[derive(Default)]
struct Check {
    epoch: Option<String>,
    last: u64,
    /// A gap notice not yet followed by a message: (epoch, next_offset).
    pending_gap: Option<(String, u64)>,
    received: u64,
    duplicates: u64,
    reordered: u64,
    lost_silently: u64,
    silent_epoch_changes: u64,
    gaps: u64,
    /// Microseconds from the first fault to the first message published after it.
    recovered_after_us: Option<u64>,
    unreadable: u64,
}

#[derive(Deserialize)]
struct Line {
    #[serde(rename = "type")]
    kind: Option<String>,
    epoch: Option<String>,
    offset: Option<u64>,
    next_offset: Option<u64>,
    data: Option<Payload>,
}

#[derive(Deserialize, Serialize)]
struct Payload {
    s: u64,
    t: u64,
}

/// Everything the subscribers share with the main task.
struct Shared {
    ledgers: Vec<Mutex<Ledger>>,
    /// Wall-clock µs of the first fault (0: none yet).
    fault_at_us: AtomicU64,
    delivered: AtomicU64,
}

/// Where a session writes its lines: straight into its `Check`.
struct CheckSink {
    check: Arc<Mutex<Check>>,
    shared: Arc<Shared>,
    channel: usize,
    buf: Vec<u8>,
}

impl Write for CheckSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        while let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            self.line(&line);
        }
        if self.buf.len() > MAX_LINE {
            self.buf.clear();
            relock(&self.check).unreadable += 1;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CheckSink {
    fn line(&mut self, line: &[u8]) {
        let mut check = relock(&self.check);
        let Ok(line) = serde_json::from_slice::<Line>(line) else {
            check.unreadable += 1;
            return;
        };
        if line.kind.as_deref() == Some("gap") {
            check.gaps += 1;
            check.pending_gap = line.epoch.zip(line.next_offset);
            return;
        }
        let (Some(epoch), Some(offset), Some(payload)) = (line.epoch, line.offset, line.data)
        else {
            check.unreadable += 1;
            return;
        };
        self.shared.delivered.fetch_add(1, Relaxed);
        check.received += 1;
        let gap = check.pending_gap.take();
        match check.epoch.as_deref() {
            None => {}
            Some(e) if e == epoch => {
                let last = check.last;
                if offset == last + 1 {
                } else if offset == last {
                    check.duplicates += 1;
                } else if offset < last {
                    check.reordered += 1;
                } else {
                    let announced = gap
                        .as_ref()
                        .is_some_and(|(ge, next)| *ge == epoch && *next <= offset);
                    if !announced {
                        check.lost_silently += offset - last - 1;
                    }
                }
            }
            Some(_) if gap.as_ref().is_none_or(|(ge, _)| *ge != epoch) => {
                check.silent_epoch_changes += 1;
            }
            Some(_) => {}
        }
        if check.epoch.as_deref() != Some(epoch.as_str()) || offset > check.last {
            check.last = offset;
        }
        let fault = self.shared.fault_at_us.load(Relaxed);
        if fault != 0 && check.recovered_after_us.is_none() && payload.t > fault {
            check.recovered_after_us = Some(now_us().saturating_sub(fault));
        }
        relock(&self.shared.ledgers[self.channel]).delivered(&epoch, offset, payload.s);
        check.epoch = Some(epoch);
    }
}

/// Publish outcomes, over all publishers.
#[derive(Default)]
struct PublishCounts {
    acked: AtomicU64,
    /// 503 `broker_unavailable`, 429, or no node reachable: nothing was stored.
    refused: AtomicU64,
    /// 503 `outcome_unknown` (or the answer was lost): maybe stored.
    unknown: AtomicU64,
    other: AtomicU64,
}

#[derive(Deserialize)]
struct Ack {
    epoch: String,
    offset: u64,
}

async fn publisher(
    clients: Vec<Client>,
    mut node: usize,
    mine: Vec<(usize, String)>,
    every: Duration,
    shared: Arc<Shared>,
    counts: Arc<PublishCounts>,
    stop: Arc<AtomicBool>,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seqs = vec![0u64; mine.len()];
    let mut turn = 0usize;
    while !stop.load(Relaxed) {
        ticker.tick().await;
        let k = turn % mine.len();
        turn += 1;
        let (index, name) = &mine[k];
        seqs[k] += 1;
        let seq = seqs[k];
        let client = &clients[node % clients.len()];
        let body = serde_json::to_vec(&Payload {
            s: seq,
            t: now_us(),
        })
        .unwrap_or_default();
        let sent = client
            .post(client.endpoint(&["publish", name]))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .timeout(Duration::from_secs(10))
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                // Not connected: nothing was sent. Sent but no answer: maybe stored.
                if e.is_connect() {
                    counts.refused.fetch_add(1, Relaxed);
                } else {
                    counts.unknown.fetch_add(1, Relaxed);
                }
                node += 1;
                continue;
            }
        };
        let status = response.status();
        let body = response.bytes().await.unwrap_or_default();
        if status.is_success() {
            match serde_json::from_slice::<Ack>(&body) {
                Ok(ack) => {
                    counts.acked.fetch_add(1, Relaxed);
                    relock(&shared.ledgers[*index]).acked(&ack.epoch, ack.offset, seq);
                }
                Err(_) => {
                    counts.other.fetch_add(1, Relaxed);
                }
            }
        } else if String::from_utf8_lossy(&body).contains("outcome_unknown") {
            counts.unknown.fetch_add(1, Relaxed);
            node += 1;
        } else if status.as_u16() == 503 || status.as_u16() == 429 {
            counts.refused.fetch_add(1, Relaxed);
            node += 1;
        } else {
            counts.other.fetch_add(1, Relaxed);
        }
    }
}

/// `--event SECS:COMMAND`.
fn parse_event(spec: &str) -> anyhow::Result<(f64, String)> {
    let (at, command) = spec
        .split_once(':')
        .with_context(|| format!("--event {spec:?}: expected SECS:COMMAND"))?;
    let at: f64 = at
        .trim()
        .parse()
        .with_context(|| format!("--event {spec:?}: {at:?} is not a number of seconds"))?;
    Ok((at, command.to_owned()))
}

/// Per transport (and in total): what the subscribers saw.
#[derive(Default, Serialize, Clone)]
pub(super) struct Seen {
    subscribers: u64,
    received: u64,
    lost_silently: u64,
    silent_epoch_changes: u64,
    duplicates: u64,
    reordered: u64,
    gap_notices: u64,
    reconnects: u64,
    /// Subscribers that had not reached their channel's last acknowledged position at the end.
    behind_at_end: u64,
    /// Messages those subscribers missed at the end, with no gap notice.
    missing_at_end: u64,
    not_recovered: u64,
    recover_max_s: f64,
    recover_p50_s: f64,
    unreadable: u64,
    fatal: u64,
}

#[derive(Serialize)]
pub(super) struct Report {
    label: Option<String>,
    nodes: usize,
    channels: usize,
    rate: u64,
    duration_s: f64,
    fault_at_s: Option<f64>,
    published_acked: u64,
    published_refused: u64,
    published_outcome_unknown: u64,
    published_other_errors: u64,
    /// Acknowledged positions that later named another payload (acknowledged and lost).
    offset_reused: u64,
    /// Acknowledged publishes no subscriber received.
    acked_never_delivered: u64,
    deliveries_per_s: f64,
    total: Seen,
    per_transport: Vec<(String, Seen)>,
    first_fatal: Option<String>,
}

impl Report {
    /// Silent loss, reuse, duplicates or reordering: what the run must never show.
    fn violations(&self) -> u64 {
        let t = &self.total;
        t.lost_silently
            + t.silent_epoch_changes
            + t.duplicates
            + t.reordered
            + t.missing_at_end
            + self.offset_reused
    }
}

struct Sub {
    transport: Transport,
    channel: usize,
    check: Arc<Mutex<Check>>,
    retries: Arc<AtomicU64>,
    fatal: Arc<Mutex<Option<String>>>,
}

fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Ws => "ws",
        Transport::Sse => "sse",
        Transport::Stream => "stream",
        Transport::LongPoll => "long-poll",
        Transport::Poll => "poll",
    }
}

pub(super) async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.subscribers == 0 || args.channels == 0 {
        bail!("--subscribers and --channels must be at least 1");
    }
    if args.transports.is_empty() {
        bail!("--transports: name at least one");
    }
    let clients = subscribe::clients_for(&args.url, None, &args.tls)?;
    let events = args
        .event
        .iter()
        .map(|e| parse_event(e))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let prefix = args
        .channel_prefix
        .clone()
        .unwrap_or_else(|| format!("verify-{}", now_us() / 1000));
    let names: Vec<String> = (0..args.channels)
        .map(|i| format!("{prefix}-{i}"))
        .collect();
    let shared = Arc::new(Shared {
        ledgers: (0..args.channels).map(|_| Mutex::default()).collect(),
        fault_at_us: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
    });

    let mut subs = Vec::with_capacity(args.subscribers);
    let mut tasks = Vec::with_capacity(args.subscribers);
    for i in 0..args.subscribers {
        let transport = args.transports[i % args.transports.len()];
        let channel = i % args.channels;
        let sub = Sub {
            transport,
            channel,
            check: Arc::default(),
            retries: Arc::default(),
            fatal: Arc::default(),
        };
        let sargs = SubscribeArgs {
            channels: vec![names[channel].clone()],
            transport,
            since: None,
            history: None,
            url: args.url.clone(),
            token: None,
            tls: args.tls.clone(),
            count: None,
            interval: Duration::from_secs_f64(args.poll_interval),
            wait: 20,
        };
        let sink = CheckSink {
            check: sub.check.clone(),
            shared: shared.clone(),
            channel,
            buf: Vec::new(),
        };
        let session = Session::new(
            clients.clone(),
            &sargs,
            Backoff::new(BACKOFF_INITIAL, BACKOFF_CAP),
            sink,
        )
        .quiet_from(i, sub.retries.clone());
        let fatal = sub.fatal.clone();
        let interval = sargs.interval;
        tasks.push(tokio::spawn(async move {
            let mut session = session;
            if let Err(e) = session.run(transport, interval).await {
                *relock(&fatal) = Some(format!("{e:#}"));
            }
        }));
        subs.push(sub);
        if i % args.connect_concurrency.max(1) == 0 {
            // Spreads the connects so a big run does not open thousands at once.
            tokio::task::yield_now().await;
        }
    }
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;

    let counts = Arc::new(PublishCounts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let nodes = clients.len();
    let mut publishers = Vec::new();
    if args.rate > 0 {
        let every = Duration::from_secs_f64(nodes as f64 / args.rate as f64);
        for p in 0..nodes.min(args.channels) {
            let mine: Vec<(usize, String)> = (0..args.channels)
                .filter(|c| c % nodes.min(args.channels) == p)
                .map(|c| (c, names[c].clone()))
                .collect();
            publishers.push(tokio::spawn(publisher(
                clients.clone(),
                p,
                mine,
                every,
                shared.clone(),
                counts.clone(),
                stop.clone(),
            )));
        }
    }
    let started = Instant::now();
    let mut fault_at_s = None;
    let events_task = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut first = None;
            for (at, command) in events {
                tokio::time::sleep_until(started + Duration::from_secs_f64(at)).await;
                if first.is_none() {
                    shared.fault_at_us.store(now_us(), Relaxed);
                    first = Some(at);
                }
                eprintln!("bench: t={at:.1}s running: {command}");
                // std's Command on a blocking thread: this crate's tokio has no `process`.
                let status = tokio::task::spawn_blocking(move || {
                    std::process::Command::new("sh")
                        .arg("-c")
                        .arg(&command)
                        .status()
                })
                .await;
                if !matches!(&status, Ok(Ok(s)) if s.success()) {
                    eprintln!("bench: the event command failed: {status:?}");
                }
            }
            first
        })
    };
    let duration = Duration::from_secs_f64(args.duration);
    let mut last_delivered = 0;
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if !args.quiet {
            let d = shared.delivered.load(Relaxed);
            let reconnects: u64 = subs.iter().map(|s| s.retries.load(Relaxed)).sum();
            eprintln!(
                "bench: t={:>5.1}s deliveries/s={:>7} acked={} refused={} unknown={} reconnects={}",
                started.elapsed().as_secs_f64(),
                d - last_delivered,
                counts.acked.load(Relaxed),
                counts.refused.load(Relaxed),
                counts.unknown.load(Relaxed),
                reconnects,
            );
            last_delivered = d;
        }
    }
    stop.store(true, Relaxed);
    for p in publishers {
        let _ = p.await;
    }
    if let Ok(first) = events_task.await {
        fault_at_s = first;
    }
    let delivered_during = shared.delivered.load(Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    // Drain: until every subscriber reached its channel's last acknowledged position.
    let drain_until = Instant::now() + Duration::from_secs_f64(args.drain);
    loop {
        let behind = subs
            .iter()
            .filter(|s| relock(&s.fatal).is_none() && !caught_up(s, &shared).0)
            .count();
        if behind == 0 || Instant::now() >= drain_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for t in &tasks {
        t.abort();
    }

    let report = report(
        &args,
        nodes,
        &subs,
        &shared,
        &counts,
        fault_at_s,
        delivered_during as f64 / elapsed.max(0.001),
    );
    print_report(&report);
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let violations = report.violations();
    if violations > 0 {
        bail!("{violations} violations of the delivery guarantees (see the table)");
    }
    if report.total.fatal > 0 {
        bail!(
            "{} subscribers gave up: {}",
            report.total.fatal,
            report.first_fatal.unwrap_or_default()
        );
    }
    Ok(())
}

/// Whether a subscriber reached its channel's last acknowledged position; if not, how many
/// messages it is missing without a gap notice that explains them.
fn caught_up(sub: &Sub, shared: &Shared) -> (bool, u64) {
    let last = relock(&shared.ledgers[sub.channel]).last.clone();
    let check = relock(&sub.check);
    match (last, check.epoch.as_deref()) {
        (None, _) => (true, 0),
        (Some(_), None) => (false, 0),
        (Some((epoch, offset)), Some(e)) => {
            if e == epoch && check.last >= offset {
                (true, 0)
            } else if e == epoch {
                let announced = check
                    .pending_gap
                    .as_ref()
                    .is_some_and(|(ge, _)| *ge == epoch);
                (false, if announced { 0 } else { offset - check.last })
            } else {
                (false, 0)
            }
        }
    }
}

fn report(
    args: &BenchArgs,
    nodes: usize,
    subs: &[Sub],
    shared: &Shared,
    counts: &PublishCounts,
    fault_at_s: Option<f64>,
    deliveries_per_s: f64,
) -> Report {
    let mut per: Vec<(String, Seen, Vec<u64>)> = Vec::new();
    let mut total = Seen::default();
    let mut all_recoveries = Vec::new();
    let mut first_fatal = None;
    for sub in subs {
        let name = transport_name(sub.transport);
        let at = match per.iter().position(|(n, _, _)| n == name) {
            Some(at) => at,
            None => {
                per.push((name.to_owned(), Seen::default(), Vec::new()));
                per.len() - 1
            }
        };
        let (ok, missing) = caught_up(sub, shared);
        let fatal = relock(&sub.fatal).clone();
        let check = relock(&sub.check);
        let (_, seen, recoveries) = &mut per[at];
        for s in [&mut *seen, &mut total] {
            s.subscribers += 1;
            s.received += check.received;
            s.lost_silently += check.lost_silently;
            s.silent_epoch_changes += check.silent_epoch_changes;
            s.duplicates += check.duplicates;
            s.reordered += check.reordered;
            s.gap_notices += check.gaps;
            s.reconnects += sub.retries.load(Relaxed);
            s.behind_at_end += u64::from(!ok);
            s.missing_at_end += missing;
            s.unreadable += check.unreadable;
            s.fatal += u64::from(fatal.is_some());
            if fault_at_s.is_some() && check.recovered_after_us.is_none() {
                s.not_recovered += 1;
            }
        }
        if let Some(us) = check.recovered_after_us {
            recoveries.push(us);
            all_recoveries.push(us);
        }
        if first_fatal.is_none() {
            first_fatal = fatal;
        }
    }
    let spread = |seen: &mut Seen, v: &mut Vec<u64>| {
        v.sort_unstable();
        if let Some(max) = v.last() {
            seen.recover_max_s = *max as f64 / 1e6;
            seen.recover_p50_s = v[v.len() / 2] as f64 / 1e6;
        }
    };
    spread(&mut total, &mut all_recoveries);
    let mut per_transport = Vec::new();
    for (name, mut seen, mut v) in per {
        spread(&mut seen, &mut v);
        per_transport.push((name, seen));
    }
    let (mut offset_reused, mut acked_never_delivered) = (0, 0);
    for ledger in &shared.ledgers {
        let l = relock(ledger);
        offset_reused += l.conflicts;
        acked_never_delivered += l.acked.keys().filter(|k| !l.seen.contains_key(*k)).count() as u64;
    }
    Report {
        label: args.label.clone(),
        nodes,
        channels: args.channels,
        rate: args.rate,
        duration_s: args.duration,
        fault_at_s,
        published_acked: counts.acked.load(Relaxed),
        published_refused: counts.refused.load(Relaxed),
        published_outcome_unknown: counts.unknown.load(Relaxed),
        published_other_errors: counts.other.load(Relaxed),
        offset_reused,
        acked_never_delivered,
        deliveries_per_s,
        total,
        per_transport,
        first_fatal,
    }
}

fn print_report(r: &Report) {
    println!(
        "{}: {} nodes, {} subscribers on {} channels, {} msg/s for {}s{}",
        r.label.as_deref().unwrap_or("verify"),
        r.nodes,
        r.total.subscribers,
        r.channels,
        r.rate,
        r.duration_s,
        r.fault_at_s
            .map(|t| format!(", fault at {t}s"))
            .unwrap_or_default()
    );
    println!(
        "publishes: {} acknowledged, {} refused (nothing stored), {} outcome unknown, {} other errors; \
         acknowledged then reused: {}, acknowledged and never delivered: {}; {:.0} deliveries/s",
        r.published_acked,
        r.published_refused,
        r.published_outcome_unknown,
        r.published_other_errors,
        r.offset_reused,
        r.acked_never_delivered,
        r.deliveries_per_s
    );
    println!(
        "| transport | subs | received | lost silently | dup | reordered | gap notices | reconnects | behind at end | recover p50 / max (s) | not recovered |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut rows: Vec<(&str, &Seen)> = r
        .per_transport
        .iter()
        .map(|(n, s)| (n.as_str(), s))
        .collect();
    rows.push(("**all**", &r.total));
    for (name, s) in rows {
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} / {:.2} | {} |",
            s.subscribers,
            s.received,
            s.lost_silently + s.silent_epoch_changes + s.missing_at_end,
            s.duplicates,
            s.reordered,
            s.gap_notices,
            s.reconnects,
            s.behind_at_end,
            s.recover_p50_s,
            s.recover_max_s,
            s.not_recovered
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink() -> (CheckSink, Arc<Mutex<Check>>, Arc<Shared>) {
        let shared = Arc::new(Shared {
            ledgers: vec![Mutex::default()],
            fault_at_us: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
        });
        let check = Arc::new(Mutex::new(Check::default()));
        let sink = CheckSink {
            check: check.clone(),
            shared: shared.clone(),
            channel: 0,
            buf: Vec::new(),
        };
        (sink, check, shared)
    }

    fn msg(epoch: &str, offset: u64, seq: u64) -> String {
        format!(
            "{{\"channel\":\"c\",\"offset\":{offset},\"epoch\":\"{epoch}\",\"data\":{{\"s\":{seq},\"t\":1}}}}\n"
        )
    }

    #[test]
    fn a_jump_without_a_gap_notice_is_lost_silently_and_one_after_a_notice_is_not() {
        let (mut sink, check, _) = sink();
        for line in [msg("e", 1, 1), msg("e", 2, 2), msg("e", 5, 5)] {
            sink.write_all(line.as_bytes()).unwrap();
        }
        assert_eq!(relock(&check).lost_silently, 2);
        sink.write_all(b"{\"type\":\"gap\",\"channel\":\"c\",\"epoch\":\"e\",\"next_offset\":9,\"reason\":\"trimmed\"}\n")
            .unwrap();
        sink.write_all(msg("e", 9, 9).as_bytes()).unwrap();
        let c = relock(&check);
        assert_eq!((c.lost_silently, c.gaps, c.last), (2, 1, 9));
    }

    #[test]
    fn repeats_steps_back_and_unannounced_epochs_are_counted_apart() {
        let (mut sink, check, _) = sink();
        // Split across writes the way a session's writeln may be.
        let all = [
            msg("e", 1, 1),
            msg("e", 2, 2),
            msg("e", 2, 2),
            msg("e", 1, 1),
            msg("f", 1, 7),
        ]
        .concat();
        let (a, b) = all.as_bytes().split_at(17);
        sink.write_all(a).unwrap();
        sink.write_all(b).unwrap();
        let c = relock(&check);
        assert_eq!(
            (
                c.duplicates,
                c.reordered,
                c.silent_epoch_changes,
                c.received
            ),
            (1, 1, 1, 5)
        );
    }

    #[test]
    fn an_acknowledged_position_that_later_names_another_payload_is_caught() {
        let (mut sink, _, shared) = sink();
        relock(&shared.ledgers[0]).acked("e", 3, 30);
        sink.write_all(msg("e", 3, 31).as_bytes()).unwrap();
        assert_eq!(relock(&shared.ledgers[0]).conflicts, 1);
        relock(&shared.ledgers[0]).acked("e", 4, 40);
        sink.write_all(msg("e", 4, 40).as_bytes()).unwrap();
        assert_eq!(relock(&shared.ledgers[0]).conflicts, 1);
    }
}
