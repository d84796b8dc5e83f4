//! What the guest does with an event, whichever path delivered it: faults
//! are reported and reset the VM; interrupts are acknowledged (timer ticks
//! are counted; device interrupts are handed to the agent as a bit in
//! `BootInfo::pending_irqs`, its drivers do the rest in user mode).
//!
//! Vectors: exceptions 0-31; LAPIC timer 0x20; IOAPIC pin N at 0x30 + N; the
//! wake-up IPI 0xf0; spurious 0xff.

#![cfg_attr(test, allow(dead_code))]

use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use crate::trap::TrapFrame;
use crate::{apic, cpu, pvm, serial, trap};

/// LAPIC timer vector.
pub const TIMER_VECTOR: u8 = 0x20;
/// Vector of IOAPIC pin 0; pin N uses `IRQ_BASE_VECTOR + N`.
pub const IRQ_BASE_VECTOR: u8 = 0x30;
/// IPI an AP sends the BSP after it reported in.
pub const WAKE_VECTOR: u8 = 0xf0;
/// LAPIC spurious-interrupt vector (never acknowledged).
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;

/// How events reach the guest (see `EventPath`), set once by the BSP at boot.
static PATH: AtomicU8 = AtomicU8::new(EventPath::Idt as u8);
/// LAPIC timer ticks seen by the BSP.
static TICKS: AtomicU64 = AtomicU64::new(0);

/// How events reach the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum EventPath {
    /// Through the IDT at CPL 0: hardware virtualization, or PVM emulating
    /// the guest's CPL-0 code (`trap`).
    Idt = 0,
    /// Through the IDT in PVM native mode: CPL 3, gates on CS 0x33 (`trap`).
    IdtNative = 1,
    /// Through PVM's event entry and the PVCS (`pvm`).
    Pvm = 2,
}

/// Records which event path this guest uses.
pub fn set_path(path: EventPath) {
    PATH.store(path as u8, Ordering::Release);
}

/// The event path in use.
pub fn path() -> EventPath {
    match PATH.load(Ordering::Acquire) {
        1 => EventPath::IdtNative,
        2 => EventPath::Pvm,
        _ => EventPath::Idt,
    }
}

/// Whether the PVM event path is in use.
pub fn is_pvm() -> bool {
    path() == EventPath::Pvm
}

/// Whether an event with this frame interrupted user mode (the agent): only
/// the CPL-0 IDT path has a user mode; in native mode all code is at CPL 3.
fn from_user_mode(frame: &TrapFrame) -> bool {
    frame.cs & 3 == 3 && path() == EventPath::Idt
}

/// Timer ticks so far.
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Acquire)
}

/// The only place interrupts are ever enabled: halts until at least one event
/// was handled (or a spurious wake-up), and returns with interrupts disabled.
pub fn idle_wait() {
    if is_pvm() {
        pvm::idle_halt();
    } else {
        trap::idle_halt();
    }
}

/// Hardware path: called by the IDT stubs with the saved frame.
pub extern "C" fn hw_event(frame: &mut TrapFrame) {
    let vector = frame.vector as u8;
    if vector < 32 {
        let cr2 = if vector == 14 { trap::read_cr2() } else { 0 };
        fatal_fault(vector, frame, cr2);
    }
    interrupt(vector);
    // In the kernel, interrupts are only ever enabled in the idle halt: go
    // back to it with them disabled so no second event lands before its CLI
    // (native mode ignores the flag on IRETQ and returns with it clear
    // anyway). User mode always runs with them enabled.
    if !from_user_mode(frame) {
        frame.rflags &= !RFLAGS_IF;
    }
}

/// PVM path: called by the supervisor event entry; `frame.vector` holds the
/// whole PVCS event word.
pub extern "C" fn pvm_event(frame: &mut TrapFrame) {
    let word = frame.vector as u16;
    if word & pvm::PVM_PVCS_EVENT_VECTOR_MCE != 0 {
        fatal_fault(18, frame, 0);
    }
    if word & pvm::PVM_PVCS_EVENT_VECTOR_NMI != 0 {
        fatal_fault(2, frame, 0);
    }
    if word & pvm::PVM_PVCS_EVENT_VECTOR_STD != 0 {
        let vector = word as u8;
        if vector < 32 {
            // SAFETY: GS points at this CPU's area, whose first page is the PVCS.
            let cr2 = if vector == 14 {
                unsafe { pvcs_cr2() }
            } else {
                0
            };
            fatal_fault(vector, frame, cr2);
        }
        interrupt(vector);
    }
    frame.rflags &= !RFLAGS_IF;
}

/// PVM path: an event arrived at an entry this guest never expects (user
/// mode, or the first RFC's supervisor-exception entry).
pub extern "C" fn pvm_unexpected_entry() -> ! {
    serial::print_unlocked(format_args!(
        "testguest fault: unexpected PVM event entry\n"
    ));
    cpu::reset()
}

/// Reads PVCS::cr2 of the running CPU.
unsafe fn pvcs_cr2() -> u64 {
    let cr2: u64;
    core::arch::asm!(
        "mov {}, gs:[{off}]",
        out(reg) cr2,
        off = const core::mem::offset_of!(pvm::Pvcs, cr2),
        options(nostack, readonly, preserves_flags)
    );
    cr2
}

fn interrupt(vector: u8) {
    match vector {
        TIMER_VECTOR => {
            TICKS.fetch_add(1, Ordering::AcqRel);
        }
        // Nothing to acknowledge for a spurious interrupt.
        SPURIOUS_VECTOR => return,
        v if (IRQ_BASE_VECTOR..IRQ_BASE_VECTOR + apic::IOAPIC_MAX_PINS as u8).contains(&v) => {
            crate::usermode::note_irq(u32::from(v - IRQ_BASE_VECTOR));
        }
        _ => {}
    }
    apic::eoi();
}

fn fatal_fault(vector: u8, frame: &TrapFrame, cr2: u64) -> ! {
    let mode = if from_user_mode(frame) {
        " (user mode)"
    } else {
        ""
    };
    serial::print_unlocked(format_args!(
        "testguest fault: vector {} rip {:#x} error {:#x} cr2 {:#x} rsp {:#x}{}\n",
        vector, frame.rip, frame.error, cr2, frame.rsp, mode
    ));
    cpu::reset()
}
