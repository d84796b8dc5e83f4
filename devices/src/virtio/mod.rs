//! Virtio devices behind the virtio-mmio transport (virtio 1.2 §4.2, modern
//! register layout only), and the event loop their work runs on.
//!
//! A device ([`VirtioDevice`]) owns its queues, the event fds the guest's
//! queue notifications arrive on, and whatever host resources it needs. The
//! transport ([`MmioTransport`]) owns the registers the guest sees and drives
//! the device through feature negotiation, activation and reset. vCPU threads
//! only touch registers; a device's queue processing runs on an
//! [`EventLoop`] thread, woken by the queue-notify event fds (KVM ioeventfds),
//! and it interrupts the guest through an [`Interrupt`] (a KVM irqfd).
//!
//! # Wiring a device into a VM (the VMM does this, in this order)
//!
//! For the n-th virtio device, at `base = 0xd000_0000 + n * 0x1000` on IOAPIC
//! pin (GSI) `irq = 5 + n`:
//!
//! ```no_run
//! # use std::sync::{Arc, Mutex};
//! # use devices::virtio::{kernel_cmdline_arg, EventLoop, MmioTransport, Rng, VirtioDevice, Vsock};
//! # use devices::virtio::{MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
//! # use kvm_ioctls::{IoEventAddress, Kvm};
//! # use vm_memory::{GuestAddress, GuestMemoryMmap};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let (vm_id, uds_path) = ("vm0", std::path::Path::new("/tmp/vm0.vsock"));
//! # let vm_fd = Kvm::new()?.create_vm()?; // with its irqchip, in a real VMM
//! # let guest_mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)])?;
//! # let mut mmio_bus = Vec::new(); // the VMM's MMIO bus: (base, size, device)
//! # let mut cmdline = Vec::new();
//! let mut event_loop = EventLoop::new()?;                      // one per VM
//! let rng = Arc::new(Mutex::new(Rng::new(vm_id)?));
//! let vsock = Arc::new(Mutex::new(Vsock::new(vm_id, 3, uds_path)?));
//! let devices: [Arc<Mutex<dyn VirtioDevice>>; 2] = [rng.clone(), vsock.clone()];
//! for (n, dev) in (0u64..).zip(devices) {
//!     let (base, irq) = (0xd000_0000 + n * MMIO_WINDOW_SIZE, 5 + n as u32);
//!     let transport = MmioTransport::new(vm_id, guest_mem.clone(), dev)?;
//!     vm_fd.register_irqfd(transport.irq_evt(), irq)?;             // edge-triggered
//!     for (queue, evt) in transport.queue_notify_evts()? {
//!         let addr = IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET);
//!         vm_fd.register_ioevent(&evt, &addr, u32::from(queue))?;  // 4-byte datamatch
//!     }
//!     mmio_bus.push((base, MMIO_WINDOW_SIZE, Arc::new(Mutex::new(transport))));
//!     cmdline.push(kernel_cmdline_arg(base, irq));                 // virtio_mmio.device=4K@...
//! }
//! event_loop.add_subscriber(rng);          // the device, not the transport
//! event_loop.add_subscriber(vsock.clone());
//! let loop_handle = event_loop.start(vm_id)?;   // dropping the handle stops the thread
//! # drop(loop_handle);
//! # Ok(())
//! # }
//! ```
//!
//! After a snapshot restore, build the devices the same way but with
//! [`MmioTransport::restore`] (and [`Vsock::restore`]), then call
//! [`Vsock::send_transport_reset`] so the guest drops its old connections.

pub mod event_loop;
pub mod fs;
pub mod interrupt;
pub mod mem;
pub mod mmio;
pub mod rng;
pub mod vsock;

#[cfg(test)]
mod proptests;
#[cfg(test)]
pub(crate) mod test_utils;

use event_manager::MutEventSubscriber;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use event_loop::{EventLoop, EventLoopError, EventLoopHandle};
pub use fs::{Fs, FsError, FsState};
pub use interrupt::Interrupt;
pub use mem::{Mem, MemError, MemRegion, MemState, MEM_BLOCK_SIZE};
pub use mmio::{
    kernel_cmdline_arg, MmioError, MmioTransport, MmioTransportState, QueueConfigState,
    MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET,
};
pub use rng::Rng;
pub use vsock::{Vsock, VsockError, VsockState};

/// Device status bits written by the driver (virtio 1.2 §2.1).
pub mod status {
    use virtio_bindings::virtio_config as c;

    /// The guest noticed the device (virtio 1.2 §2.1).
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest has a driver for the device (virtio 1.2 §2.1).
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    /// The driver is set up and ready to drive the device (virtio 1.2 §2.1).
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    /// Feature negotiation is complete (virtio 1.2 §2.1).
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device hit an error it cannot recover from without a reset (virtio 1.2 §2.1).
    pub const DEVICE_NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up on the device (virtio 1.2 §2.1).
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// Feature bit: the device complies with virtio 1.x (virtio 1.2 §6). The
/// modern MMIO transport requires it.
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Device ID of an entropy device (virtio 1.2 §5, §5.4).
pub const VIRTIO_ID_RNG: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
/// Device ID of a socket device (virtio 1.2 §5, §5.10).
pub const VIRTIO_ID_VSOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;

/// Errors activating a device when the driver sets DRIVER_OK.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A queue is not ready or its rings are not inside guest RAM.
    #[error("queue {index} is not ready or not inside guest memory")]
    InvalidQueue {
        /// Index of the offending queue.
        index: usize,
    },
    /// The device was already active.
    #[error("device is already active")]
    AlreadyActive,
    /// The device could not set up its host side.
    #[error("device backend failed: {0}")]
    Backend(#[source] std::io::Error),
}

/// A virtio device model, as the transport and the event loop see it.
///
/// The device owns its queues from creation (the transport configures them
/// through [`queues_mut`](Self::queues_mut) while the driver sets them up) and
/// one notify event fd per queue. Its queue work runs in
/// [`MutEventSubscriber::process`] on an [`EventLoop`] thread; `init` must
/// register every queue event fd (and the device's own fds).
pub trait VirtioDevice: MutEventSubscriber + Send {
    /// Device ID (virtio 1.2 §5).
    fn device_type(&self) -> u32;
    /// The features and queues every device keeps the same way.
    fn core(&self) -> &VirtioCore;
    /// Mutable access to [`VirtioDevice::core`].
    fn core_mut(&mut self) -> &mut VirtioCore;
    /// Feature bits the device offers.
    fn avail_features(&self) -> u64 {
        self.core().avail_features
    }
    /// Feature bits the driver accepted (0 until FEATURES_OK).
    fn acked_features(&self) -> u64 {
        self.core().acked_features
    }
    /// Record the features the driver accepted (a subset of `avail_features`).
    fn set_acked_features(&mut self, features: u64) {
        let core = self.core_mut();
        core.acked_features = features & core.avail_features;
    }
    /// The device's queues, in virtio queue index order.
    fn queues(&self) -> &[Queue] {
        &self.core().queues
    }
    /// Mutable access to the queues, for the transport's configuration writes.
    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.core_mut().queues
    }
    /// One event fd per queue, signalled when the guest notifies that queue.
    fn queue_events(&self) -> &[EventFd] {
        &self.core().queue_events
    }
    /// Read device configuration space at `offset` (relative to its start).
    /// Out-of-range bytes are left untouched.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write device configuration space at `offset`; ignored where read-only.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Start operating: the queues have been validated against `mem`.
    fn activate(&mut self, mem: GuestMemoryMmap, interrupt: Interrupt)
        -> Result<(), ActivateError>;
    /// Whether `activate` succeeded since the last reset.
    fn is_activated(&self) -> bool;
    /// Return to the initial state (virtio 1.2 §2.1.2): stop processing,
    /// reset the queues and the accepted features, drop host-side state.
    fn reset(&mut self);
}

/// What every virtio device holds the same way: the features it offers and
/// the driver accepted, its queues and their notify event fds.
pub struct VirtioCore {
    avail_features: u64,
    pub(crate) acked_features: u64,
    pub(crate) queues: Vec<Queue>,
    pub(crate) queue_events: Vec<EventFd>,
}

impl VirtioCore {
    /// Offer `avail_features`; one queue and one non-blocking notify event fd
    /// per entry of `max_sizes`.
    pub(crate) fn new(avail_features: u64, max_sizes: &[u16]) -> std::io::Result<Self> {
        use virtio_queue::QueueT;
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut queue_events = Vec::with_capacity(max_sizes.len());
        for &size in max_sizes {
            let queue = Queue::new(size).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("queue size {size}: {e}"),
                )
            })?;
            queues.push(queue);
            queue_events.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(VirtioCore {
            avail_features,
            acked_features: 0,
            queues,
            queue_events,
        })
    }

    /// Forget the accepted features and reset every queue (virtio 1.2 §2.1.2).
    pub(crate) fn reset(&mut self) {
        use virtio_queue::QueueT;
        self.acked_features = 0;
        for q in &mut self.queues {
            q.reset();
        }
    }
}

/// Read (and so clear) a non-blocking event fd, ignoring "nothing pending".
pub(crate) fn drain_event(evt: &EventFd) {
    if let Err(e) = evt.read() {
        if e.kind() != std::io::ErrorKind::WouldBlock {
            tracing::warn!("reading a virtio event fd failed: {e}");
        }
    }
}

/// What a device holds while active: guest memory and its interrupt.
pub(crate) struct ActiveState {
    pub mem: GuestMemoryMmap,
    pub interrupt: Interrupt,
}
