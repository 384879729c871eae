//! `tidings token`: mints a JWT for testing and for backends that hand tokens to browsers,
//! signed with the configured `auth.jwt_secret` (HS256) or a private key file (RS256/ES256).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use tidings_server::auth::jwt::{Claims, Grants, mint_hs256, mint_with_private_key};
use tidings_server::config::parse_duration;

#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// The user (`sub` claim), shown in presence.
    #[arg(long)]
    pub sub: Option<String>,
    /// Channels the token may subscribe to: exact names or `*` globs (repeatable).
    #[arg(long)]
    pub subscribe: Vec<String>,
    /// Channels the token may publish to (repeatable).
    #[arg(long)]
    pub publish: Vec<String>,
    /// How long the token is valid, e.g. 1h, 30m, 7d.
    #[arg(long, default_value = "1h")]
    pub ttl: String,
    /// Sign with this RSA or EC private key (PEM) instead of the config's jwt_secret.
    #[arg(long)]
    pub private_key: Option<PathBuf>,
}

pub fn run(args: TokenArgs, config_path: Option<&Path>) -> anyhow::Result<()> {
    let ttl = parse_duration(&args.ttl).map_err(anyhow::Error::msg)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("reading the clock")?
        .as_secs();
    let claims = Claims {
        sub: args.sub,
        exp: Some(now + ttl.as_secs()),
        nbf: None,
        iat: Some(now),
        tidings: Grants {
            subscribe: args.subscribe,
            publish: args.publish,
        },
    };
    let token = match args.private_key {
        Some(path) => {
            let pem =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            mint_with_private_key(&pem, &claims).map_err(anyhow::Error::msg)?
        }
        None => {
            let config = crate::cmd::serve::load_config(config_path)?;
            let Some(secret) = config.auth.jwt_secret else {
                bail!(
                    "no auth.jwt_secret in the configuration: pass --config with one, or --private-key FILE"
                );
            };
            mint_hs256(&secret.0, &claims).map_err(anyhow::Error::msg)?
        }
    };
    println!("{token}");
    Ok(())
}
