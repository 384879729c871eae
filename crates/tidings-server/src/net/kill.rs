//! A connection's kill switch (`tidings_core::kill`): the session queue that fires it on
//! overflow holds it — or is it: the switch is the connection's queue, which its sessions
//! claim in turn (`session_queue`), so it is the core's type.

use std::sync::Arc;

pub use tidings_core::kill::Kill;
use tidings_core::queue::SessionQueue;

/// The queue for a session on `conn`: on HTTP/1.1 the connection's own (made with its kill
/// switch at accept, claimed, given back when the session's subscription drops; a fresh one
/// if another session holds it), and a fresh one for an HTTP/2 stream (many at once) or a
/// session without a connection.
pub fn session_queue(conn: Option<&super::ConnectionCtx>, max_bytes: usize) -> Arc<SessionQueue> {
    match conn.filter(|c| !c.http2) {
        Some(c) => c.kill.claim(max_bytes),
        None => SessionQueue::new(max_bytes),
    }
}
