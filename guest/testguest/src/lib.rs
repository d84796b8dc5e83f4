//! minivmm's test guest: a freestanding x86_64 kernel entered by the Linux
//! 64-bit boot protocol (zero page in RSI) plus the minivmm extension that
//! every vCPU starts at `e_entry` with its index in RDI. All of it lives in
//! this library so that its pure logic is unit-tested on the host
//! (`cargo test`); `main.rs` only links it.
//!
//! It runs under PVM (events through `MSR_PVM_EVENT_ENTRY` and the PVCS, see
//! `pvm`) and under hardware KVM (GDT/TSS/IDT, see `trap`), brings up the
//! x2APIC timer and the IOAPIC, waits for every vCPU to report in, prints
//! `minivmm-testguest ready` and then does what `action=` on the command line
//! asks (see `cmdline::Action`).
//!
//! Red zone: this target compiles with the x86_64 red zone and that cannot be
//! turned off per crate, so no event may be delivered onto a stack in the
//! middle of compiled code. Two rules guarantee it: normal code always runs
//! with interrupts disabled (they are enabled only inside the idle wait,
//! `STI; HLT` or `PVM_HC_IRQ_HALT`, written in assembly), and event handlers
//! never run on the interrupted stack's red zone (hardware: IST stacks; PVM:
//! the handler first moves RSP 128 bytes down). Faults are fatal anyway.
//!
//! Instruction set: on the PVM KVM of the project's machines the guest's
//! supervisor code runs in KVM's instruction emulator (about 0.5 us per
//! instruction), which has no SSE arithmetic. The code avoids what makes LLVM
//! emit it and `tests/image.rs` checks the built image; see there.

#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod apic;
pub mod boot_params;
pub mod cmdline;
pub mod cpu;
pub mod event;
pub mod heap;
pub mod mem;
pub mod percpu;
pub mod pvm;
pub mod serial;
pub mod smp;
pub mod trap;

#[cfg(not(test))]
mod entry;

#[cfg(not(test))]
mod kernel;
