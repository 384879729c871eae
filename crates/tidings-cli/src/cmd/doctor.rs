//! `tidings doctor`: checks a machine and a configuration before `serve` meets them — the
//! configuration, the listen addresses, TLS files, the broker (Redis or the data dir), the
//! open-file limit, the access log and the static dir — and prints one line per check:
//! `ok`, `warn` or `FAIL`, each with what to fix. Exits 1 when anything failed.
//!
//! It reads what `serve` reads (same flags, `--config`, `TIDINGS_*`) through the same code:
//! `serve`'s effective configuration, the server's TLS setup, the Redis crate's connection
//! and the store's lock. It changes nothing, except creating a missing data dir as `serve`
//! would.

use std::fmt::Display;
use std::io::Write;
use std::path::Path;

use anyhow::bail;
use tidings_server::config::{Config, parse_listen};

use super::serve::{ServeArgs, effective_config, open_mode_exposure};

/// File descriptors a server needs beyond one per connection: listeners, the data dir's
/// segments, Redis connections, the access log, static files being sent.
const FD_HEADROOM: u64 = 256;

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Default)]
struct Report {
    failed: usize,
    warned: usize,
}

impl Report {
    fn line(&mut self, level: Level, what: &str, text: impl Display) {
        let tag = match level {
            Level::Ok => "ok  ",
            Level::Warn => {
                self.warned += 1;
                "warn"
            }
            Level::Fail => {
                self.failed += 1;
                "FAIL"
            }
        };
        // One line per check, whatever the message holds (TOML errors span lines).
        let text = text
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        // A closed stdout (`doctor | head`) must not panic; the exit code still tells.
        let _ = writeln!(std::io::stdout(), "{tag} {what}: {text}");
    }
}

pub async fn run(args: DoctorArgs, config_path: Option<&Path>) -> anyhow::Result<()> {
    let mut r = Report::default();
    let config = match effective_config(&args.serve, config_path) {
        Ok(c) => {
            r.line(
                Level::Ok,
                "config",
                format!(
                    "{} parses and validates",
                    config_path.map_or("the default configuration".to_owned(), |p| p
                        .display()
                        .to_string())
                ),
            );
            c
        }
        Err(e) => {
            r.line(
                Level::Fail,
                "config",
                format!("{e:#} (see `tidings config explain KEY`)"),
            );
            bail!("1 check failed: the configuration; nothing else was checked");
        }
    };
    check_listen(&mut r, &config);
    check_broker(&mut r, &config).await;
    check_nofile(&mut r, &config);
    check_files(&mut r, &config);
    if r.failed > 0 {
        bail!("{} check(s) failed, {} warning(s)", r.failed, r.warned);
    }
    let _ = writeln!(std::io::stdout(), "{} warning(s), nothing failed", r.warned);
    Ok(())
}

/// Auth, TLS and the listen addresses: bound and released again, so a taken one is named now
/// rather than when `serve` starts.
fn check_listen(r: &mut Report, config: &Config) {
    let Some(listen) = parse_listen(&config.server.listen) else {
        r.line(
            Level::Fail,
            "listen",
            format!(
                "server.listen = {:?} is not an address",
                config.server.listen
            ),
        );
        return;
    };
    let tls = match tidings_server::tls::from_config(config) {
        Ok(Some((addr, _))) => {
            r.line(
                Level::Ok,
                "tls",
                if config.server.tls_self_signed {
                    "self-signed certificate (development only: browsers warn)".to_owned()
                } else {
                    format!(
                        "certificate and key readable and matching ({})",
                        config
                            .server
                            .tls_cert
                            .as_deref()
                            .map_or(String::new(), |p| p.display().to_string())
                    )
                },
            );
            Some(addr)
        }
        Ok(None) => None,
        Err(e) => {
            r.line(
                Level::Fail,
                "tls",
                format!("{e} (fix server.tls_cert / server.tls_key)"),
            );
            None
        }
    };
    if config.auth.enabled() {
        r.line(Level::Ok, "auth", "configured");
    } else {
        match open_mode_exposure(config, listen, tls) {
            Some(addr) if config.server.insecure => r.line(
                Level::Warn,
                "auth",
                format!(
                    "open mode on {addr} (insecure = true): anyone who can connect may publish \
                     and subscribe; configure [auth] api_keys or jwt_secret"
                ),
            ),
            Some(addr) => r.line(
                Level::Fail,
                "auth",
                format!(
                    "open mode (no [auth]) on non-loopback {addr}: serve refuses this; configure \
                     [auth], listen on 127.0.0.1, or set server.insecure"
                ),
            ),
            None => r.line(
                Level::Ok,
                "auth",
                "open mode (no [auth]) on loopback only: fine for development",
            ),
        }
    }
    for (what, addr) in std::iter::once(("listen", listen)).chain(tls.map(|a| ("tls_listen", a))) {
        match std::net::TcpListener::bind(addr) {
            Ok(l) => {
                drop(l);
                r.line(Level::Ok, what, format!("{addr} can be bound"));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => r.line(
                Level::Fail,
                what,
                format!(
                    "{addr} is taken by another process ({e}); stop it (`ss -ltnp 'sport = :{}'` names it) or choose another server.{what}",
                    addr.port()
                ),
            ),
            Err(e) => r.line(
                Level::Fail,
                what,
                format!("{addr} cannot be bound: {e} (ports below 1024 need CAP_NET_BIND_SERVICE)"),
            ),
        }
    }
}

async fn check_broker(r: &mut Report, config: &Config) {
    let b = &config.broker;
    if tidings_redis::is_redis_broker_url(&b.url) {
        let mut options = tidings_redis::RedisOptions::from_url(&b.url, &b.prefix);
        options.tls_ca_file = b.tls_ca_file.clone();
        match tidings_redis::diagnose(&options).await {
            Ok(d) => {
                r.line(
                    Level::Ok,
                    "redis",
                    format!(
                        "{} reachable, {}, version {}",
                        b.masked_url(),
                        d.topology,
                        d.versions.join(", ")
                    ),
                );
                for note in d.notes {
                    r.line(Level::Ok, "redis", note);
                }
                for w in d.warnings {
                    r.line(Level::Warn, "redis", w);
                }
            }
            Err(e) => r.line(
                Level::Fail,
                "redis",
                format!(
                    "{e}: start Redis or fix broker.url (`redis-cli -u URL ping` should answer PONG)"
                ),
            ),
        }
    } else {
        r.line(
            Level::Ok,
            "broker",
            format!("{} (one node)", b.masked_url()),
        );
    }
    let Some(dir) = &b.data_dir else {
        if !tidings_redis::is_redis_broker_url(&b.url) {
            r.line(
                Level::Ok,
                "data_dir",
                "not set: history lives in memory and a restart loses it (set broker.data_dir to keep it)",
            );
        }
        return;
    };
    let existed = dir.exists();
    match tidings_store::probe(dir) {
        Ok(p) => r.line(
            Level::Ok,
            "data_dir",
            format!(
                "{} {}writable, not locked, {} segment(s), {} bytes{}",
                dir.display(),
                if existed { "" } else { "created, " },
                p.segments,
                p.bytes,
                p.version
                    .map(|v| format!(", format v{v}"))
                    .unwrap_or_default()
            ),
        ),
        Err(e @ tidings_store::OpenError::Locked { .. }) => r.line(
            Level::Fail,
            "data_dir",
            format!("{e}: stop that server or give this one another broker.data_dir"),
        ),
        Err(e) => r.line(Level::Fail, "data_dir", e),
    }
}

/// `RLIMIT_NOFILE` from `/proc/self/limits` (what `serve` would inherit from this shell or
/// unit): one descriptor per connection plus headroom.
fn check_nofile(r: &mut Report, config: &Config) {
    let Some((soft, hard)) = nofile_limits() else {
        r.line(
            Level::Warn,
            "nofile",
            "cannot read the open-file limit (/proc/self/limits)",
        );
        return;
    };
    let want = (config.server.max_connections as u64).saturating_add(FD_HEADROOM);
    let how = if hard >= want {
        format!(
            "raise it: `LimitNOFILE={want}` in the systemd unit, or `ulimit -n {want}` in the shell before `tidings serve`"
        )
    } else {
        format!(
            "raise it: `LimitNOFILE={want}` in the systemd unit (the hard limit {} caps `ulimit -n`; as root, \
             `ulimit -Hn {want}` or /etc/security/limits.conf)",
            show(hard)
        )
    };
    let line = format!(
        "open files soft {} / hard {}, max_connections {} + {FD_HEADROOM} headroom = {want}",
        show(soft),
        show(hard),
        config.server.max_connections
    );
    if soft >= want {
        r.line(Level::Ok, "nofile", line);
    } else if soft <= FD_HEADROOM {
        r.line(
            Level::Fail,
            "nofile",
            format!("{line}: too low to serve at all; {how}"),
        );
    } else {
        r.line(
            Level::Warn,
            "nofile",
            format!(
                "{line}: connections past about {} fail with EMFILE; {how}, or lower server.max_connections",
                soft - FD_HEADROOM
            ),
        );
    }
}

fn show(limit: u64) -> String {
    if limit == u64::MAX {
        "unlimited".to_owned()
    } else {
        limit.to_string()
    }
}

fn nofile_limits() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    let parse = |f: Option<&str>| match f? {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    };
    Some((parse(fields.next())?, parse(fields.next())?))
}

fn check_files(r: &mut Report, config: &Config) {
    match config.server.access_log.as_deref() {
        None | Some("stderr") => {}
        Some(path) => {
            match std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
            {
                Ok(_) => r.line(Level::Ok, "access_log", format!("{path} writable")),
                Err(e) => r.line(
                    Level::Fail,
                    "access_log",
                    format!("{path} cannot be opened for appending: {e} (fix server.access_log or the directory's permissions)"),
                ),
            }
        }
    }
    // Validation already refused a static_dir that is not a directory (the `config` line).
    if let Some(dir) = &config.server.static_dir {
        r.line(Level::Ok, "static_dir", format!("{} exists", dir.display()));
    }
}
