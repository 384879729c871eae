//! JWT parsing and verification (`auth::jwt::JwtVerifier`, HS256 with a fixed key) and the
//! credentials a request carries (`Auth::authenticate`: header, `token=` query, cookie).
//!
//! Input: the first byte picks the mode.
//! - Even: the rest is a token as a client sends it. Accepted only if its header says HS256,
//!   its signature is the HMAC of its first two parts under the key, and its time claims
//!   hold; `Auth::authenticate` gives the same answer from the header, the query and the
//!   cookie.
//! - Odd: the rest is turned into claims, which are signed with the key (accepted exactly
//!   when not expired and already valid, claims unchanged), with another key, with HS384
//!   under the same key, unsigned (`alg: none`), and with another token's payload spliced in
//!   (all refused).
#![no_main]

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, HeaderValue, header};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use libfuzzer_sys::fuzz_target;
use tidings_server::Config;
use tidings_server::auth::jwt::{Claims, Grants, JwtVerifier, LEEWAY_SECS, mint_hs256};
use tidings_server::auth::{Auth, Principal};

const KEY: &str = "fuzz-secret-0123456789abcdef";
const OTHER_KEY: &str = "another-secret-0123456789abcdef";

fn verifier() -> &'static JwtVerifier {
    static V: OnceLock<JwtVerifier> = OnceLock::new();
    V.get_or_init(|| JwtVerifier::hs256(KEY))
}

fn auth() -> &'static Auth {
    static A: OnceLock<Auth> = OnceLock::new();
    A.get_or_init(|| {
        let config = Config::from_toml(&format!("[auth]\njwt_secret = \"{KEY}\"\n"))
            .expect("the fuzz config loads");
        Auth::from_config(&config.auth).expect("the fuzz auth config is valid")
    })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether the time claims hold now, or `None` within 2 s of an edge (the clock moves
/// between this check and the verifier's).
fn timely(c: &Claims) -> Option<bool> {
    let now = now();
    let near = |t: u64| t.abs_diff(now) <= 2;
    let exp_ok = match c.exp {
        Some(e) if near(e.saturating_add(LEEWAY_SECS)) => return None,
        Some(e) => e.saturating_add(LEEWAY_SECS) >= now,
        None => true,
    };
    let nbf_ok = match c.nbf {
        Some(n) if near(n.saturating_sub(LEEWAY_SECS)) => return None,
        Some(n) => n.saturating_sub(LEEWAY_SECS) <= now,
        None => true,
    };
    Some(exp_ok && nbf_ok)
}

/// What a token says about itself, read without trusting it.
fn check_accepted(token: &str, claims: &Claims) {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        panic!("an accepted token has three parts: {token:?}");
    };
    let header: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(h)
            .expect("an accepted header is base64url"),
    )
    .expect("an accepted header is JSON");
    assert_eq!(
        header["alg"], "HS256",
        "only the configured algorithm: {header}"
    );
    let expected = jsonwebtoken::crypto::sign(
        format!("{h}.{p}").as_bytes(),
        &EncodingKey::from_secret(KEY.as_bytes()),
        Algorithm::HS256,
    )
    .expect("HMAC signs");
    assert_eq!(
        URL_SAFE_NO_PAD
            .decode(s)
            .expect("an accepted signature is base64url"),
        URL_SAFE_NO_PAD.decode(expected).expect("ours is base64url"),
        "accepted with a signature that is not the key's"
    );
    assert_ne!(
        timely(claims),
        Some(false),
        "accepted out of its time: {claims:?}"
    );
}

/// The three places a request carries a token agree with the verifier.
fn check_credentials(
    token: &str,
    verified: &Result<Claims, tidings_server::auth::jwt::InvalidToken>,
) {
    let clean = !token.is_empty()
        && token.len() <= 8192
        && token.bytes().all(|b| {
            b.is_ascii_graphic() && b != b'&' && b != b';' && b != b'%' && b != b'+' && b != b'"'
        });
    if !clean {
        return;
    }
    let expected = verified
        .clone()
        .map(Principal::User)
        .map_err(|_| "invalid_token");
    let mut via_header = HeaderMap::new();
    via_header.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).expect("a clean token is a header value"),
    );
    let mut via_cookie = HeaderMap::new();
    via_cookie.insert(
        header::COOKIE,
        HeaderValue::from_str(&format!("a=b; tidings_token={token}")).expect("cookie"),
    );
    let query = format!("x=1&token={token}");
    for (headers, query) in [
        (&via_header, None),
        (&HeaderMap::new(), Some(query.as_str())),
        (&via_cookie, None),
    ] {
        let got = auth().authenticate(headers, query).map_err(|e| e.code);
        assert_eq!(got, expected, "{headers:?} {query:?}");
    }
}

/// Claims made of the input: a subject, grants and times around now.
fn claims_from(data: &[u8]) -> Claims {
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let offset = |i: usize| -> Option<u64> {
        let flags = byte(i);
        if flags & 1 == 0 {
            return None;
        }
        let seconds = u64::from(u16::from_le_bytes([byte(i + 1), byte(i + 2)])) % 4000;
        Some(if flags & 2 == 0 {
            now().saturating_add(seconds)
        } else {
            now().saturating_sub(seconds)
        })
    };
    let text = String::from_utf8_lossy(data.get(6..).unwrap_or_default()).into_owned();
    let mut fields = text.split('\n');
    let sub = fields.next().filter(|s| !s.is_empty()).map(str::to_owned);
    let list = |s: Option<&str>| -> Vec<String> {
        s.map(|s| s.split(',').map(str::to_owned).collect())
            .unwrap_or_default()
    };
    Claims {
        sub,
        exp: offset(0),
        nbf: offset(3),
        iat: None,
        tidings: Grants {
            subscribe: list(fields.next()),
            publish: list(fields.next()),
        },
    }
}

fn sign(claims: &Claims, key: &str, alg: Algorithm) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(key.as_bytes()),
    )
    .expect("claims sign")
}

fuzz_target!(|input: &[u8]| {
    let Some((&selector, rest)) = input.split_first() else {
        return;
    };
    if selector & 1 == 0 {
        let Ok(token) = std::str::from_utf8(rest) else {
            return;
        };
        let verified = verifier().verify(token);
        if let Ok(claims) = &verified {
            check_accepted(token, claims);
        }
        check_credentials(token, &verified);
        return;
    }
    let claims = claims_from(rest);
    let Some(valid_now) = timely(&claims) else {
        return;
    };
    let token = mint_hs256(KEY, &claims).expect("claims sign");
    match verifier().verify(&token) {
        Ok(got) => {
            assert!(valid_now, "accepted out of its time: {claims:?}");
            assert_eq!(got, claims, "the claims come back as signed");
        }
        Err(_) => assert!(!valid_now, "a good token for now was refused: {claims:?}"),
    }
    check_credentials(&token, &verifier().verify(&token));
    assert!(
        verifier()
            .verify(&sign(&claims, OTHER_KEY, Algorithm::HS256))
            .is_err(),
        "another key"
    );
    assert!(
        verifier()
            .verify(&sign(&claims, KEY, Algorithm::HS384))
            .is_err(),
        "HS384"
    );
    let payload = token.split('.').nth(1).expect("three parts");
    let none = format!(
        "{}.{payload}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#)
    );
    assert!(verifier().verify(&none).is_err(), "alg none");
    // Another token's payload under this one's signature.
    let mut other = claims.clone();
    other.sub = Some(format!("{}x", other.sub.unwrap_or_default()));
    let other = mint_hs256(KEY, &other).expect("claims sign");
    let mut parts: Vec<&str> = token.split('.').collect();
    parts[1] = other.split('.').nth(1).expect("three parts");
    assert!(
        verifier().verify(&parts.join(".")).is_err(),
        "a spliced payload"
    );
});
