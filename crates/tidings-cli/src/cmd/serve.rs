//! `tidings serve`: load the configuration, refuse unsafe setups, bind, serve until a signal.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, bail};
use tidings_server::config::{Config, parse_listen};
use tidings_server::{AppState, serve};

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
    config.validate().context("checking the configuration")?;

    let addr = parse_listen(&config.server.listen).with_context(|| {
        format!(
            "server.listen = {:?} is not an address",
            config.server.listen
        )
    })?;
    if config.auth.enabled() {
        bail!(
            "[auth] is configured, but this build does not enforce authentication yet; \
             refusing to start rather than serve those channels openly"
        );
    }
    if !is_loopback(&addr) && !config.server.insecure {
        bail!(
            "refusing to listen on {addr} in open mode (no [auth]): anyone could publish and subscribe. \
             Listen on 127.0.0.1, configure [auth], or pass --insecure"
        );
    }
    tracing::warn!(
        "open mode: no [auth] configured, anyone who can connect may publish and subscribe"
    );

    let state = AppState::new(config).context("starting the broker")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr().context("reading the bound address")?;
    // Printed on stderr in a fixed form: scripts and tests read the port from it.
    eprintln!("tidings listening on http://{local}");
    tracing::info!(%local, "listening (HTTP/1.1 and h2c)");
    serve(state, listener, shutdown_signal())
        .await
        .context("serving")?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}
