//! The webhook sender: one task per app with a `webhook_url`, taking batches from the app's
//! bounded queue (`tidings_pusher::webhooks`), POSTing them signed, retrying with backoff.
//!
//! The request is plain HTTP/1.1 written here (`http://` URLs only, checked at startup): the
//! server crate has no HTTP client, and a webhook is one small POST whose status is all that
//! is read. Every step is bounded in time; a batch out of retries is dropped and counted
//! (`tidings_pusher_webhooks_dropped_total`), so a dead endpoint never grows memory.
//!
//! Once per cluster: the node whose roster call saw a change (first subscriber, last member,
//! a dead node's reap) queues its webhook, and only that node (`tidings_pusher::registry`).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tidings_pusher::App;
use tidings_pusher::webhooks::{self, WebhookQueue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts a sender for every app that has a webhook URL.
pub fn spawn_all(state: &AppState) {
    for app in state.pusher.iter() {
        spawn_for(state, &app);
    }
}

/// Starts `app`'s sender if it has a webhook URL (at start, and for apps a reload adds).
/// It ends with the server, or when a reload retires the app.
pub fn spawn_for(state: &AppState, app: &Arc<App>) {
    if let (Some(queue), Some(url)) = (&app.webhooks, &app.config.webhook_url) {
        let (app, queue, url, shutdown) = (
            app.clone(),
            queue.clone(),
            url.clone(),
            state.shutdown.clone(),
        );
        tokio::spawn(async move {
            let retired = app.clone();
            let retired = async {
                let wait = retired.retire_notify.notified();
                tokio::pin!(wait);
                wait.as_mut().enable();
                if !retired.is_retired() {
                    wait.await;
                }
            };
            tokio::select! {
                _ = run(app.clone(), queue, url, shutdown) => {}
                _ = retired => {}
            }
        });
    }
}

async fn run(app: Arc<App>, queue: Arc<WebhookQueue>, url: String, shutdown: CancellationToken) {
    loop {
        if queue.is_empty() {
            tokio::select! {
                _ = queue.wake.notified() => {}
                _ = shutdown.cancelled() => return,
            }
        }
        // Events that come together go together.
        tokio::select! {
            _ = tokio::time::sleep(webhooks::BATCH_DELAY) => {}
            _ = shutdown.cancelled() => return,
        }
        let batch = queue.take_batch();
        if batch.is_empty() {
            continue;
        }
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let body = webhooks::body(time_ms, &batch);
        let signature = webhooks::signature(&app.config.secret.0, &body);
        let mut attempt = 0;
        loop {
            match post(&url, &app.config.key, &signature, &body).await {
                Ok(status) if (200..300).contains(&status) => {
                    app.counters.webhooks_sent.fetch_add(1, Relaxed);
                    break;
                }
                outcome => {
                    attempt += 1;
                    app.counters.webhooks_failed.fetch_add(1, Relaxed);
                    tracing::debug!(app = %app.config.id, attempt, ?outcome, "webhook not accepted");
                    if attempt > webhooks::RETRIES {
                        tracing::warn!(app = %app.config.id, events = batch.len(), "webhook batch dropped after retries");
                        queue.drop_batch(batch.len());
                        break;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(webhooks::backoff(attempt)) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }
}

/// `http://host[:port]/path` → (`host:port`, `host`, `/path`).
fn split_url(url: &str) -> Option<(String, &str, &str)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return None;
    }
    let addr = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Some((addr, authority, path))
}

/// POSTs one batch; returns the response's status.
async fn post(url: &str, key: &str, signature: &str, body: &str) -> std::io::Result<u16> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad webhook URL");
    let (addr, host, path) = split_url(url).ok_or_else(bad)?;
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)??;
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\nx-pusher-key: {key}\r\nx-pusher-signature: {signature}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tokio::time::timeout(RESPONSE_TIMEOUT, async {
        stream.write_all(request.as_bytes()).await?;
        let mut head = Vec::with_capacity(64);
        let mut byte = [0u8; 256];
        while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
            let n = stream.read(&mut byte).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&byte[..n]);
        }
        let line = String::from_utf8_lossy(&head);
        line.split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no status line"))
    })
    .await
    .map_err(|_| std::io::ErrorKind::TimedOut)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls_split_into_address_host_and_path() {
        assert_eq!(
            split_url("http://127.0.0.1:9000/hook"),
            Some(("127.0.0.1:9000".into(), "127.0.0.1:9000", "/hook"))
        );
        assert_eq!(
            split_url("http://example.test"),
            Some(("example.test:80".into(), "example.test", "/"))
        );
        assert_eq!(split_url("https://x/"), None);
    }
}
