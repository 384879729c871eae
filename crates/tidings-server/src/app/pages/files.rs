//! From a URL path to a file: the directory of `--static DIR`, or the built-in pages compiled
//! into the binary (`assets`), looked up the same way and served by the same code.
//!
//! Escapes: the path is decoded once; an encoded `/` or `\`, a NUL, a `.`/`..` or hidden
//! (dot) segment, or an empty segment is refused before the file system is touched, and what
//! is found is then canonicalized and must lie under the directory's own canonical path, so
//! a symlink that points outside is refused too. Every refusal is the same 404 a missing
//! file gets: nothing tells a prober which rule stopped it.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Where a file's bytes are.
#[derive(Clone, Debug)]
pub enum Content {
    Embedded(&'static [u8]),
    Disk(PathBuf),
}

/// Which lookup found a file: the scan cache keys on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Dir = 0,
    Embedded = 1,
}

/// A file ready to be served.
#[derive(Clone, Debug)]
pub struct Found {
    pub source: Source,
    pub content_type: &'static str,
    /// Of the representation served (a precompressed sibling has its own).
    pub etag: String,
    /// Of the uncompressed file: the version its scan is cached under.
    pub identity_etag: String,
    pub modified: Option<SystemTime>,
    pub len: u64,
    pub content: Content,
    /// The uncompressed file (what is scanned for subresources).
    pub identity: Content,
    /// `br` or `gzip` when a precompressed sibling is served.
    pub encoding: Option<&'static str>,
    /// Whether the response depends on `Accept-Encoding` (a sibling exists).
    pub vary: bool,
    /// Built-in pages carry their own cache policy and a CSP.
    pub embedded: Option<&'static crate::assets::Asset>,
}

impl Found {
    pub fn is_html(&self) -> bool {
        self.content_type.starts_with("text/html")
    }
}

/// What a lookup says.
pub enum Lookup {
    Found(Box<Found>),
    /// A directory asked for without its trailing slash: go to `path/`.
    Redirect(String),
    NotFound,
}

/// The decoded segments of a request path, or `None` when it may not name a file. The last
/// segment is empty for a path ending in `/`.
pub fn segments(raw: &str) -> Option<Vec<String>> {
    let rest = raw.strip_prefix('/')?;
    let lower = raw.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || lower.contains("%00") {
        return None;
    }
    let decoded = percent_encoding::percent_decode_str(rest)
        .decode_utf8()
        .ok()?
        .into_owned();
    if decoded.contains(['\0', '\\']) {
        return None;
    }
    let parts: Vec<String> = decoded.split('/').map(str::to_owned).collect();
    let last = parts.len() - 1;
    for (i, p) in parts.iter().enumerate() {
        if (p.is_empty() && i != last) || p.starts_with('.') {
            return None;
        }
    }
    Some(parts)
}

/// The content type for a file name, by extension.
pub fn content_type(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" | "cjs" => "text/javascript; charset=utf-8",
        "json" | "map" => "application/json",
        "webmanifest" => "application/manifest+json",
        "txt" | "md" => "text/plain; charset=utf-8",
        "xml" => "application/xml",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "otf" => "font/otf",
        "wasm" => "application/wasm",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        "pdf" => "application/pdf",
        _ => "application/octet-stream",
    }
}

/// The directory of `static_dir`, by its canonical path (taken once, at start).
#[derive(Clone, Debug)]
pub struct StaticDir {
    root: PathBuf,
}

impl StaticDir {
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        Ok(Self {
            root: std::fs::canonicalize(dir)?,
        })
    }

    /// Looks `raw` (the request's path, still percent-encoded) up. `accept`: the encodings
    /// the client takes, best first (`br`, `gzip`).
    pub async fn lookup(&self, raw: &str, accept: &[&'static str]) -> Lookup {
        let Some(parts) = segments(raw) else {
            return Lookup::NotFound;
        };
        let mut path = self.root.clone();
        let index = parts.last().is_some_and(String::is_empty);
        for p in &parts {
            if !p.is_empty() {
                path.push(p);
            }
        }
        if index {
            path.push("index.html");
        }
        let Some((real, meta)) = self.inside(&path).await else {
            return Lookup::NotFound;
        };
        if meta.is_dir() {
            return if index {
                Lookup::NotFound
            } else {
                Lookup::Redirect(format!("{raw}/"))
            };
        }
        if !meta.is_file() {
            return Lookup::NotFound;
        }
        let name = real.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let modified = meta.modified().ok();
        let identity_etag = disk_etag(meta.len(), modified, "");
        let mut found = Found {
            source: Source::Dir,
            content_type: content_type(name),
            etag: identity_etag.clone(),
            identity_etag,
            modified,
            len: meta.len(),
            content: Content::Disk(real.clone()),
            identity: Content::Disk(real.clone()),
            encoding: None,
            vary: false,
            embedded: None,
        };
        for (encoding, ext) in [("br", "br"), ("gzip", "gz")] {
            let mut sibling = real.clone().into_os_string();
            sibling.push(".");
            sibling.push(ext);
            let Some((sibling, smeta)) = self.inside(Path::new(&sibling)).await else {
                continue;
            };
            if !smeta.is_file() {
                continue;
            }
            found.vary = true;
            if found.encoding.is_none() && accept.contains(&encoding) {
                found.encoding = Some(encoding);
                found.len = smeta.len();
                found.etag = disk_etag(smeta.len(), smeta.modified().ok(), ext);
                found.content = Content::Disk(sibling);
            }
        }
        Lookup::Found(Box::new(found))
    }

    /// The canonical path of `path` and its metadata, if it exists under the root.
    async fn inside(&self, path: &Path) -> Option<(PathBuf, std::fs::Metadata)> {
        let real = tokio::fs::canonicalize(path).await.ok()?;
        if !real.starts_with(&self.root) {
            return None;
        }
        let meta = tokio::fs::metadata(&real).await.ok()?;
        Some((real, meta))
    }
}

/// `"<len>-<mtime ns>[-ext]"` in hex: changes whenever the file is rewritten.
fn disk_etag(len: u64, modified: Option<SystemTime>, ext: &str) -> String {
    let ns = modified
        .and_then(|m| m.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    if ext.is_empty() {
        format!("\"{len:x}-{ns:x}\"")
    } else {
        format!("\"{len:x}-{ns:x}-{ext}\"")
    }
}

/// The built-in pages by URL path.
pub fn embedded(raw: &str) -> Option<Found> {
    use std::collections::HashMap;
    use std::sync::OnceLock;
    static MAP: OnceLock<HashMap<String, &'static crate::assets::Asset>> = OnceLock::new();
    let map = MAP.get_or_init(|| crate::assets::all().into_iter().collect());
    let asset = *map.get(raw)?;
    Some(Found {
        source: Source::Embedded,
        content_type: asset.content_type,
        etag: asset.etag.to_owned(),
        identity_etag: asset.etag.to_owned(),
        modified: None,
        len: asset.body.len() as u64,
        content: Content::Embedded(asset.body),
        identity: Content::Embedded(asset.body),
        encoding: None,
        vary: false,
        embedded: Some(asset),
    })
}

/// The encodings of `Accept-Encoding` we have siblings for, best first (`q=0` refuses).
pub fn accepted(header: Option<&http::HeaderValue>) -> Vec<&'static str> {
    let Some(value) = header.and_then(|v| v.to_str().ok()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for name in ["br", "gzip"] {
        let ok = value.split(',').any(|item| {
            let mut it = item.split(';');
            let coding = it.next().unwrap_or("").trim();
            let q = it
                .filter_map(|p| p.trim().strip_prefix("q="))
                .filter_map(|q| q.trim().parse::<f32>().ok())
                .next()
                .unwrap_or(1.0);
            coding.eq_ignore_ascii_case(name) && q > 0.0
        });
        if ok {
            out.push(name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_could_leave_the_directory_are_refused_before_the_file_system() {
        for bad in [
            "/../etc/passwd",
            "/a/../../etc/passwd",
            "/%2e%2e/etc/passwd",
            "/a%2fb",
            "/a%2Fb",
            "/a%5c..%5cb",
            "/a\\b",
            "/a%00.html",
            "/.env",
            "/.git/config",
            "/a//b",
            "/a/./b",
            "relative",
            "/%ff",
        ] {
            assert_eq!(segments(bad), None, "{bad}");
        }
        assert_eq!(segments("/"), Some(vec![String::new()]));
        assert_eq!(
            segments("/a%20b/c.css"),
            Some(vec!["a b".to_owned(), "c.css".to_owned()])
        );
        assert_eq!(segments("/d/"), Some(vec!["d".to_owned(), String::new()]));
    }

    #[test]
    fn accept_encoding_is_read_with_its_weights() {
        let v = |s: &'static str| accepted(Some(&http::HeaderValue::from_static(s)));
        assert_eq!(v("gzip, deflate, br"), vec!["br", "gzip"]);
        assert_eq!(v("gzip;q=0.5, br;q=0"), vec!["gzip"]);
        assert_eq!(v("identity"), Vec::<&str>::new());
        assert_eq!(accepted(None), Vec::<&str>::new());
    }

    #[test]
    fn content_types_follow_the_extension() {
        assert_eq!(content_type("a.HTML"), "text/html; charset=utf-8");
        assert_eq!(content_type("m.mjs"), "text/javascript; charset=utf-8");
        assert_eq!(content_type("f.woff2"), "font/woff2");
        assert_eq!(content_type("noext"), "application/octet-stream");
    }
}
