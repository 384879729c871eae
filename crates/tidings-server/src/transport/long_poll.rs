//! Long polling: hold a poll until at least one message (or gap) exists, the wait runs out, or
//! the server shuts down. The subscription was registered before history was read, so a
//! message published at any moment after the request arrived ends the wait.

use std::time::Duration;

use tidings_core::Subscription;
use tokio_util::sync::CancellationToken;

use crate::metrics::SessionGauge;
use crate::transport::short_poll::PollReply;

pub async fn wait(
    sub: &mut Subscription,
    gauge: &SessionGauge,
    reply: &mut PollReply,
    wait: Duration,
    shutdown: &CancellationToken,
) {
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    while reply.is_empty() && !reply.ended() {
        let ready = tokio::select! {
            biased;
            _ = shutdown.cancelled() => false,
            _ = &mut deadline => false,
            _ = sub.ready() => true,
        };
        if !ready {
            return;
        }
        reply.collect(sub, gauge);
    }
}
