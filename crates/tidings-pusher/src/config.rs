//! `[[pusher.apps]]`: the Pusher apps a server serves (SPEC §13). The server's configuration
//! embeds `PusherConfig` as its `pusher` table; validation lives here beside what it protects.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer};

/// Pusher's own limit on an event's `data` (10 KB); `max_event_bytes` changes it per app.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 10_240;

/// The `pusher` table: no apps unless configured (nothing changes for users who set none).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PusherConfig {
    pub apps: Vec<AppConfig>,
}

/// One `[[pusher.apps]]` entry.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// Digits only: several Pusher server SDKs refuse other app ids.
    #[serde(deserialize_with = "string_or_number")]
    pub id: String,
    pub key: String,
    pub secret: AppSecret,
    /// Whether `client-*` events are relayed on private and presence channels.
    #[serde(default)]
    pub client_events: bool,
    /// Open Pusher connections the app may have at once (0 = no limit of its own; the
    /// server's `max_connections` still applies). Over it, a new connection is closed 4004.
    #[serde(default)]
    pub max_connections: usize,
    /// The largest event `data` accepted, from the HTTP API and from clients.
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: usize,
    /// Where webhooks are POSTed: `http://` or `https://`.
    #[serde(default)]
    pub webhook_url: Option<String>,
    /// A PEM file of CA certificates trusted for an `https://` `webhook_url` besides the
    /// system's roots (a private endpoint's own CA or a self-signed certificate).
    #[serde(default)]
    pub webhook_ca_file: Option<PathBuf>,
}

fn default_max_event_bytes() -> usize {
    DEFAULT_MAX_EVENT_BYTES
}

/// A secret that never shows in `Debug` output (logs, `config` dumps).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct AppSecret(pub String);

impl fmt::Debug for AppSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        Text(String),
        Number(u64),
    }
    Ok(match Id::deserialize(d)? {
        Id::Text(s) => s,
        Id::Number(n) => n.to_string(),
    })
}

/// The longest app id: `pusher:ID:` must leave room for channel names inside Tidings' 128.
pub const MAX_APP_ID_LEN: usize = 20;

impl PusherConfig {
    /// Refuses what would fail later or silently: a non-numeric or duplicate id, a duplicate
    /// or malformed key, an empty secret, a zero size limit, a webhook URL that is not http.
    pub fn validate(&self) -> Result<(), String> {
        let mut ids = std::collections::HashSet::new();
        let mut keys = std::collections::HashSet::new();
        for (i, app) in self.apps.iter().enumerate() {
            let at = format!("pusher.apps[{i}]");
            if app.id.is_empty()
                || app.id.len() > MAX_APP_ID_LEN
                || !app.id.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(format!(
                    "{at}.id = {:?}: use 1 to {MAX_APP_ID_LEN} digits (Pusher server SDKs refuse other app ids)",
                    app.id
                ));
            }
            if !ids.insert(app.id.as_str()) {
                return Err(format!("{at}.id = {:?} is used twice", app.id));
            }
            let key_ok = !app.key.is_empty()
                && app.key.len() <= 64
                && app
                    .key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !key_ok {
                return Err(format!(
                    "{at}.key = {:?}: use 1 to 64 of A-Z a-z 0-9 - _",
                    app.key
                ));
            }
            if !keys.insert(app.key.as_str()) {
                return Err(format!("{at}.key = {:?} is used twice", app.key));
            }
            if app.secret.0.is_empty() {
                return Err(format!("{at}.secret is empty"));
            }
            if app.max_event_bytes == 0 {
                return Err(format!("{at}.max_event_bytes must be at least 1"));
            }
            if let Some(url) = &app.webhook_url {
                let authority = url
                    .strip_prefix("http://")
                    .or_else(|| url.strip_prefix("https://"))
                    .map(|rest| rest.split('/').next().unwrap_or_default());
                if authority.is_none_or(str::is_empty) {
                    return Err(format!(
                        "{at}.webhook_url = {url:?}: use an http:// or https:// URL with a host"
                    ));
                }
            }
            // A CA file beside an http:// URL would be read and never used: say so now.
            if let Some(ca) = &app.webhook_ca_file
                && !app
                    .webhook_url
                    .as_deref()
                    .is_some_and(|u| u.starts_with("https://"))
            {
                return Err(format!(
                    "{at}.webhook_ca_file = {:?}: only used with an https:// webhook_url",
                    ca.display()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(text: &str) -> PusherConfig {
        #[derive(Deserialize)]
        struct Root {
            pusher: PusherConfig,
        }
        serde_json::from_value::<Root>(serde_json::from_str(text).unwrap())
            .unwrap()
            .pusher
    }

    #[test]
    fn an_app_needs_id_key_and_secret_and_defaults_the_rest() {
        let c = parse(r#"{"pusher":{"apps":[{"id":1001,"key":"k","secret":"s"}]}}"#);
        let app = &c.apps[0];
        assert_eq!(app.id, "1001");
        assert!(!app.client_events);
        assert_eq!(app.max_event_bytes, 10_240);
        assert!(c.validate().is_ok());
        assert_eq!(format!("{:?}", app.secret), "\"***\"");
    }

    #[test]
    fn bad_apps_are_refused_with_the_key_named() {
        let c = parse(r#"{"pusher":{"apps":[{"id":"app","key":"k","secret":"s"}]}}"#);
        assert!(c.validate().unwrap_err().contains("pusher.apps[0].id"));
        let c = parse(
            r#"{"pusher":{"apps":[{"id":"1","key":"k","secret":"s"},{"id":"2","key":"k","secret":"t"}]}}"#,
        );
        assert!(c.validate().unwrap_err().contains("used twice"));
        let c = parse(r#"{"pusher":{"apps":[{"id":"1","key":"k","secret":""}]}}"#);
        assert!(c.validate().unwrap_err().contains("secret"));
        let c = parse(
            r#"{"pusher":{"apps":[{"id":"1","key":"k","secret":"s","webhook_url":"ftp://x"}]}}"#,
        );
        assert!(c.validate().unwrap_err().contains("webhook_url"));
        let c = parse(
            r#"{"pusher":{"apps":[{"id":"1","key":"k","secret":"s","webhook_url":"https:///h"}]}}"#,
        );
        assert!(c.validate().unwrap_err().contains("webhook_url"));
        let c = parse(
            r#"{"pusher":{"apps":[{"id":"1","key":"k","secret":"s","webhook_url":"http://x/","webhook_ca_file":"ca.pem"}]}}"#,
        );
        assert!(c.validate().unwrap_err().contains("webhook_ca_file"));
    }

    #[test]
    fn https_webhook_urls_are_accepted_with_or_without_a_ca_file() {
        let c = parse(
            r#"{"pusher":{"apps":[{"id":"1","key":"k","secret":"s","webhook_url":"https://hooks.example/p"}]}}"#,
        );
        assert!(c.validate().is_ok());
        let c = parse(
            r#"{"pusher":{"apps":[{"id":"1","key":"k","secret":"s","webhook_url":"https://hooks.example/p","webhook_ca_file":"ca.pem"}]}}"#,
        );
        assert!(c.validate().is_ok());
        assert_eq!(c.apps[0].webhook_ca_file, Some(PathBuf::from("ca.pem")));
    }
}
