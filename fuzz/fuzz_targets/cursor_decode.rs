//! `Cursor::decode` on arbitrary UTF-8. Never panics, and a cursor it accepts is a real one:
//! its encoding is URL-safe and canonical, and decoding it gives the same cursor back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidings_core::Cursor;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cursor) = Cursor::decode(text) else {
        return;
    };
    assert!(
        !cursor.is_empty(),
        "decoded a cursor that covers no channel"
    );
    let encoded = cursor.encode();
    assert!(
        encoded
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "encoding is not URL-safe: {encoded:?}"
    );
    let again = Cursor::decode(&encoded)
        .unwrap_or_else(|e| panic!("{text:?} decoded, but its encoding {encoded:?} does not: {e}"));
    assert_eq!(again, cursor, "{text:?} -> {encoded:?} does not round-trip");
    // Canonical: the encoding of the decoded encoding is the same text.
    assert_eq!(again.encode(), encoded);
});
