//! virtio-fs (file system device, virtio 1.2 §5.11) served by a vhost-user
//! backend (virtiofsd) through a shadow virtqueue.
//!
//! The guest's queues are served by the VMM itself (virtio-queue): each
//! request is copied into a per-VM bounce memfd, posted there on a shadow
//! queue the backend drives, and its reply copied back (see [`shadow`]). The
//! backend's memory table holds only the bounce memfd: it never maps guest
//! RAM, so guest RAM may be a MAP_PRIVATE copy-on-write mapping of a template
//! file (a clone) and a compromised backend sees only what the guest sent it.
//!
//! The guest negotiates with the VMM, the VMM with the backend: the two
//! feature sets are independent, and the backend's whole setup (owner,
//! features, memory table, vrings, kick and call fds) happens when the device
//! is created. A clone therefore only connects its own fresh backend; the
//! guest-side queue state comes from the snapshot.
//!
//! When the backend's socket hangs up, every request in flight and every
//! later one is completed with a FUSE `-EIO` reply: the guest never hangs.

pub mod daemon;
pub mod pool;
pub mod shadow;
pub mod subshare;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, Permissions,
};
use vmm_sys_util::epoll::EventSet;

use super::{
    drain_event, ActivateError, ActiveState, Interrupt, VirtioCore, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use shadow::{complete_with_error, ShadowLayout, ShadowQueue};

/// Device ID of a file system device (virtio 1.2 §5, §5.11).
pub const VIRTIO_ID_FS: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_FS;
/// Bytes of the `tag` field (virtio 1.2 §5.11.4).
pub const TAG_LEN: usize = 36;
/// Request queues offered (`num_request_queues`, virtio 1.2 §5.11.4).
pub const NUM_REQUEST_QUEUES: u32 = 1;
/// Size of each guest queue (hiprio, then the request queue).
pub const GUEST_QUEUE_SIZE: u16 = 128;
/// Requests in flight to the backend per request queue.
pub const REQUEST_SLOTS: u16 = 16;
/// Largest request plus reply on a request queue: 1 MiB of data (Linux's
/// largest FUSE read or write) and room for the headers.
pub const REQUEST_SLOT_SIZE: u32 = (1 << 20) + 64 * 1024;
/// Requests in flight on the hiprio queue (FORGET, INTERRUPT: small).
pub const HIPRIO_SLOTS: u16 = 8;
/// Largest hiprio request.
pub const HIPRIO_SLOT_SIZE: u32 = 4096;

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty, too long or has a NUL.
    #[error("virtio-fs tag {tag:?}: {reason}")]
    Tag {
        /// The tag.
        tag: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The bounce memfd could not be created or mapped.
    #[error("virtio-fs bounce region: {0}")]
    Bounce(String),
    /// The event fds or queues could not be created.
    #[error("virtio-fs queues: {0}")]
    Queues(#[source] std::io::Error),
    /// Connecting to the backend's socket failed.
    #[error("connecting to vhost-user socket {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// errno.
        source: std::io::Error,
    },
    /// A vhost-user request failed.
    #[error("vhost-user {step} on {path}: {source}")]
    Vhost {
        /// The request.
        step: &'static str,
        /// The socket.
        path: PathBuf,
        /// What the backend or the transport said.
        source: vhost::Error,
    },
    /// The backend lacks a feature the shadow queue needs.
    #[error("vhost-user backend on {path} offers features {offered:#x}, needs {needed:#x}")]
    BackendFeatures {
        /// The socket.
        path: PathBuf,
        /// What it offers.
        offered: u64,
        /// What is needed.
        needed: u64,
    },
}

/// What a snapshot keeps of the device: its tag and the guest requests the
/// backend held (completed with an error on restore, so none is lost).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsState {
    /// The tag.
    pub tag: String,
    /// Requests in flight: (queue index, head, unique, writable buffers).
    pub in_flight: Vec<SavedRequest>,
}

/// A guest request in flight at snapshot time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRequest {
    /// Guest queue index.
    pub queue: u16,
    /// Head of the guest chain.
    pub head: u16,
    /// FUSE unique of the request.
    pub unique: u64,
    /// The guest's writable buffers (address, length).
    pub writable: Vec<(u64, u32)>,
}

/// The virtio-fs device.
pub struct Fs {
    vm_id: String,
    tag: String,
    core: VirtioCore,
    active: Option<ActiveState>,
    bounce: GuestMemoryMmap,
    shadows: Vec<ShadowQueue>,
    /// The vhost-user connection (`None` in unit tests, which drive the
    /// shadow rings themselves).
    _frontend: Option<Frontend>,
    /// Becomes readable or hangs up when the backend goes away.
    backend_fd: RawFd,
    backend_alive: bool,
    restored: Vec<SavedRequest>,
}

fn check_tag(tag: &str) -> Result<(), FsError> {
    let err = |reason| {
        Err(FsError::Tag {
            tag: tag.to_owned(),
            reason,
        })
    };
    if tag.is_empty() {
        return err("empty");
    }
    if tag.len() > TAG_LEN {
        return err("longer than 36 bytes");
    }
    if tag.contains('\0') {
        return err("contains a NUL byte");
    }
    Ok(())
}

/// The shadow queue layouts: hiprio, then the request queue, one after the other.
fn layouts() -> [ShadowLayout; 2] {
    let hiprio = ShadowLayout {
        base: 0,
        slots: HIPRIO_SLOTS,
        slot_size: HIPRIO_SLOT_SIZE,
    };
    let request = ShadowLayout {
        base: hiprio.end(),
        slots: REQUEST_SLOTS,
        slot_size: REQUEST_SLOT_SIZE,
    };
    [hiprio, request]
}

/// A memfd of `size` bytes mapped shared at address 0 of its own address space.
fn bounce_region(size: u64) -> Result<GuestMemoryMmap, FsError> {
    let name = c"minivmm-virtiofs-bounce";
    // SAFETY: a NUL-terminated name and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(FsError::Bounce(format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: a fresh fd that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| FsError::Bounce(format!("ftruncate to {size}: {e}")))?;
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        size as usize,
        Some(FileOffset::new(file, 0)),
    )])
    .map_err(|e| FsError::Bounce(format!("mmap of {size} bytes: {e}")))
}

impl Fs {
    /// A device with `tag`, connected to the vhost-user backend listening on
    /// `socket` and fully set up with it.
    pub fn new(vm_id: &str, tag: &str, socket: &Path) -> Result<Fs, FsError> {
        check_tag(tag)?;
        let (bounce, shadows) = Self::shadow_rings()?;
        let frontend = connect_backend(socket, &bounce, &shadows)?;
        let backend_fd = frontend.as_raw_fd();
        let mut fs = Self::assemble(vm_id, tag, bounce, shadows, backend_fd)?;
        fs._frontend = Some(frontend);
        tracing::info!(vm = %vm_id, tag, socket = %socket.display(), "virtio-fs backend connected");
        Ok(fs)
    }

    /// The device of a restored VM: `state`'s tag, a fresh backend on
    /// `socket`; requests that were in flight are failed once the device is
    /// active again.
    pub fn restore(vm_id: &str, state: &FsState, socket: &Path) -> Result<Fs, FsError> {
        let mut fs = Self::new(vm_id, &state.tag, socket)?;
        fs.restored = state.in_flight.clone();
        Ok(fs)
    }

    /// The bounce region and the shadow queues in it.
    fn shadow_rings() -> Result<(GuestMemoryMmap, Vec<ShadowQueue>), FsError> {
        let layouts = layouts();
        let bounce = bounce_region(layouts[1].end())?;
        let shadows = layouts
            .iter()
            .map(|l| ShadowQueue::new(*l, &bounce))
            .collect::<Result<Vec<_>, _>>()
            .map_err(FsError::Queues)?;
        Ok((bounce, shadows))
    }

    fn assemble(
        vm_id: &str,
        tag: &str,
        bounce: GuestMemoryMmap,
        shadows: Vec<ShadowQueue>,
        backend_fd: RawFd,
    ) -> Result<Fs, FsError> {
        let core = VirtioCore::new(
            1 << VIRTIO_F_VERSION_1,
            &[GUEST_QUEUE_SIZE, GUEST_QUEUE_SIZE],
        )
        .map_err(FsError::Queues)?;
        Ok(Fs {
            vm_id: vm_id.to_owned(),
            tag: tag.to_owned(),
            core,
            active: None,
            bounce,
            shadows,
            _frontend: None,
            backend_fd,
            backend_alive: true,
            restored: Vec::new(),
        })
    }

    /// The tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Whether the backend is still connected.
    pub fn backend_alive(&self) -> bool {
        self.backend_alive
    }

    /// What a snapshot keeps (vCPUs paused).
    pub fn save(&self) -> FsState {
        let mut in_flight = Vec::new();
        for (q, shadow) in self.shadows.iter().enumerate() {
            for r in shadow.in_flight() {
                if let Some(head) = r.head {
                    in_flight.push(SavedRequest {
                        queue: q as u16,
                        head,
                        unique: r.unique,
                        writable: r.writable.clone(),
                    });
                }
            }
        }
        if !in_flight.is_empty() {
            tracing::warn!(vm = %self.vm_id, count = in_flight.len(), "virtio-fs requests in flight at snapshot: they fail on restore");
        }
        FsState {
            tag: self.tag.clone(),
            in_flight,
        }
    }

    /// Serve queue `q`: the backend's replies, then the guest's new requests.
    fn process_queue(&mut self, q: usize) {
        let Some(active) = &self.active else { return };
        let (Some(queue), Some(shadow)) = (self.core.queues.get_mut(q), self.shadows.get_mut(q))
        else {
            return;
        };
        let done = shadow.take_backend_replies(queue, &active.mem, &self.bounce);
        let new = shadow.take_guest_requests(queue, &active.mem, &self.bounce, self.backend_alive);
        if new.posted > 0 {
            shadow.kick_backend();
        }
        if done.completed + new.completed > 0
            && queue.needs_notification(&active.mem).unwrap_or(true)
        {
            active.interrupt.signal_used_queue();
        }
    }

    /// The backend went away: fail what it held and everything after.
    fn backend_lost(&mut self) {
        if !self.backend_alive {
            return;
        }
        self.backend_alive = false;
        tracing::error!(vm = %self.vm_id, tag = %self.tag, "virtio-fs backend hung up: requests fail with EIO from now on");
        let Some(active) = &self.active else {
            for s in &mut self.shadows {
                s.detach_guest();
            }
            return;
        };
        for q in 0..self.core.queues.len() {
            let queue = &mut self.core.queues[q];
            let shadow = &mut self.shadows[q];
            // Replies it managed to post before it went still count.
            let done = shadow.take_backend_replies(queue, &active.mem, &self.bounce);
            let failed = shadow.fail_in_flight(queue, &active.mem);
            if done.completed + failed.completed > 0 {
                active.interrupt.signal_used_queue();
            }
        }
        for q in 0..self.core.queues.len() {
            self.process_queue(q);
        }
    }
}

/// Connect to the backend and set it up on the bounce region: owner,
/// features, protocol features, memory table (only the bounce memfd), and
/// each shadow vring with its kick and call fds.
fn connect_backend(
    socket: &Path,
    bounce: &GuestMemoryMmap,
    shadows: &[ShadowQueue],
) -> Result<Frontend, FsError> {
    let stream = UnixStream::connect(socket).map_err(|source| FsError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    let mut frontend = Frontend::from_stream(stream, shadows.len() as u64);
    let vhost = |step| {
        move |source| FsError::Vhost {
            step,
            path: socket.to_path_buf(),
            source,
        }
    };
    frontend.set_owner().map_err(vhost("SET_OWNER"))?;
    let offered = frontend.get_features().map_err(vhost("GET_FEATURES"))?;
    let needed = 1u64 << VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if offered & needed != needed {
        return Err(FsError::BackendFeatures {
            path: socket.to_path_buf(),
            offered,
            needed,
        });
    }
    frontend
        .set_features(needed)
        .map_err(vhost("SET_FEATURES"))?;
    let protocol = frontend
        .get_protocol_features()
        .map_err(vhost("GET_PROTOCOL_FEATURES"))?;
    frontend
        .set_protocol_features(
            protocol & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK),
        )
        .map_err(vhost("SET_PROTOCOL_FEATURES"))?;
    let region = bounce
        .iter()
        .next()
        .ok_or_else(|| FsError::Bounce("no region".into()))?;
    let info =
        VhostUserMemoryRegionInfo::from_guest_region(region).map_err(vhost("SET_MEM_TABLE"))?;
    frontend
        .set_mem_table(&[info])
        .map_err(vhost("SET_MEM_TABLE"))?;
    let host = |addr: u64| -> Result<u64, FsError> {
        bounce
            .get_host_address(GuestAddress(addr))
            .map(|p| p as u64)
            .map_err(|e| FsError::Bounce(format!("address {addr:#x}: {e}")))
    };
    for (i, s) in shadows.iter().enumerate() {
        let l = s.layout();
        frontend
            .set_vring_num(i, l.queue_size())
            .map_err(vhost("SET_VRING_NUM"))?;
        let config = VringConfigData {
            queue_max_size: l.queue_size(),
            queue_size: l.queue_size(),
            flags: 0,
            desc_table_addr: host(l.desc())?,
            used_ring_addr: host(l.used())?,
            avail_ring_addr: host(l.avail())?,
            log_addr: None,
        };
        frontend
            .set_vring_addr(i, &config)
            .map_err(vhost("SET_VRING_ADDR"))?;
        frontend
            .set_vring_base(i, 0)
            .map_err(vhost("SET_VRING_BASE"))?;
        frontend
            .set_vring_call(i, &s.call)
            .map_err(vhost("SET_VRING_CALL"))?;
        frontend
            .set_vring_kick(i, &s.kick)
            .map_err(vhost("SET_VRING_KICK"))?;
        frontend
            .set_vring_enable(i, true)
            .map_err(vhost("SET_VRING_ENABLE"))?;
    }
    Ok(frontend)
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn core(&self) -> &VirtioCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut VirtioCore {
        &mut self.core
    }

    /// `tag[36]` then `le32 num_request_queues` (virtio 1.2 §5.11.4).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; TAG_LEN + 4];
        config[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    /// The configuration space is read-only (virtio 1.2 §5.11.4).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        // Requests the backend of the snapshotted VM held: answered with an
        // error (its successor never saw them).
        for r in std::mem::take(&mut self.restored) {
            if let Some(queue) = self.core.queues.get_mut(usize::from(r.queue)) {
                let writable: Vec<(u64, u32)> = r
                    .writable
                    .iter()
                    .copied()
                    .filter(|&(a, l)| {
                        GuestMemory::check_range(
                            &mem,
                            GuestAddress(a),
                            l as usize,
                            Permissions::Write,
                        )
                    })
                    .collect();
                if r.head < queue.size() {
                    complete_with_error(queue, &mem, r.head, r.unique, &writable);
                }
            }
            interrupt.signal_used_queue();
        }
        self.active = Some(ActiveState { mem, interrupt });
        for evt in &self.core.queue_events {
            if let Err(e) = evt.write(1) {
                tracing::warn!(vm = %self.vm_id, "virtio-fs initial kick failed: {e}");
            }
        }
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.core.reset();
        // The backend keeps its shadow rings; replies to the old requests
        // are dropped when they come.
        for s in &mut self.shadows {
            s.detach_guest();
        }
    }
}

impl MutEventSubscriber for Fs {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.backend_fd {
            if let Err(e) = ops.remove(events) {
                tracing::warn!(vm = %self.vm_id, "virtio-fs: unregistering the backend socket: {e}");
            }
            self.backend_lost();
            return;
        }
        for q in 0..self.core.queues.len() {
            if fd == self.core.queue_events[q].as_raw_fd() {
                drain_event(&self.core.queue_events[q]);
                self.process_queue(q);
                return;
            }
            if fd == self.shadows[q].call.as_raw_fd() {
                drain_event(&self.shadows[q].call);
                self.process_queue(q);
                return;
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let mut fds: Vec<RawFd> = self
            .core
            .queue_events
            .iter()
            .map(|e| e.as_raw_fd())
            .collect();
        fds.extend(self.shadows.iter().map(|s| s.call.as_raw_fd()));
        for fd in fds {
            if let Err(e) = ops.add(Events::with_data_raw(fd, 0, EventSet::IN)) {
                tracing::error!(vm = %self.vm_id, "virtio-fs: registering fd {fd}: {e}");
            }
        }
        // The backend never talks unasked after setup: any event on its
        // socket is its end.
        let backend = EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP;
        if let Err(e) = ops.add(Events::with_data_raw(self.backend_fd, 0, backend)) {
            tracing::error!(vm = %self.vm_id, "virtio-fs: registering the backend socket: {e}");
        }
    }
}

#[cfg(test)]
mod tests;
