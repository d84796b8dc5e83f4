//! PVM guest support: detection, per-CPU event setup, the event entry and the
//! idle halt, after virt-pvm/linux `Documentation/virt/kvm/x86/pvm-spec.rst`
//! and `arch/x86/include/uapi/asm/pvm_para.h` (the revision with the 128-byte
//! PVCS whose `event_vector` carries PVM_PVCS_EVENT_VECTOR_STD, supervisor
//! events at MSR_PVM_EVENT_ENTRY + 512 on the interrupted stack, and return
//! through the SYSCALL at MSR_PVM_RETS_RIP).
//!
//! Under PVM the guest kernel runs at hardware CPL 3: the IDT is ignored and
//! every event (exception, interrupt) is delivered by the hypervisor to the
//! event entry with the interrupted RIP/RFLAGS/RCX/R11 saved in the PVCS, RSP
//! unchanged, RCX = RIP = entry, R11 = IF|FIXED, and the PVCS IF flag
//! cleared. The entry below:
//!   1. moves RSP 128 bytes down first (the interrupted code may keep data in
//!      its red zone) and builds the same frame as the hardware path,
//!   2. takes the event word with one XCHG (which also clears
//!      PVM_PVCS_EVENT_VECTOR_STD: from then on a nested event, e.g. a fault
//!      in the handler, can be delivered instead of becoming a triple fault),
//!   3. calls `event::pvm_event`,
//!   4. sets PVM_PVCS_EVENT_VECTOR_STD again before writing the return state
//!      (RIP, RFLAGS, RCX, R11) into the PVCS, reloads the interrupted RSP and
//!      executes the SYSCALL at MSR_PVM_RETS_RIP (ERETS), which resumes it.
//!
//! Interrupts are enabled only by `pvm_idle_halt` (PVM_HC_IRQ_HALT = "STI;
//! HLT"); the handler always returns with IF clear, like the hardware path.
//!
//! NOT TESTED on a PVM hypervisor: the `kvm_pvm` module of the project's
//! machines runs 64-bit supervisor code in KVM's instruction emulator and
//! presents a native-looking vCPU (CS reads 0x10, PUSHF shows the virtual
//! IF, MSRs 0x4b564df0-0x4b564df7 raise #GP, KVM_CPUID_VENDOR_FEATURES has no
//! PVM signature, events are delivered through the IDT), so the spec's
//! detection finds no PVM there and the hardware path (`trap`) runs.

#![cfg_attr(test, allow(dead_code))]

use crate::cpu::{self, CpuidResult};
use crate::percpu::CpuArea;

/// `MSR_PVM_VCPU_STRUCT`: guest-physical address of this vCPU's PVCS page.
pub const MSR_PVM_VCPU_STRUCT: u32 = 0x4b56_4df1;
/// `MSR_PVM_EVENT_ENTRY`: user events enter here, supervisor events at +512.
pub const MSR_PVM_EVENT_ENTRY: u32 = 0x4b56_4df4;
/// `MSR_PVM_RETU_RIP`: the SYSCALL there is ERETU (return to user mode).
pub const MSR_PVM_RETU_RIP: u32 = 0x4b56_4df5;
/// `MSR_PVM_RETS_RIP`: the SYSCALL there is ERETS (return to supervisor mode).
pub const MSR_PVM_RETS_RIP: u32 = 0x4b56_4df6;
/// First PVM-specific hypercall number (pvm_para.h PVM_HC_SPECIAL_BASE).
const PVM_HC_SPECIAL_BASE: u32 = 0x1708_8200;
/// `PVM_HC_IRQ_HALT`: "STI; HLT" in one hypercall.
pub const PVM_HC_IRQ_HALT: u32 = PVM_HC_SPECIAL_BASE + 2;
/// `PVCS::event_flags` bit 9: interrupts enabled (supervisor mode).
pub const PVM_EVENT_FLAGS_IF_BIT: u32 = 9;
/// `PVCS::event_vector` bit 8: a standard (non-async) event is being delivered.
pub const PVM_PVCS_EVENT_VECTOR_STD_BIT: u32 = 8;
/// `PVCS::event_vector` bit 8 as a mask.
pub const PVM_PVCS_EVENT_VECTOR_STD: u16 = 1 << PVM_PVCS_EVENT_VECTOR_STD_BIT;
/// `PVCS::event_vector` bit 9: an NMI is being delivered or pending.
pub const PVM_PVCS_EVENT_VECTOR_NMI: u16 = 1 << 9;
/// `PVCS::event_vector` bit 10: an MCE is being delivered or pending.
pub const PVM_PVCS_EVENT_VECTOR_MCE: u16 = 1 << 10;
/// `KVM_CPUID_SIGNATURE` leaf and its "KVMKVMKVM\0\0\0" answer.
const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
/// `KVM_CPUID_VENDOR_FEATURES`: EBX is PVM_CPUID_SIGNATURE under PVM.
const KVM_CPUID_VENDOR_FEATURES: u32 = 0x4000_0002;
const PVM_CPUID_SIGNATURE: u32 = 0x004d_5650;
/// IA32_STAR: kernel CS 0x10 (SS 0x18) as the VMM entered us, user CS32 0x23
/// (so user CS = 0x33 and user SS = 0x2b, which PVM requires to be the host's).
const MSR_STAR: u32 = 0xc000_0081;
const STAR_VALUE: u64 = (0x23 << 48) | (0x10 << 32);
/// RFLAGS.IF.
const X86_EFLAGS_IF: u64 = 1 << 9;

/// The PVM vCPU structure ("PVCS"), one page per vCPU.
#[repr(C, align(4096))]
pub struct Pvcs {
    pub event_flags: u64,
    pub cr2: u64,
    pub reserved0: [u64; 6],
    pub user_cs: u16,
    pub user_ss: u16,
    pub event_errcode: u16,
    pub event_vector: u16,
    pub user_gsbase: u64,
    pub eflags: u32,
    pub pkru: u32,
    pub rip: u64,
    pub rcx: u64,
    pub r11: u64,
    pub reserved1: [u64; 2],
}

const _: () = {
    assert!(core::mem::offset_of!(Pvcs, user_cs) == 64);
    assert!(core::mem::offset_of!(Pvcs, event_vector) == 70);
    assert!(core::mem::offset_of!(Pvcs, rip) == 88);
    assert!(core::mem::offset_of!(Pvcs, r11) == 104);
    assert!(core::mem::offset_of!(CpuArea, pvcs) == 0);
};

/// The spec's boot-time detection ("PVM booting sequence"): the underlying
/// RFLAGS.IF is 1 (PVM runs the guest with it set; the VMM entered us with
/// IF=0), the underlying CPL is 3, and the synthetic CPUID reports the KVM
/// signature with the PVM signature in KVM_CPUID_VENDOR_FEATURES. None of
/// these traps outside PVM, so it is safe before any event handling exists.
pub fn detect() -> bool {
    if cpu::read_rflags() & X86_EFLAGS_IF == 0 {
        return false;
    }
    if cpu::read_cs() & 3 != 3 {
        return false;
    }
    let sig = cpu::pvm_synthetic_cpuid(KVM_CPUID_SIGNATURE, 0);
    if [sig.ebx, sig.ecx, sig.edx] != KVM_SIGNATURE || sig.eax < KVM_CPUID_VENDOR_FEATURES {
        return false;
    }
    cpu::pvm_synthetic_cpuid(KVM_CPUID_VENDOR_FEATURES, 0).ebx == PVM_CPUID_SIGNATURE
}

/// CPUID as PVM wants it from supervisor code (plain CPUID may not trap).
pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    cpu::pvm_synthetic_cpuid(leaf, subleaf)
}

/// Per-CPU PVM event setup: GS base, PVCS, event entry, ERETS address, STAR.
/// The MSR writes trap to the hypervisor (the guest runs at CPL 3).
pub fn setup_cpu(area: &mut CpuArea) {
    area.pvcs.event_flags = 0;
    area.pvcs.event_vector = 0;
    let base = area.addr();
    // SAFETY: architectural / PVM MSRs with valid values; GS base points at
    // this CPU's area for as long as the guest runs.
    unsafe {
        cpu::wrmsr(crate::trap::MSR_GS_BASE, base);
        cpu::wrmsr(crate::trap::MSR_KERNEL_GS_BASE, base);
        cpu::wrmsr(MSR_STAR, STAR_VALUE);
        cpu::wrmsr(MSR_PVM_VCPU_STRUCT, base);
        cpu::wrmsr(
            MSR_PVM_EVENT_ENTRY,
            entry::pvm_event_entry as *const () as u64,
        );
        cpu::wrmsr(MSR_PVM_RETS_RIP, entry::pvm_rets_rip as *const () as u64);
        // Never used (no user mode), but a stray SYSCALL elsewhere must not
        // be taken for ERETU.
        cpu::wrmsr(MSR_PVM_RETU_RIP, entry::pvm_retu_rip as *const () as u64);
    }
}

/// Idle until an event has been handled: PVM_HC_IRQ_HALT, then interrupts off.
pub fn idle_halt() {
    // SAFETY: assembly routine with the C ABI; see `entry`.
    unsafe { entry::pvm_idle_halt() }
}

#[cfg(not(test))]
mod entry {
    use core::arch::global_asm;
    use core::mem::offset_of;

    use super::*;
    use crate::percpu::FAULT_STACK_TOP_OFFSET;
    use crate::trap::TrapFrame;

    extern "C" {
        pub fn pvm_event_entry();
        pub fn pvm_rets_rip();
        pub fn pvm_retu_rip();
        pub fn pvm_idle_halt();
    }

    // Frame slots (relative to the vector slot, i.e. after the GPRs).
    global_asm!(
        r#"
        .pushsection .text.pvm_event_entry, "ax"
        .balign 4096
        .globl pvm_event_entry
    pvm_event_entry:
        /* +0: events from user mode. The guest has no user mode. */
        jmp pvm_unexpected_entry
        .org pvm_event_entry + 256, 0xcc
        /* +256: supervisor exceptions in the first PVM RFC (frame on the
           stack); unexpected with the revision this code follows. */
        jmp pvm_unexpected_entry
        .org pvm_event_entry + 512, 0xcc
    pvm_supervisor_entry:
        mov %rsp, %r11
        sub $128, %rsp              /* the interrupted red zone */
        and $-16, %rsp
        pushq $0x18                 /* ss */
        push %r11                   /* rsp */
        sub $40, %rsp               /* rflags, cs, rip, error, vector */
        push %rax
        push %rbx
        push %rcx
        push %rdx
        push %rsi
        push %rdi
        push %rbp
        push %r8
        push %r9
        push %r10
        push %r11
        push %r12
        push %r13
        push %r14
        push %r15
        mov %gs:{pvcs_rcx}, %rax
        mov %rax, {f_rcx}(%rsp)
        mov %gs:{pvcs_r11}, %rax
        mov %rax, {f_r11}(%rsp)
        mov %gs:{pvcs_rip}, %rax
        mov %rax, {f_rip}(%rsp)
        movl %gs:{pvcs_eflags}, %eax
        mov %rax, {f_rflags}(%rsp)
        movq $0x10, {f_cs}(%rsp)
        movzwl %gs:{pvcs_errcode}, %eax
        mov %rax, {f_error}(%rsp)
        xor %eax, %eax
        xchgw %ax, %gs:{pvcs_vector}
        mov %rax, {f_vector}(%rsp)
        cld
        mov %rsp, %rbx
        sub $512, %rsp
        fxsave64 (%rsp)
        mov %rbx, %rdi
        call {dispatch}
        fxrstor64 (%rsp)
        mov %rbx, %rsp
        pop %r15
        pop %r14
        pop %r13
        pop %r12
        pop %r11
        pop %r10
        pop %r9
        pop %r8
        pop %rbp
        pop %rdi
        pop %rsi
        pop %rdx
        pop %rcx
        pop %rbx
        pop %rax
        /* RSP is at the vector slot. Own the PVCS again, then hand it the
           state to return to. */
        btsw ${std_bit}, %gs:{pvcs_vector}
        mov %rcx, %gs:{pvcs_rcx}
        mov %r11, %gs:{pvcs_r11}
        mov 16(%rsp), %rcx          /* rip */
        mov %rcx, %gs:{pvcs_rip}
        mov 32(%rsp), %rcx          /* rflags */
        movl %ecx, %gs:{pvcs_eflags}
        mov 40(%rsp), %rsp          /* the interrupted rsp */
        .globl pvm_rets_rip
    pvm_rets_rip:
        syscall                     /* ERETS */
        ud2
        .globl pvm_retu_rip
    pvm_retu_rip:
        syscall                     /* ERETU: never executed */
        ud2

    pvm_unexpected_entry:
        mov %gs:{fault_stack}, %rsp
        call {unexpected}
        ud2

        .globl pvm_idle_halt
    pvm_idle_halt:
        /* Hypercall convention (pvm-spec.rst): RAX = number, R10 stands in
           for RCX, R10 and R11 preserved by the caller. */
        push %r11
        push %r10
        mov %rcx, %r10
        mov ${hc_irq_halt}, %eax
        syscall
        mov %r10, %rcx
        pop %r10
        pop %r11
        /* Woken without an event: IF is still set. */
        btrq ${if_bit}, %gs:{pvcs_flags}
        ret
        .popsection
        "#,
        pvcs_rcx = const offset_of!(Pvcs, rcx),
        pvcs_r11 = const offset_of!(Pvcs, r11),
        pvcs_rip = const offset_of!(Pvcs, rip),
        pvcs_eflags = const offset_of!(Pvcs, eflags),
        pvcs_errcode = const offset_of!(Pvcs, event_errcode),
        pvcs_vector = const offset_of!(Pvcs, event_vector),
        pvcs_flags = const offset_of!(Pvcs, event_flags),
        f_rcx = const offset_of!(TrapFrame, rcx),
        f_r11 = const offset_of!(TrapFrame, r11),
        f_rip = const offset_of!(TrapFrame, rip),
        f_rflags = const offset_of!(TrapFrame, rflags),
        f_cs = const offset_of!(TrapFrame, cs),
        f_error = const offset_of!(TrapFrame, error),
        f_vector = const offset_of!(TrapFrame, vector),
        std_bit = const PVM_PVCS_EVENT_VECTOR_STD_BIT,
        if_bit = const PVM_EVENT_FLAGS_IF_BIT,
        hc_irq_halt = const PVM_HC_IRQ_HALT,
        fault_stack = const FAULT_STACK_TOP_OFFSET,
        dispatch = sym crate::event::pvm_event,
        unexpected = sym crate::event::pvm_unexpected_entry,
        options(att_syntax)
    );

    const _: () = {
        assert!(offset_of!(TrapFrame, rip) - offset_of!(TrapFrame, vector) == 16);
        assert!(offset_of!(TrapFrame, rflags) - offset_of!(TrapFrame, vector) == 32);
        assert!(offset_of!(TrapFrame, rsp) - offset_of!(TrapFrame, vector) == 40);
    };
}

#[cfg(test)]
mod entry {
    pub extern "C" fn pvm_event_entry() {}
    pub extern "C" fn pvm_rets_rip() {}
    pub extern "C" fn pvm_retu_rip() {}
    pub unsafe extern "C" fn pvm_idle_halt() {}
}
