//! virtio-vsock (socket device, virtio 1.2 §5.10), hybrid over unix sockets.
//!
//! The guest has CID `guest_cid`; the host is CID 2. Host programs reach
//! guest port P by connecting to the VM's socket path and writing
//! `CONNECT P\n`; once the guest accepts they read `OK <host port>\n` and the
//! stream is theirs. A guest connecting to host port P reaches whoever
//! listens on `<socket path>_P`. The `muxer` module is the host side and
//! `connection` does flow control.
//!
//! Queues: rx (device to guest packets), tx (guest to device packets), event
//! (transport reset notifications) — virtio 1.2 §5.10.2.

mod connection;
mod muxer;
pub mod packet;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use std::io::{Read, Write};
use std::num::Wrapping;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_queue::{QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use self::muxer::Muxer;
use self::packet::{PacketHeader, EVENT_TRANSPORT_RESET, HDR_LEN};
use super::{
    drain_event, ActivateError, ActiveState, Interrupt, VirtioCore, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_ID_VSOCK,
};

pub use self::connection::{CONN_BUF_ALLOC, CONN_TIMEOUT};
pub use self::muxer::{HOST_PORT_BASE, MAX_CONNECTIONS, MAX_HOST_CONNECTIONS};

/// Index of the rx queue (virtio 1.2 §5.10.2).
pub const RX_QUEUE: usize = 0;
/// Index of the tx queue (virtio 1.2 §5.10.2).
pub const TX_QUEUE: usize = 1;
/// Index of the event queue (virtio 1.2 §5.10.2).
pub const EVENT_QUEUE: usize = 2;
/// Size of each queue.
pub const VSOCK_QUEUE_SIZE: u16 = 256;
/// Largest payload of one packet, either way (Linux's
/// VIRTIO_VSOCK_MAX_PKT_BUF_SIZE); longer guest packets are reset.
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;
/// The guest CID Firecracker and Cloud Hypervisor use by default.
pub const DEFAULT_GUEST_CID: u64 = 3;
/// Event-loop data tag of the muxer's epoll fd (queue events use their index).
const MUXER_EVENT: u32 = 3;

/// What a snapshot keeps of the device (the queues are in the transport's
/// state; connections do not survive a snapshot).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's CID.
    pub guest_cid: u64,
}

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0-2 and 0xffffffff are reserved; CIDs are 32-bit in practice.
    #[error("guest CID {0} is reserved or out of range (3..=0xfffffffe)")]
    InvalidCid(u64),
    /// The host socket could not be created.
    #[error("binding the vsock socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Queue or event fd creation failed.
    #[error("creating vsock queues: {0}")]
    Queues(#[source] std::io::Error),
}

/// The vsock device.
pub struct Vsock {
    vm_id: String,
    guest_cid: u64,
    core: VirtioCore,
    active: Option<ActiveState>,
    muxer: Muxer,
    /// Payload staging, MAX_PKT_PAYLOAD bytes.
    buf: Vec<u8>,
    reset_event_pending: bool,
    /// The event queue's avail index when a transport reset was delivered,
    /// until the driver posts a new event buffer (drivers re-post after
    /// handling the event). Until then nothing is put on rx: Linux handles
    /// rx and event work independently, and a connection it accepted before
    /// handling the reset would be torn down by it.
    reset_unacked_at: Option<Wrapping<u16>>,
    watch: ConnectionWatch,
}

/// The number of open connections of a vsock device, published after every
/// pass of its event handler, for the host to wait on (with a deadline).
#[derive(Clone, Default)]
pub struct ConnectionWatch {
    inner: Arc<(Mutex<usize>, Condvar)>,
}

impl ConnectionWatch {
    fn publish(&self, count: usize) {
        let (lock, cond) = &*self.inner;
        let mut c = lock.lock().unwrap_or_else(|p| p.into_inner());
        if *c != count {
            *c = count;
            cond.notify_all();
        }
    }

    /// Wait until no connection is open, or `timeout` passes; returns the
    /// number still open (0: idle).
    pub fn wait_idle(&self, timeout: Duration) -> usize {
        self.wait_until(|n| n == 0, timeout)
    }

    /// Wait until the number of open connections satisfies `pred`, or
    /// `timeout` passes; returns the last number published.
    pub fn wait_until(&self, pred: impl Fn(usize) -> bool, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.inner;
        let mut c = lock.lock().unwrap_or_else(|p| p.into_inner());
        while !pred(*c) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            c = cond
                .wait_timeout(c, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *c
    }
}

impl Vsock {
    /// A device for a guest with `guest_cid`, listening at `uds_path` (which
    /// must not exist; it is removed when the device is dropped).
    pub fn new(vm_id: &str, guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if !(3..=0xffff_fffe).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let core = VirtioCore::new(1 << VIRTIO_F_VERSION_1, &[VSOCK_QUEUE_SIZE; 3])
            .map_err(VsockError::Queues)?;
        let muxer = Muxer::new(vm_id, guest_cid, uds_path).map_err(|source| VsockError::Bind {
            path: uds_path.to_owned(),
            source,
        })?;
        Ok(Vsock {
            vm_id: vm_id.to_owned(),
            guest_cid,
            core,
            active: None,
            muxer,
            buf: vec![0; MAX_PKT_PAYLOAD],
            reset_event_pending: false,
            reset_unacked_at: None,
            watch: ConnectionWatch::default(),
        })
    }

    /// Rebuild the device from a snapshot, at this VM's own socket path.
    pub fn restore(vm_id: &str, state: &VsockState, uds_path: &Path) -> Result<Self, VsockError> {
        Self::new(vm_id, state.guest_cid, uds_path)
    }

    /// The device's state for a snapshot.
    pub fn save(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid,
        }
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Number of open connections (including host clients still sending
    /// their `CONNECT` line).
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// A handle to wait for the device's connections to be gone.
    pub fn connection_watch(&self) -> ConnectionWatch {
        self.watch.clone()
    }

    /// Drop every connection and tell the guest with a
    /// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET event (virtio 1.2 §5.10.6.8), e.g.
    /// after a snapshot restore. Delivered as soon as the guest has an event
    /// buffer available.
    pub fn send_transport_reset(&mut self) {
        self.muxer.drop_connections();
        self.watch.publish(0);
        self.reset_event_pending = true;
        if self.process_event_queue() {
            self.signal_used();
        }
    }

    fn signal_used(&self) {
        if let Some(active) = &self.active {
            active.interrupt.signal_used_queue();
        }
    }

    /// Notify the driver if `queue` took used buffers and wants to know.
    fn needs_notification(&mut self, queue: usize) -> bool {
        let Some(active) = &self.active else {
            return false;
        };
        self.core.queues[queue]
            .needs_notification(&active.mem)
            .unwrap_or(true)
    }

    /// Reschedule a queue whose batch limit was hit.
    fn kick_self(&self, queue: usize) {
        if let Err(e) = self.core.queue_events[queue].write(1) {
            tracing::warn!(vm = %self.vm_id, "vsock: rescheduling queue {queue}: {e}");
        }
    }

    /// Handle every packet the guest queued on tx; returns whether any
    /// buffer was used.
    fn process_tx(&mut self) -> bool {
        let Some(active) = &self.active else {
            return false;
        };
        let queue = &mut self.core.queues[TX_QUEUE];
        let mut used = 0u16;
        let mut batch_full = false;
        while let Some(chain) = queue.pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            match Reader::new(&active.mem, chain) {
                Ok(mut reader) => {
                    handle_tx_packet(&self.vm_id, &mut self.muxer, &mut self.buf, &mut reader)
                }
                Err(e) => tracing::debug!(vm = %self.vm_id, "vsock: bad tx chain {head}: {e}"),
            }
            if let Err(e) = queue.add_used(&active.mem, head, 0) {
                crate::warn_limited!(vm = %self.vm_id, "vsock: tx used ring: {e}");
                break;
            }
            used += 1;
            if used >= queue.size() {
                batch_full = true;
                break;
            }
        }
        self.muxer.sync();
        if batch_full {
            self.kick_self(TX_QUEUE);
        }
        used > 0 && self.needs_notification(TX_QUEUE)
    }

    /// Whether the driver has handled the last transport reset (or none is
    /// outstanding): it made a new event buffer available since.
    fn reset_acknowledged(&mut self) -> bool {
        let (Some(at), Some(active)) = (self.reset_unacked_at, &self.active) else {
            return true;
        };
        match self.core.queues[EVENT_QUEUE].avail_idx(&active.mem, Ordering::Acquire) {
            Ok(idx) if idx == at => false,
            _ => {
                self.reset_unacked_at = None;
                true
            }
        }
    }

    /// Move packets for the guest into rx buffers; returns whether any
    /// buffer was used.
    fn process_rx(&mut self) -> bool {
        if !self.reset_acknowledged() {
            return false;
        }
        let Some(active) = &self.active else {
            return false;
        };
        let queue = &mut self.core.queues[RX_QUEUE];
        let mut used = 0u16;
        let mut batch_full = false;
        while self.muxer.has_rx() {
            let Some(chain) = queue.pop_descriptor_chain(&active.mem) else {
                break;
            };
            let head = chain.head_index();
            let mut writer = match Writer::new(&active.mem, chain) {
                Ok(w) if w.available_bytes() >= HDR_LEN => w,
                // Unusable buffer: give it back empty and try the next one.
                other => {
                    if let Err(e) = other {
                        tracing::debug!(vm = %self.vm_id, "vsock: bad rx chain {head}: {e}");
                    }
                    if let Err(e) = queue.add_used(&active.mem, head, 0) {
                        crate::warn_limited!(vm = %self.vm_id, "vsock: rx used ring: {e}");
                        break;
                    }
                    used += 1;
                    continue;
                }
            };
            let room = (writer.available_bytes() - HDR_LEN).min(MAX_PKT_PAYLOAD);
            let Some((hdr, len)) = self.muxer.next_rx_packet(&mut self.buf[..room]) else {
                queue.go_to_previous_position();
                break;
            };
            let written = writer
                .write_all(&hdr.to_bytes())
                .and_then(|()| writer.write_all(&self.buf[..len]));
            if let Err(e) = written {
                crate::warn_limited!(vm = %self.vm_id, "vsock: writing an rx packet: {e}");
            }
            if let Err(e) = queue.add_used(&active.mem, head, writer.bytes_written() as u32) {
                crate::warn_limited!(vm = %self.vm_id, "vsock: rx used ring: {e}");
                break;
            }
            used += 1;
            if used >= queue.size() {
                batch_full = true;
                break;
            }
        }
        self.muxer.sync();
        if batch_full {
            self.kick_self(RX_QUEUE);
        }
        used > 0 && self.needs_notification(RX_QUEUE)
    }

    /// Deliver a pending transport reset event; returns whether any buffer
    /// was used.
    fn process_event_queue(&mut self) -> bool {
        if !self.reset_event_pending {
            return false;
        }
        let Some(active) = &self.active else {
            return false;
        };
        let queue = &mut self.core.queues[EVENT_QUEUE];
        let mut used = 0u16;
        while let Some(chain) = queue.pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            let delivered = match Writer::new(&active.mem, chain) {
                Ok(mut w) if w.available_bytes() >= 4 => {
                    w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()).is_ok()
                }
                _ => false,
            };
            let len = if delivered { 4 } else { 0 };
            if let Err(e) = queue.add_used(&active.mem, head, len) {
                crate::warn_limited!(vm = %self.vm_id, "vsock: event used ring: {e}");
                break;
            }
            used += 1;
            if delivered {
                self.reset_event_pending = false;
                self.reset_unacked_at = queue.avail_idx(&active.mem, Ordering::Acquire).ok();
                break;
            }
            if used >= queue.size() {
                break;
            }
        }
        used > 0 && self.needs_notification(EVENT_QUEUE)
    }
}

/// Parse one guest packet and hand it to the muxer. Too-short headers are
/// ignored; bad lengths are answered with RST.
fn handle_tx_packet(vm_id: &str, muxer: &mut Muxer, buf: &mut [u8], reader: &mut Reader<'_>) {
    let mut raw = [0u8; HDR_LEN];
    if reader.available_bytes() < HDR_LEN || reader.read_exact(&mut raw).is_err() {
        tracing::debug!(vm = %vm_id, "vsock: tx packet shorter than its header; ignored");
        return;
    }
    let hdr = PacketHeader::from_bytes(&raw);
    let len = hdr.len as usize;
    if len > MAX_PKT_PAYLOAD || len > reader.available_bytes() {
        tracing::debug!(vm = %vm_id, "vsock: tx packet length {len} is bad");
        muxer.reject_packet(&hdr);
        return;
    }
    let payload = &mut buf[..len];
    if reader.read_exact(payload).is_err() {
        muxer.reject_packet(&hdr);
        return;
    }
    muxer.handle_guest_packet(&hdr, payload);
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn core(&self) -> &VirtioCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut VirtioCore {
        &mut self.core
    }

    /// `struct virtio_vsock_config { le64 guest_cid; }` (virtio 1.2 §5.10.4).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.guest_cid.to_le_bytes();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if let Some(src) = start
            .checked_add(data.len())
            .and_then(|end| config.get(start..end))
        {
            data.copy_from_slice(src);
        }
    }

    /// The configuration is read-only.
    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(vm = %self.vm_id, "vsock: config write at {offset:#x} ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        self.muxer.start().map_err(ActivateError::Backend)?;
        self.active = Some(ActiveState { mem, interrupt });
        if self.process_event_queue() {
            self.signal_used();
        }
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.muxer.stop();
        self.reset_event_pending = false;
        self.reset_unacked_at = None;
        self.core.reset();
    }
}

impl MutEventSubscriber for Vsock {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            MUXER_EVENT => self.muxer.handle_host_events(),
            q => match self.core.queue_events.get(q as usize) {
                Some(evt) => drain_event(evt),
                None => tracing::warn!(vm = %self.vm_id, "vsock: unexpected event {q}"),
            },
        }
        if self.active.is_none() {
            self.watch.publish(self.muxer.connection_count());
            return;
        }
        // Every pass does all the work: guest packets first (they may owe
        // replies), then packets for the guest, then the event queue.
        let mut notify = self.process_tx();
        notify |= self.process_rx();
        notify |= self.process_event_queue();
        if notify {
            self.signal_used();
        }
        self.watch.publish(self.muxer.connection_count());
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (index, evt) in (0u32..).zip(&self.core.queue_events) {
            if let Err(e) = ops.add(Events::with_data(evt, index, EventSet::IN)) {
                tracing::error!(vm = %self.vm_id, "vsock: registering queue {index}: {e}");
            }
        }
        let fd = self.muxer.epoll_fd();
        if let Err(e) = ops.add(Events::with_data_raw(fd, MUXER_EVENT, EventSet::IN)) {
            tracing::error!(vm = %self.vm_id, "vsock: registering the host socket set: {e}");
        }
    }
}
