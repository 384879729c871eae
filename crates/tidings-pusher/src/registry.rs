//! The apps this node serves and what the cluster knows of each: open sockets (this node's),
//! occupied channels and presence members (cluster-wide, in the roster), signed-in users
//! (this node's; terminating one is broadcast), per-app counters, and the webhook queue.
//!
//! Cluster-wide state lives in a `tidings_core::Roster` (the Redis broker's spans nodes; the
//! memory broker's is local). Two roster sets per app:
//! - `pusher:ID:subs`: member = channel, one hold per subscribed socket. The first hold
//!   anywhere is `channel_occupied`, the last release `channel_vacated`, decided atomically
//!   by the roster, so exactly one node queues each webhook.
//! - `pusher:ID:p:CHANNEL`: member = `user_id`, value = its `user_info`, one hold per
//!   socket of that user on the channel. First hold → `member_added`, last release →
//!   `member_removed`: the node that sees it queues the webhook and broadcasts the change;
//!   every node (the sender too) hands it to its local subscribers (`Bus`, `Apps::on_bus`).
//! - A node that dies stops renewing its liveness; any node's `reap` then takes its holds
//!   back and gets the members that went with them, once (`Apps::reaped`).
//!
//! Concurrency: one `std::sync::Mutex` per app around its `Local` state (sockets, signed-in
//! users, the member-info cache the delivery path reads), held only for map updates and
//! never across an `.await`; the counters are relaxed atomics. Roster calls are awaited by
//! the session or the HTTP handler that needs their answer.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tidings_core::{BrokerError, Released, Roster};

use crate::config::{AppConfig, PusherConfig};
use crate::webhooks::{WebhookEvent, WebhookQueue};

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The critical sections are plain map updates: a poisoned lock still holds valid data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every configured app, by key (WebSocket) and by id (HTTP API). A reload (`reload`)
/// swaps the whole set; readers take a snapshot (an `Arc` clone under a read lock held for
/// that clone only), so a session or a request keeps the app it started with.
pub struct Apps {
    current: std::sync::RwLock<Arc<AppSet>>,
    roster: Arc<dyn Roster>,
}

#[derive(Default)]
struct AppSet {
    by_key: HashMap<String, Arc<App>>,
    by_id: HashMap<String, Arc<App>>,
    list: Vec<Arc<App>>,
}

impl AppSet {
    fn of(list: Vec<Arc<App>>) -> Self {
        let mut set = Self::default();
        for app in list {
            set.by_key.insert(app.config.key.clone(), app.clone());
            set.by_id.insert(app.config.id.clone(), app.clone());
            set.list.push(app);
        }
        set
    }
}

/// What a reload changed: apps to start (webhook senders), apps to retire (their sockets
/// closed, their senders stopped), and whether each retired one is gone (else replaced).
pub struct Reloaded {
    pub added: Vec<Arc<App>>,
    pub retired: Vec<(Arc<App>, bool)>,
}

impl Apps {
    pub fn new(config: &PusherConfig, roster: Arc<dyn Roster>) -> Self {
        let list = config
            .apps
            .iter()
            .map(|c| Arc::new(App::new(c.clone(), roster.clone())))
            .collect();
        Self {
            current: std::sync::RwLock::new(Arc::new(AppSet::of(list))),
            roster,
        }
    }

    fn set(&self) -> Arc<AppSet> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts `config` in force: an app whose table is unchanged stays as it is (sockets,
    /// counters, webhook queue); a new or changed one is a new `App`; the old ones are
    /// returned to retire.
    pub fn reload(&self, config: &PusherConfig) -> Reloaded {
        let old = self.set();
        let mut added = Vec::new();
        let mut list = Vec::new();
        for c in &config.apps {
            match old.by_id.get(&c.id) {
                Some(app) if app.config == *c => list.push(app.clone()),
                _ => {
                    let app = Arc::new(App::new(c.clone(), self.roster.clone()));
                    added.push(app.clone());
                    list.push(app);
                }
            }
        }
        let new = AppSet::of(list);
        let retired = old
            .list
            .iter()
            .filter(|a| !new.list.iter().any(|n| Arc::ptr_eq(n, a)))
            .map(|a| (a.clone(), !new.by_id.contains_key(&a.config.id)))
            .collect();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        Reloaded { added, retired }
    }

    pub fn is_empty(&self) -> bool {
        self.set().list.is_empty()
    }

    pub fn by_key(&self, key: &str) -> Option<Arc<App>> {
        self.set().by_key.get(key).cloned()
    }

    pub fn by_id(&self, id: &str) -> Option<Arc<App>> {
        self.set().by_id.get(id).cloned()
    }

    /// The apps now configured.
    pub fn iter(&self) -> std::vec::IntoIter<Arc<App>> {
        self.set().list.clone().into_iter()
    }

    /// Prometheus text for every app (appended to `/metrics`).
    pub fn render_metrics(&self) -> String {
        let set = self.set();
        if set.list.is_empty() {
            return String::new();
        }
        let mut out = String::new();
        let metric =
            |out: &mut String, name: &str, kind: &str, help: &str, get: &dyn Fn(&App) -> u64| {
                out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
                for app in &set.list {
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
            "tidings_pusher_webhooks_failed_total",
            "counter",
            "Webhook POSTs that failed or were answered non-2xx (each attempt; retried).",
            &|a| a.counters.webhooks_failed.load(Relaxed),
        );
        metric(
            &mut out,
            "tidings_pusher_events_triggered_total",
            "counter",
            "Events published through the HTTP API (one per channel of a trigger).",
            &|a| a.counters.events_triggered.load(Relaxed),
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
    /// Webhook POSTs that failed or were answered non-2xx (each attempt).
    pub webhooks_failed: AtomicU64,
    /// Events published through the HTTP API (one per channel of a trigger).
    pub events_triggered: AtomicU64,
}

pub struct App {
    pub config: AppConfig,
    pub counters: Counters,
    /// `Some` when the app has a `webhook_url`.
    pub webhooks: Option<Arc<WebhookQueue>>,
    connections: AtomicUsize,
    roster: Arc<dyn Roster>,
    local: Mutex<Local>,
    retired: std::sync::atomic::AtomicBool,
    /// Wakes the app's webhook sender when the app is retired.
    pub retire_notify: tokio::sync::Notify,
}

#[derive(Default)]
struct Local {
    sockets: HashMap<String, Arc<Socket>>,
    users: HashMap<String, HashSet<String>>,
    /// `(channel, user_id)` → `user_info` of members announced to this node, for the
    /// `member_added` frames its sessions write (filled before the join reaches the hub).
    infos: HashMap<(String, String), Value>,
}

/// Member infos one node caches per app; past this, `member_added` carries no info.
const MAX_CACHED_INFOS: usize = 100_000;

/// Why a connection is refused.
#[derive(Debug, PartialEq, Eq)]
pub struct OverQuota;

/// One open Pusher connection as the app sees it.
pub struct Socket {
    pub id: String,
    terminate: Box<dyn Fn() + Send + Sync>,
    /// The close code `terminate` asks for (4009 unless a reload retired the app).
    close_code: std::sync::atomic::AtomicU16,
    user: Mutex<Option<String>>,
}

impl Socket {
    /// Ends the connection (HTTP API `terminate_connections`).
    pub fn terminate(&self) {
        self.terminate_with(crate::protocol::code::UNAUTHORIZED);
    }

    /// Ends the connection with `code`.
    pub fn terminate_with(&self, code: u16) {
        self.close_code.store(code, Relaxed);
        (self.terminate)();
    }

    /// The close code the connection was ended with.
    pub fn close_code(&self) -> u16 {
        self.close_code.load(Relaxed)
    }

    pub fn user(&self) -> Option<String> {
        relock(&self.user).clone()
    }
}

/// A change every node acts on, sent through the roster's broadcast (JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Bus {
    /// `user` joined presence `channel` (its first socket there, cluster-wide) by `socket`.
    Added {
        app: String,
        channel: String,
        user: String,
        info: Value,
        socket: String,
    },
    /// `user` left (its last socket; `socket` is empty when a dead node's members went).
    Removed {
        app: String,
        channel: String,
        user: String,
        socket: String,
    },
    /// End every connection signed in as `user`.
    Terminate { app: String, user: String },
}

/// A channel as the HTTP API reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelInfo {
    pub name: String,
    pub subscription_count: usize,
    pub user_count: usize,
}

/// What a roster reap meant for the apps: the webhooks are queued; the member removals are
/// to be broadcast by the caller (`Bus::Removed`), so every node's subscribers hear of them.
pub fn parse_set(set: &str) -> Option<(&str, Option<&str>)> {
    let rest = set.strip_prefix("pusher:")?;
    let (id, kind) = rest.split_once(':')?;
    if kind == "subs" {
        return Some((id, None));
    }
    Some((id, Some(kind.strip_prefix("p:")?)))
}

impl Apps {
    /// Acts on one broadcast: a member change is cached for the local sessions and returned
    /// (with its app) for the caller to hand to the hub; a terminate ends local sockets.
    pub fn on_bus(&self, payload: &str) -> Option<(Arc<App>, Bus)> {
        let bus: Bus = match serde_json::from_str(payload) {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(error = %e, "ignoring a roster broadcast that is not the Pusher protocol's");
                return None;
            }
        };
        let id = match &bus {
            Bus::Added { app, .. } | Bus::Removed { app, .. } | Bus::Terminate { app, .. } => app,
        };
        let app = self.by_id(id)?;
        match &bus {
            Bus::Added {
                channel,
                user,
                info,
                ..
            } => {
                let mut local = relock(&app.local);
                if local.infos.len() < MAX_CACHED_INFOS {
                    local
                        .infos
                        .insert((channel.clone(), user.clone()), info.clone());
                }
            }
            Bus::Removed { .. } => {}
            Bus::Terminate { user, .. } => {
                app.terminate_local(user);
            }
        }
        Some((app, bus))
    }

    /// Queues the webhooks for what a reap took back and returns the member removals to
    /// broadcast. Removals come before vacated channels, as when sockets leave.
    pub fn reaped(&self, released: Vec<Released>) -> Vec<Bus> {
        let mut removals = Vec::new();
        let mut vacated = Vec::new();
        for r in released {
            let Some((id, presence)) = parse_set(&r.set) else {
                continue;
            };
            let Some(app) = self.by_id(id) else { continue };
            match presence {
                Some(channel) => {
                    app.hook(WebhookEvent::MemberRemoved {
                        channel: channel.to_owned(),
                        user_id: r.member.clone(),
                    });
                    removals.push(Bus::Removed {
                        app: id.to_owned(),
                        channel: channel.to_owned(),
                        user: r.member,
                        socket: String::new(),
                    });
                }
                None => vacated.push((app, r.member)),
            }
        }
        for (app, channel) in vacated {
            app.hook(WebhookEvent::ChannelVacated { channel });
        }
        removals
    }
}

impl App {
    pub fn new(config: AppConfig, roster: Arc<dyn Roster>) -> Self {
        let webhooks = config
            .webhook_url
            .as_ref()
            .map(|_| Arc::new(WebhookQueue::new(crate::webhooks::MAX_QUEUED)));
        Self {
            config,
            counters: Counters::default(),
            webhooks,
            connections: AtomicUsize::new(0),
            roster,
            local: Mutex::new(Local::default()),
            retired: std::sync::atomic::AtomicBool::new(false),
            retire_notify: tokio::sync::Notify::new(),
        }
    }

    /// Takes the app out of service after a reload: its sockets are closed with `code`
    /// (4001 when the app is gone, 4200 "reconnect now" when its table changed) and its
    /// webhook sender stops.
    pub fn retire(&self, code: u16) {
        self.retired.store(true, Relaxed);
        self.retire_notify.notify_waiters();
        let sockets: Vec<Arc<Socket>> = relock(&self.local).sockets.values().cloned().collect();
        for s in sockets {
            s.terminate_with(code);
        }
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Relaxed)
    }

    fn hook(&self, event: WebhookEvent) {
        if let Some(q) = &self.webhooks {
            q.push(event);
        }
    }

    fn subs_set(&self) -> String {
        format!("pusher:{}:subs", self.config.id)
    }

    fn presence_set(&self, channel: &str) -> String {
        format!("pusher:{}:p:{channel}", self.config.id)
    }

    pub fn roster(&self) -> &Arc<dyn Roster> {
        &self.roster
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Relaxed)
    }

    /// Registers a new connection, or refuses it over `max_connections` (close 4004).
    /// The limit is per node.
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
            close_code: std::sync::atomic::AtomicU16::new(crate::protocol::code::UNAUTHORIZED),
            user: Mutex::new(None),
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

    /// This node's open sockets, at most `max`, sorted by id: `(socket_id, signed-in user)`.
    pub fn sockets(&self, max: usize) -> Vec<(String, Option<String>)> {
        let sockets: Vec<Arc<Socket>> = relock(&self.local).sockets.values().cloned().collect();
        let mut out: Vec<_> = sockets.iter().map(|s| (s.id.clone(), s.user())).collect();
        out.sort();
        out.truncate(max);
        out
    }

    /// The app as the admin console shows it (this node's view; no secret): id, key,
    /// counters and up to `max_sockets` of its connections.
    pub fn summary(&self, max_sockets: usize) -> Value {
        let c = &self.counters;
        let sockets: Vec<Value> = self
            .sockets(max_sockets)
            .into_iter()
            .map(|(id, user)| serde_json::json!({"socket_id": id, "user": user}))
            .collect();
        serde_json::json!({
            "id": self.config.id,
            "key": self.config.key,
            "connections": self.connections(),
            "connections_total": c.connections_total.load(Relaxed),
            "messages_sent": c.messages_sent.load(Relaxed),
            "events_triggered": c.events_triggered.load(Relaxed),
            "client_events": c.client_events.load(Relaxed),
            "webhooks_sent": c.webhooks_sent.load(Relaxed),
            "webhooks_failed": c.webhooks_failed.load(Relaxed),
            "sockets": sockets,
        })
    }

    pub fn socket(&self, socket_id: &str) -> Option<Arc<Socket>> {
        relock(&self.local).sockets.get(socket_id).cloned()
    }

    /// A socket now follows `channel` (counted cluster-wide for the HTTP API and webhooks).
    pub async fn subscribed(&self, channel: &str) -> Result<(), BrokerError> {
        if self.roster.hold(&self.subs_set(), channel, "").await? {
            self.hook(WebhookEvent::ChannelOccupied {
                channel: channel.to_owned(),
            });
        }
        Ok(())
    }

    /// A socket stopped following `channel`.
    pub async fn unsubscribed(&self, channel: &str) {
        match self.roster.release(&self.subs_set(), channel).await {
            Ok(true) => self.hook(WebhookEvent::ChannelVacated {
                channel: channel.to_owned(),
            }),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(app = %self.config.id, channel, error = %e, "could not count a socket out of its channel")
            }
        }
    }

    /// Adds one socket of `user_id` to a presence channel's members. When the user is new
    /// there (cluster-wide) the webhook is queued and the join broadcast; returns whether.
    pub async fn presence_join(
        &self,
        channel: &str,
        user_id: &str,
        user_info: &Value,
        socket_id: &str,
    ) -> Result<bool, BrokerError> {
        let set = self.presence_set(channel);
        let added = self
            .roster
            .hold(&set, user_id, &user_info.to_string())
            .await?;
        if added {
            self.hook(WebhookEvent::MemberAdded {
                channel: channel.to_owned(),
                user_id: user_id.to_owned(),
            });
            self.broadcast(&Bus::Added {
                app: self.config.id.clone(),
                channel: channel.to_owned(),
                user: user_id.to_owned(),
                info: user_info.clone(),
                socket: socket_id.to_owned(),
            })
            .await;
        }
        Ok(added)
    }

    /// Removes one socket of `user_id`; on the user's last (cluster-wide) the webhook is
    /// queued and the leave broadcast.
    pub async fn presence_leave(&self, channel: &str, user_id: &str, socket_id: &str) {
        match self
            .roster
            .release(&self.presence_set(channel), user_id)
            .await
        {
            Ok(true) => {
                self.hook(WebhookEvent::MemberRemoved {
                    channel: channel.to_owned(),
                    user_id: user_id.to_owned(),
                });
                self.broadcast(&Bus::Removed {
                    app: self.config.id.clone(),
                    channel: channel.to_owned(),
                    user: user_id.to_owned(),
                    socket: socket_id.to_owned(),
                })
                .await;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(app = %self.config.id, channel, error = %e, "could not count a member out")
            }
        }
    }

    async fn broadcast(&self, bus: &Bus) {
        let payload = serde_json::to_string(bus).unwrap_or_default();
        if let Err(e) = self.roster.broadcast(&payload).await {
            tracing::warn!(app = %self.config.id, error = %e, "could not broadcast a member change");
        }
    }

    /// After the hub has the leave: the member's cached info is no longer needed.
    pub fn forget_member(&self, channel: &str, user_id: &str) {
        relock(&self.local)
            .infos
            .remove(&(channel.to_owned(), user_id.to_owned()));
    }

    /// A presence channel's members, cluster-wide: `(user_id, user_info)`, sorted by id.
    pub async fn members(&self, channel: &str) -> Result<Vec<(String, Value)>, BrokerError> {
        Ok(self
            .roster
            .members(&self.presence_set(channel))
            .await?
            .into_iter()
            .map(|h| {
                let info = serde_json::from_str(&h.value).unwrap_or(Value::Null);
                (h.member, info)
            })
            .collect())
    }

    /// A member's `user_info` as announced to this node (the delivery path's read).
    pub fn member_info(&self, channel: &str, user_id: &str) -> Option<Value> {
        relock(&self.local)
            .infos
            .get(&(channel.to_owned(), user_id.to_owned()))
            .cloned()
    }

    /// Occupied channels whose name starts with `prefix`, sorted by name, cluster-wide.
    pub async fn channels(&self, prefix: &str) -> Result<Vec<ChannelInfo>, BrokerError> {
        let mut out = Vec::new();
        for h in self.roster.members(&self.subs_set()).await? {
            if !h.member.starts_with(prefix) || h.holds == 0 {
                continue;
            }
            let user_count = if h.member.starts_with("presence-") {
                self.roster.size(&self.presence_set(&h.member)).await? as usize
            } else {
                0
            };
            out.push(ChannelInfo {
                name: h.member,
                subscription_count: h.holds as usize,
                user_count,
            });
        }
        Ok(out)
    }

    /// One channel, cluster-wide (zero counts when nobody follows it).
    pub async fn channel(&self, name: &str) -> Result<ChannelInfo, BrokerError> {
        let subscription_count = self
            .roster
            .member(&self.subs_set(), name)
            .await?
            .map_or(0, |h| h.holds as usize);
        let user_count = if name.starts_with("presence-") && subscription_count > 0 {
            self.roster.size(&self.presence_set(name)).await? as usize
        } else {
            0
        };
        Ok(ChannelInfo {
            name: name.to_owned(),
            subscription_count,
            user_count,
        })
    }

    /// A presence channel's user ids, cluster-wide.
    pub async fn users(&self, channel: &str) -> Result<Vec<String>, BrokerError> {
        Ok(self
            .roster
            .members(&self.presence_set(channel))
            .await?
            .into_iter()
            .map(|h| h.member)
            .collect())
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

    /// Ends every connection signed in as `user_id` on every node (a broadcast each node
    /// acts on, this one included).
    pub async fn terminate_user(&self, user_id: &str) -> Result<(), BrokerError> {
        let bus = Bus::Terminate {
            app: self.config.id.clone(),
            user: user_id.to_owned(),
        };
        let payload = serde_json::to_string(&bus).unwrap_or_default();
        self.roster.broadcast(&payload).await
    }

    /// Ends this node's connections signed in as `user_id`; returns how many.
    pub fn terminate_local(&self, user_id: &str) -> usize {
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

    /// Queues a `client_event` webhook (the sender's node queues it: once per cluster).
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
    use tidings_core::LocalRoster;

    fn app(max_connections: usize) -> App {
        App::new(
            AppConfig {
                id: "1".into(),
                key: "k".into(),
                secret: crate::config::AppSecret("s".into()),
                client_events: true,
                max_connections,
                max_event_bytes: 10_240,
                webhook_url: None,
                webhook_ca_file: None,
            },
            Arc::new(LocalRoster::default()),
        )
    }

    #[tokio::test]
    async fn a_user_with_two_sockets_is_one_member_added_once_and_removed_once() {
        let app = app(0);
        let mut bus = app.roster().listen();
        let info = serde_json::json!({"name": "ann"});
        assert!(
            app.presence_join("presence-a", "u1", &info, "1.1")
                .await
                .unwrap()
        );
        assert!(
            !app.presence_join("presence-a", "u1", &info, "1.2")
                .await
                .unwrap()
        );
        assert_eq!(app.members("presence-a").await.unwrap().len(), 1);
        app.subscribed("presence-a").await.unwrap();
        app.subscribed("presence-a").await.unwrap();
        assert_eq!(app.channel("presence-a").await.unwrap().user_count, 1);
        assert_eq!(
            app.channel("presence-a").await.unwrap().subscription_count,
            2
        );
        app.presence_leave("presence-a", "u1", "1.1").await;
        app.presence_leave("presence-a", "u1", "1.2").await;
        assert_eq!(app.users("presence-a").await.unwrap(), Vec::<String>::new());
        let added: Bus = serde_json::from_str(&bus.recv().await.unwrap()).unwrap();
        assert!(matches!(added, Bus::Added { ref user, .. } if user == "u1"));
        let removed: Bus = serde_json::from_str(&bus.recv().await.unwrap()).unwrap();
        assert!(matches!(removed, Bus::Removed { ref socket, .. } if socket == "1.2"));
        assert!(bus.try_recv().is_err());
    }

    #[test]
    fn connections_over_the_app_quota_are_refused_until_one_closes() {
        let app = app(1);
        let a = app.connect("1.1".into(), || {}).unwrap();
        assert!(app.connect("1.2".into(), || {}).is_err());
        app.disconnect(&a);
        assert!(app.connect("1.3".into(), || {}).is_ok());
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
        assert_eq!(app.terminate_local("u"), 1);
        assert_eq!(hits.load(Relaxed), 1);
        app.disconnect(&a);
        assert_eq!(app.terminate_local("u"), 0);
    }

    #[test]
    fn a_reload_keeps_unchanged_apps_replaces_changed_ones_and_retires_removed_ones() {
        let roster: Arc<dyn Roster> = Arc::new(LocalRoster::default());
        let cfg = |id: &str, secret: &str| AppConfig {
            id: id.into(),
            key: format!("key-{id}"),
            secret: crate::config::AppSecret(secret.into()),
            client_events: false,
            max_connections: 0,
            max_event_bytes: 10_240,
            webhook_url: None,
            webhook_ca_file: None,
        };
        let apps = Apps::new(
            &PusherConfig {
                apps: vec![cfg("1", "s"), cfg("2", "s"), cfg("3", "s")],
            },
            roster,
        );
        let (one, two) = (apps.by_id("1").unwrap(), apps.by_id("2").unwrap());
        let done = apps.reload(&PusherConfig {
            apps: vec![cfg("1", "s"), cfg("2", "rotated"), cfg("4", "s")],
        });
        assert!(Arc::ptr_eq(&one, &apps.by_id("1").unwrap()));
        assert!(!Arc::ptr_eq(&two, &apps.by_id("2").unwrap()));
        let added: Vec<&str> = done.added.iter().map(|a| a.config.id.as_str()).collect();
        assert_eq!(added, ["2", "4"]);
        let retired: Vec<(&str, bool)> = done
            .retired
            .iter()
            .map(|(a, gone)| (a.config.id.as_str(), *gone))
            .collect();
        assert_eq!(retired, [("2", false), ("3", true)]);
        assert!(apps.by_key("key-3").is_none());
    }

    #[test]
    fn roster_set_names_say_which_app_and_channel_they_count() {
        assert_eq!(parse_set("pusher:1001:subs"), Some(("1001", None)));
        assert_eq!(
            parse_set("pusher:1001:p:presence-a:b"),
            Some(("1001", Some("presence-a:b")))
        );
        assert_eq!(parse_set("other"), None);
    }
}
