//! A virtio-mmio device's interrupt: the InterruptStatus bits the driver reads
//! and acknowledges through the transport, and the event fd the VMM registers
//! as a KVM irqfd on the device's IOAPIC pin (edge-triggered).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// InterruptStatus bit: a used ring was updated (virtio 1.2 §4.2.2).
pub const INT_USED_BUFFER: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// InterruptStatus bit: the configuration changed (virtio 1.2 §4.2.2).
pub const INT_CONFIG_CHANGE: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// A cloneable handle on one device's interrupt line and status bits, shared
/// by the transport (which reads and acks the bits) and the device (which
/// raises them from the event loop thread).
#[derive(Clone, Debug)]
pub struct Interrupt {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    status: AtomicU32,
    irq: EventFd,
}

impl Interrupt {
    /// A new interrupt with no pending bits and its own (non-blocking) event fd.
    pub fn new() -> std::io::Result<Self> {
        Ok(Interrupt {
            inner: Arc::new(Inner {
                status: AtomicU32::new(0),
                irq: EventFd::new(libc::EFD_NONBLOCK)?,
            }),
        })
    }

    /// The event fd to register as a KVM irqfd.
    pub fn irq_evt(&self) -> &EventFd {
        &self.inner.irq
    }

    /// Tell the driver a used ring was updated.
    pub fn signal_used_queue(&self) {
        self.signal(INT_USED_BUFFER);
    }

    /// Tell the driver the device configuration (or DEVICE_NEEDS_RESET) changed.
    pub fn signal_config_change(&self) {
        self.signal(INT_CONFIG_CHANGE);
    }

    /// The pending InterruptStatus bits.
    pub fn status(&self) -> u32 {
        self.inner.status.load(Ordering::SeqCst)
    }

    /// Clear the bits the driver acknowledged (InterruptACK).
    pub fn ack(&self, bits: u32) {
        self.inner.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Replace the status bits (device reset, snapshot restore). Pending bits
    /// are raised again so a restored guest does not miss them.
    pub(crate) fn set_status(&self, bits: u32) {
        self.inner.status.store(
            bits & (INT_USED_BUFFER | INT_CONFIG_CHANGE),
            Ordering::SeqCst,
        );
        if bits != 0 {
            self.trigger();
        }
    }

    fn signal(&self, bit: u32) {
        self.inner.status.fetch_or(bit, Ordering::SeqCst);
        self.trigger();
    }

    fn trigger(&self) {
        if let Err(e) = self.inner.irq.write(1) {
            tracing::warn!("raising virtio interrupt failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_set_acked_and_raise_the_line() {
        let int = Interrupt::new().unwrap();
        int.signal_used_queue();
        int.signal_config_change();
        assert_eq!(int.status(), INT_USED_BUFFER | INT_CONFIG_CHANGE);
        assert_eq!(int.irq_evt().read().unwrap(), 2);
        int.ack(INT_USED_BUFFER);
        assert_eq!(int.status(), INT_CONFIG_CHANGE);
        int.set_status(0);
        assert_eq!(int.status(), 0);
        assert!(
            int.irq_evt().read().is_err(),
            "no edge for a cleared status"
        );
    }
}
