//! What every client command (`publish`, `subscribe`) needs to talk to a Tidings server: the base
//! URL, the bearer token, and the server's JSON errors turned into readable ones.
//!
//! `https://` and `wss://` are spoken with the trust `--ca-file`/`--insecure` set up (`tls.rs`). A
//! `ws://` URL names the same server as `http://` (and `wss://` as `https://`) and is accepted
//! as such.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use url::Url;

use crate::tls::{self, TlsArgs};

/// The server a client command talks to, and the credentials it presents.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
    /// For `wss://` (HTTP/1.1 only: the upgrade), the same trust as `http`'s.
    tls: Arc<rustls::ClientConfig>,
}

impl Client {
    /// `url` is what the user typed for `--url`; `token` is `--token` (or `TIDINGS_TOKEN`).
    /// `tls` is `--ca-file`/`--insecure`.
    pub fn new(url: &str, token: Option<String>, tls: &TlsArgs) -> anyhow::Result<Self> {
        let base = base_url(url)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls.client_config(tls::HTTP1_AND_H2)?)
            .user_agent(concat!("tidings-cli/", env!("CARGO_PKG_VERSION")))
            // Only the connect step is bounded here: streams stay open for hours, so each
            // request sets its own overall timeout where one makes sense.
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        // An empty token (e.g. `TIDINGS_TOKEN=`) means "no token", not "Bearer " with nothing.
        let token = token.filter(|t| !t.is_empty());
        let tls = Arc::new(tls.client_config(tls::HTTP1)?);
        Ok(Self {
            http,
            base,
            token,
            tls,
        })
    }

    /// The server's base URL, as shown to the user in messages.
    /// The same client (connection pool, token) for another base URL.
    pub fn with_base(&self, url: &str) -> anyhow::Result<Self> {
        Ok(Self {
            http: self.http.clone(),
            base: base_url(url)?,
            token: self.token.clone(),
            tls: self.tls.clone(),
        })
    }

    pub fn base(&self) -> &Url {
        &self.base
    }

    /// The TLS configuration for a `wss://` handshake.
    pub fn tls(&self) -> &Arc<rustls::ClientConfig> {
        &self.tls
    }

    /// The bearer token, if one was given (never empty).
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// `{base}/{segments…}`, each segment percent-encoded as needed (channel names may hold
    /// characters such as `@` or `=`).
    pub fn endpoint(&self, segments: &[&str]) -> Url {
        endpoint(&self.base, segments)
    }

    pub fn get(&self, url: Url) -> RequestBuilder {
        self.authorize(self.http.get(url))
    }

    pub fn post(&self, url: Url) -> RequestBuilder {
        self.authorize(self.http.post(url))
    }

    fn authorize(&self, request: RequestBuilder) -> RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Turns a failure to get any answer at all into a message that names the server, so a
    /// wrong `--url` or a server that is not running is obvious.
    pub fn unreachable(&self, err: &reqwest::Error) -> anyhow::Error {
        let base = &self.base;
        if is_connection_refused(err) {
            self.no_server()
        } else if err.is_timeout() {
            anyhow::anyhow!("{base} did not answer in time")
        } else if let Some(why) = tls::explain(err) {
            anyhow::anyhow!("could not connect to {base}: {why}")
        } else if err.is_connect() {
            anyhow::anyhow!("could not connect to {base}: {}", error_chain(err))
        } else {
            anyhow::anyhow!("request to {base} failed: {}", error_chain(err))
        }
    }

    /// What a refused connection means, for every transport.
    pub fn no_server(&self) -> anyhow::Error {
        anyhow::anyhow!(
            "no Tidings server at {} (connection refused); start one with `tidings serve` or pass --url",
            self.base
        )
    }

    /// Reads a non-success reply into an [`ApiError`], adding a hint when the server wants
    /// credentials and none were given.
    pub async fn api_error(&self, response: Response) -> ApiError {
        let error = ApiError::read(response).await;
        self.with_hint(error)
    }

    /// The same for a reply read by something other than reqwest (a refused WebSocket
    /// handshake): its status, `Retry-After` and body.
    pub fn api_error_from(
        &self,
        status: StatusCode,
        retry_after: Option<Duration>,
        body: &[u8],
    ) -> ApiError {
        let (code, message) = parse_error_body(status, body);
        self.with_hint(ApiError {
            status,
            code,
            message,
            retry_after,
            hint: None,
        })
    }

    fn with_hint(&self, mut error: ApiError) -> ApiError {
        if error.status == StatusCode::UNAUTHORIZED && self.token.is_none() {
            error.hint = Some("pass --token or set TIDINGS_TOKEN");
        }
        error
    }
}

/// A non-success reply from the server, carrying its `{"error":{"code","message"}}` body.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    /// How long a 429 or 503 asked us to wait (`Retry-After`, seconds form).
    pub retry_after: Option<Duration>,
    hint: Option<&'static str>,
}

impl ApiError {
    async fn read(response: Response) -> Self {
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // A body we cannot read still leaves the status, which is enough to report.
        let body = response.bytes().await.unwrap_or_default();
        let (code, message) = parse_error_body(status, &body);
        Self {
            status,
            code,
            message,
            retry_after,
            hint: None,
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the server answered {}: {} ({})",
            self.status.as_u16(),
            self.message,
            self.code
        )?;
        if let Some(hint) = self.hint {
            write!(f, "; {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}

/// The JSON error shape every Tidings endpoint uses (SPEC §3).
#[derive(Deserialize)]
struct ErrorReply {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    code: String,
    #[serde(default)]
    message: String,
}

/// `(code, message)` from an error body; anything that is not the Tidings shape (a proxy's HTML
/// page, an empty body) still yields something readable built from the status.
fn parse_error_body(status: StatusCode, body: &[u8]) -> (String, String) {
    if let Ok(reply) = serde_json::from_slice::<ErrorReply>(body) {
        return (reply.error.code, reply.error.message);
    }
    let code = status
        .canonical_reason()
        .unwrap_or("error")
        .to_ascii_lowercase()
        .replace(' ', "_");
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let message = if text.is_empty() {
        "(no details)".to_owned()
    } else {
        // A stray HTML page can be long; the first line or so is enough to recognise it.
        let short: String = text.chars().take(200).collect();
        short.replace(['\r', '\n'], " ")
    };
    (code, message)
}

/// Parses `--url`. A bare `host:port` is taken as `http://host:port` because that is what people
/// type; a path (a server behind a proxy prefix) is kept.
fn base_url(input: &str) -> anyhow::Result<Url> {
    let input = input.trim();
    let with_scheme: Cow<'_, str> = if input.contains("://") {
        Cow::Borrowed(input)
    } else {
        Cow::Owned(format!("http://{input}"))
    };
    let mut url = Url::parse(&with_scheme).with_context(|| format!("invalid --url {input:?}"))?;
    match url.scheme() {
        "http" | "https" => {}
        // The WebSocket endpoint lives on the same server; `--transport ws` turns it back.
        // All four schemes are "special" in the URL standard, so the switch cannot fail.
        "ws" => {
            let _ = url.set_scheme("http");
        }
        "wss" => {
            let _ = url.set_scheme("https");
        }
        other => bail!("--url {input}: unsupported scheme {other:?}; use http:// or https://"),
    }
    if url.cannot_be_a_base() || url.host().is_none() {
        bail!("--url {input}: expected something like http://127.0.0.1:8080");
    }
    if url.query().is_some() || url.fragment().is_some() {
        bail!("--url {input}: must not carry a query string or fragment");
    }
    Ok(url)
}

fn endpoint(base: &Url, segments: &[&str]) -> Url {
    let mut url = base.clone();
    // `base_url` already refused URLs that cannot be a base, so this always succeeds.
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    url
}

/// Returns `json` on one line. The server's JSON is already one line; this only guards the NDJSON
/// output against a pretty-printed reply, and leaves the text untouched otherwise so what we print
/// is exactly what the server sent.
pub fn one_line(json: &str) -> Cow<'_, str> {
    let json = json.trim();
    if !json.contains(['\n', '\r']) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            in_string = c == '"';
            out.push(c);
        }
    }
    Cow::Owned(out)
}

pub(crate) fn is_connection_refused(err: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// reqwest's top-level message is often just "error sending request"; the cause is further down.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(e) = source {
        let text = e.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_host_and_port_is_taken_as_http() {
        let url = base_url("127.0.0.1:9000").unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:9000/");
    }

    #[test]
    fn other_schemes_are_refused_with_a_clear_message() {
        let err = base_url("ftp://example.com").unwrap_err().to_string();
        assert!(err.contains("unsupported scheme"), "{err}");
        assert!(base_url("http://example.com/?a=b").is_err());
    }

    #[test]
    fn a_ws_url_names_the_http_server_and_wss_the_https_one() {
        let url = base_url("ws://127.0.0.1:9000/prefix").unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:9000/prefix");
        let url = base_url("wss://example.com:8443").unwrap();
        assert_eq!(url.as_str(), "https://example.com:8443/");
        assert_eq!(base_url("https://h/").unwrap().as_str(), "https://h/");
    }

    #[test]
    fn endpoint_appends_segments_with_or_without_trailing_slash() {
        for base in ["http://h:1", "http://h:1/"] {
            let base = base_url(base).unwrap();
            assert_eq!(
                endpoint(&base, &["publish", "chat:lobby"]).as_str(),
                "http://h:1/publish/chat:lobby"
            );
        }
    }

    #[test]
    fn endpoint_keeps_a_proxy_prefix_and_encodes_segments() {
        let base = base_url("http://h/tidings/").unwrap();
        assert_eq!(
            endpoint(&base, &["publish", "a/b c"]).as_str(),
            "http://h/tidings/publish/a%2Fb%20c"
        );
    }

    #[test]
    fn error_body_in_tidings_shape_yields_code_and_message() {
        let body = br#"{"error":{"code":"invalid_channel","message":"bad name"}}"#;
        let (code, message) = parse_error_body(StatusCode::BAD_REQUEST, body);
        assert_eq!(
            (code.as_str(), message.as_str()),
            ("invalid_channel", "bad name")
        );
    }

    #[test]
    fn error_body_in_another_shape_falls_back_to_status_and_text() {
        let (code, message) =
            parse_error_body(StatusCode::BAD_GATEWAY, b"<html>\nbad gateway\n</html>");
        assert_eq!(code, "bad_gateway");
        assert_eq!(message, "<html> bad gateway </html>");
        let (_, message) = parse_error_body(StatusCode::NOT_FOUND, b"");
        assert_eq!(message, "(no details)");
    }

    #[test]
    fn api_error_reads_as_status_message_and_code() {
        let error = ApiError {
            status: StatusCode::FORBIDDEN,
            code: "forbidden".into(),
            message: "token lacks chat:x".into(),
            retry_after: None,
            hint: None,
        };
        assert_eq!(
            error.to_string(),
            "the server answered 403: token lacks chat:x (forbidden)"
        );
    }

    #[test]
    fn one_line_leaves_single_line_json_untouched() {
        let json = r#"{"b": 1, "a":"x y"}"#;
        assert_eq!(one_line(json), json);
    }

    #[test]
    fn one_line_removes_line_breaks_but_not_string_contents() {
        let json = "{\n  \"a\": \"x \\\" y\",\n  \"b\": [1, 2]\n}\n";
        assert_eq!(one_line(json), r#"{"a":"x \" y","b":[1,2]}"#);
    }
}
