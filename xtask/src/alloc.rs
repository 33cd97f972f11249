//! The benches' global allocator: mimalloc — the allocator `normandy-node` uses, so a bench runs
//! on the same allocator as the nodes it is compared with — counting the bytes currently
//! allocated while counting is on, so the engine bench can report bytes held per live session.
//!
//! Counting is off unless a bench turns it on: one shared counter bumped by every allocation of
//! every thread is a contended cache line, which would tax the multi-threaded paths a bench
//! compares (the cluster bench's remote sends) more than the single-threaded ones.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};

use mimalloc::MiMalloc;

/// mimalloc, counting the bytes currently allocated while [`set_counting`] is on.
pub(crate) struct Counting;

static ALLOCATED: AtomicIsize = AtomicIsize::new(0);
static COUNTING: AtomicBool = AtomicBool::new(false);

fn count(delta: isize) {
    if COUNTING.load(Ordering::Relaxed) {
        ALLOCATED.fetch_add(delta, Ordering::Relaxed);
    }
}

// SAFETY: every call forwards to mimalloc unchanged; the counter is only bookkeeping.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { MiMalloc.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { MiMalloc.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { MiMalloc.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

/// Turns counting on or off. Measure a window only with counting on for all of it: the count is
/// the net of what was allocated and freed while it was on.
pub(crate) fn set_counting(on: bool) {
    COUNTING.store(on, Ordering::Relaxed);
}

/// Net bytes allocated through the global allocator while counting was on.
pub(crate) fn allocated() -> isize {
    ALLOCATED.load(Ordering::Relaxed)
}
