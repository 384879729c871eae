//! Rosters: cluster-wide counted membership, for protocols layered over the hub that keep
//! state of their own across nodes (the Pusher protocol's occupied channels and presence
//! members, `tidings-pusher`).
//!
//! A roster holds named sets of members. Each node *holds* a member as many times as it has
//! reasons to (one per socket), and the roster counts holds across the cluster, so:
//! - `hold` reports whether it was the member's first hold anywhere (0 → 1) and `release`
//!   whether it was the last (1 → 0), each decided atomically where the roster lives: of
//!   several nodes racing, exactly one sees the transition. That node speaks for the cluster
//!   (sends the webhook, announces the member).
//! - Holds are kept per node. A node that stops renewing its liveness (killed, partitioned)
//!   has its holds taken away by `reap`, which reports each member whose last hold went with
//!   it to exactly one caller.
//! - `broadcast` reaches every node's `listen`ers, the sender's included, so a change is
//!   acted on by one code path wherever it came from.
//!
//! `LocalRoster` is the one-node roster (the memory broker); a broker that spans nodes
//! returns its own from `Broker::roster` (the Redis broker's lives in `tidings-redis`).
//!
//! Concurrency: `LocalRoster` keeps its sets under one std mutex held for a map update only;
//! its broadcast is a bounded `tokio::sync::broadcast` channel, where a listener that falls
//! behind by `BROADCAST_CAPACITY` loses the oldest messages (and is told, `Lagged`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::broker::BrokerError;

/// Broadcasts a listener may fall behind by before it loses the oldest.
pub const BROADCAST_CAPACITY: usize = 4096;

/// A member as a roster reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub member: String,
    /// What the member's first hold stored with it.
    pub value: String,
    /// Holds across the cluster.
    pub holds: u64,
}

/// A member whose last hold went with a dead node (`Roster::reap`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Released {
    pub set: String,
    pub member: String,
    pub value: String,
}

#[async_trait]
pub trait Roster: Send + Sync + 'static {
    /// One more hold of `member` in `set` by this node; `value` is stored with the member
    /// when this is its first hold. `Ok(true)` when it is the first across the cluster.
    async fn hold(&self, set: &str, member: &str, value: &str) -> Result<bool, BrokerError>;

    /// One hold less by this node; `Ok(true)` when it was the last across the cluster. A
    /// release of nothing this node holds (its holds were reaped) is `Ok(false)`.
    async fn release(&self, set: &str, member: &str) -> Result<bool, BrokerError>;

    /// The members of `set`, sorted by member.
    async fn members(&self, set: &str) -> Result<Vec<Held>, BrokerError>;

    /// One member of `set`, if anyone holds it.
    async fn member(&self, set: &str, member: &str) -> Result<Option<Held>, BrokerError>;

    /// How many members `set` has.
    async fn size(&self, set: &str) -> Result<u64, BrokerError>;

    /// Sends `payload` to every node's listeners, this node's included.
    async fn broadcast(&self, payload: &str) -> Result<(), BrokerError>;

    /// A new listener for broadcasts.
    fn listen(&self) -> broadcast::Receiver<Arc<str>>;

    /// Takes away the holds of nodes that stopped renewing their liveness; returns the
    /// members whose last hold went with them, each to exactly one caller in the cluster.
    async fn reap(&self) -> Result<Vec<Released>, BrokerError>;
}

/// Set → member → (value, holds).
type Sets = HashMap<String, BTreeMap<String, (String, u64)>>;

/// The roster of one node: everything is local, nothing is ever reaped.
pub struct LocalRoster {
    sets: Mutex<Sets>,
    bus: broadcast::Sender<Arc<str>>,
}

impl Default for LocalRoster {
    fn default() -> Self {
        Self {
            sets: Mutex::new(HashMap::new()),
            bus: broadcast::Sender::new(BROADCAST_CAPACITY),
        }
    }
}

impl LocalRoster {
    fn sets(&self) -> MutexGuard<'_, Sets> {
        // Map updates only: a poisoned lock still holds valid data.
        self.sets.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Roster for LocalRoster {
    async fn hold(&self, set: &str, member: &str, value: &str) -> Result<bool, BrokerError> {
        let mut sets = self.sets();
        let entry = sets
            .entry(set.to_owned())
            .or_default()
            .entry(member.to_owned())
            .or_insert_with(|| (value.to_owned(), 0));
        entry.1 += 1;
        Ok(entry.1 == 1)
    }

    async fn release(&self, set: &str, member: &str) -> Result<bool, BrokerError> {
        let mut sets = self.sets();
        let Some(members) = sets.get_mut(set) else {
            return Ok(false);
        };
        let Some(entry) = members.get_mut(member) else {
            return Ok(false);
        };
        entry.1 -= 1;
        if entry.1 > 0 {
            return Ok(false);
        }
        members.remove(member);
        if members.is_empty() {
            sets.remove(set);
        }
        Ok(true)
    }

    async fn members(&self, set: &str) -> Result<Vec<Held>, BrokerError> {
        Ok(self
            .sets()
            .get(set)
            .map(|m| {
                m.iter()
                    .map(|(member, (value, holds))| Held {
                        member: member.clone(),
                        value: value.clone(),
                        holds: *holds,
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn member(&self, set: &str, member: &str) -> Result<Option<Held>, BrokerError> {
        Ok(self
            .sets()
            .get(set)
            .and_then(|m| m.get(member))
            .map(|(value, holds)| Held {
                member: member.to_owned(),
                value: value.clone(),
                holds: *holds,
            }))
    }

    async fn size(&self, set: &str) -> Result<u64, BrokerError> {
        Ok(self.sets().get(set).map_or(0, |m| m.len() as u64))
    }

    async fn broadcast(&self, payload: &str) -> Result<(), BrokerError> {
        // No listener yet is not an error: nobody needed to hear it.
        let _ = self.bus.send(Arc::from(payload));
        Ok(())
    }

    fn listen(&self) -> broadcast::Receiver<Arc<str>> {
        self.bus.subscribe()
    }

    async fn reap(&self) -> Result<Vec<Released>, BrokerError> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn the_first_hold_and_the_last_release_are_reported_once() {
        let r = LocalRoster::default();
        assert!(r.hold("s", "a", "{}").await.unwrap());
        assert!(!r.hold("s", "a", "other").await.unwrap());
        assert_eq!(r.members("s").await.unwrap()[0].value, "{}");
        assert_eq!(r.member("s", "a").await.unwrap().unwrap().holds, 2);
        assert!(!r.release("s", "a").await.unwrap());
        assert!(r.release("s", "a").await.unwrap());
        assert!(!r.release("s", "a").await.unwrap());
        assert_eq!(r.size("s").await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_broadcast_reaches_every_listener_the_sender_included() {
        let r = LocalRoster::default();
        let (mut a, mut b) = (r.listen(), r.listen());
        r.broadcast("hi").await.unwrap();
        assert_eq!(&*a.recv().await.unwrap(), "hi");
        assert_eq!(&*b.recv().await.unwrap(), "hi");
    }
}
