//! Prometheus metrics, kept as plain atomics indexed by transport so the delivery hot path
//! costs one relaxed add and no label lookup. Rendered by hand in the text format.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use crate::transport::TransportKind;

const N: usize = TransportKind::ALL.len();

#[derive(Default)]
pub struct Metrics {
    pub connections: [AtomicI64; N],
    pub subscriptions: [AtomicI64; N],
    pub delivered: [AtomicU64; N],
    pub slow_disconnects: [AtomicU64; N],
    pub gaps: [AtomicU64; N],
    pub published: AtomicU64,
    pub publish_errors: AtomicU64,
    pub http_connections: AtomicI64,
    pub http_connections_total: AtomicU64,
}

impl Metrics {
    /// Counts a session open until the guard drops.
    pub fn session(self: &Arc<Self>, kind: TransportKind, channels: usize) -> SessionGauge {
        SessionGauge {
            count: SessionCount::open(self, kind, channels),
            metrics: self.clone(),
            kind,
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let per_transport =
            |out: &mut String, name: &str, kind: &str, help: &str, get: &dyn Fn(usize) -> i128| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for t in TransportKind::ALL {
                    let _ = writeln!(
                        out,
                        "{name}{{transport=\"{}\"}} {}",
                        t.as_str(),
                        get(t as usize)
                    );
                }
            };
        per_transport(
            &mut out,
            "tidings_connections",
            "gauge",
            "Open subscriber sessions.",
            &|i| i128::from(self.connections[i].load(Relaxed)),
        );
        per_transport(
            &mut out,
            "tidings_subscriptions",
            "gauge",
            "Channel subscriptions of open sessions.",
            &|i| i128::from(self.subscriptions[i].load(Relaxed)),
        );
        per_transport(
            &mut out,
            "tidings_messages_delivered_total",
            "counter",
            "Messages written to subscribers.",
            &|i| i128::from(self.delivered[i].load(Relaxed)),
        );
        per_transport(
            &mut out,
            "tidings_slow_disconnects_total",
            "counter",
            "Sessions ended because their outbound queue overflowed.",
            &|i| i128::from(self.slow_disconnects[i].load(Relaxed)),
        );
        per_transport(
            &mut out,
            "tidings_gaps_total",
            "counter",
            "Gap notices sent.",
            &|i| i128::from(self.gaps[i].load(Relaxed)),
        );
        let single = |out: &mut String, name: &str, kind: &str, help: &str, v: i128| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        single(
            &mut out,
            "tidings_messages_published_total",
            "counter",
            "Messages accepted by publish.",
            i128::from(self.published.load(Relaxed)),
        );
        single(
            &mut out,
            "tidings_publish_errors_total",
            "counter",
            "Publishes refused by the broker.",
            i128::from(self.publish_errors.load(Relaxed)),
        );
        single(
            &mut out,
            "tidings_http_connections",
            "gauge",
            "Open TCP connections.",
            i128::from(self.http_connections.load(Relaxed)),
        );
        single(
            &mut out,
            "tidings_http_connections_total",
            "counter",
            "TCP connections accepted.",
            i128::from(self.http_connections_total.load(Relaxed)),
        );
        out
    }
}

/// A session's part of its transport's gauges (one connection, its channels), without a
/// pointer to the metrics: for a session that reaches them through its state anyway (the
/// WebSocket session: 4 bytes where a `SessionGauge` is 16; issue 17). Its owner calls
/// `close` once, when the session ends; `SessionGauge` does it on drop.
pub struct SessionCount {
    /// What to take off the gauge when the session ends. 32 bits: a session follows at most
    /// `max_channels_per_subscription`, in the tens.
    channels: i32,
}

impl SessionCount {
    pub fn open(metrics: &Metrics, kind: TransportKind, channels: usize) -> Self {
        let i = kind as usize;
        metrics.connections[i].fetch_add(1, Relaxed);
        metrics.subscriptions[i].fetch_add(channels as i64, Relaxed);
        Self {
            channels: channels as i32,
        }
    }

    /// A session whose channel set changes (WebSocket) reports each join and leave.
    pub fn channels_changed(&mut self, metrics: &Metrics, kind: TransportKind, delta: i64) {
        self.channels += delta as i32;
        metrics.subscriptions[kind as usize].fetch_add(delta, Relaxed);
    }

    pub fn close(&self, metrics: &Metrics, kind: TransportKind) {
        let i = kind as usize;
        metrics.connections[i].fetch_sub(1, Relaxed);
        metrics.subscriptions[i].fetch_sub(i64::from(self.channels), Relaxed);
    }
}

/// A `SessionCount` that keeps the metrics and closes itself when dropped.
pub struct SessionGauge {
    metrics: Arc<Metrics>,
    kind: TransportKind,
    count: SessionCount,
}

impl SessionGauge {
    /// A session whose channel set changes (WebSocket) reports each join and leave.
    pub fn channels_changed(&mut self, delta: i64) {
        self.count.channels_changed(&self.metrics, self.kind, delta);
    }

    pub fn delivered(&self, n: u64) {
        self.metrics.delivered[self.kind as usize].fetch_add(n, Relaxed);
    }

    pub fn gap(&self) {
        self.metrics.gaps[self.kind as usize].fetch_add(1, Relaxed);
    }

    pub fn slow(&self) {
        self.metrics.slow_disconnects[self.kind as usize].fetch_add(1, Relaxed);
    }
}

impl Drop for SessionGauge {
    fn drop(&mut self) {
        self.count.close(&self.metrics, self.kind);
    }
}
