//! The web side, embedded in the binary: the landing page, the demos, the admin console, the
//! JS client (`/tidings.js`, `/tidings.d.ts`) and their shared assets. No separate web server
//! and no build step: the files under `web/` and `clients/js/` are compiled in as they are.
//!
//! Served by `app::pages` (the route table's fallback) as an embedded directory, by the same
//! code as the files of `--static DIR`, which take precedence over these.
//!
//! Caching: every URL here is stable (no content hash in the name), so responses carry an
//! `ETag` computed at compile time and `Cache-Control: no-cache` — the browser keeps its copy
//! and revalidates it with one cheap 304 — except the favicon, which may be cached for a day.
//! Pages get a Content-Security-Policy that allows only this origin: they have no inline
//! scripts and talk to no one else.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// One embedded file.
#[derive(Debug)]
pub struct Asset {
    pub body: &'static [u8],
    pub content_type: &'static str,
    pub etag: &'static str,
    cache: &'static str,
    page: bool,
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const TS: &str = "application/typescript; charset=utf-8";
const SVG: &str = "image/svg+xml";

const REVALIDATE: &str = "no-cache";
const ONE_DAY: &str = "public, max-age=86400";

const CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; \
                   style-src 'self' 'unsafe-inline'; script-src 'self'; base-uri 'none'; \
                   form-action 'self'; frame-ancestors 'none'";

/// FNV-1a 64 at compile time: a content fingerprint for the ETag (not a security hash).
const fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

/// `"` + 16 hex digits + `"`, built at compile time.
const fn etag_bytes(bytes: &[u8]) -> [u8; 18] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let h = fnv64(bytes);
    let mut out = [b'"'; 18];
    let mut i = 0;
    while i < 16 {
        out[1 + i] = HEX[((h >> (60 - 4 * i)) & 0xf) as usize];
        i += 1;
    }
    out
}

macro_rules! asset {
    ($path:literal, $ct:expr, $cache:expr, $page:expr) => {{
        const BODY: &[u8] = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../", $path));
        const TAG: [u8; 18] = etag_bytes(BODY);
        Asset {
            body: BODY,
            content_type: $ct,
            // Only hex digits and quotes: always valid UTF-8.
            etag: match std::str::from_utf8(&TAG) {
                Ok(s) => s,
                Err(_) => "\"0\"",
            },
            cache: $cache,
            page: $page,
        }
    }};
}

pub static INDEX: Asset = asset!("web/index.html", HTML, REVALIDATE, true);
pub static CHAT: Asset = asset!("web/chat.html", HTML, REVALIDATE, true);
pub static DASHBOARD: Asset = asset!("web/dashboard.html", HTML, REVALIDATE, true);
pub static LAB: Asset = asset!("web/lab.html", HTML, REVALIDATE, true);
pub static ADMIN: Asset = asset!("web/admin.html", HTML, REVALIDATE, true);
pub static CLIENT_JS: Asset = asset!("clients/js/tidings.js", JS, REVALIDATE, false);
pub static CLIENT_DTS: Asset = asset!("clients/js/tidings.d.ts", TS, REVALIDATE, false);
pub static FAVICON: Asset = asset!("web/favicon.svg", SVG, ONE_DAY, false);

/// `/assets/{name}`: the pages' shared style and scripts.
static SHARED: &[(&str, Asset)] = &[
    (
        "style.css",
        asset!("web/assets/style.css", CSS, REVALIDATE, false),
    ),
    (
        "chart.js",
        asset!("web/assets/chart.js", JS, REVALIDATE, false),
    ),
    ("ui.js", asset!("web/assets/ui.js", JS, REVALIDATE, false)),
    (
        "chat.js",
        asset!("web/assets/chat.js", JS, REVALIDATE, false),
    ),
    (
        "dashboard.js",
        asset!("web/assets/dashboard.js", JS, REVALIDATE, false),
    ),
    ("lab.js", asset!("web/assets/lab.js", JS, REVALIDATE, false)),
    (
        "admin.js",
        asset!("web/assets/admin.js", JS, REVALIDATE, false),
    ),
];

/// Every embedded file with its URL path (for tests and size reports).
pub fn all() -> Vec<(String, &'static Asset)> {
    let mut v: Vec<(String, &'static Asset)> = vec![
        ("/".into(), &INDEX),
        ("/demo/chat".into(), &CHAT),
        ("/demo/dashboard".into(), &DASHBOARD),
        ("/demo/lab".into(), &LAB),
        ("/admin".into(), &ADMIN),
        ("/tidings.js".into(), &CLIENT_JS),
        ("/tidings.d.ts".into(), &CLIENT_DTS),
        ("/favicon.svg".into(), &FAVICON),
        ("/favicon.ico".into(), &FAVICON),
    ];
    v.extend(
        SHARED
            .iter()
            .map(|(name, a)| (format!("/assets/{name}"), a)),
    );
    v
}

/// The file, or 304 when the browser's copy (`If-None-Match`) is current.
pub fn serve(asset: &'static Asset, request: &HeaderMap) -> Response {
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().trim_start_matches("W/") == asset.etag || t.trim() == "*")
        });
    let mut res = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        asset.body.into_response()
    };
    decorate(asset, res.headers_mut());
    res
}

/// The headers every answer for `asset` carries (its 200 and its 304): type, ETag, cache
/// policy, and for pages their CSP. `app::pages` serves the embedded files through this.
pub fn decorate(asset: &Asset, h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    h.insert(header::ETAG, HeaderValue::from_static(asset.etag));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(asset.cache));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if asset.page {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("same-origin"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_non_empty_with_a_distinct_quoted_etag() {
        let all = all();
        for (path, a) in &all {
            assert!(!a.body.is_empty(), "{path} is empty");
            assert!(
                a.etag.len() == 18 && a.etag.starts_with('"') && a.etag.ends_with('"'),
                "{path}: {}",
                a.etag
            );
        }
        let mut tags: Vec<_> = all
            .iter()
            .filter(|(p, _)| p != "/favicon.ico")
            .map(|(_, a)| a.etag)
            .collect();
        tags.sort_unstable();
        let n = tags.len();
        tags.dedup();
        assert_eq!(tags.len(), n, "two assets share an ETag");
    }

    #[test]
    fn a_matching_if_none_match_gets_304_and_others_the_body() {
        let mut h = HeaderMap::new();
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static(CLIENT_JS.etag),
        );
        assert_eq!(serve(&CLIENT_JS, &h).status(), StatusCode::NOT_MODIFIED);
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"nope\""));
        let res = serve(&CLIENT_JS, &h);
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()[header::CONTENT_TYPE], JS);
    }

    #[test]
    fn pages_reference_only_assets_that_exist() {
        // A page that links a missing script would fail silently in the browser (a 404 is
        // only a console error): check every `/assets/…` and `/tidings.js` reference here.
        let known: Vec<String> = all().into_iter().map(|(p, _)| p).collect();
        for (path, a) in all() {
            if !a.content_type.starts_with("text/html") && !a.content_type.starts_with(JS) {
                continue;
            }
            let text = std::str::from_utf8(a.body).unwrap_or("");
            for part in text.split(['"', '\'']) {
                if (part.starts_with("/assets/") || part == "/tidings.js")
                    && !known.iter().any(|k| k == part)
                {
                    panic!("{path} references {part}, which is not embedded");
                }
            }
        }
    }
}
