//! The in-memory broker: one node, history in RAM, an epoch per channel incarnation.
//!
//! Concurrency: channels live in a sharded map of `Arc<Mutex<History>>` (std mutexes, never
//! held across an `.await`). `publish` assigns the offset, appends and calls
//! `Hub::deliver` under the channel's lock: that makes "in history before anyone sees it" and
//! "delivered in offset order" hold by construction. Fan-out under the lock costs one queue
//! push per local subscriber and blocks only other publishers of the same channel.
//!
//! A channel with no subscribers, no retained history and no use for a whole `history_ttl` is
//! reclaimed by a sweeper task; when it comes back it gets a new epoch, so an old cursor
//! reports `epoch_changed`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::time::Instant;

use crate::broker::{Broker, BrokerError, ChannelStats};
use crate::channel::{ChannelName, EventName};
use crate::history::{History, HistoryRead, Since};
use crate::hub::Hub;
use crate::idempotency::{IdempotencyWindow, PublishOptions, Published, Remembered};
use crate::message::{Data, Epoch, Message};
use crate::policy::LivePolicies;
use crate::presence::{ClientInfo, PresenceEvent, PresenceKind};
use crate::shards::Shards;

const SWEEP_EVERY: Duration = Duration::from_secs(5);

pub struct MemoryBroker {
    hub: Arc<Hub>,
    policies: Arc<LivePolicies>,
    shards: Shards<Arc<Mutex<History>>>,
    /// Idempotency keys per channel, checked and recorded while holding the channel's
    /// history lock (lock order: history, then this shard). Kept apart from the history so a
    /// reclaimed channel still remembers them; the sweeper drops empty windows.
    keys: Shards<IdempotencyWindow>,
    /// Who is present where. One lock: joins and leaves are per connection, not per message.
    presence: Mutex<HashMap<ChannelName, Vec<ClientInfo>>>,
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data valid at each step; poisoning carries no meaning.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl MemoryBroker {
    /// Creates the broker and, inside a tokio runtime, its sweeper (which ends with the broker).
    pub fn new(hub: Arc<Hub>, policies: Arc<LivePolicies>) -> Arc<Self> {
        let broker = Arc::new(Self {
            hub,
            policies,
            shards: Shards::new(),
            keys: Shards::new(),
            presence: Mutex::new(HashMap::new()),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&broker);
            rt.spawn(sweep_loop(weak));
        }
        broker
    }

    fn channel(&self, channel: &ChannelName) -> Arc<Mutex<History>> {
        let mut shard = relock(self.shards.of(channel));
        shard
            .entry(channel.clone())
            .or_insert_with(|| {
                let policy = self.policies.for_channel(channel);
                Arc::new(Mutex::new(History::new(
                    channel.clone(),
                    Epoch::random(),
                    policy.history_size,
                    policy.history_ttl,
                )))
            })
            .clone()
    }

    /// Expires history everywhere and reclaims channels nobody follows and nothing is kept for.
    pub fn sweep(&self) {
        let now = Instant::now();
        for shard in self.shards.all() {
            let mut shard = relock(shard);
            shard.retain(|name, history| {
                let mut h = relock(history);
                h.expire(now);
                // The hub check happens under the shard lock: a subscriber that registers
                // after it and then reads will create a fresh channel, which is consistent.
                !h.reclaimable(now) || self.hub.subscriber_count(name) > 0
            });
        }
        for shard in self.keys.all() {
            relock(shard).retain(|_, window| !window.sweep(now));
        }
    }
}

async fn sweep_loop(broker: Weak<MemoryBroker>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match broker.upgrade() {
            Some(b) => b.sweep(),
            None => return,
        }
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn publish_with(
        &self,
        channel: &ChannelName,
        event: Option<EventName>,
        data: Data,
        options: &PublishOptions,
    ) -> Result<Published, BrokerError> {
        let history = self.channel(channel);
        let mut h = relock(&history);
        let now = Instant::now();
        // Idempotency hook: checked and recorded under the channel's lock, so two publishes
        // with one key store one message.
        if let Some(key) = &options.idempotency_key
            && let Some(first) = relock(self.keys.of(channel))
                .get_mut(channel)
                .and_then(|w| w.get(key, now))
        {
            let message = Message::new(channel.clone(), first.position, event, data, first.time);
            return Ok(Published {
                message: Arc::new(message),
                replayed: true,
            });
        }
        h.expire(now);
        h.touch(now);
        let message = Arc::new(Message::new(
            channel.clone(),
            h.next_position(),
            event,
            data,
            now_millis(),
        ));
        h.append(message.clone(), now);
        if let Some(key) = &options.idempotency_key {
            let first = Remembered {
                position: message.position(),
                time: message.time,
            };
            relock(self.keys.of(channel))
                .entry(channel.clone())
                .or_default()
                .insert(key.clone(), first, now, options.idempotency_window);
        }
        self.hub.deliver(&message);
        Ok(Published {
            message,
            replayed: false,
        })
    }

    async fn read(
        &self,
        channel: &ChannelName,
        since: &Since,
        limit: Option<usize>,
    ) -> Result<HistoryRead, BrokerError> {
        let history = self.channel(channel);
        let mut h = relock(&history);
        let now = Instant::now();
        h.expire(now);
        h.touch(now);
        Ok(h.read(since, limit))
    }

    async fn subscribe(&self, _channel: &ChannelName) -> Result<(), BrokerError> {
        // One process: every publish already goes through this node's hub.
        Ok(())
    }

    async fn unsubscribe(&self, _channel: &ChannelName) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn stats(&self, channel: &ChannelName) -> Result<Option<ChannelStats>, BrokerError> {
        let history = relock(self.shards.of(channel)).get(channel).cloned();
        Ok(history.map(|h| {
            let mut h = relock(&h);
            h.expire(Instant::now());
            ChannelStats {
                top: h.top(),
                history_len: h.len(),
            }
        }))
    }

    async fn channels(&self) -> Result<Vec<ChannelName>, BrokerError> {
        Ok(self
            .shards
            .all()
            .flat_map(|s| relock(s).keys().cloned().collect::<Vec<_>>())
            .collect())
    }

    async fn ready(&self) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn presence_join(
        &self,
        channel: &ChannelName,
        info: &ClientInfo,
        announce: bool,
    ) -> Result<(), BrokerError> {
        relock(&self.presence)
            .entry(channel.clone())
            .or_default()
            .push(info.clone());
        if announce {
            self.announce(PresenceKind::Join, channel, info);
        }
        Ok(())
    }

    async fn presence_leave(
        &self,
        channel: &ChannelName,
        info: &ClientInfo,
        announce: bool,
    ) -> Result<(), BrokerError> {
        let removed = {
            let mut all = relock(&self.presence);
            let removed = all.get_mut(channel).and_then(|list| {
                let i = list.iter().position(|c| c.client == info.client)?;
                Some(list.swap_remove(i))
            });
            if all.get(channel).is_some_and(Vec::is_empty) {
                all.remove(channel);
            }
            removed.is_some()
        };
        if announce && removed {
            self.announce(PresenceKind::Leave, channel, info);
        }
        Ok(())
    }

    async fn presence(&self, channel: &ChannelName) -> Result<Vec<ClientInfo>, BrokerError> {
        Ok(relock(&self.presence)
            .get(channel)
            .cloned()
            .unwrap_or_default())
    }
}

impl MemoryBroker {
    fn announce(&self, kind: PresenceKind, channel: &ChannelName, info: &ClientInfo) {
        self.hub.deliver_presence(&Arc::new(PresenceEvent {
            kind,
            channel: channel.clone(),
            info: info.clone(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Since;

    fn broker(ttl: Duration) -> Arc<MemoryBroker> {
        let policies = crate::policy::Policies {
            default: crate::policy::ChannelPolicy {
                history_ttl: ttl,
                ..Default::default()
            },
            namespaces: Default::default(),
        };
        MemoryBroker::new(Arc::new(Hub::new()), LivePolicies::new(policies))
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_channel_keeps_its_epoch_until_unused_for_a_whole_ttl() {
        let b = broker(Duration::from_secs(60));
        let c = ChannelName::new("idle").unwrap();
        let e1 = b.read(&c, &Since::Now, None).await.unwrap().top.epoch;
        tokio::time::advance(Duration::from_secs(30)).await;
        b.sweep();
        let e2 = b.read(&c, &Since::Now, None).await.unwrap().top.epoch;
        assert_eq!(e1, e2, "reclaimed while still in use");
        tokio::time::advance(Duration::from_secs(61)).await;
        b.sweep();
        assert!(b.channels().await.unwrap().is_empty());
        let e3 = b.read(&c, &Since::Now, None).await.unwrap().top.epoch;
        assert_ne!(
            e1, e3,
            "a reclaimed channel comes back as a new incarnation"
        );
    }
}
