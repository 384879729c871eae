//! Finds what an HTML document will ask for next — its same-origin stylesheets, classic and
//! module scripts, and whatever it declares itself with `<link rel=preload|modulepreload>` —
//! so `pages` can hint (`103 Early Hints`, `Link`) or push them.
//!
//! Why lol_html: a regex over HTML finds `<script src>` inside comments, inside other
//! scripts' text and inside attribute values, and misses tags split oddly. lol_html runs the
//! WHATWG tokenizer (with its text-mode switches for `<script>`, `<style>`, `<textarea>`…)
//! over the document in chunks, calls us only for the elements our selectors name, and holds
//! a hard memory limit (`MemorySettings`): a huge or hostile document costs at most
//! `SCAN_MEMORY` bytes of parser state and `SCAN_LIMIT` bytes read, never the whole file.
//! (html5ever builds a tree; html5gum has no memory bound on one token.) When the tokenizer
//! gives up (the limit, or a construct it calls ambiguous in strict mode) what was found
//! before that point is kept.
//!
//! Concurrency: `Cache` is a `std::sync::Mutex` around a bounded map, held only to look up
//! or insert (never across a scan or an await). Two requests for a page nobody scanned yet
//! may both scan it; the second insert wins, and both results are equal.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use lol_html::html_content::Element;
use lol_html::{HtmlRewriter, MemorySettings, Settings, element};

/// At most this much of a document is read for subresources: they belong in its head.
pub const SCAN_LIMIT: usize = 1 << 20;
/// The tokenizer's memory limit (a start tag split across chunks is buffered whole).
const SCAN_MEMORY: usize = 256 * 1024;
/// At most this many subresources are remembered per document (the budgets cut further).
pub const MAX_FOUND: usize = 256;
/// Documents whose scans are cached; past it an arbitrary one is forgotten.
const CACHE_ENTRIES: usize = 256;
/// An attribute value longer than this is not a URL we hint.
const MAX_URL: usize = 2048;

/// One subresource, in document order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subresource {
    /// Absolute path (with its query), percent-encoded where a header needs it.
    pub path: String,
    /// `Some(authority)` when the document named it by absolute URL: same-origin only if the
    /// request's host is this one.
    pub authority: Option<String>,
    /// `rel=modulepreload` (module scripts) rather than `rel=preload`.
    pub module: bool,
    /// The preload destination (`as=`): `style`, `script`, `font`, … (empty for modules).
    pub dest: &'static str,
    /// The element's `crossorigin`: `Some("")` anonymous, `Some("use-credentials")`.
    pub crossorigin: Option<&'static str>,
}

impl Subresource {
    /// The `Link` header value that asks a browser to fetch it early.
    pub fn link(&self) -> String {
        let mut v = format!("<{}>", self.path);
        if self.module {
            v.push_str("; rel=modulepreload");
        } else {
            v.push_str("; rel=preload; as=");
            v.push_str(self.dest);
        }
        match self.crossorigin {
            Some("") => v.push_str("; crossorigin"),
            Some(c) => {
                v.push_str("; crossorigin=");
                v.push_str(c);
            }
            None => {}
        }
        v
    }
}

/// Scans a document that lives at URL path `doc_path`, reading it through `next` (a chunk
/// per call; `None` at the end). Reads at most `SCAN_LIMIT` bytes.
pub fn scan(
    doc_path: &str,
    mut next: impl FnMut() -> Option<std::io::Result<Vec<u8>>>,
) -> Vec<Subresource> {
    let found: RefCell<Vec<Subresource>> = RefCell::new(Vec::new());
    let base: RefCell<Option<String>> = RefCell::new(None);
    // Elements inside <template> or <noscript> are not fetched by a browser with scripts on.
    let inert = Rc::new(Cell::new(0usize));
    let add = |href: Option<String>, module: bool, dest: &'static str, el: &Element| {
        let Some(href) = href else { return };
        let mut found = found.borrow_mut();
        if found.len() >= MAX_FOUND || inert.get() > 0 {
            return;
        }
        let base = base.borrow();
        let Some((authority, path)) = resolve(base.as_deref().unwrap_or(doc_path), &href) else {
            return;
        };
        let crossorigin =
            el.get_attribute("crossorigin")
                .map(|c| match c.trim().to_ascii_lowercase().as_str() {
                    "use-credentials" => "use-credentials",
                    _ => "",
                });
        let s = Subresource {
            path,
            authority,
            module,
            dest,
            crossorigin,
        };
        if !found
            .iter()
            .any(|f| f.path == s.path && f.authority == s.authority)
        {
            found.push(s);
        }
    };
    let settings = Settings::new()
        .with_memory_settings(
            MemorySettings::new()
                .with_max_allowed_memory_usage(SCAN_MEMORY)
                .with_preallocated_parsing_buffer_size(1024),
        )
        .append_element_content_handler(element!("template, noscript", |el| {
            inert.set(inert.get() + 1);
            let inert = inert.clone();
            if let Some(handlers) = el.end_tag_handlers() {
                let end: lol_html::EndTagHandler<'static> = Box::new(move |_end| {
                    inert.set(inert.get().saturating_sub(1));
                    Ok(())
                });
                handlers.push(end);
            } else {
                // A void or self-closed one has no content to hide.
                inert.set(inert.get().saturating_sub(1));
            }
            Ok(())
        }))
        .append_element_content_handler(element!("base[href]", |el| {
            let mut base = base.borrow_mut();
            if base.is_none()
                && let Some(href) = el.get_attribute("href")
            {
                // Only a same-origin base is followed; any other makes relative URLs
                // cross-origin, which `resolve` then refuses.
                *base = Some(match resolve(doc_path, &href) {
                    Some((None, p)) => p,
                    _ => "//elsewhere/".into(),
                });
            }
            Ok(())
        }))
        .append_element_content_handler(element!("link[href]", |el| {
            let rel = el
                .get_attribute("rel")
                .unwrap_or_default()
                .to_ascii_lowercase();
            let rels: Vec<&str> = rel.split_ascii_whitespace().collect();
            let href = el.get_attribute("href");
            if rels.contains(&"modulepreload") {
                add(href, true, "", el);
            } else if rels.contains(&"preload") {
                if let Some(dest) = el.get_attribute("as").and_then(|a| destination(&a)) {
                    add(href, false, dest, el);
                }
            } else if rels.contains(&"stylesheet")
                && !rels.contains(&"alternate")
                && !el.has_attribute("disabled")
            {
                add(href, false, "style", el);
            }
            Ok(())
        }))
        .append_element_content_handler(element!("script[src]", |el| {
            if el.has_attribute("nomodule") {
                return Ok(());
            }
            let kind = el.get_attribute("type").unwrap_or_default();
            let kind = kind.trim().to_ascii_lowercase();
            let href = el.get_attribute("src");
            if kind == "module" {
                add(href, true, "", el);
            } else if kind.is_empty() || is_javascript_mime(&kind) {
                add(href, false, "script", el);
            }
            Ok(())
        }));
    let mut rewriter = HtmlRewriter::new(settings, |_: &[u8]| {});
    let mut read = 0usize;
    while read < SCAN_LIMIT {
        let chunk = match next() {
            Some(Ok(chunk)) => chunk,
            _ => break,
        };
        let take = chunk.len().min(SCAN_LIMIT - read);
        read += take;
        if rewriter.write(&chunk[..take]).is_err() {
            // The memory limit or an ambiguity: keep what was found before it.
            drop(rewriter);
            return found.into_inner();
        }
    }
    let _ = rewriter.end();
    found.into_inner()
}

/// The preload destinations a `Link` may name (the fetch spec's list that browsers take).
fn destination(a: &str) -> Option<&'static str> {
    const ALL: [&str; 9] = [
        "style", "script", "font", "image", "fetch", "track", "audio", "video", "worker",
    ];
    let a = a.trim().to_ascii_lowercase();
    ALL.into_iter().find(|d| *d == a)
}

fn is_javascript_mime(t: &str) -> bool {
    let essence = t.split(';').next().unwrap_or("").trim();
    matches!(
        essence,
        "text/javascript"
            | "application/javascript"
            | "application/ecmascript"
            | "text/ecmascript"
            | "application/x-javascript"
            | "text/jscript"
    )
}

/// Resolves `href` against the document path `base` (`/a/b.html`): `(None, "/a/c.css")` for
/// a same-origin path, `(Some(authority), path)` for an absolute http(s) URL, `None` for
/// anything else (another scheme, a bad value, an escape above the root is clamped).
pub fn resolve(base: &str, href: &str) -> Option<(Option<String>, String)> {
    let href = href.trim_matches(|c: char| c.is_ascii_whitespace());
    if href.is_empty() || href.len() > MAX_URL {
        return None;
    }
    let href = href.split('#').next().unwrap_or("");
    let (authority, rest) = if let Some(rest) = href.strip_prefix("//") {
        split_authority(rest)?
    } else if let Some((scheme, rest)) = href.split_once(':')
        && !scheme.contains(['/', '?'])
    {
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return None;
        }
        split_authority(rest.strip_prefix("//")?)?
    } else {
        (None, href.to_owned())
    };
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest.as_str(), None),
    };
    let joined = if path.starts_with('/') || authority.is_some() {
        path.to_owned()
    } else if base.starts_with("//") {
        // A base on another origin: nothing relative is ours.
        return None;
    } else {
        let dir = &base[..base.rfind('/').map_or(0, |i| i + 1)];
        format!("{dir}{path}")
    };
    let mut out = normalize(&joined);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Some((authority, encode(&out)))
}

fn split_authority(rest: &str) -> Option<(Option<String>, String)> {
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = rest[..end].to_ascii_lowercase();
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let path = &rest[end..];
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    Some((Some(authority), path))
}

/// RFC 3986 remove_dot_segments on an absolute path (never above `/`).
fn normalize(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

/// Percent-encodes what may not stand in a `Link` header's `<…>` (controls, spaces,
/// non-ASCII, `<`, `>`, `"`); what is already encoded stays as it is.
fn encode(s: &str) -> String {
    use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
    const SET: &AsciiSet = &CONTROLS
        .add(b' ')
        .add(b'<')
        .add(b'>')
        .add(b'"')
        .add(b'\\')
        .add(b'^')
        .add(b'`')
        .add(b'{')
        .add(b'|')
        .add(b'}');
    utf8_percent_encode(s, SET).to_string()
}

/// A cached scan: the file version (ETag) it is valid for, and what it found.
type Entry = (String, Arc<[Subresource]>);

/// Scans of documents by (source, path), valid for one version (ETag) of the file.
#[derive(Default)]
pub struct Cache {
    map: Mutex<HashMap<(u8, String), Entry>>,
}

impl Cache {
    pub fn get(&self, source: u8, path: &str, version: &str) -> Option<Arc<[Subresource]>> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&(source, path.to_owned()))
            .filter(|(v, _)| v == version)
            .map(|(_, found)| found.clone())
    }

    pub fn insert(&self, source: u8, path: &str, version: &str, found: Arc<[Subresource]>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let key = (source, path.to_owned());
        if map.len() >= CACHE_ENTRIES
            && !map.contains_key(&key)
            && let Some(evict) = map.keys().next().cloned()
        {
            map.remove(&evict);
        }
        map.insert(key, (version.to_owned(), found));
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_str(path: &str, html: &str) -> Vec<String> {
        let mut once = Some(html.as_bytes().to_vec());
        scan(path, || once.take().map(Ok))
            .iter()
            .map(|s| s.link())
            .collect()
    }

    #[test]
    fn stylesheets_scripts_modules_and_declared_preloads_are_found_in_order() {
        let html = r#"<!doctype html><html><head>
            <link rel="stylesheet" href="/assets/style.css">
            <link rel="alternate stylesheet" href="/alt.css">
            <link rel=preload href="font.woff2" as=font crossorigin>
            <link rel=modulepreload href="./lib/dep.mjs">
            <link rel=icon href="/favicon.svg">
            <script src="app.js"></script>
            <script type=module src="main.mjs"></script>
            <script nomodule src="legacy.js"></script>
            <script type="application/json" src="data.json"></script>
            </head><body></body></html>"#;
        assert_eq!(
            scan_str("/app/index.html", html),
            vec![
                "</assets/style.css>; rel=preload; as=style",
                "</app/font.woff2>; rel=preload; as=font; crossorigin",
                "</app/lib/dep.mjs>; rel=modulepreload",
                "</app/app.js>; rel=preload; as=script",
                "</app/main.mjs>; rel=modulepreload",
            ]
        );
    }

    #[test]
    fn tags_in_comments_script_text_attributes_and_templates_are_not_subresources() {
        let html = r#"<!-- <script src="/commented.js"></script> -->
            <script>document.write('<script src="/written.js"><\/script>')</script>
            <div title='<link rel=stylesheet href="/attr.css">'></div>
            <template><link rel=stylesheet href="/template.css"></template>
            <noscript><link rel=stylesheet href="/noscript.css"></noscript>
            <textarea><script src="/textarea.js"></script></textarea>
            <script src="/real.js"></script>"#;
        assert_eq!(
            scan_str("/", html),
            vec!["</real.js>; rel=preload; as=script"]
        );
    }

    #[test]
    fn only_same_origin_urls_are_kept_and_absolute_ones_remember_their_host() {
        let mut once = Some(
            br#"<script src="https://cdn.example/x.js"></script>
            <script src="data:text/javascript,1"></script>
            <link rel=stylesheet href="//Example.com/a.css">
            <link rel=stylesheet href="../../../up.css?v=1#frag">"#
                .to_vec(),
        );
        let found = scan("/a/b.html", || once.take().map(Ok));
        assert_eq!(found.len(), 3);
        assert_eq!(found[0].authority.as_deref(), Some("cdn.example"));
        assert_eq!(found[1].authority.as_deref(), Some("example.com"));
        assert_eq!(found[1].path, "/a.css");
        assert_eq!(
            (found[2].authority.as_deref(), found[2].path.as_str()),
            (None, "/up.css?v=1")
        );
    }

    #[test]
    fn a_base_element_moves_relative_urls_and_a_foreign_base_drops_them() {
        assert_eq!(
            scan_str(
                "/x/y.html",
                r#"<base href="/static/"><script src="a.js"></script>"#
            ),
            vec!["</static/a.js>; rel=preload; as=script"]
        );
        assert!(
            scan_str(
                "/",
                r#"<base href="https://other.example/"><script src="a.js"></script>"#
            )
            .is_empty()
        );
    }

    #[test]
    fn a_huge_document_is_read_only_up_to_the_limit_and_found_entries_are_capped() {
        let mut chunks = 0usize;
        let tag = b"<script src=\"/s.js?".to_vec();
        let found = scan("/", || {
            chunks += 1;
            let mut c = Vec::new();
            for i in 0..100 {
                c.extend_from_slice(&tag);
                c.extend_from_slice(format!("{chunks}-{i}\"></script>").as_bytes());
            }
            Some(Ok(c))
        });
        assert_eq!(found.len(), MAX_FOUND);
        // ~3.6 KB per chunk: the limit stops reading after ~290 of them.
        assert!(chunks < SCAN_LIMIT / 3000, "{chunks}");
    }

    #[test]
    fn a_tag_longer_than_the_memory_limit_ends_the_scan_keeping_what_came_before() {
        let mut parts = vec![b"<script src=/first.js></script><div title=\"".to_vec()];
        for _ in 0..64 {
            parts.push(vec![b'x'; 16 * 1024]);
        }
        parts.push(b"\"><script src=/after.js></script>".to_vec());
        let mut it = parts.into_iter();
        let found = scan("/", || it.next().map(Ok));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].path, "/first.js");
    }

    #[test]
    fn paths_are_normalized_and_encoded_for_a_header() {
        assert_eq!(
            resolve("/a/b/c.html", "../d/./e f.js"),
            Some((None, "/a/d/e%20f.js".into()))
        );
        assert_eq!(
            resolve("/", "/../../etc/passwd"),
            Some((None, "/etc/passwd".into()))
        );
        assert_eq!(resolve("/", "javascript:alert(1)"), None);
        assert_eq!(resolve("/", "   "), None);
        assert_eq!(resolve("/", "/é.css"), Some((None, "/%C3%A9.css".into())));
    }

    #[test]
    fn the_cache_holds_one_version_per_document_and_stays_bounded() {
        let cache = Cache::default();
        let v: Arc<[Subresource]> = Arc::from(Vec::new());
        cache.insert(0, "/a", "\"1\"", v.clone());
        assert!(cache.get(0, "/a", "\"1\"").is_some());
        assert!(cache.get(0, "/a", "\"2\"").is_none());
        for i in 0..(CACHE_ENTRIES * 2) {
            cache.insert(0, &format!("/{i}"), "\"1\"", v.clone());
        }
        assert_eq!(cache.len(), CACHE_ENTRIES);
    }
}
