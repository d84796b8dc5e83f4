//! The shadow virtqueue: the VMM is the driver of a split queue that lives
//! in a bounce region (a memfd, the only memory the vhost-user backend is
//! given), and the device of the guest's queue. Each guest request is copied
//! into a free bounce slot (its readable part), posted as a two-descriptor
//! shadow chain (readable, then writable), and, when the backend puts it in
//! the shadow used ring, its reply is copied back into the guest's writable
//! buffers and the guest's used ring gets the entry.
//!
//! Bounds and back-pressure: a queue has a fixed number of slots of a fixed
//! size; a guest request larger than a slot is answered at once with a FUSE
//! error, and while every slot is busy the guest's requests stay in its
//! available ring until a reply frees one. The backend is hostile too: a used
//! entry naming a slot that is not in flight is ignored, a used length is
//! capped at the writable size.
//!
//! Error replies: a request that cannot be served (too big, malformed, the
//! backend gone) is completed with a FUSE reply carrying `-EIO` and the
//! request's `unique` when its writable part holds a `fuse_out_header` (16
//! bytes), else with used length 0. Either way the guest gets the chain back
//! exactly once.

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// `VIRTQ_DESC_F_NEXT` and `VIRTQ_DESC_F_WRITE` (virtio 1.2 §2.7.5).
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
/// `struct fuse_in_header` / `struct fuse_out_header` (Linux fuse.h).
pub const FUSE_IN_HEADER_LEN: u32 = 40;
pub const FUSE_OUT_HEADER_LEN: u32 = 16;
/// errno in error replies.
const EIO: i32 = 5;
/// Ring area of one shadow queue (descriptors, available and used ring).
pub const RING_AREA: u64 = 4096;

/// Where a shadow queue lives in the bounce region, and its bounds.
#[derive(Clone, Copy, Debug)]
pub struct ShadowLayout {
    /// Start of the ring area in the bounce region's address space.
    pub base: u64,
    /// Number of slots (requests in flight); the queue has twice as many descriptors.
    pub slots: u16,
    /// Bytes per slot: the largest request plus its reply.
    pub slot_size: u32,
}

impl ShadowLayout {
    /// Descriptors in the shadow queue.
    pub fn queue_size(&self) -> u16 {
        self.slots * 2
    }
    /// Descriptor table address.
    pub fn desc(&self) -> u64 {
        self.base
    }
    /// Available ring address.
    pub fn avail(&self) -> u64 {
        self.base + 16 * u64::from(self.queue_size())
    }
    /// Used ring address (4-byte aligned).
    pub fn used(&self) -> u64 {
        (self.avail() + 6 + 2 * u64::from(self.queue_size()) + 3) & !3
    }
    /// Start of slot `i`.
    pub fn slot(&self, i: u16) -> u64 {
        self.base + RING_AREA + u64::from(i) * u64::from(self.slot_size)
    }
    /// End of this queue's part of the bounce region.
    pub fn end(&self) -> u64 {
        self.slot(self.slots)
    }
}

/// A guest request in flight in the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InFlight {
    /// The guest chain's head, `None` once the guest reset the device (the
    /// reply is then dropped when it comes).
    pub head: Option<u16>,
    /// The FUSE `unique` of the request.
    pub unique: u64,
    /// Bytes copied in (readable part).
    pub readable: u32,
    /// The guest's writable buffers (guest address, length), in order.
    pub writable: Vec<(u64, u32)>,
}

impl InFlight {
    fn writable_len(&self) -> u32 {
        self.writable.iter().map(|w| w.1).sum()
    }
}

/// A parsed guest chain.
struct GuestRequest {
    head: u16,
    readable: Vec<(u64, u32)>,
    writable: Vec<(u64, u32)>,
    bad: bool,
}

/// One shadow queue.
pub struct ShadowQueue {
    layout: ShadowLayout,
    /// The backend's kick (we write it) and call (it writes it).
    pub kick: EventFd,
    pub call: EventFd,
    in_flight: Vec<Option<InFlight>>,
    free: Vec<u16>,
    avail_idx: u16,
    last_used: u16,
    scratch: Vec<u8>,
}

/// What one round of processing did.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Requests posted to the backend.
    pub posted: usize,
    /// Requests completed to the guest (replies and errors).
    pub completed: usize,
}

impl ShadowQueue {
    /// A shadow queue over `layout` (its ring area is zeroed in `bounce`).
    pub fn new(layout: ShadowLayout, bounce: &GuestMemoryMmap) -> std::io::Result<ShadowQueue> {
        let zero = vec![0u8; RING_AREA as usize];
        bounce
            .write_slice(&zero, GuestAddress(layout.base))
            .map_err(std::io::Error::other)?;
        Ok(ShadowQueue {
            layout,
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            call: EventFd::new(libc::EFD_NONBLOCK)?,
            in_flight: vec![None; usize::from(layout.slots)],
            free: (0..layout.slots).rev().collect(),
            avail_idx: 0,
            last_used: 0,
            scratch: Vec::new(),
        })
    }

    /// Where the queue lives.
    pub fn layout(&self) -> ShadowLayout {
        self.layout
    }

    /// Requests the backend holds.
    pub fn in_flight(&self) -> impl Iterator<Item = &InFlight> {
        self.in_flight.iter().flatten()
    }

    /// Forget the guest side of every request in flight (guest reset):
    /// their replies are dropped when they come, their slots freed then.
    pub fn detach_guest(&mut self) {
        for r in self.in_flight.iter_mut().flatten() {
            r.head = None;
        }
    }

    /// Walk a guest chain into readable and writable lists (readable first,
    /// as virtio-fs requires, virtio 1.2 §5.11.6).
    fn parse_chain(chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> GuestRequest {
        let head = chain.head_index();
        let mut req = GuestRequest {
            head,
            readable: Vec::new(),
            writable: Vec::new(),
            bad: false,
        };
        for d in chain {
            if d.is_write_only() {
                req.writable.push((d.addr().0, d.len()));
            } else if req.writable.is_empty() {
                req.readable.push((d.addr().0, d.len()));
            } else {
                req.bad = true;
            }
        }
        req
    }

    /// Move guest requests into free slots and post them; requests that
    /// cannot be served are completed with an error at once. With
    /// `backend_alive` false every request is completed with an error.
    pub fn take_guest_requests(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        bounce: &GuestMemoryMmap,
        backend_alive: bool,
    ) -> Progress {
        let mut progress = Progress::default();
        loop {
            if backend_alive && self.free.is_empty() {
                break; // back-pressure: the rest stays in the guest's ring
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let req = Self::parse_chain(chain);
            let readable: u64 = req.readable.iter().map(|r| u64::from(r.1)).sum();
            let writable: u64 = req.writable.iter().map(|w| u64::from(w.1)).sum();
            let fits = readable + writable <= u64::from(self.layout.slot_size);
            if !backend_alive
                || req.bad
                || !fits
                || readable < u64::from(FUSE_IN_HEADER_LEN)
                || !self.copy_in(mem, bounce, &req, readable as u32)
            {
                let unique = read_unique(mem, &req.readable).unwrap_or(0);
                if backend_alive {
                    tracing::debug!(
                        head = req.head,
                        readable,
                        writable,
                        "virtio-fs request refused"
                    );
                }
                complete_with_error(queue, mem, req.head, unique, &req.writable);
                progress.completed += 1;
                continue;
            }
            let slot = self.free.pop().expect("a free slot (checked above)");
            let unique = read_unique(bounce, &[(self.layout.slot(slot), 16)]).unwrap_or(0);
            self.post(bounce, slot, readable as u32, writable as u32);
            self.in_flight[usize::from(slot)] = Some(InFlight {
                head: Some(req.head),
                unique,
                readable: readable as u32,
                writable: req.writable,
            });
            progress.posted += 1;
        }
        progress
    }

    /// Copy the readable buffers into the slot that is free next.
    fn copy_in(
        &mut self,
        mem: &GuestMemoryMmap,
        bounce: &GuestMemoryMmap,
        req: &GuestRequest,
        total: u32,
    ) -> bool {
        let Some(&slot) = self.free.last() else {
            return false;
        };
        self.scratch.resize(total as usize, 0);
        let mut at = 0usize;
        for &(addr, len) in &req.readable {
            let end = at + len as usize;
            if mem
                .read_slice(&mut self.scratch[at..end], GuestAddress(addr))
                .is_err()
            {
                return false;
            }
            at = end;
        }
        bounce
            .write_slice(&self.scratch, GuestAddress(self.layout.slot(slot)))
            .is_ok()
    }

    /// Write the shadow chain of `slot` and publish it.
    fn post(&mut self, bounce: &GuestMemoryMmap, slot: u16, readable: u32, writable: u32) {
        let l = self.layout;
        let base = l.slot(slot);
        let d0 = 2 * slot;
        let write_desc = |i: u16, addr: u64, len: u32, flags: u16, next: u16| {
            let d = l.desc() + 16 * u64::from(i);
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            bounce.write_slice(&raw, GuestAddress(d))
        };
        let more = if writable > 0 { DESC_F_NEXT } else { 0 };
        let ok = write_desc(d0, base, readable, more, d0 + 1).is_ok()
            && (writable == 0
                || write_desc(
                    d0 + 1,
                    base + u64::from(readable),
                    writable,
                    DESC_F_WRITE,
                    0,
                )
                .is_ok());
        let slot_in_ring = u64::from(self.avail_idx % l.queue_size());
        let ring = l.avail() + 4 + 2 * slot_in_ring;
        let ok = ok && bounce.write_obj(d0, GuestAddress(ring)).is_ok();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The entry before the index that publishes it (virtio 1.2 §2.7.13).
        let ok = ok
            && bounce
                .store(
                    self.avail_idx,
                    GuestAddress(l.avail() + 2),
                    Ordering::Release,
                )
                .is_ok();
        if !ok {
            // The bounce region is ours and sized for the layout.
            tracing::error!(slot, "virtio-fs: writing the shadow ring failed");
        }
    }

    /// Tell the backend about posted requests.
    pub fn kick_backend(&self) {
        if let Err(e) = self.kick.write(1) {
            tracing::warn!("virtio-fs: kicking the backend failed: {e}");
        }
    }

    /// Take the backend's replies from the shadow used ring, copy them back
    /// to the guest and complete the guest chains.
    pub fn take_backend_replies(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        bounce: &GuestMemoryMmap,
    ) -> Progress {
        let mut progress = Progress::default();
        let l = self.layout;
        let Ok(used_idx) = bounce.load::<u16>(GuestAddress(l.used() + 2), Ordering::Acquire) else {
            return progress;
        };
        while self.last_used != used_idx {
            let at = l.used() + 4 + 8 * u64::from(self.last_used % l.queue_size());
            self.last_used = self.last_used.wrapping_add(1);
            let (Ok(id), Ok(len)) = (
                bounce.read_obj::<u32>(GuestAddress(at)),
                bounce.read_obj::<u32>(GuestAddress(at + 4)),
            ) else {
                continue;
            };
            let slot = id / 2;
            let request = (id % 2 == 0)
                .then(|| self.in_flight.get_mut(slot as usize))
                .flatten()
                .and_then(Option::take);
            let Some(request) = request else {
                tracing::warn!(
                    id,
                    "virtio-fs backend returned a chain that is not in flight"
                );
                continue;
            };
            let slot = slot as u16;
            self.free.push(slot);
            let Some(head) = request.head else { continue };
            let len = len.min(request.writable_len());
            let reply_at = l.slot(slot) + u64::from(request.readable);
            let written = self.copy_out(mem, bounce, reply_at, len, &request.writable);
            if let Err(e) = queue.add_used(mem, head, written) {
                tracing::warn!("virtio-fs used ring update failed: {e}");
            }
            progress.completed += 1;
        }
        progress
    }

    /// Copy `len` reply bytes to the guest's writable buffers; returns how
    /// many reached guest memory.
    fn copy_out(
        &mut self,
        mem: &GuestMemoryMmap,
        bounce: &GuestMemoryMmap,
        from: u64,
        len: u32,
        writable: &[(u64, u32)],
    ) -> u32 {
        self.scratch.resize(len as usize, 0);
        if bounce
            .read_slice(&mut self.scratch, GuestAddress(from))
            .is_err()
        {
            return 0;
        }
        write_guest(mem, &self.scratch, writable)
    }

    /// Fail every request in flight (the backend is gone): each guest chain
    /// gets an error reply; the slots are free again.
    pub fn fail_in_flight(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Progress {
        let mut progress = Progress::default();
        for (slot, entry) in self.in_flight.iter_mut().enumerate() {
            if let Some(r) = entry.take() {
                self.free.push(slot as u16);
                if let Some(head) = r.head {
                    complete_with_error(queue, mem, head, r.unique, &r.writable);
                    progress.completed += 1;
                }
            }
        }
        progress
    }
}

/// Write `data` across `writable` buffers; returns bytes written.
fn write_guest(mem: &GuestMemoryMmap, data: &[u8], writable: &[(u64, u32)]) -> u32 {
    let mut at = 0usize;
    for &(addr, cap) in writable {
        if at >= data.len() {
            break;
        }
        let n = (cap as usize).min(data.len() - at);
        if mem
            .write_slice(&data[at..at + n], GuestAddress(addr))
            .is_err()
        {
            break;
        }
        at += n;
    }
    at as u32
}

/// The FUSE `unique` of a request (bytes 8..16 of its `fuse_in_header`).
fn read_unique(mem: &GuestMemoryMmap, readable: &[(u64, u32)]) -> Option<u64> {
    let mut header = [0u8; 16];
    let mut at = 0usize;
    for &(addr, len) in readable {
        if at == header.len() {
            break;
        }
        let n = (len as usize).min(header.len() - at);
        mem.read_slice(&mut header[at..at + n], GuestAddress(addr))
            .ok()?;
        at += n;
    }
    (at == header.len()).then(|| u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8])))
}

/// Complete a guest chain with a FUSE `-EIO` reply (used length 0 if its
/// writable part cannot hold a `fuse_out_header`).
pub fn complete_with_error(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    unique: u64,
    writable: &[(u64, u32)],
) {
    let cap: u64 = writable.iter().map(|w| u64::from(w.1)).sum();
    let len = if cap >= u64::from(FUSE_OUT_HEADER_LEN) {
        let mut reply = [0u8; FUSE_OUT_HEADER_LEN as usize];
        reply[0..4].copy_from_slice(&FUSE_OUT_HEADER_LEN.to_le_bytes());
        reply[4..8].copy_from_slice(&(-EIO).to_le_bytes());
        reply[8..16].copy_from_slice(&unique.to_le_bytes());
        write_guest(mem, &reply, writable)
    } else {
        0
    };
    if let Err(e) = queue.add_used(mem, head, len) {
        tracing::warn!("virtio-fs used ring update failed: {e}");
    }
}
