//! `tidings serve`: load the configuration, refuse unsafe setups, bind, serve until a signal.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, bail};
use tidings_server::AppState;
use tidings_server::config::{Config, parse_listen};

#[derive(Clone, Debug, clap::Args)]
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
    /// Serve this directory at / beside the API (overrides server.static_dir).
    #[arg(long = "static", value_name = "DIR")]
    pub static_dir: Option<std::path::PathBuf>,
    /// "auto", "hints" or "off": what a page's stylesheets and scripts are sent ahead as
    /// (overrides server.push).
    #[arg(long, value_name = "MODE")]
    pub push: Option<String>,
}

/// Loads the config file (if any) with `TIDINGS_*` variables from the environment.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    Config::load(path, std::env::vars()).context("loading the configuration")
}

fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// The first address open mode (no `[auth]`) would listen on beyond loopback, if any.
pub(crate) fn open_mode_exposure(
    config: &Config,
    listen: SocketAddr,
    tls: Option<SocketAddr>,
) -> Option<SocketAddr> {
    if config.auth.enabled() {
        return None;
    }
    std::iter::once(listen).chain(tls).find(|a| !is_loopback(a))
}

/// The file (or defaults), the environment, then the flags: at start and at every reload, so
/// a reload sees the same overrides the server started with.
pub(crate) fn effective_config(
    args: &ServeArgs,
    config_path: Option<&Path>,
) -> anyhow::Result<Config> {
    let mut config = load_config(config_path)?;
    let args = args.clone();
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
    if args.static_dir.is_some() {
        config.server.static_dir = args.static_dir;
    }
    if let Some(push) = args.push {
        config.server.push = match push.as_str() {
            "auto" => tidings_server::config::PushMode::Auto,
            "hints" => tidings_server::config::PushMode::Hints,
            "off" => tidings_server::config::PushMode::Off,
            other => bail!("--push {other:?}: expected auto, hints or off"),
        };
    }
    if args.demo {
        tidings_server::demo::configure(&mut config);
    }
    config.validate().context("checking the configuration")?;
    Ok(config)
}

pub async fn run(args: ServeArgs, config_path: Option<&Path>) -> anyhow::Result<()> {
    let config = effective_config(&args, config_path)?;

    let addr = parse_listen(&config.server.listen).with_context(|| {
        format!(
            "server.listen = {:?} is not an address",
            config.server.listen
        )
    })?;
    let tls = tidings_server::tls::from_config(&config).context("setting up TLS")?;
    if !config.auth.enabled() {
        let exposed = open_mode_exposure(&config, addr, tls.as_ref().map(|(a, _)| *a));
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
    // The handlers are in place before anyone hears we listen (the announcement below,
    // systemd's READY=1): a SIGTERM right after either must drain, and a SIGHUP reload, not
    // kill the process by the default action.
    let stops = stop_signals();
    let hangups = hangup_signals();
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
    tokio::spawn(reload_on_hangup(
        hangups,
        state.clone(),
        args.clone(),
        config_path.map(Path::to_path_buf),
    ));
    crate::notify::notify("READY=1");
    let drain = tidings_server::lifecycle::drain(state.clone(), stops);
    tidings_server::serve_all(state, listener, tls, drain)
        .await
        .context("serving")?;
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP, registered now (not when first polled); `None` if it cannot be.
fn hangup_signals() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot listen for SIGHUP ({e}): reloading is off");
            None
        }
    }
}

/// Reloads the configuration on every SIGHUP (`lifecycle::reload`). A file that does not load
/// or validate is refused with the reason in the log, and the running configuration stays.
async fn reload_on_hangup(
    hangups: Option<tokio::signal::unix::Signal>,
    state: AppState,
    args: ServeArgs,
    path: Option<std::path::PathBuf>,
) {
    let Some(mut hangups) = hangups else { return };
    while hangups.recv().await.is_some() {
        let loaded = effective_config(&args, path.as_deref()).and_then(|config| {
            tidings_server::lifecycle::reload(&state, config).context("checking the configuration")
        });
        match loaded {
            Ok(done) => tracing::info!(
                needs_restart = ?done.needs_restart,
                "configuration reloaded"
            ),
            Err(e) => tracing::error!(
                "configuration reload refused, the running configuration stays: {e:#}"
            ),
        }
    }
}

/// SIGTERM and SIGINT, registered now (not when first polled), each one a message: the first
/// starts the drain (and tells systemd STOPPING=1), a second ends it early
/// (`lifecycle::drain`).
fn stop_signals() -> tokio::sync::mpsc::Receiver<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).ok();
    let mut term = signal(SignalKind::terminate()).ok();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let name = tokio::select! {
                _ = recv(int.as_mut()) => "SIGINT",
                _ = recv(term.as_mut()) => "SIGTERM",
            };
            if std::mem::take(&mut first) {
                crate::notify::notify("STOPPING=1");
            }
            tracing::info!(signal = name, "stop signal: shutting down");
            if tx.send(()).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// The next delivery of `signal`; never, when it could not be registered.
async fn recv(signal: Option<&mut tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
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
