//! The thin `tidings` binary: parses the command line and hands over to the library crates.

mod client;
mod cmd;
mod logging;
mod notify;
mod tls;
mod ws;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// glibc's, with small over-aligned blocks (tokio's task cells and socket registrations) from
/// slabs: see `crates/tidings-alloc`.
#[global_allocator]
static ALLOC: tidings_alloc::Slabs = tidings_alloc::Slabs::new();

/// Tidings: a real-time push server (WebSocket, SSE, HTTP streaming, long and short polling).
#[derive(Debug, Parser)]
#[command(name = "tidings", version, about)]
struct Cli {
    /// Configuration file (TOML); TIDINGS_<TABLE>__<KEY> variables and flags override it.
    #[arg(long, global = true, env = "TIDINGS_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve(cmd::serve::ServeArgs),
    /// Publish one message to a channel.
    Publish(cmd::publish::PublishArgs),
    /// Follow channels and print their messages as NDJSON; reconnects and resumes by itself.
    Subscribe(cmd::subscribe::SubscribeArgs),
    /// Mint a JWT from the configured secret (or a private key) for testing and backends.
    Token(cmd::token::TokenArgs),
    /// Print or check the configuration.
    #[command(subcommand)]
    Config(cmd::config::ConfigCommand),
    /// Check this machine and configuration before serving: one line per check (ok, warn,
    /// FAIL) with what to fix; exits 1 when a check failed.
    Doctor(cmd::doctor::DoctorArgs),
    /// Load-test a push server (Tidings, Nchan or Pushpin); prints one JSON line.
    Bench(cmd::bench::BenchArgs),
}

/// `[server] runtime_event_interval` (read as the log format is, before the runtime exists):
/// a file that does not load leaves tokio's default, and `serve` then reports the file.
fn event_interval(config: Option<&std::path::Path>) -> u32 {
    tidings_server::config::Config::load(config, std::env::vars())
        .map(|c| c.server.runtime_event_interval)
        .ok()
        .filter(|&n| n > 0)
        .unwrap_or(tidings_server::config::DEFAULT_EVENT_INTERVAL)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(logging::format(cli.config.as_deref()));
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if matches!(cli.command, Command::Serve(_)) {
        builder.event_interval(event_interval(cli.config.as_deref()));
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = cli.config.as_deref();
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => cmd::serve::run(args, config).await,
            Command::Publish(args) => cmd::publish::run(args).await,
            Command::Subscribe(args) => cmd::subscribe::run(args).await,
            Command::Config(c) => cmd::config::run(c, config),
            Command::Token(args) => cmd::token::run(args, config),
            Command::Doctor(args) => cmd::doctor::run(args, config).await,
            Command::Bench(args) => cmd::bench::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the context chain on one line; a backtrace helps nobody here.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
