//! Client rates per identity (`client_publish_rate`, presence reads).
//!
//! Rates are kept per client, not per connection (SPEC §13): one bucket per token
//! subject, one per IP address for requests without one, shared by every connection and
//! transport — a client that opens 200 connections gets the rate of one. The map is bounded
//! by what is active: a bucket that has refilled is the same as no bucket, so such entries
//! are swept whenever the map has doubled since the last sweep (amortised O(1)). One std
//! `Mutex` held for a lookup, never across an `.await`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use tokio::time::Instant;

/// Whose bucket a request draws from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// A token's `sub`: all of that user's connections together.
    Subject(String),
    /// No subject: the client's address.
    Ip(IpAddr),
}

/// Token buckets per client (see the module docs): `rate` per second, bursts up to `rate`.
pub struct Rates {
    rate: f64,
    state: Mutex<RatesState>,
}

struct RatesState {
    buckets: HashMap<RateKey, (f64, Instant)>,
    sweep_at: usize,
}

const FIRST_SWEEP: usize = 1024;

impl Rates {
    /// `rate` per second; 0 = unlimited.
    pub fn new(rate: u32) -> Self {
        Self {
            rate: f64::from(rate),
            state: Mutex::new(RatesState {
                buckets: HashMap::new(),
                sweep_at: FIRST_SWEEP,
            }),
        }
    }

    /// Takes one token from `key`'s bucket if there is one.
    pub fn try_take(&self, key: &RateKey) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let now = Instant::now();
        let rate = self.rate;
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.buckets.len() >= s.sweep_at {
            s.buckets.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * rate < rate
            });
            s.sweep_at = (s.buckets.len() * 2).max(FIRST_SWEEP);
        }
        if !s.buckets.contains_key(key) {
            s.buckets.insert(key.clone(), (rate, now));
        }
        let Some(bucket) = s.buckets.get_mut(key) else {
            return true;
        };
        let refill = now.saturating_duration_since(bucket.1).as_secs_f64() * rate;
        bucket.0 = (bucket.0 + refill).min(rate);
        bucket.1 = now;
        if bucket.0 >= 1.0 {
            bucket.0 -= 1.0;
            true
        } else {
            false
        }
    }

    /// Clients with a bucket right now (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .buckets
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn clients_share_nothing_and_idle_buckets_are_swept() {
        let r = Rates::new(2);
        let alice = RateKey::Subject("alice".into());
        let ip = RateKey::Ip("127.0.0.1".parse().unwrap());
        assert!(r.try_take(&alice) && r.try_take(&alice));
        assert!(!r.try_take(&alice));
        assert!(r.try_take(&ip));
        // Many one-off clients, then time for their buckets to refill: a sweep drops them.
        for i in 0..3000u32 {
            r.try_take(&RateKey::Subject(i.to_string()));
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        for i in 0..3000u32 {
            r.try_take(&RateKey::Subject(format!("x{i}")));
        }
        assert!(r.tracked() < 5000, "{}", r.tracked());
        assert!(r.try_take(&alice));
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_allows_bursts_then_the_rate() {
        let r = Rates::new(5);
        let k = RateKey::Ip("127.0.0.1".parse().unwrap());
        assert!((0..5).all(|_| r.try_take(&k)));
        assert!(!r.try_take(&k));
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(r.try_take(&k));
        assert!(!r.try_take(&k));
        assert!(Rates::new(0).try_take(&k));
    }
}
