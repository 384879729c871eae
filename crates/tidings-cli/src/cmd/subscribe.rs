//! `tidings subscribe CHANNEL…`: prints every envelope as one JSON line (NDJSON) on stdout, and
//! keeps doing so across connection failures by resuming from the last cursor it printed.
//!
//! # Layout
//! - [`run`] builds a `Session` and hands over to its reconnect loop (`Session::run`), which owns
//!   the backoff and decides, from how an attempt `Ended`, whether to stop, fail or retry.
//! - One `Session` method per transport (`sse`, `stream`, `poll`, and `ws` in `subscribe_ws.rs`);
//!   each is one attempt: a single connection for the streaming transports and WebSocket, a single
//!   request for the polling ones.
//! - `SseParser` and `LineSplitter` are the wire framing, independent of HTTP so they can be fed
//!   arbitrary chunk boundaries in tests.
//!
//! Every HTTP transport uses the multi-channel URL form (`?channel=a&channel=b`), even for one
//! channel, so that every record is an envelope carrying a cursor for the whole subscription.
//! WebSocket (`/ws`) is the exception: there each channel is its own subscription with its own
//! cursor, so it keeps one cursor per channel (`websocket::Cursors`).
//!
//! Past 800 lines only because of its tests (about 500), which include a fake server driving the
//! whole reconnect-and-resume loop over real sockets. If the code itself grows, the two parsers
//! are the part to move out (`cmd/subscribe/{sse,ndjson}.rs`).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::time::Duration;

use anyhow::anyhow;
use bytes::Bytes;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use url::Url;

use crate::client::{Client, error_chain, one_line};
use crate::tls::TlsArgs;

#[path = "subscribe_ws.rs"]
mod websocket;

/// The server heartbeats every 15 s by default; four missed heartbeats means the connection is
/// dead even if TCP has not noticed. Reconnecting is cheap because resume is lossless.
const STREAM_IDLE_LIMIT: Duration = Duration::from_secs(60);
/// A short poll answers at once; this only bounds a server that hangs.
const SHORT_POLL_TIMEOUT: Duration = Duration::from_secs(30);
/// Added to `--wait` so a long poll that the server answers at the last moment is not cut off.
const LONG_POLL_GRACE: Duration = Duration::from_secs(10);
const BACKOFF_INITIAL: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// Guards memory against a server that never ends a line; far above any `max_message_bytes`.
const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, clap::Args)]
pub struct SubscribeArgs {
    /// Channels to subscribe to, e.g. `chat:lobby news`.
    #[arg(required = true, value_name = "CHANNEL")]
    pub channels: Vec<String>,

    /// How to receive messages.
    #[arg(long, value_enum, default_value_t = Transport::Sse)]
    pub transport: Transport,

    /// Resume after this cursor (from an envelope or a publish reply).
    #[arg(long, value_name = "CURSOR")]
    pub since: Option<String>,

    /// Replay the last N retained messages per channel first (ignored with --since).
    #[arg(long, value_name = "N")]
    pub history: Option<u64>,

    /// Server base URL; several comma-separated URLs are nodes of one deployment: after a
    /// failed attempt the next one is tried, resuming from the same cursor.
    #[arg(long, env = "TIDINGS_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,

    /// Bearer token (API key or JWT).
    #[arg(long, env = "TIDINGS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    #[command(flatten)]
    pub tls: TlsArgs,

    /// Exit after printing N messages (gap notices do not count).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,

    /// Time between two requests with `--transport poll`, e.g. `500ms`, `2s`.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,

    /// How long the server may hold each request with `--transport long-poll`.
    #[arg(long, value_name = "SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub wait: u64,
}

/// The client wire used to receive messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// WebSocket, the JSON protocol (`GET /ws`), one subscribe op per channel.
    Ws,
    /// Server-Sent Events (`GET /sse`).
    Sse,
    /// HTTP streaming, newline-delimited JSON (`GET /stream`).
    Stream,
    /// Long polling (`GET /poll?wait=…`).
    LongPoll,
    /// Short polling every `--interval` (`GET /poll`).
    Poll,
}

pub async fn run(args: SubscribeArgs) -> anyhow::Result<()> {
    let clients = clients_for(&args.url, args.token.clone(), &args.tls)?;
    let backoff = Backoff::new(BACKOFF_INITIAL, BACKOFF_CAP);
    let mut session = Session::new(clients, &args, backoff, std::io::stdout());
    session.run(args.transport, args.interval).await
}

/// One client per comma-separated URL, sharing one connection pool.
pub(crate) fn clients_for(
    urls: &str,
    token: Option<String>,
    tls: &TlsArgs,
) -> anyhow::Result<Vec<Client>> {
    let mut urls = urls.split(',').map(str::trim).filter(|u| !u.is_empty());
    let first = Client::new(urls.next().unwrap_or_default(), token, tls)?;
    let mut clients = vec![first];
    for url in urls {
        clients.push(clients[0].with_base(url)?);
    }
    Ok(clients)
}

/// One subscription, across however many connections (and nodes) it takes.
pub(crate) struct Session<W> {
    /// The nodes to try, one after another after each failed attempt.
    clients: Vec<Client>,
    current: usize,
    /// Counts failed attempts for `tidings bench --verify`; `None` prints them instead.
    retries: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    channels: Vec<String>,
    history: Option<u64>,
    wait: u64,
    /// Where to resume: the cursor of the last envelope printed (or `--since`).
    cursor: Option<String>,
    /// Where to resume over WebSocket, where every channel has its own cursor.
    ws_cursors: websocket::Cursors,
    backoff: Backoff,
    out: Output<W>,
    /// Set after a failed attempt, so that the next success is announced on stderr.
    recovering: bool,
}

/// How one attempt ended, when it did not simply ask for the next poll.
#[derive(Debug)]
enum Ended {
    /// `--count` reached, or stdout was closed (`| head -n 3`): exit successfully.
    Stop,
    /// The connection failed or ended; resume from the cursor after a backoff (at least `after`).
    Retry {
        why: String,
        after: Option<Duration>,
    },
    /// Retrying cannot help: a 4xx, a server that breaks the protocol, or one that said not to.
    Fatal(anyhow::Error),
}

impl Ended {
    fn retry(why: impl Into<String>) -> Self {
        Ended::Retry {
            why: why.into(),
            after: None,
        }
    }
}

impl From<anyhow::Error> for Ended {
    fn from(err: anyhow::Error) -> Self {
        Ended::Fatal(err)
    }
}

impl<W: Write> Session<W> {
    pub(crate) fn new(
        clients: Vec<Client>,
        args: &SubscribeArgs,
        backoff: Backoff,
        sink: W,
    ) -> Self {
        Self {
            clients,
            current: 0,
            retries: None,
            channels: args.channels.clone(),
            history: args.history,
            wait: args.wait,
            cursor: args.since.clone(),
            ws_cursors: websocket::Cursors::new(&args.channels, args.since.as_deref()),
            backoff,
            out: Output {
                sink,
                remaining: args.count,
            },
            recovering: false,
        }
    }

    /// Starts at node `index` (mod the number of nodes) and counts failed attempts in
    /// `retries` instead of printing them.
    pub(crate) fn quiet_from(
        mut self,
        index: usize,
        retries: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        self.current = index % self.clients.len().max(1);
        self.retries = Some(retries);
        self
    }

    fn client(&self) -> &Client {
        &self.clients[self.current % self.clients.len()]
    }

    fn reconnected(&mut self) {
        if std::mem::take(&mut self.recovering) && self.retries.is_none() {
            eprintln!("tidings: reconnected to {}", self.client().base());
        }
    }

    pub(crate) async fn run(
        &mut self,
        transport: Transport,
        interval: Duration,
    ) -> anyhow::Result<()> {
        loop {
            let attempt = match transport {
                Transport::Ws => self.ws().await,
                Transport::Sse => self.sse().await,
                Transport::Stream => self.stream().await,
                Transport::LongPoll => self.poll(Some(self.wait)).await,
                Transport::Poll => self.poll(None).await,
            };
            let delay = match attempt {
                Ok(()) if transport == Transport::Poll => interval,
                Ok(()) => Duration::ZERO,
                Err(Ended::Stop) => return Ok(()),
                Err(Ended::Fatal(err)) => return Err(err),
                Err(Ended::Retry { why, after }) => {
                    let delay = self.backoff.next_delay().max(after.unwrap_or_default());
                    match &self.retries {
                        Some(retries) => {
                            retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        None => eprintln!(
                            "tidings: {why}; reconnecting in {:.1}s",
                            delay.as_secs_f64()
                        ),
                    }
                    // The next attempt goes to the next node, with the same cursor.
                    self.current = (self.current + 1) % self.clients.len().max(1);
                    self.recovering = true;
                    delay
                }
            };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
        }
    }

    /// One SSE connection, read until it ends.
    async fn sse(&mut self) -> Result<(), Ended> {
        let url = self.subscribe_url("sse", None);
        let request = self.client().get(url).header(ACCEPT, "text/event-stream");
        let mut response = self.connect(request, "text/event-stream").await?;
        let mut parser = SseParser::default();
        loop {
            let chunk = next_chunk(&mut response).await?;
            for event in parser.feed(&chunk)? {
                self.on_sse_event(event)?;
            }
            // Also covers an `id:` block without data, which moves the cursor without an event.
            if !parser.last_event_id().is_empty() {
                self.cursor = Some(parser.last_event_id().to_owned());
            }
        }
    }

    fn on_sse_event(&mut self, event: SseEvent) -> Result<(), Ended> {
        match event.name.as_str() {
            "tidings.gap" => self.out.gap(&event.data),
            "tidings.disconnect" => Err(disconnected(&peek(&event.data)?)),
            // The prefix is reserved for control events; one we do not know is not a message.
            name if name.starts_with("tidings.") => Ok(()),
            _ => {
                let record = peek(&event.data)?;
                let resume_at = Some(event.id).filter(|id| !id.is_empty());
                self.deliver(&event.data, resume_at.or(record.cursor))
            }
        }
    }

    /// One NDJSON stream, read until it ends.
    async fn stream(&mut self) -> Result<(), Ended> {
        let url = self.subscribe_url("stream", None);
        let request = self
            .client()
            .get(url)
            .header(ACCEPT, "application/x-ndjson");
        let mut response = self.connect(request, "application/x-ndjson").await?;
        let mut lines = LineSplitter::default();
        loop {
            let chunk = next_chunk(&mut response).await?;
            for line in lines.feed(&chunk)? {
                self.on_stream_line(&line)?;
            }
        }
    }

    fn on_stream_line(&mut self, line: &str) -> Result<(), Ended> {
        let line = line.trim();
        if line.is_empty() {
            return Ok(()); // heartbeat
        }
        let record = peek(line)?;
        match record.kind.as_deref() {
            None | Some("message") => self.deliver(line, record.cursor),
            Some("gap") => {
                // The server's gap record carries the cursor that resumes after it.
                if record.cursor.is_some() {
                    self.cursor = record.cursor;
                }
                self.out.gap(line)
            }
            // Sent once after the replay: the resume point even before any message arrives.
            Some("ready") => {
                if record.cursor.is_some() {
                    self.cursor = record.cursor;
                }
                Ok(())
            }
            Some("disconnect") => Err(disconnected(&record)),
            // A control record from a newer server: not ours to print as a message.
            Some(_) => Ok(()),
        }
    }

    /// One poll: a long poll when `wait` is set, a short poll otherwise.
    async fn poll(&mut self, wait: Option<u64>) -> Result<(), Ended> {
        let url = self.subscribe_url("poll", wait);
        let timeout = wait.map_or(SHORT_POLL_TIMEOUT, |secs| {
            Duration::from_secs(secs) + LONG_POLL_GRACE
        });
        let request = self
            .client()
            .get(url)
            .header(ACCEPT, "application/json")
            .timeout(timeout);
        let response = self.connect(request, "application/json").await?;
        let body = response
            .bytes()
            .await
            .map_err(|err| Ended::retry(format!("{:#}", self.client().unreachable(&err))))?;
        let reply: PollReply = serde_json::from_slice(&body).map_err(|err| {
            anyhow!("the server's poll reply is not the expected JSON ({err}); is --url a Tidings server?")
        })?;
        for gap in &reply.gaps {
            self.out.gap(gap.get())?;
        }
        for message in &reply.messages {
            let record = peek(message.get())?;
            self.deliver(message.get(), record.cursor)?;
        }
        if let Some(cursor) = reply.cursor {
            self.cursor = Some(cursor);
        }
        match reply.disconnect {
            Some(notice) => Err(disconnected(&peek(notice.get())?)),
            None => Ok(()),
        }
    }

    /// Sends a subscribe request and sorts the answer: a stream to read, a failure worth
    /// retrying (network, 5xx, 429, 408), or a refusal that retrying cannot fix (other 4xx).
    async fn connect(
        &mut self,
        request: RequestBuilder,
        expected: &str,
    ) -> Result<Response, Ended> {
        let response = request.send().await.map_err(|err| {
            let why = self.client().unreachable(&err);
            // A certificate that was refused will be refused again: stop and say why.
            if crate::tls::explain(&err).is_some() {
                Ended::Fatal(why)
            } else {
                Ended::retry(format!("{why:#}"))
            }
        })?;
        let status = response.status();
        if status.is_success() {
            check_content_type(&response, expected)?;
            self.backoff.reset();
            self.reconnected();
            return Ok(response);
        }
        let error = self.client().api_error(response).await;
        if status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
        {
            return Err(Ended::Retry {
                why: error.to_string(),
                after: error.retry_after,
            });
        }
        Err(Ended::Fatal(
            anyhow::Error::new(error).context("the subscription was refused"),
        ))
    }

    fn deliver(&mut self, envelope: &str, resume_at: Option<String>) -> Result<(), Ended> {
        self.out.envelope(envelope)?;
        if resume_at.is_some() {
            self.cursor = resume_at;
        }
        Ok(())
    }

    fn subscribe_url(&self, path: &str, wait: Option<u64>) -> Url {
        subscribe_url(
            self.client().endpoint(&[path]),
            &self.channels,
            self.cursor.as_deref(),
            self.history,
            wait,
        )
    }
}

/// `endpoint?channel=a&channel=b` plus `since` when resuming, or else `history` (it only means
/// something for a fresh subscription), plus `wait` for a long poll.
fn subscribe_url(
    mut endpoint: Url,
    channels: &[String],
    cursor: Option<&str>,
    history: Option<u64>,
    wait: Option<u64>,
) -> Url {
    {
        let mut query = endpoint.query_pairs_mut();
        for channel in channels {
            query.append_pair("channel", channel);
        }
        match (cursor, history) {
            (Some(cursor), _) => {
                query.append_pair("since", cursor);
            }
            (None, Some(history)) => {
                query.append_pair("history", &history.to_string());
            }
            (None, None) => {}
        }
        if let Some(wait) = wait {
            query.append_pair("wait", &wait.to_string());
        }
    }
    endpoint
}

/// A 200 that is not what we asked for (a proxy's page, another service on the port) would
/// otherwise surface as a confusing parse error.
fn check_content_type(response: &Response, expected: &str) -> Result<(), Ended> {
    let Some(actual) = response.headers().get(CONTENT_TYPE) else {
        return Ok(());
    };
    let actual = actual.to_str().unwrap_or_default();
    if actual.to_ascii_lowercase().starts_with(expected) {
        return Ok(());
    }
    Err(Ended::Fatal(anyhow!(
        "expected {expected} from {}, got {actual:?}; is --url a Tidings server?",
        response.url()
    )))
}

async fn next_chunk(response: &mut Response) -> Result<Bytes, Ended> {
    match tokio::time::timeout(STREAM_IDLE_LIMIT, response.chunk()).await {
        Err(_) => Err(Ended::retry(format!(
            "no data for {}s, not even a heartbeat",
            STREAM_IDLE_LIMIT.as_secs()
        ))),
        Ok(Err(err)) => Err(Ended::retry(format!(
            "the connection broke: {}",
            error_chain(&err)
        ))),
        Ok(Ok(None)) => Err(Ended::retry("the server closed the stream")),
        Ok(Ok(Some(chunk))) => Ok(chunk),
    }
}

/// The fields of an envelope or control record that steer the client; the rest is only printed.
#[derive(Debug, Deserialize)]
struct Record {
    #[serde(rename = "type")]
    kind: Option<String>,
    cursor: Option<String>,
    reason: Option<String>,
    reconnect: Option<bool>,
    /// A draining server's advice: wait this long before reconnecting (SPEC §13).
    reconnect_after_ms: Option<u64>,
}

fn peek(json: &str) -> Result<Record, Ended> {
    let snippet = || json.chars().take(120).collect::<String>();
    if !json.trim_start().starts_with('{') {
        return Err(Ended::Fatal(anyhow!(
            "the server sent something that is not a JSON object: {}",
            snippet()
        )));
    }
    serde_json::from_str(json).map_err(|err| {
        Ended::Fatal(anyhow!(
            "the server sent a record that is not valid JSON ({err}): {}",
            snippet()
        ))
    })
}

fn disconnected(record: &Record) -> Ended {
    let reason = record.reason.as_deref().unwrap_or("no reason given");
    // A disconnect that does not say otherwise is treated as transient: losing the subscription
    // over a missing field would be worse than one extra attempt.
    if record.reconnect.unwrap_or(true) {
        Ended::Retry {
            why: format!("the server ended the stream ({reason})"),
            // Honoured as a floor under the backoff: a server that shuts down spreads its
            // clients' returns this way, and coming back early would undo the spread.
            after: record.reconnect_after_ms.map(Duration::from_millis),
        }
    } else {
        Ended::Fatal(anyhow!(
            "the server ended the subscription ({reason}) and asked not to reconnect"
        ))
    }
}

#[derive(Deserialize)]
struct PollReply {
    #[serde(default)]
    messages: Vec<Box<RawValue>>,
    cursor: Option<String>,
    #[serde(default)]
    gaps: Vec<Box<RawValue>>,
    /// Present when the server ended a held poll because it shuts down.
    disconnect: Option<Box<RawValue>>,
}

/// stdout as NDJSON, flushed per line because readers are usually pipes.
struct Output<W> {
    sink: W,
    /// Messages still to print before exiting (`--count`).
    remaining: Option<u64>,
}

impl<W: Write> Output<W> {
    fn envelope(&mut self, envelope: &str) -> Result<(), Ended> {
        self.line(&one_line(envelope))?;
        if let Some(remaining) = &mut self.remaining {
            *remaining = remaining.saturating_sub(1);
            if *remaining == 0 {
                return Err(Ended::Stop);
            }
        }
        Ok(())
    }

    /// Prints a gap notice as `{"type":"gap",…}`, whether or not the transport already tagged it.
    fn gap(&mut self, notice: &str) -> Result<(), Ended> {
        let tagged = peek(notice)?.kind.is_some();
        let notice = one_line(notice);
        if tagged {
            self.line(&notice)
        } else {
            self.line(&tag_as_gap(&notice))
        }
    }

    fn line(&mut self, line: &str) -> Result<(), Ended> {
        match writeln!(self.sink, "{line}").and_then(|()| self.sink.flush()) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Err(Ended::Stop),
            Err(err) => Err(Ended::Fatal(
                anyhow::Error::new(err).context("writing to stdout"),
            )),
        }
    }
}

/// Splices `"type":"gap"` into the notice's text rather than re-serialising it, so the server's
/// fields come out exactly as sent, in the same order.
fn tag_as_gap(notice: &str) -> String {
    match notice.trim().strip_prefix('{') {
        Some(rest) if rest.trim_start().starts_with('}') => format!("{{\"type\":\"gap\"{rest}"),
        Some(rest) => format!("{{\"type\":\"gap\",{rest}"),
        None => notice.to_owned(),
    }
}

/// Exponential backoff with jitter, reset by a successful connection.
#[derive(Debug)]
pub(crate) struct Backoff {
    initial: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) const fn new(initial: Duration, cap: Duration) -> Self {
        Self {
            initial,
            cap,
            failures: 0,
        }
    }

    /// The longest the next delay can be: `initial × 2^failures`, at most `cap`.
    fn ceiling(&self) -> Duration {
        // 2^20 × any sane initial delay is past any sane cap; stopping there avoids overflow.
        let factor = 1u32 << self.failures.min(20);
        self.initial.saturating_mul(factor).min(self.cap)
    }

    fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        jitter(ceiling, random_fraction())
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// "Equal jitter": half of the delay is fixed so it still grows, half is random so that many
/// clients dropped at once (a server restart) do not come back in lockstep.
fn jitter(ceiling: Duration, fraction: f64) -> Duration {
    ceiling / 2 + ceiling.mul_f64(fraction.clamp(0.0, 1.0)) / 2
}

/// A number in `[0, 1)`. std's `RandomState` is randomly keyed per process and per call, which
/// is all the randomness jitter needs, without a dependency.
fn random_fraction() -> f64 {
    let bits = RandomState::new().build_hasher().finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Parses `--interval`: a whole number with a unit, `ms`, `s`, `m` or `h` (`500ms`, `2s`).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let invalid = || format!("{text:?} is not a duration like 500ms, 2s or 1m");
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let millis = match unit.trim() {
        "ms" => Some(number),
        "s" => number.checked_mul(1_000),
        "m" => number.checked_mul(60_000),
        "h" => number.checked_mul(3_600_000),
        _ => return Err(invalid()),
    }
    .ok_or_else(|| format!("{text:?} is too long"))?;
    if millis == 0 {
        return Err(format!("{text:?}: the duration must be more than zero"));
    }
    Ok(Duration::from_millis(millis))
}

/// One dispatched server-sent event.
#[derive(Debug, PartialEq, Eq)]
struct SseEvent {
    /// `message` when the stream gave no `event:` field.
    name: String,
    data: String,
    /// The last event ID as of this event (it carries over from earlier events).
    id: String,
}

/// An incremental `text/event-stream` parser following the WHATWG rules: lines end in CRLF, LF or
/// CR; `:` starts a comment; a blank line dispatches; `data:` lines join with `\n`; an event with
/// no data is not dispatched. Chunks may split anything, even a CRLF or a UTF-8 sequence.
#[derive(Debug, Default)]
struct SseParser {
    line: Vec<u8>,
    /// The last byte seen was CR, so an LF right after it belongs to the same line ending.
    after_cr: bool,
    /// The first line may start with a byte order mark, to be dropped.
    started: bool,
    event: String,
    data: String,
    /// The ID set by the block being read; only a blank line makes it [`Self::last_event_id`],
    /// so a connection cut mid-block never moves the cursor past an event we did not see.
    pending_id: String,
    last_event_id: String,
    retry: Option<Duration>,
}

impl SseParser {
    fn feed(&mut self, chunk: &[u8]) -> anyhow::Result<Vec<SseEvent>> {
        let mut events = Vec::new();
        for &byte in chunk {
            match byte {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\r' | b'\n' => {
                    self.after_cr = byte == b'\r';
                    let line = std::mem::take(&mut self.line);
                    events.extend(self.process_line(&line));
                }
                _ => {
                    self.after_cr = false;
                    self.line.push(byte);
                }
            }
        }
        if self.line.len() > MAX_LINE_BYTES || self.data.len() > MAX_LINE_BYTES {
            anyhow::bail!("the event stream sent an event over {MAX_LINE_BYTES} bytes");
        }
        Ok(events)
    }

    /// The resume point: the ID in force at the last blank line.
    fn last_event_id(&self) -> &str {
        &self.last_event_id
    }

    /// The server's `retry:` advice, in case a caller wants it. The reconnect loop does not use
    /// it: it is meant for EventSource's fixed delay, and our backoff already spaces attempts.
    #[cfg_attr(not(test), allow(dead_code))]
    fn retry(&self) -> Option<Duration> {
        self.retry
    }

    fn process_line(&mut self, line: &[u8]) -> Option<SseEvent> {
        let line = String::from_utf8_lossy(line);
        let mut line: &str = &line;
        if !self.started {
            self.started = true;
            line = line.strip_prefix('\u{feff}').unwrap_or(line);
        }
        if line.is_empty() {
            return self.dispatch();
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => value.clone_into(&mut self.event),
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
            }
            "id" if !value.contains('\0') => value.clone_into(&mut self.pending_id),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.retry = value.parse().ok().map(Duration::from_millis);
            }
            _ => {}
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        self.last_event_id.clone_from(&self.pending_id);
        let name = std::mem::take(&mut self.event);
        let mut data = std::mem::take(&mut self.data);
        if data.is_empty() {
            return None;
        }
        data.pop(); // the `\n` appended after the last data line
        Some(SseEvent {
            name: if name.is_empty() {
                "message".to_owned()
            } else {
                name
            },
            data,
            id: self.last_event_id.clone(),
        })
    }
}

/// Splits an NDJSON byte stream into lines (LF or CRLF), whatever the chunk boundaries. A last
/// line without its newline is never returned: the connection died mid-record, and resuming
/// from the cursor will deliver it again whole.
#[derive(Debug, Default)]
struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    fn feed(&mut self, chunk: &[u8]) -> anyhow::Result<Vec<String>> {
        let mut lines = Vec::new();
        let mut rest = chunk;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&rest[..end]);
            rest = &rest[end + 1..];
            let mut line = std::mem::take(&mut self.partial);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8(line)
                .map_err(|_| anyhow!("the stream sent a line that is not UTF-8"))?;
            lines.push(line);
        }
        self.partial.extend_from_slice(rest);
        if self.partial.len() > MAX_LINE_BYTES {
            anyhow::bail!("the stream sent a line over {MAX_LINE_BYTES} bytes");
        }
        Ok(lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(parser: &mut SseParser, chunks: &[&[u8]]) -> Vec<SseEvent> {
        chunks
            .iter()
            .flat_map(|chunk| parser.feed(chunk).unwrap())
            .collect()
    }

    fn event(name: &str, data: &str, id: &str) -> SseEvent {
        SseEvent {
            name: name.into(),
            data: data.into(),
            id: id.into(),
        }
    }

    // --- SSE parser ---

    #[test]
    fn sse_data_lines_are_joined_with_newlines() {
        let mut parser = SseParser::default();
        let events = parse_all(&mut parser, &[b"data: one\ndata:two\ndata\n\n"]);
        assert_eq!(events, [event("message", "one\ntwo\n", "")]);
    }

    #[test]
    fn sse_accepts_crlf_lf_and_cr_line_endings() {
        let mut parser = SseParser::default();
        let events = parse_all(
            &mut parser,
            &[b"event: a\r\ndata: 1\r\n\r\nevent: b\rdata: 2\r\rdata: 3\n\n"],
        );
        assert_eq!(
            events,
            [
                event("a", "1", ""),
                event("b", "2", ""),
                event("message", "3", "")
            ]
        );
    }

    #[test]
    fn sse_events_survive_any_chunk_boundary() {
        let stream = "retry: 500\r\nid: c1\r\nevent: msg\r\ndata: {\"x\":\"é\"}\r\n\r\n: ping\r\n\r\nid: c2\r\ndata: b\r\n\r\n".as_bytes();
        let mut whole = SseParser::default();
        let expected = parse_all(&mut whole, &[stream]);
        assert_eq!(expected.len(), 2);
        for split in 0..stream.len() {
            let (a, b) = stream.split_at(split);
            let mut parser = SseParser::default();
            assert_eq!(
                parse_all(&mut parser, &[a, b]),
                expected,
                "split at {split}"
            );
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        let mut parser = SseParser::default();
        assert_eq!(parse_all(&mut parser, &bytes), expected);
    }

    #[test]
    fn sse_crlf_split_between_chunks_is_one_line_ending() {
        let mut parser = SseParser::default();
        let events = parse_all(&mut parser, &[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]);
        assert_eq!(events, [event("message", "a\nb", "")]);
    }

    #[test]
    fn sse_comments_and_unknown_fields_are_ignored() {
        let mut parser = SseParser::default();
        let events = parse_all(
            &mut parser,
            &[b": ping\n\n:another\nfoo: bar\ndata: x\n: inside\n\n"],
        );
        assert_eq!(events, [event("message", "x", "")]);
    }

    #[test]
    fn sse_block_without_data_is_not_dispatched_and_its_event_name_is_dropped() {
        let mut parser = SseParser::default();
        let events = parse_all(&mut parser, &[b"event: lonely\n\ndata: x\n\n"]);
        assert_eq!(events, [event("message", "x", "")]);
    }

    #[test]
    fn sse_id_carries_over_to_later_events_until_replaced() {
        let mut parser = SseParser::default();
        let events = parse_all(
            &mut parser,
            &[b"id: c1\ndata: a\n\ndata: b\n\nid: c2\ndata: c\n\n"],
        );
        assert_eq!(
            events,
            [
                event("message", "a", "c1"),
                event("message", "b", "c1"),
                event("message", "c", "c2")
            ]
        );
        assert_eq!(parser.last_event_id(), "c2");
    }

    #[test]
    fn sse_id_counts_only_once_its_block_is_complete() {
        let mut parser = SseParser::default();
        parse_all(&mut parser, &[b"id: c1\ndata: a\n\nid: c2\ndata: b\n"]);
        assert_eq!(parser.last_event_id(), "c1");
        parse_all(&mut parser, &[b"\n"]);
        assert_eq!(parser.last_event_id(), "c2");
    }

    #[test]
    fn sse_id_block_without_data_still_moves_the_last_event_id() {
        let mut parser = SseParser::default();
        let events = parse_all(&mut parser, &[b"id: c9\n\n"]);
        assert!(events.is_empty());
        assert_eq!(parser.last_event_id(), "c9");
    }

    #[test]
    fn sse_id_containing_nul_is_ignored() {
        let mut parser = SseParser::default();
        parse_all(&mut parser, &[b"id: c1\n\nid: bad\0id\n\n"]);
        assert_eq!(parser.last_event_id(), "c1");
    }

    #[test]
    fn sse_retry_takes_digits_only_and_a_leading_bom_is_dropped() {
        let mut parser = SseParser::default();
        let events = parse_all(
            &mut parser,
            &["\u{feff}retry: 1500\nretry: 2s\ndata: x\n\n".as_bytes()],
        );
        assert_eq!(parser.retry(), Some(Duration::from_millis(1500)));
        assert_eq!(events, [event("message", "x", "")]);
    }

    #[test]
    fn sse_only_one_space_after_the_colon_is_removed() {
        let mut parser = SseParser::default();
        let events = parse_all(&mut parser, &[b"data:  two spaces\n\n"]);
        assert_eq!(events[0].data, " two spaces");
    }

    // --- NDJSON ---

    #[test]
    fn ndjson_lines_are_reassembled_across_chunks() {
        let mut lines = LineSplitter::default();
        let mut out = lines.feed(b"{\"a\":1}\n{\"b\"").unwrap();
        out.extend(lines.feed(b":2}\r").unwrap());
        out.extend(lines.feed(b"\n\n{\"c\":3}").unwrap());
        assert_eq!(out, [r#"{"a":1}"#, r#"{"b":2}"#, ""]);
        assert_eq!(lines.feed(b"\n").unwrap(), [r#"{"c":3}"#]);
    }

    #[test]
    fn ndjson_multibyte_characters_may_be_split_between_chunks() {
        let text = "{\"x\":\"é\"}\n".as_bytes();
        let mut lines = LineSplitter::default();
        let mut out = lines.feed(&text[..7]).unwrap();
        out.extend(lines.feed(&text[7..]).unwrap());
        assert_eq!(out, ["{\"x\":\"é\"}"]);
    }

    // --- backoff ---

    #[test]
    fn backoff_doubles_from_its_initial_delay_up_to_the_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
        let mut ceilings = Vec::new();
        for _ in 0..9 {
            ceilings.push(backoff.ceiling().as_millis());
            backoff.next_delay();
        }
        assert_eq!(
            ceilings,
            [250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000, 10_000]
        );
        for _ in 0..100 {
            backoff.next_delay();
        }
        assert_eq!(backoff.ceiling(), Duration::from_secs(10));
    }

    #[test]
    fn backoff_delays_stay_between_half_the_ceiling_and_the_ceiling() {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
        for _ in 0..50 {
            let ceiling = backoff.ceiling();
            let delay = backoff.next_delay();
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "{delay:?} vs {ceiling:?}"
            );
        }
        assert_eq!(jitter(Duration::from_secs(2), 0.0), Duration::from_secs(1));
        assert_eq!(jitter(Duration::from_secs(2), 1.0), Duration::from_secs(2));
    }

    #[test]
    fn backoff_starts_over_after_a_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
        backoff.next_delay();
        backoff.next_delay();
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_millis(250));
    }

    // --- durations ---

    #[test]
    fn durations_take_ms_s_m_and_h() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration(" 3 m "), Ok(Duration::from_secs(180)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn durations_without_a_known_unit_or_number_are_refused() {
        for text in ["", "2", "s", "1.5s", "-1s", "2 days", "ms500"] {
            assert!(parse_duration(text).is_err(), "{text:?} was accepted");
        }
    }

    #[test]
    fn a_zero_or_overflowing_duration_is_refused() {
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("99999999999999999h").is_err());
    }

    // --- URLs ---

    fn base(path: &str) -> Url {
        Url::parse(&format!("http://127.0.0.1:8080/{path}")).unwrap()
    }

    fn channels(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn subscribe_url_repeats_the_channel_parameter() {
        let url = subscribe_url(
            base("sse"),
            &channels(&["chat:lobby", "news"]),
            None,
            None,
            None,
        );
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8080/sse?channel=chat%3Alobby&channel=news"
        );
    }

    #[test]
    fn subscribe_url_sends_history_only_without_a_cursor() {
        let fresh = subscribe_url(base("stream"), &channels(&["a"]), None, Some(5), None);
        assert_eq!(fresh.query(), Some("channel=a&history=5"));
        let resumed = subscribe_url(
            base("stream"),
            &channels(&["a"]),
            Some("c-1_x"),
            Some(5),
            None,
        );
        assert_eq!(resumed.query(), Some("channel=a&since=c-1_x"));
    }

    #[test]
    fn subscribe_url_adds_wait_for_long_polls_and_encodes_the_cursor() {
        let url = subscribe_url(
            base("poll"),
            &channels(&["a", "b"]),
            Some("x y+z"),
            None,
            Some(30),
        );
        assert_eq!(
            url.query(),
            Some("channel=a&channel=b&since=x+y%2Bz&wait=30")
        );
    }

    // --- output ---

    #[test]
    fn gap_notices_are_tagged_with_their_type_unless_already_tagged() {
        assert_eq!(
            tag_as_gap(r#"{"channel":"a","next_offset":3}"#),
            r#"{"type":"gap","channel":"a","next_offset":3}"#
        );
        assert_eq!(tag_as_gap("{}"), r#"{"type":"gap"}"#);
        let mut out = Output {
            sink: Vec::new(),
            remaining: None,
        };
        out.gap(r#"{"type":"gap","channel":"a"}"#).unwrap();
        out.gap(r#"{"channel":"b"}"#).unwrap();
        assert_eq!(
            String::from_utf8(out.sink).unwrap(),
            "{\"type\":\"gap\",\"channel\":\"a\"}\n{\"type\":\"gap\",\"channel\":\"b\"}\n"
        );
    }

    #[test]
    fn output_stops_after_count_messages_and_gaps_do_not_count() {
        let mut out = Output {
            sink: Vec::new(),
            remaining: Some(2),
        };
        assert!(out.envelope(r#"{"offset":1}"#).is_ok());
        assert!(out.gap(r#"{"channel":"a"}"#).is_ok());
        assert!(matches!(out.envelope(r#"{"offset":2}"#), Err(Ended::Stop)));
    }

    #[test]
    fn disconnect_without_reconnect_is_fatal_and_otherwise_retried() {
        let record = peek(r#"{"type":"disconnect","reason":"kicked","reconnect":false}"#).unwrap();
        assert!(matches!(disconnected(&record), Ended::Fatal(_)));
        let record = peek(r#"{"reason":"slow","reconnect":true}"#).unwrap();
        assert!(matches!(disconnected(&record), Ended::Retry { .. }));
    }

    // --- the whole loop, against a fake server ---

    mod fake_server {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::TcpListener;
        use tokio::task::JoinHandle;

        /// Serves one canned response per connection, in order, closing each afterwards, and
        /// returns the request lines it saw.
        pub async fn spawn(responses: Vec<String>) -> (String, JoinHandle<Vec<String>>) {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let task = tokio::spawn(async move {
                let mut requests = Vec::new();
                for response in responses {
                    let (mut socket, _) = listener.accept().await.unwrap();
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        socket.read_exact(&mut byte).await.unwrap();
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8(head).unwrap();
                    requests.push(head.lines().next().unwrap().to_owned());
                    socket.write_all(response.as_bytes()).await.unwrap();
                    socket.shutdown().await.unwrap();
                }
                requests
            });
            (url, task)
        }

        /// A response whose body runs until the connection closes, like a stream that ends.
        pub fn streaming(content_type: &str, body: &str) -> String {
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\nconnection: close\r\n\r\n{body}"
            )
        }

        pub fn json(status: &str, body: &str) -> String {
            format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
        }
    }

    fn args(url: &str, transport: &str, extra: &[&str]) -> SubscribeArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: SubscribeArgs,
        }
        let mut argv = vec!["tidings", "a", "b", "--url", url, "--transport", transport];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap().args
    }

    async fn subscribe(args: SubscribeArgs) -> (anyhow::Result<()>, String) {
        let client = Client::new(&args.url, None, &args.tls).unwrap();
        let backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(5));
        let mut session = Session::new(vec![client], &args, backoff, Vec::new());
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            session.run(args.transport, args.interval),
        )
        .await
        .unwrap();
        (result, String::from_utf8(session.out.sink).unwrap())
    }

    const ENVELOPE_1: &str =
        r#"{"channel":"a","offset":1,"epoch":"e","cursor":"c1","data":"one","time":1}"#;
    const ENVELOPE_2: &str = r#"{"channel":"b","offset":1,"epoch":"e","cursor":"c2","event":"x","data":{"n":2},"time":2}"#;
    const GAP: &str = r#"{"channel":"b","epoch":"e","next_offset":1,"reason":"trimmed"}"#;

    #[tokio::test]
    async fn sse_subscriber_resumes_from_the_last_cursor_after_the_stream_ends() {
        let (url, server) = fake_server::spawn(vec![
            fake_server::streaming(
                "text/event-stream",
                &format!("retry: 1000\n\n: ping\n\nid: c1\ndata: {ENVELOPE_1}\n\n"),
            ),
            fake_server::streaming(
                "text/event-stream",
                &format!(
                    "event: tidings.gap\ndata: {GAP}\n\nid: c2\nevent: x\ndata: {ENVELOPE_2}\n\n"
                ),
            ),
        ])
        .await;
        let (result, out) = subscribe(args(&url, "sse", &["--history", "5", "--count", "2"])).await;
        result.unwrap();
        assert_eq!(
            out,
            format!("{ENVELOPE_1}\n{}\n{ENVELOPE_2}\n", tag_as_gap(GAP))
        );
        assert_eq!(
            server.await.unwrap(),
            [
                "GET /sse?channel=a&channel=b&history=5 HTTP/1.1",
                "GET /sse?channel=a&channel=b&since=c1 HTTP/1.1",
            ]
        );
    }

    #[tokio::test]
    async fn stream_subscriber_reconnects_after_a_disconnect_record_and_stops_on_a_4xx() {
        let (url, server) = fake_server::spawn(vec![
            fake_server::streaming(
                "application/x-ndjson",
                &format!(
                    "\n{ENVELOPE_1}\n{{\"type\":\"disconnect\",\"reason\":\"slow\",\"reconnect\":true}}\n{ENVELOPE_2}\n"
                ),
            ),
            fake_server::json(
                "400 Bad Request",
                r#"{"error":{"code":"invalid_cursor","message":"cursor is garbled"}}"#,
            ),
        ])
        .await;
        let (result, out) = subscribe(args(&url, "stream", &["--since", "c0"])).await;
        let err = format!("{:#}", result.unwrap_err());
        assert!(
            err.contains("cursor is garbled") && err.contains("invalid_cursor"),
            "{err}"
        );
        assert_eq!(out, format!("{ENVELOPE_1}\n"));
        assert_eq!(
            server.await.unwrap(),
            [
                "GET /stream?channel=a&channel=b&since=c0 HTTP/1.1",
                "GET /stream?channel=a&channel=b&since=c1 HTTP/1.1",
            ]
        );
    }

    #[tokio::test]
    async fn long_poll_subscriber_follows_the_reply_cursor_and_retries_a_503() {
        let first = format!(r#"{{"messages":[{ENVELOPE_1}],"cursor":"p1","gaps":[]}}"#);
        let second = format!(r#"{{"messages":[{ENVELOPE_2}],"cursor":"p2","gaps":[{GAP}]}}"#);
        let (url, server) = fake_server::spawn(vec![
            fake_server::json("200 OK", &first),
            fake_server::json(
                "503 Service Unavailable",
                r#"{"error":{"code":"broker_unavailable","message":"redis is down"}}"#,
            ),
            fake_server::json("200 OK", &second),
        ])
        .await;
        let (result, out) =
            subscribe(args(&url, "long-poll", &["--wait", "5", "--count", "2"])).await;
        result.unwrap();
        assert_eq!(
            out,
            format!("{ENVELOPE_1}\n{}\n{ENVELOPE_2}\n", tag_as_gap(GAP))
        );
        assert_eq!(
            server.await.unwrap(),
            [
                "GET /poll?channel=a&channel=b&wait=5 HTTP/1.1",
                "GET /poll?channel=a&channel=b&since=p1&wait=5 HTTP/1.1",
                "GET /poll?channel=a&channel=b&since=p1&wait=5 HTTP/1.1",
            ]
        );
    }

    /// A draining server's held poll answers with a `disconnect` advising a delay: the next
    /// poll waits at least that long (the backoff alone would be a few milliseconds here).
    #[tokio::test]
    async fn long_poll_subscriber_waits_the_advised_delay_after_a_shutdown_notice() {
        let first = format!(
            r#"{{"messages":[{ENVELOPE_1}],"cursor":"p1","gaps":[],"disconnect":{{"reason":"shutdown","reconnect":true,"reconnect_after_ms":300}}}}"#
        );
        let second = format!(r#"{{"messages":[{ENVELOPE_2}],"cursor":"p2","gaps":[]}}"#);
        let (url, server) = fake_server::spawn(vec![
            fake_server::json("200 OK", &first),
            fake_server::json("200 OK", &second),
        ])
        .await;
        let started = tokio::time::Instant::now();
        let (result, out) =
            subscribe(args(&url, "long-poll", &["--wait", "5", "--count", "2"])).await;
        result.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(out, format!("{ENVELOPE_1}\n{ENVELOPE_2}\n"));
        assert_eq!(
            server.await.unwrap(),
            [
                "GET /poll?channel=a&channel=b&wait=5 HTTP/1.1",
                "GET /poll?channel=a&channel=b&since=p1&wait=5 HTTP/1.1",
            ]
        );
    }

    #[test]
    fn a_shutdown_record_carries_its_delay_into_the_retry() {
        let record = peek(
            r#"{"type":"disconnect","reason":"shutdown","reconnect":true,"reconnect_after_ms":1234}"#,
        )
        .unwrap();
        match disconnected(&record) {
            Ended::Retry { after, .. } => assert_eq!(after, Some(Duration::from_millis(1234))),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn short_poll_subscriber_sends_no_wait() {
        let reply = format!(r#"{{"messages":[{ENVELOPE_1}],"cursor":"p1","gaps":[]}}"#);
        let (url, server) = fake_server::spawn(vec![fake_server::json("200 OK", &reply)]).await;
        let (result, out) =
            subscribe(args(&url, "poll", &["--interval", "10ms", "--count", "1"])).await;
        result.unwrap();
        assert_eq!(out, format!("{ENVELOPE_1}\n"));
        assert_eq!(
            server.await.unwrap(),
            ["GET /poll?channel=a&channel=b HTTP/1.1"]
        );
    }
}
