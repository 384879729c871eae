//! `tidings serve`: load the configuration, refuse unsafe setups, bind, serve until a signal.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, bail};
use tidings_server::AppState;
use tidings_server::config::{Config, parse_listen};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address for HTTP/1.1 and h2c (overrides server.listen), e.g. 127.0.0.1:8080; port 0 picks one.
    #[arg(long)]
    pub listen: Option<String>,
    /// `memory` (default) or a broker URL (overrides broker.url).
    #[arg(long)]
    pub broker: Option<String>,
    /// Directory for durable history (overrides broker.data_dir).
    #[arg(long)]
    pub data_dir: Option<std::path::PathBuf>,
    /// Allow open mode (no [auth]) on a non-loopback address.
    #[arg(long)]
    pub insecure: bool,
    /// Publish demo data (`demo:` channels) and enable presence for `chat:` (the web demos).
    #[arg(long)]
    pub demo: bool,
    /// Address of the TLS listener (ALPN h2, http/1.1); default 127.0.0.1:8443 when TLS is on.
    #[arg(long)]
    pub tls_listen: Option<String>,
    /// Certificate chain (PEM) for TLS; with --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) for TLS; with --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Serve TLS with a certificate generated at start, for development (browsers will warn).
    #[arg(long)]
    pub tls_self_signed: bool,
}

/// Loads the config file (if any) with `TIDINGS_*` variables from the environment.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    Config::load(path, std::env::vars()).context("loading the configuration")
}

fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

pub async fn run(args: ServeArgs, config_path: Option<&Path>) -> anyhow::Result<()> {
    let mut config = load_config(config_path)?;
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(broker) = args.broker {
        config.broker.url = broker;
    }
    if args.data_dir.is_some() {
        config.broker.data_dir = args.data_dir;
    }
    config.server.insecure |= args.insecure;
    if args.tls_listen.is_some() {
        config.server.tls_listen = args.tls_listen;
    }
    if args.tls_cert.is_some() {
        config.server.tls_cert = args.tls_cert;
        config.server.tls_key = args.tls_key;
    }
    config.server.tls_self_signed |= args.tls_self_signed;
    if args.demo {
        tidings_server::demo::configure(&mut config);
    }
    config.validate().context("checking the configuration")?;

    let addr = parse_listen(&config.server.listen).with_context(|| {
        format!(
            "server.listen = {:?} is not an address",
            config.server.listen
        )
    })?;
    let tls = tidings_server::tls::from_config(&config).context("setting up TLS")?;
    if !config.auth.enabled() {
        let exposed = std::iter::once(addr)
            .chain(tls.as_ref().map(|(a, _)| *a))
            .find(|a| !is_loopback(a));
        if let Some(addr) = exposed.filter(|_| !config.server.insecure) {
            bail!(
                "refusing to listen on {addr} in open mode (no [auth]): anyone could publish and subscribe. \
                 Listen on 127.0.0.1, configure [auth], or pass --insecure"
            );
        }
        tracing::warn!(
            "OPEN MODE: no [auth] configured, anyone who can connect may publish and subscribe; \
             configure [auth] api_keys / jwt_secret before exposing this server"
        );
    }

    let state = AppState::connect(config)
        .await
        .context("starting the server")?;
    if args.demo {
        tokio::spawn(tidings_server::demo::run(
            state.clone(),
            state.shutdown.clone(),
        ));
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr().context("reading the bound address")?;
    // Printed on stderr in a fixed form: scripts and tests read the port from it.
    announce(&format!("tidings listening on http://{local}"));
    tracing::info!(%local, "listening (HTTP/1.1 and h2c)");
    let tls = match tls {
        Some((tls_addr, acceptor)) => {
            let l = tokio::net::TcpListener::bind(tls_addr)
                .await
                .with_context(|| format!("binding {tls_addr} for TLS"))?;
            let local = l.local_addr().context("reading the bound TLS address")?;
            announce(&format!("tidings listening on https://{local}"));
            tracing::info!(%local, "listening (TLS: h2, http/1.1)");
            Some((l, acceptor))
        }
        None => None,
    };
    // The handlers are in place before systemd hears READY=1: a SIGTERM right after it must
    // drain, not kill the process by the default action.
    let shutdown = shutdown_signal();
    crate::notify::notify("READY=1");
    tidings_server::server::serve_all(state, listener, tls, shutdown)
        .await
        .context("serving")?;
    tracing::info!("stopped");
    Ok(())
}

/// Registers for SIGINT and SIGTERM now (not when first polled) and resolves on either.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).ok();
    let mut term = signal(SignalKind::terminate()).ok();
    async move {
        let wait = |s: Option<tokio::signal::unix::Signal>| async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = wait(int.take()) => {}
            _ = wait(term.take()) => {}
        }
        crate::notify::notify("STOPPING=1");
        tracing::info!("shutting down");
    }
}

/// One line on stderr in a single write: `eprintln!` writes its pieces separately, so a
/// reader polling the stream could see `…http://127.0.0` and take it for a whole address.
fn announce(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr()
        .lock()
        .write_all(format!("{line}\n").as_bytes());
}
