//! A lean answer: what the hot routes (a publish, a poll) reply with, written by the lean
//! HTTP/1.1 path without building a `Response` (issue 17: a response's `HeaderMap` was two
//! allocations, its boxed body one, and a reply's text turned into `Bytes` one more).
//!
//! A `Reply` is a status, a content type, a few header lines and a body that is already
//! whole: `h1` writes its head and body into one buffer, one allocation per answer. A body
//! may be shared (`ReplyBody::Shared`): a long poll's answer to one message is encoded once
//! and the same bytes go to every poller of the channel (`transport::short_poll`). Every
//! other path (HTTP/2, hyper, an answer that must carry CORS headers or an access-log entry)
//! turns it into a `Response` with the same headers, in the same order.

use std::sync::Arc;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http::{HeaderName, HeaderValue, Response, StatusCode, header};
use tidings_core::Message;

/// What the service answers with: a full response, or a lean reply.
// A `Reply` (504 bytes with its inline body) lives briefly, on its way to being
// written; boxing it would be the allocation per answer that it exists to save.
#[allow(clippy::large_enum_variant)]
pub enum Answer {
    Response(Response<Body>),
    Reply(Reply),
    /// Already written, from the publishing side, to the socket the connection lent a held
    /// long poll (`net::held`): the connection only takes its socket back.
    Sent,
}

impl From<Response<Body>> for Answer {
    fn from(res: Response<Body>) -> Self {
        Answer::Response(res)
    }
}

impl From<Reply> for Answer {
    fn from(reply: Reply) -> Self {
        Answer::Reply(reply)
    }
}

impl Answer {
    pub fn into_response(self) -> Response<Body> {
        match self {
            Answer::Response(res) => res,
            Answer::Reply(reply) => reply.into_response(),
            // Only the lean path lends a socket, and it never asks for a response then.
            Answer::Sent => crate::net::error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "an answer written elsewhere",
            ),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Answer::Response(res) => res.status(),
            Answer::Reply(reply) => reply.status,
            Answer::Sent => StatusCode::OK,
        }
    }
}

/// A header value a reply carries without a `HeaderValue`.
pub enum Text {
    Static(&'static str),
    /// Written between double quotes (an `ETag`).
    Quoted(Bytes),
    /// Short text kept in the reply (`wait=30`, a quoted cursor).
    Inline([u8; INLINE_TEXT], u8),
}

/// The longest header value a reply keeps inline: a one-channel cursor between quotes fits.
const INLINE_TEXT: usize = 48;

impl Text {
    /// `s` kept in the reply when it fits.
    pub fn inline(s: &[u8]) -> Option<Self> {
        Self::inline_parts(&[s])
    }

    /// `s` between double quotes (an `ETag`), kept in the reply when it fits: a cursor
    /// shared with a message would otherwise be promoted to shared bytes (an allocation).
    pub fn quoted_inline(s: &[u8]) -> Option<Self> {
        Self::inline_parts(&[b"\"", s, b"\""])
    }

    fn inline_parts(parts: &[&[u8]]) -> Option<Self> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > INLINE_TEXT {
            return None;
        }
        let mut text = [0u8; INLINE_TEXT];
        let mut at = 0;
        for part in parts {
            text[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        Some(Text::Inline(text, u8::try_from(len).ok()?))
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Text::Static(s) => out.extend_from_slice(s.as_bytes()),
            Text::Quoted(b) => {
                out.push(b'"');
                out.extend_from_slice(b);
                out.push(b'"');
            }
            Text::Inline(text, len) => out.extend_from_slice(&text[..usize::from(*len)]),
        }
    }

    fn len(&self) -> usize {
        match self {
            Text::Static(s) => s.len(),
            Text::Quoted(b) => b.len() + 2,
            Text::Inline(_, len) => usize::from(*len),
        }
    }

    fn value(&self) -> Option<HeaderValue> {
        match self {
            Text::Static(s) => Some(HeaderValue::from_static(s)),
            _ => {
                let mut v = Vec::with_capacity(self.len());
                self.write(&mut v);
                HeaderValue::from_maybe_shared(Bytes::from(v)).ok()
            }
        }
    }
}

// `Inline` is the point: a short body kept in the reply, which lives briefly on its way out.
#[allow(clippy::large_enum_variant)]
pub enum ReplyBody {
    /// Shared with other answers: a long poll's reply to one message, in the message's own
    /// buffer (`Message::poll_reply`). The message is what is shared: sharing its buffer as
    /// `Bytes` was one more allocation per message (issue 17).
    Shared(Arc<Message>),
    /// This answer's own.
    Owned(BytesMut),
    /// Short text kept in the reply itself (a publish's answer): written with the head, it
    /// needs no allocation of its own.
    Inline([u8; INLINE], u16),
}

/// The longest body a reply keeps inline.
pub const INLINE: usize = 256;

impl ReplyBody {
    /// `parts` one after another: inline when they fit, else in a buffer of their own.
    pub fn joined(parts: &[&[u8]]) -> Self {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len <= INLINE {
            let mut text = [0u8; INLINE];
            let mut at = 0;
            for part in parts {
                text[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
            // `len` fits: it is at most `INLINE`.
            return ReplyBody::Inline(text, len as u16);
        }
        let mut out = BytesMut::with_capacity(len);
        for part in parts {
            out.extend_from_slice(part);
        }
        ReplyBody::Owned(out)
    }
}

impl std::ops::Deref for ReplyBody {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            ReplyBody::Shared(m) => m.poll_reply(),
            ReplyBody::Owned(b) => b,
            ReplyBody::Inline(text, len) => &text[..usize::from(*len)],
        }
    }
}

/// A message's poll reply as the bytes of a response body.
struct SharedReply(Arc<Message>);

impl AsRef<[u8]> for SharedReply {
    fn as_ref(&self) -> &[u8] {
        self.0.poll_reply()
    }
}

/// At most this many header lines besides `content-type` (a poll answer has three, a
/// publish at most one): each slot is 72 bytes of every reply, moved with it.
const MAX_HEADERS: usize = 3;

/// See the module comment. Header names are lowercase, as `HeaderName` would write them.
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    headers: [Option<(&'static str, Text)>; MAX_HEADERS],
    pub body: ReplyBody,
}

impl Reply {
    pub fn new(status: StatusCode, content_type: &'static str, body: ReplyBody) -> Self {
        Self {
            status,
            content_type,
            headers: Default::default(),
            body,
        }
    }

    /// Adds a header line (`name` in lowercase). Callers are this crate's handlers, which
    /// add at most `MAX_HEADERS` (checked in debug builds and by the tests of each reply).
    /// In place: a reply passed through by value was copied whole for each header.
    pub fn header(&mut self, name: &'static str, value: Text) -> &mut Self {
        let slot = self.headers.iter_mut().find(|h| h.is_none());
        debug_assert!(slot.is_some(), "a Reply holds {MAX_HEADERS} headers");
        if let Some(slot) = slot {
            *slot = Some((name, value));
        }
        self
    }

    /// `content-type` and the header lines, each ending in CRLF.
    pub fn write_headers(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"content-type: ");
        out.extend_from_slice(self.content_type.as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in self.headers.iter().flatten() {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            value.write(out);
            out.extend_from_slice(b"\r\n");
        }
    }

    /// Bytes `write_headers` writes.
    pub fn headers_len(&self) -> usize {
        16 + self.content_type.len()
            + self
                .headers
                .iter()
                .flatten()
                .map(|(name, value)| name.len() + value.len() + 4)
                .sum::<usize>()
    }

    pub fn into_response(self) -> Response<Body> {
        let body = match self.body {
            // The fallback paths (h2, CORS, the access log): the message owns the bytes.
            ReplyBody::Shared(m) => Bytes::from_owner(SharedReply(m)),
            ReplyBody::Owned(b) => b.freeze(),
            ReplyBody::Inline(text, len) => Bytes::copy_from_slice(&text[..usize::from(len)]),
        };
        let mut res = Response::new(Body::from(body));
        *res.status_mut() = self.status;
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        for (name, value) in self.headers.into_iter().flatten() {
            if let Some(value) = value.value() {
                h.append(HeaderName::from_static(name), value);
            }
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_writes_the_headers_it_would_have_as_a_response() {
        let mut reply = Reply::new(
            StatusCode::OK,
            "application/json",
            ReplyBody::Owned(BytesMut::from(&b"{}"[..])),
        );
        reply
            .header("cache-control", Text::Static("no-cache"))
            .header(
                "etag",
                Text::quoted_inline(b"abc").unwrap_or(Text::Static("")),
            )
            .header(
                "preference-applied",
                Text::inline(b"wait=30").unwrap_or(Text::Static("")),
            );
        let mut head = Vec::new();
        reply.write_headers(&mut head);
        assert_eq!(head.len(), reply.headers_len());
        assert_eq!(
            String::from_utf8_lossy(&head),
            "content-type: application/json\r\ncache-control: no-cache\r\netag: \"abc\"\r\npreference-applied: wait=30\r\n"
        );
        let res = reply.into_response();
        let h = res.headers();
        assert_eq!(h[header::CONTENT_TYPE], "application/json");
        assert_eq!(h[header::CACHE_CONTROL], "no-cache");
        assert_eq!(h[header::ETAG], "\"abc\"");
        assert_eq!(h["preference-applied"], "wait=30");
    }

    #[test]
    fn a_reply_stays_small_enough_to_move() {
        // A reply is moved by value from its handler to the writer (issue 17: `memcpy` per
        // delivery rose when it grew). These are today's sizes; growing them is a choice.
        eprintln!(
            "Reply {} Answer {} ReplyBody {} Text {}",
            size_of::<Reply>(),
            size_of::<Answer>(),
            size_of::<ReplyBody>(),
            size_of::<Text>()
        );
        assert!(size_of::<Text>() <= 56);
        assert!(size_of::<Reply>() <= 504, "{}", size_of::<Reply>());
        assert!(size_of::<Answer>() <= 504, "{}", size_of::<Answer>());
    }

    #[test]
    fn a_joined_body_is_its_parts_inline_or_not() {
        let small = ReplyBody::joined(&[b"{\"a\":", b"1", b"}"]);
        assert!(matches!(small, ReplyBody::Inline(..)));
        assert_eq!(&small[..], b"{\"a\":1}");
        let long = vec![b'x'; INLINE];
        let large = ReplyBody::joined(&[b"\"", &long, b"\""]);
        assert!(matches!(large, ReplyBody::Owned(_)));
        assert_eq!(large.len(), INLINE + 2);
        let exact = ReplyBody::joined(&[&long]);
        assert!(matches!(exact, ReplyBody::Inline(..)));
        assert_eq!(&exact[..], &long[..]);
    }
}
