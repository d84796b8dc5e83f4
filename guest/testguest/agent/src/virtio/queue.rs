//! A split virtqueue, the driver's side (virtio 1.2 §2.7): the descriptor
//! table, the available ring and the used ring in one zeroed, page-aligned
//! allocation that is never freed (the device keeps its address until reset).
//! The agent's memory is identity-mapped, so a pointer is the guest-physical
//! address the device uses.
//!
//! Each buffer chain carries a token (`T`: the buffer itself, typically)
//! that `pop_used` hands back, so a buffer lives exactly as long as the
//! device may touch it. Neither VIRTIO_F_EVENT_IDX nor indirect descriptors
//! are used.

use alloc::vec::Vec;
use core::alloc::Layout;
use core::ptr;
use core::sync::atomic::{fence, Ordering};

/// `struct virtq_desc` flags (virtio 1.2 §2.7.5).
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
/// `virtq_used.flags`: the device needs no notification (virtio 1.2 §2.7.7).
const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;
/// Largest queue size of a split queue (virtio 1.2 §2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// One buffer of a chain.
#[derive(Clone, Copy, Debug)]
pub struct Buffer {
    /// Guest-physical address.
    pub addr: u64,
    pub len: u32,
    /// The device writes it (else reads it).
    pub device_writable: bool,
}

/// A used chain: its token and how many bytes the device wrote.
#[derive(Debug, PartialEq, Eq)]
pub struct Used<T> {
    pub token: T,
    pub len: u32,
}

/// A split virtqueue (driver side).
pub struct SplitQueue<T> {
    size: u16,
    base: *mut u8,
    layout: Layout,
    /// Offsets of the available and used rings in the allocation.
    avail_off: usize,
    used_off: usize,
    /// Head of the free descriptor list (linked through `next`).
    free_head: u16,
    num_free: u16,
    /// Our copy of avail.idx.
    avail_idx: u16,
    /// The used.idx we processed up to.
    last_used: u16,
    /// Token of each chain, by head descriptor.
    tokens: Vec<Option<T>>,
}

// SAFETY: the allocation belongs to the queue alone (and the device).
unsafe impl<T: Send> Send for SplitQueue<T> {}

fn align_up(v: usize, a: usize) -> usize {
    (v + a - 1) & !(a - 1)
}

impl<T> SplitQueue<T> {
    /// A queue of `size` entries (a power of two, at most 32768).
    pub fn new(size: u16) -> Self {
        assert!(
            size.is_power_of_two() && size <= MAX_QUEUE_SIZE,
            "bad queue size {size}"
        );
        let n = usize::from(size);
        let avail_off = 16 * n;
        let used_off = align_up(avail_off + 6 + 2 * n, 4);
        let total = used_off + 6 + 8 * n;
        let layout = Layout::from_size_align(align_up(total, 4096), 4096).expect("queue layout");
        // SAFETY: a non-zero size; the allocation is checked below.
        let base = unsafe { alloc::alloc::alloc_zeroed(layout) };
        if base.is_null() {
            alloc::alloc::handle_alloc_error(layout);
        }
        let mut q = SplitQueue {
            size,
            base,
            layout,
            avail_off,
            used_off,
            free_head: 0,
            num_free: size,
            avail_idx: 0,
            last_used: 0,
            tokens: (0..n).map(|_| None).collect(),
        };
        for i in 0..size {
            q.write_desc(i, 0, 0, 0, i.wrapping_add(1));
        }
        q
    }

    /// Entries in the queue.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Descriptors not in use.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Guest-physical addresses of the descriptor table, the available
    /// (driver) ring and the used (device) ring.
    pub fn addresses(&self) -> (u64, u64, u64) {
        let b = self.base as u64;
        (b, b + self.avail_off as u64, b + self.used_off as u64)
    }

    fn write_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        // SAFETY: i < size: inside the descriptor table.
        unsafe {
            let d = self.base.add(16 * usize::from(i));
            ptr::write_volatile(d as *mut u64, addr);
            ptr::write_volatile(d.add(8) as *mut u32, len);
            ptr::write_volatile(d.add(12) as *mut u16, flags);
            ptr::write_volatile(d.add(14) as *mut u16, next);
        }
    }

    fn desc_flags_next(&self, i: u16) -> (u16, u16) {
        // SAFETY: i < size: inside the descriptor table.
        unsafe {
            let d = self.base.add(16 * usize::from(i));
            (
                ptr::read_volatile(d.add(12) as *const u16),
                ptr::read_volatile(d.add(14) as *const u16),
            )
        }
    }

    /// Makes a chain of `buffers` available with `token`. Gives the token
    /// back if there are not enough free descriptors (or no buffers).
    /// The device learns about it at the next `notify` decision.
    pub fn push(&mut self, buffers: &[Buffer], token: T) -> Result<(), T> {
        let n = buffers.len();
        if n == 0 || n > usize::from(self.num_free) {
            return Err(token);
        }
        let head = self.free_head;
        let mut i = head;
        for (k, b) in buffers.iter().enumerate() {
            let (_, next_free) = self.desc_flags_next(i);
            let mut flags = if b.device_writable {
                VIRTQ_DESC_F_WRITE
            } else {
                0
            };
            let last = k + 1 == n;
            if !last {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.write_desc(i, b.addr, b.len, flags, if last { 0 } else { next_free });
            if last {
                self.free_head = next_free;
            }
            i = next_free;
        }
        self.num_free -= n as u16;
        self.tokens[usize::from(head)] = Some(token);
        let slot = usize::from(self.avail_idx % self.size);
        // SAFETY: inside the available ring.
        unsafe {
            ptr::write_volatile(
                self.base.add(self.avail_off + 4 + 2 * slot) as *mut u16,
                head,
            );
        }
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The ring entry (and the descriptors) before the index that
        // publishes them (virtio 1.2 §2.7.13).
        fence(Ordering::Release);
        // SAFETY: avail.idx.
        unsafe {
            ptr::write_volatile(
                self.base.add(self.avail_off + 2) as *mut u16,
                self.avail_idx,
            )
        };
        Ok(())
    }

    /// Chains the device holds (made available, not yet seen back as used).
    /// When it drops to 0 the device may have found the ring empty and be
    /// waiting for a notification before it looks again.
    pub fn outstanding(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.last_used)
    }

    /// Whether the device wants a notification for what was pushed (it did
    /// not set VIRTQ_USED_F_NO_NOTIFY).
    pub fn needs_notification(&self) -> bool {
        // avail.idx must be visible before the flag is read (virtio 1.2
        // §2.7.13.4): a full fence.
        fence(Ordering::SeqCst);
        // SAFETY: used.flags.
        let flags = unsafe { ptr::read_volatile(self.base.add(self.used_off) as *const u16) };
        flags & VIRTQ_USED_F_NO_NOTIFY == 0
    }

    /// The next chain the device is done with, if any; its descriptors are
    /// free again.
    pub fn pop_used(&mut self) -> Option<Used<T>> {
        loop {
            let (id, len) = self.next_used_elem()?;
            // A chain we never gave the device (or gave back already) is
            // ignored.
            let Some(head) = u16::try_from(id).ok().filter(|&h| h < self.size) else {
                continue;
            };
            let Some(token) = self.tokens[usize::from(head)].take() else {
                continue;
            };
            self.free_chain(head);
            return Some(Used { token, len });
        }
    }

    /// The next used ring element (id, len), if the device published one.
    fn next_used_elem(&mut self) -> Option<(u32, u32)> {
        // SAFETY: used.idx.
        let used_idx =
            unsafe { ptr::read_volatile(self.base.add(self.used_off + 2) as *const u16) };
        if used_idx == self.last_used {
            return None;
        }
        // The element after the index that published it.
        fence(Ordering::Acquire);
        let slot = usize::from(self.last_used % self.size);
        self.last_used = self.last_used.wrapping_add(1);
        // SAFETY: inside the used ring.
        unsafe {
            let e = self.base.add(self.used_off + 4 + 8 * slot);
            Some((
                ptr::read_volatile(e as *const u32),
                ptr::read_volatile(e.add(4) as *const u32),
            ))
        }
    }

    /// Puts the chain starting at `head` back on the free list.
    fn free_chain(&mut self, head: u16) {
        // Free the chain: walk it to its end and put it in front of the
        // free list.
        let mut tail = head;
        let mut count = 1;
        loop {
            let (flags, next) = self.desc_flags_next(tail);
            if flags & VIRTQ_DESC_F_NEXT == 0 || count >= self.size {
                break;
            }
            tail = next;
            count += 1;
        }
        let free_head = self.free_head;
        // SAFETY: tail < size.
        unsafe {
            let d = self.base.add(16 * usize::from(tail));
            ptr::write_volatile(d.add(14) as *mut u16, free_head);
        }
        self.free_head = head;
        self.num_free += count;
    }

    /// Forgets every chain and starts over (after a device reset). The
    /// tokens are dropped.
    pub fn reset(&mut self) {
        // SAFETY: the whole allocation is ours again (the device was reset).
        unsafe { ptr::write_bytes(self.base, 0, self.layout.size()) };
        for t in self.tokens.iter_mut() {
            *t = None;
        }
        self.free_head = 0;
        self.num_free = self.size;
        self.avail_idx = 0;
        self.last_used = 0;
        for i in 0..self.size {
            self.write_desc(i, 0, 0, 0, i.wrapping_add(1));
        }
    }
}

impl<T> Drop for SplitQueue<T> {
    fn drop(&mut self) {
        // Only in tests: the agent's queues live as long as it does (a device
        // may still read the rings of a dropped queue otherwise).
        // SAFETY: allocated in `new` with this layout.
        unsafe { alloc::alloc::dealloc(self.base, self.layout) };
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::vec;

    /// A descriptor as the device sees it: address, length, flags.
    pub(crate) type DeviceDesc = (u64, u32, u16);

    /// The device's side, reading and writing the rings like a device would.
    #[derive(Default)]
    pub(crate) struct FakeDevice {
        pub(crate) last_avail: u16,
        pub(crate) used_idx: u16,
    }

    impl FakeDevice {
        /// Takes the next available chain: its descriptors (addr, len, flags).
        pub(crate) fn take<T>(&mut self, q: &SplitQueue<T>) -> Option<(u16, Vec<DeviceDesc>)> {
            let (desc, avail, _) = q.addresses();
            unsafe {
                let idx = ptr::read_volatile((avail + 2) as *const u16);
                if idx == self.last_avail {
                    return None;
                }
                let slot = u64::from(self.last_avail % q.size);
                let head = ptr::read_volatile((avail + 4 + 2 * slot) as *const u16);
                self.last_avail = self.last_avail.wrapping_add(1);
                let mut chain = Vec::new();
                let mut i = head;
                loop {
                    let d = desc + 16 * u64::from(i);
                    let addr = ptr::read_volatile(d as *const u64);
                    let len = ptr::read_volatile((d + 8) as *const u32);
                    let flags = ptr::read_volatile((d + 12) as *const u16);
                    let next = ptr::read_volatile((d + 14) as *const u16);
                    chain.push((addr, len, flags));
                    if flags & VIRTQ_DESC_F_NEXT == 0 {
                        break;
                    }
                    i = next;
                }
                Some((head, chain))
            }
        }

        /// Returns chain `head` as used, `len` bytes written.
        pub(crate) fn give_back<T>(&mut self, q: &SplitQueue<T>, head: u16, len: u32) {
            let (_, _, used) = q.addresses();
            unsafe {
                let slot = u64::from(self.used_idx % q.size);
                ptr::write_volatile((used + 4 + 8 * slot) as *mut u32, u32::from(head));
                ptr::write_volatile((used + 8 + 8 * slot) as *mut u32, len);
                self.used_idx = self.used_idx.wrapping_add(1);
                ptr::write_volatile((used + 2) as *mut u16, self.used_idx);
            }
        }
    }

    #[test]
    fn chains_go_round_the_ring_many_times() {
        let mut q: SplitQueue<Vec<u8>> = SplitQueue::new(4);
        let mut dev = FakeDevice {
            last_avail: 0,
            used_idx: 0,
        };
        assert_eq!(q.addresses().0 % 4096, 0);
        for round in 0..100u32 {
            let mut buf = vec![0u8; 8];
            let hdr = [round as u8; 4];
            let chain = [
                Buffer {
                    addr: hdr.as_ptr() as u64,
                    len: 4,
                    device_writable: false,
                },
                Buffer {
                    addr: buf.as_mut_ptr() as u64,
                    len: 8,
                    device_writable: true,
                },
            ];
            q.push(&chain, buf).unwrap();
            assert_eq!(q.num_free(), 2);
            assert!(q.needs_notification());
            let (head, descs) = dev.take(&q).unwrap();
            assert_eq!(descs.len(), 2);
            assert_eq!(descs[0].2, VIRTQ_DESC_F_NEXT);
            assert_eq!(descs[1].2, VIRTQ_DESC_F_WRITE);
            unsafe { *(descs[1].0 as *mut u8) = round as u8 ^ 0xff };
            dev.give_back(&q, head, 1);
            let used = q.pop_used().unwrap();
            assert_eq!(used.len, 1);
            assert_eq!(used.token[0], round as u8 ^ 0xff);
            assert_eq!(q.num_free(), 4);
            assert!(q.pop_used().is_none());
        }
    }

    #[test]
    fn full_queue_refuses_and_out_of_order_completion_works() {
        let mut q: SplitQueue<u32> = SplitQueue::new(4);
        let mut dev = FakeDevice {
            last_avail: 0,
            used_idx: 0,
        };
        let b = Buffer {
            addr: 0x1000,
            len: 1,
            device_writable: true,
        };
        for t in 0..4 {
            q.push(&[b], t).unwrap();
        }
        assert_eq!(q.push(&[b], 9), Err(9));
        let heads: Vec<u16> = (0..4).map(|_| dev.take(&q).unwrap().0).collect();
        dev.give_back(&q, heads[2], 0);
        dev.give_back(&q, heads[0], 0);
        assert_eq!(q.pop_used().unwrap().token, 2);
        assert_eq!(q.pop_used().unwrap().token, 0);
        q.push(&[b, b], 7).unwrap();
        assert_eq!(q.num_free(), 0);
        // A bogus id from the device is ignored.
        dev.give_back(&q, 200, 0);
        assert!(q.pop_used().is_none());
        q.reset();
        assert_eq!(q.num_free(), 4);
    }
}
