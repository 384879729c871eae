//! Presence: who follows a channel, where its namespace keeps track (`presence = true`), and
//! the join/leave events sent to subscribers where it asks for them (`join_leave = true`).
//!
//! Presence lives in the broker (a Redis broker keeps it cluster-wide); it is not history:
//! a join or leave has no offset and is never replayed.

use serde::Serialize;

use crate::channel::ChannelName;

/// One connected client as presence lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClientInfo {
    /// Unique per connection.
    pub client: String,
    /// The authenticated user (the token's `sub`), when there is one.
    pub user: Option<String>,
}

impl ClientInfo {
    /// A client with a fresh random id.
    pub fn anonymous() -> Self {
        Self {
            client: Self::drawn(rand::random::<u64>()),
            user: None,
        }
    }

    /// The id `anonymous` makes of its random number.
    pub(crate) fn drawn(id: u64) -> String {
        format!("{id:016x}")
    }

    /// The number an id made by `drawn` was made of: `None` for any other text, so that
    /// `drawn(drawn_id(s)?) == s`.
    pub(crate) fn drawn_id(client: &str) -> Option<u64> {
        let digits = client.len() == 16
            && client
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        digits
            .then(|| u64::from_str_radix(client, 16).ok())
            .flatten()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceKind {
    Join,
    Leave,
}

impl PresenceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceKind::Join => "join",
            PresenceKind::Leave => "leave",
        }
    }
}

/// A join or leave, as delivered to the channel's subscribers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceEvent {
    pub kind: PresenceKind,
    pub channel: ChannelName,
    pub info: ClientInfo,
}

impl PresenceEvent {
    /// `{"channel","client","user"}`; transports add their own `type` or event name.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "channel": self.channel.as_str(),
            "client": self.info.client,
            "user": self.info.user,
        })
    }
}
