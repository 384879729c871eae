//! Subscribe parameters shared by every HTTP transport (SPEC §3): channels from the path or
//! repeated `channel=`, and where to start: `since` / `lastEventId` / `Last-Event-ID` /
//! `If-None-Match` (polls), or `history=N`. Polls also take `wait` or `Prefer: wait=N`.

use std::borrow::Cow;
use std::time::Duration;

use tidings_core::{ChannelName, Cursor, Start};

use crate::app::error::ApiError;
use crate::auth::Principal;
use crate::config::ServerConfig;
use crate::net::Headers;
use crate::state::AppState;

/// Authenticates the request and checks every channel's subscribe policy (401/403, see
/// `auth`). Returns who is subscribing: its token's expiry ends the session, its `sub` is
/// the presence user.
pub fn authorize<H: Headers + ?Sized>(
    state: &AppState,
    p: &SubscribeParams,
    headers: &H,
    query: Option<&str>,
) -> Result<Principal, ApiError> {
    // One load of the credentials in force for the whole request (a reload may swap them).
    let auth = state.auth();
    let who = auth.authenticate(headers, query)?;
    for channel in p.channels.iter() {
        let policy = state.node.policies.for_channel(channel);
        auth.check_subscribe(&who, channel, &policy)?;
    }
    Ok(who)
}

pub struct SubscribeParams {
    pub channels: Channels,
    pub start: Start,
    /// Long-poll wait, when asked for (polls only).
    pub wait: Option<Duration>,
}

/// The channels of a subscription: the one in the path is kept as it is, without a list
/// (issue 17: a list per poll was an allocation for one name).
pub enum Channels {
    One(ChannelName),
    Many(Vec<ChannelName>),
}

impl std::ops::Deref for Channels {
    type Target = [ChannelName];

    fn deref(&self) -> &[ChannelName] {
        match self {
            Channels::One(channel) => std::slice::from_ref(channel),
            Channels::Many(channels) => channels,
        }
    }
}

/// Parses channels and start position; `wait` only when `allow_wait`.
pub fn parse<H: Headers + ?Sized>(
    path_channel: Option<&str>,
    query: Option<&str>,
    headers: &H,
    config: &ServerConfig,
    allow_wait: bool,
) -> Result<SubscribeParams, ApiError> {
    let mut channels = Vec::new();
    // The cursor's text stays where it is, in the query or the header (a copy per poll).
    let mut since: Option<Cow<'_, str>> = None;
    let mut last_event_id: Option<Cow<'_, str>> = None;
    let mut history: Option<usize> = None;
    let mut wait: Option<Duration> = None;
    for (key, value) in crate::query::pairs(query) {
        match &*key {
            "channel" => {
                if path_channel.is_some() {
                    return Err(ApiError::bad_request(
                        "invalid_parameter",
                        "give the channel either in the path or as ?channel=, not both",
                    ));
                }
                if channels.len() >= config.max_channels_per_subscription {
                    return Err(too_many(config));
                }
                let channel = ChannelName::new(&value)?;
                if let Some(other) = tidings_core::cursor::collision(&channels, &channel) {
                    return Err(ApiError::bad_request(
                        "channel_collision",
                        tidings_core::cursor::collision_message(other, &channel),
                    ));
                }
                channels.push(channel);
            }
            "since" if !value.is_empty() => since = Some(value),
            "lastEventId" if !value.is_empty() => last_event_id = Some(value),
            "history" => {
                history = Some(value.parse().map_err(|_| {
                    ApiError::bad_request(
                        "invalid_parameter",
                        format!("history={value:?}: expected a whole number of messages"),
                    )
                })?);
            }
            "wait" if allow_wait => wait = Some(parse_wait(&value, config)?),
            _ => {}
        }
    }
    // A path channel never comes with query channels (refused above).
    let channels = match path_channel {
        Some(name) => Channels::One(ChannelName::new(name)?),
        None if channels.is_empty() => {
            return Err(ApiError::bad_request(
                "missing_channel",
                "name at least one channel: /…/{channel} or ?channel=NAME (repeatable)",
            ));
        }
        None => Channels::Many(channels),
    };
    let header_text = |name: &'static str| {
        headers
            .text(name)
            .and_then(Result::ok)
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let cursor_text = since
        .or(last_event_id)
        .or_else(|| header_text("last-event-id").map(Cow::Borrowed))
        .or_else(|| {
            allow_wait
                .then(|| header_text("if-none-match"))
                .flatten()
                .map(|v| Cow::Borrowed(v.trim_start_matches("W/").trim_matches('"')))
        });
    let start = match (cursor_text, history) {
        (Some(text), _) => Start::Cursor(Cursor::decode(&text)?),
        (None, Some(n)) => Start::Last(n),
        (None, None) => Start::Now,
    };
    if allow_wait && wait.is_none() {
        wait = prefer_wait(headers, config)?;
    }
    Ok(SubscribeParams {
        channels,
        start,
        wait,
    })
}

fn too_many(config: &ServerConfig) -> ApiError {
    ApiError::bad_request(
        "too_many_channels",
        format!(
            "at most {} channels per subscription (max_channels_per_subscription)",
            config.max_channels_per_subscription
        ),
    )
}

/// A wait in seconds, held for at most `long_poll_max_wait` (SPEC §13: `Prefer` lets a server
/// apply less than asked, and `Preference-Applied` says what it applied). Only a negative or
/// non-numeric wait is refused: a client written against another server's maximum still works.
fn parse_wait(value: &str, config: &ServerConfig) -> Result<Duration, ApiError> {
    // Whole seconds, as clients send them: no float parsing (it was most of this function's
    // cost), and the same duration `from_secs_f64` gives for a whole number.
    if let Some(secs) = value
        .trim()
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| value.trim().parse::<u32>().ok())
        .flatten()
    {
        return Ok(Duration::from_secs(u64::from(secs)).min(config.long_poll_max_wait));
    }
    let secs: f64 = value.trim().parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_wait",
            format!("wait={value:?}: expected seconds, e.g. wait=30"),
        )
    })?;
    if secs.is_nan() || secs < 0.0 {
        return Err(ApiError::bad_request(
            "invalid_wait",
            "wait must be a non-negative number of seconds",
        ));
    }
    let max = config.long_poll_max_wait;
    if secs >= max.as_secs_f64() {
        return Ok(max);
    }
    Ok(Duration::from_secs_f64(secs))
}

/// RFC 7240 `Prefer: wait=N`; other preferences are ignored.
fn prefer_wait<H: Headers + ?Sized>(
    headers: &H,
    config: &ServerConfig,
) -> Result<Option<Duration>, ApiError> {
    for value in headers.all("prefer") {
        let Ok(value) = crate::net::request::text(value) else {
            continue;
        };
        for pref in value.split([',', ';']) {
            if let Some((k, v)) = pref.split_once('=')
                && k.trim().eq_ignore_ascii_case("wait")
            {
                return parse_wait(v.trim().trim_matches('"'), config).map(Some);
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;

    fn cfg() -> ServerConfig {
        ServerConfig {
            max_channels_per_subscription: 2,
            ..ServerConfig::default()
        }
    }

    #[test]
    fn channels_come_from_the_path_or_repeated_query_parameters() {
        let h = HeaderMap::new();
        let p = parse(None, Some("channel=a&channel=b&_=123"), &h, &cfg(), false).unwrap();
        assert_eq!(p.channels.len(), 2);
        let p = parse(Some("news"), None, &h, &cfg(), false).unwrap();
        assert_eq!(p.channels[0].as_str(), "news");
        assert_eq!(p.start, Start::Now);
        let e = parse(
            None,
            Some("channel=a&channel=b&channel=c"),
            &h,
            &cfg(),
            false,
        );
        assert_eq!(e.err().unwrap().code, "too_many_channels");
        assert_eq!(
            parse(None, None, &h, &cfg(), false).err().unwrap().code,
            "missing_channel"
        );
        assert_eq!(
            parse(None, Some("channel=a%20b"), &h, &cfg(), false)
                .err()
                .unwrap()
                .code,
            "invalid_channel"
        );
    }

    #[test]
    fn wait_above_the_cap_is_held_for_the_cap_and_only_garbage_is_refused() {
        let h = HeaderMap::new();
        let p = parse(Some("a"), Some("wait=61"), &h, &cfg(), true).unwrap();
        assert_eq!(p.wait, Some(Duration::from_secs(60)));
        let p = parse(Some("a"), Some("wait=inf"), &h, &cfg(), true).unwrap();
        assert_eq!(p.wait, Some(Duration::from_secs(60)));
        for bad in ["x", "-1", "NaN", "-inf", ""] {
            let e = parse(Some("a"), Some(&format!("wait={bad}")), &h, &cfg(), true);
            assert_eq!(e.err().map(|e| e.code), Some("invalid_wait"), "{bad}");
        }
        let p = parse(Some("a"), Some("wait=2.5"), &h, &cfg(), true).unwrap();
        assert_eq!(p.wait, Some(Duration::from_millis(2500)));
        let mut h = HeaderMap::new();
        h.insert("prefer", "respond-async, wait=5".parse().unwrap());
        let p = parse(Some("a"), None, &h, &cfg(), true).unwrap();
        assert_eq!(p.wait, Some(Duration::from_secs(5)));
        h.insert("prefer", "wait=3600".parse().unwrap());
        let p = parse(Some("a"), None, &h, &cfg(), true).unwrap();
        assert_eq!(p.wait, Some(Duration::from_secs(60)));
    }

    #[test]
    fn a_malformed_cursor_is_a_400_and_history_needs_a_number() {
        let h = HeaderMap::new();
        let e = parse(Some("a"), Some("since=%%%"), &h, &cfg(), false)
            .err()
            .unwrap();
        assert_eq!(e.code, "invalid_cursor");
        let mut h = HeaderMap::new();
        h.insert("last-event-id", "garbage!".parse().unwrap());
        assert_eq!(
            parse(Some("a"), None, &h, &cfg(), false)
                .err()
                .unwrap()
                .code,
            "invalid_cursor"
        );
        let h = HeaderMap::new();
        assert!(parse(Some("a"), Some("history=-1"), &h, &cfg(), false).is_err());
        let p = parse(Some("a"), Some("history=3"), &h, &cfg(), false).unwrap();
        assert_eq!(p.start, Start::Last(3));
    }
}
