//! # Tidings core
//!
//! The hub and its contracts, with no HTTP, Redis or CLI in sight.
//!
//! ## Layout
//! - `channel`: validated `ChannelName` / `EventName`.
//! - `message`: `Message`, `Position { epoch, offset }`, `Data`, the envelope encoded once.
//! - `cursor`: the opaque token holding a subscription's positions.
//! - `history`: a bounded per-channel log; `read(since)` → `Replay::Complete | Replay::Gap`.
//! - `queue`: a session's outbound queue, bounded in bytes; overflow → disconnect `slow`.
//! - `hub`: local registry of sessions per channel and the fan-out into their queues.
//! - `shards`: the channel-keyed, sharded map the hub and the memory broker keep.
//! - `subscription`: the race-free join (register → read → replay → live) and the ordered,
//!   deduplicated event stream with gap notices.
//! - `broker`: the `Broker` trait (memory today, Redis later) and `broker::memory`.
//! - `store`: the `Store` contract a data dir implements (`tidings-store`), `Fsync`.
//! - `idempotency`: idempotency keys and the per-channel window that remembers them.
//! - `node`: a hub joined to a broker; what the transports call.
//! - `policy`: per-namespace history and permission settings.
//! - `presence`: who follows a channel, and join/leave events.
//! - `roster`: cluster-wide counted membership and a broadcast, for protocols over the hub
//!   (Pusher's channels and members); `LocalRoster` for one node.
//! - `disconnect`: why a session ends on purpose.
//! - `conformance`: the suite every broker must pass (compiled in so the Redis crate's tests
//!   can run it unchanged; it panics on failure like any test).

pub mod broker;
pub mod channel;
pub mod conformance;
pub mod cursor;
pub mod disconnect;
pub mod history;
pub mod hub;
pub mod idempotency;
pub mod kill;
pub mod message;
pub mod node;
pub mod policy;
pub mod presence;
pub mod queue;
pub mod roster;
mod shards;
pub mod store;
pub mod subscription;

pub use broker::{Broker, BrokerError, ChannelStats};
pub use channel::{ChannelName, EventName, NameError};
pub use cursor::{Cursor, CursorError};
pub use disconnect::{Disconnect, DisconnectReason};
pub use history::{Gap, GapReason, HistoryRead, Replay, Since};
pub use hub::{Hub, TICK_PARTS};
pub use idempotency::{IdempotencyKey, PublishOptions, Published};
pub use kill::Kill;
pub use message::{Data, Epoch, Message, Position};
pub use node::Node;
pub use policy::{ChannelPolicy, LivePolicies, Policies, PublishPolicy, SubscribePolicy};
pub use presence::{ClientInfo, PresenceEvent, PresenceKind};
pub use queue::{QueueItem, Tick};
pub use roster::{Held, LocalRoster, Released, Roster};
pub use store::{Fsync, Store, StoreError};
pub use subscription::{Event, Joined, Start, Subscription};
