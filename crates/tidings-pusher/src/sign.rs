//! Pusher's signatures: HMAC-SHA256 with the app's secret, hex-encoded, compared in
//! constant time.
//!
//! - Channel auth (`private-`, `presence-`): `KEY:HMAC(socket_id:channel[:channel_data])`.
//! - User sign-in: `KEY:HMAC(socket_id::user::user_data)`.
//! - HTTP API requests: `auth_signature = HMAC("METHOD\nPATH\nQUERY")`, where QUERY is every
//!   query parameter but `auth_signature`, keys lowercased and sorted, joined as `k=v` with
//!   `&` (values decoded, as the SDKs sign them); `auth_timestamp` within `TIMESTAMP_WINDOW`
//!   of now; `body_md5` the hex MD5 of a non-empty body.
//!
//! A request replayed unchanged within the window is accepted, as Pusher does: the SDKs sign
//! with one-second timestamps, so two identical triggers in one second carry one signature,
//! and refusing the second would drop a legitimate event. A signature moved onto another
//! method, path, query or body fails, and so does any request once the window has passed.

use hmac::{Hmac, Mac};
use md5::Digest;
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// How far `auth_timestamp` may be from the server's clock, either way (Pusher: 600 s).
pub const TIMESTAMP_WINDOW_SECS: u64 = 600;

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// HMAC-SHA256 of `message` with `secret`, hex.
pub fn sign(secret: &str, message: &str) -> String {
    // `new_from_slice` accepts any key length for HMAC; the error arm cannot happen.
    match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mut mac) => {
            mac.update(message.as_bytes());
            hex(&mac.finalize().into_bytes())
        }
        Err(_) => String::new(),
    }
}

/// Whether `given` is the signature of `message`, in constant time.
pub fn verify(secret: &str, message: &str, given: &str) -> bool {
    let expected = sign(secret, message);
    !expected.is_empty()
        && expected.len() == given.len()
        && bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
}

/// Hex MD5 of a request body (`body_md5`).
pub fn md5_hex(body: &[u8]) -> String {
    hex(&md5::Md5::digest(body))
}

/// Why a signed thing is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("auth_key does not match this app's key")]
    WrongKey,
    #[error("unsupported auth_version {0:?} (use 1.0)")]
    Version(String),
    #[error(
        "auth_timestamp {given} is more than {TIMESTAMP_WINDOW_SECS} s from the server's time ({now}); check the client's clock"
    )]
    Timestamp { given: String, now: u64 },
    #[error("body_md5 does not match the body")]
    BodyMd5,
    #[error("invalid signature: the server signed {0:?}")]
    Signature(String),
    #[error("invalid auth: expected KEY:SIGNATURE")]
    Malformed,
}

/// Checks a channel subscription's `auth` (`KEY:SIGNATURE`).
pub fn verify_channel(
    key: &str,
    secret: &str,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
    auth: &str,
) -> Result<(), SignError> {
    let message = match channel_data {
        Some(data) => format!("{socket_id}:{channel}:{data}"),
        None => format!("{socket_id}:{channel}"),
    };
    verify_auth(key, secret, &message, auth)
}

/// Checks a `pusher:signin`'s `auth`.
pub fn verify_user(
    key: &str,
    secret: &str,
    socket_id: &str,
    user_data: &str,
    auth: &str,
) -> Result<(), SignError> {
    verify_auth(
        key,
        secret,
        &format!("{socket_id}::user::{user_data}"),
        auth,
    )
}

fn verify_auth(key: &str, secret: &str, message: &str, auth: &str) -> Result<(), SignError> {
    let (given_key, signature) = auth.split_once(':').ok_or(SignError::Malformed)?;
    if !bool::from(given_key.as_bytes().ct_eq(key.as_bytes())) {
        return Err(SignError::WrongKey);
    }
    if verify(secret, message, signature) {
        Ok(())
    } else {
        // The message is not secret (the client sent every part of it); saying what was
        // signed is what lets a developer find a wrong socket id or channel.
        Err(SignError::Signature(message.to_owned()))
    }
}

/// An HTTP API request as the signature covers it.
pub struct SignedRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// Decoded query pairs, `auth_signature` included.
    pub query: &'a [(String, String)],
    pub body: &'a [u8],
}

/// Checks an HTTP API request's signature, key, version, timestamp and body hash.
pub fn verify_request(
    key: &str,
    secret: &str,
    req: &SignedRequest<'_>,
    now_secs: u64,
) -> Result<(), SignError> {
    let get = |name: &str| {
        req.query
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let given_key = get("auth_key").ok_or(SignError::Missing("auth_key"))?;
    if !bool::from(given_key.as_bytes().ct_eq(key.as_bytes())) {
        return Err(SignError::WrongKey);
    }
    let signature = get("auth_signature").ok_or(SignError::Missing("auth_signature"))?;
    match get("auth_version") {
        Some("1.0") => {}
        Some(v) => return Err(SignError::Version(v.to_owned())),
        None => return Err(SignError::Missing("auth_version")),
    }
    let ts = get("auth_timestamp").ok_or(SignError::Missing("auth_timestamp"))?;
    let fresh = ts
        .parse::<u64>()
        .is_ok_and(|t| t.abs_diff(now_secs) <= TIMESTAMP_WINDOW_SECS);
    if !fresh {
        return Err(SignError::Timestamp {
            given: ts.chars().take(24).collect(),
            now: now_secs,
        });
    }
    if !req.body.is_empty() {
        let md5 = get("body_md5").ok_or(SignError::Missing("body_md5"))?;
        if !md5.eq_ignore_ascii_case(&md5_hex(req.body)) {
            return Err(SignError::BodyMd5);
        }
    }
    let message = string_to_sign(req);
    if verify(secret, &message, signature) {
        Ok(())
    } else {
        Err(SignError::Signature(message))
    }
}

/// `METHOD\nPATH\nk=v&…` (sorted, lowercased keys, `auth_signature` left out).
pub fn string_to_sign(req: &SignedRequest<'_>) -> String {
    let mut pairs: Vec<(String, &str)> = req
        .query
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("auth_signature"))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
        .collect();
    pairs.sort();
    let query: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(
        "{}\n{}\n{}",
        req.method.to_ascii_uppercase(),
        req.path,
        query.join("&")
    )
}

/// Signs a request the way the SDKs do (the webhook sender and the tests use it).
pub fn sign_request(secret: &str, method: &str, path: &str, query: &[(String, String)]) -> String {
    sign(
        secret,
        &string_to_sign(&SignedRequest {
            method,
            path,
            query,
            body: b"",
        }),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_channel_signature_matches_pusher_s_documented_example() {
        // From Pusher's "authenticating users" docs: key 278d425bdf160c739803, secret
        // 7ad3773142a6692b25b8, socket 1234.1234, channel private-foobar.
        let sig = sign("7ad3773142a6692b25b8", "1234.1234:private-foobar");
        assert_eq!(
            sig,
            "58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
        let auth = format!("278d425bdf160c739803:{sig}");
        assert!(
            verify_channel(
                "278d425bdf160c739803",
                "7ad3773142a6692b25b8",
                "1234.1234",
                "private-foobar",
                None,
                &auth
            )
            .is_ok()
        );
        assert!(matches!(
            verify_channel(
                "278d425bdf160c739803",
                "7ad3773142a6692b25b8",
                "1234.1235",
                "private-foobar",
                None,
                &auth
            ),
            Err(SignError::Signature(_))
        ));
        assert_eq!(
            verify_channel("k", "s", "1.1", "private-a", None, "nocolon"),
            Err(SignError::Malformed)
        );
    }

    #[test]
    fn a_request_signature_covers_method_path_query_body_and_time() {
        let body = br#"{"name":"e","channels":["c"],"data":"x"}"#;
        let mut query = vec![
            ("auth_key".to_owned(), "key".to_owned()),
            ("auth_timestamp".to_owned(), "1000".to_owned()),
            ("auth_version".to_owned(), "1.0".to_owned()),
            ("body_md5".to_owned(), md5_hex(body)),
        ];
        let sig = sign_request("secret", "POST", "/apps/1/events", &query);
        query.push(("auth_signature".to_owned(), sig));
        let req = |path, body: &'static [u8]| SignedRequest {
            method: "POST",
            path,
            query: &query,
            body,
        };
        assert_eq!(
            verify_request("key", "secret", &req("/apps/1/events", body), 1000),
            Ok(())
        );
        assert!(verify_request("key", "secret", &req("/apps/1/events", body), 1599).is_ok());
        assert!(matches!(
            verify_request("key", "secret", &req("/apps/1/events", body), 1601),
            Err(SignError::Timestamp { .. })
        ));
        assert_eq!(
            verify_request("key", "secret", &req("/apps/1/events", b"{}"), 1000),
            Err(SignError::BodyMd5)
        );
        assert!(matches!(
            verify_request("key", "secret", &req("/apps/1/batch_events", body), 1000),
            Err(SignError::Signature(_))
        ));
        assert_eq!(
            verify_request("other", "secret", &req("/apps/1/events", body), 1000),
            Err(SignError::WrongKey)
        );
    }
}
