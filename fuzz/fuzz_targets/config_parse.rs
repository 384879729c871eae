//! The configuration parser: `Config::from_toml` and `Config::load` with an environment
//! overlay, on arbitrary UTF-8. Never panics; every failure is a `ConfigError` with a message.
//!
//! Input: a TOML text, then optionally NUL-separated `KEY=VALUE` pairs for the environment
//! (`<toml>\0TIDINGS_SERVER__LISTEN=[::1]:80\0TIDINGS_CHANNELS__HISTORY_SIZE=5`).
//!
//! Also checked: loading the text from a file with no overlay (what `tidings serve` and
//! `tidings config check` do) agrees with `from_toml` (what the tests use), to the last field.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tidings_server::{Config, ConfigError};

/// At most this many environment pairs are taken from one input.
const MAX_VARS: usize = 8;

fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("tidings-fuzz-config-{}.toml", std::process::id()))
    })
}

fn checked(what: &str, r: Result<Config, ConfigError>) -> Result<Config, String> {
    match r {
        Ok(c) => {
            c.validate()
                .unwrap_or_else(|e| panic!("{what}: a loaded config fails validate(): {e}"));
            Ok(c)
        }
        Err(e) => {
            let m = e.to_string();
            assert!(!m.trim().is_empty(), "{what}: empty error message: {e:?}");
            Err(m)
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = input.split('\0');
    let toml = parts.next().unwrap_or_default();
    let env: Vec<(String, String)> = parts
        .take(MAX_VARS)
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (kv.to_owned(), String::new()),
        })
        .collect();

    let parsed = checked("from_toml", Config::from_toml(toml));

    let path = scratch();
    if std::fs::write(path, toml).is_err() {
        return;
    }
    let loaded = checked("load", Config::load(Some(path), Vec::new()));
    match (&parsed, &loaded) {
        (Ok(a), Ok(b)) => assert_eq!(
            format!("{a:?}"),
            format!("{b:?}"),
            "from_toml and load read {toml:?} differently"
        ),
        (Err(_), Err(_)) => {}
        (a, b) => panic!(
            "from_toml and load disagree on {toml:?}: from_toml {:?}, load {:?}",
            a.as_ref().map(|_| "ok"),
            b.as_ref().map(|_| "ok")
        ),
    }

    if !env.is_empty() {
        let _ = checked("load with env", Config::load(Some(path), env.clone()));
        let _ = checked("defaults with env", Config::load(None, env));
    }
});
