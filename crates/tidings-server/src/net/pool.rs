//! Buffers the lean HTTP/1.1 path lends to a connection while it is being answered: the read
//! buffer a request head (and a small body) lands in, and the buffer its answer's head is
//! written into. Issue 17: allocating both per request was two of a publish's allocations.
//!
//! A connection takes a buffer when bytes arrive (or an answer is written) and gives it back
//! as soon as it is empty again: a parked connection (a waiting long poll, a stream, a
//! keep-alive connection between requests) holds none, as before, and a busy one reuses the
//! same few buffers request after request.
//!
//! Concurrency: one pool per thread (`thread_local!`), touched only by the task running on
//! that thread, with no lock. A task that moves to another worker takes its buffer along and
//! gives it back to that thread's pool. Bounded: at most `KEEP` buffers of each kind per
//! thread, none larger than `LARGEST` (a 64 KiB head or body is freed, not kept).

use std::cell::RefCell;

use bytes::BytesMut;

/// A read buffer's size when it is taken: a whole head of most requests, with a small body.
pub const READ_SIZE: usize = 8 * 1024;
/// Buffers kept per thread, of each kind.
const KEEP: usize = 32;
/// A larger buffer is freed when given back.
const LARGEST: usize = 16 * 1024;

thread_local! {
    static READ: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    static WRITE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty read buffer with room for at least `READ_SIZE` bytes.
pub fn read_buffer() -> BytesMut {
    READ.with(|pool| pool.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(READ_SIZE))
}

/// Gives `buf` back if it is empty (a pipelined request's bytes stay with their connection),
/// leaving an empty buffer with no allocation in its place.
pub fn give_read(buf: &mut BytesMut) {
    if !buf.is_empty() || buf.capacity() == 0 {
        return;
    }
    let mut buf = std::mem::take(buf);
    buf.clear();
    // A buffer the request was advanced through starts where the last one ended: taking the
    // room back moves nothing (it is empty) and allocates nothing while it fits.
    buf.reserve(READ_SIZE);
    if buf.capacity() > LARGEST {
        return;
    }
    READ.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < KEEP {
            pool.push(buf);
        }
    });
}

/// An empty buffer for an answer's head (and a small body), with room for `room` bytes.
pub fn write_buffer(room: usize) -> Vec<u8> {
    let mut out = WRITE
        .with(|pool| pool.borrow_mut().pop())
        .unwrap_or_default();
    out.reserve(room);
    out
}

/// Gives an answer's buffer back once it is written; `out` is left empty, with no allocation.
pub fn give_write(out: &mut Vec<u8>) {
    let mut out = std::mem::take(out);
    if out.capacity() == 0 || out.capacity() > LARGEST {
        return;
    }
    out.clear();
    WRITE.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < KEEP {
            pool.push(out);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_is_the_one_taken_next_with_its_whole_room() {
        let mut buf = read_buffer();
        buf.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let at = buf.as_ptr();
        bytes::Buf::advance(&mut buf, 18);
        give_read(&mut buf);
        assert_eq!(buf.capacity(), 0, "nothing is left with the connection");
        let again = read_buffer();
        assert_eq!(again.as_ptr(), at);
        assert!(again.is_empty() && again.capacity() >= READ_SIZE);
    }

    #[test]
    fn a_buffer_with_bytes_in_it_stays_with_its_connection() {
        let mut buf = read_buffer();
        buf.extend_from_slice(b"GET /next");
        give_read(&mut buf);
        assert_eq!(&buf[..], b"GET /next");
    }

    #[test]
    fn large_buffers_are_freed_and_the_pool_is_bounded() {
        let mut big = Vec::with_capacity(LARGEST + 1);
        give_write(&mut big);
        assert!(
            write_buffer(0).capacity() == 0,
            "a large buffer is not kept"
        );
        let mut many: Vec<Vec<u8>> = (0..KEEP + 8).map(|_| write_buffer(64)).collect();
        for out in &mut many {
            give_write(out);
        }
        assert_eq!(WRITE.with(|pool| pool.borrow().len()), KEEP);
    }
}
