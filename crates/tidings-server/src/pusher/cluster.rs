//! The Pusher protocol across nodes: every node listens to the roster's broadcasts and
//! reaps dead nodes' holds (see `tidings_pusher::registry` for what the roster holds).
//!
//! - `listen`: a member added or removed anywhere reaches this node's hub as a presence
//!   event (its sessions write `member_added` / `member_removed`, Tidings' own `/ws`
//!   subscribers get `join` / `leave`); a terminate ends this node's sockets of that user.
//!   The node that made the change hears its own broadcast too: one path for every node.
//! - `reap`: every `REAP_EVERY`, takes back the holds of nodes whose liveness ran out (on the
//!   Redis roster, `ALIVE_TTL` = 10 s after their last heartbeat). The roster hands each
//!   released member to exactly one reaping node, which queues the webhooks and broadcasts
//!   the removals. So a killed node's members are removed once, within `ALIVE_TTL +
//!   REAP_EVERY` (12 s).
//!
//! Both tasks end with `state.shutdown`. Broadcasts are bounded (`BROADCAST_CAPACITY`); a
//! listener that falls behind loses the oldest and logs how many.

use std::sync::Arc;
use std::time::Duration;

use tidings_core::{ClientInfo, PresenceEvent, PresenceKind};
use tidings_pusher::App;
use tidings_pusher::names::PusherChannel;
use tidings_pusher::registry::Bus;
use tokio::sync::broadcast::error::RecvError;

use crate::state::AppState;

/// How often each node looks for dead nodes' holds.
pub const REAP_EVERY: Duration = Duration::from_secs(2);

/// Starts the listener and the reaper when there are Pusher apps.
pub fn spawn(state: &AppState) {
    let Some(roster) = state.pusher.iter().next().map(|a| a.roster().clone()) else {
        return;
    };
    tokio::spawn(listen(state.clone(), roster.listen()));
    tokio::spawn(reap(state.clone(), roster));
}

async fn listen(state: AppState, mut rx: tokio::sync::broadcast::Receiver<Arc<str>>) {
    let shutdown = state.shutdown.clone();
    loop {
        let payload = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = rx.recv() => match r {
                Ok(p) => p,
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(lost = n, "Pusher member broadcasts lost: the listener fell behind");
                    continue;
                }
                Err(RecvError::Closed) => return,
            },
        };
        let Some((app, bus)) = state.pusher.on_bus(&payload) else {
            continue;
        };
        match bus {
            Bus::Added {
                channel,
                user,
                socket,
                ..
            } => announce(&state, &app, &channel, PresenceKind::Join, socket, user),
            Bus::Removed {
                channel,
                user,
                socket,
                ..
            } => {
                announce(
                    &state,
                    &app,
                    &channel,
                    PresenceKind::Leave,
                    socket,
                    user.clone(),
                );
                app.forget_member(&channel, &user);
            }
            Bus::Terminate { .. } => {}
        }
    }
}

/// Hands a member change to this node's subscribers of the channel.
fn announce(
    state: &AppState,
    app: &App,
    channel: &str,
    kind: PresenceKind,
    socket: String,
    user: String,
) {
    let id = &app.config.id;
    let Some(tidings) = PusherChannel::parse(id, channel)
        .ok()
        .and_then(|c| c.tidings(id).ok())
    else {
        return;
    };
    state.node.hub.deliver_presence(&Arc::new(PresenceEvent {
        kind,
        channel: tidings,
        info: ClientInfo {
            client: socket,
            user: Some(user),
        },
    }));
}

async fn reap(state: AppState, roster: Arc<dyn tidings_core::Roster>) {
    let mut tick = tokio::time::interval(REAP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let released = match roster.reap().await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "could not reap dead nodes' Pusher members");
                continue;
            }
        };
        if released.is_empty() {
            continue;
        }
        tracing::info!(
            released = released.len(),
            "a dead node's Pusher channels and members were taken back"
        );
        for bus in state.pusher.reaped(released) {
            let payload = serde_json::to_string(&bus).unwrap_or_default();
            if let Err(e) = roster.broadcast(&payload).await {
                tracing::warn!(error = %e, "could not broadcast a dead node's member removal");
            }
        }
    }
}
