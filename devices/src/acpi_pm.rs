//! The sleep control and sleep status registers of a hardware-reduced ACPI
//! platform (ACPI 6.4 §4.8.3.7, "Sleep Control and Status Registers"): the
//! guest powers off by writing SLP_TYP = S5 with SLP_EN to the control
//! register. The FADT points at these two byte-wide ports.

use crate::bus::BusDevice;

/// Offset of the sleep control register in the device's port range.
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
/// Offset of the sleep status register.
pub const SLEEP_STATUS_OFFSET: u64 = 1;
/// Ports the device covers.
pub const ACPI_PM_PORT_COUNT: u64 = 2;
/// The SLP_TYP value the DSDT's `\_S5_` package announces for soft-off.
pub const S5_SLEEP_TYPE: u8 = 5;
/// SLP_EN: bit 5 of the sleep control register.
const SLP_EN: u8 = 1 << 5;
/// SLP_TYP: bits 2-4 of the sleep control register.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;

/// Sleep registers; a write requesting S5 calls `on_poweroff`. Other sleep
/// states are not supported and ignored (the guest sees no transition).
pub struct AcpiPm {
    on_poweroff: Box<dyn Fn() + Send>,
}

impl AcpiPm {
    /// Registers that call `on_poweroff` when the guest enters S5.
    pub fn new(on_poweroff: Box<dyn Fn() + Send>) -> Self {
        AcpiPm { on_poweroff }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: WAK_STS never set (we never wake from sleep).
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if offset == SLEEP_CONTROL_OFFSET
            && value & SLP_EN != 0
            && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLEEP_TYPE
        {
            (self.on_poweroff)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn only_slp_en_with_s5_powers_off() {
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let mut dev = AcpiPm::new(Box::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        }));
        let s5 = (S5_SLEEP_TYPE << SLP_TYP_SHIFT) | SLP_EN;
        dev.write(SLEEP_STATUS_OFFSET, &[s5]);
        dev.write(SLEEP_CONTROL_OFFSET, &[S5_SLEEP_TYPE << SLP_TYP_SHIFT]);
        dev.write(SLEEP_CONTROL_OFFSET, &[(3 << SLP_TYP_SHIFT) | SLP_EN]);
        dev.write(SLEEP_CONTROL_OFFSET, &[]);
        assert_eq!(count.load(Ordering::SeqCst), 0);
        dev.write(SLEEP_CONTROL_OFFSET, &[s5]);
        assert_eq!(count.load(Ordering::SeqCst), 1);
        let mut status = [0xffu8];
        dev.read(SLEEP_STATUS_OFFSET, &mut status);
        assert_eq!(status, [0]);
    }
}
