//! A node's lifecycle beyond serving (SPEC §13): the drain before it stops (rolling deploys),
//! and the reload of what can change without dropping anyone (SIGHUP).
//!
//! Drain, in order:
//! 1. a stop signal (SIGTERM/SIGINT, or whatever the caller feeds `drain`) marks the node
//!    draining: `/readyz` answers `503 {"status":"draining"}` from that moment, so a load
//!    balancer's health check takes the node out of rotation, while every route — publishes,
//!    new subscriptions, `/ws` — keeps working for `[server] drain_grace`;
//! 2. then `drain` resolves, and `app::serve_all` stops accepting and cancels
//!    `AppState::shutdown`: every stream writes its `disconnect` (`reason: "shutdown"`,
//!    `reconnect: true`, and its own `reconnect_after_ms` from `shutdown_notice`), `/ws`
//!    closes with 1012, held long polls answer, requests in flight (publishes) finish;
//! 3. the process exits once every connection has ended, at most `SHUTDOWN_GRACE` (10 s) after
//!    step 2, so at most `drain_grace` + 10 s after the signal. A second signal during the
//!    grace skips the rest of it.
//!
//! The spread of reconnects is the client's part: every session is told its own delay, drawn
//! uniformly from `[0, reconnect_spread]`, and the server ends all streams at once. So the
//! node is not kept alive for the spread, and clients arrive at the other nodes spread out.
//!
//! Reload (`reload`): `[auth]`, `[server] cors_origins`, the limits and timings in
//! `[server]`, `[channels]` and `[namespaces.*]` take effect for every request from the next
//! one on; connections stay. Settings bound at start — the listen addresses, TLS, the broker,
//! `request_header_timeout` (hyper's builder has it) — keep their old values, each logged as
//! "needs a restart". An invalid file changes nothing. Sessions then re-check what they
//! follow (`still_allowed`): one that may no longer follow a channel ends as an expired
//! token's would (`token_expired`; `/ws` closes 1008). Limits that size a session when it
//! opens (`queue_max_bytes`, a connection's publish rate) apply to new sessions.
//!
//! Concurrency: `draining` is one atomic flag, read by `/readyz`; the delay is drawn per
//! session from the thread-local RNG when its goodbye is written. A reload swaps the live
//! configuration and the node's policies (each one `ArcSwap` store: readers never wait),
//! then tells every stream and WebSocket session in one pass over the hub (a flag in each
//! one's queue, which wakes it: `follow`) and bumps `AppState::reloads` for the rest
//! (Pusher sessions). A shutdown reaches them the same way: one task waits on
//! `AppState::shutdown` and closes every one's queue with `Shutdown`. Reloads are
//! serialised by their caller (one signal task).

use std::sync::atomic::Ordering;

use tidings_core::{ChannelName, Disconnect, DisconnectReason, Tick};
use tokio::sync::mpsc;

use crate::auth::{Auth, Principal};
use crate::config::{Config, ConfigError, parse_listen};
use crate::state::{AppState, Live};

/// Resolves when the node should stop serving: `drain_grace` after the first stop signal on
/// `signals` (or at the second one). Marks the node draining on the first. A closed channel
/// with no signal sent never resolves (nobody can ask the node to stop).
pub async fn drain(state: AppState, mut signals: mpsc::Receiver<()>) {
    if signals.recv().await.is_none() {
        std::future::pending::<()>().await;
    }
    let grace = state.config().server.drain_grace;
    state.draining.store(true, Ordering::Release);
    tracing::info!(
        grace_ms = grace.as_millis() as u64,
        "draining: /readyz answers 503; clients are told to reconnect once the grace ends"
    );
    tokio::select! {
        _ = tokio::time::sleep(grace) => {}
        Some(()) = signals.recv() => {
            tracing::info!("second stop signal: ending the drain now");
        }
    }
    tracing::info!("telling every client to reconnect elsewhere");
}

/// The goodbye of a session ended by shutdown: reconnect, after a delay of its own drawn
/// uniformly from `[0, reconnect_spread]`.
pub fn shutdown_notice(state: &AppState) -> Disconnect {
    let spread = state.config().server.reconnect_spread.as_millis() as u64;
    Disconnect::after(DisconnectReason::Shutdown, rand::random_range(0..=spread))
}

/// Puts new `[[pusher.apps]]` in force: unchanged apps keep their connections; a changed
/// app's connections close with 4200 (pusher-js reconnects at once, under the new settings),
/// a removed app's with 4001 (pusher-js does not reconnect); new apps' webhook senders start.
fn reload_pusher(state: &AppState, apps: &tidings_pusher::PusherConfig) {
    use tidings_pusher::protocol::code;
    let done = state.pusher.reload(apps);
    for app in &done.added {
        crate::pusher::webhook::spawn_for(state, app);
    }
    for (app, gone) in &done.retired {
        tracing::info!(app = %app.config.id, removed = gone, "Pusher app reloaded: closing its connections");
        app.retire(if *gone {
            code::APP_NOT_FOUND
        } else {
            code::RECONNECT
        });
    }
}

/// What a reload did.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// Settings that changed in the file but keep their old value until a restart.
    pub needs_restart: Vec<&'static str>,
}

/// Puts `new` in force, except what needs a restart (kept, and named in the result). An
/// invalid configuration (or credentials that cannot be built, such as an unreadable JWT key
/// file) is refused whole: the old one stays.
pub fn reload(state: &AppState, mut new: Config) -> Result<Reloaded, ConfigError> {
    // logrotate moves the file, then sends SIGHUP: reopen whatever the new file says.
    if let Some(log) = &state.access_log {
        log.reopen();
    }
    new.validate()?;
    let auth = Auth::from_config(&new.auth)?;
    crate::pusher::webhook::check(&new.pusher)?;
    let old = state.live();
    let (o, n) = (&old.config.server, &mut new.server);
    let mut needs_restart = Vec::new();
    macro_rules! keep {
        ($($field:ident),+) => {$(
            if n.$field != o.$field {
                needs_restart.push(concat!("server.", stringify!($field)));
                n.$field = o.$field.clone();
            }
        )+};
    }
    keep!(
        listen,
        tls_listen,
        tls_cert,
        tls_key,
        tls_self_signed,
        request_header_timeout,
        // The broker took its cap and the logger its format at start.
        max_channels,
        log_format,
        // The runtime was built with it.
        runtime_event_interval,
        // The writer opened its target at start (a reload reopens the same file).
        access_log,
        // One rate per client, taken at start (rates::Rates).
        client_publish_rate,
        // The directory is opened (and its real path taken) at start (`app::pages`).
        static_dir
    );
    // The broker is connected at start; every key of its table needs a restart (compared
    // through `Debug`, so keys added later are covered too).
    if format!("{:?}", new.broker) != format!("{:?}", old.config.broker) {
        needs_restart.push("broker");
        new.broker = old.config.broker.clone();
    }
    // Pusher apps: a node that started with none chose no cluster-wide roster and runs no
    // Pusher tasks, so its first apps need a restart; otherwise they are put in force below.
    let pusher_changed = new.pusher != old.config.pusher;
    if pusher_changed && old.config.pusher.apps.is_empty() {
        needs_restart.push("pusher.apps");
        new.pusher = old.config.pusher.clone();
    }
    let pusher_reload = pusher_changed && !old.config.pusher.apps.is_empty();
    // The start-up refusal of open mode on an exposed address holds for a reload too.
    let exposed = parse_listen(&new.server.listen).is_some_and(|a| !a.ip().is_loopback())
        || new
            .server
            .tls_listen
            .as_deref()
            .and_then(parse_listen)
            .is_some_and(|a| !a.ip().is_loopback());
    if !new.auth.enabled() && exposed && !new.server.insecure {
        return Err(ConfigError::Invalid(
            "this reload would turn on open mode (no [auth]) on a non-loopback address; \
             keep [auth], or set server.insecure = true"
                .into(),
        ));
    }
    state.limits.set_max(
        new.server.max_connections,
        new.server.max_connections_per_ip,
    );
    state.node.policies.replace(new.policies());
    if pusher_reload {
        reload_pusher(state, &new.pusher);
    }
    state.swap_live(Live { config: new, auth });
    state.reloads.send_modify(|n| *n += 1);
    // Streams and WebSocket sessions learn of it through their queues, in one pass.
    state.node.hub.reload_sessions();
    for key in &needs_restart {
        tracing::warn!(
            key,
            "changed in the configuration: needs a restart; keeping the running value"
        );
    }
    Ok(Reloaded { needs_restart })
}

/// Has shutdown and reloads reach a stream or WebSocket session through its queue, in one
/// pass over the hub (`Hub::close_sessions`, `Hub::reload_sessions`), instead of a shutdown
/// wait and a reload watch in every parked session's future (a waiting long poll learns of
/// shutdown from its deadline's map instead, `transport::due`); and its heartbeats or pings
/// (`tick`, where it has them) too, from one timer per node (`Hub::tick_part`) instead of a
/// timer in every session.
/// One task waits on the shutdown token and the timers for all of them; the first session
/// starts it.
pub fn follow(state: &AppState, sub: &mut tidings_core::Subscription, tick: Option<Tick>) {
    sub.follow_lifecycle(tick);
    if state
        .shutdown_pass
        .swap(true, std::sync::atomic::Ordering::AcqRel)
    {
        return;
    }
    let (shutdown, hub) = (state.shutdown.clone(), state.node.hub.clone());
    // The timers start now (not when the task first runs): the first session's heartbeat
    // is due one interval after it opened.
    let (config, start) = (state.downgrade(), tokio::time::Instant::now());
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn(async move {
                tokio::select! {
                    _ = shutdown.cancelled() => hub.close_sessions(),
                    _ = ticks(config, start, &hub, |tick, part| hub.tick_part(tick, part)) => {}
                }
            });
        }
        // No runtime (never in the server): the next session tries again.
        Err(_) => state
            .shutdown_pass
            .store(false, std::sync::atomic::Ordering::Release),
    }
}

/// The node's heartbeat and ping timers: every `heartbeat_interval` the streams' tick,
/// every `ping_interval` the WebSocket sessions', each spread over the hub's `TICK_PARTS`
/// parts (one part every 1/`TICK_PARTS` of the interval), so every session is visited once
/// per interval and a node's beats come in small slices, not one burst. Each interval is
/// read again at every wake, so a reload's new one takes effect for every session within
/// one old interval. A step can be shorter than the timer's millisecond (a 100 ms interval
/// makes ~0.2 ms steps): a wake visits the parts due by then, as many as a millisecond
/// holds and two more, so the round keeps to its interval. A later wake (a busy runtime)
/// delays the rest rather than bunching them: catching up a stall would be the burst the
/// parts are there to avoid. While the hub watches no session the timer sleeps
/// (`Hub::until_watched`) and starts a new round when one comes, so each session is still
/// visited within one interval of its start. Ends when the state is gone (a test's server
/// dropped; a server's lives as long as the process), seen at the next wake.
async fn ticks(
    state: crate::state::WeakState,
    start: tokio::time::Instant,
    hub: &tidings_core::Hub,
    mut visit: impl FnMut(Tick, usize),
) {
    use tidings_core::TICK_PARTS;
    let steps = |state: &AppState| {
        let s = &state.config().server;
        let parts = TICK_PARTS as u32;
        (s.heartbeat_interval / parts, s.ping_interval / parts)
    };
    let Some((beat_step, ping_step)) = state.upgrade().as_ref().map(steps) else {
        return;
    };
    let mut beat = Round::new(start + beat_step);
    let mut ping = Round::new(start + ping_step);
    loop {
        tokio::time::sleep_until(beat.at.min(ping.at)).await;
        let slept = hub.watched() == 0;
        if slept {
            hub.until_watched().await;
        }
        let Some((beat_step, ping_step)) = state.upgrade().as_ref().map(steps) else {
            return;
        };
        let now = tokio::time::Instant::now();
        if slept {
            // A new round from the first session's arrival, as from the node's start.
            (beat, ping) = (Round::new(now + beat_step), Round::new(now + ping_step));
            continue;
        }
        beat.visit(now, beat_step, |part| visit(Tick::Heartbeat, part));
        ping.visit(now, ping_step, |part| visit(Tick::Ping, part));
    }
}

/// One timer's place in its round of the hub's parts.
struct Round {
    /// When the next part is due.
    at: tokio::time::Instant,
    part: usize,
}

impl Round {
    fn new(at: tokio::time::Instant) -> Self {
        Self { at, part: 0 }
    }

    /// Visits the parts due by `now`, at most a millisecond's worth of steps and two more;
    /// the next is due one step after the last one visited, or one step after `now` when
    /// more were due (the round is late: it moves on from here instead of bunching).
    fn visit(
        &mut self,
        now: tokio::time::Instant,
        step: std::time::Duration,
        mut tick: impl FnMut(usize),
    ) {
        let parts = tidings_core::TICK_PARTS;
        let most = std::time::Duration::from_millis(1).as_nanos() / step.as_nanos().max(1);
        for _ in 0..(most as usize + 2).min(parts) {
            if self.at > now {
                return;
            }
            tick(self.part);
            self.part = (self.part + 1) % parts;
            self.at += step;
        }
        if self.at <= now {
            self.at = now + step;
        }
    }
}

/// Whether `who` may still follow every one of `channels` under the configuration in force
/// (after a reload): its kind of credentials still accepted, each channel's subscribe policy
/// still met.
pub fn still_allowed(state: &AppState, who: &Principal, channels: &[ChannelName]) -> bool {
    let auth = state.auth();
    auth.still_accepts(who)
        && channels.iter().all(|c| {
            let policy = state.node.policies.for_channel(c);
            auth.check_subscribe(who, c, &policy).is_ok()
        })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::Config;

    #[test]
    fn shutdown_notices_spread_their_delays_over_the_whole_window() {
        let mut config = Config::default();
        config.server.reconnect_spread = Duration::from_millis(1000);
        let state = AppState::new(config).unwrap();
        let delays: Vec<u64> = (0..2000)
            .map(|_| shutdown_notice(&state).reconnect_after_ms.unwrap())
            .collect();
        assert!(delays.iter().all(|&d| d <= 1000));
        // Every tenth of the window is used, none by more than twice its share.
        let mut buckets = [0usize; 10];
        for d in &delays {
            buckets[(*d as usize * 10 / 1001).min(9)] += 1;
        }
        assert!(buckets.iter().all(|&n| n > 100 && n < 400), "{buckets:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_marks_the_node_at_the_signal_and_ends_after_the_grace() {
        let mut config = Config::default();
        config.server.drain_grace = Duration::from_secs(5);
        let state = AppState::new(config).unwrap();
        let (tx, rx) = mpsc::channel(2);
        let drain = tokio::spawn(drain(state.clone(), rx));
        tokio::task::yield_now().await;
        assert!(!state.draining.load(Ordering::Acquire));
        let started = tokio::time::Instant::now();
        tx.send(()).await.unwrap();
        drain.await.unwrap();
        assert!(state.draining.load(Ordering::Acquire));
        assert_eq!(started.elapsed().as_secs(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_signal_ends_the_grace_at_once() {
        let state = AppState::new(Config::default()).unwrap();
        let (tx, rx) = mpsc::channel(2);
        let started = tokio::time::Instant::now();
        tx.send(()).await.unwrap();
        tx.send(()).await.unwrap();
        drain(state, rx).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    /// ~55 wakes a second (512 parts per 15 s heartbeat, 512 per 25 s ping) were made for
    /// nothing once the last session had gone.
    #[tokio::test(start_paused = true)]
    async fn the_node_s_timer_sleeps_while_it_watches_no_session_and_wakes_for_the_next() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicUsize;
        let state = AppState::new(Config::default()).unwrap();
        let interval = state.config().server.heartbeat_interval;
        let hub = state.node.hub.clone();
        let visits = Arc::new(AtomicUsize::new(0));
        let wait = |d| tokio::time::timeout(d, std::future::pending::<()>());
        let q = tidings_core::queue::SessionQueue::new(1 << 20);
        q.listen(Tick::Heartbeat);
        hub.watch(1, &q);
        tokio::spawn({
            let (weak, hub, visits) = (state.downgrade(), hub.clone(), visits.clone());
            async move {
                let start = tokio::time::Instant::now();
                ticks(weak, start, &hub, |tick, part| {
                    visits.fetch_add(1, Ordering::Relaxed);
                    hub.tick_part(tick, part);
                })
                .await
            }
        });
        let _ = wait(interval).await;
        assert!(q.take_tick(), "a beat within the first interval");
        hub.unwatch(1);
        let _ = wait(Duration::from_millis(100)).await;
        let before = visits.load(Ordering::Relaxed);
        let _ = wait(Duration::from_secs(600)).await;
        assert_eq!(
            visits.load(Ordering::Relaxed),
            before,
            "parts visited with no session"
        );
        hub.watch(1, &q);
        let _ = wait(interval).await;
        assert!(
            q.take_tick(),
            "a beat within an interval of the next session's start"
        );
        assert!(visits.load(Ordering::Relaxed) > before);
    }

    #[tokio::test]
    async fn the_first_pusher_app_of_a_node_started_without_any_is_named_as_needing_a_restart() {
        let state = AppState::new(Config::default()).unwrap();
        let mut new = Config::default();
        new.pusher.apps.push(tidings_pusher::AppConfig {
            id: "7".into(),
            key: "k".into(),
            secret: tidings_pusher::config::AppSecret("s".into()),
            client_events: false,
            max_connections: 0,
            max_event_bytes: tidings_pusher::config::DEFAULT_MAX_EVENT_BYTES,
            webhook_url: None,
            webhook_ca_file: None,
        });
        let done = reload(&state, new).unwrap();
        assert_eq!(done.needs_restart, ["pusher.apps"]);
        assert!(state.config().pusher.apps.is_empty());
        assert!(state.pusher.is_empty());
    }
}
