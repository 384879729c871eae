//! The WebSocket frame decoder (`wsframe::Decoder`, what every byte a WebSocket client sends
//! goes through) on arbitrary bytes, fed in arbitrary pieces. Never panics; every message it
//! returns is within the size limit and a text message is valid UTF-8; a failure carries a
//! close code a server may send (1002, 1007 or 1009); and how the bytes were split never
//! changes what comes out.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tidings_server::net::wsframe::{Decoder, Fail, Incoming};

const MAX: usize = 4096;

/// Decodes `data` delivered in pieces cut at `cuts`; what came out and how it ended.
fn decode(data: &[u8], cuts: &[usize]) -> (Vec<Incoming>, Option<Fail>) {
    let mut d = Decoder::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&data.len())) {
        let end = end.clamp(start, data.len());
        buf.extend_from_slice(&data[start..end]);
        start = end;
        loop {
            match d.next(&mut buf, MAX) {
                Ok(Some(incoming)) => out.push(incoming),
                Ok(None) => break,
                Err(fail) => return (out, Some(fail)),
            }
        }
    }
    (out, None)
}

fuzz_target!(|input: &[u8]| {
    // The first byte picks where the input is cut: a different split, the same stream.
    let Some((&seed, data)) = input.split_first() else {
        return;
    };
    let step = usize::from(seed).max(1);
    let cuts: Vec<usize> = (1..data.len() / step + 1).map(|i| i * step).collect();
    let (whole, whole_end) = decode(data, &[]);
    let (pieces, pieces_end) = decode(data, &cuts);
    assert_eq!(whole, pieces, "the split changed the messages");
    assert_eq!(whole_end, pieces_end, "the split changed the ending");
    for incoming in &whole {
        match incoming {
            Incoming::Text(t) => {
                assert!(t.len() <= MAX);
                assert!(
                    std::str::from_utf8(t).is_ok(),
                    "a text message that is not UTF-8"
                );
            }
            Incoming::Binary(b) => assert!(b.len() <= MAX),
            Incoming::Ping(p) => assert!(p.len() <= 125),
            Incoming::Close(Some((code, _))) => {
                assert!(tidings_server::net::wsframe::close_code_allowed(*code))
            }
            Incoming::Close(None) | Incoming::Pong => {}
        }
    }
    if let Some(fail) = whole_end {
        assert!(matches!(fail.code, 1002 | 1007 | 1009), "{fail:?}");
    }
});
