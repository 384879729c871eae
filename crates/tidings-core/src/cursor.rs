//! Cursors: opaque, URL-safe tokens holding one position per channel of a subscription.
//!
//! Layout (then base64url without padding): version byte `1`, then per channel, sorted by
//! channel hash: the channel's 64-bit FNV-1a hash (8 bytes, big-endian), the epoch's length (1 byte)
//! and bytes, the offset as LEB128. Sorting makes the encoding canonical, so a one-channel
//! subscription's cursor is byte-for-byte the message's own cursor and can be shared.
//! Clients must not parse it; the format may change behind the version byte.
//!
//! A 64-bit FNV-1a hash can be collided on purpose (names are short and the hash is not
//! keyed), and two colliding names in one cursor would share one position: messages
//! skipped or false gaps. So a subscription never holds two names with the same hash
//! (`collision`, checked where channels are joined: the subscribe parameters, the `/ws`
//! subscribe op, and `Subscription::add` as the last guard). The format is unchanged, so
//! every cursor ever handed out still reads.
//!
//! Memory (issue 17): most cursors cover one channel, so a `Cursor` keeps one entry inline
//! and a list only for two or more; and a decoded cursor's epoch is the `Arc` of the last
//! epochs decoded on this thread (`EPOCHS`) when its text is one of them, so a poll that
//! resumes allocates neither its list nor its epoch.
//!
//! Concurrency: `EPOCHS` is one small cache per thread (`thread_local!`), touched only inside
//! `decode` with no lock and no await; bounded to `EPOCH_CACHE` epochs (a handful of bytes
//! each), replaced in turn. Sharing an `Epoch` is safe however it was made: epochs compare
//! by their text.

use std::cell::RefCell;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use thiserror::Error;

use crate::channel::ChannelName;
use crate::message::{Epoch, Position};

const VERSION: u8 = 1;
/// Longer input is refused before decoding: 64 channels need well under 4 KiB.
pub const MAX_CURSOR_LEN: usize = 8192;

/// A channel among `channels` that is a different name with `channel`'s cursor hash.
pub fn collision<'a>(
    channels: &'a [ChannelName],
    channel: &ChannelName,
) -> Option<&'a ChannelName> {
    channels
        .iter()
        .find(|c| c.hash64() == channel.hash64() && *c != channel)
}

/// The message for a collision: which names, and what to do.
pub fn collision_message(a: &ChannelName, b: &ChannelName) -> String {
    format!(
        "channels {a} and {b} cannot be followed in one subscription (their cursor entries would collide); subscribe to them separately"
    )
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("malformed cursor: {0}; pass back a cursor exactly as the server sent it")]
pub struct CursorError(&'static str);

/// Epochs kept per thread for `decode`: a node draws few (one for every channel created
/// since it started or its last reclaim), and a broker's cursors carry those.
const EPOCH_CACHE: usize = 4;

thread_local! {
    /// The last epochs decoded on this thread, and where the next one goes.
    static EPOCHS: RefCell<([Option<Epoch>; EPOCH_CACHE], usize)> =
        const { RefCell::new(([const { None }; EPOCH_CACHE], 0)) };
}

/// The epoch `bytes` spell: one decoded before on this thread, shared, or a new one (which
/// is then kept in place of the oldest). `None` when it is not a valid epoch.
fn shared_epoch(bytes: &[u8]) -> Option<Epoch> {
    EPOCHS.with(|cache| {
        let mut cache = cache.borrow_mut();
        let (epochs, next) = &mut *cache;
        if let Some(epoch) = epochs
            .iter()
            .flatten()
            .find(|e| e.as_str().as_bytes() == bytes)
        {
            return Some(epoch.clone());
        }
        let epoch = std::str::from_utf8(bytes).ok().and_then(Epoch::new)?;
        epochs[*next] = Some(epoch.clone());
        *next = (*next + 1) % EPOCH_CACHE;
        Some(epoch)
    })
}

#[derive(Clone, Debug, Default)]
pub struct Cursor {
    entries: Entries,
}

/// A cursor's entries, sorted by hash: the common one-channel cursor inline (no list to
/// allocate when a poll's cursor is decoded or a one-channel subscription starts).
#[derive(Clone, Debug)]
enum Entries {
    One(Entry),
    /// No entry, or two and more (one, after a `remove`).
    Many(Vec<Entry>),
}

/// One channel's position, under its name's hash. A struct, not a tuple: laid out with the
/// epoch's pointer first, so `Entries` keeps its tag in that pointer's niche (32 bytes, not 40).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    hash: u64,
    position: Position,
}

impl Default for Entries {
    fn default() -> Self {
        Entries::Many(Vec::new())
    }
}

impl Entries {
    fn as_slice(&self) -> &[Entry] {
        match self {
            Entries::One(entry) => std::slice::from_ref(entry),
            Entries::Many(entries) => entries,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [Entry] {
        match self {
            Entries::One(entry) => std::slice::from_mut(entry),
            Entries::Many(entries) => entries,
        }
    }
}

/// Equal when they hold the same entries, however they are kept.
impl PartialEq for Cursor {
    fn eq(&self, other: &Self) -> bool {
        self.entries.as_slice() == other.entries.as_slice()
    }
}

impl Eq for Cursor {}

/// A cursor's text from its entries. Written at its exact length, on the stack for the
/// common one-channel cursor: the base64 text is then the only allocation (this runs for
/// every publish reply and every poll answer).
fn encode_entries(entries: &[Entry]) -> String {
    let len = raw_len(entries);
    let mut stack = [0u8; 64];
    let mut heap = Vec::new();
    let raw: &mut [u8] = if len <= stack.len() {
        &mut stack[..len]
    } else {
        heap.resize(len, 0);
        &mut heap
    };
    let at = write_raw(entries, raw);
    URL_SAFE_NO_PAD.encode(&raw[..at])
}

/// The binary cursor's length for `entries`.
fn raw_len(entries: &[Entry]) -> usize {
    1 + entries
        .iter()
        .map(|e| 8 + 1 + e.position.epoch.as_str().len() + varint_len(e.position.offset))
        .sum::<usize>()
}

/// A one-channel binary cursor's longest: version, hash, epoch length, a 32-byte epoch and
/// a 10-byte varint.
const SINGLE_RAW_MAX: usize = 1 + 8 + 1 + crate::message::MAX_EPOCH_LEN + 10;
/// Its text's longest (base64url without padding).
pub const SINGLE_MAX: usize = SINGLE_RAW_MAX.div_ceil(3) * 4;

/// Writes the binary cursor of `entries` into `raw` (at least `raw_len` long); returns
/// its length.
fn write_raw(entries: &[Entry], raw: &mut [u8]) -> usize {
    raw[0] = VERSION;
    let mut at = 1;
    for Entry {
        hash,
        position: pos,
    } in entries
    {
        raw[at..at + 8].copy_from_slice(&hash.to_be_bytes());
        at += 8;
        let epoch = pos.epoch.as_str().as_bytes();
        // Epochs are at most 32 bytes by construction (Epoch::new).
        raw[at] = epoch.len() as u8;
        at += 1;
        raw[at..at + epoch.len()].copy_from_slice(epoch);
        at += epoch.len();
        let mut v = pos.offset;
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                raw[at] = byte;
                at += 1;
                break;
            }
            raw[at] = byte | 0x80;
            at += 1;
        }
    }
    at
}

/// The value of one base64url character (RFC 4648 §5), or `None` for any other byte.
fn sextet(b: u8) -> Option<u32> {
    let v = match b {
        b'A'..=b'Z' => b - b'A',
        b'a'..=b'z' => b - b'a' + 26,
        b'0'..=b'9' => b - b'0' + 52,
        b'-' => 62,
        b'_' => 63,
        _ => return None,
    };
    Some(u32::from(v))
}

/// base64url without padding, decoded exactly as `URL_SAFE_NO_PAD.decode` decodes it (no
/// `=`, no length of 4n+1, no set bits after the last byte; a test compares the two), into
/// `stack` when it fits and `heap` otherwise. The engine's `decode` allocated its output and
/// cost about as much again as the rest of a cursor's decoding.
fn decode_base64url<'a>(
    text: &[u8],
    stack: &'a mut [u8; 64],
    heap: &'a mut Vec<u8>,
) -> Option<&'a [u8]> {
    let len = match text.len() % 4 {
        0 => text.len() / 4 * 3,
        1 => return None,
        r => text.len() / 4 * 3 + r - 1,
    };
    let out: &mut [u8] = if len <= stack.len() {
        &mut stack[..len]
    } else {
        heap.resize(len, 0);
        heap
    };
    let mut chunks = text.chunks_exact(4);
    let mut at = 0;
    for c in &mut chunks {
        let n = sextet(c[0])? << 18 | sextet(c[1])? << 12 | sextet(c[2])? << 6 | sextet(c[3])?;
        out[at..at + 3].copy_from_slice(&n.to_be_bytes()[1..]);
        at += 3;
    }
    match *chunks.remainder() {
        [] => {}
        [a, b] => {
            let n = sextet(a)? << 18 | sextet(b)? << 12;
            if n & 0xffff != 0 {
                return None;
            }
            out[at] = n.to_be_bytes()[1];
        }
        [a, b, c] => {
            let n = sextet(a)? << 18 | sextet(b)? << 12 | sextet(c)? << 6;
            if n & 0xff != 0 {
                return None;
            }
            out[at..at + 2].copy_from_slice(&n.to_be_bytes()[1..3]);
        }
        _ => return None,
    }
    Some(out)
}

/// Bytes `offset` takes as a LEB128 varint (as `Cursor::encode` writes it).
fn varint_len(offset: u64) -> usize {
    (u64::BITS - offset.leading_zeros()).max(1).div_ceil(7) as usize
}

impl Cursor {
    pub fn single(channel: &ChannelName, position: Position) -> Self {
        Self {
            entries: Entries::One(Entry {
                hash: channel.hash64(),
                position,
            }),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.as_slice().is_empty()
    }

    /// The position this cursor holds for `channel`, if it covers it.
    pub fn get(&self, channel: &ChannelName) -> Option<&Position> {
        let entries = self.entries.as_slice();
        entries
            .binary_search_by_key(&channel.hash64(), |e| e.hash)
            .ok()
            .map(|i| &entries[i].position)
    }

    pub fn set(&mut self, channel: &ChannelName, position: Position) {
        let h = channel.hash64();
        let entries = self.entries.as_mut_slice();
        let at = match entries.binary_search_by_key(&h, |e| e.hash) {
            Ok(i) => {
                entries[i].position = position;
                return;
            }
            Err(i) => i,
        };
        match &mut self.entries {
            Entries::Many(entries) if entries.is_empty() => {
                self.entries = Entries::One(Entry { hash: h, position });
            }
            Entries::Many(entries) => entries.insert(at, Entry { hash: h, position }),
            Entries::One(_) => {
                let Entries::One(first) = std::mem::take(&mut self.entries) else {
                    return;
                };
                // A second channel: room for the two, not the four a first push makes.
                let mut entries = Vec::with_capacity(2);
                entries.push(first);
                entries.insert(at, Entry { hash: h, position });
                self.entries = Entries::Many(entries);
            }
        }
    }

    /// Forgets a channel (after an unsubscribe).
    pub fn remove(&mut self, channel: &ChannelName) {
        let h = channel.hash64();
        match &mut self.entries {
            Entries::One(e) if e.hash == h => self.entries = Entries::default(),
            Entries::One(_) => {}
            Entries::Many(entries) => {
                if let Ok(i) = entries.binary_search_by_key(&h, |e| e.hash) {
                    entries.remove(i);
                }
            }
        }
    }

    /// Sets only the offset when the epoch is unchanged (the hot path: no epoch clone).
    pub fn advance(&mut self, channel: &ChannelName, position: &Position) {
        let h = channel.hash64();
        let entries = self.entries.as_mut_slice();
        match entries.binary_search_by_key(&h, |e| e.hash) {
            Ok(i) if entries[i].position.epoch == position.epoch => {
                entries[i].position.offset = position.offset;
            }
            _ => self.set(channel, position.clone()),
        }
    }

    pub fn encode(&self) -> String {
        encode_entries(self.entries.as_slice())
    }

    /// `Cursor::single(channel, position).encode()` without the cursor's list.
    pub fn encode_single(channel: &ChannelName, position: &Position) -> String {
        encode_entries(&[Entry {
            hash: channel.hash64(),
            position: position.clone(),
        }])
    }

    /// `encode_single`'s text written into `out` (no allocation: a one-channel cursor is at
    /// most `SINGLE_MAX` bytes, whatever the channel's name); returns its length.
    pub fn encode_single_into(
        channel: &ChannelName,
        position: &Position,
        out: &mut [u8; SINGLE_MAX],
    ) -> usize {
        let mut raw = [0u8; SINGLE_RAW_MAX];
        let at = write_raw(
            &[Entry {
                hash: channel.hash64(),
                position: position.clone(),
            }],
            &mut raw,
        );
        // `SINGLE_MAX` is the base64 length of `SINGLE_RAW_MAX` bytes: it always fits.
        URL_SAFE_NO_PAD.encode_slice(&raw[..at], out).unwrap_or(0)
    }

    pub fn decode(text: &str) -> Result<Self, CursorError> {
        if text.is_empty() {
            return Err(CursorError("empty"));
        }
        if text.len() > MAX_CURSOR_LEN {
            return Err(CursorError("too long"));
        }
        // Decoded on the stack for the common one-channel cursor: this runs for every poll
        // that resumes (issue 17: the decoded bytes were an allocation per poll).
        let mut stack = [0u8; 64];
        let mut heap = Vec::new();
        let raw = decode_base64url(text.trim_matches('"').as_bytes(), &mut stack, &mut heap)
            .ok_or(CursorError("not base64url"))?;
        let (&version, mut rest) = raw.split_first().ok_or(CursorError("empty"))?;
        if version != VERSION {
            return Err(CursorError("unknown version"));
        }
        let mut entries: Vec<Entry> = Vec::new();
        while !rest.is_empty() {
            let (hash, r) = rest.split_at_checked(8).ok_or(CursorError("truncated"))?;
            let mut be = [0u8; 8];
            be.copy_from_slice(hash);
            let hash = u64::from_be_bytes(be);
            let (&elen, r) = r.split_first().ok_or(CursorError("truncated"))?;
            let (epoch, r) = r
                .split_at_checked(usize::from(elen))
                .ok_or(CursorError("truncated"))?;
            let epoch = shared_epoch(epoch).ok_or(CursorError("bad epoch"))?;
            let mut offset: u64 = 0;
            let mut shift = 0u32;
            let mut r = r;
            loop {
                let (&b, r2) = r.split_first().ok_or(CursorError("truncated"))?;
                r = r2;
                if shift == 63 && b > 1 {
                    return Err(CursorError("offset overflows"));
                }
                offset |= u64::from(b & 0x7f) << shift;
                if b & 0x80 == 0 {
                    break;
                }
                shift += 7;
                if shift > 63 {
                    return Err(CursorError("offset overflows"));
                }
            }
            if let Some(last) = entries.last()
                && last.hash >= hash
            {
                return Err(CursorError("entries out of order"));
            }
            rest = r;
            if entries.is_empty() && rest.is_empty() {
                // A one-channel cursor: kept inline, no list.
                return Ok(Self {
                    entries: Entries::One(Entry {
                        hash,
                        position: Position { epoch, offset },
                    }),
                });
            }
            entries.push(Entry {
                hash,
                position: Position { epoch, offset },
            });
        }
        if entries.is_empty() {
            return Err(CursorError("covers no channel"));
        }
        Ok(Self {
            entries: Entries::Many(entries),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(e: &str, o: u64) -> Position {
        Position {
            epoch: Epoch::new(e).unwrap(),
            offset: o,
        }
    }

    #[test]
    fn a_cursor_round_trips_through_its_text() {
        let a = ChannelName::new("a").unwrap();
        let b = ChannelName::new("chat:b").unwrap();
        let mut c = Cursor::default();
        c.set(&b, pos("e2", 0));
        c.set(&a, pos("e1", u64::MAX));
        let text = c.encode();
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        let back = Cursor::decode(&text).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.get(&a), Some(&pos("e1", u64::MAX)));
        assert_eq!(back.get(&ChannelName::new("zzz").unwrap()), None);
    }

    #[test]
    fn a_one_channel_cursor_written_in_place_is_the_encoded_one_at_every_length() {
        for epoch in ["e", "h3k9", &"e".repeat(crate::message::MAX_EPOCH_LEN)] {
            for offset in [0, 1, 127, 128, 16_384, u64::MAX / 3, u64::MAX] {
                let channel =
                    ChannelName::new("a-rather-long:channel.name_that-does-not-matter").unwrap();
                let p = pos(epoch, offset);
                let mut out = [0u8; SINGLE_MAX];
                let len = Cursor::encode_single_into(&channel, &p, &mut out);
                let text = Cursor::encode_single(&channel, &p);
                assert_eq!(&out[..len], text.as_bytes(), "{epoch} {offset}");
                assert_eq!(
                    Cursor::decode(&text).unwrap(),
                    Cursor::single(&channel, p.clone())
                );
            }
        }
    }

    #[test]
    fn cursors_longer_than_the_stack_buffer_round_trip_too() {
        let long_epoch = "e".repeat(32);
        let mut c = Cursor::default();
        for (i, offset) in [0, 1, 127, 128, 16_383, 16_384, u64::MAX / 3, u64::MAX]
            .into_iter()
            .enumerate()
        {
            let channel = ChannelName::new(&format!("c{i}")).unwrap();
            c.set(&channel, pos(&long_epoch, offset));
            let back = Cursor::decode(&c.encode()).unwrap();
            assert_eq!(back, c, "{} entries", i + 1);
        }
    }

    #[test]
    fn a_cursor_keeps_one_channel_inline_and_moves_between_one_and_many() {
        let (a, b, c) = (
            ChannelName::new("a").unwrap(),
            ChannelName::new("b").unwrap(),
            ChannelName::new("c").unwrap(),
        );
        let mut x = Cursor::default();
        x.set(&a, pos("e", 1));
        assert!(matches!(x.entries, Entries::One(_)));
        x.advance(&a, &pos("e", 2));
        x.set(&b, pos("f", 3));
        x.set(&c, pos("e", 4));
        assert!(matches!(&x.entries, Entries::Many(v) if v.len() == 3));
        for (name, at) in [(&a, pos("e", 2)), (&b, pos("f", 3)), (&c, pos("e", 4))] {
            assert_eq!(x.get(name), Some(&at));
        }
        x.remove(&b);
        x.remove(&c);
        // One entry kept in a list is the same cursor as one kept inline.
        assert_eq!(x, Cursor::single(&a, pos("e", 2)));
        assert_eq!(x.encode(), Cursor::single(&a, pos("e", 2)).encode());
        x.remove(&a);
        assert!(x.is_empty());
        assert_eq!(x, Cursor::default());
        x.set(&b, pos("e", 5));
        assert!(matches!(x.entries, Entries::One(_)));
        assert_eq!(Cursor::decode(&x.encode()).unwrap(), x);
        // No larger than the list it replaces was with its one heap entry.
        assert!(size_of::<Cursor>() <= 32, "{}", size_of::<Cursor>());
    }

    #[test]
    fn decoded_cursors_share_the_epochs_decoded_before_them() {
        let a = ChannelName::new("a").unwrap();
        let text = Cursor::single(&a, pos("shared9", 7)).encode();
        let first = Cursor::decode(&text).unwrap();
        let again = Cursor::decode(&text).unwrap();
        let (one, two) = (first.get(&a).unwrap(), again.get(&a).unwrap());
        assert_eq!(one, two);
        assert_eq!(one.epoch.as_str().as_ptr(), two.epoch.as_str().as_ptr());
        // More epochs than the cache holds: each still decodes to its own text.
        for i in 0..3 * EPOCH_CACHE {
            let epoch = format!("ep{i}");
            let back = Cursor::decode(&Cursor::single(&a, pos(&epoch, 1)).encode()).unwrap();
            assert_eq!(back.get(&a).unwrap().epoch.as_str(), epoch);
        }
        // An invalid epoch is never cached, whatever came before.
        let mut raw = vec![1, 0, 0, 0, 0, 0, 0, 0, 1, 1, b'!', 0];
        assert!(Cursor::decode(&URL_SAFE_NO_PAD.encode(&raw)).is_err());
        raw[10] = b'z';
        assert!(Cursor::decode(&URL_SAFE_NO_PAD.encode(&raw)).is_ok());
    }

    #[test]
    fn encoding_is_canonical_whatever_the_insertion_order() {
        let a = ChannelName::new("a").unwrap();
        let b = ChannelName::new("b").unwrap();
        let mut x = Cursor::default();
        x.set(&a, pos("e", 1));
        x.set(&b, pos("e", 2));
        let mut y = Cursor::default();
        y.set(&b, pos("e", 2));
        y.set(&a, pos("e", 1));
        assert_eq!(x.encode(), y.encode());
    }

    #[test]
    fn base64url_is_decoded_exactly_as_the_base64_engine_decodes_it() {
        // Every string of up to 5 characters over letters chosen for their low bits (the
        // trailing-bit rule), both URL-safe extras, padding, the standard alphabet's extras,
        // a quote and a space; then long ones (the heap path) with a bad byte at each place.
        let alphabet = b"ABQgw-_9=+/\" ";
        let mut text = Vec::new();
        let mut check = |text: &[u8]| {
            let (mut stack, mut heap) = ([0u8; 64], Vec::new());
            let ours = decode_base64url(text, &mut stack, &mut heap).map(<[u8]>::to_vec);
            assert_eq!(ours, URL_SAFE_NO_PAD.decode(text).ok(), "{text:?}");
        };
        fn all(len: usize, alphabet: &[u8], text: &mut Vec<u8>, check: &mut impl FnMut(&[u8])) {
            check(text);
            if len == 0 {
                return;
            }
            for &b in alphabet {
                text.push(b);
                all(len - 1, alphabet, text, check);
                text.pop();
            }
        }
        all(5, alphabet, &mut text, &mut check);
        for len in [84, 85, 86, 87, 88, 200, 301] {
            let valid: Vec<u8> = (0..len).map(|i| alphabet[i % 7]).collect();
            check(&valid);
            for at in [0, len / 2, len - 1] {
                for bad in [b'=', b'+', b'"', 0xff] {
                    let mut text = valid.clone();
                    text[at] = bad;
                    check(&text);
                }
            }
        }
    }

    #[test]
    fn garbage_is_refused_with_a_reason_and_never_panics() {
        for bad in [
            "",
            "!!",
            "AA",
            "AQ",
            "AgAAAAA",
            &"A".repeat(9000),
            "AQAAAAAB",
            "\"\"",
        ] {
            assert!(Cursor::decode(bad).is_err(), "{bad:?} decoded");
        }
        // Every truncation of a valid cursor fails cleanly.
        let mut c = Cursor::default();
        c.set(&ChannelName::new("a").unwrap(), pos("epoch", 300));
        let raw = URL_SAFE_NO_PAD.decode(c.encode()).unwrap();
        for n in 1..raw.len() {
            let _ = Cursor::decode(&URL_SAFE_NO_PAD.encode(&raw[..n]));
        }
        // An overlong varint is refused.
        let mut raw = vec![1, 0, 0, 0, 0, 0, 0, 0, 1, 1, b'e'];
        raw.extend([0xff; 11]);
        assert!(Cursor::decode(&URL_SAFE_NO_PAD.encode(&raw)).is_err());
    }
}
