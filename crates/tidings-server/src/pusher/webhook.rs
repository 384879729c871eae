//! The webhook sender: one task per app with a `webhook_url`, taking batches from the app's
//! bounded queue (`tidings_pusher::webhooks`), POSTing them signed, retrying with backoff.
//!
//! The request is HTTP/1.1 written here, over TCP for `http://` and over TLS (rustls) for
//! `https://`: the server crate has no HTTP client, and a webhook is one small POST whose
//! status is all that is read. The certificate is checked against the system's roots
//! (`rustls-native-certs`, read once per process; `SSL_CERT_FILE`/`SSL_CERT_DIR` are honoured)
//! plus the app's `webhook_ca_file`, with the URL's host as SNI and as the name checked. A
//! certificate that fails is a failed delivery like a refused connection: counted, logged with
//! the reason, retried. Every step is bounded in time; a batch out of retries is dropped and
//! counted (`tidings_pusher_webhooks_dropped_total`), so a dead endpoint never grows memory.
//!
//! The endpoint (address, TLS settings, CA file) is read when the app's sender starts: at
//! startup and when a reload adds or changes the app. `check` reads it the same way first, so
//! a bad URL or CA file refuses the configuration instead of failing every delivery.
//!
//! Once per cluster: the node whose roster call saw a change (first subscriber, last member,
//! a dead node's reap) queues its webhook, and only that node (`tidings_pusher::registry`).

use std::io;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tidings_pusher::webhooks::{self, WebhookQueue};
use tidings_pusher::{App, PusherConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;
use crate::state::AppState;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// From the connection to the status line, the TLS handshake included.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where one app's webhooks go, read from its `webhook_url` and `webhook_ca_file`.
struct Endpoint {
    /// `host:port` to connect to.
    addr: String,
    /// The URL's authority as written, for the `host` header.
    authority: String,
    path: String,
    /// `https://`: the TLS settings and the name the certificate must carry (also the SNI).
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

/// Refuses a configuration whose webhook URLs or CA files cannot be used (at startup and on
/// reload, before anything changes).
pub fn check(config: &PusherConfig) -> Result<(), ConfigError> {
    for (i, app) in config.apps.iter().enumerate() {
        if let Some(url) = &app.webhook_url {
            endpoint(url, app.webhook_ca_file.as_deref())
                .map_err(|e| ConfigError::Invalid(format!("pusher.apps[{i}]: {e}")))?;
        }
    }
    Ok(())
}

fn endpoint(url: &str, ca_file: Option<&Path>) -> Result<Endpoint, String> {
    let target =
        split_url(url).ok_or_else(|| format!("webhook_url = {url:?} is not a URL with a host"))?;
    let tls = if target.tls {
        let name = ServerName::try_from(target.name.to_owned())
            .map_err(|e| format!("webhook_url = {url:?}: host {:?}: {e}", target.name))?;
        Some((TlsConnector::from(client_config(ca_file)?), name))
    } else {
        None
    };
    Ok(Endpoint {
        addr: target.addr,
        authority: target.authority.to_owned(),
        path: target.path.to_owned(),
        tls,
    })
}

/// The system's CA certificates, read once: every https sender shares them.
fn system_roots() -> &'static rustls::RootCertStore {
    static ROOTS: OnceLock<rustls::RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::debug!(error = %e, "reading the system's CA certificates");
        }
        let mut roots = rustls::RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            tracing::warn!(
                ignored,
                "no system CA certificates found: https:// webhooks trust only their webhook_ca_file"
            );
        }
        roots
    })
}

fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = system_roots().clone();
    if let Some(path) = ca_file {
        let at = || format!("webhook_ca_file = {:?}", path.display());
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", at()))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {e}", at()))?;
        if certs.is_empty() {
            return Err(format!("{}: no certificate in it", at()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| format!("{}: {e}", at()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS settings: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

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
        // `check` has read the same URL and file; should the file have gone since, every
        // delivery fails with the reason rather than the app going without a sender.
        let endpoint = endpoint(url, app.config.webhook_ca_file.as_deref());
        if let Err(e) = &endpoint {
            tracing::error!(app = %app.config.id, error = %e, "webhook endpoint unusable");
        }
        let (app, queue, shutdown) = (app.clone(), queue.clone(), state.shutdown.clone());
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
                _ = run(app.clone(), queue, endpoint, shutdown) => {}
                _ = retired => {}
            }
        });
    }
}

async fn run(
    app: Arc<App>,
    queue: Arc<WebhookQueue>,
    endpoint: Result<Endpoint, String>,
    shutdown: CancellationToken,
) {
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
            let outcome = match &endpoint {
                Ok(endpoint) => post(endpoint, &app.config.key, &signature, &body)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.clone()),
            };
            match outcome {
                Ok(status) if (200..300).contains(&status) => {
                    app.counters.webhooks_sent.fetch_add(1, Relaxed);
                    break;
                }
                outcome => {
                    attempt += 1;
                    app.counters.webhooks_failed.fetch_add(1, Relaxed);
                    let reason = match outcome {
                        Ok(status) => format!("answered {status}"),
                        Err(e) => e,
                    };
                    tracing::warn!(app = %app.config.id, attempt, %reason, "webhook not accepted");
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

/// A webhook URL taken apart.
#[derive(Debug, PartialEq, Eq)]
struct Target<'a> {
    tls: bool,
    /// `host:port`, the scheme's port when the URL names none.
    addr: String,
    /// `host[:port]` as written (the `host` header).
    authority: &'a str,
    /// The host alone, without an IPv6 literal's brackets (SNI and the certificate's name).
    name: &'a str,
    path: &'a str,
}

/// `http[s]://host[:port][/path]` → its parts; `None` for anything else (user info included:
/// a webhook sends no credentials but its signature).
fn split_url(url: &str) -> Option<Target<'_>> {
    let (tls, rest) = match url.strip_prefix("https://") {
        Some(rest) => (true, rest),
        None => (false, url.strip_prefix("http://")?),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains(['@', '?', '#']) {
        return None;
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':')?)),
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().ok()?,
        None if tls => 443,
        None => 80,
    };
    if host.is_empty() {
        return None;
    }
    let addr = if authority.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Some(Target {
        tls,
        addr,
        authority,
        name: host,
        path,
    })
}

/// POSTs one batch; returns the response's status.
async fn post(endpoint: &Endpoint, key: &str, signature: &str, body: &str) -> io::Result<u16> {
    let timed_out = |what: &str| io::Error::new(io::ErrorKind::TimedOut, what.to_owned());
    let request = format!(
        "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\nx-pusher-key: {key}\r\nx-pusher-signature: {signature}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        endpoint.path,
        endpoint.authority,
        body.len()
    );
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(&endpoint.addr),
    )
    .await
    .map_err(|_| timed_out("connecting timed out"))??;
    tokio::time::timeout(RESPONSE_TIMEOUT, async {
        match &endpoint.tls {
            None => exchange(tcp, request.as_bytes()).await,
            Some((connector, name)) => {
                let tls = connector.connect(name.clone(), tcp).await?;
                exchange(tls, request.as_bytes()).await
            }
        }
    })
    .await
    .map_err(|_| timed_out("no answer within 10 s"))?
}

/// Writes `request`, reads up to the status line and returns the status.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    request: &[u8],
) -> io::Result<u16> {
    stream.write_all(request).await?;
    // TLS buffers what is written: without a flush the request may sit in rustls.
    stream.flush().await?;
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
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no status line"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn webhook_urls_split_into_address_authority_name_and_path() {
        let t = split_url("http://127.0.0.1:9000/hook").unwrap();
        assert_eq!(
            (t.tls, t.addr.as_str(), t.authority, t.name, t.path),
            (
                false,
                "127.0.0.1:9000",
                "127.0.0.1:9000",
                "127.0.0.1",
                "/hook"
            )
        );
        let t = split_url("http://example.test").unwrap();
        assert_eq!((t.addr.as_str(), t.path), ("example.test:80", "/"));
        let t = split_url("https://hooks.example.test/p?x=1").unwrap();
        assert_eq!(
            (t.tls, t.addr.as_str(), t.name, t.path),
            (
                true,
                "hooks.example.test:443",
                "hooks.example.test",
                "/p?x=1"
            )
        );
        let t = split_url("https://[::1]:8443/h").unwrap();
        assert_eq!((t.addr.as_str(), t.name), ("[::1]:8443", "::1"));
        let t = split_url("https://[::1]").unwrap();
        assert_eq!(t.addr, "[::1]:443");
        for bad in [
            "ftp://x/",
            "https:///h",
            "https://u:p@x/",
            "https://x:port/",
            "https://x:99999/",
            "https://[::1/",
            "https://:443/",
        ] {
            assert_eq!(split_url(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_unreadable_or_empty_ca_file_refuses_the_configuration_with_the_key_named() {
        let e = endpoint("https://x/", Some(Path::new("/nonexistent/ca.pem")))
            .err()
            .unwrap();
        assert!(e.contains("webhook_ca_file"), "{e}");
        let dir = std::env::temp_dir().join(format!("tidings-hook-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = endpoint("https://x/", Some(&empty)).err().unwrap();
        assert!(e.contains("no certificate"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(endpoint("http://x/", None).unwrap().tls.is_none());
        assert!(endpoint("https://x/", None).unwrap().tls.is_some());
    }
}
