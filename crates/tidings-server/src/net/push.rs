//! What a response asks its connection to send ahead of it: the protocol side of SPEC §13's
//! pages. The application (`app::pages`) decides *what* a page needs and puts a [`Preload`] in
//! the response's extensions; this layer decides *how*, by protocol:
//!
//! - the lean HTTP/1.1 path (`h1`) writes a `103 Early Hints` with the `Link`s before the
//!   response head ([`early_hints_h1`]); HTTP/1.0 goes to hyper, which never sends one;
//! - over HTTP/2 the 103 goes as an informational HEADERS frame, and each push candidate as a
//!   `PUSH_PROMISE` with its pushed response, if the client enabled push.
//!
//! Pushed once per client: a pushed response lands in the client's cache, so pushing it again
//! on the next page view only wastes bandwidth. Like h2o's "casper", a cookie
//! ([`CASPER_COOKIE`]) lists a 32-bit fingerprint of each (path, version) pushed — at most
//! `CASPER_ENTRIES`, the most recent kept — and the application leaves what it lists out of
//! the candidates; a new version of a file has a new fingerprint and is pushed again. A cookie
//! rather than a table on the server: it costs the server nothing per client, and it goes
//! away exactly when the client's cache is likely gone too (site data cleared).

use base64::Engine;
use http::{HeaderMap, HeaderValue, header};

/// Fingerprints the push cookie holds.
const CASPER_ENTRIES: usize = 64;
/// The push cookie's name.
pub const CASPER_COOKIE: &str = "tidings_pushed";

/// A response extension: what to send ahead of this response.
#[derive(Clone, Debug)]
pub struct Preload {
    /// `Link` values for the `103 Early Hints` (the final response carries them too).
    pub links: Vec<HeaderValue>,
    /// Candidates for HTTP/2 push, in order, already within the budgets and not in the
    /// client's cookie. Empty when pushing is off or the request did not come over HTTP/2.
    pub push: Vec<Push>,
    /// The fingerprints the client's cookie lists (kept when it is rewritten).
    pub pushed_before: Vec<u32>,
}

/// One resource the HTTP/2 driver may push.
#[derive(Clone, Debug)]
pub struct Push {
    /// Path and query: the pushed request's `:path`.
    pub path: String,
    /// Its fingerprint for the push cookie.
    pub mark: u32,
}

impl Preload {
    /// The `Set-Cookie` recording `pushed` beside what the client had (`None`: nothing new).
    pub fn cookie(&self, pushed: &[u32]) -> Option<HeaderValue> {
        if pushed.is_empty() {
            return None;
        }
        let mut all: Vec<u32> = self
            .pushed_before
            .iter()
            .copied()
            .filter(|m| !pushed.contains(m))
            .collect();
        all.extend_from_slice(pushed);
        let skip = all.len().saturating_sub(CASPER_ENTRIES);
        let bytes: Vec<u8> = all[skip..].iter().flat_map(|m| m.to_be_bytes()).collect();
        let value = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        HeaderValue::from_str(&format!(
            "{CASPER_COOKIE}={value}; Path=/; Max-Age=86400; SameSite=Lax; HttpOnly"
        ))
        .ok()
    }
}

/// The fingerprints in a request's push cookie (an unreadable cookie lists none).
pub fn pushed_before(headers: &HeaderMap) -> Vec<u32> {
    let prefix = format!("{CASPER_COOKIE}=");
    for value in headers.get_all(header::COOKIE) {
        let Ok(value) = value.to_str() else { continue };
        for pair in value.split(';') {
            if let Some(v) = pair.trim().strip_prefix(&prefix) {
                let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(v) else {
                    return Vec::new();
                };
                return bytes
                    .chunks_exact(4)
                    .take(CASPER_ENTRIES)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
            }
        }
    }
    Vec::new()
}

/// A `103 Early Hints` head for HTTP/1.1, written before the final head.
pub fn early_hints_h1(links: &[HeaderValue]) -> Vec<u8> {
    let mut out = b"HTTP/1.1 103 Early Hints\r\n".to_vec();
    for l in links {
        out.extend_from_slice(b"link: ");
        out.extend_from_slice(l.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preload(before: Vec<u32>) -> Preload {
        Preload {
            links: Vec::new(),
            push: Vec::new(),
            pushed_before: before,
        }
    }

    fn as_request(cookie: Option<HeaderValue>) -> HeaderMap {
        let set = cookie
            .map(|c| c.to_str().unwrap_or("").to_owned())
            .unwrap_or_default();
        let mut h = HeaderMap::new();
        if let Ok(v) =
            HeaderValue::from_str(&format!("a=b; {}", set.split(';').next().unwrap_or("")))
        {
            h.insert(header::COOKIE, v);
        }
        h
    }

    #[test]
    fn the_push_cookie_round_trips_and_keeps_only_the_most_recent() {
        let h = as_request(preload(vec![1, 2, 3]).cookie(&[3, 4]));
        assert_eq!(pushed_before(&h), vec![1, 2, 3, 4]);
        let h = as_request(preload((0..CASPER_ENTRIES as u32).collect()).cookie(&[1000]));
        let back = pushed_before(&h);
        assert_eq!(back.len(), CASPER_ENTRIES);
        assert_eq!(back.last(), Some(&1000));
        assert!(!back.contains(&0));
        assert!(preload(Vec::new()).cookie(&[]).is_none());
    }

    #[test]
    fn a_garbled_cookie_lists_nothing() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("tidings_pushed=!!not base64!!"),
        );
        assert!(pushed_before(&h).is_empty());
    }

    #[test]
    fn the_103_head_lists_every_link() {
        let head = early_hints_h1(&[HeaderValue::from_static("</a.css>; rel=preload; as=style")]);
        assert_eq!(
            head,
            b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload; as=style\r\n\r\n"
        );
    }
}
