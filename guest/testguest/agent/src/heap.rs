//! The agent's global allocator: power-of-two size classes (16 B to 1 MiB)
//! over a fixed arena in .bss. A freed block goes back to its class's free
//! list, so a steady workload (the request loop) reuses memory; blocks never
//! move between classes. Alignment up to 4 KiB is supported. One spin lock
//! guards it (the agent is single-threaded; the lock keeps it sound anyway).

#![cfg_attr(test, allow(dead_code))]

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr;
use core::sync::atomic::{AtomicBool, Ordering};

/// Size of the arena.
pub const HEAP_SIZE: usize = 8 << 20;
const MIN_SHIFT: u32 = 4;
const MAX_SHIFT: u32 = 20;
const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;
/// Largest alignment handed out.
const MAX_ALIGN: usize = 4096;

#[repr(C, align(4096))]
struct Arena([u8; HEAP_SIZE]);

struct State {
    /// Offset of the first never-used byte of the arena.
    next: usize,
    /// Head of each class's free list (0 = empty); a free block's first word
    /// holds the address of the next one.
    free: [usize; CLASSES],
}

/// A size-class allocator over a static arena.
pub struct Heap {
    lock: AtomicBool,
    state: UnsafeCell<State>,
    arena: UnsafeCell<Arena>,
}

// SAFETY: all access to `state` and `arena` happens under `lock`.
unsafe impl Sync for Heap {}

impl Heap {
    /// An empty heap (its arena lives in .bss).
    pub const fn new() -> Self {
        Heap {
            lock: AtomicBool::new(false),
            state: UnsafeCell::new(State {
                next: 0,
                free: [0; CLASSES],
            }),
            arena: UnsafeCell::new(Arena([0; HEAP_SIZE])),
        }
    }

    fn with_state<R>(&self, f: impl FnOnce(&mut State, usize) -> R) -> R {
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        // SAFETY: the lock gives exclusive access to the state.
        let r = f(unsafe { &mut *self.state.get() }, self.arena.get() as usize);
        self.lock.store(false, Ordering::Release);
        r
    }
}

impl Heap {
    /// A block of class `class` (`size` bytes): from its free list, else
    /// from the never-used part of the arena (then `fresh`: still zero).
    /// Null when the arena is exhausted.
    fn take(&self, class: usize, size: usize) -> (*mut u8, bool) {
        self.with_state(|st, base| {
            let head = st.free[class];
            if head != 0 {
                // SAFETY: free blocks are ours and start with the next pointer.
                st.free[class] = unsafe { *(head as *const usize) };
                return (head as *mut u8, false);
            }
            // Blocks are aligned to their size up to a page, so any alignment
            // up to MAX_ALIGN that fits the size class is met.
            let align = size.min(MAX_ALIGN);
            let start = (st.next + align - 1) & !(align - 1);
            match start.checked_add(size) {
                Some(end) if end <= HEAP_SIZE => {
                    st.next = end;
                    ((base + start) as *mut u8, true)
                }
                _ => (ptr::null_mut(), false),
            }
        })
    }
}

impl Default for Heap {
    fn default() -> Self {
        Self::new()
    }
}

/// The class of a layout, or None if it is too big or too aligned.
fn class_of(layout: Layout) -> Option<usize> {
    if layout.align() > MAX_ALIGN {
        return None;
    }
    let size = layout.size().max(layout.align()).max(1 << MIN_SHIFT);
    let shift = size.checked_next_power_of_two()?.trailing_zeros();
    (shift <= MAX_SHIFT).then(|| (shift - MIN_SHIFT) as usize)
}

unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(class) = class_of(layout) else {
            return ptr::null_mut();
        };
        self.take(class, 1usize << (class as u32 + MIN_SHIFT)).0
    }

    /// Like `alloc`, but memory never handed out before is not written: the
    /// arena is .bss, zero until used, and not touching a page spares a page
    /// fault (about 10 us on the project's PVM hosts; the vsock rx buffers
    /// alone are half a megabyte).
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let Some(class) = class_of(layout) else {
            return ptr::null_mut();
        };
        let size = 1usize << (class as u32 + MIN_SHIFT);
        let (p, fresh) = self.take(class, size);
        if !p.is_null() && !fresh {
            // SAFETY: a block of at least `size` bytes that is ours.
            unsafe { ptr::write_bytes(p, 0, layout.size()) };
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        let Some(class) = class_of(layout) else {
            return;
        };
        self.with_state(|st, _| {
            // SAFETY: the block is at least 16 bytes and no longer in use.
            unsafe { *(p as *mut usize) = st.free[class] };
            st.free[class] = p as usize;
        });
    }
}

#[cfg(not(test))]
#[global_allocator]
static HEAP: Heap = Heap::new();

#[cfg(test)]
mod tests {
    use super::*;
    use std::boxed::Box;

    #[test]
    fn classes() {
        assert_eq!(class_of(Layout::from_size_align(1, 1).unwrap()), Some(0));
        assert_eq!(class_of(Layout::from_size_align(17, 8).unwrap()), Some(1));
        assert_eq!(class_of(Layout::from_size_align(8, 64).unwrap()), Some(2));
        assert_eq!(
            class_of(Layout::from_size_align(1 << 20, 8).unwrap()),
            Some(CLASSES - 1)
        );
        assert_eq!(
            class_of(Layout::from_size_align((1 << 20) + 1, 8).unwrap()),
            None
        );
        assert_eq!(class_of(Layout::from_size_align(8, 8192).unwrap()), None);
    }

    #[test]
    fn reuses_freed_blocks_and_aligns() {
        // A Heap is all zeroes when new; build it in place (it is too big for
        // a test thread's stack).
        let heap: Box<Heap> = unsafe {
            let p = std::alloc::alloc_zeroed(Layout::new::<Heap>()) as *mut Heap;
            assert!(!p.is_null());
            Box::from_raw(p)
        };
        let l = Layout::from_size_align(100, 8).unwrap();
        unsafe {
            let a = heap.alloc(l);
            let b = heap.alloc(l);
            assert!(!a.is_null() && !b.is_null() && a != b);
            heap.dealloc(a, l);
            assert_eq!(heap.alloc(l), a);
            let big = Layout::from_size_align(3000, 4096).unwrap();
            let c = heap.alloc(big);
            assert_eq!(c as usize % 4096, 0);
            // Exhaustion returns null instead of overrunning the arena.
            let huge = Layout::from_size_align(1 << 20, 8).unwrap();
            let mut n = 0;
            while !heap.alloc(huge).is_null() {
                n += 1;
            }
            assert!((1..HEAP_SIZE >> 20).contains(&n));
            // Zeroed blocks are zero, fresh from the arena or reused.
            let small = Layout::from_size_align(64, 8).unwrap();
            let z = heap.alloc_zeroed(small);
            assert!(std::slice::from_raw_parts(z, 64).iter().all(|&b| b == 0));
            ptr::write_bytes(z, 0xff, 64);
            heap.dealloc(z, small);
            let z2 = heap.alloc_zeroed(small);
            assert_eq!(z2, z);
            assert!(std::slice::from_raw_parts(z2, 64).iter().all(|&b| b == 0));
        }
    }
}
