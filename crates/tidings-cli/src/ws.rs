//! What `publish --transport ws` and `subscribe --transport ws` share: the handshake on `/ws`
//! (the JSON protocol of SPEC §5), the fields of a server frame that steer the client, and the
//! text surgery that turns the protocol's frames into the records the other transports print.
//!
//! Frames are edited as text, never re-serialised, so what is printed is byte for byte what the
//! server wrote (field order, number formatting, escapes), minus the protocol's own members.
//! Over `https://` the handshake is `wss://`, with the trust `--ca-file`/`--insecure` set up.

use std::ops::Range;
use std::time::Duration;

use anyhow::anyhow;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::{AUTHORIZATION, RETRY_AFTER, USER_AGENT};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use url::Url;

use crate::client::{Client, error_chain};

/// An open `/ws` connection.
pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// TCP connect plus the upgrade; a server that takes longer is in trouble.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a goodbye (our close frame, the server's answer) may take before we just drop.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why the WebSocket could not be opened.
#[derive(Debug)]
pub enum ConnectError {
    /// Worth another attempt: the network, a 5xx, 429 or 408 (at least `after` later).
    Transient {
        why: String,
        after: Option<Duration>,
    },
    /// Another attempt cannot help: a 4xx (bad token, forbidden origin), not a WebSocket server.
    Refused(anyhow::Error),
}

impl ConnectError {
    /// For a caller that does not retry (`publish`).
    pub fn into_error(self) -> anyhow::Error {
        match self {
            ConnectError::Transient { why, .. } => anyhow!(why),
            ConnectError::Refused(err) => err,
        }
    }
}

/// `ws://{host}{prefix}/ws` (`wss://` over https) for the server behind `--url`.
pub fn endpoint(client: &Client) -> Url {
    let mut url = client.endpoint(&["ws"]);
    // `--url` is always http:// or https:// by now, and all four are "special" schemes, so
    // the switch cannot fail.
    let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
    let _ = url.set_scheme(scheme);
    url
}

/// Opens `/ws`, presenting `--token` as `Authorization: Bearer` on the handshake.
pub async fn connect(client: &Client) -> Result<Socket, ConnectError> {
    let url = endpoint(client);
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|err| ConnectError::Refused(anyhow!("cannot connect to {url}: {err}")))?;
    let headers = request.headers_mut();
    headers.insert(
        USER_AGENT,
        HeaderValue::from_static(concat!("tidings-cli/", env!("CARGO_PKG_VERSION"))),
    );
    if let Some(token) = client.token() {
        let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            ConnectError::Refused(anyhow!(
                "--token holds characters that cannot be sent in an HTTP header"
            ))
        })?;
        headers.insert(AUTHORIZATION, value);
    }
    // Nagle off: frames are small and each one is worth sending at once.
    let connector = tokio_tungstenite::Connector::Rustls(client.tls().clone());
    let handshake =
        tokio_tungstenite::connect_async_tls_with_config(request, None, true, Some(connector));
    match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
        Err(_) => Err(ConnectError::Transient {
            why: format!(
                "{url} did not complete the WebSocket handshake within {}s",
                CONNECT_TIMEOUT.as_secs()
            ),
            after: None,
        }),
        Ok(Ok((socket, _response))) => Ok(socket),
        Ok(Err(err)) => Err(classify(client, &url, err)),
    }
}

fn classify(client: &Client, url: &Url, err: tungstenite::Error) -> ConnectError {
    match err {
        // Anything but 101: the server's JSON error, read like an HTTP reply.
        tungstenite::Error::Http(response) => {
            let status = response.status();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = response.body().as_deref().unwrap_or_default();
            let error = client.api_error_from(status, retry_after, body);
            if status.is_server_error()
                || status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::REQUEST_TIMEOUT
            {
                ConnectError::Transient {
                    why: error.to_string(),
                    after: error.retry_after,
                }
            } else {
                ConnectError::Refused(
                    anyhow::Error::new(error)
                        .context(format!("the WebSocket connection to {url} was refused")),
                )
            }
        }
        tungstenite::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            ConnectError::Transient {
                why: format!("{:#}", client.no_server()),
                after: None,
            }
        }
        tungstenite::Error::Io(io) => match crate::tls::explain(&io) {
            // A refused certificate stays refused: say why, and do not retry.
            Some(why) => ConnectError::Refused(anyhow!("could not connect to {url}: {why}")),
            None => ConnectError::Transient {
                why: format!("could not connect to {url}: {}", error_chain(&io)),
                after: None,
            },
        },
        tungstenite::Error::Protocol(err) => ConnectError::Refused(anyhow!(
            "{url} did not answer with a WebSocket handshake ({err}); is --url a Tidings server?"
        )),
        tungstenite::Error::Url(err) => ConnectError::Refused(anyhow!("{url}: {err}")),
        other => ConnectError::Transient {
            why: format!("the WebSocket connection to {url} failed: {other}"),
            after: None,
        },
    }
}

/// Ends the connection politely: our close frame, then whatever the server still sends until
/// its own close, all bounded in time. Errors mean it is already gone, which is fine too.
pub async fn close(socket: &mut Socket) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if socket.close(None).await.is_ok() {
            while let Some(Ok(_)) = socket.next().await {}
        }
    })
    .await;
}

/// The members of a server frame that steer the client; the rest is only printed.
#[derive(Debug, Default, Deserialize)]
pub struct Frame {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Echoed from the request (replies only).
    pub id: Option<serde_json::Value>,
    pub channel: Option<String>,
    pub cursor: Option<String>,
    /// Set on an error reply.
    pub error: Option<ReplyError>,
    /// Why the server is ending the connection (a `disconnect` frame).
    pub reason: Option<String>,
}

/// `{"code","message"}` of an error reply.
#[derive(Debug, Deserialize)]
pub struct ReplyError {
    pub code: String,
    #[serde(default)]
    pub message: String,
}

impl Frame {
    /// The request `id` this frame answers, when it is one of ours (a whole number).
    pub fn reply_to(&self) -> Option<u64> {
        match self.kind.as_deref() {
            Some("reply") => self.id.as_ref()?.as_u64(),
            _ => None,
        }
    }
}

/// Reads a text frame; the protocol only ever sends JSON objects.
pub fn parse_frame(text: &str) -> anyhow::Result<Frame> {
    let snippet = || text.chars().take(120).collect::<String>();
    if !text.trim_start().starts_with('{') {
        anyhow::bail!(
            "the server sent a WebSocket frame that is not a JSON object: {}",
            snippet()
        );
    }
    serde_json::from_str(text).map_err(|err| {
        anyhow!(
            "the server sent a WebSocket frame that is not valid JSON ({err}): {}",
            snippet()
        )
    })
}

/// A successful publish reply as the position the HTTP publish prints: the reply's own
/// members (`type`, `id`, `ok`) spliced out, everything else as sent.
pub fn position_of_reply(reply: &str) -> Option<String> {
    let mut text = reply.trim().to_owned();
    for key in ["type", "id", "ok"] {
        if let Some((rest, _)) = remove_member(&text, key) {
            text = rest;
        }
    }
    members(&text).map(|_| text)
}

/// One top-level member of an object's text: its whole extent, the key between its quotes
/// (still escaped), and the value.
#[derive(Debug)]
struct Member {
    span: Range<usize>,
    key: Range<usize>,
    value: Range<usize>,
}

/// `object` without its top-level member `key`, and that member's value text. `None` when
/// `object` is not a JSON object or has no such member. Members nested in values are never
/// touched, so a `"type"` inside `data` stays.
pub fn remove_member<'a>(object: &'a str, key: &str) -> Option<(String, &'a str)> {
    let all = members(object)?;
    let at = all.iter().position(|m| &object[m.key.clone()] == key)?;
    let member = &all[at];
    // With the member goes one comma: the one after it, or, for the last, the one before it.
    let cut = match (all.get(at + 1), at.checked_sub(1).map(|i| &all[i])) {
        (Some(next), _) => member.span.start..next.span.start,
        (None, Some(previous)) => previous.span.end..member.span.end,
        (None, None) => member.span.clone(),
    };
    let rest = format!("{}{}", &object[..cut.start], &object[cut.end..]);
    Some((rest, &object[member.value.clone()]))
}

/// `object` with `"key":value` added as its last member (`value` is JSON text).
pub fn append_member(object: &str, key: &str, value: &str) -> Option<String> {
    let empty = members(object)?.is_empty();
    let body = object.trim_end().strip_suffix('}')?.trim_end();
    let comma = if empty { "" } else { "," };
    Some(format!("{body}{comma}\"{key}\":{value}}}"))
}

/// The top-level members of a JSON object's text, or `None` if it is not one object. Only the
/// structure is checked (strings, nesting, separators); the values themselves are the server's
/// business and are checked by `serde_json` where they matter.
fn members(object: &str) -> Option<Vec<Member>> {
    let b = object.as_bytes();
    let mut i = skip_whitespace(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_whitespace(b, i + 1);
    let mut all = Vec::new();
    if b.get(i) == Some(&b'}') {
        return (skip_whitespace(b, i + 1) == b.len()).then_some(all);
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = skip_string(b, i)?;
        let key = i + 1..key_end - 1;
        let start = i;
        i = skip_whitespace(b, key_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_whitespace(b, i + 1);
        let value_end = skip_value(b, i)?;
        all.push(Member {
            span: start..value_end,
            key,
            value: i..value_end,
        });
        i = skip_whitespace(b, value_end);
        match b.get(i)? {
            b',' => i = skip_whitespace(b, i + 1),
            b'}' => return (skip_whitespace(b, i + 1) == b.len()).then_some(all),
            _ => return None,
        }
    }
}

fn skip_whitespace(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// Just past the string whose opening quote is at `i`.
fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

/// Just past the value that starts at `i`.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        b',' | b'}' | b']' | b':' => None,
        _ => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            {
                j += 1;
            }
            Some(j)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removing_the_first_member_takes_the_comma_after_it() {
        let (rest, value) =
            remove_member(r#"{"type":"message","channel":"a","offset":1}"#, "type").unwrap();
        assert_eq!(rest, r#"{"channel":"a","offset":1}"#);
        assert_eq!(value, r#""message""#);
    }

    #[test]
    fn removing_the_last_member_takes_the_comma_before_it() {
        let (rest, value) = remove_member(r#"{"a":1, "type" : "gap" }"#, "type").unwrap();
        assert_eq!(rest, r#"{"a":1 }"#);
        assert_eq!(value, r#""gap""#);
    }

    #[test]
    fn removing_the_only_member_leaves_an_empty_object() {
        let (rest, _) = remove_member(r#"{"type":"pong"}"#, "type").unwrap();
        assert_eq!(rest, "{}");
        assert!(members(&rest).unwrap().is_empty());
    }

    #[test]
    fn members_nested_in_values_and_lookalikes_in_strings_are_left_alone() {
        let frame = r#"{"data":{"type":"x","s":"\",\"type\":1"},"list":[{"type":2}],"type":"message","n":-1.50e3}"#;
        let (rest, value) = remove_member(frame, "type").unwrap();
        assert_eq!(
            rest,
            r#"{"data":{"type":"x","s":"\",\"type\":1"},"list":[{"type":2}],"n":-1.50e3}"#
        );
        assert_eq!(value, r#""message""#);
        // Only the top level counts: this object has no top-level "type".
        assert!(remove_member(r#"{"data":{"type":"x"}}"#, "type").is_none());
    }

    #[test]
    fn text_that_is_not_one_object_has_no_members() {
        for text in [
            "",
            "[]",
            r#""type""#,
            r#"{"a":1"#,
            r#"{"a":1}{"b":2}"#,
            r#"{"a" 1}"#,
            r#"{"a":}"#,
            r#"{"a":"open}"#,
            r#"{"a":[1}"#,
        ] {
            assert!(members(text).is_none(), "{text:?} was taken for an object");
        }
        assert_eq!(members(" {\n} \n").map(|m| m.len()), Some(0));
    }

    #[test]
    fn a_member_is_appended_after_the_last_one() {
        assert_eq!(
            append_member(r#"{"a":1}"#, "cursor", r#""c""#).unwrap(),
            r#"{"a":1,"cursor":"c"}"#
        );
        assert_eq!(
            append_member("{ }", "cursor", r#""c""#).unwrap(),
            r#"{"cursor":"c"}"#
        );
    }

    #[test]
    fn a_publish_reply_becomes_the_position_the_http_publish_prints() {
        // What the server sends (serde_json orders keys alphabetically) …
        let reply = r#"{"channel":"news","cursor":"Y2","epoch":"h3k9","id":1,"ok":true,"offset":2,"time":1732200000123,"type":"reply"}"#;
        // … and what POST /publish/{channel} answers for the same message.
        assert_eq!(
            position_of_reply(reply).unwrap(),
            r#"{"channel":"news","cursor":"Y2","epoch":"h3k9","offset":2,"time":1732200000123}"#
        );
    }

    #[test]
    fn frames_are_read_for_their_steering_members_only() {
        let frame = parse_frame(
            r#"{"type":"reply","id":3,"error":{"code":"invalid_channel","message":"bad"},"extra":[1]}"#,
        )
        .unwrap();
        assert_eq!(frame.reply_to(), Some(3));
        let error = frame.error.unwrap();
        assert_eq!(
            (error.code.as_str(), error.message.as_str()),
            ("invalid_channel", "bad")
        );
        let message = parse_frame(r#"{"type":"message","id":3,"cursor":"c"}"#).unwrap();
        assert_eq!(message.reply_to(), None, "only replies answer requests");
        assert!(parse_frame("[1]").is_err());
        assert!(parse_frame("{oops}").is_err());
    }

    #[test]
    fn the_endpoint_is_the_ws_path_on_the_same_server_with_the_ws_scheme() {
        let tls = crate::tls::TlsArgs::default();
        let client = Client::new("http://127.0.0.1:9/prefix/", None, &tls).unwrap();
        assert_eq!(endpoint(&client).as_str(), "ws://127.0.0.1:9/prefix/ws");
        let client = Client::new("ws://localhost:8080", None, &tls).unwrap();
        assert_eq!(endpoint(&client).as_str(), "ws://localhost:8080/ws");
        let client = Client::new("https://localhost:8443/p", None, &tls).unwrap();
        assert_eq!(endpoint(&client).as_str(), "wss://localhost:8443/p/ws");
        let client = Client::new("wss://localhost:8443", None, &tls).unwrap();
        assert_eq!(endpoint(&client).as_str(), "wss://localhost:8443/ws");
    }
}
