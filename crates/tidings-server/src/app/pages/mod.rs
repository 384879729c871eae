//! Pages: the files of `--static DIR` and the built-in pages, served by one handler (the
//! router's fallback: every API path wins), and what an HTML page's subresources are sent
//! ahead as (SPEC §13).
//!
//! - `files`: a URL path to a file (the directory, then the embedded pages), escapes refused.
//! - `scan`: an HTML document's same-origin stylesheets, scripts and declared preloads, found
//!   by a real tokenizer and cached per file version.
//!
//! What goes where: this module answers the request — the file, `304`, the `Link` headers
//! on the 200 — and puts a `net::push::Preload` in the response's extensions: the links, and
//! for a request over HTTP/2 with `push = "auto"` the push candidates (within the budgets,
//! not in the client's push cookie: a fingerprint of path and ETag, so a new version of a
//! file is pushed again). The protocol layer (`net/`) sends them: a `103 Early Hints` on
//! HTTP/1.1 and HTTP/2, `PUSH_PROMISE`s where the client enabled push.

pub mod files;
pub mod scan;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Version, header};

use crate::app::error::ApiError;
use crate::config::PushMode;
use crate::net::push::{Preload, Push, pushed_before};
use crate::state::AppState;
use files::{Content, Found, Lookup, StaticDir};
use scan::Subresource;

/// Files up to this are read whole; larger ones are streamed in chunks of it.
const READ_WHOLE: u64 = 256 * 1024;

/// FNV-1a 32 of a path and an ETag: which version of which file was pushed.
fn mark(path: &str, etag: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in path.bytes().chain([0]).chain(etag.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The handler behind every path the API does not claim. Cheap to clone.
#[derive(Clone)]
pub struct Pages(Arc<Inner>);

struct Inner {
    state: AppState,
    dir: Option<StaticDir>,
    scans: scan::Cache,
}

impl Pages {
    /// Opens `static_dir` (taken at start: a reload does not move it).
    pub fn new(state: AppState) -> Self {
        let dir = state.config().server.static_dir.clone().and_then(|d| {
            StaticDir::open(&d)
                .inspect_err(|e| {
                    tracing::error!(dir = %d.display(), error = %e, "static_dir cannot be opened; serving the built-in pages only");
                })
                .ok()
        });
        Self(Arc::new(Inner {
            state,
            dir,
            scans: scan::Cache::default(),
        }))
    }

    /// Scans cached (for tests and metrics).
    pub fn cached_scans(&self) -> usize {
        self.0.scans.len()
    }

    async fn find(&self, path: &str, accept: &[&'static str]) -> Lookup {
        if let Some(dir) = &self.0.dir {
            match dir.lookup(path, accept).await {
                Lookup::NotFound => {}
                other => return other,
            }
        }
        match files::embedded(path) {
            Some(found) => Lookup::Found(Box::new(found)),
            None => Lookup::NotFound,
        }
    }

    pub async fn handle(&self, req: Request) -> Response {
        let (parts, _body) = req.into_parts();
        let accept = files::accepted(parts.headers.get(header::ACCEPT_ENCODING));
        let found = match self.find(parts.uri.path(), &accept).await {
            Lookup::Found(found) => found,
            Lookup::Redirect(to) => {
                let to = match parts.uri.query() {
                    Some(q) => format!("{to}?{q}"),
                    None => to,
                };
                return match HeaderValue::from_str(&to) {
                    Ok(location) => (
                        StatusCode::MOVED_PERMANENTLY,
                        [(header::LOCATION, location)],
                    )
                        .into_response(),
                    Err(_) => ApiError::not_found().into_response(),
                };
            }
            Lookup::NotFound => return ApiError::not_found().into_response(),
        };
        let head = parts.method == Method::HEAD;
        if !head && parts.method != Method::GET {
            let mut res = ApiError::method_not_allowed().into_response();
            res.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return res;
        }
        let config = self.0.state.config();
        let server = &config.server;
        let mut res = if fresh(&parts.headers, &found) {
            StatusCode::NOT_MODIFIED.into_response()
        } else {
            match body(&found, head).await {
                Ok(res) => res,
                Err(e) => {
                    tracing::warn!(error = %e, path = parts.uri.path(), "a static file could not be read");
                    return ApiError::not_found().into_response();
                }
            }
        };
        decorate(&mut res, &found, &server.static_cache_control);
        if res.status() == StatusCode::OK
            && !head
            && found.is_html()
            && server.push != PushMode::Off
        {
            let subresources = self.subresources(parts.uri.path(), &found).await;
            let host = parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .or(parts.uri.authority().map(|a| a.as_str()))
                .map(str::to_ascii_lowercase);
            let ours: Vec<&Subresource> = subresources
                .iter()
                .filter(|s| s.authority.is_none() || s.authority == host)
                .take(server.push_max_assets)
                .collect();
            if !ours.is_empty() {
                let links: Vec<HeaderValue> = ours
                    .iter()
                    .filter_map(|s| HeaderValue::from_str(&s.link()).ok())
                    .collect();
                for l in &links {
                    res.headers_mut().append(header::LINK, l.clone());
                }
                let pushed_before = pushed_before(&parts.headers);
                let push = if server.push == PushMode::Auto && parts.version == Version::HTTP_2 {
                    self.push_candidates(&ours, &accept, &pushed_before, server.push_max_bytes)
                        .await
                } else {
                    Vec::new()
                };
                res.extensions_mut().insert(Preload {
                    links,
                    push,
                    pushed_before,
                });
            }
        }
        res
    }

    /// The page's subresources, from the cache when this version was scanned before.
    async fn subresources(&self, path: &str, found: &Found) -> Arc<[Subresource]> {
        let source = found.source as u8;
        if let Some(hit) = self.0.scans.get(source, path, &found.identity_etag) {
            return hit;
        }
        let doc = path.to_owned();
        let scanned: Vec<Subresource> = match &found.identity {
            Content::Embedded(bytes) => {
                let mut once = Some(bytes.to_vec());
                scan::scan(&doc, || once.take().map(Ok))
            }
            Content::Disk(file) => {
                let file = file.clone();
                // Blocking reads and CPU: off the runtime's threads.
                tokio::task::spawn_blocking(move || {
                    use std::io::Read;
                    let Ok(mut f) = std::fs::File::open(&file) else {
                        return Vec::new();
                    };
                    scan::scan(&doc, || {
                        let mut chunk = vec![0u8; 16 * 1024];
                        match f.read(&mut chunk) {
                            Ok(0) => None,
                            Ok(n) => {
                                chunk.truncate(n);
                                Some(Ok(chunk))
                            }
                            Err(e) => Some(Err(e)),
                        }
                    })
                })
                .await
                .unwrap_or_default()
            }
        };
        let scanned: Arc<[Subresource]> = Arc::from(scanned);
        self.0
            .scans
            .insert(source, path, &found.identity_etag, scanned.clone());
        scanned
    }

    /// What may be pushed: files this server has, in document order, within the byte
    /// budget (one that would go over it is skipped, a smaller one after it may still go),
    /// and not listed in the client's push cookie.
    async fn push_candidates(
        &self,
        ours: &[&Subresource],
        accept: &[&'static str],
        pushed_before: &[u32],
        max_bytes: u64,
    ) -> Vec<Push> {
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for s in ours.iter().filter(|s| s.authority.is_none()) {
            let path = s.path.split('?').next().unwrap_or("");
            let Lookup::Found(f) = self.find(path, accept).await else {
                continue;
            };
            let m = mark(&s.path, &f.etag);
            if pushed_before.contains(&m) || bytes + f.len > max_bytes {
                continue;
            }
            bytes += f.len;
            out.push(Push {
                path: s.path.clone(),
                mark: m,
            });
        }
        out
    }
}

/// Whether the client's copy is current: `If-None-Match` (weak comparison, `*`), else
/// `If-Modified-Since` against the file's time (whole seconds, as the header has them).
fn fresh(req: &HeaderMap, found: &Found) -> bool {
    if let Some(inm) = req.get(header::IF_NONE_MATCH) {
        let Ok(inm) = inm.to_str() else { return false };
        let ours = found.etag.trim_start_matches("W/");
        return inm
            .split(',')
            .any(|t| t.trim() == "*" || t.trim().trim_start_matches("W/") == ours);
    }
    let (Some(ims), Some(modified)) = (
        req.get(header::IF_MODIFIED_SINCE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok()),
        found.modified,
    ) else {
        return false;
    };
    let secs = |t: std::time::SystemTime| {
        t.duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    secs(modified) <= secs(ims)
}

/// The 200: the bytes (or, for `HEAD`, none, with the length they would have).
async fn body(found: &Found, head: bool) -> std::io::Result<Response> {
    let body = if head {
        Body::empty()
    } else {
        match &found.content {
            Content::Embedded(bytes) => Body::from(*bytes),
            Content::Disk(path) if found.len <= READ_WHOLE => {
                Body::from(tokio::fs::read(path).await?)
            }
            Content::Disk(path) => {
                let file = tokio::fs::File::open(path).await?;
                Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
                    file,
                    READ_WHOLE as usize,
                ))
            }
        }
    };
    let mut res = Response::new(body);
    res.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(found.len));
    Ok(res)
}

/// The headers a file's 200 and 304 both carry.
fn decorate(res: &mut Response, found: &Found, cache_control: &str) {
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&found.etag) {
        h.insert(header::ETAG, v);
    }
    if let Some(v) = found
        .modified
        .and_then(|m| HeaderValue::from_str(&httpdate::fmt_http_date(m)).ok())
    {
        h.insert(header::LAST_MODIFIED, v);
    }
    if found.vary {
        h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    if let Some(e) = found.encoding {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static(e));
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    match found.embedded {
        // The built-in pages' own policy (CSP, cache) as `assets` sets it.
        Some(asset) => crate::assets::decorate(asset, h),
        None => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(found.content_type),
            );
            if let Ok(v) = HeaderValue::from_str(cache_control) {
                h.insert(header::CACHE_CONTROL, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_version_changes_its_fingerprint() {
        assert_ne!(mark("/a.css", "\"1\""), mark("/a.css", "\"2\""));
        assert_ne!(mark("/a.css", "\"1\""), mark("/b.css", "\"1\""));
    }
}
