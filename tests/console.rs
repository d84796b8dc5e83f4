//! A chatty guest cannot grow the host's memory through its console: the
//! line ring is capped. Alone in its test binary, so the heap it measures is
//! this VM's (a counting allocator sees every live byte of the process).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use e2e::{boot, DEADLINE};
use vmm::MemoryBackend;

/// Live heap bytes of the whole process.
static LIVE: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: every call forwards to the system allocator unchanged; the
// counter is only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Lines the guest prints between the two heap readings.
const LINES: usize = 6000;

#[test]
fn a_counting_guest_keeps_console_memory_flat() {
    let t = boot("action=count", 1, MemoryBackend::Anonymous);
    // Past the ring's size first, so the ring is full at both readings.
    let warm = vmm::console::DEFAULT_MAX_LINES + 100;
    t.expect_line_from("count", warm);
    let heap_before = LIVE.load(Ordering::Relaxed);
    let (at, _) = t
        .console
        .wait_for("count", warm + LINES, DEADLINE)
        .expect("the guest kept counting");
    let heap_after = LIVE.load(Ordering::Relaxed);

    // 6000 more lines kept forever would be >= 6000 x (24-byte String + heap
    // text) = ~190 KiB; a ring that recycles its slots grows by nothing.
    let growth = heap_after.saturating_sub(heap_before);
    assert!(
        growth < 64 * 1024,
        "heap grew by {growth} bytes over {LINES} console lines"
    );

    // The ring holds its cap and says how many lines it let go.
    let kept = t.console.lines();
    assert_eq!(kept.len(), vmm::console::DEFAULT_MAX_LINES);
    assert_eq!(t.console.dropped(), t.console.len() - kept.len());
    assert!(t.console.len() > at);
    // Every line kept is short; the ring's text is bounded by cap x line.
    assert!(t.console.retained_bytes() <= vmm::console::DEFAULT_MAX_LINES * 64);
}
