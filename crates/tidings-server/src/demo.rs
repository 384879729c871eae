//! `tidings serve --demo`: live data for the demo pages, published by the server itself.
//!
//! - `demo:ticker` — the time, every second (the classic first SSE example).
//! - `demo:metrics` — simulated service metrics every second (requests/s, latency p50/p99,
//!   CPU per core, memory, queue depth), random walks so the dashboard's charts move.
//! - `demo:events` — a simulated log line now and then, with event name `log`.
//!
//! Demo mode also gives the demos' namespaces what they need when the configuration does not
//! mention them ([`configure`]): `chat` keeps presence and join/leave events (the chat's
//! presence list), `demo` keeps five minutes of samples (so charts are full on load), `lab`
//! keeps 1000 messages (so the lab's bursts never outrun a short poll's history). A
//! namespace the user configured is left exactly as configured.

use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use tidings_core::{ChannelName, Data, EventName};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, NamespaceConfig};
use crate::state::AppState;

pub const TICKER: &str = "demo:ticker";
pub const METRICS: &str = "demo:metrics";
pub const EVENTS: &str = "demo:events";

/// Namespace defaults for demo mode; leaves namespaces the configuration sets untouched.
pub fn configure(config: &mut Config) {
    config
        .namespaces
        .entry("chat".into())
        .or_insert_with(|| NamespaceConfig {
            presence: Some(true),
            join_leave: Some(true),
            history_size: Some(200),
            ..NamespaceConfig::default()
        });
    // The lab's bursts (100 at once, while a short poll waits a second) must not outrun
    // history, or the lab would show gaps that say more about the setting than the transport.
    config
        .namespaces
        .entry("lab".into())
        .or_insert_with(|| NamespaceConfig {
            history_size: Some(1000),
            ..NamespaceConfig::default()
        });
    config
        .namespaces
        .entry("demo".into())
        .or_insert_with(|| NamespaceConfig {
            history_size: Some(300),
            ..NamespaceConfig::default()
        });
}

/// Publishes the demo channels every second until `shutdown`.
pub async fn run(state: AppState, shutdown: CancellationToken) {
    let (Ok(ticker), Ok(metrics), Ok(events), Ok(log)) = (
        ChannelName::new(TICKER),
        ChannelName::new(METRICS),
        ChannelName::new(EVENTS),
        EventName::new("log"),
    ) else {
        return;
    };
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sim = Simulation::new(seed());
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        n += 1;
        let now = now_ms();
        let tick = json!({"n": n, "time": now, "iso": iso8601(now)});
        let sample = sim.step(now);
        let mut out = vec![(&ticker, None, tick), (&metrics, None, sample)];
        if let Some(line) = sim.log_line(now) {
            out.push((&events, Some(log.clone()), line));
        }
        for (channel, event, value) in out {
            let data = Data::Json(Bytes::from(value.to_string()));
            if let Err(e) = state.node.publish(channel, event, data).await {
                tracing::debug!(error = %e, %channel, "demo publish failed");
            }
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn seed() -> u64 {
    now_ms() ^ u64::from(std::process::id()).rotate_left(32) | 1
}

/// `2026-01-02T03:04:05Z` from Unix milliseconds (civil-from-days, proleptic Gregorian).
pub fn iso8601(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Random walks that look like a busy service. A tiny xorshift generator: the demo needs
/// movement, not statistics, and this keeps the server free of another dependency.
struct Simulation {
    rng: u64,
    rps: f64,
    p50: f64,
    cpu: [f64; 4],
    memory_mb: f64,
    queue: f64,
}

const SERVICES: [&str; 4] = ["api", "auth", "billing", "search"];
const MESSAGES: [(&str, &str); 6] = [
    ("info", "deploy finished"),
    ("info", "cache warmed"),
    ("warn", "slow query (420 ms)"),
    ("info", "new signup"),
    ("error", "upstream timed out"),
    ("warn", "retrying payment webhook"),
];

impl Simulation {
    fn new(seed: u64) -> Self {
        Self {
            rng: seed,
            rps: 1200.0,
            p50: 18.0,
            cpu: [35.0, 42.0, 28.0, 50.0],
            memory_mb: 512.0,
            queue: 4.0,
        }
    }

    /// Uniform in [0, 1).
    fn next(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A step of ±`step`, pulled back toward `center`, clamped to `[lo, hi]`.
    fn walk(&mut self, v: f64, step: f64, center: f64, lo: f64, hi: f64) -> f64 {
        let pull = (center - v) * 0.05;
        (v + (self.next() - 0.5) * 2.0 * step + pull).clamp(lo, hi)
    }

    fn step(&mut self, now: u64) -> serde_json::Value {
        self.rps = self.walk(self.rps, 120.0, 1200.0, 200.0, 4000.0);
        self.p50 = self.walk(self.p50, 2.0, 18.0, 5.0, 80.0);
        for i in 0..self.cpu.len() {
            self.cpu[i] = self.walk(self.cpu[i], 8.0, 40.0, 2.0, 99.0);
        }
        self.memory_mb = self.walk(self.memory_mb, 6.0, 520.0, 300.0, 900.0);
        self.queue = self.walk(self.queue, 2.0, 4.0, 0.0, 60.0);
        let p99 = self.p50 * (3.0 + self.next() * 2.0);
        let round1 = |v: f64| (v * 10.0).round() / 10.0;
        json!({
            "time": now,
            "rps": self.rps.round(),
            "latency_ms": {"p50": round1(self.p50), "p99": round1(p99)},
            "cpu": self.cpu.iter().map(|c| round1(*c)).collect::<Vec<_>>(),
            "memory_mb": self.memory_mb.round(),
            "queue": self.queue.round(),
        })
    }

    /// About one log line every three seconds.
    fn log_line(&mut self, now: u64) -> Option<serde_json::Value> {
        if self.next() > 0.35 {
            return None;
        }
        let (level, text) =
            MESSAGES[(self.next() * MESSAGES.len() as f64) as usize % MESSAGES.len()];
        let service = SERVICES[(self.next() * SERVICES.len() as f64) as usize % SERVICES.len()];
        Some(json!({"time": now, "level": level, "service": service, "text": text}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn iso8601_formats_known_instants() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601(1_732_200_000_123), "2024-11-21T14:40:00Z");
    }

    #[test]
    fn demo_mode_fills_in_namespaces_but_keeps_configured_ones() {
        let mut c = Config::from_toml("[namespaces.chat]\npresence = false\n").unwrap();
        configure(&mut c);
        assert_eq!(c.namespaces["chat"].presence, Some(false));
        assert_eq!(c.namespaces["demo"].history_size, Some(300));
        let mut c = Config::default();
        configure(&mut c);
        let p = c.policies();
        let chat = p.for_channel(&ChannelName::new("chat:lobby").unwrap());
        assert!(chat.presence && chat.join_leave);
    }

    #[test]
    fn the_simulation_stays_in_range() {
        let mut s = Simulation::new(42);
        for i in 0..1000 {
            let v = s.step(i);
            let rps = v["rps"].as_f64().unwrap();
            assert!((200.0..=4000.0).contains(&rps), "{v}");
            assert!(v["cpu"].as_array().unwrap().len() == 4);
            let _ = s.log_line(i);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_demo_publishes_the_ticker_every_second_until_shutdown() {
        let state = AppState::new(Config::default()).unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(state.clone(), stop.clone()));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let stats = state
            .node
            .broker
            .stats(&ChannelName::new(TICKER).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stats.top.offset, 3, "ticks at 0 s, 1 s and 2 s");
        stop.cancel();
        task.await.unwrap();
    }
}
