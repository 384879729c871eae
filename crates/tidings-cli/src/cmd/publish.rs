//! `tidings publish CHANNEL [DATA|-]`: one `POST /publish/{channel}` (or, with `--transport ws`,
//! one `publish` op on `/ws`), the position printed as one JSON line.

use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use reqwest::header::CONTENT_TYPE;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{Client, error_chain, one_line};
use crate::ws::{self, ConnectError, Socket};

/// A publish is one small request; anything slower than this is a server in trouble.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// Channel to publish to, e.g. `chat:lobby`.
    pub channel: String,

    /// The message. JSON text is sent as JSON, anything else as a string. `-` or nothing reads
    /// it from stdin (one trailing newline dropped from text).
    pub data: Option<String>,

    /// Event name attached to the message.
    #[arg(long, value_name = "E")]
    pub event: Option<String>,

    /// Server base URL.
    #[arg(long, env = "TIDINGS_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,

    /// Bearer token (API key or JWT).
    #[arg(long, env = "TIDINGS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,

    /// Content type to send instead of the guessed one, e.g. `application/octet-stream`.
    #[arg(long, value_name = "CT")]
    pub content_type: Option<String>,

    /// How to publish.
    #[arg(long, value_enum, default_value_t = PublishTransport::Http)]
    pub transport: PublishTransport,

    /// Tries after the first when the server answers 503 (`outcome_unknown`,
    /// `broker_unavailable`) or the connection fails. Every try carries the same
    /// `Idempotency-Key`, so a retry never stores the message twice.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub retries: u32,

    /// The `Idempotency-Key` to send (default: a random one per invocation). The server
    /// answers a repeat within its `idempotency_window` with the first publish's position.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
}

/// Waits between tries: the server's `Retry-After` (capped), else this, doubling.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// The wire a message is published over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PublishTransport {
    /// `POST /publish/{channel}`.
    Http,
    /// WebSocket: one `publish` op on `/ws`, answered with the position.
    Ws,
}

pub async fn run(args: PublishArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.url, args.token.clone(), &args.tls)?;
    let body = match args.data.as_deref() {
        None | Some("-") => Body::Stdin(read_stdin().await?),
        Some(data) => Body::Argument(data.to_owned()),
    };
    let (bytes, content_type) = body.into_request(args.content_type.as_deref());
    let key = match args.idempotency_key.as_deref() {
        Some(k) => tidings_core::IdempotencyKey::new(k)
            .map_err(|e| anyhow!("--idempotency-key {k:?}: {e}"))?,
        None => tidings_core::IdempotencyKey::random(),
    };
    if args.transport == PublishTransport::Ws {
        return publish_ws(&client, &args, bytes, &content_type, &key).await;
    }

    let mut url = client.endpoint(&["publish", &args.channel]);
    if let Some(event) = &args.event {
        url.query_pairs_mut().append_pair("event", event);
    }
    let failed = || format!("publishing to {:?} failed", args.channel);
    let mut pause = RETRY_FIRST;
    let mut tries_left = args.retries;
    let response = loop {
        let sent = client
            .post(url.clone())
            .header(CONTENT_TYPE, &content_type)
            .header("Idempotency-Key", key.as_str())
            .timeout(PUBLISH_TIMEOUT)
            .body(bytes.clone())
            .send()
            .await;
        let wait = match sent {
            Ok(response) if response.status().is_success() => break response,
            Ok(response) if response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                let error = client.api_error(response).await;
                if tries_left == 0 {
                    return Err(anyhow::Error::new(error).context(failed()));
                }
                eprintln!("tidings: {error}; trying again with the same Idempotency-Key");
                error.retry_after.map_or(pause, |d| d.min(RETRY_MAX))
            }
            Ok(response) => {
                let error = client.api_error(response).await;
                return Err(anyhow::Error::new(error).context(failed()));
            }
            Err(err) => {
                // The request may have reached the server: only the key makes a retry safe.
                // (Nobody listening is reported at once: that is a wrong --url, mostly.)
                let error = client.unreachable(&err);
                if tries_left == 0 || crate::client::is_connection_refused(&err) {
                    return Err(error.context(failed()));
                }
                eprintln!("tidings: {error:#}; trying again with the same Idempotency-Key");
                pause
            }
        };
        tries_left -= 1;
        tokio::time::sleep(wait).await;
        pause = (pause * 2).min(RETRY_MAX);
    };
    let reply = response
        .bytes()
        .await
        .map_err(|err| client.unreachable(&err))
        .context("reading the publish reply")?;
    let reply = String::from_utf8_lossy(&reply);
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", one_line(&reply))
        .and_then(|()| stdout.flush())
        .context("writing to stdout")?;
    Ok(())
}

/// The request id of the one op a WebSocket publish sends.
const PUBLISH_ID: u64 = 1;

/// `tidings publish --transport ws`: connect to `/ws`, send one `publish` op, print the position
/// from its reply, close.
async fn publish_ws(
    client: &Client,
    args: &PublishArgs,
    bytes: Vec<u8>,
    content_type: &str,
    key: &tidings_core::IdempotencyKey,
) -> anyhow::Result<()> {
    let failed = || format!("publishing to {:?} failed", args.channel);
    let (data, encoding) = ws_data(bytes, content_type).with_context(failed)?;
    let op = publish_op(
        &args.channel,
        &data,
        args.event.as_deref(),
        encoding,
        Some(key.as_str()),
    )?;
    let exchange = async {
        let mut socket = ws::connect(client)
            .await
            .map_err(ConnectError::into_error)?;
        let reply = exchange(&mut socket, op).await;
        // Whatever the answer, the server sees a clean close, not a reset.
        ws::close(&mut socket).await;
        reply
    };
    let position = tokio::time::timeout(PUBLISH_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow!("{} did not answer in time", client.base()))
        .and_then(|reply| reply)
        .with_context(failed)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", one_line(&position))
        .and_then(|()| stdout.flush())
        .context("writing to stdout")?;
    Ok(())
}

/// Sends the op and waits for its reply; returns the position it carries.
async fn exchange(socket: &mut Socket, op: String) -> anyhow::Result<String> {
    socket
        .send(Message::text(op))
        .await
        .map_err(|err| anyhow!("sending the message failed: {}", error_chain(&err)))?;
    loop {
        let frame = match socket.next().await {
            None => bail!("the server closed the connection without answering"),
            Some(Err(err)) => bail!(
                "the connection broke before the server answered: {}",
                error_chain(&err)
            ),
            Some(Ok(Message::Close(frame))) => {
                let why = frame.map_or_else(String::new, |f| {
                    format!(" (code {}: {})", u16::from(f.code), f.reason.as_str())
                });
                bail!("the server closed the connection without answering{why}")
            }
            Some(Ok(Message::Text(text))) => text,
            // Pings are answered by tungstenite as we read; nothing else is for us.
            Some(Ok(_)) => continue,
        };
        let reply = ws::parse_frame(frame.as_str())?;
        if reply.kind.as_deref() == Some("disconnect") {
            let reason = reply.reason.as_deref().unwrap_or("no reason given");
            bail!("the server ended the connection without answering ({reason})");
        }
        if reply.reply_to() != Some(PUBLISH_ID) {
            continue;
        }
        if let Some(error) = reply.error {
            bail!("the server refused it: {} ({})", error.message, error.code);
        }
        return ws::position_of_reply(frame.as_str()).ok_or_else(|| {
            anyhow!(
                "the server's reply is not one JSON object: {}",
                frame.as_str().chars().take(120).collect::<String>()
            )
        });
    }
}

/// The message as the `data` of a `/ws` publish op, and its `encoding`. The protocol has JSON
/// and base64 binary; text goes as a JSON string, so it is stored as JSON data (see the
/// content-type notes in SPEC §10: raw transports then show it with its quotes).
fn ws_data(
    bytes: Vec<u8>,
    content_type: &str,
) -> anyhow::Result<(Box<RawValue>, Option<&'static str>)> {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let utf8 = |bytes: Vec<u8>| {
        String::from_utf8(bytes).map_err(|_| {
            anyhow!(
                "the message is not UTF-8 text; send binary with --content-type application/octet-stream"
            )
        })
    };
    if essence == "application/json" || essence.ends_with("+json") {
        let text = utf8(bytes)?;
        let data = RawValue::from_string(text.trim().to_owned())
            .map_err(|err| anyhow!("the message is not valid JSON ({err})"))?;
        Ok((data, None))
    } else if essence.starts_with("text/") {
        let text = serde_json::to_string(&utf8(bytes)?)?;
        Ok((RawValue::from_string(text)?, None))
    } else if essence == "application/octet-stream" {
        let text = base64::engine::general_purpose::STANDARD.encode(&bytes);
        Ok((
            RawValue::from_string(serde_json::to_string(&text)?)?,
            Some("base64"),
        ))
    } else {
        bail!(
            "--content-type {content_type}: over WebSocket a message is JSON, text or binary (application/octet-stream)"
        )
    }
}

/// `{"id":1,"op":"publish","channel":…,"data":…,"event":…,"encoding":…}` (SPEC §5).
#[derive(Serialize)]
struct PublishOp<'a> {
    id: u64,
    op: &'static str,
    channel: &'a str,
    data: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idempotency_key: Option<&'a str>,
}

fn publish_op(
    channel: &str,
    data: &RawValue,
    event: Option<&str>,
    encoding: Option<&'static str>,
    idempotency_key: Option<&str>,
) -> anyhow::Result<String> {
    let op = PublishOp {
        id: PUBLISH_ID,
        op: "publish",
        channel,
        data,
        event,
        encoding,
        idempotency_key,
    };
    serde_json::to_string(&op).context("encoding the publish op")
}

async fn read_stdin() -> anyhow::Result<Vec<u8>> {
    if std::io::stdin().is_terminal() {
        // Otherwise a user who forgot DATA sees a silent hang.
        eprintln!("tidings: reading the message from stdin (end with Ctrl-D)");
    }
    // tokio's own stdin is a blocking read on a thread anyway; this avoids the `io-std` feature.
    let bytes = tokio::task::spawn_blocking(|| {
        let mut bytes = Vec::new();
        std::io::stdin()
            .lock()
            .read_to_end(&mut bytes)
            .map(|_| bytes)
    })
    .await
    .context("reading the message from stdin")?
    .context("reading the message from stdin")?;
    Ok(bytes)
}

/// Where the message came from; it decides whether a trailing newline is part of it.
enum Body {
    Argument(String),
    Stdin(Vec<u8>),
}

impl Body {
    /// The bytes to send and their content type (`explicit`, or else guessed from the bytes).
    ///
    /// Text piped in (`echo hello | tidings publish c`) loses one trailing newline, since the
    /// newline is an artefact of the shell, not part of the message; JSON does not care and
    /// binary is sent exactly as read.
    fn into_request(self, explicit: Option<&str>) -> (Vec<u8>, String) {
        let (mut bytes, from_stdin) = match self {
            Body::Argument(text) => (text.into_bytes(), false),
            Body::Stdin(bytes) => (bytes, true),
        };
        let content_type =
            explicit.map_or_else(|| guess_content_type(&bytes).to_owned(), str::to_owned);
        if from_stdin
            && content_type
                .trim_start()
                .to_ascii_lowercase()
                .starts_with("text/")
        {
            if bytes.ends_with(b"\r\n") {
                bytes.truncate(bytes.len() - 2);
            } else if bytes.ends_with(b"\n") {
                bytes.truncate(bytes.len() - 1);
            }
        }
        (bytes, content_type)
    }
}

/// JSON text is sent as JSON, other UTF-8 as text, and anything else as binary (the server would
/// refuse it as text).
fn guess_content_type(bytes: &[u8]) -> &'static str {
    if serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok() {
        "application/json"
    } else if std::str::from_utf8(bytes).is_ok() {
        "text/plain; charset=utf-8"
    } else {
        "application/octet-stream"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Body, explicit: Option<&str>) -> (String, String) {
        let (bytes, content_type) = body.into_request(explicit);
        (String::from_utf8_lossy(&bytes).into_owned(), content_type)
    }

    #[test]
    fn json_data_is_sent_as_json() {
        for data in [r#"{"text":"hi"}"#, "42", "true", r#""quoted""#, " [1, 2] "] {
            let (_, content_type) = request(Body::Argument(data.into()), None);
            assert_eq!(content_type, "application/json", "{data}");
        }
    }

    #[test]
    fn other_text_is_sent_as_utf8_text() {
        let (bytes, content_type) = request(Body::Argument("hello world".into()), None);
        assert_eq!(bytes, "hello world");
        assert_eq!(content_type, "text/plain; charset=utf-8");
    }

    #[test]
    fn bytes_that_are_not_utf8_are_sent_as_binary() {
        let (bytes, content_type) = Body::Stdin(vec![0xff, 0x00, b'\n']).into_request(None);
        assert_eq!(bytes, vec![0xff, 0x00, b'\n']);
        assert_eq!(content_type, "application/octet-stream");
    }

    #[test]
    fn an_explicit_content_type_wins_over_the_guess() {
        let (bytes, content_type) = request(
            Body::Argument("{}".into()),
            Some("application/octet-stream"),
        );
        assert_eq!(
            (bytes.as_str(), content_type.as_str()),
            ("{}", "application/octet-stream")
        );
    }

    #[test]
    fn text_from_stdin_loses_one_trailing_newline() {
        let (bytes, _) = request(Body::Stdin(b"hello\n\n".to_vec()), None);
        assert_eq!(bytes, "hello\n");
        let (bytes, _) = request(Body::Stdin(b"hello\r\n".to_vec()), Some("text/plain"));
        assert_eq!(bytes, "hello");
    }

    #[test]
    fn text_given_as_an_argument_is_sent_exactly() {
        let (bytes, _) = request(Body::Argument("hello\n".into()), None);
        assert_eq!(bytes, "hello\n");
    }

    fn ws_op(body: Body, content_type: Option<&str>, event: Option<&str>) -> String {
        let (bytes, content_type) = body.into_request(content_type);
        let (data, encoding) = ws_data(bytes, &content_type).unwrap();
        publish_op("chat:lobby", &data, event, encoding, None).unwrap()
    }

    #[test]
    fn over_websocket_json_is_sent_as_written_inside_the_publish_op() {
        assert_eq!(
            ws_op(
                Body::Argument(r#" {"n": 1.50, "s":"x"} "#.into()),
                None,
                Some("msg")
            ),
            r#"{"id":1,"op":"publish","channel":"chat:lobby","data":{"n": 1.50, "s":"x"},"event":"msg"}"#
        );
    }

    #[test]
    fn over_websocket_text_is_sent_as_a_json_string() {
        assert_eq!(
            ws_op(Body::Stdin(b"say \"hi\"\n".to_vec()), None, None),
            r#"{"id":1,"op":"publish","channel":"chat:lobby","data":"say \"hi\""}"#
        );
        // Text that happens to parse as JSON is still text when the user says so.
        assert_eq!(
            ws_op(Body::Argument("42".into()), Some("text/plain"), None),
            r#"{"id":1,"op":"publish","channel":"chat:lobby","data":"42"}"#
        );
    }

    #[test]
    fn over_websocket_binary_is_sent_base64_encoded() {
        assert_eq!(
            ws_op(Body::Stdin(vec![0xff, 0x00, b'\n']), None, None),
            r#"{"id":1,"op":"publish","channel":"chat:lobby","data":"/wAK","encoding":"base64"}"#
        );
    }

    #[test]
    fn over_websocket_other_content_types_and_bad_json_are_refused_before_connecting() {
        let err = ws_data(b"x".to_vec(), "image/png").unwrap_err().to_string();
        assert!(err.contains("image/png"), "{err}");
        let err = ws_data(b"{oops".to_vec(), "application/json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid JSON"), "{err}");
        assert!(ws_data(vec![0xff], "text/plain").is_err());
    }

    #[test]
    fn json_from_stdin_is_sent_exactly() {
        let (bytes, content_type) = request(Body::Stdin(b"{\"a\":1}\n".to_vec()), None);
        assert_eq!(bytes, "{\"a\":1}\n");
        assert_eq!(content_type, "application/json");
    }
}
