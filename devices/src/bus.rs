//! The interface between a device model and the VMM's port-I/O and MMIO buses.

/// A device reachable through a bus range. `offset` is relative to the start
/// of the range the device was registered at.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset`. Unhandled bytes must be
    /// filled (the buffer arrives zeroed).
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}
