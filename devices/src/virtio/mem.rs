//! virtio-mem (memory device, virtio 1.2 §5.15): a region of guest-physical
//! memory the driver plugs and unplugs in blocks, on the host's request
//! (`requested_size`). The region is anonymous host memory ([`MemRegion`])
//! that the VMM registers as its own KVM memory slot; it is never the
//! template's memory file, so a clone's added memory is its own.
//!
//! The device validates every request: ranges must be block aligned, inside
//! the usable region, and in the state the request expects; anything else is
//! answered with `ERROR` (or `NACK` when plugging would exceed the request).

use std::io::{Read, Write};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_queue::{QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::{
    drain_event, ActivateError, ActiveState, Interrupt, VirtioCore, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

/// Device ID of a memory device (virtio 1.2 §5, §5.15).
pub const VIRTIO_ID_MEM: u32 = 24;
/// Size of the request queue.
pub const MEM_QUEUE_SIZE: u16 = 128;
/// Block size the device uses: 2 MiB, the guests' large-page size.
pub const MEM_BLOCK_SIZE: u64 = 2 << 20;
/// Bytes of device configuration space.
pub const MEM_CONFIG_SIZE: usize = 56;

/// Request types (virtio 1.2 §5.15.6).
pub const VIRTIO_MEM_REQ_PLUG: u16 = 0;
/// Unplug blocks.
pub const VIRTIO_MEM_REQ_UNPLUG: u16 = 1;
/// Unplug everything.
pub const VIRTIO_MEM_REQ_UNPLUG_ALL: u16 = 2;
/// Ask the state of a range.
pub const VIRTIO_MEM_REQ_STATE: u16 = 3;
/// Response types (virtio 1.2 §5.15.6).
pub const VIRTIO_MEM_RESP_ACK: u16 = 0;
/// The request is valid but refused now (e.g. beyond `requested_size`).
pub const VIRTIO_MEM_RESP_NACK: u16 = 1;
/// The device is busy; retry later.
pub const VIRTIO_MEM_RESP_BUSY: u16 = 2;
/// The request is invalid.
pub const VIRTIO_MEM_RESP_ERROR: u16 = 3;
/// STATE answer: every block of the range is plugged.
pub const VIRTIO_MEM_STATE_PLUGGED: u16 = 0;
/// STATE answer: no block of the range is plugged.
pub const VIRTIO_MEM_STATE_UNPLUGGED: u16 = 1;
/// STATE answer: some blocks are plugged, some not.
pub const VIRTIO_MEM_STATE_MIXED: u16 = 2;

/// Bytes of a request (`struct virtio_mem_req`).
pub const MEM_REQ_SIZE: usize = 24;
/// Bytes of a response (`struct virtio_mem_resp`).
pub const MEM_RESP_SIZE: usize = 10;

/// Errors creating the device or its region.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// The region is not block aligned or empty.
    #[error("virtio-mem region {addr:#x}+{size:#x} is not a non-empty multiple of {MEM_BLOCK_SIZE:#x} aligned to it")]
    Unaligned {
        /// Guest-physical start.
        addr: u64,
        /// Size in bytes.
        size: u64,
    },
    /// A requested size is larger than the region or not block aligned.
    #[error("virtio-mem requested size {requested:#x} does not fit the region of {region:#x} in blocks of {MEM_BLOCK_SIZE:#x}")]
    Requested {
        /// What was asked.
        requested: u64,
        /// Region size.
        region: u64,
    },
    /// A saved state does not describe a valid device.
    #[error("invalid saved virtio-mem state: {0}")]
    State(String),
    /// mmap / eventfd.
    #[error("virtio-mem host resource: {0}")]
    Host(#[from] std::io::Error),
}

/// Anonymous host memory backing a virtio-mem region (MAP_NORESERVE: only
/// what the guest touches is ever allocated).
pub struct MemRegion {
    host: *mut u8,
    len: usize,
    addr: u64,
}

// SAFETY: the mapping is plain memory owned by this value; access to its
// contents goes through KVM (the guest) or the raw-pointer methods below.
unsafe impl Send for MemRegion {}
// SAFETY: see Send; the methods only read through the pointer or madvise.
unsafe impl Sync for MemRegion {}

impl MemRegion {
    /// Map `size` bytes of anonymous memory for guest-physical `addr`.
    pub fn new(addr: u64, size: u64) -> Result<Self, MemError> {
        if size == 0 || !size.is_multiple_of(MEM_BLOCK_SIZE) || !addr.is_multiple_of(MEM_BLOCK_SIZE)
        {
            return Err(MemError::Unaligned { addr, size });
        }
        let len = usize::try_from(size).map_err(|_| MemError::Unaligned { addr, size })?;
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(MemError::Host(std::io::Error::last_os_error()));
        }
        Ok(MemRegion {
            host: host.cast(),
            len,
            addr,
        })
    }

    /// Guest-physical start.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.len as u64
    }

    /// Host address of the mapping (for KVM_SET_USER_MEMORY_REGION).
    pub fn host_addr(&self) -> u64 {
        self.host as u64
    }

    /// Copy bytes at `offset` of the region into `buf` (None: out of range).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Option<()> {
        let end = offset.checked_add(buf.len() as u64)?;
        if end > self.len as u64 {
            return None;
        }
        // SAFETY: [offset, end) is inside the live mapping (checked above);
        // the guest may write it concurrently, which only changes the bytes read.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.host.add(offset as usize),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Some(())
    }

    /// Give the host memory of `[offset, offset + len)` back (it reads as
    /// zero afterwards).
    fn discard(&self, offset: u64, len: u64) {
        if offset.checked_add(len).is_none_or(|e| e > self.len as u64) {
            return;
        }
        // SAFETY: the range is inside our own mapping; MADV_DONTNEED on
        // private anonymous memory only zeroes it.
        let r = unsafe {
            libc::madvise(
                self.host.add(offset as usize).cast(),
                len as usize,
                libc::MADV_DONTNEED,
            )
        };
        if r != 0 {
            tracing::warn!(
                "virtio-mem: madvise(DONTNEED) failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

impl Drop for MemRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `new`.
        unsafe { libc::munmap(self.host.cast(), self.len) };
    }
}

/// Saved state of the device (the region's contents are not part of it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemState {
    /// Guest-physical start of the region.
    pub addr: u64,
    /// Region size in bytes.
    pub region_size: u64,
    /// What the host asked for.
    pub requested_size: u64,
    /// Plugged blocks, one flag per block.
    pub plugged: Vec<bool>,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// The memory device.
pub struct Mem {
    vm_id: String,
    core: VirtioCore,
    active: Option<ActiveState>,
    region: Arc<MemRegion>,
    requested_size: u64,
    plugged: Vec<bool>,
    // Set when the host changed requested_size while the device was not
    // active; signalled at activation.
    config_pending: bool,
}

impl Mem {
    /// A new device over `region`, nothing plugged or requested.
    pub fn new(vm_id: &str, region: Arc<MemRegion>) -> Result<Self, MemError> {
        let core = VirtioCore::new(1 << VIRTIO_F_VERSION_1, &[MEM_QUEUE_SIZE])?;
        let blocks = (region.size() / MEM_BLOCK_SIZE) as usize;
        Ok(Mem {
            vm_id: vm_id.to_owned(),
            core,
            active: None,
            region,
            requested_size: 0,
            plugged: vec![false; blocks],
            config_pending: false,
        })
    }

    /// Rebuild a device from `state` over `region` (same place and size).
    pub fn restore(
        vm_id: &str,
        state: &MemState,
        region: Arc<MemRegion>,
    ) -> Result<Self, MemError> {
        if state.addr != region.addr() || state.region_size != region.size() {
            return Err(MemError::State(format!(
                "region {:#x}+{:#x} does not match the saved {:#x}+{:#x}",
                region.addr(),
                region.size(),
                state.addr,
                state.region_size
            )));
        }
        let mut dev = Mem::new(vm_id, region)?;
        if state.plugged.len() != dev.plugged.len() {
            return Err(MemError::State(format!(
                "{} block flags for {} blocks",
                state.plugged.len(),
                dev.plugged.len()
            )));
        }
        if state.requested_size > state.region_size
            || !state.requested_size.is_multiple_of(MEM_BLOCK_SIZE)
        {
            return Err(MemError::State(format!(
                "requested size {:#x}",
                state.requested_size
            )));
        }
        dev.plugged.clone_from(&state.plugged);
        dev.requested_size = state.requested_size;
        dev.set_acked_features(state.acked_features);
        Ok(dev)
    }

    /// The device's state.
    pub fn save(&self) -> MemState {
        MemState {
            addr: self.region.addr(),
            region_size: self.region.size(),
            requested_size: self.requested_size,
            plugged: self.plugged.clone(),
            acked_features: self.core.acked_features,
        }
    }

    /// The region.
    pub fn region(&self) -> &Arc<MemRegion> {
        &self.region
    }

    /// Bytes plugged.
    pub fn plugged_size(&self) -> u64 {
        self.plugged.iter().filter(|&&p| p).count() as u64 * MEM_BLOCK_SIZE
    }

    /// Bytes the host asked the guest to plug.
    pub fn requested_size(&self) -> u64 {
        self.requested_size
    }

    /// Ask the guest to have `bytes` plugged (a multiple of the block size,
    /// at most the region) and tell it with a configuration-change interrupt.
    pub fn set_requested_size(&mut self, bytes: u64) -> Result<(), MemError> {
        if bytes > self.region.size() || !bytes.is_multiple_of(MEM_BLOCK_SIZE) {
            return Err(MemError::Requested {
                requested: bytes,
                region: self.region.size(),
            });
        }
        self.requested_size = bytes;
        match &self.active {
            Some(a) => a.interrupt.signal_config_change(),
            None => self.config_pending = true,
        }
        tracing::info!(vm = %self.vm_id, requested = bytes, "virtio-mem requested size changed");
        Ok(())
    }

    fn config_bytes(&self) -> [u8; MEM_CONFIG_SIZE] {
        let mut c = [0u8; MEM_CONFIG_SIZE];
        c[0..8].copy_from_slice(&MEM_BLOCK_SIZE.to_le_bytes());
        // node_id (8..10) and padding stay 0.
        c[16..24].copy_from_slice(&self.region.addr().to_le_bytes());
        c[24..32].copy_from_slice(&self.region.size().to_le_bytes());
        c[32..40].copy_from_slice(&self.region.size().to_le_bytes());
        c[40..48].copy_from_slice(&self.plugged_size().to_le_bytes());
        c[48..56].copy_from_slice(&self.requested_size.to_le_bytes());
        c
    }

    /// The block range of a request, if it is aligned, non-empty and inside
    /// the usable region.
    fn blocks(&self, addr: u64, nb_blocks: u64) -> Option<std::ops::Range<usize>> {
        if nb_blocks == 0 || !addr.is_multiple_of(MEM_BLOCK_SIZE) {
            return None;
        }
        let first = addr.checked_sub(self.region.addr())? / MEM_BLOCK_SIZE;
        let end = first.checked_add(nb_blocks)?;
        if end > self.plugged.len() as u64 {
            return None;
        }
        Some(first as usize..end as usize)
    }

    /// Carry out one request; returns (response type, STATE answer).
    pub(crate) fn handle(&mut self, req: &[u8; MEM_REQ_SIZE]) -> (u16, u16) {
        let kind = u16::from_le_bytes([req[0], req[1]]);
        let addr = u64::from_le_bytes(req[8..16].try_into().expect("8 bytes"));
        let nb_blocks = u64::from(u16::from_le_bytes([req[16], req[17]]));
        let err = (VIRTIO_MEM_RESP_ERROR, 0);
        match kind {
            VIRTIO_MEM_REQ_PLUG => {
                let Some(r) = self.blocks(addr, nb_blocks) else {
                    return err;
                };
                if self.plugged[r.clone()].iter().any(|&p| p) {
                    return err;
                }
                if self.plugged_size() + nb_blocks * MEM_BLOCK_SIZE > self.requested_size {
                    return (VIRTIO_MEM_RESP_NACK, 0);
                }
                self.plugged[r].fill(true);
                (VIRTIO_MEM_RESP_ACK, 0)
            }
            VIRTIO_MEM_REQ_UNPLUG => {
                let Some(r) = self.blocks(addr, nb_blocks) else {
                    return err;
                };
                if !self.plugged[r.clone()].iter().all(|&p| p) {
                    return err;
                }
                self.region.discard(
                    r.start as u64 * MEM_BLOCK_SIZE,
                    r.len() as u64 * MEM_BLOCK_SIZE,
                );
                self.plugged[r].fill(false);
                (VIRTIO_MEM_RESP_ACK, 0)
            }
            VIRTIO_MEM_REQ_UNPLUG_ALL => {
                self.region.discard(0, self.region.size());
                self.plugged.fill(false);
                (VIRTIO_MEM_RESP_ACK, 0)
            }
            VIRTIO_MEM_REQ_STATE => {
                let Some(r) = self.blocks(addr, nb_blocks) else {
                    return err;
                };
                let s = &self.plugged[r];
                let state = if s.iter().all(|&p| p) {
                    VIRTIO_MEM_STATE_PLUGGED
                } else if s.iter().any(|&p| p) {
                    VIRTIO_MEM_STATE_MIXED
                } else {
                    VIRTIO_MEM_STATE_UNPLUGGED
                };
                (VIRTIO_MEM_RESP_ACK, state)
            }
            _ => err,
        }
    }

    /// Serve every request in the queue (at most one queue's worth per call).
    pub(crate) fn process_requests(&mut self) {
        let Some(active) = &self.active else { return };
        let mem = active.mem.clone();
        let mut served = 0u16;
        let mut any = false;
        while let Some(chain) = self.core.queues[0].pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let len = self.serve(&mem, chain).unwrap_or_else(|e| {
                tracing::debug!(vm = %self.vm_id, "virtio-mem request {head}: {e}");
                0
            });
            if let Err(e) = self.core.queues[0].add_used(&mem, head, len) {
                tracing::warn!(vm = %self.vm_id, "virtio-mem used ring update failed: {e}");
                break;
            }
            any = true;
            served += 1;
            if served >= self.core.queues[0].size() {
                if let Err(e) = self.core.queue_events[0].write(1) {
                    tracing::warn!(vm = %self.vm_id, "virtio-mem reschedule failed: {e}");
                }
                break;
            }
        }
        if let Some(active) = &self.active {
            if any && self.core.queues[0].needs_notification(&mem).unwrap_or(true) {
                active.interrupt.signal_used_queue();
            }
        }
    }

    /// One request: read it, carry it out, write the response. Returns the
    /// bytes written.
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) -> std::io::Result<u32> {
        let mut reader = Reader::new(mem, chain.clone())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        let mut writer = Writer::new(mem, chain)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        if writer.available_bytes() < MEM_RESP_SIZE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "no room for the response",
            ));
        }
        let mut req = [0u8; MEM_REQ_SIZE];
        let (kind, state) = match reader.read_exact(&mut req) {
            Ok(()) => self.handle(&req),
            Err(_) => (VIRTIO_MEM_RESP_ERROR, 0),
        };
        let mut resp = [0u8; MEM_RESP_SIZE];
        resp[0..2].copy_from_slice(&kind.to_le_bytes());
        resp[8..10].copy_from_slice(&state.to_le_bytes());
        writer.write_all(&resp)?;
        Ok(MEM_RESP_SIZE as u32)
    }
}

impl VirtioDevice for Mem {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_MEM
    }

    fn core(&self) -> &VirtioCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut VirtioCore {
        &mut self.core
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start >= c.len() {
            return;
        }
        let n = data.len().min(c.len() - start);
        data[..n].copy_from_slice(&c[start..start + n]);
    }

    /// The configuration space is read-only for the driver (virtio 1.2 §5.15.4).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if std::mem::take(&mut self.config_pending) {
            interrupt.signal_config_change();
        }
        self.active = Some(ActiveState { mem, interrupt });
        if let Err(e) = self.core.queue_events[0].write(1) {
            tracing::warn!(vm = %self.vm_id, "virtio-mem initial kick failed: {e}");
        }
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// A reset unplugs everything (virtio 1.2 §5.15.5: after a reset no
    /// memory is plugged).
    fn reset(&mut self) {
        self.active = None;
        self.core.reset();
        if self.plugged.iter().any(|&p| p) {
            self.region.discard(0, self.region.size());
            self.plugged.fill(false);
        }
    }
}

impl MutEventSubscriber for Mem {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        drain_event(&self.core.queue_events[0]);
        self.process_requests();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.core.queue_events[0], EventSet::IN)) {
            tracing::error!(vm = %self.vm_id, "virtio-mem: registering the queue event: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{Desc, TestGuest, DEADLINE};
    use std::sync::Mutex;

    const BASE: u64 = 4 << 30;

    fn mem_guest(blocks: u64) -> (TestGuest, Arc<Mutex<Mem>>) {
        let region = Arc::new(MemRegion::new(BASE, blocks * MEM_BLOCK_SIZE).unwrap());
        let dev = Arc::new(Mutex::new(Mem::new("test", region).unwrap()));
        let guest = TestGuest::new(dev.clone(), dev.clone());
        (guest, dev)
    }

    fn req(kind: u16, addr: u64, nb: u16) -> [u8; MEM_REQ_SIZE] {
        let mut r = [0u8; MEM_REQ_SIZE];
        r[0..2].copy_from_slice(&kind.to_le_bytes());
        r[8..16].copy_from_slice(&addr.to_le_bytes());
        r[16..18].copy_from_slice(&nb.to_le_bytes());
        r
    }

    /// Send one request through the queue; returns (response type, state).
    fn send(g: &mut TestGuest, request: &[u8]) -> (u16, u16) {
        let rq = g.buf(0);
        let rs = g.buf(1);
        g.write_mem(rq, request);
        g.write_mem(rs, &[0xee; MEM_RESP_SIZE]);
        let head = g.add_chain(
            0,
            &[
                Desc::r(rq, request.len() as u32),
                Desc::w(rs, MEM_RESP_SIZE as u32),
            ],
        );
        g.kick(0);
        let used = g.wait_used(0, 1, DEADLINE);
        assert_eq!(used, vec![(u32::from(head), MEM_RESP_SIZE as u32)]);
        let mut r = [0u8; MEM_RESP_SIZE];
        g.read_mem(rs, &mut r);
        (
            u16::from_le_bytes([r[0], r[1]]),
            u16::from_le_bytes([r[8], r[9]]),
        )
    }

    #[test]
    fn config_space_describes_the_region() {
        let (mut g, dev) = mem_guest(8);
        dev.lock()
            .unwrap()
            .set_requested_size(2 * MEM_BLOCK_SIZE)
            .unwrap();
        g.init_driver(&[16]).unwrap();
        let mut c = [0u8; MEM_CONFIG_SIZE];
        dev.lock().unwrap().read_config(0, &mut c);
        let u = |o: usize| u64::from_le_bytes(c[o..o + 8].try_into().unwrap());
        assert_eq!(u(0), MEM_BLOCK_SIZE);
        assert_eq!(u(16), BASE);
        assert_eq!(u(24), 8 * MEM_BLOCK_SIZE);
        assert_eq!(u(32), 8 * MEM_BLOCK_SIZE);
        assert_eq!(u(40), 0);
        assert_eq!(u(48), 2 * MEM_BLOCK_SIZE);
        // Reads past the end leave the buffer alone.
        let mut past = [0xaa; 4];
        dev.lock()
            .unwrap()
            .read_config(MEM_CONFIG_SIZE as u64, &mut past);
        assert_eq!(past, [0xaa; 4]);
    }

    #[test]
    fn plug_state_unplug_round_trip() {
        let (mut g, dev) = mem_guest(8);
        g.init_driver(&[16]).unwrap();
        dev.lock()
            .unwrap()
            .set_requested_size(3 * MEM_BLOCK_SIZE)
            .unwrap();
        assert_eq!(
            send(&mut g, &req(VIRTIO_MEM_REQ_PLUG, BASE, 2)),
            (VIRTIO_MEM_RESP_ACK, 0)
        );
        assert_eq!(dev.lock().unwrap().plugged_size(), 2 * MEM_BLOCK_SIZE);
        assert_eq!(
            send(&mut g, &req(VIRTIO_MEM_REQ_STATE, BASE, 2)).1,
            VIRTIO_MEM_STATE_PLUGGED
        );
        assert_eq!(
            send(&mut g, &req(VIRTIO_MEM_REQ_STATE, BASE, 3)).1,
            VIRTIO_MEM_STATE_MIXED
        );
        assert_eq!(
            send(
                &mut g,
                &req(VIRTIO_MEM_REQ_STATE, BASE + 4 * MEM_BLOCK_SIZE, 4)
            )
            .1,
            VIRTIO_MEM_STATE_UNPLUGGED
        );
        // Beyond the requested size: NACK, nothing changes.
        assert_eq!(
            send(
                &mut g,
                &req(VIRTIO_MEM_REQ_PLUG, BASE + 2 * MEM_BLOCK_SIZE, 2)
            )
            .0,
            VIRTIO_MEM_RESP_NACK
        );
        assert_eq!(dev.lock().unwrap().plugged_size(), 2 * MEM_BLOCK_SIZE);
        assert_eq!(
            send(
                &mut g,
                &req(VIRTIO_MEM_REQ_UNPLUG, BASE + MEM_BLOCK_SIZE, 1)
            )
            .0,
            VIRTIO_MEM_RESP_ACK
        );
        assert_eq!(dev.lock().unwrap().plugged_size(), MEM_BLOCK_SIZE);
        assert_eq!(
            send(&mut g, &req(VIRTIO_MEM_REQ_UNPLUG_ALL, 0, 0)).0,
            VIRTIO_MEM_RESP_ACK
        );
        assert_eq!(dev.lock().unwrap().plugged_size(), 0);
        let saved = dev.lock().unwrap().save();
        assert_eq!(saved.plugged, vec![false; 8]);
        assert_eq!(saved.requested_size, 3 * MEM_BLOCK_SIZE);
    }

    #[test]
    fn hostile_requests_are_errors_and_change_nothing() {
        let (mut g, dev) = mem_guest(4);
        g.init_driver(&[16]).unwrap();
        dev.lock()
            .unwrap()
            .set_requested_size(4 * MEM_BLOCK_SIZE)
            .unwrap();
        send(&mut g, &req(VIRTIO_MEM_REQ_PLUG, BASE, 1));
        let bad = [
            req(VIRTIO_MEM_REQ_PLUG, BASE + 4096, 1), // unaligned
            req(VIRTIO_MEM_REQ_PLUG, BASE - MEM_BLOCK_SIZE, 1), // below the region
            req(VIRTIO_MEM_REQ_PLUG, BASE + 3 * MEM_BLOCK_SIZE, 2), // past its end
            req(VIRTIO_MEM_REQ_PLUG, BASE + MEM_BLOCK_SIZE, 0), // empty
            req(VIRTIO_MEM_REQ_PLUG, BASE, 1),        // already plugged
            req(VIRTIO_MEM_REQ_PLUG, u64::MAX - MEM_BLOCK_SIZE + 1, 0xffff), // overflow
            req(VIRTIO_MEM_REQ_UNPLUG, BASE + MEM_BLOCK_SIZE, 1), // not plugged
            req(VIRTIO_MEM_REQ_STATE, 0, 1),          // outside
            req(0x77, BASE, 1),                       // unknown type
        ];
        for r in &bad {
            assert_eq!(send(&mut g, r).0, VIRTIO_MEM_RESP_ERROR, "{r:x?}");
        }
        // A request shorter than the header is an error too.
        assert_eq!(send(&mut g, &[0u8; 4]).0, VIRTIO_MEM_RESP_ERROR);
        // A chain without room for the response completes empty.
        let h = g.add_chain(0, &[Desc::r(g.buf(0), MEM_REQ_SIZE as u32)]);
        g.kick(0);
        assert_eq!(g.wait_used(0, 1, DEADLINE), vec![(u32::from(h), 0)]);
        // A response buffer outside guest RAM completes empty.
        let h = g.add_chain(
            0,
            &[
                Desc::r(g.buf(0), MEM_REQ_SIZE as u32),
                Desc::w(0xffff_ffff_0000, MEM_RESP_SIZE as u32),
            ],
        );
        g.kick(0);
        assert_eq!(g.wait_used(0, 1, DEADLINE), vec![(u32::from(h), 0)]);
        assert_eq!(dev.lock().unwrap().plugged_size(), MEM_BLOCK_SIZE);
        // The host side refuses sizes the region cannot hold.
        assert!(dev
            .lock()
            .unwrap()
            .set_requested_size(5 * MEM_BLOCK_SIZE)
            .is_err());
        assert!(dev.lock().unwrap().set_requested_size(4096).is_err());
    }

    #[test]
    fn unplug_discards_the_memory_and_restore_checks_the_state() {
        let region = Arc::new(MemRegion::new(BASE, 2 * MEM_BLOCK_SIZE).unwrap());
        // SAFETY (test): write through the host mapping as the guest would.
        unsafe { *(region.host_addr() as *mut u8) = 0x5a };
        let mut dev = Mem::new("test", region.clone()).unwrap();
        dev.set_requested_size(2 * MEM_BLOCK_SIZE).unwrap();
        assert_eq!(
            dev.handle(&req(VIRTIO_MEM_REQ_PLUG, BASE, 1)).0,
            VIRTIO_MEM_RESP_ACK
        );
        let mut b = [0u8; 1];
        region.read(0, &mut b).unwrap();
        assert_eq!(b[0], 0x5a);
        assert_eq!(
            dev.handle(&req(VIRTIO_MEM_REQ_UNPLUG, BASE, 1)).0,
            VIRTIO_MEM_RESP_ACK
        );
        region.read(0, &mut b).unwrap();
        assert_eq!(b[0], 0, "unplugged memory is given back");
        assert!(region.read(2 * MEM_BLOCK_SIZE - 1, &mut [0u8; 2]).is_none());

        let mut state = dev.save();
        assert!(Mem::restore("t", &state, region.clone()).is_ok());
        state.plugged.push(true);
        assert!(Mem::restore("t", &state, region.clone()).is_err());
        state.plugged.pop();
        state.requested_size = 3 * MEM_BLOCK_SIZE;
        assert!(Mem::restore("t", &state, region.clone()).is_err());
        let other = Arc::new(MemRegion::new(BASE, 4 * MEM_BLOCK_SIZE).unwrap());
        assert!(Mem::restore("t", &dev.save(), other).is_err());
        assert!(MemRegion::new(BASE + 4096, MEM_BLOCK_SIZE).is_err());
        assert!(MemRegion::new(BASE, 0).is_err());
    }
}
