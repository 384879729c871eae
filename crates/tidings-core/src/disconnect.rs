//! Why the server ends a session on purpose. A disconnect is data, not an error: it is sent
//! to the client (SSE `tidings.disconnect`, NDJSON `{"type":"disconnect"}`, a WebSocket frame)
//! and tells it whether reconnecting makes sense.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DisconnectReason {
    /// The session's outbound queue overflowed: it read too slowly.
    Slow,
    /// The server is shutting down.
    Shutdown,
    /// The broker cannot be reached.
    BrokerUnavailable,
    /// The session's credentials expired.
    TokenExpired,
}

impl DisconnectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Slow => "slow",
            Self::Shutdown => "shutdown",
            Self::BrokerUnavailable => "broker_unavailable",
            Self::TokenExpired => "token_expired",
        }
    }

    /// Every reason today is transient for the client: it resumes from its cursor.
    pub fn reconnect(self) -> bool {
        match self {
            Self::Slow | Self::Shutdown | Self::BrokerUnavailable | Self::TokenExpired => true,
        }
    }
}

/// The JSON body carried by every transport's disconnect record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Disconnect {
    pub reason: DisconnectReason,
    pub reconnect: bool,
    /// How long the client should wait before reconnecting, in milliseconds: a shutdown spreads
    /// its clients' returns over `reconnect_spread` instead of having them all come back at
    /// once (SPEC §13). Absent: reconnect with the client's own backoff.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconnect_after_ms: Option<u64>,
}

impl Disconnect {
    /// `reason`, with the advice to wait `ms` before reconnecting.
    pub fn after(reason: DisconnectReason, ms: u64) -> Self {
        Self {
            reconnect_after_ms: Some(ms),
            ..reason.into()
        }
    }
}

impl From<DisconnectReason> for Disconnect {
    fn from(reason: DisconnectReason) -> Self {
        Self {
            reason,
            reconnect: reason.reconnect(),
            reconnect_after_ms: None,
        }
    }
}
