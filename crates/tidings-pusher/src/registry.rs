//! The apps this node serves and what it knows of each: its open sockets, the channels they
//! follow, presence members (one per `user_id`, however many sockets it has), signed-in
//! users, per-app counters, and its webhook queue.
//!
//! Concurrency: one `std::sync::Mutex` per app around its `Local` state, held only for map
//! updates and never across an `.await`; the counters are relaxed atomics. Sessions call in
//! on subscribe, unsubscribe and close; the HTTP API reads. A socket's own exclusion list has
//! its own small lock, so the delivery path never takes the app's.
//!
//! What is local: this state is the node's own. With several nodes on one Redis, channel
//! counts, presence members and user connections are per node (docs/pusher.md, "Limits").

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use crate::config::{AppConfig, PusherConfig};
use crate::webhooks::{WebhookEvent, WebhookQueue};

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The critical sections are plain map updates: a poisoned lock still holds valid data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every configured app, by key (WebSocket) and by id (HTTP API).
#[derive(Default)]
pub struct Apps {
    by_key: HashMap<String, Arc<App>>,
    by_id: HashMap<String, Arc<App>>,
    list: Vec<Arc<App>>,
}

impl Apps {
    pub fn new(config: &PusherConfig) -> Self {
        let mut apps = Self::default();
        for c in &config.apps {
            let app = Arc::new(App::new(c.clone()));
            apps.by_key.insert(c.key.clone(), app.clone());
            apps.by_id.insert(c.id.clone(), app.clone());
            apps.list.push(app);
        }
        apps
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn by_key(&self, key: &str) -> Option<&Arc<App>> {
        self.by_key.get(key)
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<App>> {
        self.by_id.get(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<App>> {
        self.list.iter()
    }

    /// Prometheus text for every app (appended to `/metrics`).
    pub fn render_metrics(&self) -> String {
        if self.list.is_empty() {
            return String::new();
        }
        let mut out = String::new();
        let metric =
            |out: &mut String, name: &str, kind: &str, help: &str, get: &dyn Fn(&App) -> u64| {
                out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
                for app in &self.list {
                    out.push_str(&format!(
                        "{name}{{app_id=\"{}\"}} {}\n",
                        app.config.id,
                        get(app)
                    ));
                }
            };
        metric(
            &mut out,
            "tidings_pusher_connections",
            "gauge",
            "Open Pusher protocol connections.",
            &|a| a.connections.load(Relaxed) as u64,
        );
        metric(
            &mut out,
            "tidings_pusher_connections_total",
            "counter",
            "Pusher protocol connections accepted.",
            &|a| a.counters.connections_total.load(Relaxed),
        );
        metric(
            &mut out,
            "tidings_pusher_messages_sent_total",
            "counter",
            "Events written to Pusher protocol connections.",
            &|a| a.counters.messages_sent.load(Relaxed),
        );
        metric(
            &mut out,
            "tidings_pusher_client_events_total",
            "counter",
            "Client events relayed.",
            &|a| a.counters.client_events.load(Relaxed),
        );
        metric(
            &mut out,
            "tidings_pusher_api_requests_total",
            "counter",
            "HTTP API requests that passed the signature check.",
            &|a| a.counters.api_requests.load(Relaxed),
        );
        metric(
            &mut out,
            "tidings_pusher_api_refused_total",
            "counter",
            "HTTP API requests refused (signature, timestamp, body, limits).",
            &|a| a.counters.api_refused.load(Relaxed),
        );
        metric(
            &mut out,
            "tidings_pusher_webhooks_sent_total",
            "counter",
            "Webhook batches the app's endpoint accepted.",
            &|a| a.counters.webhooks_sent.load(Relaxed),
        );
        metric(
            &mut out,
            "tidings_pusher_webhooks_dropped_total",
            "counter",
            "Webhook events dropped (queue full or retries exhausted).",
            &|a| a.webhooks.as_ref().map_or(0, |w| w.dropped()),
        );
        out
    }
}

/// Counters per app (relaxed atomics).
#[derive(Default)]
pub struct Counters {
    pub connections_total: AtomicU64,
    pub messages_sent: AtomicU64,
    pub client_events: AtomicU64,
    pub api_requests: AtomicU64,
    pub api_refused: AtomicU64,
    pub webhooks_sent: AtomicU64,
}

pub struct App {
    pub config: AppConfig,
    pub counters: Counters,
    /// `Some` when the app has a `webhook_url`.
    pub webhooks: Option<Arc<WebhookQueue>>,
    connections: AtomicUsize,
    local: Mutex<Local>,
}

#[derive(Default)]
struct Local {
    sockets: HashMap<String, Arc<Socket>>,
    channels: HashMap<String, ChannelState>,
    users: HashMap<String, HashSet<String>>,
}

#[derive(Default)]
struct ChannelState {
    subscriptions: usize,
    /// `user_id` → (user_info, sockets of that user on the channel).
    members: BTreeMap<String, (Value, usize)>,
}

/// Why a connection is refused.
#[derive(Debug, PartialEq, Eq)]
pub struct OverQuota;

/// One open Pusher connection as the app sees it.
pub struct Socket {
    pub id: String,
    terminate: Box<dyn Fn() + Send + Sync>,
    user: Mutex<Option<String>>,
    excludes: Mutex<VecDeque<(u64, Instant)>>,
    pending_excludes: AtomicUsize,
}

/// How long an exclusion waits for its message before it is forgotten (the publish it was
/// made for failed, or the socket was not following the channel).
const EXCLUDE_TTL: Duration = Duration::from_secs(10);
/// Exclusions one socket may have waiting; the oldest goes first past this.
const MAX_EXCLUDES: usize = 64;

/// What identifies a published event for `socket_id` exclusion: channel, event and data.
/// Content, not offset, because the offset is known only after the publish, by when the
/// message may already be in the excluded socket's queue. Two identical events in flight at
/// once are indistinguishable to the client, so skipping either one is skipping "the" one.
pub fn fingerprint(channel: &str, event: Option<&str>, data: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    channel.hash(&mut h);
    event.hash(&mut h);
    data.hash(&mut h);
    h.finish()
}

impl Socket {
    /// Ends the connection (HTTP API `terminate_connections`).
    pub fn terminate(&self) {
        (self.terminate)();
    }

    pub fn user(&self) -> Option<String> {
        relock(&self.user).clone()
    }

    /// Marks the next message with `print` as not for this socket.
    pub fn exclude(&self, print: u64) {
        let mut q = relock(&self.excludes);
        let now = Instant::now();
        while q.len() >= MAX_EXCLUDES || q.front().is_some_and(|(_, t)| now - *t > EXCLUDE_TTL) {
            q.pop_front();
        }
        q.push_back((print, now));
        self.pending_excludes.store(q.len(), Relaxed);
    }

    /// Forgets one exclusion of `print` (its publish failed).
    pub fn unexclude(&self, print: u64) {
        let mut q = relock(&self.excludes);
        if let Some(i) = q.iter().position(|(p, _)| *p == print) {
            q.remove(i);
        }
        self.pending_excludes.store(q.len(), Relaxed);
    }

    /// Whether any exclusion waits (one relaxed load: the delivery path asks per message).
    pub fn has_exclusions(&self) -> bool {
        self.pending_excludes.load(Relaxed) > 0
    }

    /// Takes the exclusion matching `print`, if one waits: the message is skipped.
    pub fn take_exclusion(&self, print: u64) -> bool {
        let mut q = relock(&self.excludes);
        let now = Instant::now();
        while q.front().is_some_and(|(_, t)| now - *t > EXCLUDE_TTL) {
            q.pop_front();
        }
        let hit = q.iter().position(|(p, _)| *p == print).map(|i| q.remove(i));
        self.pending_excludes.store(q.len(), Relaxed);
        hit.is_some()
    }
}

/// A channel as the HTTP API reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelInfo {
    pub name: String,
    pub subscription_count: usize,
    pub user_count: usize,
}

impl App {
    pub fn new(config: AppConfig) -> Self {
        let webhooks = config
            .webhook_url
            .as_ref()
            .map(|_| Arc::new(WebhookQueue::new(crate::webhooks::MAX_QUEUED)));
        Self {
            config,
            counters: Counters::default(),
            webhooks,
            connections: AtomicUsize::new(0),
            local: Mutex::new(Local::default()),
        }
    }

    fn hook(&self, event: WebhookEvent) {
        if let Some(q) = &self.webhooks {
            q.push(event);
        }
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Relaxed)
    }

    /// Registers a new connection, or refuses it over `max_connections` (close 4004).
    pub fn connect(
        &self,
        socket_id: String,
        terminate: impl Fn() + Send + Sync + 'static,
    ) -> Result<Arc<Socket>, OverQuota> {
        let max = self.config.max_connections;
        let taken = self
            .connections
            .fetch_update(Relaxed, Relaxed, |n| (max == 0 || n < max).then_some(n + 1));
        if taken.is_err() {
            return Err(OverQuota);
        }
        self.counters.connections_total.fetch_add(1, Relaxed);
        let socket = Arc::new(Socket {
            id: socket_id.clone(),
            terminate: Box::new(terminate),
            user: Mutex::new(None),
            excludes: Mutex::new(VecDeque::new()),
            pending_excludes: AtomicUsize::new(0),
        });
        relock(&self.local)
            .sockets
            .insert(socket_id, socket.clone());
        Ok(socket)
    }

    /// Forgets a closed connection (after it left its channels).
    pub fn disconnect(&self, socket: &Socket) {
        let mut local = relock(&self.local);
        if local.sockets.remove(&socket.id).is_some() {
            self.connections.fetch_sub(1, Relaxed);
        }
        if let Some(user) = socket.user()
            && let Some(set) = local.users.get_mut(&user)
        {
            set.remove(&socket.id);
            if set.is_empty() {
                local.users.remove(&user);
            }
        }
    }

    pub fn socket(&self, socket_id: &str) -> Option<Arc<Socket>> {
        relock(&self.local).sockets.get(socket_id).cloned()
    }

    /// A socket now follows `channel` (counted for the HTTP API and webhooks).
    pub fn subscribed(&self, channel: &str) {
        let first = {
            let mut local = relock(&self.local);
            let state = local.channels.entry(channel.to_owned()).or_default();
            state.subscriptions += 1;
            state.subscriptions == 1
        };
        if first {
            self.hook(WebhookEvent::ChannelOccupied {
                channel: channel.to_owned(),
            });
        }
    }

    /// A socket stopped following `channel`.
    pub fn unsubscribed(&self, channel: &str) {
        let vacated = {
            let mut local = relock(&self.local);
            let Some(state) = local.channels.get_mut(channel) else {
                return;
            };
            state.subscriptions = state.subscriptions.saturating_sub(1);
            let empty = state.subscriptions == 0;
            if empty {
                local.channels.remove(channel);
            }
            empty
        };
        if vacated {
            self.hook(WebhookEvent::ChannelVacated {
                channel: channel.to_owned(),
            });
        }
    }

    /// Adds one socket of `user_id` to a presence channel's members. Returns whether the
    /// user is new there (then the others get `member_added`) and the members after.
    pub fn presence_join(
        &self,
        channel: &str,
        user_id: &str,
        user_info: &Value,
    ) -> (bool, Vec<(String, Value)>) {
        let (added, members) = {
            let mut local = relock(&self.local);
            let state = local.channels.entry(channel.to_owned()).or_default();
            let entry = state
                .members
                .entry(user_id.to_owned())
                .or_insert_with(|| (user_info.clone(), 0));
            entry.1 += 1;
            let added = entry.1 == 1;
            let members = state
                .members
                .iter()
                .map(|(id, (info, _))| (id.clone(), info.clone()))
                .collect();
            (added, members)
        };
        if added {
            self.hook(WebhookEvent::MemberAdded {
                channel: channel.to_owned(),
                user_id: user_id.to_owned(),
            });
        }
        (added, members)
    }

    /// Removes one socket of `user_id`; true when it was the user's last (`member_removed`).
    pub fn presence_leave(&self, channel: &str, user_id: &str) -> bool {
        let removed = {
            let mut local = relock(&self.local);
            let Some(state) = local.channels.get_mut(channel) else {
                return false;
            };
            let Some(entry) = state.members.get_mut(user_id) else {
                return false;
            };
            entry.1 -= 1;
            let last = entry.1 == 0;
            if last {
                state.members.remove(user_id);
            }
            last
        };
        if removed {
            self.hook(WebhookEvent::MemberRemoved {
                channel: channel.to_owned(),
                user_id: user_id.to_owned(),
            });
        }
        removed
    }

    /// A presence channel's members: `(user_id, user_info)`, sorted by id.
    pub fn members(&self, channel: &str) -> Vec<(String, Value)> {
        let local = relock(&self.local);
        local
            .channels
            .get(channel)
            .map(|s| {
                s.members
                    .iter()
                    .map(|(id, (info, _))| (id.clone(), info.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A present member's `user_info`.
    pub fn member_info(&self, channel: &str, user_id: &str) -> Option<Value> {
        let local = relock(&self.local);
        local
            .channels
            .get(channel)?
            .members
            .get(user_id)
            .map(|(info, _)| info.clone())
    }

    /// Occupied channels whose name starts with `prefix`, sorted by name.
    pub fn channels(&self, prefix: &str) -> Vec<ChannelInfo> {
        let local = relock(&self.local);
        let mut out: Vec<ChannelInfo> = local
            .channels
            .iter()
            .filter(|(name, s)| name.starts_with(prefix) && s.subscriptions > 0)
            .map(|(name, s)| ChannelInfo {
                name: name.clone(),
                subscription_count: s.subscriptions,
                user_count: s.members.len(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// One channel (zero counts when nobody follows it).
    pub fn channel(&self, name: &str) -> ChannelInfo {
        let local = relock(&self.local);
        let (subscription_count, user_count) = local
            .channels
            .get(name)
            .map_or((0, 0), |s| (s.subscriptions, s.members.len()));
        ChannelInfo {
            name: name.to_owned(),
            subscription_count,
            user_count,
        }
    }

    /// A presence channel's user ids.
    pub fn users(&self, channel: &str) -> Vec<String> {
        let local = relock(&self.local);
        local
            .channels
            .get(channel)
            .map(|s| s.members.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Records `socket` as signed in as `user_id`.
    pub fn signin(&self, socket: &Socket, user_id: &str) {
        let previous = relock(&socket.user).replace(user_id.to_owned());
        let mut local = relock(&self.local);
        if let Some(prev) = previous
            && let Some(set) = local.users.get_mut(&prev)
        {
            set.remove(&socket.id);
        }
        local
            .users
            .entry(user_id.to_owned())
            .or_default()
            .insert(socket.id.clone());
    }

    /// Ends every connection signed in as `user_id`; returns how many.
    pub fn terminate_user(&self, user_id: &str) -> usize {
        let sockets: Vec<Arc<Socket>> = {
            let local = relock(&self.local);
            local
                .users
                .get(user_id)
                .map(|ids| {
                    ids.iter()
                        .filter_map(|id| local.sockets.get(id).cloned())
                        .collect()
                })
                .unwrap_or_default()
        };
        for s in &sockets {
            s.terminate();
        }
        sockets.len()
    }

    /// Queues a `client_event` webhook.
    pub fn client_event_hook(
        &self,
        channel: &str,
        event: &str,
        data: &str,
        socket_id: &str,
        user_id: Option<&str>,
    ) {
        self.hook(WebhookEvent::ClientEvent {
            channel: channel.to_owned(),
            event: event.to_owned(),
            data: data.to_owned(),
            socket_id: socket_id.to_owned(),
            user_id: user_id.map(str::to_owned),
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn app(max_connections: usize) -> App {
        App::new(AppConfig {
            id: "1".into(),
            key: "k".into(),
            secret: crate::config::AppSecret("s".into()),
            client_events: true,
            max_connections,
            max_event_bytes: 10_240,
            webhook_url: None,
        })
    }

    #[test]
    fn a_user_with_two_sockets_is_one_member_added_once_and_removed_once() {
        let app = app(0);
        let info = serde_json::json!({"name": "ann"});
        assert!(app.presence_join("presence-a", "u1", &info).0);
        let (added, members) = app.presence_join("presence-a", "u1", &info);
        assert!(!added);
        assert_eq!(members.len(), 1);
        app.subscribed("presence-a");
        app.subscribed("presence-a");
        assert_eq!(app.channel("presence-a").user_count, 1);
        assert!(!app.presence_leave("presence-a", "u1"));
        assert!(app.presence_leave("presence-a", "u1"));
        assert_eq!(app.users("presence-a"), Vec::<String>::new());
    }

    #[test]
    fn connections_over_the_app_quota_are_refused_until_one_closes() {
        let app = app(1);
        let a = app.connect("1.1".into(), || {}).unwrap();
        assert!(app.connect("1.2".into(), || {}).is_err());
        app.disconnect(&a);
        assert!(app.connect("1.3".into(), || {}).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn an_exclusion_skips_one_matching_message_and_expires() {
        let app = app(0);
        let s = app.connect("1.1".into(), || {}).unwrap();
        let p = fingerprint("c", Some("e"), b"d");
        s.exclude(p);
        assert!(s.has_exclusions());
        assert!(s.take_exclusion(p));
        assert!(!s.take_exclusion(p));
        s.exclude(p);
        tokio::time::advance(EXCLUDE_TTL + Duration::from_secs(1)).await;
        assert!(!s.take_exclusion(p));
    }

    #[test]
    fn terminating_a_user_ends_each_of_its_signed_in_sockets() {
        let app = app(0);
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let a = app
            .connect("1.1".into(), move || {
                h.fetch_add(1, Relaxed);
            })
            .unwrap();
        app.signin(&a, "u");
        assert_eq!(app.terminate_user("u"), 1);
        assert_eq!(hits.load(Relaxed), 1);
        app.disconnect(&a);
        assert_eq!(app.terminate_user("u"), 0);
    }
}
