//! The `tidings` binary's allocator: the system's (glibc's), except for small over-aligned blocks,
//! which come from slabs of our own.
//!
//! Why: tokio pads two allocations of every connection to a 128-byte cache line, the task's
//! cell (896 bytes) and the socket's readiness registration (256). glibc serves an
//! over-aligned request with `memalign`, which cuts an aligned block out of a larger free one
//! and frees what lies in front of it: an 80–112-byte leftover per block, in a fastbin that
//! only a request of that exact size reuses. At 5,000 idle connections that was ~190–230
//! bytes of RSS per connection (docs/benchmarks.md, idle memory, items 16–17). Here a block
//! of a size class is cut from a slab whose blocks are all that size, so every block lies on
//! its alignment with nothing in front of it.
//!
//! What takes the slab path: alignment above 16 (glibc's own) and at most 128, size at most
//! 1 KiB. Everything else (every allocation of ours, `Bytes`, buffers: alignment ≤ 16) goes
//! straight to the system allocator, so the per-message path pays one comparison.
//!
//! Bounded: a freed block goes onto its class's free list and is reused by the next request
//! of that class; slabs are never given back. A class holds at most its peak of live blocks,
//! rounded up to a whole slab (16 KiB).
//!
//! Concurrency: each size class is one `Mutex` over its free list and its slab's unused
//! tail; a request takes only its class's lock, for a few pointer moves, and never
//! allocates while holding it (a slab is asked from the system allocator, not from this
//! one). std's `Mutex` on Linux is a futex word: it does not allocate either. Nothing in
//! here panics while holding a lock.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::Mutex;

/// Requests aligned above this go to the slabs (glibc's `malloc` aligns to 16).
const SYSTEM_ALIGN: usize = 16;
/// The largest alignment the slabs serve: a slab is aligned to it.
const MAX_ALIGN: usize = 128;
/// The largest block the slabs serve.
const MAX_SIZE: usize = 1024;
/// Block sizes are multiples of this: 64, 128, ..., 1024.
const STEP: usize = 64;
const CLASSES: usize = MAX_SIZE / STEP;
/// What a class asks the system for when its free list and slab are empty.
const SLAB: usize = 16 * 1024;

/// The allocator: `#[global_allocator]` in tidings-cli's `main.rs`.
pub struct Slabs {
    classes: [Mutex<Class>; CLASSES],
}

/// One size class: freed blocks (a list threaded through the blocks themselves) and the
/// unused tail of its newest slab.
struct Class {
    free: *mut u8,
    next: *mut u8,
    end: *mut u8,
}

// The pointers are to memory only this allocator hands out, and only under the class's lock.
unsafe impl Send for Class {}

impl Slabs {
    pub const fn new() -> Self {
        Slabs {
            classes: [const {
                Mutex::new(Class {
                    free: ptr::null_mut(),
                    next: ptr::null_mut(),
                    end: ptr::null_mut(),
                })
            }; CLASSES],
        }
    }
}

impl Default for Slabs {
    fn default() -> Self {
        Self::new()
    }
}

/// The class index and block size of a request the slabs serve, `None` for the system's.
/// A block of a multiple of 128 bytes in a 128-aligned slab is 128-aligned, of a multiple of
/// 64 is 64-aligned: rounding the size up to the alignment (at least `STEP`) is enough.
#[inline]
fn class_of(layout: Layout) -> Option<(usize, usize)> {
    let align = layout.align();
    if align <= SYSTEM_ALIGN || align > MAX_ALIGN || layout.size() > MAX_SIZE {
        return None;
    }
    let unit = align.max(STEP);
    let block = layout.size().max(1).div_ceil(unit) * unit;
    Some((block / STEP - 1, block))
}

impl Slabs {
    fn take(&self, class: usize, block: usize) -> *mut u8 {
        let mut c = self.classes[class]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !c.free.is_null() {
            let p = c.free;
            // SAFETY: a block on the free list is at least 64 bytes, 64-aligned, ours, and
            // holds the next free block's address in its first word (`give`).
            c.free = unsafe { p.cast::<*mut u8>().read() };
            return p;
        }
        if (c.end as usize) - (c.next as usize) < block {
            // SAFETY: a non-zero size; the slab is never freed (bounded: see the module doc).
            let raw = unsafe {
                System.alloc(Layout::from_size_align_unchecked(
                    SLAB + MAX_ALIGN,
                    SYSTEM_ALIGN,
                ))
            };
            if raw.is_null() {
                return raw;
            }
            let start = raw.wrapping_add(raw.align_offset(MAX_ALIGN));
            c.next = start;
            c.end = start.wrapping_add(SLAB / block * block);
        }
        let p = c.next;
        c.next = p.wrapping_add(block);
        p
    }

    fn give(&self, class: usize, p: *mut u8) {
        let mut c = self.classes[class]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // SAFETY: `p` is a block of this class that its owner gave back: ours to reuse.
        unsafe { p.cast::<*mut u8>().write(c.free) };
        c.free = p;
    }
}

unsafe impl GlobalAlloc for Slabs {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            Some((class, block)) => self.take(class, block),
            // SAFETY: the caller's contract, passed on.
            None => unsafe { System.alloc(layout) },
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            Some((class, block)) => {
                let p = self.take(class, block);
                if !p.is_null() {
                    // SAFETY: `p` is a block of at least `layout.size()` bytes.
                    unsafe { p.write_bytes(0, layout.size()) };
                }
                p
            }
            // SAFETY: the caller's contract, passed on.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    #[inline]
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        match class_of(layout) {
            Some((class, _)) => self.give(class, p),
            // SAFETY: `p` came from `System` with this layout (`alloc` decided the same way).
            None => unsafe { System.dealloc(p, layout) },
        }
    }

    #[inline]
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size`, rounded up to the alignment, fits `isize`.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if class_of(layout).is_none() && class_of(new).is_none() {
            // SAFETY: the caller's contract, passed on; both layouts are the system's.
            return unsafe { System.realloc(p, layout, new_size) };
        }
        // SAFETY: the caller's contract: `p` is live with `layout`, `new` is valid.
        unsafe {
            let q = self.alloc(new);
            if !q.is_null() {
                ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                self.dealloc(p, layout);
            }
            q
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn only_small_over_aligned_requests_take_the_slabs() {
        assert_eq!(class_of(layout(896, 128)), Some((13, 896)));
        assert_eq!(class_of(layout(256, 128)), Some((3, 256)));
        assert_eq!(class_of(layout(100, 32)), Some((1, 128)));
        assert_eq!(class_of(layout(0, 64)), Some((0, 64)));
        assert_eq!(class_of(layout(1, 128)), Some((1, 128)));
        assert_eq!(class_of(layout(896, 16)), None);
        assert_eq!(class_of(layout(24, 8)), None);
        assert_eq!(class_of(layout(1025, 128)), None);
        assert_eq!(class_of(layout(64, 256)), None);
    }

    #[test]
    fn every_block_lies_on_its_alignment_and_does_not_overlap_the_next() {
        let a = Slabs::new();
        for (size, align) in [
            (896, 128),
            (256, 128),
            (100, 32),
            (192, 64),
            (1024, 128),
            (8, 4096),
        ] {
            let l = layout(size, align);
            let mut blocks: Vec<*mut u8> = (0..100).map(|_| unsafe { a.alloc(l) }).collect();
            for &p in &blocks {
                assert!(!p.is_null());
                assert_eq!(p as usize % align, 0, "{size}/{align}");
                unsafe { p.write_bytes(0xAB, size) };
            }
            blocks.sort();
            for w in blocks.windows(2) {
                assert!(
                    w[1] as usize - w[0] as usize >= size,
                    "{size}/{align} overlap"
                );
            }
            for p in blocks {
                unsafe { a.dealloc(p, l) };
            }
        }
    }

    #[test]
    fn a_freed_block_is_reused_and_no_slab_is_taken_for_it() {
        let a = Slabs::new();
        let l = layout(896, 128);
        let live: Vec<*mut u8> = (0..50).map(|_| unsafe { a.alloc(l) }).collect();
        let freed: Vec<*mut u8> = live[10..30].to_vec();
        for &p in &freed {
            unsafe { a.dealloc(p, l) };
        }
        let end_before = a.classes[13]
            .lock()
            .map(|c| c.end)
            .unwrap_or_else(|e| e.into_inner().end);
        let again: Vec<*mut u8> = (0..20).map(|_| unsafe { a.alloc(l) }).collect();
        let mut f = freed.clone();
        let mut g = again.clone();
        f.sort();
        g.sort();
        assert_eq!(f, g, "the 20 freed blocks come back, no new ones");
        let end_after = a.classes[13]
            .lock()
            .map(|c| c.end)
            .unwrap_or_else(|e| e.into_inner().end);
        assert_eq!(end_before, end_after, "no slab taken");
        let zeroed = unsafe { a.alloc_zeroed(l) };
        assert!(
            unsafe { std::slice::from_raw_parts(zeroed, 896) }
                .iter()
                .all(|&b| b == 0)
        );
    }

    #[test]
    fn realloc_keeps_the_bytes_across_the_slab_and_system_paths() {
        let a = Slabs::new();
        let l = layout(200, 64);
        unsafe {
            let p = a.alloc(l);
            for i in 0..200 {
                p.add(i).write(i as u8);
            }
            let q = a.realloc(p, l, 2000);
            assert_eq!(q as usize % 64, 0);
            let r = a.realloc(q, layout(2000, 64), 100);
            assert_eq!(r as usize % 64, 0);
            for i in 0..100 {
                assert_eq!(r.add(i).read(), i as u8);
            }
            a.dealloc(r, layout(100, 64));
        }
    }

    #[test]
    fn many_threads_never_get_the_same_block_twice() {
        let a = std::sync::Arc::new(Slabs::new());
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let a = a.clone();
                std::thread::spawn(move || {
                    let l = layout(256, 128);
                    for _ in 0..200 {
                        let blocks: Vec<usize> =
                            (0..64).map(|_| unsafe { a.alloc(l) } as usize).collect();
                        for &p in &blocks {
                            unsafe { (p as *mut u8).write_bytes(t, 256) };
                        }
                        std::thread::yield_now();
                        for &p in &blocks {
                            let s = unsafe { std::slice::from_raw_parts(p as *const u8, 256) };
                            assert!(s.iter().all(|&b| b == t), "a block was handed out twice");
                            unsafe { a.dealloc(p as *mut u8, l) };
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().is_ok());
        }
    }
}
