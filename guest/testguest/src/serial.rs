//! Console on the 8250 UART at COM1. The VMM's UART accepts a byte in THR at
//! any time, so the guest writes THR without polling LSR (one exit per byte).
//! Lines from different vCPUs are kept whole by a spin lock held for a line.

#![cfg_attr(test, allow(dead_code))]

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::cpu;

/// COM1 transmit holding register.
const COM1_THR: u16 = 0x3f8;

static LOCK: AtomicBool = AtomicBool::new(false);

/// Writes bytes to the UART, one port write per byte.
pub struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            cpu::outb(COM1_THR, b);
        }
        Ok(())
    }
}

/// Prints one formatted line (the caller's format ends with "\n") under the
/// console lock. Only ever called with interrupts disabled, so a handler can
/// never spin on a lock its own CPU holds.
pub fn print_locked(args: fmt::Arguments) {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        cpu::relax();
    }
    let _ = Serial.write_fmt(args);
    LOCK.store(false, Ordering::Release);
}

/// Writes raw bytes (the agent's console output) under the console lock.
/// Only ever called with interrupts disabled, like `print_locked`.
pub fn write_bytes_locked(bytes: &[u8]) {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        cpu::relax();
    }
    for &b in bytes {
        cpu::outb(COM1_THR, b);
    }
    LOCK.store(false, Ordering::Release);
}

/// Prints without taking the lock: for the fatal paths (fault, panic), which
/// may run while this CPU holds it.
pub fn print_unlocked(args: fmt::Arguments) {
    let _ = Serial.write_fmt(args);
}

/// `println!` for the guest console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::serial::print_locked(format_args!("{}\n", format_args!($($arg)*)))
    };
}
