//! The HTTP API's logic, without HTTP: request bodies parsed and checked against Pusher's
//! limits, query attributes, and the JSON answers the SDKs read. The server's handlers
//! (`tidings-server`, `pusher/http.rs`) verify the signature, call these and publish.
//!
//! Limits (Pusher's): at most 100 channels per trigger, 10 events per batch, `data` at most
//! the app's `max_event_bytes` (10 KB by default; 413 past it), event names 200 characters.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::names::{ChannelKind, PusherChannel};
use crate::registry::{App, ChannelInfo};

pub const MAX_TRIGGER_CHANNELS: usize = 100;
pub const MAX_BATCH_EVENTS: usize = 10;

/// An HTTP API refusal: status, a stable code, a message (rendered by the server as
/// `{"error":{"code","message"}}`; the SDKs report the status and the body).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    /// The roster (Redis) could not answer: 503, as a publish the broker refused.
    pub fn unavailable(e: tidings_core::BrokerError) -> Self {
        Self {
            status: 503,
            code: "broker_unavailable",
            message: e.to_string(),
        }
    }

    pub fn bad(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            code,
            message: message.into(),
        }
    }
}

/// Attributes asked for with `info=`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Info {
    pub user_count: bool,
    pub subscription_count: bool,
}

/// Parses `info=a,b`; unknown attributes are refused (the SDKs send only known ones).
pub fn parse_info(info: Option<&str>) -> Result<Info, Refusal> {
    let mut out = Info::default();
    for attr in info.unwrap_or("").split(',').filter(|a| !a.is_empty()) {
        match attr {
            "user_count" => out.user_count = true,
            "subscription_count" => out.subscription_count = true,
            other => {
                return Err(Refusal::bad(
                    "invalid_info",
                    format!(
                        "unknown info attribute {other:?}: use user_count or subscription_count"
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// One event to publish on one or several channels.
#[derive(Debug)]
pub struct Trigger {
    pub name: String,
    pub channels: Vec<PusherChannel>,
    pub data: String,
    pub socket_id: Option<String>,
    pub info: Info,
}

#[derive(Deserialize)]
struct TriggerBody {
    name: String,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    channel: Option<String>,
    data: Value,
    #[serde(default)]
    socket_id: Option<String>,
    #[serde(default)]
    info: Option<String>,
}

#[derive(Deserialize)]
struct BatchBody {
    batch: Vec<TriggerBody>,
}

fn check(app: &App, b: TriggerBody, many: bool) -> Result<Trigger, Refusal> {
    let names = match (b.channels, b.channel) {
        (Some(c), _) if many => c,
        (_, Some(c)) => vec![c],
        (Some(c), None) => c,
        (None, None) => {
            return Err(Refusal::bad(
                "missing_channels",
                "name the channel(s) to trigger on",
            ));
        }
    };
    if names.is_empty() {
        return Err(Refusal::bad("missing_channels", "channels is empty"));
    }
    if names.len() > MAX_TRIGGER_CHANNELS {
        return Err(Refusal::bad(
            "too_many_channels",
            format!("at most {MAX_TRIGGER_CHANNELS} channels per event"),
        ));
    }
    // The SDKs send `data` as a string; a JSON value is accepted and kept as its text.
    let data = match b.data {
        Value::String(s) => s,
        other => other.to_string(),
    };
    let max = app.config.max_event_bytes;
    if data.len() > max {
        return Err(Refusal {
            status: 413,
            code: "payload_too_large",
            message: format!(
                "event data is {} bytes; the limit is {max} (max_event_bytes)",
                data.len()
            ),
        });
    }
    crate::names::tidings_event(&b.name)
        .map_err(|e| Refusal::bad("invalid_event_name", e.to_string()))?;
    let mut channels = Vec::with_capacity(names.len());
    for n in &names {
        let c = PusherChannel::parse(&app.config.id, n)
            .map_err(|e| Refusal::bad("invalid_channel", e.to_string()))?;
        if c.kind == ChannelKind::PrivateEncrypted && names.len() > 1 {
            return Err(Refusal::bad(
                "invalid_channel",
                "an event on a private-encrypted- channel names that one channel only",
            ));
        }
        channels.push(c);
    }
    if let Some(s) = &b.socket_id
        && !crate::protocol::is_socket_id(s)
    {
        return Err(Refusal::bad(
            "invalid_socket_id",
            format!("invalid socket_id {s:?}"),
        ));
    }
    let info = parse_info(b.info.as_deref())?;
    if info.user_count && channels.iter().any(|c| c.kind != ChannelKind::Presence) {
        return Err(Refusal::bad(
            "invalid_info",
            "user_count is available for presence- channels only",
        ));
    }
    Ok(Trigger {
        name: b.name,
        channels,
        data,
        socket_id: b.socket_id,
        info,
    })
}

/// `POST /apps/{id}/events`.
pub fn parse_trigger(app: &App, body: &[u8]) -> Result<Trigger, Refusal> {
    let b: TriggerBody = serde_json::from_slice(body).map_err(|e| {
        Refusal::bad(
            "invalid_body",
            format!("expected {{name, channels, data}}: {e}"),
        )
    })?;
    check(app, b, true)
}

/// `POST /apps/{id}/batch_events`: checked whole before anything is published.
pub fn parse_batch(app: &App, body: &[u8]) -> Result<Vec<Trigger>, Refusal> {
    let b: BatchBody = serde_json::from_slice(body)
        .map_err(|e| Refusal::bad("invalid_body", format!("expected {{batch: [...]}}: {e}")))?;
    if b.batch.len() > MAX_BATCH_EVENTS {
        return Err(Refusal::bad(
            "too_many_events",
            format!("at most {MAX_BATCH_EVENTS} events per batch"),
        ));
    }
    b.batch.into_iter().map(|t| check(app, t, false)).collect()
}

fn attributes(c: &ChannelInfo, info: Info) -> Value {
    let mut v = json!({});
    if info.user_count {
        v["user_count"] = json!(c.user_count);
    }
    if info.subscription_count {
        v["subscription_count"] = json!(c.subscription_count);
    }
    v
}

/// The answer to a trigger: `{}`, or each channel's attributes (cluster-wide) when `info`
/// asked.
pub async fn trigger_answer(app: &App, t: &Trigger) -> Result<Value, Refusal> {
    if t.info == Info::default() {
        return Ok(json!({}));
    }
    let mut channels = serde_json::Map::new();
    for c in &t.channels {
        let state = app.channel(&c.name).await.map_err(Refusal::unavailable)?;
        channels.insert(c.name.clone(), attributes(&state, t.info));
    }
    Ok(json!({"channels": channels}))
}

/// The answer to a batch: `{}`, or one attributes object per event when any asked.
pub async fn batch_answer(app: &App, batch: &[Trigger]) -> Result<Value, Refusal> {
    if batch.iter().all(|t| t.info == Info::default()) {
        return Ok(json!({}));
    }
    let mut answers = Vec::with_capacity(batch.len());
    for t in batch {
        answers.push(match t.channels.first() {
            Some(c) => {
                let state = app.channel(&c.name).await.map_err(Refusal::unavailable)?;
                attributes(&state, t.info)
            }
            None => json!({}),
        });
    }
    Ok(json!({"batch": answers}))
}

/// `GET /apps/{id}/channels?filter_by_prefix=&info=`.
pub async fn channels_answer(
    app: &App,
    prefix: Option<&str>,
    info: Option<&str>,
) -> Result<Value, Refusal> {
    let info = parse_info(info)?;
    let prefix = prefix.unwrap_or("");
    if info.user_count && !prefix.starts_with("presence-") {
        return Err(Refusal::bad(
            "invalid_info",
            "info=user_count needs filter_by_prefix=presence-",
        ));
    }
    let mut channels = serde_json::Map::new();
    for c in app.channels(prefix).await.map_err(Refusal::unavailable)? {
        channels.insert(c.name.clone(), attributes(&c, info));
    }
    Ok(json!({"channels": channels}))
}

/// `GET /apps/{id}/channels/{name}?info=`.
pub async fn channel_answer(app: &App, name: &str, info: Option<&str>) -> Result<Value, Refusal> {
    let c = PusherChannel::parse(&app.config.id, name)
        .map_err(|e| Refusal::bad("invalid_channel", e.to_string()))?;
    let info = parse_info(info)?;
    if info.user_count && c.kind != ChannelKind::Presence {
        return Err(Refusal::bad(
            "invalid_info",
            "user_count is available for presence- channels only",
        ));
    }
    let state = app.channel(&c.name).await.map_err(Refusal::unavailable)?;
    let mut v = attributes(&state, info);
    v["occupied"] = json!(state.subscription_count > 0);
    Ok(v)
}

/// `GET /apps/{id}/channels/{name}/users`.
pub async fn users_answer(app: &App, name: &str) -> Result<Value, Refusal> {
    let c = PusherChannel::parse(&app.config.id, name)
        .map_err(|e| Refusal::bad("invalid_channel", e.to_string()))?;
    if c.kind != ChannelKind::Presence {
        return Err(Refusal::bad(
            "not_presence",
            "users are listed for presence- channels only",
        ));
    }
    let users: Vec<Value> = app
        .users(&c.name)
        .await
        .map_err(Refusal::unavailable)?
        .into_iter()
        .map(|id| json!({"id": id}))
        .collect();
    Ok(json!({"users": users}))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::{AppConfig, AppSecret};

    fn app() -> App {
        App::new(
            AppConfig {
                id: "1".into(),
                key: "k".into(),
                secret: AppSecret("s".into()),
                client_events: false,
                max_connections: 0,
                max_event_bytes: 16,
                webhook_url: None,
                webhook_ca_file: None,
            },
            std::sync::Arc::new(tidings_core::LocalRoster::default()),
        )
    }

    #[test]
    fn a_trigger_names_channels_data_and_an_optional_socket_to_skip() {
        let t = parse_trigger(
            &app(),
            br#"{"name":"e","channels":["a","b"],"data":"{}","socket_id":"1.2"}"#,
        )
        .unwrap();
        assert_eq!(t.channels.len(), 2);
        assert_eq!(t.socket_id.as_deref(), Some("1.2"));
        let t = parse_trigger(&app(), br#"{"name":"e","channel":"a","data":{"x":1}}"#).unwrap();
        assert_eq!(t.data, r#"{"x":1}"#);
    }

    #[test]
    fn bad_triggers_are_refused_with_the_status_the_sdks_expect() {
        let a = app();
        assert_eq!(
            parse_trigger(
                &a,
                br#"{"name":"e","channels":["a"],"data":"0123456789abcdefg"}"#
            )
            .unwrap_err()
            .status,
            413
        );
        assert_eq!(parse_trigger(&a, b"nope").unwrap_err().status, 400);
        assert_eq!(
            parse_trigger(&a, br#"{"name":"e","channels":["a b"],"data":""}"#)
                .unwrap_err()
                .code,
            "invalid_channel"
        );
        assert_eq!(
            parse_trigger(
                &a,
                br#"{"name":"e","channels":["a"],"data":"","socket_id":"x"}"#
            )
            .unwrap_err()
            .code,
            "invalid_socket_id"
        );
        assert_eq!(
            parse_trigger(
                &a,
                br#"{"name":"e","channels":["a"],"data":"","info":"user_count"}"#
            )
            .unwrap_err()
            .code,
            "invalid_info"
        );
        let many: Vec<String> = (0..101).map(|i| format!("c{i}")).collect();
        let body = serde_json::json!({"name":"e","channels":many,"data":""}).to_string();
        assert_eq!(
            parse_trigger(&a, body.as_bytes()).unwrap_err().code,
            "too_many_channels"
        );
        let batch: Vec<Value> = (0..11)
            .map(|_| serde_json::json!({"name":"e","channel":"a","data":""}))
            .collect();
        let body = serde_json::json!({"batch": batch}).to_string();
        assert_eq!(
            parse_batch(&a, body.as_bytes()).unwrap_err().code,
            "too_many_events"
        );
    }

    #[tokio::test]
    async fn channel_queries_report_what_the_app_holds() {
        let a = app();
        a.subscribed("presence-room").await.unwrap();
        a.presence_join("presence-room", "u1", &Value::Null, "1.1")
            .await
            .unwrap();
        a.subscribed("news").await.unwrap();
        let v = channels_answer(&a, Some("presence-"), Some("user_count"))
            .await
            .unwrap();
        assert_eq!(v, json!({"channels": {"presence-room": {"user_count": 1}}}));
        assert!(channels_answer(&a, None, Some("user_count")).await.is_err());
        let v = channel_answer(&a, "news", Some("subscription_count"))
            .await
            .unwrap();
        assert_eq!(v, json!({"occupied": true, "subscription_count": 1}));
        assert_eq!(
            users_answer(&a, "presence-room").await.unwrap(),
            json!({"users": [{"id": "u1"}]})
        );
        assert!(users_answer(&a, "news").await.is_err());
    }
}
