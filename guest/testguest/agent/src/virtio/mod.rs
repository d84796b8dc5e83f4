//! virtio over MMIO, the driver's side (virtio 1.2 §4.2.2, modern layout
//! only): device discovery, the initialization sequence (§3.1.1), queue
//! setup, notification and interrupt acknowledgement. The agent runs in user
//! mode over an identity map that includes the MMIO windows, so registers are
//! plain volatile accesses; each one exits to the VMM.

pub mod fs;
pub mod mem;
pub mod queue;
pub mod rng;
pub mod vsock;

use core::ptr;

use queue::SplitQueue;

/// "virt" (virtio 1.2 §4.2.2).
const MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern register layout.
const MMIO_VERSION: u32 = 2;

// Register offsets (virtio 1.2 §4.2.2).
const REG_MAGIC: usize = 0x000;
const REG_VERSION: usize = 0x004;
const REG_DEVICE_ID: usize = 0x008;
const REG_DEVICE_FEATURES: usize = 0x010;
const REG_DEVICE_FEATURES_SEL: usize = 0x014;
const REG_DRIVER_FEATURES: usize = 0x020;
const REG_DRIVER_FEATURES_SEL: usize = 0x024;
const REG_QUEUE_SEL: usize = 0x030;
const REG_QUEUE_NUM_MAX: usize = 0x034;
const REG_QUEUE_NUM: usize = 0x038;
const REG_QUEUE_READY: usize = 0x044;
/// QueueNotify: the queue index is written here.
const REG_QUEUE_NOTIFY: usize = 0x050;
const REG_INTERRUPT_ACK: usize = 0x064;
const REG_STATUS: usize = 0x070;
const REG_QUEUE_DESC_LOW: usize = 0x080;
const REG_QUEUE_DESC_HIGH: usize = 0x084;
const REG_QUEUE_DRIVER_LOW: usize = 0x090;
const REG_QUEUE_DRIVER_HIGH: usize = 0x094;
const REG_QUEUE_DEVICE_LOW: usize = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: usize = 0x0a4;
const REG_CONFIG_GENERATION: usize = 0x0fc;
/// Device-specific configuration space.
const REG_CONFIG: usize = 0x100;

/// Device status bits (virtio 1.2 §2.1).
const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 128;

/// VIRTIO_F_VERSION_1 (virtio 1.2 §6): required by the modern transport.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// InterruptStatus bits (virtio 1.2 §4.2.2).
pub const INT_USED_BUFFER: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

/// Device IDs (virtio 1.2 §5).
pub const DEVICE_ID_RNG: u32 = 4;
pub const DEVICE_ID_VSOCK: u32 = 19;
pub const DEVICE_ID_FS: u32 = 26;

/// Why a device could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetupError {
    /// No virtio-mmio device (or not version 2) at the address.
    NotVirtio { magic: u32, version: u32 },
    /// The device does not offer VIRTIO_F_VERSION_1.
    NoVersion1,
    /// The device did not accept the features.
    FeaturesRejected,
    /// A queue is missing or too small.
    Queue { index: u16, max: u32 },
}

impl core::fmt::Display for SetupError {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self {
            SetupError::NotVirtio { magic, version } => {
                write!(
                    f,
                    "no virtio-mmio v2 device (magic {magic:#x}, version {version})"
                )
            }
            SetupError::NoVersion1 => write!(f, "device does not offer VIRTIO_F_VERSION_1"),
            SetupError::FeaturesRejected => write!(f, "device rejected the features"),
            SetupError::Queue { index, max } => {
                write!(f, "queue {index} unusable (max size {max})")
            }
        }
    }
}

/// One virtio-mmio device's register window.
pub struct MmioDevice {
    base: usize,
    /// IOAPIC pin (bit in `BootInfo::pending_irqs`).
    pub irq: u32,
}

impl MmioDevice {
    /// The device at `base` on pin `irq`.
    ///
    /// # Safety
    /// `base` must be a virtio-mmio window (or unbacked MMIO), mapped.
    pub unsafe fn new(base: u64, irq: u32) -> MmioDevice {
        MmioDevice {
            base: base as usize,
            irq,
        }
    }

    fn read(&self, reg: usize) -> u32 {
        // SAFETY: inside the device's window (see `new`).
        unsafe { ptr::read_volatile((self.base + reg) as *const u32) }
    }

    fn write(&self, reg: usize, value: u32) {
        // SAFETY: inside the device's window (see `new`).
        unsafe { ptr::write_volatile((self.base + reg) as *mut u32, value) }
    }

    /// The device ID (0: a placeholder without a device), or why this is no
    /// modern virtio-mmio device.
    pub fn device_id(&self) -> Result<u32, SetupError> {
        let magic = self.read(REG_MAGIC);
        let version = self.read(REG_VERSION);
        if magic != MAGIC_VALUE || version != MMIO_VERSION {
            return Err(SetupError::NotVirtio { magic, version });
        }
        Ok(self.read(REG_DEVICE_ID))
    }

    /// Resets the device and negotiates features (virtio 1.2 §3.1.1 steps
    /// 1-6): VIRTIO_F_VERSION_1 and those of `wanted` the device offers.
    /// Returns the accepted features.
    pub fn begin_init(&self, wanted: u64) -> Result<u64, SetupError> {
        self.write(REG_STATUS, 0);
        self.write(REG_STATUS, STATUS_ACKNOWLEDGE);
        self.write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.write(REG_DEVICE_FEATURES_SEL, 0);
        let low = self.read(REG_DEVICE_FEATURES);
        self.write(REG_DEVICE_FEATURES_SEL, 1);
        let high = self.read(REG_DEVICE_FEATURES);
        let offered = u64::from(low) | u64::from(high) << 32;
        if offered & VIRTIO_F_VERSION_1 == 0 {
            self.fail();
            return Err(SetupError::NoVersion1);
        }
        let accepted = offered & (wanted | VIRTIO_F_VERSION_1);
        self.write(REG_DRIVER_FEATURES_SEL, 0);
        self.write(REG_DRIVER_FEATURES, accepted as u32);
        self.write(REG_DRIVER_FEATURES_SEL, 1);
        self.write(REG_DRIVER_FEATURES, (accepted >> 32) as u32);
        let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.write(REG_STATUS, status);
        if self.read(REG_STATUS) & STATUS_FEATURES_OK == 0 {
            self.fail();
            return Err(SetupError::FeaturesRejected);
        }
        Ok(accepted)
    }

    /// Gives queue `index` to the device (virtio 1.2 §4.2.3.2).
    pub fn setup_queue<T>(&self, index: u16, queue: &SplitQueue<T>) -> Result<(), SetupError> {
        self.write(REG_QUEUE_SEL, u32::from(index));
        let max = self.read(REG_QUEUE_NUM_MAX);
        if max < u32::from(queue.size()) || self.read(REG_QUEUE_READY) != 0 {
            self.fail();
            return Err(SetupError::Queue { index, max });
        }
        self.write(REG_QUEUE_NUM, u32::from(queue.size()));
        let (desc, driver, device) = queue.addresses();
        self.write(REG_QUEUE_DESC_LOW, desc as u32);
        self.write(REG_QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.write(REG_QUEUE_DRIVER_LOW, driver as u32);
        self.write(REG_QUEUE_DRIVER_HIGH, (driver >> 32) as u32);
        self.write(REG_QUEUE_DEVICE_LOW, device as u32);
        self.write(REG_QUEUE_DEVICE_HIGH, (device >> 32) as u32);
        self.write(REG_QUEUE_READY, 1);
        Ok(())
    }

    /// The largest size queue `index` may have (0: no such queue).
    pub fn queue_max(&self, index: u16) -> u32 {
        self.write(REG_QUEUE_SEL, u32::from(index));
        self.read(REG_QUEUE_NUM_MAX)
    }

    /// Sets DRIVER_OK: the device is live (virtio 1.2 §3.1.1 step 8).
    pub fn finish_init(&self) {
        self.write(
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
    }

    fn fail(&self) {
        self.write(REG_STATUS, self.read(REG_STATUS) | STATUS_FAILED);
    }

    /// Tells the device queue `index` has new buffers.
    pub fn notify(&self, index: u16) {
        self.write(REG_QUEUE_NOTIFY, u32::from(index));
    }

    /// Acknowledges both interrupt causes (virtio 1.2 §4.2.2: used buffers
    /// and configuration change; the drivers poll every queue after an
    /// interrupt and need nothing from a configuration change). One write,
    /// no read of InterruptStatus: every register access is an exit to the
    /// VMM (about 17 us on the project's PVM hosts).
    pub fn ack_interrupt(&self) {
        self.write(REG_INTERRUPT_ACK, INT_USED_BUFFER | INT_CONFIG_CHANGE);
    }

    /// Reads a little-endian u32 of the device configuration at `offset`.
    pub fn config_u32(&self, offset: usize) -> u32 {
        self.read(REG_CONFIG + offset)
    }

    /// Reads a little-endian u64 of the device configuration at `offset`,
    /// consistently (virtio 1.2 §2.5.1: retry while the generation changes).
    pub fn config_u64(&self, offset: usize) -> u64 {
        loop {
            let generation = self.read(REG_CONFIG_GENERATION);
            let low = self.read(REG_CONFIG + offset);
            let high = self.read(REG_CONFIG + offset + 4);
            if self.read(REG_CONFIG_GENERATION) == generation {
                return u64::from(low) | u64::from(high) << 32;
            }
        }
    }
}
