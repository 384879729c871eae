//! RFC 6455 framing for the server side: the handshake's accept key, a decoder for the
//! frames clients send (masked, maybe fragmented) and the encoder for the frames the server
//! sends (unmasked, never fragmented). Pure functions over byte buffers: the session in
//! `transport/websocket.rs` owns the socket, and the fuzz target `ws_frames` runs exactly
//! this decoder.
//!
//! Why our own and not tungstenite: a parked WebSocket should cost what a parked SSE stream
//! does. tungstenite keeps its context, read and write buffers per socket, and its stream
//! must be split into two tasks to read and write at once; with this decoder one task owns
//! the socket, the read buffer exists only while bytes are waiting, and a message's frame is
//! encoded once and copied to every subscriber.
//!
//! Not supported: extensions (permessage-deflate is never negotiated, so any RSV bit is a
//! protocol error).

use bytes::{Buf, Bytes, BytesMut};

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The largest header a server frame has: 2 bytes, then a 64-bit length.
pub const MAX_HEADER: usize = 10;

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key` (RFC 6455 §4.2.2).
pub fn accept_key(key: &[u8]) -> String {
    use base64::Engine;
    use sha1::{Digest, Sha1};
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// One complete thing a client said.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A whole text message, valid UTF-8.
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong,
    /// The client's close frame: its code (valid per §7.4) and reason, if it gave one.
    Close(Option<(u16, String)>),
}

/// Why the connection must be failed: the close code to send (§7.4.1) and a short reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fail {
    pub code: u16,
    pub reason: &'static str,
}

const fn fail(code: u16, reason: &'static str) -> Fail {
    Fail { code, reason }
}

/// A fragmented message still being received.
struct Partial {
    text: bool,
    data: BytesMut,
    /// How much of `data` is known to be valid UTF-8 (text only): checking from here on
    /// each fragment fails an invalid message early without rescanning it.
    checked: usize,
}

/// Reassembles client frames into messages. Its only state between frames is a fragmented
/// message; a parked connection holds none.
#[derive(Default)]
pub struct Decoder {
    partial: Option<Box<Partial>>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next complete frame off the front of `buf` and returns what it completes.
    /// `Ok(None)`: more bytes are needed (room for the whole frame has been reserved in
    /// `buf`), or the frame was a fragment of a message not finished yet — call again
    /// until it returns `Ok(None)` with `buf` unchanged. `max_message`: the largest message
    /// (all its fragments together) accepted; over it the connection fails with 1009. The
    /// caller's, not the decoder's: 8 bytes of every parked session, where the session can
    /// read it from its configuration.
    pub fn next(
        &mut self,
        buf: &mut BytesMut,
        max_message: usize,
    ) -> Result<Option<Incoming>, Fail> {
        loop {
            let before = buf.len();
            match self.frame(buf, max_message)? {
                Some(incoming) => return Ok(Some(incoming)),
                // A fragment was consumed: there may be another frame behind it.
                None if buf.len() != before => continue,
                None => return Ok(None),
            }
        }
    }

    fn frame(&mut self, buf: &mut BytesMut, max_message: usize) -> Result<Option<Incoming>, Fail> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (buf[0], buf[1]);
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0F;
        if b0 & 0x70 != 0 {
            return Err(fail(1002, "reserved bits set"));
        }
        if b1 & 0x80 == 0 {
            return Err(fail(1002, "client frames must be masked"));
        }
        let control = opcode & 0x8 != 0;
        match opcode {
            OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG => {}
            _ => return Err(fail(1002, "unknown opcode")),
        }
        let (len_bytes, len) = match b1 & 0x7F {
            126 => {
                if buf.len() < 4 {
                    return Ok(None);
                }
                (2, u64::from(u16::from_be_bytes([buf[2], buf[3]])))
            }
            127 => {
                if buf.len() < 10 {
                    return Ok(None);
                }
                let mut n = [0u8; 8];
                n.copy_from_slice(&buf[2..10]);
                let n = u64::from_be_bytes(n);
                if n >> 63 != 0 {
                    return Err(fail(1002, "frame length out of range"));
                }
                (8, n)
            }
            n => (0, u64::from(n)),
        };
        if control {
            if !fin {
                return Err(fail(1002, "fragmented control frame"));
            }
            if len > 125 {
                return Err(fail(1002, "control frame over 125 bytes"));
            }
        } else {
            match (opcode, &self.partial) {
                (OP_CONTINUATION, None) => {
                    return Err(fail(1002, "continuation without a message"));
                }
                (OP_TEXT | OP_BINARY, Some(_)) => {
                    return Err(fail(1002, "new message inside a fragmented one"));
                }
                _ => {}
            }
            let so_far = self.partial.as_ref().map_or(0, |p| p.data.len()) as u64;
            if so_far.saturating_add(len) > max_message as u64 {
                return Err(fail(1009, "message too big"));
            }
        }
        // Within max_message (or 125), so it fits in usize.
        let len = usize::try_from(len).map_err(|_| fail(1009, "message too big"))?;
        let head = 2 + len_bytes + 4;
        let total = head + len;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let mut frame = buf.split_to(total);
        let mask = [
            frame[head - 4],
            frame[head - 3],
            frame[head - 2],
            frame[head - 1],
        ];
        frame.advance(head);
        unmask(&mut frame, mask);
        if control {
            return control_frame(opcode, frame.freeze()).map(Some);
        }
        self.data_frame(opcode, fin, frame)
    }

    fn data_frame(
        &mut self,
        opcode: u8,
        fin: bool,
        payload: BytesMut,
    ) -> Result<Option<Incoming>, Fail> {
        let mut partial = match self.partial.take() {
            None if fin => {
                return if opcode == OP_TEXT {
                    match std::str::from_utf8(&payload) {
                        Ok(_) => Ok(Some(Incoming::Text(payload.freeze()))),
                        Err(_) => Err(fail(1007, "text message is not UTF-8")),
                    }
                } else {
                    Ok(Some(Incoming::Binary(payload.freeze())))
                };
            }
            None => Box::new(Partial {
                text: opcode == OP_TEXT,
                data: payload,
                checked: 0,
            }),
            Some(mut partial) => {
                partial.data.extend_from_slice(&payload);
                partial
            }
        };
        if partial.text {
            match std::str::from_utf8(&partial.data[partial.checked..]) {
                Ok(_) => partial.checked = partial.data.len(),
                // Invalid bytes (not just a character cut at the fragment's end): fail now.
                Err(e) if e.error_len().is_some() => {
                    return Err(fail(1007, "text message is not UTF-8"));
                }
                Err(e) => partial.checked += e.valid_up_to(),
            }
        }
        if !fin {
            self.partial = Some(partial);
            return Ok(None);
        }
        let Partial {
            text,
            data,
            checked,
            ..
        } = *partial;
        if !text {
            return Ok(Some(Incoming::Binary(data.freeze())));
        }
        if checked != data.len() {
            return Err(fail(1007, "text message is not UTF-8"));
        }
        Ok(Some(Incoming::Text(data.freeze())))
    }
}

fn control_frame(opcode: u8, payload: Bytes) -> Result<Incoming, Fail> {
    match opcode {
        OP_PING => Ok(Incoming::Ping(payload)),
        OP_PONG => Ok(Incoming::Pong),
        _ => {
            if payload.is_empty() {
                return Ok(Incoming::Close(None));
            }
            if payload.len() == 1 {
                return Err(fail(1002, "close frame with a one-byte body"));
            }
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close_code_allowed(code) {
                return Err(fail(1002, "invalid close code"));
            }
            let reason = std::str::from_utf8(&payload[2..])
                .map_err(|_| fail(1007, "close reason is not UTF-8"))?;
            Ok(Incoming::Close(Some((code, reason.to_owned()))))
        }
    }
}

/// Codes a peer may send in a close frame (RFC 6455 §7.4, with 1012/1013 from the IANA
/// registry): not 1004–1006 or 1015 (reserved, never on the wire), nor unassigned ones.
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1013 | 3000..=4999)
}

/// XORs the client's mask over `data`, eight bytes at a time.
fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    // Whole words came first, so the mask's phase is still 0 here.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// Appends one unfragmented, unmasked server frame to `out`.
pub fn encode(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    let len = payload.len();
    out.reserve(MAX_HEADER + len);
    out.push(0x80 | opcode);
    if len < 126 {
        out.push(len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        out.push(126);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// A whole frame as shared bytes (a message's frame, encoded once for every subscriber).
pub fn encode_bytes(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(MAX_HEADER + payload.len());
    encode(&mut out, opcode, payload);
    Bytes::from(out)
}

/// A close frame's body: the code, then the reason (cut to fit the 125-byte limit on a
/// character boundary).
pub fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut body = [0u8; 125];
    body[..2].copy_from_slice(&code.to_be_bytes());
    body[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
    encode(out, OP_CLOSE, &body[..2 + end]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame: masked with a fixed key.
    fn client(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= 0xFFFF {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn decode_all(bytes: &[u8]) -> Result<Vec<Incoming>, Fail> {
        let mut d = Decoder::new();
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(i) = d.next(&mut buf, 1 << 20)? {
            out.push(i);
        }
        Ok(out)
    }

    #[test]
    fn the_accept_key_matches_the_rfc_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn a_masked_text_frame_decodes_to_its_text() {
        let got = decode_all(&client(true, OP_TEXT, b"Hello, world: 0123456789")).unwrap();
        assert_eq!(
            got,
            vec![Incoming::Text(Bytes::from_static(
                b"Hello, world: 0123456789"
            ))]
        );
    }

    #[test]
    fn frames_of_every_length_encoding_round_trip_byte_by_byte() {
        for len in [0, 1, 7, 8, 9, 125, 126, 127, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let wire = client(true, OP_BINARY, &payload);
            let mut d = Decoder::new();
            let mut buf = BytesMut::new();
            let mut got = None;
            // Fed in pieces: nothing is returned until the frame is whole.
            for piece in wire.chunks(4093) {
                assert!(got.is_none());
                buf.extend_from_slice(piece);
                got = d.next(&mut buf, 1 << 20).unwrap();
            }
            assert_eq!(
                got,
                Some(Incoming::Binary(Bytes::from(payload))),
                "len {len}"
            );
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn fragments_reassemble_and_control_frames_may_interleave() {
        let mut wire = client(false, OP_TEXT, "héllo ".as_bytes());
        wire.extend(client(true, OP_PING, b"p"));
        // The 'é' of "wörld" is cut between two fragments: still valid UTF-8.
        let word = "wörld".as_bytes();
        wire.extend(client(false, OP_CONTINUATION, &word[..2]));
        wire.extend(client(true, OP_CONTINUATION, &word[2..]));
        let got = decode_all(&wire).unwrap();
        assert_eq!(
            got,
            vec![
                Incoming::Ping(Bytes::from_static(b"p")),
                Incoming::Text(Bytes::from("héllo wörld".as_bytes().to_vec())),
            ]
        );
    }

    #[test]
    fn protocol_violations_fail_with_the_right_code() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (vec![0x81, 0x00], 1002),                     // unmasked
            (vec![0xC1, 0x80, 0, 0, 0, 0], 1002),         // RSV1 without an extension
            (vec![0x83, 0x80, 0, 0, 0, 0], 1002),         // reserved opcode
            (client(false, OP_PING, b""), 1002),          // fragmented control
            (client(true, OP_PING, &[0; 126]), 1002),     // control over 125
            (client(true, OP_CONTINUATION, b"x"), 1002),  // nothing to continue
            (client(true, OP_TEXT, &[0xff, 0xfe]), 1007), // not UTF-8
            (client(true, OP_CLOSE, &[3]), 1002),         // one-byte close body
            (client(true, OP_CLOSE, &1005u16.to_be_bytes()), 1002),
            (client(true, OP_BINARY, &vec![0; (1 << 20) + 1]), 1009),
        ];
        for (wire, code) in cases {
            assert_eq!(decode_all(&wire).unwrap_err().code, code, "{wire:02x?}");
        }
        let mut nested = client(false, OP_TEXT, b"a");
        nested.extend(client(true, OP_TEXT, b"b"));
        assert_eq!(decode_all(&nested).unwrap_err().code, 1002);
    }

    #[test]
    fn invalid_utf8_fails_at_the_fragment_that_has_it() {
        let mut d = Decoder::new();
        let mut buf = BytesMut::from(&client(false, OP_TEXT, b"fine")[..]);
        assert_eq!(d.next(&mut buf, 1 << 20), Ok(None));
        buf.extend_from_slice(
            &client(
                false,
                OP_CONTINUATION,
                &[0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xf4, 0x90],
            )[..],
        );
        assert_eq!(d.next(&mut buf, 1 << 20).unwrap_err().code, 1007);
    }

    #[test]
    fn a_fragmented_message_over_the_limit_fails_before_it_is_buffered() {
        let mut d = Decoder::new();
        let mut buf = BytesMut::from(&client(false, OP_BINARY, b"123456")[..]);
        assert_eq!(d.next(&mut buf, 10), Ok(None));
        // Only the header has arrived: the declared length alone is refused.
        let next = client(true, OP_CONTINUATION, b"789012");
        buf.extend_from_slice(&next[..6]);
        assert_eq!(d.next(&mut buf, 10).unwrap_err().code, 1009);
    }

    #[test]
    fn close_frames_carry_their_code_and_reason() {
        let mut body = 4000u16.to_be_bytes().to_vec();
        body.extend_from_slice("bye ✓".as_bytes());
        assert_eq!(
            decode_all(&client(true, OP_CLOSE, &body)).unwrap(),
            vec![Incoming::Close(Some((4000, "bye ✓".into())))]
        );
        assert_eq!(
            decode_all(&client(true, OP_CLOSE, b"")).unwrap(),
            vec![Incoming::Close(None)]
        );
    }

    #[test]
    fn server_frames_use_the_shortest_length_and_close_reasons_are_cut_on_a_boundary() {
        let mut out = Vec::new();
        encode(&mut out, OP_TEXT, b"hi");
        assert_eq!(out, b"\x81\x02hi");
        out.clear();
        encode(&mut out, OP_BINARY, &[0; 300]);
        assert_eq!(&out[..4], &[0x82, 126, 1, 44]);
        out.clear();
        encode(&mut out, OP_BINARY, &[0; 70000]);
        assert_eq!(&out[..10], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        out.clear();
        encode_close(&mut out, 1000, &"é".repeat(100));
        assert_eq!(out[1] as usize, out.len() - 2);
        assert!(out.len() - 2 <= 125);
        assert!(std::str::from_utf8(&out[4..]).is_ok());
    }
}
