//! What a Redis server (or anything posing as one) sends back: RESP2/RESP3 replies decoded
//! by redis-rs' `ValueCodec` (what every connection of the broker reads through), then the
//! broker's own decoders of those values (`codec::decode_push` for pub/sub payloads,
//! `codec::entry_message` for history entries).
//!
//! Input: the first byte is a read size (0: all at once); the rest is what the socket
//! delivers. Checks:
//! - nothing panics;
//! - how the bytes are split never changes the values or whether it fails: a reply cut
//!   short asks for more (`Ok(None)`), it is not an error (for input that fails whole, only
//!   with `TIDINGS_FUZZ_STRICT=1`: docs/fuzzing.md, Finding 2);
//! - decoding never allocates in proportion to a declared length it has not received
//!   (`*2147483647\r\n`, `$999999999\r\n`): at most 64 bytes per input byte, plus 64 KiB,
//!   plus room for 4,096 values per aggregate header in the input (what combine reserves);
//! - a pub/sub payload the broker accepts is one the Lua scripts could have built, byte for
//!   byte.
#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use redis::{Value, ValueCodec};
use tidings_core::{ChannelName, Data, Epoch};
use tidings_redis::fuzzing::{Push, decode_push, entry_message};
use tokio_util::codec::Decoder;

/// Counts the bytes the Rust side holds, and their peak, to check the decoder's allocations
/// against the input's size. (libFuzzer's own `-malloc_limit_mb` needs a sanitizer build.)
struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// One request larger than this is refused (the process aborts with "memory allocation of
/// N bytes failed"): no input of ours justifies it.
const LARGEST: usize = 256 << 20;

// SAFETY: every call is forwarded to `System` unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > LARGEST {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract is `System`'s.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Relaxed) + layout.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > LARGEST {
            return std::ptr::null_mut();
        }
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            CURRENT.fetch_sub(layout.size(), Relaxed);
            let now = CURRENT.fetch_add(new_size, Relaxed) + new_size;
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn strict() -> bool {
    static STRICT: OnceLock<bool> = OnceLock::new();
    *STRICT.get_or_init(|| std::env::var_os("TIDINGS_FUZZ_STRICT").is_some_and(|v| v == "1"))
}

/// Aggregate headers (array, map, set, push, attribute) that may declare a positive count:
/// combine, which redis-rs parses with, reserves room for at most 4,096 elements of each as
/// soon as its first element arrives, whatever length it declares. redis-rs reads the count
/// with `trim().parse::<i64>()` (whitespace, even Unicode or a `\n`, and a `+` may surround it), so
/// any header line with a digit and no `-` counts.
fn aggregates(input: &[u8]) -> usize {
    (0..input.len())
        .filter(|&i| {
            // The line redis-rs reads: up to `\r\n` (a lone `\n` is inside it).
            let rest = &input[i + 1..];
            let line = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .map_or(rest, |end| &rest[..end]);
            matches!(input[i], b'*' | b'%' | b'~' | b'>' | b'|')
                && line.iter().any(u8::is_ascii_digit)
                && !line.contains(&b'-')
        })
        .count()
}

/// Values decoded in order, and whether decoding failed after them.
fn decode(input: &[u8], step: usize) -> (Vec<Value>, bool) {
    let mut codec = ValueCodec::default();
    let mut buf = BytesMut::new();
    let mut values = Vec::new();
    let mut fed = 0;
    while fed < input.len() {
        let end = if step == 0 {
            input.len()
        } else {
            (fed + step).min(input.len())
        };
        buf.extend_from_slice(&input[fed..end]);
        fed = end;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(v)) => values.push(v),
                Ok(None) => break,
                Err(_) => return (values, true),
            }
        }
    }
    (values, false)
}

fn channel() -> &'static ChannelName {
    static C: OnceLock<ChannelName> = OnceLock::new();
    C.get_or_init(|| ChannelName::new("fuzz").expect("valid"))
}

/// The payload the publish script builds for a message (see `codec`'s module comment).
fn payload_of(m: &tidings_core::Message) -> Vec<u8> {
    let kind = match m.data {
        Data::Json(_) => "j",
        Data::Text(_) => "t",
        Data::Binary(_) => "b",
    };
    let event = m.event.as_ref().map_or("", |e| e.as_str());
    let mut p = format!(
        "m{}\n{}\n{}\n{kind}\n{event}\n",
        m.epoch.as_str(),
        m.offset,
        m.time
    )
    .into_bytes();
    p.extend_from_slice(m.data.raw());
    p
}

fn through_the_broker(v: Value) {
    match v {
        Value::BulkString(b) => {
            let payload = Bytes::from(b);
            let mut cache = None;
            if let Ok(Push::Message(m)) = decode_push(channel(), payload.clone(), &mut cache) {
                assert_eq!(
                    payload_of(&m),
                    &payload[..],
                    "an accepted payload round-trips"
                );
            }
        }
        Value::Push { data, .. } => data.into_iter().for_each(through_the_broker),
        entry @ Value::Array(_) => {
            let epoch = Epoch::new("e").expect("valid");
            if let Value::Array(items) = &entry {
                items.iter().cloned().for_each(through_the_broker);
            }
            let _ = entry_message(channel(), &epoch, entry);
        }
        _ => {}
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&step, rest)) = input.split_first() else {
        return;
    };
    let base = CURRENT.load(Relaxed);
    PEAK.store(base, Relaxed);
    let whole = decode(rest, 0);
    let peak = PEAK.load(Relaxed) - base;
    // What it was given, a little per element, and at most 4,096 elements' room per
    // aggregate it declares: never the declared length itself.
    let per_aggregate = 4096 * std::mem::size_of::<Value>();
    let bound = 64 * rest.len() + (64 << 10) + per_aggregate * aggregates(rest);
    assert!(
        peak <= bound,
        "decoding {} bytes peaked at {peak} bytes (bound {bound})",
        rest.len()
    );
    let pieces = decode(rest, usize::from(step % 17));
    // Outside strict mode, input that fails whole is not compared: fed one byte at a time,
    // redis-rs skips an invalid type byte instead of failing (Finding 2).
    if strict() || !whole.1 {
        assert_eq!(
            whole,
            pieces,
            "the split changed the outcome (step {})",
            step % 17
        );
    }
    whole.0.into_iter().for_each(through_the_broker);
});
