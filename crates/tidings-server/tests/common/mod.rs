//! Test harness: a real server on port 0 and one real HTTP client per transport.
//!
//! `subscribe` returns once the server says the subscription is live (the SSE `id:`-only
//! block, the NDJSON `ready` record, or a poll loop's first reply), so a test can publish
//! right after it without racing the join.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tidings_core::{ChannelName, Cursor};
use tidings_server::{AppState, Config};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Polls `probe` until it holds, failing after `TIMEOUT`: for server state that announces
/// no event a test could await (metrics, `/readyz`, presence lists kept in Redis).
pub async fn eventually(what: &str, probe: impl AsyncFnMut() -> bool) {
    tidings_testkit::eventually(what, TIMEOUT, Duration::from_millis(10), probe).await;
}

/// Reads a raw socket until EOF (or reset); returns what came.
pub async fn read_to_end(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&out).into_owned(),
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads a raw stream (TCP or TLS) until `needle` has been seen `times` times; returns
/// everything read. Panics if the stream ends first or `TIMEOUT` passes.
pub async fn read_until<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    needle: &str,
    times: usize,
) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = String::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(TIMEOUT, async {
        while out.matches(needle).count() < times {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early after:\n{out}");
            out.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out; read so far:\n{out}"));
    out
}

pub struct TestServer {
    pub url: String,
    pub addr: SocketAddr,
    pub state: AppState,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    pub http: reqwest::Client,
}

impl TestServer {
    pub async fn spawn() -> Self {
        Self::with(|_| {}).await
    }

    pub async fn with(edit: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::default();
        config.server.listen = "127.0.0.1:0".into();
        edit(&mut config);
        config.validate().unwrap();
        let state = AppState::connect(config).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn({
            let state = state.clone();
            async move {
                tidings_server::serve(state, listener, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            }
        });
        Self {
            url: format!("http://{addr}"),
            addr,
            state,
            stop: Some(stop),
            task: Some(task),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    /// Stops the server and waits for it to drain.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), t)
                .await
                .unwrap()
                .unwrap();
        }
    }

    /// Publishes JSON; returns the position reply.
    pub async fn publish(&self, channel: &str, data: Value) -> Value {
        let res = self
            .http
            .post(format!("{}/publish/{channel}", self.url))
            .header("content-type", "application/json")
            .body(data.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "publish failed");
        res.json().await.unwrap()
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let res = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// The channel's cursor now (a short poll's), to resume from it.
    pub async fn cursor_now(&self, channel: &str) -> String {
        let (status, reply) = self.get_json(&format!("/poll/{channel}")).await;
        assert_eq!(status, 200);
        reply["cursor"].as_str().unwrap().to_owned()
    }

    /// Waits until the metric line `line_prefix` reads `want`.
    pub async fn await_metric(&self, line_prefix: &str, want: f64) {
        eventually(&format!("{line_prefix} = {want}"), async || {
            self.metric(line_prefix).await == want
        })
        .await;
    }

    pub async fn metric(&self, line_prefix: &str) -> f64 {
        let text = self
            .http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(line_prefix)
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no metric {line_prefix} in\n{text}"))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Every HTTP subscribe transport of the scenario matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `/sse/{channel}`: raw payloads.
    SseRaw,
    /// `/sse?channel=`: envelopes.
    Sse,
    /// `/stream?channel=`: NDJSON.
    Stream,
    /// `/poll?channel=&wait=`.
    LongPoll,
    /// `/poll?channel=`, every 20 ms.
    ShortPoll,
    /// `/ws/{channel}`: raw payloads, no cursors, no offsets (reported as 0).
    WsRaw,
    /// `/ws`: the JSON protocol, one subscribe op per channel, per-channel cursors.
    Ws,
}

impl Kind {
    pub fn multi_channel(self) -> bool {
        !matches!(self, Kind::SseRaw | Kind::WsRaw)
    }

    /// Whether messages carry their offset and cursor.
    pub fn positions(self) -> bool {
        self != Kind::WsRaw
    }
}

#[derive(Clone, Debug)]
pub enum Start {
    Now,
    Since(String),
    History(usize),
}

#[derive(Clone, Debug)]
pub enum Item {
    Msg {
        channel: String,
        offset: u64,
        data: Value,
        cursor: String,
    },
    Gap(Value),
    Disconnect(Value),
    Heartbeat,
    Ready(String),
    /// A join or leave record: `{"type":"join"|"leave","channel","client","user"}`.
    Presence(Value),
}

pub struct Sub {
    rx: mpsc::Receiver<Item>,
    buffered: VecDeque<Item>,
    task: JoinHandle<()>,
    /// The cursor of the latest message or gap received.
    pub cursor: Option<String>,
}

impl Drop for Sub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sub {
    /// The next item of any kind, or panics after `TIMEOUT`.
    pub async fn next_item(&mut self) -> Item {
        if let Some(i) = self.buffered.pop_front() {
            return i;
        }
        tokio::time::timeout(TIMEOUT, self.rx.recv())
            .await
            .expect("timed out waiting for the subscriber")
            .expect("the subscriber ended")
    }

    /// The next message or gap, skipping heartbeats and ready markers.
    pub async fn next(&mut self) -> Item {
        loop {
            let item = self.next_item().await;
            match &item {
                Item::Heartbeat | Item::Ready(_) | Item::Presence(_) => continue,
                Item::Msg { cursor, .. } => self.cursor = Some(cursor.clone()),
                Item::Gap(g) => {
                    if let Some(c) = g.get("cursor").and_then(Value::as_str) {
                        self.cursor = Some(c.to_owned());
                    }
                }
                Item::Disconnect(_) => {}
            }
            return item;
        }
    }

    /// The next `n` messages as (channel, offset, data); panics on a gap or disconnect.
    pub async fn messages(&mut self, n: usize) -> Vec<(String, u64, Value)> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.next().await {
                Item::Msg {
                    channel,
                    offset,
                    data,
                    ..
                } => out.push((channel, offset, data)),
                other => panic!("expected a message, got {other:?} after {out:?}"),
            }
        }
        out
    }

    /// Whether the stream ends (the server closed it) within `TIMEOUT`.
    pub async fn ended(&mut self) -> bool {
        loop {
            match tokio::time::timeout(TIMEOUT, self.rx.recv()).await {
                Ok(None) => return true,
                Ok(Some(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

fn offset_of(cursor: &str, channel: &str) -> u64 {
    Cursor::decode(cursor)
        .unwrap()
        .get(&ChannelName::new(channel).unwrap())
        .map(|p| p.offset)
        .unwrap()
}

fn query(kind: Kind, channels: &[&str], start: &Start) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    if kind.multi_channel() {
        for c in channels {
            q.append_pair("channel", c);
        }
    }
    match start {
        Start::Now => {}
        Start::Since(c) => {
            q.append_pair("since", c);
        }
        Start::History(n) => {
            q.append_pair("history", &n.to_string());
        }
    }
    q.finish()
}

/// Subscribes over `kind` and returns once the subscription is live.
pub async fn subscribe(server: &TestServer, kind: Kind, channels: &[&str], start: Start) -> Sub {
    let (tx, rx) = mpsc::channel(100_000);
    let url = server.url.clone();
    let http = server.http.clone();
    let channels: Vec<String> = channels.iter().map(|c| c.to_string()).collect();
    let task = match kind {
        Kind::WsRaw | Kind::Ws => ws_task(&url, kind, &channels, &start, tx).await,
        Kind::SseRaw | Kind::Sse | Kind::Stream => {
            let path = match kind {
                Kind::SseRaw => format!("/sse/{}", channels[0]),
                Kind::Sse => "/sse".into(),
                _ => "/stream".into(),
            };
            let refs: Vec<&str> = channels.iter().map(String::as_str).collect();
            let q = query(kind, &refs, &start);
            let res = http.get(format!("{url}{path}?{q}")).send().await.unwrap();
            assert_eq!(
                res.status(),
                200,
                "subscribe over {kind:?}: {:?}",
                res.text().await
            );
            let raw_channel = channels[0].clone();
            tokio::spawn(async move {
                let mut body = res.bytes_stream();
                let mut buf: Vec<u8> = Vec::new();
                let mut sse = SseParser::default();
                while let Some(Ok(chunk)) = body.next().await {
                    buf.extend_from_slice(&chunk);
                    while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=nl).collect();
                        let line = String::from_utf8(line[..line.len() - 1].to_vec()).unwrap();
                        let item = if kind == Kind::Stream {
                            Some(ndjson_item(&line))
                        } else {
                            sse.line(&line, kind, &raw_channel)
                        };
                        if let Some(item) = item
                            && tx.send(item).await.is_err()
                        {
                            return;
                        }
                    }
                }
            })
        }
        Kind::LongPoll | Kind::ShortPoll => {
            let refs: Vec<&str> = channels.iter().map(String::as_str).collect();
            let first = query(kind, &refs, &start);
            let base = query(kind, &refs, &Start::Now);
            tokio::spawn(async move {
                let mut q = first;
                let mut sent_ready = false;
                loop {
                    let wait = if sent_ready && kind == Kind::LongPoll {
                        "&wait=5"
                    } else {
                        ""
                    };
                    let res = match http.get(format!("{url}/poll?{q}{wait}")).send().await {
                        Ok(r) => r,
                        Err(_) => return,
                    };
                    if res.status() != 200 {
                        let _ = tx
                            .send(Item::Disconnect(json!({"status": res.status().as_u16()})))
                            .await;
                        return;
                    }
                    let reply: Value = res.json().await.unwrap();
                    let cursor = reply["cursor"].as_str().unwrap().to_owned();
                    for g in reply["gaps"].as_array().unwrap() {
                        let _ = tx.send(Item::Gap(g.clone())).await;
                    }
                    for m in reply["messages"].as_array().unwrap() {
                        let _ = tx.send(envelope_item(m)).await;
                    }
                    if !sent_ready {
                        sent_ready = true;
                        let _ = tx.send(Item::Ready(cursor.clone())).await;
                    }
                    q = format!("{base}&since={cursor}");
                    if kind == Kind::ShortPoll {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        }
    };
    let mut sub = Sub {
        rx,
        buffered: VecDeque::new(),
        task,
        cursor: None,
    };
    loop {
        let item = tokio::time::timeout(TIMEOUT, sub.rx.recv())
            .await
            .expect("subscription never became live")
            .expect("subscription ended before it was live");
        if let Item::Ready(c) = &item {
            if !c.is_empty() {
                sub.cursor = Some(c.clone());
            }
            return sub;
        }
        sub.buffered.push_back(item);
    }
}

/// Opens a WebSocket and pumps its frames into `tx`. Raw: live once the handshake is done
/// (the server joins before it answers 101). JSON: live once every subscribe is acknowledged.
async fn ws_task(
    url: &str,
    kind: Kind,
    channels: &[String],
    start: &Start,
    tx: mpsc::Sender<Item>,
) -> JoinHandle<()> {
    use tokio_tungstenite::tungstenite::Message as Ws;
    let base = url.replacen("http://", "ws://", 1);
    let target = if kind == Kind::WsRaw {
        let q = query(kind, &[], start);
        format!("{base}/ws/{}?{q}", channels[0])
    } else {
        format!("{base}/ws")
    };
    let (mut socket, _) = tokio_tungstenite::connect_async(target).await.unwrap();
    if kind == Kind::Ws {
        for (i, c) in channels.iter().enumerate() {
            let mut op = json!({"id": i, "op": "subscribe", "channel": c});
            match start {
                Start::Now => {}
                Start::Since(cursor) => op["since"] = json!(cursor),
                Start::History(n) => op["history"] = json!(n),
            }
            socket.send(Ws::text(op.to_string())).await.unwrap();
        }
    }
    let mut awaiting = if kind == Kind::Ws { channels.len() } else { 0 };
    let channel = channels[0].clone();
    if awaiting == 0 {
        let _ = tx.send(Item::Ready(String::new())).await;
    }
    tokio::spawn(async move {
        while let Some(frame) = socket.next().await {
            let item = match frame {
                Ok(Ws::Text(t)) if kind == Kind::WsRaw => Item::Msg {
                    channel: channel.clone(),
                    offset: 0,
                    data: serde_json::from_str(t.as_str()).unwrap_or(Value::String(t.to_string())),
                    cursor: String::new(),
                },
                Ok(Ws::Binary(b)) if kind == Kind::WsRaw => Item::Msg {
                    channel: channel.clone(),
                    offset: 0,
                    data: json!(b.to_vec()),
                    cursor: String::new(),
                },
                Ok(Ws::Text(t)) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    match v["type"].as_str() {
                        Some("message") => envelope_item(&v),
                        Some("gap") => Item::Gap(v),
                        Some("disconnect") => Item::Disconnect(v),
                        Some("join" | "leave") => Item::Presence(v),
                        Some("reply") => {
                            assert!(v.get("error").is_none(), "error reply {v}");
                            awaiting = awaiting.saturating_sub(1);
                            if awaiting > 0 {
                                continue;
                            }
                            Item::Ready(v["cursor"].as_str().unwrap_or_default().to_owned())
                        }
                        _ => continue,
                    }
                }
                Ok(Ws::Close(frame)) => {
                    let code = frame.map(|f| u16::from(f.code));
                    Item::Disconnect(json!({"close": code}))
                }
                Ok(_) => continue,
                Err(_) => return,
            };
            if tx.send(item).await.is_err() {
                return;
            }
        }
    })
}

fn envelope_item(v: &Value) -> Item {
    Item::Msg {
        channel: v["channel"].as_str().unwrap().to_owned(),
        offset: v["offset"].as_u64().unwrap(),
        data: v["data"].clone(),
        cursor: v["cursor"].as_str().unwrap().to_owned(),
    }
}

fn ndjson_item(line: &str) -> Item {
    if line.is_empty() {
        return Item::Heartbeat;
    }
    let v: Value = serde_json::from_str(line).unwrap();
    match v.get("type").and_then(Value::as_str) {
        None => envelope_item(&v),
        Some("gap") => Item::Gap(v),
        Some("disconnect") => Item::Disconnect(v),
        Some("ready") => Item::Ready(v["cursor"].as_str().unwrap().to_owned()),
        Some("join" | "leave") => Item::Presence(v),
        Some(other) => panic!("unknown record type {other}"),
    }
}

#[derive(Default)]
struct SseParser {
    id: Option<String>,
    event: Option<String>,
    data: Vec<String>,
}

impl SseParser {
    fn line(&mut self, line: &str, kind: Kind, channel: &str) -> Option<Item> {
        if line.starts_with(':') {
            return Some(Item::Heartbeat);
        }
        if !line.is_empty() {
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => self.id = Some(value.to_owned()),
                "event" => self.event = Some(value.to_owned()),
                "data" => self.data.push(value.to_owned()),
                _ => {}
            }
            return None;
        }
        let id = self.id.take();
        let event = self.event.take();
        let data = std::mem::take(&mut self.data);
        if data.is_empty() {
            return id.map(Item::Ready);
        }
        let data = data.join("\n");
        match event.as_deref() {
            Some("tidings.gap") => {
                let mut g: Value = serde_json::from_str(&data).unwrap();
                g["cursor"] = json!(id);
                Some(Item::Gap(g))
            }
            Some("tidings.disconnect") => {
                Some(Item::Disconnect(serde_json::from_str(&data).unwrap()))
            }
            Some(kind @ ("tidings.join" | "tidings.leave")) => {
                let mut v: Value = serde_json::from_str(&data).unwrap();
                v["type"] = json!(&kind["tidings.".len()..]);
                Some(Item::Presence(v))
            }
            _ if kind == Kind::SseRaw => {
                let cursor = id.unwrap();
                Some(Item::Msg {
                    channel: channel.to_owned(),
                    offset: offset_of(&cursor, channel),
                    data: serde_json::from_str(&data).unwrap_or(Value::String(data)),
                    cursor,
                })
            }
            _ => Some(envelope_item(&serde_json::from_str(&data).unwrap())),
        }
    }
}

/// Runs a scenario once per transport, naming the transport in any failure.
#[macro_export]
macro_rules! every_transport {
    ($scenario:ident: $($kind:ident),+ $(,)?) => {
        mod $scenario {
            $(
                #[allow(non_snake_case)]
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $kind() {
                    super::$scenario($crate::common::Kind::$kind).await;
                }
            )+
        }
    };
    ($scenario:ident) => {
        $crate::every_transport!($scenario: SseRaw, Sse, Stream, LongPoll, ShortPoll, WsRaw, Ws);
    };
}
