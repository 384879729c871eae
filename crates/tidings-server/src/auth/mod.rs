//! Who is asking, and may they? API keys and JWTs, read from the `Authorization: Bearer`
//! header, the `token` query parameter or the `tidings_token` cookie (EventSource cannot set
//! headers), checked against each channel's namespace policy.
//!
//! How each failure maps to a status (SPEC §6, issue 4), and why:
//! - credentials required but none given → **401** `unauthorized` with `WWW-Authenticate: Bearer`;
//! - credentials given in a form we do not read (an `Authorization` header that is not
//!   `Bearer <token>`, a token with spaces or control characters) → **400** `invalid_credentials`:
//!   the client is broken, not unauthorized;
//! - a token or key that fails *any* check (unknown key, bad signature, wrong or `none` alg,
//!   expired, not yet valid, malformed JWT) → **401** `invalid_token`, always the same message,
//!   so an attacker learns nothing about which check failed;
//! - valid credentials without the grant for the channel → **403** `forbidden`;
//! - `/api/*` once `[auth]` exists needs an API key: a token is valid but not enough → 403.
//!
//! In open mode (no `[auth]`) nothing is read: every request is `Anonymous`, and the default
//! namespace policies let anyone subscribe and publish.
//!
//! Pusher's `private-` and `presence-` channels (`pusher:ID:private-…`, `pusher:ID:presence-…`)
//! are protected on Tidings' own transports whatever the namespace policy, open mode
//! included: subscribing or publishing needs an API key or a token whose grants name the
//! channel, else **403** `pusher_channel_protected`. Pusher clients get in with Pusher's own
//! channel auth; without this, open mode would hand anyone a private channel through `/sse`.
//! (Open mode's HTTP publish API counts as the backend, an API key, for every channel, so it
//! can still publish to them, as the Pusher HTTP API can.)

pub mod grants;
pub mod jwt;

use axum::http::StatusCode;
use subtle::ConstantTimeEq;
use tidings_core::{ChannelName, ChannelPolicy, ClientInfo, PublishPolicy, SubscribePolicy};

use crate::app::error::ApiError;
use crate::config::{AuthConfig, ConfigError};
use crate::net::Headers;
use jwt::{Claims, JwtVerifier};

/// Channels of this namespace carry the server's own stats; with auth, API keys only.
pub const ADMIN_NAMESPACE: &str = "admin";

/// The cookie EventSource clients can carry a token in.
pub const TOKEN_COOKIE: &str = "tidings_token";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// Open mode, or no credentials given.
    Anonymous,
    /// A configured API key: a backend with full publish and admin rights.
    ApiKey,
    /// A verified JWT.
    User(Claims),
}

impl Principal {
    /// When the credentials stop being valid, in seconds since the Unix epoch: the token's
    /// `exp` plus the clock-skew leeway its verification allows, so a token accepted at the
    /// door is not cut off the moment it is let in.
    pub fn expires_at(&self) -> Option<u64> {
        match self {
            Principal::User(c) => c.exp.map(|e| e.saturating_add(jwt::LEEWAY_SECS)),
            _ => None,
        }
    }

    /// A presence entry for this principal: a fresh client id, the token's `sub` as user.
    pub fn client_info(&self) -> ClientInfo {
        let mut info = ClientInfo::anonymous();
        if let Principal::User(c) = self {
            info.user = c.sub.clone();
        }
        info
    }
}

pub struct Auth {
    enabled: bool,
    api_keys: Vec<String>,
    jwt: Option<JwtVerifier>,
}

fn unauthorized(code: &'static str, message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, code, message)
}

/// A Pusher `private-` or `presence-` channel (`private-encrypted-` and the `-cache-` forms
/// included) or a user's `#server-to-user-` channel: Pusher guards them with per-connection
/// channel auth or sign-in, which Tidings' own transports do not speak.
pub fn pusher_protected(channel: &ChannelName) -> bool {
    let Some(rest) = channel.as_str().strip_prefix("pusher:") else {
        return false;
    };
    let name = rest.split_once(':').map_or("", |(_, n)| n);
    name.starts_with("private-")
        || name.starts_with("presence-")
        || name.starts_with("=23server-to-user-")
}

/// A Pusher private or presence channel on Tidings' own transports: an API key, or a token
/// whose `grants` name it; never anonymous, not even in open mode.
fn check_pusher(
    who: &Principal,
    channel: &ChannelName,
    grants: impl Fn(&Claims) -> &Vec<String>,
    doing: &str,
) -> Result<(), ApiError> {
    match who {
        Principal::ApiKey => Ok(()),
        Principal::User(c) if grants::any_matches(grants(c), channel.as_str()) => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "pusher_channel_protected",
            format!(
                "{doing} {channel} needs Pusher channel auth (/app/KEY) or, on Tidings' own transports, an API key or a token that grants it ([auth])"
            ),
        )),
    }
}

fn forbidden(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

/// One answer for every token defect (see the module docs).
fn invalid_token() -> ApiError {
    unauthorized(
        "invalid_token",
        "the credentials are not valid (unknown, expired, not yet valid or badly signed)",
    )
}

impl Auth {
    pub fn from_config(config: &AuthConfig) -> Result<Self, ConfigError> {
        let jwt = match (&config.jwt_secret, &config.jwt_public_key_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(
                    "auth: set jwt_secret (HS256) or jwt_public_key_file (RS256/ES256), not both"
                        .into(),
                ));
            }
            (Some(secret), None) if secret.0.len() < 16 => {
                return Err(ConfigError::Invalid(
                    "auth.jwt_secret must be at least 16 characters".into(),
                ));
            }
            (Some(secret), None) => Some(JwtVerifier::hs256(&secret.0)),
            (None, Some(path)) => Some(JwtVerifier::from_public_key_file(path)?),
            (None, None) => None,
        };
        if config.api_keys.iter().any(|k| k.0.len() < 16) {
            return Err(ConfigError::Invalid(
                "auth.api_keys: every key must be at least 16 characters".into(),
            ));
        }
        Ok(Self {
            enabled: config.enabled(),
            api_keys: config.api_keys.iter().map(|k| k.0.clone()).collect(),
            jwt,
        })
    }

    /// No auth: every request is anonymous.
    pub fn open() -> Self {
        Self {
            enabled: false,
            api_keys: Vec::new(),
            jwt: None,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether credentials of `who`'s kind are still accepted: after a reload that removed
    /// every API key (or the JWT key), sessions opened with one are no longer allowed. A
    /// reload cannot tell which key a session used, nor re-verify a token it no longer has:
    /// a token accepted before stays valid until its `exp`.
    pub fn still_accepts(&self, who: &Principal) -> bool {
        match who {
            Principal::Anonymous => true,
            Principal::ApiKey => !self.enabled || !self.api_keys.is_empty(),
            Principal::User(_) => !self.enabled || self.jwt.is_some(),
        }
    }

    /// Reads and verifies the request's credentials, if any.
    pub fn authenticate<H: Headers + ?Sized>(
        &self,
        headers: &H,
        query: Option<&str>,
    ) -> Result<Principal, ApiError> {
        if !self.enabled {
            return Ok(Principal::Anonymous);
        }
        let Some(token) = credentials(headers, query)? else {
            return Ok(Principal::Anonymous);
        };
        // Constant-time against every key, so timing says nothing about near misses.
        let is_key = self.api_keys.iter().fold(false, |hit, k| {
            hit | bool::from(k.as_bytes().ct_eq(token.as_bytes()))
        });
        if is_key {
            return Ok(Principal::ApiKey);
        }
        match &self.jwt {
            Some(v) => v
                .verify(&token)
                .map(Principal::User)
                .map_err(|_| invalid_token()),
            None => Err(invalid_token()),
        }
    }

    /// May `who` subscribe to `channel` under `policy`?
    pub fn check_subscribe(
        &self,
        who: &Principal,
        channel: &ChannelName,
        policy: &ChannelPolicy,
    ) -> Result<(), ApiError> {
        if pusher_protected(channel) {
            return check_pusher(who, channel, |c| &c.tidings.subscribe, "subscribing to");
        }
        // The server's own stats (`admin:stats`, the admin console's feed) are the API's
        // business: once auth is on, API keys only, whatever a token grants.
        if self.enabled && channel.namespace() == Some(ADMIN_NAMESPACE) {
            return self.check_admin(who);
        }
        match (policy.subscribe, who) {
            (SubscribePolicy::Anyone, _) | (_, Principal::ApiKey) => Ok(()),
            (SubscribePolicy::Token, Principal::Anonymous) => Err(unauthorized(
                "unauthorized",
                &format!(
                    "subscribing to {channel} needs a token (Authorization: Bearer, ?token= or the tidings_token cookie)"
                ),
            )),
            (SubscribePolicy::Token, Principal::User(c)) => {
                if grants::any_matches(&c.tidings.subscribe, channel.as_str()) {
                    Ok(())
                } else {
                    Err(forbidden(format!(
                        "the token does not grant subscribing to {channel}"
                    )))
                }
            }
        }
    }

    /// May `who` publish to `channel` under `policy`?
    pub fn check_publish(
        &self,
        who: &Principal,
        channel: &ChannelName,
        policy: &ChannelPolicy,
    ) -> Result<(), ApiError> {
        if pusher_protected(channel) {
            return check_pusher(who, channel, |c| &c.tidings.publish, "publishing to");
        }
        // Nobody but the server itself may feed the admin console.
        if self.enabled && channel.namespace() == Some(ADMIN_NAMESPACE) {
            return self.check_admin(who);
        }
        match (policy.publish, who) {
            (PublishPolicy::Anyone, _) | (_, Principal::ApiKey) => Ok(()),
            (_, Principal::Anonymous) => Err(unauthorized(
                "unauthorized",
                &format!("publishing to {channel} needs credentials"),
            )),
            (PublishPolicy::Server, Principal::User(_)) => Err(forbidden(format!(
                "only the server's API keys may publish to {channel}"
            ))),
            (PublishPolicy::Token, Principal::User(c)) => {
                if grants::any_matches(&c.tidings.publish, channel.as_str()) {
                    Ok(())
                } else {
                    Err(forbidden(format!(
                        "the token does not grant publishing to {channel}"
                    )))
                }
            }
        }
    }

    /// `/api/*` once auth is on: API keys only.
    pub fn check_admin(&self, who: &Principal) -> Result<(), ApiError> {
        match (self.enabled, who) {
            (false, _) | (true, Principal::ApiKey) => Ok(()),
            (true, Principal::Anonymous) => Err(unauthorized(
                "unauthorized",
                "the API needs an API key (Authorization: Bearer KEY)",
            )),
            (true, Principal::User(_)) => Err(forbidden(
                "the API needs an API key, not a user token".into(),
            )),
        }
    }
}

/// Whether the request's credentials are the `tidings_token` cookie (no `Authorization`
/// header, no `token` query parameter): the one form a browser sends on its own, so the
/// one a cross-site page can borrow.
pub fn cookie_only<H: Headers + ?Sized>(headers: &H, query: Option<&str>) -> bool {
    if headers.has("authorization") || crate::query::pairs(query).any(|(k, _)| k == "token") {
        return false;
    }
    headers.all("cookie").any(|cookies| {
        crate::net::request::text(cookies).is_ok_and(|c| {
            c.split(';').any(|pair| {
                pair.trim()
                    .split_once('=')
                    .is_some_and(|(n, _)| n == TOKEN_COOKIE)
            })
        })
    })
}

/// The bearer token from the header, the `token` query parameter or the cookie, in that
/// order. `Err` (400) when something is there but not in a form we read.
fn credentials<H: Headers + ?Sized>(
    headers: &H,
    query: Option<&str>,
) -> Result<Option<String>, ApiError> {
    let malformed = |what: &str| {
        ApiError::bad_request(
            "invalid_credentials",
            format!("{what}: send credentials as `Authorization: Bearer <token>`"),
        )
    };
    let valid =
        |t: &str| !t.is_empty() && t.len() <= 8192 && t.bytes().all(|b| b.is_ascii_graphic());
    if let Some(value) = headers.text("authorization") {
        let value = value.map_err(|_| malformed("the Authorization header is not ASCII"))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or_else(|| malformed("the Authorization header is not a Bearer token"))?;
        if !valid(token) {
            return Err(malformed(
                "the bearer token is empty or has invalid characters",
            ));
        }
        return Ok(Some(token.to_owned()));
    }
    for (k, v) in crate::query::pairs(query) {
        if k == "token" {
            if !valid(&v) {
                return Err(malformed(
                    "the token query parameter is empty or has invalid characters",
                ));
            }
            return Ok(Some(v.into_owned()));
        }
    }
    for cookies in headers.all("cookie") {
        let Ok(cookies) = crate::net::request::text(cookies) else {
            continue;
        };
        for pair in cookies.split(';') {
            if let Some((name, value)) = pair.trim().split_once('=')
                && name == TOKEN_COOKIE
            {
                let value = value.trim_matches('"');
                if !valid(value) {
                    return Err(malformed("the tidings_token cookie has invalid characters"));
                }
                return Ok(Some(value.to_owned()));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use axum::http::HeaderMap;

    fn auth() -> Auth {
        Auth::from_config(&AuthConfig {
            api_keys: vec![Secret("backend-key-0123456789".into())],
            jwt_secret: Some(Secret("jwt-secret-0123456789".into())),
            jwt_public_key_file: None,
        })
        .unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn credentials_come_from_header_query_or_cookie() {
        let a = auth();
        let key = "backend-key-0123456789";
        for (h, q) in [
            (
                headers(&[("authorization", &format!("Bearer {key}"))]),
                None,
            ),
            (headers(&[]), Some(format!("channel=x&token={key}"))),
            (
                headers(&[("cookie", &format!("a=b; tidings_token={key}"))]),
                None,
            ),
        ] {
            assert_eq!(a.authenticate(&h, q.as_deref()).unwrap(), Principal::ApiKey);
        }
        assert_eq!(
            a.authenticate(&headers(&[]), None).unwrap(),
            Principal::Anonymous
        );
    }

    #[test]
    fn malformed_credentials_are_400_and_bad_ones_401() {
        let a = auth();
        let e = a
            .authenticate(&headers(&[("authorization", "Basic dXNlcjpwYXNz")]), None)
            .unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (400, "invalid_credentials"));
        let e = a
            .authenticate(&headers(&[("authorization", "Bearer nope")]), None)
            .unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (401, "invalid_token"));
    }

    #[test]
    fn policies_decide_between_401_and_403() {
        let a = auth();
        let ch = ChannelName::new("chat:lobby").unwrap();
        let token_only = ChannelPolicy {
            subscribe: SubscribePolicy::Token,
            publish: PublishPolicy::Server,
            ..ChannelPolicy::default()
        };
        let user = Principal::User(Claims {
            sub: Some("alice".into()),
            exp: None,
            nbf: None,
            iat: None,
            tidings: jwt::Grants {
                subscribe: vec!["chat:*".into()],
                publish: vec!["chat:*".into()],
            },
        });
        assert!(a.check_subscribe(&user, &ch, &token_only).is_ok());
        assert_eq!(
            a.check_subscribe(&Principal::Anonymous, &ch, &token_only)
                .unwrap_err()
                .status,
            401
        );
        let other = ChannelName::new("news").unwrap();
        assert_eq!(
            a.check_subscribe(&user, &other, &token_only)
                .unwrap_err()
                .status,
            403
        );
        assert_eq!(
            a.check_publish(&user, &ch, &token_only).unwrap_err().status,
            403,
            "server-only"
        );
        assert!(
            a.check_publish(&Principal::ApiKey, &ch, &token_only)
                .is_ok()
        );
        assert_eq!(a.check_admin(&user).unwrap_err().status, 403);
        assert!(a.check_admin(&Principal::ApiKey).is_ok());
        let stats = ChannelName::new("admin:stats").unwrap();
        let open = ChannelPolicy::default();
        assert_eq!(
            a.check_subscribe(&user, &stats, &open).unwrap_err().status,
            403,
            "even with a * grant"
        );
        assert!(a.check_subscribe(&Principal::ApiKey, &stats, &open).is_ok());
    }

    #[test]
    fn open_mode_reads_nothing() {
        let a = Auth::open();
        let h = headers(&[("authorization", "Basic whatever")]);
        assert_eq!(a.authenticate(&h, None).unwrap(), Principal::Anonymous);
    }
}
