//! Just enough of the i8042 keyboard controller for a guest to request a
//! reset (command 0xFE on the command port), which is how our guests reboot.

use crate::bus::BusDevice;

/// Offset of the command/status port (0x64) from the data port (0x60).
pub const I8042_COMMAND_OFFSET: u64 = 4;
/// i8042 command "pulse output line 0": resets the CPU.
const I8042_CMD_RESET: u8 = 0xfe;

/// The i8042 controller. Every write of the reset command calls `on_reset`.
pub struct I8042 {
    on_reset: Box<dyn Fn() + Send>,
}

impl I8042 {
    /// A controller that calls `on_reset` when the guest asks for a reset.
    pub fn new(on_reset: Box<dyn Fn() + Send>) -> Self {
        I8042 { on_reset }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty; data port reads 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == I8042_COMMAND_OFFSET && data.first() == Some(&I8042_CMD_RESET) {
            (self.on_reset)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn reset_command_on_command_port_only() {
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let mut dev = I8042::new(Box::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        }));
        dev.write(0, &[0xfe]);
        dev.write(I8042_COMMAND_OFFSET, &[0xd1]);
        assert_eq!(count.load(Ordering::SeqCst), 0);
        dev.write(I8042_COMMAND_OFFSET, &[0xfe]);
        assert_eq!(count.load(Ordering::SeqCst), 1);
        let mut status = [0xffu8];
        dev.read(I8042_COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);
    }
}
