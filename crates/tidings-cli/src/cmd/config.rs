//! `tidings config default` prints the commented default configuration;
//! `tidings config check [FILE]` validates one (default: the global `--config`);
//! `tidings config explain KEY` prints a key's default, environment variable and meaning.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use tidings_server::config::{Config, DEFAULT_TOML};

#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Print the default configuration, every key commented.
    Default,
    /// Validate a configuration file (with TIDINGS_* variables applied).
    Check {
        /// The file to check; defaults to --config.
        file: Option<PathBuf>,
    },
    /// Explain one key: its default, its environment variable and what it does.
    Explain {
        /// `table.key` (e.g. `server.write_timeout`) or a key name unique across tables.
        key: String,
    },
}

pub fn run(cmd: ConfigCommand, config_path: Option<&Path>) -> anyhow::Result<()> {
    match cmd {
        ConfigCommand::Default => {
            print!("{DEFAULT_TOML}");
            Ok(())
        }
        ConfigCommand::Explain { key } => {
            let text = tidings_server::config_keys::explain(&key).map_err(anyhow::Error::msg)?;
            print!("{text}");
            Ok(())
        }
        ConfigCommand::Check { file } => {
            let Some(path) = file.as_deref().or(config_path) else {
                bail!(
                    "name a file: `tidings config check FILE` or `tidings --config FILE config check`"
                );
            };
            let config = Config::load(Some(path), std::env::vars())
                .with_context(|| format!("{} is not valid", path.display()))?;
            // What `serve` would refuse at start: key files, secret lengths, TLS settings.
            tidings_server::auth::Auth::from_config(&config.auth)
                .with_context(|| format!("{}: [auth]", path.display()))?;
            tidings_server::tls::from_config(&config)
                .with_context(|| format!("{}: TLS settings", path.display()))?;
            println!(
                "ok: {} (listen {}, broker {}, auth {}, {} namespace override(s))",
                path.display(),
                config.server.listen,
                config.broker.masked_url(),
                if config.auth.enabled() {
                    "on"
                } else {
                    "off (open mode)"
                },
                config.namespaces.len()
            );
            Ok(())
        }
    }
}
