//! `tidings subscribe --transport ws`: the `/ws` JSON protocol (SPEC §5) as one more kind of
//! attempt for the reconnect loop of [`Session`], which owns the backoff and the output.
//!
//! One attempt: open `/ws`, send one `subscribe` op per channel (each from that channel's own
//! cursor, or with `history` while it has none), then print what arrives until the connection
//! ends. Unlike the HTTP transports, whose every cursor covers the whole subscription, a `/ws`
//! cursor covers one channel (SPEC §10), so [`Cursors`] keeps one per channel, moved by message
//! and gap frames.
//!
//! Message frames are printed as the envelope the other transports print: the frame's text with
//! its `"type":"message",` member spliced out, so the server's field order and number formatting
//! are kept. Gap frames are printed like the HTTP stream's gap record.

use std::io::Write;
use std::time::Duration;

use anyhow::anyhow;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message, protocol::CloseFrame};

use super::{Ended, STREAM_IDLE_LIMIT, Session, disconnected, peek, tag_as_gap};
use crate::client::error_chain;
use crate::ws::{self, ConnectError, Frame, ReplyError, Socket};

/// Silence after which we ping the server ourselves. The server pings every `ping_interval`
/// (25 s by default), but it may be configured slower; our own ping makes any live server
/// answer, so only a dead connection stays silent for [`STREAM_IDLE_LIMIT`].
const PING_AFTER: Duration = Duration::from_secs(20);

/// Close codes after which reconnecting would only repeat the failure: the server found our
/// frames malformed or too big (1002, 1003, 1007, 1008, 1009, 1010), or the raw-mode gap (4010).
/// Everything else (1000, 1001, 1006, 1011, 1012 restart, 1013 try again, 4008 slow) is retried.
const FATAL_CLOSE_CODES: [u16; 7] = [1002, 1003, 1007, 1008, 1009, 1010, 4010];

/// Where each channel resumes.
#[derive(Debug)]
pub(super) struct Cursors {
    /// In command-line order, each channel once; the subscribe op of entry `i` has id `i + 1`.
    entries: Vec<(String, Option<String>)>,
}

impl Cursors {
    /// `since` (from `--since`) is where every channel starts; the server refuses it for a
    /// channel it does not cover. A channel named twice is subscribed once, as the HTTP
    /// transports do.
    pub(super) fn new(channels: &[String], since: Option<&str>) -> Self {
        let mut entries: Vec<(String, Option<String>)> = Vec::with_capacity(channels.len());
        for channel in channels {
            if !entries.iter().any(|(known, _)| known == channel) {
                entries.push((channel.clone(), since.map(str::to_owned)));
            }
        }
        Self { entries }
    }

    #[cfg(test)]
    fn get(&self, channel: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(known, _)| known == channel)
            .and_then(|(_, cursor)| cursor.as_deref())
    }

    /// Moves `channel` to `cursor` (a message or gap for a channel we did not ask for is not
    /// ours to track).
    fn set(&mut self, channel: &str, cursor: String) {
        if let Some((_, slot)) = self.entries.iter_mut().find(|(known, _)| known == channel) {
            *slot = Some(cursor);
        }
    }

    /// Takes a subscribe reply's cursor, but only for a channel that has none yet. For a fresh
    /// subscription it is the start of the replay, which is what a reconnect must resume from.
    /// For a resumed one it adds nothing, and can take something away: when history no longer
    /// covers our cursor, the reply's cursor already lies past the gap, so resuming from it
    /// after losing the connection before the gap frame arrived would drop the notice.
    fn adopt(&mut self, channel: &str, cursor: String) {
        if let Some((_, slot @ None)) = self.entries.iter_mut().find(|(known, _)| known == channel)
        {
            *slot = Some(cursor);
        }
    }

    /// The channel whose subscribe op had request id `id`.
    fn channel_of(&self, id: u64) -> Option<&str> {
        let index = usize::try_from(id).ok()?.checked_sub(1)?;
        self.entries.get(index).map(|(channel, _)| channel.as_str())
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    /// One subscribe op per channel: from its cursor when it has one, else with `history`
    /// (which only means something for a fresh subscription), else from now.
    fn subscribe_ops(&self, history: Option<u64>) -> Vec<String> {
        self.entries
            .iter()
            .enumerate()
            .map(|(index, (channel, cursor))| {
                let mut op = json!({"id": index + 1, "op": "subscribe", "channel": channel});
                match (cursor, history) {
                    (Some(cursor), _) => op["since"] = json!(cursor),
                    (None, Some(history)) => op["history"] = json!(history),
                    (None, None) => {}
                }
                op.to_string()
            })
            .collect()
    }
}

impl<W: Write> Session<W> {
    /// One WebSocket connection, read until it ends.
    pub(super) async fn ws(&mut self) -> Result<(), Ended> {
        let mut socket = ws::connect(self.client()).await.map_err(|err| match err {
            ConnectError::Transient { why, after } => Ended::Retry { why, after },
            ConnectError::Refused(err) => Ended::Fatal(err),
        })?;
        let ended = self.ws_read(&mut socket).await;
        // Also after `--count`: the server sees a clean close, not a reset.
        ws::close(&mut socket).await;
        ended
    }

    async fn ws_read(&mut self, socket: &mut Socket) -> Result<(), Ended> {
        for op in self.ws_cursors.subscribe_ops(self.history) {
            socket.feed(Message::text(op)).await.map_err(broken)?;
        }
        socket.flush().await.map_err(broken)?;
        let mut unanswered = self.ws_cursors.len();
        let mut heard = Instant::now();
        loop {
            // Reading is also what answers the server's pings: tungstenite queues the pong
            // and writes it on the next read.
            let frame = match tokio::time::timeout(PING_AFTER, socket.next()).await {
                Err(_) if heard.elapsed() >= STREAM_IDLE_LIMIT => {
                    return Err(Ended::retry(format!(
                        "no frame for {}s, not even a pong",
                        STREAM_IDLE_LIMIT.as_secs()
                    )));
                }
                Err(_) => {
                    socket
                        .send(Message::Ping(Default::default()))
                        .await
                        .map_err(broken)?;
                    continue;
                }
                Ok(None) => return Err(Ended::retry("the server closed the connection")),
                Ok(Some(Err(err))) => return Err(broken(err)),
                Ok(Some(Ok(frame))) => frame,
            };
            heard = Instant::now();
            match frame {
                Message::Text(text) => self.on_ws_frame(text.as_str(), &mut unanswered)?,
                // The protocol is text frames; a server sends binary only for text it could not
                // send as such, which is still worth reading if it is UTF-8.
                Message::Binary(bytes) => {
                    if let Ok(text) = std::str::from_utf8(&bytes) {
                        self.on_ws_frame(text, &mut unanswered)?;
                    }
                }
                Message::Close(frame) => return Err(closed(frame.as_ref())),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }

    /// Handles one text frame; `unanswered` counts the subscribe ops still without a reply.
    fn on_ws_frame(&mut self, text: &str, unanswered: &mut usize) -> Result<(), Ended> {
        let frame = ws::parse_frame(text)?;
        match frame.kind.as_deref() {
            Some("message") => {
                let envelope = envelope_of(text).ok_or_else(|| garbled(text))?;
                self.out.envelope(&envelope)?;
                self.follow(frame);
                Ok(())
            }
            Some("gap") => {
                let notice = gap_record(text).ok_or_else(|| garbled(text))?;
                self.out.gap(&notice)?;
                self.follow(frame);
                Ok(())
            }
            Some("reply") => self.on_ws_reply(frame, unanswered),
            Some("disconnect") => Err(disconnected(&peek(text)?)),
            // `pong`, presence's `join`/`leave`, or something from a newer server: not output.
            _ => Ok(()),
        }
    }

    /// Moves the frame's channel to the frame's cursor.
    fn follow(&mut self, frame: Frame) {
        if let (Some(channel), Some(cursor)) = (frame.channel, frame.cursor) {
            self.ws_cursors.set(&channel, cursor);
        }
    }

    fn on_ws_reply(&mut self, frame: Frame, unanswered: &mut usize) -> Result<(), Ended> {
        let Some(channel) = frame
            .reply_to()
            .and_then(|id| self.ws_cursors.channel_of(id))
            .map(str::to_owned)
        else {
            return Ok(()); // not an answer to one of our ops
        };
        if let Some(error) = &frame.error {
            return Err(refused(&channel, error));
        }
        if let Some(cursor) = frame.cursor {
            self.ws_cursors.adopt(&channel, cursor);
        }
        *unanswered = unanswered.saturating_sub(1);
        if *unanswered == 0 {
            // Every channel is followed again: only now has the attempt worked.
            self.backoff.reset();
            self.reconnected();
        }
        Ok(())
    }
}

/// A message frame's envelope: the frame without its `type` member.
fn envelope_of(frame: &str) -> Option<String> {
    ws::remove_member(frame.trim(), "type").map(|(envelope, _)| envelope)
}

/// A gap frame as the HTTP stream's gap record: `type` first, then the notice, then its cursor.
fn gap_record(frame: &str) -> Option<String> {
    let (notice, _) = ws::remove_member(frame.trim(), "type")?;
    match ws::remove_member(&notice, "cursor") {
        Some((notice, cursor)) => ws::append_member(&tag_as_gap(&notice), "cursor", cursor),
        None => Some(tag_as_gap(&notice)),
    }
}

fn garbled(frame: &str) -> Ended {
    Ended::Fatal(anyhow!(
        "the server sent a frame that is not one JSON object: {}",
        frame.chars().take(120).collect::<String>()
    ))
}

/// An error reply to a subscribe op: retried while the broker is down (what HTTP answers with
/// 503), fatal otherwise (an invalid channel or cursor, too many channels, …).
fn refused(channel: &str, error: &ReplyError) -> Ended {
    let what = format!("{} ({})", error.message, error.code);
    if error.code == "broker_unavailable" {
        Ended::retry(format!("subscribing to {channel:?} failed: {what}"))
    } else {
        Ended::Fatal(anyhow!(
            "the subscription to {channel:?} was refused: {what}"
        ))
    }
}

fn closed(frame: Option<&CloseFrame>) -> Ended {
    let Some(frame) = frame else {
        return Ended::retry("the server closed the connection");
    };
    let code = u16::from(frame.code);
    let reason = if frame.reason.is_empty() {
        String::new()
    } else {
        format!(": {}", frame.reason.as_str())
    };
    if FATAL_CLOSE_CODES.contains(&code) {
        Ended::Fatal(anyhow!(
            "the server closed the connection with code {code}{reason}; reconnecting would not help"
        ))
    } else {
        Ended::retry(format!(
            "the server closed the connection (code {code}{reason})"
        ))
    }
}

fn broken(err: tungstenite::Error) -> Ended {
    match err {
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            Ended::retry("the server closed the connection")
        }
        err => Ended::retry(format!("the connection broke: {}", error_chain(&err))),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::super::{Backoff, SubscribeArgs};
    use super::*;
    use crate::client::Client;

    fn channels(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    fn ops(cursors: &Cursors, history: Option<u64>) -> Vec<Value> {
        cursors
            .subscribe_ops(history)
            .iter()
            .map(|op| serde_json::from_str(op).unwrap())
            .collect()
    }

    const MESSAGE: &str = r#"{"type":"message","channel":"a","offset":7,"epoch":"e1","cursor":"a7","event":"msg","data":{"type":"inner","n":1.50},"time":1732200000123}"#;

    #[test]
    fn a_message_frame_prints_as_its_envelope_without_the_type_member() {
        assert_eq!(
            envelope_of(MESSAGE).unwrap(),
            r#"{"channel":"a","offset":7,"epoch":"e1","cursor":"a7","event":"msg","data":{"type":"inner","n":1.50},"time":1732200000123}"#
        );
    }

    #[test]
    fn a_gap_frame_prints_like_the_http_streams_gap_record() {
        // What /ws sends (keys in serde_json's order) and what /stream sends for the same gap.
        let frame = r#"{"channel":"b","cursor":"b57","epoch":"e2","next_offset":57,"reason":"trimmed","type":"gap"}"#;
        assert_eq!(
            gap_record(frame).unwrap(),
            r#"{"type":"gap","channel":"b","epoch":"e2","next_offset":57,"reason":"trimmed","cursor":"b57"}"#
        );
        assert_eq!(
            gap_record(r#"{"type":"gap","channel":"b"}"#).unwrap(),
            r#"{"type":"gap","channel":"b"}"#
        );
    }

    #[test]
    fn a_fresh_subscription_sends_history_and_a_resumed_one_its_channels_own_cursor() {
        let mut cursors = Cursors::new(&channels(&["a", "b", "c"]), None);
        assert_eq!(
            ops(&cursors, Some(5)),
            [
                json!({"id": 1, "op": "subscribe", "channel": "a", "history": 5}),
                json!({"id": 2, "op": "subscribe", "channel": "b", "history": 5}),
                json!({"id": 3, "op": "subscribe", "channel": "c", "history": 5}),
            ]
        );
        cursors.set("a", "a3".into());
        cursors.set("c", "c9".into());
        assert_eq!(
            ops(&cursors, Some(5)),
            [
                json!({"id": 1, "op": "subscribe", "channel": "a", "since": "a3"}),
                json!({"id": 2, "op": "subscribe", "channel": "b", "history": 5}),
                json!({"id": 3, "op": "subscribe", "channel": "c", "since": "c9"}),
            ]
        );
        assert_eq!(
            ops(&Cursors::new(&channels(&["a"]), None), None),
            [json!({"id": 1, "op": "subscribe", "channel": "a"})]
        );
    }

    #[test]
    fn since_starts_every_channel_and_a_channel_named_twice_is_subscribed_once() {
        let cursors = Cursors::new(&channels(&["a", "b", "a"]), Some("c0"));
        assert_eq!(
            ops(&cursors, Some(5)),
            [
                json!({"id": 1, "op": "subscribe", "channel": "a", "since": "c0"}),
                json!({"id": 2, "op": "subscribe", "channel": "b", "since": "c0"}),
            ]
        );
        assert_eq!(cursors.channel_of(2), Some("b"));
        assert_eq!(cursors.channel_of(0), None);
        assert_eq!(cursors.channel_of(3), None);
    }

    #[test]
    fn a_reply_cursor_is_adopted_only_by_a_channel_without_one() {
        let mut cursors = Cursors::new(&channels(&["a", "b"]), None);
        cursors.set("a", "a5".into());
        cursors.adopt("a", "past-the-gap".into());
        cursors.adopt("b", "b0".into());
        cursors.set("elsewhere", "x".into());
        assert_eq!(
            (cursors.get("a"), cursors.get("b"), cursors.get("elsewhere")),
            (Some("a5"), Some("b0"), None)
        );
    }

    fn session(extra: &[&str]) -> Session<Vec<u8>> {
        session_at("http://127.0.0.1:9", extra)
    }

    fn session_at(url: &str, extra: &[&str]) -> Session<Vec<u8>> {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: SubscribeArgs,
        }
        let mut argv = vec!["tidings", "a", "b", "--transport", "ws", "--url", url];
        argv.extend_from_slice(extra);
        let args = Cli::try_parse_from(argv).unwrap().args;
        let client = Client::new(&args.url, args.token.clone(), &args.tls).unwrap();
        let backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(5));
        Session::new(vec![client], &args, backoff, Vec::new())
    }

    fn printed(session: &Session<Vec<u8>>) -> String {
        String::from_utf8(session.out.sink.clone()).unwrap()
    }

    #[test]
    fn message_and_gap_frames_move_their_own_channels_cursor_and_replies_fill_the_rest() {
        let mut session = session(&[]);
        let mut unanswered = 2;
        session
            .on_ws_frame(
                r#"{"type":"reply","id":1,"ok":true,"cursor":"a0"}"#,
                &mut unanswered,
            )
            .unwrap();
        session
            .on_ws_frame(
                r#"{"type":"reply","id":2,"ok":true,"cursor":"b0"}"#,
                &mut unanswered,
            )
            .unwrap();
        assert_eq!(unanswered, 0);
        session.on_ws_frame(MESSAGE, &mut unanswered).unwrap();
        session
            .on_ws_frame(
                r#"{"channel":"b","cursor":"b4","epoch":"e","next_offset":5,"reason":"epoch_changed","type":"gap"}"#,
                &mut unanswered,
            )
            .unwrap();
        session
            .on_ws_frame(r#"{"type":"pong"}"#, &mut unanswered)
            .unwrap();
        assert_eq!(session.ws_cursors.get("a"), Some("a7"));
        assert_eq!(session.ws_cursors.get("b"), Some("b4"));
        assert_eq!(
            printed(&session),
            format!(
                "{}\n{}\n",
                envelope_of(MESSAGE).unwrap(),
                r#"{"type":"gap","channel":"b","epoch":"e","next_offset":5,"reason":"epoch_changed","cursor":"b4"}"#
            )
        );
    }

    #[test]
    fn count_stops_after_that_many_messages() {
        let mut session = session(&["--count", "1"]);
        let mut unanswered = 2;
        assert!(matches!(
            session.on_ws_frame(MESSAGE, &mut unanswered),
            Err(Ended::Stop)
        ));
    }

    #[test]
    fn a_subscribe_error_is_fatal_with_the_servers_message_unless_the_broker_is_down() {
        let mut session = session(&[]);
        let mut unanswered = 2;
        let ended = session.on_ws_frame(
            r#"{"type":"reply","id":2,"error":{"code":"invalid_channel","message":"invalid channel name \"b\""}}"#,
            &mut unanswered,
        );
        let Err(Ended::Fatal(err)) = ended else {
            panic!("{ended:?}")
        };
        let err = err.to_string();
        assert!(
            err.contains(r#"invalid channel name "b""#) && err.contains("invalid_channel"),
            "{err}"
        );
        let ended = session.on_ws_frame(
            r#"{"type":"reply","id":1,"error":{"code":"broker_unavailable","message":"down"}}"#,
            &mut unanswered,
        );
        assert!(matches!(ended, Err(Ended::Retry { .. })), "{ended:?}");
        // A reply to an id we never used changes nothing.
        let ended = session.on_ws_frame(
            r#"{"type":"reply","id":9,"error":{"code":"x","message":"y"}}"#,
            &mut unanswered,
        );
        assert!(ended.is_ok());
    }

    #[test]
    fn a_disconnect_frame_is_retried_unless_it_says_not_to_reconnect() {
        let mut session = session(&[]);
        let mut unanswered = 0;
        let ended = session.on_ws_frame(
            r#"{"type":"disconnect","reason":"slow","reconnect":true}"#,
            &mut unanswered,
        );
        assert!(matches!(ended, Err(Ended::Retry { .. })), "{ended:?}");
        let ended = session.on_ws_frame(
            r#"{"type":"disconnect","reason":"banned","reconnect":false}"#,
            &mut unanswered,
        );
        assert!(matches!(ended, Err(Ended::Fatal(_))), "{ended:?}");
    }

    #[test]
    fn a_shutdown_notice_makes_the_advised_delay_the_floor_of_the_next_attempt() {
        let mut session = session(&[]);
        let mut unanswered = 0;
        let ended = session.on_ws_frame(
            r#"{"type":"disconnect","reason":"shutdown","reconnect":true,"reconnect_after_ms":750}"#,
            &mut unanswered,
        );
        match ended {
            Err(Ended::Retry { after, .. }) => {
                assert_eq!(after, Some(std::time::Duration::from_millis(750)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn policy_and_size_closes_are_fatal_and_restart_slow_and_try_again_are_retried() {
        let frame = |code: u16| CloseFrame {
            code: code.into(),
            reason: "why".into(),
        };
        for code in [1008, 1009, 4010] {
            assert!(
                matches!(closed(Some(&frame(code))), Ended::Fatal(_)),
                "{code}"
            );
        }
        for code in [1000, 1001, 1011, 1012, 1013, 4008] {
            assert!(
                matches!(closed(Some(&frame(code))), Ended::Retry { .. }),
                "{code}"
            );
        }
        assert!(matches!(closed(None), Ended::Retry { .. }));
    }

    // --- the whole loop, against a fake /ws server ---

    mod fake_ws {
        use futures_util::{SinkExt, StreamExt};
        use serde_json::Value;
        use tokio::net::TcpListener;
        use tokio::task::JoinHandle;
        use tokio_tungstenite::tungstenite::Message;
        use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
        use tokio_tungstenite::tungstenite::http;
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;

        pub enum Answer {
            /// Refuse the handshake with this status and JSON body.
            Refuse(u16, &'static str),
            /// Read `ops` frames, send `frames`, then close with `close` or, without one,
            /// wait for the client to close.
            Accept {
                ops: usize,
                frames: Vec<String>,
                close: Option<u16>,
            },
        }

        #[derive(Debug, Default)]
        pub struct Seen {
            pub path: String,
            pub authorization: Option<String>,
            pub ops: Vec<Value>,
        }

        /// Answers one connection per `Answer`, in order; returns what each one sent.
        pub async fn spawn(answers: Vec<Answer>) -> (String, JoinHandle<Vec<Seen>>) {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let task = tokio::spawn(async move {
                let mut all = Vec::new();
                for answer in answers {
                    let (tcp, _) = listener.accept().await.unwrap();
                    let mut seen = Seen::default();
                    let refusal = match &answer {
                        Answer::Refuse(status, body) => Some((*status, *body)),
                        Answer::Accept { .. } => None,
                    };
                    // The error type is tungstenite's, imposed by its callback trait.
                    #[allow(clippy::result_large_err)]
                    let callback = |request: &Request, response: Response| {
                        seen.path = request.uri().path().to_owned();
                        seen.authorization = request
                            .headers()
                            .get("authorization")
                            .map(|v| v.to_str().unwrap().to_owned());
                        match refusal {
                            None => Ok(response),
                            Some((status, body)) => Err::<Response, ErrorResponse>(
                                http::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(Some(body.to_owned()))
                                    .unwrap(),
                            ),
                        }
                    };
                    let accepted = tokio_tungstenite::accept_hdr_async(tcp, callback).await;
                    if let Answer::Accept { ops, frames, close } = answer {
                        let mut socket = accepted.unwrap();
                        while seen.ops.len() < ops {
                            match socket.next().await.unwrap().unwrap() {
                                Message::Text(text) => {
                                    seen.ops.push(serde_json::from_str(&text).unwrap());
                                }
                                _ => continue,
                            }
                        }
                        for frame in frames {
                            socket.send(Message::text(frame)).await.unwrap();
                        }
                        if let Some(code) = close {
                            let _ = socket
                                .close(Some(CloseFrame {
                                    code: code.into(),
                                    reason: "bye".into(),
                                }))
                                .await;
                        }
                        while let Some(Ok(_)) = socket.next().await {}
                    }
                    all.push(seen);
                }
                all
            });
            (url, task)
        }
    }

    async fn run(mut session: Session<Vec<u8>>) -> (anyhow::Result<()>, String) {
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            session.run(super::super::Transport::Ws, Duration::from_secs(1)),
        )
        .await
        .unwrap();
        (result, printed(&session))
    }

    fn reply(id: u64, cursor: &str) -> String {
        json!({"type": "reply", "id": id, "ok": true, "cursor": cursor}).to_string()
    }

    fn message(channel: &str, offset: u64, cursor: &str) -> String {
        format!(
            r#"{{"type":"message","channel":"{channel}","offset":{offset},"epoch":"e","cursor":"{cursor}","data":{{"n":{offset}}},"time":1}}"#
        )
    }

    #[tokio::test]
    async fn ws_subscriber_resubscribes_each_channel_from_its_own_cursor_after_a_restart() {
        use fake_ws::Answer;
        let gap = r#"{"channel":"b","cursor":"b5","epoch":"e","next_offset":6,"reason":"trimmed","type":"gap"}"#;
        let (url, server) = fake_ws::spawn(vec![
            Answer::Accept {
                ops: 2,
                frames: vec![
                    reply(1, "a0"),
                    reply(2, "b0"),
                    message("a", 1, "a1"),
                    r#"{"type":"disconnect","reason":"shutdown","reconnect":true}"#.into(),
                ],
                close: Some(1012),
            },
            Answer::Accept {
                ops: 2,
                frames: vec![
                    reply(1, "ignored"),
                    reply(2, "ignored"),
                    gap.into(),
                    message("b", 6, "b6"),
                    message("a", 2, "a2"),
                ],
                close: None,
            },
        ])
        .await;
        let session = session_at(
            &url,
            &["--history", "5", "--count", "3", "--token", "secret"],
        );
        let (result, out) = run(session).await;
        result.unwrap();
        let expected = [
            envelope_of(&message("a", 1, "a1")).unwrap(),
            gap_record(gap).unwrap(),
            envelope_of(&message("b", 6, "b6")).unwrap(),
            envelope_of(&message("a", 2, "a2")).unwrap(),
        ];
        assert_eq!(out, format!("{}\n", expected.join("\n")));
        let seen = server.await.unwrap();
        assert_eq!(seen.len(), 2);
        for connection in &seen {
            assert_eq!(connection.path, "/ws");
            assert_eq!(connection.authorization.as_deref(), Some("Bearer secret"));
        }
        assert_eq!(
            seen[0].ops,
            [
                json!({"id": 1, "op": "subscribe", "channel": "a", "history": 5}),
                json!({"id": 2, "op": "subscribe", "channel": "b", "history": 5}),
            ]
        );
        assert_eq!(
            seen[1].ops,
            [
                json!({"id": 1, "op": "subscribe", "channel": "a", "since": "a1"}),
                json!({"id": 2, "op": "subscribe", "channel": "b", "since": "b0"}),
            ]
        );
    }

    #[tokio::test]
    async fn ws_subscriber_retries_a_503_handshake_and_gives_up_on_a_401() {
        use fake_ws::Answer;
        let (url, server) = fake_ws::spawn(vec![
            Answer::Refuse(
                503,
                r#"{"error":{"code":"broker_unavailable","message":"redis is down"}}"#,
            ),
            Answer::Refuse(
                401,
                r#"{"error":{"code":"unauthorized","message":"a token is required"}}"#,
            ),
        ])
        .await;
        let (result, out) = run(session_at(&url, &[])).await;
        let err = format!("{:#}", result.unwrap_err());
        assert!(
            err.contains("401")
                && err.contains("a token is required")
                && err.contains("pass --token"),
            "{err}"
        );
        assert_eq!(out, "");
        let seen = server.await.unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].authorization, None);
    }

    #[tokio::test]
    async fn ws_subscriber_stops_on_a_refused_subscription_and_a_policy_close() {
        use fake_ws::Answer;
        let (url, server) = fake_ws::spawn(vec![Answer::Accept {
            ops: 2,
            frames: vec![
                reply(1, "a0"),
                json!({"type": "reply", "id": 2, "error": {"code": "too_many_channels", "message": "at most 1 channels per connection"}}).to_string(),
            ],
            close: None,
        }])
        .await;
        let (result, _) = run(session_at(&url, &[])).await;
        let err = format!("{:#}", result.unwrap_err());
        assert!(
            err.contains("at most 1 channels") && err.contains("too_many_channels"),
            "{err}"
        );
        server.await.unwrap();

        let (url, server) = fake_ws::spawn(vec![Answer::Accept {
            ops: 2,
            frames: vec![],
            close: Some(1008),
        }])
        .await;
        let (result, _) = run(session_at(&url, &[])).await;
        let err = format!("{:#}", result.unwrap_err());
        assert!(err.contains("1008"), "{err}");
        server.await.unwrap();
    }
}
