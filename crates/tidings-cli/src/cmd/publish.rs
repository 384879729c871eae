//! `tidings publish CHANNEL [DATA|-]`: one `POST /publish/{channel}`, the position printed as one
//! JSON line.

use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use anyhow::Context;
use reqwest::header::CONTENT_TYPE;

use crate::client::{Client, one_line};

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

    /// Content type to send instead of the guessed one, e.g. `application/octet-stream`.
    #[arg(long, value_name = "CT")]
    pub content_type: Option<String>,
}

pub async fn run(args: PublishArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.url, args.token.clone())?;
    let body = match args.data.as_deref() {
        None | Some("-") => Body::Stdin(read_stdin().await?),
        Some(data) => Body::Argument(data.to_owned()),
    };
    let (bytes, content_type) = body.into_request(args.content_type.as_deref());

    let mut url = client.endpoint(&["publish", &args.channel]);
    if let Some(event) = &args.event {
        url.query_pairs_mut().append_pair("event", event);
    }
    let response = client
        .post(url)
        .header(CONTENT_TYPE, content_type)
        .timeout(PUBLISH_TIMEOUT)
        .body(bytes)
        .send()
        .await
        .map_err(|err| client.unreachable(&err))?;
    if !response.status().is_success() {
        let error = client.api_error(response).await;
        return Err(
            anyhow::Error::new(error).context(format!("publishing to {:?} failed", args.channel))
        );
    }
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

    #[test]
    fn json_from_stdin_is_sent_exactly() {
        let (bytes, content_type) = request(Body::Stdin(b"{\"a\":1}\n".to_vec()), None);
        assert_eq!(bytes, "{\"a\":1}\n");
        assert_eq!(content_type, "application/json");
    }
}
