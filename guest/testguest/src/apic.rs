//! Interrupt controllers: the local APIC in x2APIC mode (MSR access only, so
//! no LAPIC MMIO is needed under PVM), its timer, the legacy 8259 PICs (masked)
//! and the IOAPIC (device pins routed to the BSP).
//!
//! Timer rate: the LAPIC timer is KVM's in-kernel emulation, which counts at
//! the APIC bus rate of 1 GHz (KVM's default 1 ns APIC bus cycle; a VMM could
//! change it with KVM_CAP_X86_APIC_BUS_CYCLES_NS, minivmm does not). The guest
//! uses that fixed rate with divide-by-16 rather than calibrating against the
//! PIT, which would cost boot time. `lapic_bus_hz=<n>` on the command line
//! overrides it.

#![cfg_attr(test, allow(dead_code))]

use crate::cpu;
use crate::event::{IRQ_BASE_VECTOR, SPURIOUS_VECTOR, TIMER_VECTOR};

/// IA32_APIC_BASE and its enable bits (SDM vol. 3 §11.4.4, §11.12.1).
const MSR_APIC_BASE: u32 = 0x1b;
const APIC_BASE_EXTD: u64 = 1 << 10;
const APIC_BASE_EN: u64 = 1 << 11;
/// x2APIC MSRs (SDM vol. 3 §11.12.1.2).
const X2APIC_ID: u32 = 0x802;
const X2APIC_TPR: u32 = 0x808;
const X2APIC_EOI: u32 = 0x80b;
const X2APIC_SVR: u32 = 0x80f;
const X2APIC_ICR: u32 = 0x830;
const X2APIC_LVT_TIMER: u32 = 0x832;
const X2APIC_LVT_LINT0: u32 = 0x835;
const X2APIC_LVT_ERROR: u32 = 0x837;
const X2APIC_TIMER_INITIAL: u32 = 0x838;
const X2APIC_TIMER_CURRENT: u32 = 0x839;
const X2APIC_TIMER_DIVIDE: u32 = 0x83e;
const SVR_APIC_ENABLE: u64 = 1 << 8;
const LVT_MASKED: u64 = 1 << 16;
const LVT_TIMER_PERIODIC: u64 = 1 << 17;
/// Divide configuration 0b0011: divide by 16.
const TIMER_DIVIDE_16: u64 = 0b0011;
const TIMER_DIVISOR: u64 = 16;
/// ICR: fixed delivery, physical destination, level assert.
const ICR_LEVEL_ASSERT: u64 = 1 << 14;
/// CPUID.1:ECX.x2APIC.
const CPUID_1_ECX_X2APIC: u32 = 1 << 21;

/// KVM's LAPIC timer rate (see the module doc).
pub const KVM_APIC_BUS_HZ: u64 = 1_000_000_000;
/// Timer interrupts per second on the BSP (boot and actions).
pub const TIMER_HZ: u64 = 100;
/// Timer interrupts per second while the agent serves: only a safety net
/// against a lost device interrupt (the agent never waits for the timer).
pub const AGENT_TIMER_HZ: u64 = 1;

/// The IOAPIC's MMIO base and registers (82093AA datasheet §3).
const IOAPIC_BASE: usize = 0xfec0_0000;
const IOAPIC_IOREGSEL: usize = 0x00;
const IOAPIC_IOWIN: usize = 0x10;
const IOAPIC_REG_VERSION: u32 = 0x01;
const IOAPIC_REG_REDTBL: u32 = 0x10;
/// Most pins the guest routes (KVM's IOAPIC has 24).
pub const IOAPIC_MAX_PINS: usize = 24;
const REDTBL_MASKED: u32 = 1 << 16;
const REDTBL_ACTIVE_LOW: u32 = 1 << 13;
/// ISA IRQ of the COM1 UART.
pub const SERIAL_PIN: u32 = 4;

/// 8259 PIC data ports.
const PIC1_DATA: u16 = 0x21;
const PIC2_DATA: u16 = 0xa1;

/// Whether the CPU offers x2APIC mode (CPUID.1:ECX bit 21).
pub fn has_x2apic(cpuid_1_ecx: u32) -> bool {
    cpuid_1_ecx & CPUID_1_ECX_X2APIC != 0
}

/// Puts this CPU's LAPIC in x2APIC mode and enables it: spurious vector 0xff,
/// LINT0 (ExtINT from the PIC) and the error LVT masked, TPR 0.
pub fn enable_local() {
    // SAFETY: architectural MSRs; x2APIC support was checked by the caller.
    unsafe {
        let base = cpu::rdmsr(MSR_APIC_BASE);
        // xAPIC must be enabled before (or together with) x2APIC mode.
        cpu::wrmsr(MSR_APIC_BASE, base | APIC_BASE_EN);
        cpu::wrmsr(MSR_APIC_BASE, base | APIC_BASE_EN | APIC_BASE_EXTD);
        cpu::wrmsr(X2APIC_TPR, 0);
        cpu::wrmsr(X2APIC_LVT_LINT0, LVT_MASKED);
        cpu::wrmsr(X2APIC_LVT_ERROR, LVT_MASKED);
        cpu::wrmsr(X2APIC_SVR, SVR_APIC_ENABLE | u64::from(SPURIOUS_VECTOR));
    }
}

/// This CPU's x2APIC ID.
pub fn id() -> u32 {
    // SAFETY: x2APIC mode is on.
    unsafe { cpu::rdmsr(X2APIC_ID) as u32 }
}

/// Acknowledges the interrupt being handled.
pub fn eoi() {
    // SAFETY: x2APIC mode is on; writing 0 to EOI is the only valid write.
    unsafe { cpu::wrmsr(X2APIC_EOI, 0) }
}

/// Sends a fixed IPI to the CPU with x2APIC ID `dest`.
pub fn send_ipi(dest: u32, vector: u8) {
    // SAFETY: x2APIC mode is on.
    unsafe {
        cpu::wrmsr(
            X2APIC_ICR,
            (u64::from(dest) << 32) | ICR_LEVEL_ASSERT | u64::from(vector),
        )
    }
}

/// The LAPIC timer's initial count for `hz` interrupts per second.
pub fn timer_count(bus_hz: u64, hz: u64) -> u32 {
    (bus_hz / TIMER_DIVISOR / hz.max(1)).clamp(1, u64::from(u32::MAX)) as u32
}

/// Starts this CPU's LAPIC timer: periodic, `TIMER_HZ`, vector 0x20.
pub fn start_timer(bus_hz: u64) {
    set_timer_hz(bus_hz, TIMER_HZ);
}

/// (Re)programs this CPU's LAPIC timer: periodic, `hz`, vector 0x20.
pub fn set_timer_hz(bus_hz: u64, hz: u64) {
    // SAFETY: x2APIC mode is on.
    unsafe {
        cpu::wrmsr(X2APIC_TIMER_DIVIDE, TIMER_DIVIDE_16);
        cpu::wrmsr(
            X2APIC_LVT_TIMER,
            LVT_TIMER_PERIODIC | u64::from(TIMER_VECTOR),
        );
        cpu::wrmsr(X2APIC_TIMER_INITIAL, u64::from(timer_count(bus_hz, hz)));
    }
}

/// The LAPIC timer's current count and its initial (reload) count.
pub fn timer_counts() -> (u32, u32) {
    // SAFETY: x2APIC mode is on.
    unsafe {
        (
            cpu::rdmsr(X2APIC_TIMER_CURRENT) as u32,
            cpu::rdmsr(X2APIC_TIMER_INITIAL) as u32,
        )
    }
}

/// Counts the periodic timer went down from `start` to `now` (both current
/// counts), assuming it reloaded from `initial` at most once in between.
pub fn timer_elapsed(start: u32, now: u32, initial: u32) -> u64 {
    if now <= start {
        u64::from(start - now)
    } else {
        u64::from(start) + u64::from(initial - now.min(initial))
    }
}

/// Masks every line of both 8259 PICs: all device interrupts go through the
/// IOAPIC.
pub fn mask_pic() {
    cpu::outb(PIC1_DATA, 0xff);
    cpu::outb(PIC2_DATA, 0xff);
}

fn ioapic_read(reg: u32) -> u32 {
    // SAFETY: the IOAPIC window is identity mapped by the guest's own tables (`paging`).
    unsafe {
        core::ptr::write_volatile((IOAPIC_BASE + IOAPIC_IOREGSEL) as *mut u32, reg);
        core::ptr::read_volatile((IOAPIC_BASE + IOAPIC_IOWIN) as *const u32)
    }
}

fn ioapic_write(reg: u32, value: u32) {
    // SAFETY: as `ioapic_read`.
    unsafe {
        core::ptr::write_volatile((IOAPIC_BASE + IOAPIC_IOREGSEL) as *mut u32, reg);
        core::ptr::write_volatile((IOAPIC_BASE + IOAPIC_IOWIN) as *mut u32, value);
    }
}

/// How one IOAPIC pin is programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinRoute {
    Masked,
    /// Edge-triggered, active high: ISA devices, and virtio-mmio through KVM
    /// irqfd without a resample fd, which pulses the line. (A level-triggered
    /// device would set REDTBL_LEVEL.)
    Edge,
}

/// The redirection-table entry (low, high) for a pin.
pub fn redirection_entry(pin: u32, route: PinRoute, dest_apic_id: u32) -> (u32, u32) {
    let vector = u32::from(IRQ_BASE_VECTOR) + pin;
    let low = match route {
        PinRoute::Masked => REDTBL_MASKED | vector,
        PinRoute::Edge => vector,
    };
    // Fixed delivery, physical destination mode, active high.
    debug_assert_eq!(low & REDTBL_ACTIVE_LOW, 0);
    (low, dest_apic_id << 24)
}

/// Programs every IOAPIC pin: `route(pin)` decides; all interrupts go to the
/// CPU with x2APIC ID `dest_apic_id`. Returns the number of pins.
pub fn setup_ioapic(dest_apic_id: u32, route: impl Fn(u32) -> PinRoute) -> u32 {
    let pins = ((ioapic_read(IOAPIC_REG_VERSION) >> 16) & 0xff) + 1;
    let pins = pins.min(IOAPIC_MAX_PINS as u32);
    for pin in 0..pins {
        let route = route(pin);
        let (low, high) = redirection_entry(pin, route, dest_apic_id);
        // A masked pin needs only its low word. For a routed pin the
        // destination goes first; interrupts are off, so an entry briefly
        // live with the old destination does no harm.
        if route != PinRoute::Masked {
            ioapic_write(IOAPIC_REG_REDTBL + 2 * pin + 1, high);
        }
        ioapic_write(IOAPIC_REG_REDTBL + 2 * pin, low);
    }
    pins
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_count_for_100_hz_at_1_ghz() {
        assert_eq!(timer_count(KVM_APIC_BUS_HZ, 100), 625_000);
        assert_eq!(timer_count(1, 100), 1);
        assert_eq!(timer_count(u64::MAX, 1), u32::MAX);
    }

    #[test]
    fn timer_elapsed_across_a_reload() {
        assert_eq!(timer_elapsed(500, 200, 1000), 300);
        assert_eq!(timer_elapsed(100, 900, 1000), 200);
        assert_eq!(timer_elapsed(100, 100, 1000), 0);
    }

    #[test]
    fn redirection_entries() {
        assert_eq!(redirection_entry(4, PinRoute::Edge, 0), (0x34, 0));
        assert_eq!(redirection_entry(5, PinRoute::Edge, 3), (0x35, 3 << 24));
        assert_eq!(redirection_entry(0, PinRoute::Masked, 0), (0x10030, 0));
    }
}
