//! Transports: how subscribers receive messages. One file per transport; `stream.rs` holds
//! the lifecycle that SSE and NDJSON streaming share, `params.rs` the subscribe parameters
//! every HTTP transport accepts.

pub mod due;
pub mod http_stream;
pub mod long_poll;
pub mod params;
pub mod short_poll;
pub mod sse;
pub mod stream;
pub mod websocket;
pub mod ws_socket;

/// The one spelling of a transport used in config, metrics labels, logs and file names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
// One byte: it sits beside a 32-bit count in every session's gauge (`metrics::SessionGauge`).
#[repr(u8)]
pub enum TransportKind {
    WebSocket = 0,
    Sse = 1,
    HttpStream = 2,
    LongPoll = 3,
    ShortPoll = 4,
}

impl TransportKind {
    pub const ALL: [TransportKind; 5] = [
        TransportKind::WebSocket,
        TransportKind::Sse,
        TransportKind::HttpStream,
        TransportKind::LongPoll,
        TransportKind::ShortPoll,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::WebSocket => "websocket",
            TransportKind::Sse => "sse",
            TransportKind::HttpStream => "http_stream",
            TransportKind::LongPoll => "long_poll",
            TransportKind::ShortPoll => "short_poll",
        }
    }
}

/// `Message::cached_frame` slots, one per transport framing that can be shared. (A poll's
/// one-message reply has none: `Message::poll_reply` keeps it with the envelope.)
pub mod frame_slot {
    pub const SSE_RAW: usize = 0;
    pub const SSE_ENVELOPE: usize = 1;
    pub const NDJSON: usize = 2;
    pub const WS_ENVELOPE: usize = 3;
    pub const WS_RAW: usize = 4;
    /// A Pusher protocol event (`crate::pusher`).
    pub const PUSHER: usize = 5;
}
