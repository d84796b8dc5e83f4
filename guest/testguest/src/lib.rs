//! minivmm's test guest kernel: a freestanding x86_64 kernel entered by the
//! Linux 64-bit boot protocol (zero page in RSI) plus the minivmm extension
//! that every vCPU starts at `e_entry` with its index in RDI. All of it lives
//! in this library so that its pure logic is unit-tested on the host
//! (`cargo test`); `main.rs` only links it.
//!
//! It runs under hardware KVM and under the PVM KVM of the project's machines
//! either emulated at CPL 0 or in PVM native mode at CPL 3 (all through the
//! IDT, see `trap`), and under PVM proper (events through
//! `MSR_PVM_EVENT_ENTRY` and the PVCS, see `pvm`). It brings up the x2APIC
//! timer and the IOAPIC, waits for every vCPU to report in, and starts the
//! agent (`usermode`; its own crate, `agent/`): in user mode when the kernel
//! runs at CPL 0, by a plain call when it runs natively at CPL 3. The agent
//! drives the virtio devices and answers the host; once it listens it asks
//! the kernel to print `minivmm-testguest ready` and to run what `action=` on
//! the command line asks (see `cmdline::Action`).
//!
//! Red zone: this target compiles with the x86_64 red zone and that cannot be
//! turned off per crate, so no event may be delivered onto a stack in the
//! middle of compiled code. Two rules guarantee it: kernel code always runs
//! with interrupts disabled (they are enabled only inside the idle wait,
//! `STI; HLT` or `PVM_HC_IRQ_HALT`, written in assembly, and in user mode,
//! which events leave through a stack switch), and event handlers never run
//! on the interrupted stack's red zone (hardware: IST stacks; PVM: the
//! handler first moves RSP 128 bytes down). Faults are fatal anyway.
//!
//! Instruction set: unless the VMM enters it in native mode, the PVM KVM of
//! the project's machines runs the guest's CPL-0 code in KVM's instruction
//! emulator (about 0.5 us per instruction), which has no SSE arithmetic. The
//! kernel avoids what makes LLVM emit it and `tests/image.rs` checks the
//! built image; see there. The agent always runs natively (user mode, or
//! native mode) and is free to use SSE.

#![cfg_attr(not(test), no_std)]

pub mod apic;
pub mod boot_params;
pub mod cmdline;
pub mod cpu;
pub mod event;
pub mod kvmclock;
pub mod paging;
pub mod percpu;
pub mod pvm;
pub mod serial;
pub mod smp;
pub mod trap;
pub mod usermode;

#[cfg(not(test))]
mod entry;

#[cfg(not(test))]
mod kernel;
