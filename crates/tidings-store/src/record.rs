//! Records and their frames: what one entry of a segment looks like, byte by byte.
//!
//! A frame is `MAGIC u32 | len u32 | crc u32 | payload[len]` (little-endian), the CRC-32
//! (IEEE) covering `len` and the payload. The magic lets a reader find the next frame after a
//! damaged one; the CRC tells a whole record from a torn or altered one, so a damaged record
//! is reported and skipped, never read as data.
//!
//! Payloads start with a kind byte:
//! - `1` message: `channel` (u8 length + bytes), `epoch` (u8 + bytes), `offset` u64,
//!   `time` u64, `event` (u8 length, 0 = none, + bytes), data kind u8 (0 JSON, 1 text,
//!   2 binary), then the data to the end of the payload;
//! - `2` channel position: `channel`, `epoch`, `last_offset` u64;
//! - `3` forgotten: `channel`, `epoch`.
//!
//! Since format 2:
//! - `4` message with an idempotency key: as `1`, with `key` (u8 length + bytes) and
//!   `until_ms` u64 (wall clock) between `event` and the data kind;
//! - `5` fresh epoch (the one the next new channel gets): `epoch` only;
//! - `6` idempotency key whose message may be gone (written at compaction): `channel`,
//!   `epoch`, `offset` u64, `time` u64, `key`, `until_ms` u64.

use bytes::Bytes;
use tidings_core::store::{KeySnapshot, Keyed, Loc, Recovered};
use tidings_core::{ChannelName, Data, Epoch, EventName, IdempotencyKey, Message, Position};

pub const MAGIC: u32 = 0x3147_4454; // "TDG1" read as little-endian bytes
pub const FRAME_HEADER: usize = 12;
/// No record is larger: a length above it is damage, not a record.
pub const MAX_PAYLOAD: usize = 64 << 20;

const KIND_MESSAGE: u8 = 1;
const KIND_CHANNEL: u8 = 2;
const KIND_FORGOTTEN: u8 = 3;
const KIND_MESSAGE_KEYED: u8 = 4;
const KIND_FRESH: u8 = 5;
const KIND_KEY: u8 = 6;

/// CRC-32 (IEEE) tables for slicing-by-8: eight bytes per step, several times faster than a
/// byte at a time, which matters when a large log is scanned at start.
const CRC_TABLES: [[u32; 256]; 8] = {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut j = 1;
        while j < 8 {
            let prev = t[j - 1][i];
            t[j][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            j += 1;
        }
        i += 1;
    }
    t
};

fn crc_update(mut crc: u32, bytes: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let lo = crc ^ u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        crc = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][c[4] as usize]
            ^ t[2][c[5] as usize]
            ^ t[1][c[6] as usize]
            ^ t[0][c[7] as usize];
    }
    for &b in chunks.remainder() {
        crc = t[0][((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

fn frame_crc(len: [u8; 4], payload: &[u8]) -> u32 {
    !crc_update(crc_update(!0, &len), payload)
}

/// Appends one frame around the payload `write` produces.
fn frame(out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    write(out);
    let len = u32::try_from(out.len() - start - FRAME_HEADER).unwrap_or(u32::MAX);
    let crc = frame_crc(len.to_le_bytes(), &out[start + FRAME_HEADER..]);
    out[start..start + 4].copy_from_slice(&MAGIC.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
}

fn put_short(out: &mut Vec<u8>, s: &str) {
    // Channel (128), epoch (32) and event (64) names are validated far below 256 bytes.
    let b = &s.as_bytes()[..s.len().min(255)];
    out.push(b.len() as u8);
    out.extend_from_slice(b);
}

pub fn encode_message(out: &mut Vec<u8>, m: &Message, key: Option<&Keyed>) {
    frame(out, |out| {
        out.push(if key.is_some() {
            KIND_MESSAGE_KEYED
        } else {
            KIND_MESSAGE
        });
        put_short(out, m.channel.as_str());
        put_short(out, m.epoch.as_str());
        out.extend_from_slice(&m.offset.to_le_bytes());
        out.extend_from_slice(&m.time.to_le_bytes());
        put_short(out, m.event.as_ref().map_or("", EventName::as_str));
        if let Some(k) = key {
            put_short(out, k.key.as_str());
            out.extend_from_slice(&k.until_ms.to_le_bytes());
        }
        let (kind, bytes) = match &m.data {
            Data::Json(b) => (0u8, b),
            Data::Text(b) => (1, b),
            Data::Binary(b) => (2, b),
        };
        out.push(kind);
        out.extend_from_slice(bytes);
    });
}

pub fn encode_channel(out: &mut Vec<u8>, channel: &ChannelName, epoch: &Epoch, last: u64) {
    frame(out, |out| {
        out.push(KIND_CHANNEL);
        put_short(out, channel.as_str());
        put_short(out, epoch.as_str());
        out.extend_from_slice(&last.to_le_bytes());
    });
}

pub fn encode_fresh(out: &mut Vec<u8>, epoch: &Epoch) {
    frame(out, |out| {
        out.push(KIND_FRESH);
        put_short(out, epoch.as_str());
    });
}

pub fn encode_key(out: &mut Vec<u8>, k: &KeySnapshot) {
    frame(out, |out| {
        out.push(KIND_KEY);
        put_short(out, k.channel.as_str());
        put_short(out, k.position.epoch.as_str());
        out.extend_from_slice(&k.position.offset.to_le_bytes());
        out.extend_from_slice(&k.time.to_le_bytes());
        put_short(out, k.keyed.key.as_str());
        out.extend_from_slice(&k.keyed.until_ms.to_le_bytes());
    });
}

pub fn encode_forgotten(out: &mut Vec<u8>, channel: &ChannelName, epoch: &Epoch) {
    frame(out, |out| {
        out.push(KIND_FORGOTTEN);
        put_short(out, channel.as_str());
        put_short(out, epoch.as_str());
    });
}

/// What is at `pos` of a segment.
pub enum Frame<'a> {
    /// A whole, intact frame; the next one starts at `next`.
    Whole { payload: &'a [u8], next: usize },
    /// The file ends inside this frame (a write cut short).
    Short,
    /// No intact frame starts here.
    Damaged,
}

pub fn frame_at(buf: &[u8], pos: usize) -> Frame<'_> {
    let rest = buf.get(pos..).unwrap_or_default();
    let Some(header) = rest.get(..FRAME_HEADER) else {
        let n = rest.len().min(4);
        return if !rest.is_empty() && rest[..n] == MAGIC.to_le_bytes()[..n] {
            Frame::Short
        } else {
            Frame::Damaged
        };
    };
    let word =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    if word(0) != MAGIC {
        return Frame::Damaged;
    }
    let len = word(4) as usize;
    if len > MAX_PAYLOAD {
        return Frame::Damaged;
    }
    let start = pos + FRAME_HEADER;
    let Some(payload) = buf.get(start..start + len) else {
        return Frame::Short;
    };
    if frame_crc(word(4).to_le_bytes(), payload) != word(8) {
        return Frame::Damaged;
    }
    Frame::Whole {
        payload,
        next: start + len,
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    }

    fn short(&mut self) -> Option<&'a str> {
        let n = usize::from(self.u8()?);
        std::str::from_utf8(self.take(n)?).ok()
    }
}

/// Decodes an intact payload found at `loc`; `None` when it is not a record this version
/// knows.
pub fn decode(payload: &[u8], loc: Loc) -> Option<Recovered> {
    let mut r = Reader { buf: payload };
    let kind = r.u8()?;
    if kind == KIND_FRESH {
        return Some(Recovered::Fresh(Epoch::new(r.short()?)?));
    }
    let channel = ChannelName::new(r.short()?).ok()?;
    let epoch = Epoch::new(r.short()?)?;
    let keyed = |r: &mut Reader<'_>| -> Option<Keyed> {
        let key = IdempotencyKey::new(r.short()?).ok()?;
        Some(Keyed {
            key,
            until_ms: r.u64()?,
        })
    };
    match kind {
        KIND_MESSAGE | KIND_MESSAGE_KEYED => {
            let offset = r.u64()?;
            let time = r.u64()?;
            let event = match r.short()? {
                "" => None,
                e => Some(EventName::new(e).ok()?),
            };
            let key = if kind == KIND_MESSAGE_KEYED {
                Some(keyed(&mut r)?)
            } else {
                None
            };
            let data_kind = r.u8()?;
            let bytes = Bytes::copy_from_slice(r.buf);
            let data = match data_kind {
                0 => Data::Json(bytes),
                1 => Data::Text(bytes),
                2 => Data::Binary(bytes),
                _ => return None,
            };
            (offset > 0).then(|| Recovered::Message {
                message: Message::new(channel, Position { epoch, offset }, event, data, time),
                loc,
                key,
            })
        }
        KIND_KEY => {
            let offset = r.u64()?;
            let time = r.u64()?;
            let keyed = keyed(&mut r)?;
            Some(Recovered::Key(KeySnapshot {
                channel,
                position: Position { epoch, offset },
                time,
                keyed,
            }))
        }
        KIND_CHANNEL => Some(Recovered::Channel {
            channel,
            epoch,
            last_offset: r.u64()?,
        }),
        KIND_FORGOTTEN => Some(Recovered::Forgotten { channel, epoch }),
        _ => None,
    }
}

/// The channel a (possibly cut-off) payload names, if enough of it is there to tell.
pub fn channel_of_partial(payload: &[u8]) -> Option<String> {
    let mut r = Reader { buf: payload };
    if r.u8()? == KIND_FRESH {
        return None;
    }
    ChannelName::new(r.short()?)
        .ok()
        .map(|c| c.as_str().to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_crc_is_the_standard_crc32() {
        // The check value every CRC-32 (IEEE) implementation agrees on.
        assert_eq!(!crc_update(!0, b"123456789"), 0xCBF4_3926);
        // Across the eight-byte steps and the tail, against the bytewise definition.
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut bytewise = !0u32;
        for &b in &data {
            bytewise = CRC_TABLES[0][((bytewise ^ u32::from(b)) & 0xff) as usize] ^ (bytewise >> 8);
        }
        assert_eq!(crc_update(!0, &data), bytewise);
        assert_eq!(
            !crc_update(crc_update(!0, &data[..13]), &data[13..]),
            !bytewise
        );
    }

    #[test]
    fn a_message_survives_its_frame_and_a_flipped_byte_is_caught() {
        let m = Message::new(
            ChannelName::new("chat:lobby").unwrap(),
            Position {
                epoch: Epoch::new("e1").unwrap(),
                offset: 7,
            },
            Some(EventName::new("msg").unwrap()),
            Data::Json(Bytes::from_static(b"{\"a\":1}")),
            1234,
        );
        let mut buf = Vec::new();
        encode_message(&mut buf, &m, None);
        let Frame::Whole { payload, next } = frame_at(&buf, 0) else {
            panic!("not whole")
        };
        assert_eq!(next, buf.len());
        let Some(Recovered::Message { message: back, .. }) = decode(payload, 0) else {
            panic!("not a message")
        };
        assert_eq!(
            (back.channel.as_str(), back.offset, back.time, &back.data),
            ("chat:lobby", 7, 1234, &m.data)
        );
        assert_eq!(back.event.unwrap().as_str(), "msg");
        for cut in 1..buf.len() {
            assert!(
                matches!(frame_at(&buf[..cut], 0), Frame::Short),
                "cut {cut}"
            );
        }
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            assert!(
                !matches!(frame_at(&bad, 0), Frame::Whole { .. }),
                "flip {i}"
            );
        }
    }
}
