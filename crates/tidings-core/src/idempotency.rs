//! Idempotent publishing: a publisher that does not know whether a publish went through (its
//! reply was lost, or the server answered `outcome_unknown`) sends it again with the same
//! key, and a key seen on the channel within the window publishes nothing and answers what
//! the first publish answered.
//!
//! Brokers keep the keys next to the channel and check them in the same atomic step as the
//! publish (the memory broker under the channel's lock, Redis inside the publish script), so
//! two racing publishes with one key store one message. `IdempotencyWindow` is the in-memory
//! form; it is bounded per channel (`MAX_KEYS_PER_CHANNEL`, the oldest forgotten first).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::message::{Message, Position};

/// `[broker] idempotency_window` when unset.
pub const DEFAULT_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(120);
/// Keys one channel remembers at once; past that the oldest are forgotten early.
pub const MAX_KEYS_PER_CHANNEL: usize = 10_000;

/// A publisher's idempotency key: 1 to 128 of `A-Z a-z 0-9 _ . : @ = + / -` (UUIDs, ULIDs,
/// base64 and `order-42:attempt` all fit; nothing that needs escaping anywhere).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(Arc<str>);

impl IdempotencyKey {
    pub const MAX_LEN: usize = 128;

    pub fn new(key: &str) -> Result<Self, InvalidIdempotencyKey> {
        let ok = !key.is_empty()
            && key.len() <= Self::MAX_LEN
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.:@=+/-".contains(&b));
        if ok {
            Ok(Self(Arc::from(key)))
        } else {
            Err(InvalidIdempotencyKey)
        }
    }

    /// A fresh random key (24 base-36 characters, ~124 bits), for a client that retries.
    pub fn random() -> Self {
        const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let s: String = (0..24)
            .map(|_| char::from(ALPHABET[rand::random_range(0..ALPHABET.len())]))
            .collect();
        Self(Arc::from(s.as_str()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("an idempotency key is 1 to 128 of A-Z a-z 0-9 _ . : @ = + / - (a UUID, say)")]
pub struct InvalidIdempotencyKey;

/// How a publish is to be made, beyond what it publishes.
#[derive(Clone, Debug)]
pub struct PublishOptions {
    pub idempotency_key: Option<IdempotencyKey>,
    /// How long the key is remembered (at least this long; Redis may keep it up to twice).
    pub idempotency_window: Duration,
}

impl Default for PublishOptions {
    fn default() -> Self {
        Self {
            idempotency_key: None,
            idempotency_window: DEFAULT_IDEMPOTENCY_WINDOW,
        }
    }
}

/// A publish's outcome.
#[derive(Clone, Debug)]
pub struct Published {
    /// The message as stored. For a replayed key, its position and time are the first
    /// publish's; its data is this request's (the first one's is not kept).
    pub message: Arc<Message>,
    /// The key had been seen: nothing was published now.
    pub replayed: bool,
}

/// What a key answered the first time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remembered {
    pub position: Position,
    pub time: u64,
}

/// One channel's remembered keys, expiring after their window.
#[derive(Default)]
pub struct IdempotencyWindow {
    entries: HashMap<IdempotencyKey, Remembered>,
    /// Keys by expiry, oldest first (windows are one setting, so insertion order is expiry
    /// order; a mix only delays forgetting, never forgets early).
    order: VecDeque<(Instant, IdempotencyKey)>,
}

impl IdempotencyWindow {
    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if *at > now && self.order.len() <= MAX_KEYS_PER_CHANNEL {
                break;
            }
            if let Some((_, key)) = self.order.pop_front() {
                self.entries.remove(&key);
            }
        }
    }

    /// What `key` answered, if it was seen within its window.
    pub fn get(&mut self, key: &IdempotencyKey, now: Instant) -> Option<Remembered> {
        self.expire(now);
        self.entries.get(key).cloned()
    }

    pub fn insert(
        &mut self,
        key: IdempotencyKey,
        remembered: Remembered,
        now: Instant,
        window: Duration,
    ) {
        if self.entries.insert(key.clone(), remembered).is_none() {
            self.order.push_back((now + window, key));
        }
        self.expire(now);
    }

    /// Forgets what expired; true when nothing is left (the window can be dropped).
    pub fn sweep(&mut self, now: Instant) -> bool {
        self.expire(now);
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Every key still remembered, with what it answered and how long it has left (for a
    /// data dir's compaction).
    pub fn live(
        &self,
        now: Instant,
    ) -> impl Iterator<Item = (&IdempotencyKey, &Remembered, Duration)> {
        self.order.iter().filter_map(move |(until, key)| {
            let left = until.saturating_duration_since(now);
            let remembered = self.entries.get(key)?;
            (!left.is_zero()).then_some((key, remembered, left))
        })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::message::Epoch;

    fn at(offset: u64) -> Remembered {
        Remembered {
            position: Position {
                epoch: Epoch::new("e").unwrap(),
                offset,
            },
            time: offset,
        }
    }

    #[test]
    fn keys_use_a_safe_alphabet_and_a_bounded_length() {
        for good in [
            "a",
            "6f1c2a4e-8d7b-4c1e-9a57-0b3c9e1d2f44",
            "order-42:try=1",
            "YWJj+/==",
        ] {
            assert!(IdempotencyKey::new(good).is_ok(), "{good}");
        }
        let long = "k".repeat(129);
        for bad in ["", "has space", "a\nb", "é", "a,b", long.as_str()] {
            assert!(IdempotencyKey::new(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_answers_the_same_until_its_window_ends() {
        let mut w = IdempotencyWindow::default();
        let k = IdempotencyKey::new("k").unwrap();
        let now = Instant::now();
        assert_eq!(w.get(&k, now), None);
        w.insert(k.clone(), at(7), now, Duration::from_secs(60));
        assert_eq!(w.get(&k, now + Duration::from_secs(59)), Some(at(7)));
        assert_eq!(w.get(&k, now + Duration::from_secs(60)), None);
        assert!(w.sweep(now + Duration::from_secs(61)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_channel_remembers_a_bounded_number_of_keys_oldest_forgotten_first() {
        let mut w = IdempotencyWindow::default();
        let now = Instant::now();
        for i in 0..MAX_KEYS_PER_CHANNEL as u64 + 5 {
            let k = IdempotencyKey::new(&format!("k{i}")).unwrap();
            w.insert(k, at(i), now, Duration::from_secs(60));
        }
        assert_eq!(w.len(), MAX_KEYS_PER_CHANNEL);
        assert_eq!(w.get(&IdempotencyKey::new("k0").unwrap(), now), None);
        assert!(w.get(&IdempotencyKey::new("k5").unwrap(), now).is_some());
    }
}
