//! Port-I/O and MMIO buses: address ranges mapped to devices. Built before the
//! vCPUs start; vCPU threads dispatch their I/O exits through them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::BusDevice;

/// A device shared between the bus and whoever else drives it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors registering a device on a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The new range overlaps a registered one, or is empty/overflowing.
    #[error("bus range {base:#x}+{len:#x} is empty or overlaps a registered device")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

/// A set of non-overlapping ranges, each owned by one device.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register `device` for `[base, base+len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let overlaps = |end: u64| {
            self.ranges
                .range(..end)
                .next_back()
                .is_some_and(|(b, (l, _))| b + l > base)
        };
        match end {
            Some(end) if !overlaps(end) => {
                self.ranges.insert(base, (len, device));
                Ok(())
            }
            _ => Err(BusError::Overlap { base, len }),
        }
    }

    /// The device covering `addr`, and `addr`'s offset inside its range.
    pub fn resolve(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, dev))
    }

    /// Dispatch a read; returns false (and leaves `data` zeroed) if no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        data.fill(0);
        match self.resolve(addr) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatch a write; returns false if no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Lock a device, recovering from a poisoned lock (a device that panicked
/// keeps its last consistent state; the VM must not die with it).
fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Echo(1))))
            .unwrap();
        bus.insert(0x110, 0x10, Arc::new(Mutex::new(Echo(9))))
            .unwrap();
        assert!(bus.insert(0x10f, 2, Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(bus
            .insert(0xf8, 0x9, Arc::new(Mutex::new(Echo(0))))
            .is_err());
        assert!(bus.insert(0x200, 0, Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(bus
            .insert(u64::MAX, 2, Arc::new(Mutex::new(Echo(0))))
            .is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x102, &mut b));
        assert_eq!(b, [3]);
        assert!(bus.write(0x110, &[5]));
        assert!(bus.read(0x111, &mut b));
        assert_eq!(b, [6]);
        assert!(!bus.read(0x120, &mut b));
        assert_eq!(b, [0]);
        assert!(!bus.write(0xff, &[1]));
    }
}
