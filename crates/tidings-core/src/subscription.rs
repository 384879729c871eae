//! One session's subscription to a set of channels: joining without a race, then the
//! ordered, duplicate-free, gap-reporting stream of events a transport writes out.
//!
//! Joining (`Node::subscribe`) follows the order that makes resume race-free:
//! 1. register the session's queue in the hub for every channel (live messages start queuing);
//! 2. subscribe the node at the broker for channels that had no local subscriber;
//! 3. read each channel's history from the cursor, with the broker's `top` taken atomically;
//! 4. emit the replay, then drain the queue skipping what the replay already covered
//!    (offset <= the channel's position), so a message published during the join arrives
//!    exactly once.
//!
//! The subscription tracks one position per channel (its `Cursor`); a live message that is
//! not the next offset of the tracked epoch produces a gap notice before it, so a subscriber
//! is never left to guess.
//!
//! Replays are bounded (SPEC §13): `history=N` never asks for more than the namespace keeps,
//! and the replay is handed out in pages of at most the session's queue budget
//! (`queue_max_bytes`) per `drain`, so a writer never frames more than one budget of it at
//! once; `ready` stays ready while a page is left. The replayed messages are shared with
//! history (reference counted), not copied; the live queue is drained only after the whole
//! replay, and live messages that arrive meanwhile count against the queue as usual (a
//! client that cannot take its replay overflows and resumes from its cursor).

use std::collections::VecDeque;
use std::sync::Arc;

use crate::channel::ChannelName;
use crate::cursor::Cursor;
use crate::disconnect::DisconnectReason;
use crate::history::{Gap, GapReason, Replay, Since};
use crate::message::{Message, Position};
use crate::node::Node;
use crate::presence::{ClientInfo, PresenceEvent};
use crate::queue::{QueueItem, SessionQueue, Tick};

/// Where a new subscription starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// Only what is published from now on.
    Now,
    /// The last N retained messages of each channel, then live.
    Last(usize),
    /// Resume: for every channel the cursor covers, exactly what followed; others from now.
    Cursor(Cursor),
}

impl Start {
    pub fn since(&self, channel: &ChannelName) -> Since {
        match self {
            Start::Now => Since::Now,
            Start::Last(n) => Since::Last(*n),
            Start::Cursor(c) => c
                .get(channel)
                .map_or(Since::Now, |p| Since::After(p.clone())),
        }
    }
}

/// What a transport writes, in order.
pub enum Event<'a> {
    Message(&'a Arc<Message>),
    Gap(&'a Gap),
    /// A join or leave (namespaces with `join_leave`); the cursor given with it is empty.
    Presence(&'a PresenceEvent),
}

enum Pending {
    Message(Arc<Message>),
    Gap(Gap),
}

/// The channels a subscription follows: one inline (every one-channel poll, most streams),
/// more in a list. A list of one was an allocation per poll (issue 17); inline it costs the
/// subscription 8 bytes more than the list's 24, against the list's 32-byte heap chunk.
enum Channels {
    One(ChannelName),
    Many(Vec<ChannelName>),
}

/// A subscription's `ClientInfo`, compact: an id drawn by `ClientInfo::anonymous` (every
/// server session's) is kept as its number, not its text, and the user as a boxed `str`:
/// 32 bytes and one allocation less than the `ClientInfo` (48 inline and the id's 16-byte
/// string) in every session (issue 17).
enum Client {
    Drawn {
        id: u64,
        user: Option<Box<str>>,
    },
    /// Any other id, as given.
    Other(Box<ClientInfo>),
}

impl Client {
    fn new(info: ClientInfo) -> Self {
        match ClientInfo::drawn_id(&info.client) {
            Some(id) => Client::Drawn {
                id,
                user: info.user.map(String::into_boxed_str),
            },
            None => Client::Other(Box::new(info)),
        }
    }

    /// The `ClientInfo` it was made from.
    fn info(&self) -> ClientInfo {
        match self {
            Client::Drawn { id, user } => ClientInfo {
                client: ClientInfo::drawn(*id),
                user: user.as_deref().map(str::to_owned),
            },
            Client::Other(info) => ClientInfo::clone(info),
        }
    }
}

impl Channels {
    fn as_slice(&self) -> &[ChannelName] {
        match self {
            Channels::One(c) => std::slice::from_ref(c),
            Channels::Many(v) => v,
        }
    }

    fn push(&mut self, channel: ChannelName) {
        match self {
            Channels::Many(v) if v.is_empty() => *self = Channels::One(channel),
            Channels::Many(v) => v.push(channel),
            Channels::One(_) => {
                if let Channels::One(first) = std::mem::replace(self, Channels::Many(Vec::new())) {
                    *self = Channels::Many(vec![first, channel]);
                }
            }
        }
    }

    fn swap_remove(&mut self, i: usize) {
        match self {
            Channels::One(_) if i == 0 => *self = Channels::Many(Vec::new()),
            Channels::One(_) => {}
            Channels::Many(v) => {
                if i < v.len() {
                    v.swap_remove(i);
                }
            }
        }
    }
}

pub struct Subscription {
    node: Arc<Node>,
    id: u64,
    queue: Arc<SessionQueue>,
    channels: Channels,
    cursor: Cursor,
    /// The replay not handed out yet, oldest first; `None` once it is all out. Boxed: a
    /// parked session has handed its replay out, and inline the empty list was 32 bytes
    /// of every session's writer (issue 17).
    #[allow(clippy::box_collection)] // the box is the point: 8 bytes inline, not 32
    pending: Option<Box<VecDeque<Pending>>>,
    batch: VecDeque<QueueItem>,
    per_channel: bool,
    /// Recorded in presence on channels whose namespace keeps it.
    client: Option<Client>,
    /// Registered with the hub for shutdown and reloads (`follow_lifecycle`).
    watched: bool,
}

impl Subscription {
    pub fn channels(&self) -> &[ChannelName] {
        self.channels.as_slice()
    }

    /// Positions of everything handed out so far; resuming from it loses nothing.
    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    /// Has shutdown and reloads reach this session through its queue (`Hub::watch`): a
    /// shutdown ends it (`drain` and `cut` say `Shutdown`), a reload wakes it and
    /// `take_reload` says so once; so does the node's shared `tick`, if it follows one
    /// (`Hub::tick_part`, `take_tick`). For streams and sessions; a poll needs none of it
    /// (a waiting long poll's shutdown comes with its deadline, outside the hub).
    pub fn follow_lifecycle(&mut self, tick: Option<Tick>) {
        if !self.watched {
            self.watched = true;
            if let Some(tick) = tick {
                self.queue.listen(tick);
            }
            self.node.hub.watch(self.id, &self.queue);
        }
    }

    /// The session's id (unique in its node) and its queue: for a timer outside the hub that
    /// wakes it (`SessionQueue::wake_writer`).
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn queue(&self) -> &Arc<SessionQueue> {
        &self.queue
    }

    /// Whether a reload took effect since the last call (`follow_lifecycle`).
    pub fn take_reload(&self) -> bool {
        self.queue.take_reload()
    }

    /// Whether the shared tick this session follows came since the last call: its
    /// heartbeat or ping is due.
    pub fn take_tick(&self) -> bool {
        self.queue.take_tick()
    }

    /// Where a held one-channel poll stands: the position the channel's next message must
    /// follow for a hook (`hold`) to answer it alone, with the message's own cursor. `None`
    /// when a hook cannot stand in for this subscription: more than one channel, or a replay
    /// page still to hand out.
    pub fn hold_position(&self) -> Option<&Position> {
        let Channels::One(channel) = &self.channels else {
            return None;
        };
        if self.pending.as_ref().is_some_and(|p| !p.is_empty()) || !self.batch.is_empty() {
            return None;
        }
        self.cursor.get(channel)
    }

    /// Has the channel's next message offered to `hook` before it is queued (`Hub::hold`),
    /// if nothing is queued now and a hook can stand in at all (`hold_position`). A hook is
    /// used once; it must decline a message that does not follow `hold_position` (a gap, or
    /// one the join already replayed): the queue sorts those out. Dropping the subscription
    /// takes the hook out of the hub.
    pub fn hold(&self, hook: Arc<dyn crate::hub::Held>) -> bool {
        let Channels::One(channel) = &self.channels else {
            return false;
        };
        self.hold_position().is_some() && self.node.hub.hold(channel, self.id, hook)
    }

    /// Takes the hook back (`hold`); `true` when no message went to it and none will.
    pub fn release(&self) -> bool {
        let Channels::One(channel) = &self.channels else {
            return false;
        };
        self.node.hub.release(channel, self.id)
    }

    /// Resolves when the session is cut short: its queue overflowed (`Slow`) or the server
    /// is shutting down (`Shutdown`). What is still queued or pending goes unsent.
    pub fn cut(&self) -> impl Future<Output = DisconnectReason> + Send + '_ {
        std::future::poll_fn(|cx| self.poll_cut(cx))
    }

    /// `cut` as a poll, for a hand-made future or body (a WebSocket session's wait, a
    /// stream's body).
    pub fn poll_cut(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<DisconnectReason> {
        self.queue.poll_cut(cx)
    }

    /// Fires `kill` once, from the publishing thread, if this subscription's queue
    /// overflows (the queue holds it, or is it: no allocation).
    pub fn on_overflow(&self, kill: crate::kill::Kill) {
        self.queue.set_on_overflow(kill);
    }

    /// A kill switch on this session's own queue (no allocation): for a session that stops
    /// itself on an overflow (`on_overflow`) and has no connection's switch to share.
    pub fn own_kill(&self) -> crate::kill::Kill {
        crate::kill::Kill::of(&self.queue)
    }

    /// Whether the session was cut for falling too far behind (its queue overflowed):
    /// the session counts its slow disconnect from this when it ends.
    pub fn overflowed(&self) -> bool {
        self.queue.overflowed()
    }

    /// Resolves when live messages (or an overflow) are waiting, and at once while part of
    /// the replay is still to be handed out.
    pub fn ready(&self) -> impl Future<Output = ()> + Send + '_ {
        std::future::poll_fn(|cx| self.poll_ready(cx))
    }

    /// `ready` as a poll: a session's hand-made future waits on it without a future of its
    /// own.
    pub fn poll_ready(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.pending.is_none() {
            self.queue.poll_ready(cx)
        } else {
            std::task::Poll::Ready(())
        }
    }

    /// Hands every event that is ready to `f`, each with the cursor text that resumes right
    /// after it — of the replay, one page (about `queue_max_bytes`) per call; the live queue
    /// once the replay is out. Returns `Err(reason)` when the session must end: `Slow` when
    /// it fell too far behind, or whatever `Hub::disconnect_all` said.
    pub fn drain(
        &mut self,
        mut f: impl FnMut(Event<'_>, &[u8]),
    ) -> Result<usize, DisconnectReason> {
        // A message's own cursor is right whenever it covers the whole subscription.
        let single = self.per_channel || self.channels().len() == 1;
        let mut count = 0;
        let mut budget = self.queue.max_bytes();
        if let Some(pending) = self.pending.as_deref_mut() {
            while let Some(p) = pending.front() {
                match p {
                    Pending::Message(m) => {
                        // At least one message per page, however large.
                        if count > 0 && m.weight() > budget {
                            break;
                        }
                        budget = budget.saturating_sub(m.weight());
                        self.cursor.advance(&m.channel, &m.position());
                        emit_message(single, &self.cursor, m, &mut f);
                        count += 1;
                    }
                    Pending::Gap(g) => emit_gap(self.per_channel, &mut self.cursor, g, &mut f),
                }
                pending.pop_front();
            }
            if !pending.is_empty() {
                return Ok(count);
            }
            // Freed: a parked session keeps no replay buffer.
            self.pending = None;
        }
        let mut batch = std::mem::take(&mut self.batch);
        // A lone item comes apart from the list (`swap_into`): it is the oldest.
        let lone = self.queue.swap_into(&mut batch)?;
        // Two loops, not a chain: the chained iterator's drop cost ~60 instructions per
        // delivery on a fan-out.
        if let Some(item) = lone {
            count += usize::from(self.take_live(item, single, &mut f));
        }
        for item in batch.drain(..) {
            count += usize::from(self.take_live(item, single, &mut f));
        }
        self.batch = batch;
        Ok(count)
    }
}

impl Subscription {
    /// Hands out one live item (skipping what the join already replayed, with a gap notice
    /// before a message that does not follow); true when it was a message handed out.
    fn take_live(
        &mut self,
        item: QueueItem,
        single: bool,
        f: &mut impl FnMut(Event<'_>, &[u8]),
    ) -> bool {
        let m = match item {
            QueueItem::Message(m) => m,
            QueueItem::Presence(e) => {
                if self.channels().contains(&e.channel) {
                    f(Event::Presence(&e), &[]);
                }
                return false;
            }
        };
        let Some(at) = self.cursor.get(&m.channel) else {
            return false;
        };
        let gap_reason = if at.epoch != m.epoch {
            Some(GapReason::EpochChanged)
        } else if m.offset <= at.offset {
            // Already replayed from history during the join.
            return false;
        } else if m.offset > at.offset + 1 {
            Some(GapReason::Trimmed)
        } else {
            None
        };
        if let Some(reason) = gap_reason {
            let gap = Gap {
                channel: m.channel.as_str().to_owned(),
                epoch: m.epoch.clone(),
                next_offset: m.offset,
                reason,
            };
            emit_gap(self.per_channel, &mut self.cursor, &gap, f);
        }
        self.cursor.advance(&m.channel, &m.position());
        emit_message(single, &self.cursor, &m, f);
        true
    }
}

// The cursor text of a many-channel subscription is built per event and dropped after it
// (a field kept the last one, and 24 bytes in every session, for nothing).
fn emit_message(
    single: bool,
    cursor: &Cursor,
    m: &Arc<Message>,
    f: &mut impl FnMut(Event<'_>, &[u8]),
) {
    if single {
        // Canonical encoding: a one-channel cursor is the message's own, encoded once.
        f(Event::Message(m), m.cursor());
    } else {
        f(Event::Message(m), cursor.encode().as_bytes());
    }
}

fn emit_gap(
    per_channel: bool,
    cursor: &mut Cursor,
    gap: &Gap,
    f: &mut impl FnMut(Event<'_>, &[u8]),
) {
    let Ok(channel) = ChannelName::new(&gap.channel) else {
        return;
    };
    let at = Position {
        epoch: gap.epoch.clone(),
        offset: gap.next_offset.saturating_sub(1),
    };
    cursor.set(&channel, at.clone());
    let text = if per_channel {
        Cursor::single(&channel, at).encode()
    } else {
        cursor.encode()
    };
    f(Event::Gap(gap), text.as_bytes());
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.watched {
            self.node.hub.unwatch(self.id);
        }
        for channel in self.channels.as_slice() {
            self.leave(channel);
        }
        // Nothing reaches the queue now (`queue`'s module docs): the connection's next
        // session may claim it.
        self.queue.unclaim();
    }
}

/// The outcome of joining one channel.
#[derive(Clone, Debug)]
pub struct Joined {
    /// The position the replay starts after (what to resume from if nothing else arrives).
    pub begin: Position,
    /// Set when history could not cover the requested start; the notice is also queued.
    pub gap: Option<Gap>,
}

impl Subscription {
    /// Joins one more channel race-free (see the module docs). Joining a channel already
    /// followed — or one whose cursor entry would be another's (`cursor::collision`, which
    /// callers check first to say so) — is refused with `None` so the caller can report it.
    pub async fn add(
        &mut self,
        channel: &ChannelName,
        since: &Since,
    ) -> Result<Option<Joined>, crate::broker::BrokerError> {
        if self.channels().contains(channel)
            || crate::cursor::collision(self.channels(), channel).is_some()
        {
            return Ok(None);
        }
        // Pushed before registering so Drop undoes exactly what was done if we fail later.
        self.channels.push(channel.clone());
        if self.node.hub.add(channel, self.id, self.queue.clone())
            && self.node.broker.tracks_subscriptions()
        {
            self.node.broker.subscribe(channel).await?;
        }
        // Never more than the namespace keeps, whatever `history=N` asked for.
        let capped;
        let since = match since {
            Since::Last(n) => {
                let keeps = self.node.policies.for_channel(channel).history_size;
                capped = Since::Last((*n).min(keeps));
                &capped
            }
            other => other,
        };
        let read = match self.node.broker.read_at_once(channel, since, None) {
            Some(read) => read?,
            None => self.node.broker.read(channel, since, None).await?,
        };
        let begin = match &read.replay {
            Replay::Gap { gap, .. } => Position {
                epoch: gap.epoch.clone(),
                offset: gap.next_offset.saturating_sub(1),
            },
            Replay::Complete(m) => m.first().map_or(read.top.clone(), |m| Position {
                epoch: m.epoch.clone(),
                offset: m.offset - 1,
            }),
        };
        self.cursor.set(channel, begin.clone());
        let gap = match read.replay {
            Replay::Complete(messages) => {
                self.pend(messages.into_iter().map(Pending::Message));
                None
            }
            Replay::Gap { gap, messages } => {
                let notice = std::iter::once(Pending::Gap(gap.clone()));
                self.pend(notice.chain(messages.into_iter().map(Pending::Message)));
                Some(gap)
            }
        };
        if let Some(client) = &self.client {
            let policy = self.node.policies.for_channel(channel);
            if policy.presence {
                self.node
                    .broker
                    .presence_join(channel, &client.info(), policy.join_leave)
                    .await?;
            }
        }
        Ok(Some(Joined { begin, gap }))
    }

    /// Queues replayed events behind those still pending (none: no box).
    fn pend(&mut self, events: impl Iterator<Item = Pending>) {
        let mut events = events.peekable();
        if events.peek().is_some() {
            self.pending.get_or_insert_default().extend(events);
        }
    }

    /// The client this subscription stands for in presence, if it is recorded.
    pub fn client(&self) -> Option<ClientInfo> {
        self.client.as_ref().map(Client::info)
    }

    /// Undoes a channel's registrations: hub, broker subscription, presence.
    fn leave(&self, channel: &ChannelName) {
        let last =
            self.node.hub.remove(channel, self.id) && self.node.broker.tracks_subscriptions();
        // A poll has no client (it is never present): no policy lookup, no task.
        let presence = match &self.client {
            None => None,
            Some(client) => {
                let policy = self.node.policies.for_channel(channel);
                policy.presence.then(|| (client.info(), policy.join_leave))
            }
        };
        if !last && presence.is_none() {
            return;
        }
        let broker = self.node.broker.clone();
        let channel = channel.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Some((client, announce)) = presence
                    && let Err(e) = broker.presence_leave(&channel, &client, announce).await
                {
                    tracing::warn!(%channel, error = %e, "presence leave failed");
                }
                if last && let Err(e) = broker.unsubscribe(&channel).await {
                    tracing::warn!(%channel, error = %e, "broker unsubscribe failed");
                }
            });
        }
    }

    /// Leaves a channel: nothing more of it is handed out, queued or pending. Returns false
    /// when the channel was not followed.
    pub fn remove(&mut self, channel: &ChannelName) -> bool {
        let Some(i) = self.channels().iter().position(|c| c == channel) else {
            return false;
        };
        self.channels.swap_remove(i);
        self.cursor.remove(channel);
        if let Some(pending) = self.pending.as_deref_mut() {
            pending.retain(|p| match p {
                Pending::Message(m) => &m.channel != channel,
                Pending::Gap(g) => g.channel != channel.as_str(),
            });
            if pending.is_empty() {
                self.pending = None;
            }
        }
        self.leave(channel);
        true
    }
}

impl Node {
    /// An empty subscription to add channels to one by one (a WebSocket session).
    /// `per_channel_cursors`: every event carries its own channel's cursor instead of one
    /// covering the whole subscription.
    /// `client`: recorded in presence where the namespace keeps it (persistent sessions only;
    /// a poll is not "present").
    pub fn session(
        self: &Arc<Self>,
        queue_max_bytes: usize,
        per_channel_cursors: bool,
        client: Option<ClientInfo>,
    ) -> Subscription {
        self.session_on(
            SessionQueue::new(queue_max_bytes),
            per_channel_cursors,
            client,
        )
    }

    /// `session` on a given queue: one claimed from its connection (`Kill::claim`), which
    /// the subscription gives back when it drops.
    pub fn session_on(
        self: &Arc<Self>,
        queue: Arc<SessionQueue>,
        per_channel_cursors: bool,
        client: Option<ClientInfo>,
    ) -> Subscription {
        Subscription {
            node: self.clone(),
            id: self.next_session_id(),
            queue,
            channels: Channels::Many(Vec::new()),
            cursor: Cursor::default(),
            pending: None,
            batch: VecDeque::new(),
            per_channel: per_channel_cursors,
            client: client.map(Client::new),
            watched: false,
        }
    }

    /// Joins `channels` (deduplicated) race-free from `start`; see the module docs.
    pub async fn subscribe(
        self: &Arc<Self>,
        channels: &[ChannelName],
        start: &Start,
        queue_max_bytes: usize,
        client: Option<ClientInfo>,
    ) -> Result<Subscription, crate::broker::BrokerError> {
        self.subscribe_on(channels, start, SessionQueue::new(queue_max_bytes), client)
            .await
    }

    /// `subscribe` on a given queue (`session_on`).
    pub async fn subscribe_on(
        self: &Arc<Self>,
        channels: &[ChannelName],
        start: &Start,
        queue: Arc<SessionQueue>,
        client: Option<ClientInfo>,
    ) -> Result<Subscription, crate::broker::BrokerError> {
        let mut sub = self.session_on(queue, false, client);
        for channel in channels {
            sub.add(channel, &start.since(channel)).await?;
        }
        Ok(sub)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policies;

    /// Every SSE writer, WebSocket session and long-poll wait holds one for its whole life.
    /// Today 168 bytes (184 while it kept its `ClientInfo` as given; 224 before the replay
    /// list was boxed and the cursor text a local; 176 before the cursor kept one channel
    /// inline, which saves an allocation per poll).
    #[test]
    fn a_subscription_stays_small() {
        let size = std::mem::size_of::<Subscription>();
        eprintln!("a subscription: {size} bytes");
        assert!(size <= 168, "a subscription is {size} bytes (bound 168)");
    }

    #[test]
    fn a_subscription_gives_back_the_client_it_was_given_whatever_its_id() {
        let node = Node::memory(Policies::default());
        let user = |u: Option<&str>| u.map(str::to_owned);
        let drawn = ClientInfo::anonymous();
        for info in [
            drawn.clone(),
            ClientInfo {
                user: user(Some("alice")),
                ..drawn
            },
            ClientInfo {
                client: "0000000000000000".into(),
                user: None,
            },
            // Not what `anonymous` draws: kept as given.
            ClientInfo {
                client: "00000000000000AB".into(),
                user: None,
            },
            ClientInfo {
                client: "+000000000000000".into(),
                user: None,
            },
            ClientInfo {
                client: "123.456".into(),
                user: user(Some("bob")),
            },
        ] {
            let sub = node.session(1 << 10, false, Some(info.clone()));
            assert_eq!(sub.client(), Some(info));
        }
    }

    #[tokio::test]
    async fn a_channel_whose_cursor_entry_would_be_another_s_is_not_joined() {
        let node = Node::memory(Policies::default());
        let a = ChannelName::new("a").unwrap_or_else(|e| panic!("{e}"));
        let forged = ChannelName::with_hash("b", a.hash64());
        assert_eq!(
            crate::cursor::collision(std::slice::from_ref(&a), &forged),
            Some(&a)
        );
        assert_eq!(crate::cursor::collision(std::slice::from_ref(&a), &a), None);
        let mut sub = node.session(1 << 20, true, None);
        assert!(matches!(sub.add(&a, &Since::Now).await, Ok(Some(_))));
        assert!(matches!(sub.add(&forged, &Since::Now).await, Ok(None)));
        assert_eq!(sub.channels(), &[a]);
    }

    #[tokio::test]
    async fn channels_joined_and_left_in_any_order_are_the_ones_followed() {
        let node = Node::memory(Policies::default());
        let name = |n: &str| ChannelName::new(n).unwrap_or_else(|e| panic!("{e}"));
        let (a, b, c) = (name("a"), name("b"), name("c"));
        let mut sub = node.session(1 << 20, true, None);
        for ch in [&a, &b, &c] {
            assert!(matches!(sub.add(ch, &Since::Now).await, Ok(Some(_))));
        }
        assert!(matches!(sub.add(&b, &Since::Now).await, Ok(None)));
        assert_eq!(sub.channels(), &[a.clone(), b.clone(), c.clone()]);
        assert!(sub.remove(&a));
        assert!(!sub.remove(&a));
        assert_eq!(sub.channels(), &[c.clone(), b.clone()]);
        assert!(sub.remove(&b) && sub.remove(&c));
        assert!(sub.channels().is_empty());
        // Alone again (inline), and still fed by the hub.
        assert!(matches!(sub.add(&b, &Since::Now).await, Ok(Some(_))));
        assert_eq!(sub.channels(), std::slice::from_ref(&b));
        let data = || crate::message::Data::Text(bytes::Bytes::from_static(b"x"));
        node.publish(&a, None, data())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        node.publish(&b, None, data())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut got = Vec::new();
        sub.drain(|e, _| {
            if let Event::Message(m) = e {
                got.push(m.channel.clone());
            }
        })
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(got, [b]);
    }

    #[tokio::test]
    async fn a_replay_is_handed_out_in_pages_of_the_queue_budget() {
        let node = Node::memory(Policies::default());
        let c = ChannelName::new("paged").unwrap_or_else(|e| panic!("{e}"));
        for _ in 0..10 {
            let data = crate::message::Data::Text(bytes::Bytes::from(vec![b'x'; 1000]));
            node.publish(&c, None, data)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        // Room for three messages of 1000 + 160 bytes per page; `history` beyond what the
        // namespace keeps (100) is capped.
        let mut sub = node
            .subscribe(
                std::slice::from_ref(&c),
                &Start::Last(usize::MAX),
                3500,
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut pages = Vec::new();
        loop {
            let mut offsets = Vec::new();
            let n = sub
                .drain(|e, _| {
                    if let Event::Message(m) = e {
                        offsets.push(m.offset);
                    }
                })
                .unwrap_or_else(|e| panic!("{e:?}"));
            if n == 0 {
                break;
            }
            pages.push(offsets);
        }
        assert_eq!(
            pages,
            vec![vec![1, 2, 3], vec![4, 5, 6], vec![7, 8, 9], vec![10]]
        );
    }

    #[tokio::test]
    async fn a_connection_s_sessions_take_its_queue_in_turn_and_none_hears_the_last_one_s_channels()
    {
        let node = Node::memory(Policies::default());
        let name = |n: &str| ChannelName::new(n).unwrap_or_else(|e| panic!("{e}"));
        let (a, b) = (name("a"), name("b"));
        let data = || crate::message::Data::Text(bytes::Bytes::from_static(b"x"));
        let kill = crate::kill::Kill::new();
        let mut first = node
            .subscribe_on(
                std::slice::from_ref(&a),
                &Start::Now,
                kill.claim(1 << 20),
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        first.follow_lifecycle(Some(Tick::Heartbeat));
        // An overlapping session gets a queue of its own.
        let other = node.session_on(kill.claim(1 << 20), true, None);
        assert!(!Arc::ptr_eq(&other.queue, &first.queue));
        drop(other);
        node.publish(&a, None, data())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        drop(first);
        let mut second = node
            .subscribe_on(
                std::slice::from_ref(&b),
                &Start::Now,
                kill.claim(1 << 20),
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(Arc::ptr_eq(&second.queue, kill.queue()));
        // It follows no tick: the last session's does not carry over.
        second.follow_lifecycle(None);
        for part in 0..1024 {
            node.hub.tick_part(Tick::Heartbeat, part);
        }
        node.publish(&a, None, data())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        node.publish(&b, None, data())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut got = Vec::new();
        second
            .drain(|e, _| {
                if let Event::Message(m) = e {
                    got.push(m.channel.clone());
                }
            })
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(got, [b]);
        assert!(!second.take_tick());
    }
}
