//! 8250 UART (COM1, port 0x3f8, IRQ 4) on top of vm-superio. Output goes to
//! any writer (stdout, a file, a test's line watcher); the interrupt line is
//! an event fd the VMM registers as an irqfd.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState as SuperioState};
use vm_superio::{Serial as Uart, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Base I/O port of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// ISA IRQ (and IOAPIC pin) of COM1.
pub const COM1_IRQ: u32 = 4;
/// Number of registers of an 8250 (the size of its port range).
pub const SERIAL_PORT_COUNT: u64 = 8;

/// Raises the UART's interrupt by writing to an event fd.
pub struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The serializable state of the UART registers (what a snapshot keeps).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low and high byte.
    pub baud_divisor: [u8; 2],
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received but not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

/// Errors of the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The saved state does not describe a valid UART.
    #[error("invalid serial state: {0}")]
    InvalidState(String),
}

/// A COM port whose output goes to `W`.
pub struct Serial<W: Write + Send> {
    uart: Uart<IrqTrigger, NoEvents, W>,
}

impl<W: Write + Send> Serial<W> {
    /// A UART in its reset state raising `irq` and writing guest output to `out`.
    pub fn new(irq: EventFd, out: W) -> Self {
        Serial {
            uart: Uart::new(IrqTrigger(irq), out),
        }
    }

    /// Rebuild a UART from a saved state.
    pub fn restore(state: &SerialState, irq: EventFd, out: W) -> Result<Self, SerialError> {
        let s = SuperioState {
            baud_divisor_low: state.baud_divisor[0],
            baud_divisor_high: state.baud_divisor[1],
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Uart::from_state(&s, IrqTrigger(irq), NoEvents, out)
            .map_err(|e| SerialError::InvalidState(format!("{e:?}")))?;
        Ok(Serial { uart })
    }

    /// The UART's register state.
    pub fn save(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            baud_divisor: [s.baud_divisor_low, s.baud_divisor_high],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// The output writer (e.g. to flush it).
    pub fn writer_mut(&mut self) -> &mut W {
        self.uart.writer_mut()
    }
}

impl<W: Write + Send> BusDevice for Serial<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Only single-byte accesses to the 8 registers mean anything.
        if let (Ok(off), [byte]) = (u8::try_from(offset), data) {
            if u64::from(off) < SERIAL_PORT_COUNT {
                *byte = self.uart.read(off);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [byte]) = (u8::try_from(offset), data) {
            if u64::from(off) < SERIAL_PORT_COUNT {
                if let Err(e) = self.uart.write(off, *byte) {
                    crate::warn_limited!("serial write failed: {e:?}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_reaches_writer_and_state_round_trips() {
        let irq = EventFd::new(0).unwrap();
        let mut s = Serial::new(irq.try_clone().unwrap(), Vec::new());
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        // Scratch register survives save/restore.
        s.write(7, &[0x5a]);
        // Wide and out-of-range accesses are ignored.
        s.write(0, b"xy");
        s.write(9, b"z");
        assert_eq!(s.writer_mut().as_slice(), b"hi\n");
        let state = s.save();
        let mut r = Serial::restore(&state, irq, Vec::new()).unwrap();
        let mut b = [0u8];
        r.read(7, &mut b);
        assert_eq!(b, [0x5a]);
    }

    #[test]
    fn restore_rejects_overfull_fifo() {
        let state = SerialState {
            in_buffer: vec![0; 1 << 16],
            ..Default::default()
        };
        assert!(Serial::restore(&state, EventFd::new(0).unwrap(), Vec::new()).is_err());
    }
}
