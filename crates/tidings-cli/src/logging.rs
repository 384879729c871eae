//! Where log lines go and what they look like: for a person at a terminal, for a file, for
//! journald, or for a log pipeline.
//!
//! `TIDINGS_LOG_FORMAT` (or `[server] log_format`, `TIDINGS_SERVER__LOG_FORMAT`) picks:
//! - `auto` (default): under systemd (`JOURNAL_STREAM` names our stderr) plain lines without a
//!   timestamp, since journald stamps every line itself; otherwise `text`.
//! - `text`: a timestamp, level, target and fields per line. Colours only when stderr is a
//!   terminal and `NO_COLOR` is unset: escape sequences in a file or a pipe are noise.
//! - `json`: one JSON object per line (`timestamp`, `level`, `target`, `fields`).
//!
//! Secrets never reach these lines because nothing that logs holds one unmasked: config
//! secrets are `Secret` (masked in `Debug`), Redis URLs are logged through `masked_url`, and
//! no request's query string or `Authorization` header is logged (tested in `cli_auth.rs`).

use std::io::IsTerminal;
use std::path::Path;

use tidings_server::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

/// The format from the environment, else from the configuration file (read here only for
/// this key: `serve` reports the file's errors itself), else `auto`.
pub fn format(config_path: Option<&Path>) -> LogFormat {
    if let Some(f) = std::env::var("TIDINGS_LOG_FORMAT")
        .ok()
        .and_then(|v| LogFormat::parse(&v))
    {
        return f;
    }
    Config::load(config_path, std::env::vars())
        .map(|c| c.server.log_format)
        .unwrap_or(LogFormat::Auto)
}

/// Installs the global subscriber. `TIDINGS_LOG` is the filter (default `info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("TIDINGS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // A log line that cannot be written is dropped. tracing-subscriber would otherwise report
    // the failure with `eprintln!`, which panics when stderr is the thing that failed (a
    // closed pipe: `tidings serve 2>&1 | head`, a log reader that died): every task that
    // logged would panic, the stop signal's task among them, and SIGTERM would not stop.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    let journald = std::env::var_os("JOURNAL_STREAM").is_some_and(|v| stderr_is(&v));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    match format {
        LogFormat::Json => builder.json().with_ansi(false).init(),
        LogFormat::Auto if journald => builder.without_time().with_ansi(false).init(),
        LogFormat::Auto | LogFormat::Text => builder.with_ansi(colour).init(),
    }
}

/// systemd sets `JOURNAL_STREAM=<dev>:<inode>` of the journal socket it connected; a stderr
/// redirected elsewhere since (`2> file` in a unit's script) does not count.
fn stderr_is(journal_stream: &std::ffi::OsStr) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some((dev, ino)) = journal_stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}
