//! The virtio-mmio transport, modern (version 2) register layout (virtio 1.2
//! §4.2.2), driving one [`VirtioDevice`] through the device initialization
//! sequence (virtio 1.2 §3.1.1).
//!
//! Every register is 32 bits wide and 4-byte aligned; other accesses below the
//! configuration space are ignored. Writes that come in the wrong state (queue
//! setup before FEATURES_OK or after DRIVER_OK, features after FEATURES_OK,
//! status bits out of order) are ignored. Nothing a guest writes here panics.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_mmio as regs;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{status, ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;

/// Size of the MMIO window to allocate per device (the registers use 0x200).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of QueueNotify: where the VMM registers the queue ioeventfds, with
/// the queue index as a 4-byte datamatch (virtio 1.2 §4.2.2).
pub const QUEUE_NOTIFY_OFFSET: u64 = regs::VIRTIO_MMIO_QUEUE_NOTIFY as u64;

/// "virt" in little endian (virtio 1.2 §4.2.2).
const MAGIC_VALUE: u32 = 0x7472_6976;
/// Version 2: the modern, non-legacy register layout (virtio 1.2 §4.2.2).
const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the driver; virtio does not assign one to us.
const VENDOR_ID: u32 = 0;

// Register offsets (virtio 1.2 §4.2.2).
const MAGIC: u64 = regs::VIRTIO_MMIO_MAGIC_VALUE as u64;
const VERSION: u64 = regs::VIRTIO_MMIO_VERSION as u64;
const DEVICE_ID: u64 = regs::VIRTIO_MMIO_DEVICE_ID as u64;
const VENDOR: u64 = regs::VIRTIO_MMIO_VENDOR_ID as u64;
const DEVICE_FEATURES: u64 = regs::VIRTIO_MMIO_DEVICE_FEATURES as u64;
const DEVICE_FEATURES_SEL: u64 = regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
const DRIVER_FEATURES: u64 = regs::VIRTIO_MMIO_DRIVER_FEATURES as u64;
const DRIVER_FEATURES_SEL: u64 = regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
const QUEUE_SEL: u64 = regs::VIRTIO_MMIO_QUEUE_SEL as u64;
const QUEUE_NUM_MAX: u64 = regs::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
const QUEUE_NUM: u64 = regs::VIRTIO_MMIO_QUEUE_NUM as u64;
const QUEUE_READY: u64 = regs::VIRTIO_MMIO_QUEUE_READY as u64;
const INTERRUPT_STATUS: u64 = regs::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
const INTERRUPT_ACK: u64 = regs::VIRTIO_MMIO_INTERRUPT_ACK as u64;
const STATUS: u64 = regs::VIRTIO_MMIO_STATUS as u64;
const QUEUE_DESC_LOW: u64 = regs::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
const QUEUE_DESC_HIGH: u64 = regs::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
const QUEUE_DRIVER_LOW: u64 = regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
const QUEUE_DRIVER_HIGH: u64 = regs::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
const QUEUE_DEVICE_LOW: u64 = regs::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
const QUEUE_DEVICE_HIGH: u64 = regs::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
const SHM_SEL: u64 = regs::VIRTIO_MMIO_SHM_SEL as u64;
const SHM_LEN_LOW: u64 = regs::VIRTIO_MMIO_SHM_LEN_LOW as u64;
const SHM_BASE_HIGH: u64 = regs::VIRTIO_MMIO_SHM_BASE_HIGH as u64;
/// QueueReset (virtio 1.2 §4.2.2); only meaningful with VIRTIO_F_RING_RESET,
/// which no device here offers.
const QUEUE_RESET: u64 = 0x0c0;
const CONFIG_GENERATION: u64 = regs::VIRTIO_MMIO_CONFIG_GENERATION as u64;
/// Start of the device-specific configuration space (virtio 1.2 §4.2.2).
const CONFIG_SPACE: u64 = regs::VIRTIO_MMIO_CONFIG as u64;

/// The kernel command line argument announcing a device at `base` on `irq`
/// (Linux `virtio_mmio.device=<size>@<base>:<irq>`).
pub fn kernel_cmdline_arg(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{irq}")
}

/// Errors building or restoring a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The interrupt event fd could not be created.
    #[error("creating the interrupt event fd: {0}")]
    Interrupt(#[source] std::io::Error),
    /// The saved state belongs to another kind of device.
    #[error("saved state is for device type {saved}, the device is type {actual}")]
    DeviceTypeMismatch {
        /// Device type in the state.
        saved: u32,
        /// Device type of the device given to `restore`.
        actual: u32,
    },
    /// The saved state has a different number of queues than the device.
    #[error("saved state has {saved} queues, the device has {actual}")]
    QueueCountMismatch {
        /// Queues in the state.
        saved: usize,
        /// Queues of the device.
        actual: usize,
    },
    /// A saved queue does not describe a valid queue of this device.
    #[error("saved queue {index} is invalid: {reason}")]
    InvalidQueueState {
        /// Queue index.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The saved accepted features include some the device does not offer.
    #[error("saved features {features:#x} are not offered by the device")]
    UnsupportedFeatures {
        /// The offending feature bits.
        features: u64,
    },
    /// The restored device could not be activated.
    #[error("activating the restored device: {0}")]
    Activate(#[source] ActivateError),
}

/// The configuration of one queue, as a snapshot keeps it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfigState {
    /// Largest size the device supports.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest-physical address of the driver (available) ring.
    pub avail_ring: u64,
    /// Guest-physical address of the device (used) ring.
    pub used_ring: u64,
    /// Next available-ring entry the device will consume.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX in use on this queue.
    pub event_idx_enabled: bool,
}

impl QueueConfigState {
    fn from_queue(q: &Queue) -> Self {
        let s = q.state();
        QueueConfigState {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }

    fn to_queue(&self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// Everything needed to rebuild a transport and its device's queues.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// Device ID, checked on restore.
    pub device_type: u32,
    /// Device status register.
    pub device_status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features written by the driver (accepted at FEATURES_OK).
    pub driver_features: u64,
    /// Features the device accepted.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Pending InterruptStatus bits.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Every queue of the device, in index order.
    pub queues: Vec<QueueConfigState>,
}

/// The virtio-mmio register window of one device. Put it on the MMIO bus at
/// its base address with [`MMIO_WINDOW_SIZE`].
pub struct MmioTransport {
    vm_id: String,
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    device_status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// A transport in reset state in front of `device`, which will use `mem`.
    pub fn new(
        vm_id: &str,
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<Self, MmioError> {
        Ok(MmioTransport {
            vm_id: vm_id.to_owned(),
            device,
            mem,
            interrupt: Interrupt::new().map_err(MmioError::Interrupt)?,
            device_status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
        })
    }

    /// The interrupt event fd: register it as a KVM irqfd on the device's GSI.
    pub fn irq_evt(&self) -> &EventFd {
        self.interrupt.irq_evt()
    }

    /// `(queue index, notify event fd)` for every queue: register each as a
    /// KVM ioeventfd at `base + QUEUE_NOTIFY_OFFSET` with a 4-byte datamatch
    /// on the queue index.
    pub fn queue_notify_evts(&self) -> std::io::Result<Vec<(u16, EventFd)>> {
        let dev = self.device();
        let mut evts = Vec::with_capacity(dev.queue_events().len());
        for (index, evt) in (0u16..).zip(dev.queue_events()) {
            evts.push((index, evt.try_clone()?));
        }
        Ok(evts)
    }

    /// The device behind this transport.
    pub fn device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        // A poisoned lock only means another thread panicked mid-access; the
        // device state is still the best we have.
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The transport's registers and the device's queues, for a snapshot.
    /// Take it while the vCPUs are paused.
    pub fn save(&self) -> MmioTransportState {
        let dev = self.device();
        MmioTransportState {
            device_type: dev.device_type(),
            device_status: self.device_status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            acked_features: dev.acked_features(),
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            queues: dev
                .queues()
                .iter()
                .map(QueueConfigState::from_queue)
                .collect(),
        }
    }

    /// Rebuild a transport from `state` in front of a freshly created
    /// `device`; if the driver had set DRIVER_OK, the device is activated.
    pub fn restore(
        vm_id: &str,
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        state: &MmioTransportState,
    ) -> Result<Self, MmioError> {
        let mut t = Self::new(vm_id, mem, device)?;
        {
            let mut dev = t.device();
            if dev.device_type() != state.device_type {
                return Err(MmioError::DeviceTypeMismatch {
                    saved: state.device_type,
                    actual: dev.device_type(),
                });
            }
            if dev.queues().len() != state.queues.len() {
                return Err(MmioError::QueueCountMismatch {
                    saved: state.queues.len(),
                    actual: dev.queues().len(),
                });
            }
            for (index, (queue, saved)) in
                dev.queues_mut().iter_mut().zip(&state.queues).enumerate()
            {
                if saved.max_size != queue.max_size() {
                    return Err(MmioError::InvalidQueueState {
                        index,
                        reason: format!(
                            "max size {} but the device's is {}",
                            saved.max_size,
                            queue.max_size()
                        ),
                    });
                }
                *queue = saved.to_queue().map_err(|e| MmioError::InvalidQueueState {
                    index,
                    reason: e.to_string(),
                })?;
            }
            let unsupported = state.acked_features & !dev.avail_features();
            if unsupported != 0 {
                return Err(MmioError::UnsupportedFeatures {
                    features: unsupported,
                });
            }
            dev.set_acked_features(state.acked_features);
        }
        t.device_status = state.device_status;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.driver_features = state.driver_features;
        t.queue_sel = state.queue_sel;
        t.config_generation = state.config_generation;
        let running = status::DRIVER_OK | status::FEATURES_OK;
        if t.device_status & running == running
            && t.device_status & (status::DEVICE_NEEDS_RESET | status::FAILED) == 0
        {
            t.activate().map_err(MmioError::Activate)?;
        }
        t.interrupt.set_status(state.interrupt_status);
        Ok(t)
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            MAGIC => MAGIC_VALUE,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device().device_type(),
            VENDOR => VENDOR_ID,
            DEVICE_FEATURES => {
                let features = self.device().avail_features();
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            QUEUE_NUM_MAX => self.with_selected_queue(|q| u32::from(q.max_size())),
            QUEUE_READY => self.with_selected_queue(|q| u32::from(q.ready())),
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => self.device_status,
            // No shared memory regions: their length and base read as -1
            // (virtio 1.2 §4.2.2).
            SHM_LEN_LOW..=SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => self.config_generation,
            DEVICE_FEATURES_SEL
            | DRIVER_FEATURES
            | DRIVER_FEATURES_SEL
            | QUEUE_SEL
            | QUEUE_NUM
            | INTERRUPT_ACK
            | QUEUE_DESC_LOW..=QUEUE_DEVICE_HIGH
            | QUEUE_NOTIFY_OFFSET
            | SHM_SEL
            | QUEUE_RESET => 0,
            _ => {
                tracing::debug!(vm = %self.vm_id, "virtio-mmio read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES => self.write_driver_features(value),
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            QUEUE_SEL => self.queue_sel = value,
            QUEUE_NUM => self.configure_queue(offset, |q| {
                let size = u16::try_from(value).unwrap_or(0);
                if size == 0 || !size.is_power_of_two() || size > q.max_size() {
                    return Err(format!("invalid queue size {value}"));
                }
                q.set_size(size);
                Ok(())
            }),
            QUEUE_READY => self.configure_queue(offset, |q| match value {
                0 | 1 => {
                    q.set_ready(value == 1);
                    Ok(())
                }
                _ => Err(format!("invalid QueueReady value {value}")),
            }),
            QUEUE_DESC_LOW => self.configure_queue(offset, |q| {
                check_align(value, 16)?;
                q.set_desc_table_address(Some(value), None);
                Ok(())
            }),
            QUEUE_DESC_HIGH => self.configure_queue(offset, |q| {
                q.set_desc_table_address(None, Some(value));
                Ok(())
            }),
            QUEUE_DRIVER_LOW => self.configure_queue(offset, |q| {
                check_align(value, 2)?;
                q.set_avail_ring_address(Some(value), None);
                Ok(())
            }),
            QUEUE_DRIVER_HIGH => self.configure_queue(offset, |q| {
                q.set_avail_ring_address(None, Some(value));
                Ok(())
            }),
            QUEUE_DEVICE_LOW => self.configure_queue(offset, |q| {
                check_align(value, 4)?;
                q.set_used_ring_address(Some(value), None);
                Ok(())
            }),
            QUEUE_DEVICE_HIGH => self.configure_queue(offset, |q| {
                q.set_used_ring_address(None, Some(value));
                Ok(())
            }),
            QUEUE_NOTIFY_OFFSET => self.notify_queue(value),
            INTERRUPT_ACK => self.interrupt.ack(value),
            STATUS => self.write_status(value),
            SHM_SEL | QUEUE_RESET => {}
            _ => tracing::debug!(
                vm = %self.vm_id,
                "virtio-mmio write of {value:#x} to read-only or unknown register {offset:#x}"
            ),
        }
    }

    fn with_selected_queue(&self, f: impl FnOnce(&Queue) -> u32) -> u32 {
        let dev = self.device();
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| dev.queues().get(i))
            .map_or(0, f)
    }

    /// Apply a queue configuration write, allowed only between FEATURES_OK
    /// and DRIVER_OK (virtio 1.2 §3.1.1 step 7).
    fn configure_queue(&mut self, offset: u64, f: impl FnOnce(&mut Queue) -> Result<(), String>) {
        let s = self.device_status;
        if s & status::FEATURES_OK == 0 || s & (status::DRIVER_OK | status::FAILED) != 0 {
            tracing::debug!(
                vm = %self.vm_id,
                "virtio-mmio queue register {offset:#x} written in status {s:#x}; ignored"
            );
            return;
        }
        let sel = self.queue_sel;
        let vm_id = &self.vm_id;
        let mut dev = self.device.lock().unwrap_or_else(|e| e.into_inner());
        let Some(queue) = usize::try_from(sel)
            .ok()
            .and_then(|i| dev.queues_mut().get_mut(i))
        else {
            tracing::debug!(vm = %vm_id, "virtio-mmio write to queue {sel}, which does not exist");
            return;
        };
        if let Err(e) = f(queue) {
            tracing::debug!(vm = %vm_id, "virtio-mmio queue {sel} register {offset:#x}: {e}; ignored");
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let s = self.device_status;
        if s & status::DRIVER == 0 || s & (status::FEATURES_OK | status::FAILED) != 0 {
            tracing::debug!(vm = %self.vm_id, "virtio-mmio driver features written in status {s:#x}; ignored");
            return;
        }
        let v = u64::from(value);
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
            sel => {
                tracing::debug!(vm = %self.vm_id, "virtio-mmio driver features page {sel} ignored")
            }
        }
    }

    /// A QueueNotify that reached the bus instead of an ioeventfd: signal the
    /// same event fd.
    fn notify_queue(&self, value: u32) {
        let dev = self.device();
        match usize::try_from(value)
            .ok()
            .and_then(|i| dev.queue_events().get(i))
        {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    crate::warn_limited!(vm = %self.vm_id, "signalling queue {value}: {e}");
                }
            }
            None => {
                tracing::debug!(vm = %self.vm_id, "virtio-mmio notify of missing queue {value}")
            }
        }
    }

    /// Device status transitions (virtio 1.2 §2.1, §3.1.1).
    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.device_status;
        // DEVICE_NEEDS_RESET belongs to the device; the driver cannot set or clear it.
        let new = (value & !status::DEVICE_NEEDS_RESET) | (old & status::DEVICE_NEEDS_RESET);
        if new & old != old {
            tracing::debug!(vm = %self.vm_id, "virtio status {old:#x} -> {value:#x} clears bits; ignored");
            return;
        }
        let added = new & !old;
        let requires = |bit: u32, needed: u32| added & bit == 0 || new & needed == needed;
        let in_order = requires(status::DRIVER, status::ACKNOWLEDGE)
            && requires(status::FEATURES_OK, status::ACKNOWLEDGE | status::DRIVER)
            && requires(
                status::DRIVER_OK,
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
            );
        if !in_order || old & status::FAILED != 0 {
            tracing::debug!(vm = %self.vm_id, "virtio status {old:#x} -> {value:#x} out of order; ignored");
            return;
        }
        let mut new = new;
        if added & status::FEATURES_OK != 0 && !self.accept_features() {
            // The driver re-reads the status and sees FEATURES_OK unset
            // (virtio 1.2 §3.1.1 step 6).
            new &= !(status::FEATURES_OK | status::DRIVER_OK);
        }
        let mut failed = false;
        if added & status::DRIVER_OK != 0 && new & status::DRIVER_OK != 0 {
            if let Err(e) = self.activate() {
                crate::warn_limited!(vm = %self.vm_id, "virtio device type {} failed to activate: {e}", self.device().device_type());
                new |= status::DEVICE_NEEDS_RESET;
                failed = true;
            }
        }
        self.device_status = new;
        if failed {
            // virtio 1.2 §2.1.2: DEVICE_NEEDS_RESET after DRIVER_OK comes with
            // a configuration change notification.
            self.interrupt.signal_config_change();
        }
    }

    /// FEATURES_OK: the driver's features must be offered and include VERSION_1.
    fn accept_features(&mut self) -> bool {
        let mut dev = self.device.lock().unwrap_or_else(|e| e.into_inner());
        let offered = dev.avail_features();
        let wanted = self.driver_features;
        if wanted & !offered != 0 || wanted & (1 << VIRTIO_F_VERSION_1) == 0 {
            tracing::debug!(
                vm = %self.vm_id,
                "virtio driver features {wanted:#x} not acceptable (offered {offered:#x})"
            );
            return false;
        }
        dev.set_acked_features(wanted);
        true
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        let mut dev = self.device.lock().unwrap_or_else(|e| e.into_inner());
        if dev.is_activated() {
            return Err(ActivateError::AlreadyActive);
        }
        if let Some(index) = dev.queues().iter().position(|q| !q.is_valid(&self.mem)) {
            return Err(ActivateError::InvalidQueue { index });
        }
        dev.activate(self.mem.clone(), self.interrupt.clone())
    }

    /// Device reset (status 0): the device and every register return to
    /// their initial values (virtio 1.2 §2.1.2, §4.2.3.1).
    fn reset(&mut self) {
        self.device().reset();
        self.device_status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt.set_status(0);
    }
}

fn check_align(value: u32, align: u32) -> Result<(), String> {
    // `align` is a power of two.
    if value & (align - 1) == 0 {
        Ok(())
    } else {
        Err(format!("address {value:#x} is not {align}-byte aligned"))
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device().read_config(offset - CONFIG_SPACE, data);
            }
            return;
        }
        match <&mut [u8; 4]>::try_from(data) {
            Ok(bytes) if offset & 3 == 0 => *bytes = self.read_register(offset).to_le_bytes(),
            _ => {
                tracing::debug!(vm = %self.vm_id, "virtio-mmio read at {offset:#x} with a bad width or alignment")
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device().write_config(offset - CONFIG_SPACE, data);
            }
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset & 3 == 0 => self.write_register(offset, u32::from_le_bytes(bytes)),
            _ => {
                tracing::debug!(vm = %self.vm_id, "virtio-mmio write at {offset:#x} with a bad width or alignment")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::rng::Rng;
    use crate::virtio::test_utils::{Desc, TestGuest};
    use crate::virtio::VIRTIO_ID_RNG;

    const DRIVER: u32 = status::ACKNOWLEDGE | status::DRIVER;
    const FEATURES_OK: u32 = DRIVER | status::FEATURES_OK;

    fn rng_guest() -> (TestGuest, Arc<Mutex<Rng>>) {
        let rng = Arc::new(Mutex::new(Rng::new("test").unwrap()));
        (TestGuest::without_loop(rng.clone()), rng)
    }

    fn negotiate(g: &mut TestGuest) {
        g.write_reg(STATUS, status::ACKNOWLEDGE);
        g.write_reg(STATUS, DRIVER);
        g.write_reg(DRIVER_FEATURES_SEL, 1);
        g.write_reg(DRIVER_FEATURES, 1);
        g.write_reg(STATUS, FEATURES_OK);
        assert_eq!(g.read_reg(STATUS), FEATURES_OK);
    }

    #[test]
    fn identification_registers() {
        let (mut g, _) = rng_guest();
        assert_eq!(g.read_reg(MAGIC), 0x7472_6976);
        assert_eq!(g.read_reg(VERSION), 2);
        assert_eq!(g.read_reg(DEVICE_ID), VIRTIO_ID_RNG);
        assert_eq!(g.read_reg(DEVICE_FEATURES), 0);
        g.write_reg(DEVICE_FEATURES_SEL, 1);
        assert_eq!(g.read_reg(DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        g.write_reg(DEVICE_FEATURES_SEL, 7);
        assert_eq!(g.read_reg(DEVICE_FEATURES), 0);
        assert_eq!(g.read_reg(QUEUE_NUM_MAX), 256);
        g.write_reg(QUEUE_SEL, 1);
        assert_eq!(g.read_reg(QUEUE_NUM_MAX), 0, "no queue 1");
        assert_eq!(g.read_reg(SHM_LEN_LOW), u32::MAX);
        assert_eq!(g.read_reg(CONFIG_GENERATION), 0);
        assert_eq!(
            kernel_cmdline_arg(0xd000_1000, 6),
            "virtio_mmio.device=4K@0xd0001000:6"
        );
    }

    #[test]
    fn bad_widths_alignment_and_offsets_are_ignored() {
        let (mut g, _) = rng_guest();
        g.write_reg(STATUS, status::ACKNOWLEDGE);
        // 2-byte, 1-byte, 8-byte and unaligned accesses to registers.
        g.transport.write(STATUS, &[0xff, 0]);
        g.transport.write(STATUS, &[0]);
        g.transport.write(STATUS, &[0; 8]);
        g.transport.write(STATUS + 1, &[0xff; 4]);
        assert_eq!(g.read_reg(STATUS), status::ACKNOWLEDGE);
        let mut b = [0xaau8; 2];
        g.transport.read(MAGIC, &mut b);
        assert_eq!(
            b,
            [0xaa, 0xaa],
            "narrow register reads leave the buffer alone"
        );
        let mut b = [0u8; 4];
        g.transport.read(MAGIC + 2, &mut b);
        assert_eq!(b, [0; 4]);
        // Unknown registers, the config space of a device without one, and
        // far past the window.
        for off in [0x0a8, 0x0f0, 0x100, 0x1fc, 0xffc, u64::MAX - 3] {
            g.write_reg(off, 0xdead_beef);
            assert_eq!(g.read_reg(off), 0, "offset {off:#x}");
        }
        let mut odd = [0u8; 3];
        g.transport.read(0x100, &mut odd);
        g.transport.write(0x100, &odd);
        g.transport.write(0, &[]);
        g.transport.read(0, &mut []);
    }

    #[test]
    fn queue_setup_outside_its_window_is_ignored() {
        let (mut g, rng) = rng_guest();
        // Before FEATURES_OK.
        g.write_reg(STATUS, status::ACKNOWLEDGE);
        g.write_reg(QUEUE_NUM, 16);
        g.write_reg(QUEUE_DESC_LOW, 0x1000);
        g.write_reg(QUEUE_READY, 1);
        {
            let dev = rng.lock().unwrap();
            let q = &dev.queues()[0];
            assert_eq!((q.size(), q.desc_table(), q.ready()), (256, 0, false));
        }
        g.write_reg(STATUS, DRIVER);
        g.write_reg(QUEUE_NUM, 16);
        assert_eq!(rng.lock().unwrap().queues()[0].size(), 256);
        negotiate(&mut g);
        // Bad sizes and alignments, a missing queue, bad ready values.
        for size in [0, 3, 100, 512, 0x1_0010] {
            g.write_reg(QUEUE_NUM, size);
        }
        g.write_reg(QUEUE_DESC_LOW, 0x1008);
        g.write_reg(QUEUE_DRIVER_LOW, 0x2001);
        g.write_reg(QUEUE_DEVICE_LOW, 0x3002);
        g.write_reg(QUEUE_READY, 2);
        g.write_reg(QUEUE_SEL, 9);
        g.write_reg(QUEUE_NUM, 16);
        g.write_reg(QUEUE_READY, 1);
        {
            let dev = rng.lock().unwrap();
            let q = &dev.queues()[0];
            assert_eq!(q.size(), 256);
            assert_eq!((q.desc_table(), q.avail_ring(), q.used_ring()), (0, 0, 0));
            assert!(!q.ready());
        }
        g.write_reg(QUEUE_SEL, 0);
        g.write_reg(QUEUE_NUM, 16);
        assert_eq!(rng.lock().unwrap().queues()[0].size(), 16);
    }

    #[test]
    fn feature_negotiation_and_status_order() {
        let (mut g, rng) = rng_guest();
        // Features before DRIVER are ignored, so FEATURES_OK fails (no VERSION_1).
        g.write_reg(DRIVER_FEATURES_SEL, 1);
        g.write_reg(DRIVER_FEATURES, 1);
        g.write_reg(STATUS, status::ACKNOWLEDGE);
        g.write_reg(STATUS, DRIVER);
        g.write_reg(STATUS, FEATURES_OK);
        assert_eq!(g.read_reg(STATUS), DRIVER);
        // Features the device does not offer.
        g.write_reg(DRIVER_FEATURES, 1 | 2);
        g.write_reg(STATUS, FEATURES_OK);
        assert_eq!(g.read_reg(STATUS), DRIVER);
        g.write_reg(DRIVER_FEATURES, 1);
        g.write_reg(STATUS, FEATURES_OK);
        assert_eq!(g.read_reg(STATUS), FEATURES_OK);
        assert_eq!(rng.lock().unwrap().acked_features(), 1 << 32);
        // Too late to change features; clearing bits is not allowed.
        g.write_reg(DRIVER_FEATURES, 0);
        g.write_reg(STATUS, status::ACKNOWLEDGE);
        assert_eq!(g.read_reg(STATUS), FEATURES_OK);
        assert_eq!(rng.lock().unwrap().acked_features(), 1 << 32);

        // DRIVER_OK straight after ACKNOWLEDGE is out of order.
        g.write_reg(STATUS, 0);
        g.write_reg(STATUS, status::ACKNOWLEDGE);
        g.write_reg(STATUS, status::ACKNOWLEDGE | status::DRIVER_OK);
        assert_eq!(g.read_reg(STATUS), status::ACKNOWLEDGE);
        // The driver cannot set DEVICE_NEEDS_RESET.
        g.write_reg(STATUS, status::ACKNOWLEDGE | status::DEVICE_NEEDS_RESET);
        assert_eq!(g.read_reg(STATUS), status::ACKNOWLEDGE);
        // After FAILED only a reset helps.
        g.write_reg(STATUS, status::ACKNOWLEDGE | status::FAILED);
        g.write_reg(
            STATUS,
            status::ACKNOWLEDGE | status::FAILED | status::DRIVER,
        );
        assert_eq!(g.read_reg(STATUS), status::ACKNOWLEDGE | status::FAILED);
        assert!(!rng.lock().unwrap().is_activated());
    }

    #[test]
    fn driver_ok_with_bad_queues_needs_reset() {
        let (mut g, rng) = rng_guest();
        // Queue never made ready.
        negotiate(&mut g);
        g.write_reg(STATUS, FEATURES_OK | status::DRIVER_OK);
        assert_eq!(
            g.read_reg(STATUS),
            FEATURES_OK | status::DRIVER_OK | status::DEVICE_NEEDS_RESET
        );
        assert_eq!(g.read_reg(INTERRUPT_STATUS), 2, "config change interrupt");
        assert!(g.take_irq());
        assert!(!rng.lock().unwrap().is_activated());
        // Rings outside guest RAM.
        g.write_reg(STATUS, 0);
        assert_eq!(g.read_reg(INTERRUPT_STATUS), 0);
        negotiate(&mut g);
        g.write_reg(QUEUE_NUM, 16);
        g.write_reg(QUEUE_DESC_LOW, 0x1000);
        g.write_reg(QUEUE_DRIVER_LOW, 0x2000);
        g.write_reg(QUEUE_DEVICE_LOW, 0xfff0_0000);
        g.write_reg(QUEUE_DEVICE_HIGH, 0x10);
        g.write_reg(QUEUE_READY, 1);
        g.write_reg(STATUS, FEATURES_OK | status::DRIVER_OK);
        assert_ne!(g.read_reg(STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert!(!rng.lock().unwrap().is_activated());
        // A full, correct initialization after reset works.
        g.init_driver(&[16]).unwrap();
        assert!(rng.lock().unwrap().is_activated());
        g.write_reg(STATUS, 0);
        let dev = rng.lock().unwrap();
        assert!(!dev.is_activated());
        assert_eq!(dev.acked_features(), 0);
        assert!(!dev.queues()[0].ready());
    }

    #[test]
    fn queue_notify_register_signals_the_queue_event() {
        let (mut g, _) = rng_guest();
        let evts = g.transport.queue_notify_evts().unwrap();
        assert_eq!(evts.len(), 1);
        assert_eq!(evts[0].0, 0);
        g.kick(0);
        assert_eq!(evts[0].1.read().unwrap(), 1);
        g.kick(1);
        g.kick(0xffff);
        assert!(evts[0].1.read().is_err(), "other indices signal nothing");
    }

    #[test]
    fn state_round_trips_and_restores_an_active_device() {
        let (mut g, rng) = rng_guest();
        g.init_driver(&[16]).unwrap();
        let h = g.add_chain(0, &[Desc::w(g.buf(0), 8)]);
        rng.lock().unwrap().process_requests();
        assert_eq!(g.used(0), vec![(u32::from(h), 8)]);
        g.write_reg(QUEUE_SEL, 0);

        let state = g.transport.save();
        let json = serde_json::to_string(&state).unwrap();
        let back: MmioTransportState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        assert_eq!(back.queues[0].next_avail, 1);
        assert_eq!(back.queues[0].size, 16);
        assert_eq!(back.acked_features, 1 << 32);

        let rng2 = Arc::new(Mutex::new(Rng::new("test").unwrap()));
        let t2 = MmioTransport::restore("test", g.mem.clone(), rng2.clone(), &back).unwrap();
        assert_eq!(t2.save(), state);
        assert!(rng2.lock().unwrap().is_activated());
        g.replace_transport(t2);
        assert_eq!(g.read_reg(STATUS), state.device_status);
        let h = g.add_chain(0, &[Desc::w(g.buf(1), 4)]);
        rng2.lock().unwrap().process_requests();
        assert_eq!(g.used(0), vec![(u32::from(h), 4)]);

        // Mismatched or corrupt states are refused.
        let vsock_like = MmioTransportState {
            device_type: 19,
            ..back.clone()
        };
        let fresh = || Arc::new(Mutex::new(Rng::new("test").unwrap()));
        assert!(matches!(
            MmioTransport::restore("test", g.mem.clone(), fresh(), &vsock_like),
            Err(MmioError::DeviceTypeMismatch { .. })
        ));
        let mut bad_size = back.clone();
        bad_size.queues[0].size = 3;
        assert!(matches!(
            MmioTransport::restore("test", g.mem.clone(), fresh(), &bad_size),
            Err(MmioError::InvalidQueueState { .. })
        ));
        let mut outside = back.clone();
        outside.queues[0].used_ring = 1 << 40;
        assert!(matches!(
            MmioTransport::restore("test", g.mem.clone(), fresh(), &outside),
            Err(MmioError::Activate(_))
        ));
        let mut extra = back;
        extra.acked_features |= 1 << 35;
        assert!(matches!(
            MmioTransport::restore("test", g.mem.clone(), fresh(), &extra),
            Err(MmioError::UnsupportedFeatures { .. })
        ));
    }
}
