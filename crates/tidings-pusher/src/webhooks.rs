//! Webhooks: what happened on an app's channels, POSTed to its `webhook_url` in batches,
//! signed (`X-Pusher-Key`, `X-Pusher-Signature` = HMAC-SHA256 of the body with the secret),
//! retried with backoff while the endpoint fails.
//!
//! Bounded: the queue holds at most `MAX_QUEUED` events; past that the oldest are dropped
//! and counted, so a dead endpoint costs a fixed amount of memory. A batch carries at most
//! `MAX_BATCH` events and is retried `RETRIES` times (1 s, 2 s, 4 s, … capped at 60 s) before
//! it is dropped and counted too.
//!
//! Concurrency: producers (sessions) push under a `std::sync::Mutex` held for a `VecDeque`
//! push; the one sender task per app (in the server) takes batches and wakes on `Notify`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde_json::{Value, json};

pub const MAX_QUEUED: usize = 10_000;
pub const MAX_BATCH: usize = 100;
pub const RETRIES: u32 = 8;
/// How long the sender waits for more events before it sends what it has.
pub const BATCH_DELAY: Duration = Duration::from_millis(50);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WebhookEvent {
    ChannelOccupied {
        channel: String,
    },
    ChannelVacated {
        channel: String,
    },
    MemberAdded {
        channel: String,
        user_id: String,
    },
    MemberRemoved {
        channel: String,
        user_id: String,
    },
    ClientEvent {
        channel: String,
        event: String,
        data: String,
        socket_id: String,
        user_id: Option<String>,
    },
}

impl WebhookEvent {
    pub fn to_json(&self) -> Value {
        match self {
            WebhookEvent::ChannelOccupied { channel } => {
                json!({"name": "channel_occupied", "channel": channel})
            }
            WebhookEvent::ChannelVacated { channel } => {
                json!({"name": "channel_vacated", "channel": channel})
            }
            WebhookEvent::MemberAdded { channel, user_id } => {
                json!({"name": "member_added", "channel": channel, "user_id": user_id})
            }
            WebhookEvent::MemberRemoved { channel, user_id } => {
                json!({"name": "member_removed", "channel": channel, "user_id": user_id})
            }
            WebhookEvent::ClientEvent {
                channel,
                event,
                data,
                socket_id,
                user_id,
            } => {
                let mut v = json!({"name": "client_event", "channel": channel, "event": event, "data": data, "socket_id": socket_id});
                if let Some(u) = user_id {
                    v["user_id"] = json!(u);
                }
                v
            }
        }
    }
}

pub struct WebhookQueue {
    events: Mutex<VecDeque<WebhookEvent>>,
    cap: usize,
    dropped: AtomicU64,
    pub wake: tokio::sync::Notify,
}

impl WebhookQueue {
    pub fn new(cap: usize) -> Self {
        Self {
            events: Mutex::new(VecDeque::new()),
            cap,
            dropped: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
        }
    }

    pub fn push(&self, event: WebhookEvent) {
        {
            let mut q = self.events.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() >= self.cap {
                q.pop_front();
                self.dropped.fetch_add(1, Relaxed);
            }
            q.push_back(event);
        }
        self.wake.notify_one();
    }

    /// Takes up to `MAX_BATCH` events.
    pub fn take_batch(&self) -> Vec<WebhookEvent> {
        let mut q = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let n = q.len().min(MAX_BATCH);
        q.drain(..n).collect()
    }

    pub fn len(&self) -> usize {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counts events given up on (a batch out of retries).
    pub fn drop_batch(&self, n: usize) {
        self.dropped.fetch_add(n as u64, Relaxed);
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }
}

/// The body Pusher sends: `{"time_ms", "events": [...]}`.
pub fn body(time_ms: u64, events: &[WebhookEvent]) -> String {
    let events: Vec<Value> = events.iter().map(WebhookEvent::to_json).collect();
    json!({"time_ms": time_ms, "events": events}).to_string()
}

/// `X-Pusher-Signature` for `body`.
pub fn signature(secret: &str, body: &str) -> String {
    crate::sign::sign(secret, body)
}

/// The wait before retry `attempt` (1-based): 1 s, 2 s, 4 s, … at most 60 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts_it() {
        let q = WebhookQueue::new(2);
        for c in ["a", "b", "c"] {
            q.push(WebhookEvent::ChannelOccupied { channel: c.into() });
        }
        assert_eq!(q.dropped(), 1);
        let batch = q.take_batch();
        assert_eq!(
            batch,
            vec![
                WebhookEvent::ChannelOccupied {
                    channel: "b".into()
                },
                WebhookEvent::ChannelOccupied {
                    channel: "c".into()
                }
            ]
        );
    }

    #[test]
    fn the_body_is_signed_with_the_secret_and_backoff_doubles_to_a_cap() {
        let b = body(
            5,
            &[WebhookEvent::ChannelVacated {
                channel: "x".into(),
            }],
        );
        assert_eq!(
            b,
            r#"{"time_ms":5,"events":[{"name":"channel_vacated","channel":"x"}]}"#
        );
        assert_eq!(signature("s", &b), crate::sign::sign("s", &b));
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(4));
        assert_eq!(backoff(30), Duration::from_secs(60));
    }
}
