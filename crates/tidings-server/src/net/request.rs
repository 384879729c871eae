//! A request the lean HTTP/1.1 path parsed, as slices of the connection's read buffer: its
//! method, path, query, header lines and body, with no `http::Request`, no `HeaderMap` and no
//! boxed body (issue 17: those were four of a publish's allocations).
//!
//! The application reads the few headers a hot route needs through [`Headers`], which a
//! `HeaderMap` implements too, so one handler serves both this request and a full one (HTTP/2,
//! hyper, the router). Anything else — another route, CORS, an access log, a WebSocket
//! handshake — asks for the full request ([`LeanRequest::to_full`]), built exactly as the lean
//! path built it before.
//!
//! Only a plain request is kept lean (`h1::parse` decides): an origin-form target of plain
//! characters, header names that are tokens and values `http` takes, at most `MAX_LEAN`
//! header lines. Every other request the lean path takes is a full `Request` from the start,
//! so whatever `http` would refuse or rewrite still is (the same 400, the same URI).

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};

use crate::net::upgrade::Upgradable;

/// Header lines a lean request holds; a request with more is a full one.
pub const MAX_LEAN: usize = 32;

/// Where a header line's name and value lie in the head (offsets into the read buffer; a
/// head is at most `h1::MAX_HEAD`, and a value ends before its closing blank line, so they
/// fit 16 bits: the spans are half of what the exchange's boxed future holds for a request).
#[derive(Clone, Copy, Default)]
pub(crate) struct Span {
    pub name: (u16, u16),
    pub value: (u16, u16),
}

/// What `h1::parse` found in a plain head: offsets, so it borrows nothing while the body is
/// read behind it.
pub(crate) struct LeanHead {
    pub method: Method,
    /// The request target; `query_at`: where its `?` is, if it has one.
    pub target: (u32, u32),
    pub query_at: Option<u32>,
    pub headers: [Span; MAX_LEAN],
    pub count: usize,
    /// The head's length; the body follows it in the buffer.
    pub len: usize,
    pub body: usize,
    pub upgradable: bool,
}

/// A parsed request over the bytes it came in (see the module comment).
pub struct LeanRequest<'a> {
    bytes: &'a [u8],
    head: &'a LeanHead,
}

impl<'a> LeanRequest<'a> {
    /// `bytes`: the read buffer, starting at the head, with the whole body in it.
    pub(crate) fn new(bytes: &'a [u8], head: &'a LeanHead) -> Self {
        Self { bytes, head }
    }

    fn at(&self, (start, end): (usize, usize)) -> &'a [u8] {
        self.bytes.get(start..end).unwrap_or_default()
    }

    fn text(&self, span: (u32, u32)) -> &'a str {
        // `parse` kept only printable ASCII targets.
        std::str::from_utf8(self.at((span.0 as usize, span.1 as usize))).unwrap_or_default()
    }

    pub fn method(&self) -> &Method {
        &self.head.method
    }

    /// The path, as `Uri::path` gives it.
    pub fn path(&self) -> &'a str {
        let (start, end) = self.head.target;
        self.text((start, self.head.query_at.unwrap_or(end)))
    }

    /// The query without its `?` (`Some("")` for a bare `?`), as `Uri::query` gives it.
    pub fn query(&self) -> Option<&'a str> {
        let at = self.head.query_at?;
        Some(self.text((at + 1, self.head.target.1)))
    }

    pub fn body(&self) -> &'a [u8] {
        let len = self.head.len;
        self.bytes
            .get(len..len + self.head.body)
            .unwrap_or_default()
    }

    /// The request as `http` has it, for every route that is not a hot one: built as the
    /// lean path built it before (one copy of the head and body, their values slices of it).
    /// `None` if `http` refuses a part, which `parse` made sure it does not.
    pub fn to_full(&self) -> Option<Request<Body>> {
        let end = (self.head.len + self.head.body).min(self.bytes.len());
        let all = Bytes::copy_from_slice(self.bytes.get(..end)?);
        let slice = |(s, e): (usize, usize)| (s <= e && e <= all.len()).then(|| all.slice(s..e));
        let mut map = HeaderMap::with_capacity(self.head.count);
        for span in &self.head.headers[..self.head.count] {
            let name = HeaderName::from_bytes(self.at(wide(span.name))).ok()?;
            let value = HeaderValue::from_maybe_shared(slice(wide(span.value))?).ok()?;
            map.append(name, value);
        }
        let (s, e) = self.head.target;
        let uri = http::Uri::from_maybe_shared(slice((s as usize, e as usize))?).ok()?;
        let body = all.slice(self.head.len.min(all.len())..);
        let mut req = Request::new(if body.is_empty() {
            Body::empty()
        } else {
            Body::from(body)
        });
        *req.method_mut() = self.head.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = map;
        if self.head.upgradable {
            req.extensions_mut().insert(Upgradable);
        }
        Some(req)
    }
}

fn wide((start, end): (u16, u16)) -> (usize, usize) {
    (usize::from(start), usize::from(end))
}

/// The header reads a handler makes, over a `HeaderMap` or a lean request alike. Names are
/// given in lowercase and match in any case, as `HeaderMap` matches them.
pub trait Headers {
    /// Every value of `name`, in the order sent.
    fn all<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> + 's;

    /// The first value of `name` (`HeaderMap::get`).
    fn first<'s>(&'s self, name: &'s str) -> Option<&'s [u8]> {
        self.all(name).next()
    }

    fn has(&self, name: &str) -> bool {
        self.first(name).is_some()
    }

    /// The first value of `name` as text, if it is visible ASCII (`HeaderValue::to_str`).
    /// `Some(Err(NotText))`: there is one, and it is not.
    fn text<'s>(&'s self, name: &'s str) -> Option<Result<&'s str, NotText>> {
        self.first(name).map(text)
    }
}

/// A header value with a byte outside visible ASCII (and tab).
#[derive(Debug)]
pub struct NotText;

/// `value` as text if every byte is visible ASCII or a tab: what `HeaderValue::to_str`
/// accepts, byte for byte.
pub fn text(value: &[u8]) -> Result<&str, NotText> {
    if value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        std::str::from_utf8(value).map_err(|_| NotText)
    } else {
        Err(NotText)
    }
}

impl Headers for HeaderMap {
    fn all<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> + 's {
        self.get_all(name).into_iter().map(HeaderValue::as_bytes)
    }
}

impl Headers for LeanRequest<'_> {
    fn all<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> + 's {
        self.head.headers[..self.head.count]
            .iter()
            .filter(move |span| {
                self.at(wide(span.name))
                    .eq_ignore_ascii_case(name.as_bytes())
            })
            .map(|span| self.at(wide(span.value)))
    }
}

/// Whether `name` is a token `HeaderName` takes as it is (RFC 9110 `tchar`).
pub(crate) fn plain_name(name: &[u8]) -> bool {
    !name.is_empty() && name.iter().all(|&b| TCHAR[usize::from(b)])
}

/// `b` in `bytes`, for the tables below (`[u8]::contains` is a `memchr` call: per byte of
/// every request's target and header names, it was a third of the plain-head checks).
const fn table(alphanumeric: bool, bytes: &[u8]) -> [bool; 256] {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = alphanumeric && (i as u8).is_ascii_alphanumeric();
        i += 1;
    }
    let mut j = 0;
    while j < bytes.len() {
        t[bytes[j] as usize] = true;
        j += 1;
    }
    t
}

const TCHAR: [bool; 256] = table(true, b"!#$%&'*+-.^_`|~");
/// Printable bytes `http` refuses in a target or treats specially (`#` starts a fragment).
const NOT_IN_TARGET: [bool; 256] = table(false, b"\"#<>`{}");

/// Whether `HeaderValue` takes `value` (`HeaderValue::from_bytes`'s rule).
pub(crate) fn plain_value(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| (b >= 0x20 && b != 0x7f) || b == b'\t')
}

/// Where the `?` of an origin-form target is, if the target is plain: it starts with `/`,
/// is printable ASCII without the characters `http` refuses or treats specially (`#` starts a
/// fragment it drops), and is short enough for `Uri`. `Err(())`: not plain.
pub(crate) fn plain_target(target: &[u8]) -> Result<Option<usize>, ()> {
    if target.first() != Some(&b'/') || target.len() >= usize::from(u16::MAX) - 1 {
        return Err(());
    }
    let plain = |&b: &u8| (0x21..0x7f).contains(&b) && !NOT_IN_TARGET[usize::from(b)];
    if !target.iter().all(plain) {
        return Err(());
    }
    Ok(target.iter().position(|&b| b == b'?'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_what_header_value_to_str_accepts() {
        for bytes in [
            &b"plain"[..],
            b"tab\there",
            b"caf\xc3\xa9",
            b"\x7f",
            b"",
            b" spaced ",
            b"\x80",
        ] {
            let ours = text(bytes).ok();
            let theirs = HeaderValue::from_bytes(bytes)
                .ok()
                .and_then(|v| v.to_str().ok().map(str::to_owned));
            assert_eq!(ours.map(str::to_owned), theirs, "{bytes:?}");
        }
    }

    #[test]
    fn a_plain_target_is_one_uri_takes_with_the_same_path_and_query() {
        for target in [
            "/publish/a:b",
            "/poll/x?wait=10",
            "/poll?",
            "/p?a=b?c",
            "/",
            "/a%20b?x=%41",
        ] {
            let at = plain_target(target.as_bytes()).expect("plain");
            let uri: http::Uri = target.parse().expect("a URI");
            assert_eq!(&target[..at.unwrap_or(target.len())], uri.path());
            assert_eq!(at.map(|q| &target[q + 1..]), uri.query(), "{target}");
        }
        for target in [
            "*",
            "http://h/x",
            "/a#f",
            "/a b",
            "/\"",
            "/{x}",
            "/caf\u{e9}",
            "",
        ] {
            assert!(plain_target(target.as_bytes()).is_err(), "{target}");
        }
    }

    #[test]
    fn the_byte_tables_are_the_lists_they_replace() {
        for b in 0..=255u8 {
            let tchar = b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            assert_eq!(plain_name(&[b]), tchar, "{b}");
            let in_target = (0x21..0x7f).contains(&b) && !b"\"#<>`{}".contains(&b);
            assert_eq!(plain_target(&[b'/', b]).is_ok(), in_target, "{b}");
        }
    }

    #[test]
    fn plain_names_and_values_are_ones_http_takes() {
        for name in [
            &b"content-type"[..],
            b"X-Idempotency_Key",
            b"a.b!#$%&'*+^`|~",
        ] {
            assert!(plain_name(name));
            assert!(HeaderName::from_bytes(name).is_ok());
        }
        for name in [&b""[..], b"a b", b"a:b", b"\"q\"", b"caf\xc3\xa9"] {
            assert!(!plain_name(name));
        }
        for value in [&b"x\x01"[..], b"\x7f", b"a\rb"] {
            assert!(!plain_value(value));
            assert!(HeaderValue::from_bytes(value).is_err());
        }
        assert!(plain_value(b"caf\xc3\xa9\tok"));
    }
}
