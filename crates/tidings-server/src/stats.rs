//! The server's own stats, published once a second to [`STATS_CHANNEL`] for the admin console
//! (`/admin`), which follows it over SSE like any other channel.
//!
//! What a sample holds: sessions and subscriptions per transport, messages published and
//! delivered per second (with the last minute of both, so a chart is full the moment the
//! console opens), the busiest channels with their subscriber counts, open TCP connections and
//! the process's resident memory.
//!
//! Cost: counters are sampled every second whatever happens (a few atomic loads). Ranking the
//! channels and publishing happen only while someone follows the stats channel, so an idle
//! server stores nothing and its metrics and channel list are untouched. The sample is
//! published through the node directly, not the publish API, so it does not count itself in
//! "messages published".
//!
//! Access: the channel lives in the `admin` namespace so that, once auth exists, one
//! namespace rule (subscribe = API key) protects every admin stream.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tidings_core::{ChannelName, Data};
use tokio::time::MissedTickBehavior;

use crate::state::AppState;
use crate::transport::TransportKind;

/// Connections listed per Pusher app in a sample (the console shows the first ones).
const PUSHER_SOCKETS: usize = 50;

/// Where the stats go.
pub const STATS_CHANNEL: &str = "admin:stats";
/// How often.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Seconds of rate history carried in every sample.
const HISTORY: usize = 60;
/// Channels listed, busiest first.
const TOP_CHANNELS: usize = 20;
/// At most this many channels are ranked each second (a sample of the broker's and of those
/// with local subscribers): reading, let alone cloning, a million channels' names and
/// positions each second would cost more than the console is worth. Below it the ranking is
/// exact; above it, `total` is still exact and `top` is the busiest of the sample.
const RANK_AT_MOST: usize = 5_000;

/// Samples every second until the server shuts down; publishes while someone is watching.
pub async fn run(state: AppState) {
    let Ok(channel) = ChannelName::new(STATS_CHANNEL) else {
        return;
    };
    let mut ticker = tokio::time::interval(INTERVAL);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sampler = Sampler::default();
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        sampler.tick(&state);
        if state.node.hub.subscriber_count(&channel) == 0 {
            sampler.offsets.clear();
            continue;
        }
        let channels = sampler.rank_channels(&state, &channel).await;
        let sample = sampler.sample(&state, channels);
        let data = Data::Json(Bytes::from(sample.to_string()));
        if let Err(e) = state.node.publish(&channel, None, data).await {
            tracing::debug!(error = %e, "could not publish the stats sample");
        }
    }
}

#[derive(Default)]
struct Sampler {
    last_published: Option<u64>,
    last_delivered: Option<u64>,
    published_rate: VecDeque<u64>,
    delivered_rate: VecDeque<u64>,
    /// Each channel's last seen (epoch, offset), to turn offsets into a rate.
    offsets: HashMap<ChannelName, (String, u64)>,
}

fn push(q: &mut VecDeque<u64>, v: u64) {
    if q.len() == HISTORY {
        q.pop_front();
    }
    q.push_back(v);
}

impl Sampler {
    fn tick(&mut self, state: &AppState) {
        let m = &state.metrics;
        let published = m.published.load(Relaxed);
        let delivered: u64 = m.delivered.iter().map(|d| d.load(Relaxed)).sum();
        let rate = |now: u64, last: Option<u64>| last.map_or(0, |l| now.saturating_sub(l));
        push(
            &mut self.published_rate,
            rate(published, self.last_published),
        );
        push(
            &mut self.delivered_rate,
            rate(delivered, self.last_delivered),
        );
        self.last_published = Some(published);
        self.last_delivered = Some(delivered);
    }

    /// The busiest channels (messages in the last second, then subscribers), skipping the
    /// stats channel itself.
    async fn rank_channels(&mut self, state: &AppState, skip: &ChannelName) -> Value {
        let mut names = state.node.hub.channel_sample(RANK_AT_MOST);
        let mut total = None;
        if let Ok((count, sample)) = state.node.broker.channel_sample(RANK_AT_MOST).await {
            total = Some(count);
            names.extend(sample);
        }
        names.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
        names.dedup();
        let total = total.unwrap_or(names.len()).max(names.len());
        let mut rows = Vec::with_capacity(names.len());
        let mut seen = HashMap::with_capacity(names.len());
        for name in names {
            if &name == skip {
                continue;
            }
            let subscribers = state.node.hub.subscriber_count(&name);
            let (offset, epoch, history) = match state.node.broker.stats(&name).await {
                Ok(Some(s)) => (s.top.offset, s.top.epoch.to_string(), s.history_len),
                _ => (0, String::new(), 0),
            };
            let rate = match self.offsets.get(&name) {
                Some((e, o)) if *e == epoch => offset.saturating_sub(*o),
                _ => 0,
            };
            seen.insert(name.clone(), (epoch, offset));
            rows.push((rate, subscribers, name, offset, history));
        }
        self.offsets = seen;
        rows.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
        let top: Vec<Value> = rows
            .into_iter()
            .take(TOP_CHANNELS)
            .map(|(rate, subscribers, name, offset, history)| {
                json!({
                    "channel": name.as_str(),
                    "rate": rate,
                    "subscribers": subscribers,
                    "offset": offset,
                    "history": history,
                })
            })
            .collect();
        json!({"total": total, "top": top})
    }

    fn sample(&self, state: &AppState, channels: Value) -> Value {
        let m = &state.metrics;
        let mut connections = serde_json::Map::new();
        let mut subscriptions = serde_json::Map::new();
        for t in TransportKind::ALL {
            let i = t as usize;
            connections.insert(t.as_str().into(), json!(m.connections[i].load(Relaxed)));
            subscriptions.insert(t.as_str().into(), json!(m.subscriptions[i].load(Relaxed)));
        }
        json!({
            "time": now_ms(),
            "connections": connections,
            "subscriptions": subscriptions,
            "tcp_connections": m.http_connections.load(Relaxed),
            "published_per_sec": self.published_rate.back().copied().unwrap_or(0),
            "delivered_per_sec": self.delivered_rate.back().copied().unwrap_or(0),
            "published_history": self.published_rate,
            "delivered_history": self.delivered_rate,
            "published_total": m.published.load(Relaxed),
            "delivered_total": m.delivered.iter().map(|d| d.load(Relaxed)).sum::<u64>(),
            "channels": channels,
            "rss_bytes": rss_bytes(),
            "broker": state.node.broker.kind(),
            "pusher": state.pusher.iter().map(|a| a.summary(PUSHER_SOCKETS)).collect::<Vec<_>>(),
        })
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Resident memory from `/proc/self/status` (`VmRSS`); `None` where there is no procfs.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use tidings_core::Start;

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let status = "Name:\ttidings\nVmPeak:\t  9000 kB\nVmRSS:\t   12345 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss(status), Some(12345 * 1024));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn samples_are_published_only_while_someone_follows_the_stats_channel() {
        let state = AppState::new(Config::default()).unwrap();
        let channel = ChannelName::new(STATS_CHANNEL).unwrap();
        let task = tokio::spawn(run(state.clone()));
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert!(state.node.broker.stats(&channel).await.unwrap().is_none());

        let mut sub = state
            .node
            .subscribe(std::slice::from_ref(&channel), &Start::Now, 1 << 20, None)
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(3), sub.ready())
            .await
            .unwrap();
        let mut got = Vec::new();
        let _ = sub.drain(|e, _| {
            if let tidings_core::Event::Message(m) = e {
                got.push(m.clone());
            }
        });
        let m = got.first().expect("a stats sample");
        let v: Value = serde_json::from_slice(m.data.raw()).unwrap();
        assert!(v["connections"]["websocket"].is_number(), "{v}");
        assert!(v["published_history"].is_array(), "{v}");
        assert!(v["channels"]["top"].is_array(), "{v}");
        state.shutdown.cancel();
        task.await.unwrap();
    }
}
