//! `_start`, the ELF entry point every vCPU enters (Linux 64-bit boot
//! protocol plus minivmm's extension): long mode, paging on, interrupts off,
//! RSI = zero page, RDI = vCPU index. The protocol promises an identity map
//! of the kernel, the zero page and the command line only (Firecracker maps
//! the first 1 GiB) and not SSE (Firecracker enters with CR4 = PAE), so before
//! anything else `_start` turns SSE on (CR0.MP set, CR0.EM clear, CR4.OSFXSR
//! and OSXMMEXCPT: the compiler uses SSE moves anywhere) and loads the
//! guest's own page tables (`paging`: the IOAPIC, the LAPIC and the
//! virtio-mmio windows lie above 1 GiB). Only then does it move to this CPU's
//! stack in .bss and call `kernel::rust_entry`.
//! Also the "minivmm" ELF notes that ask the VMM to start every vCPU here,
//! and (on PVM) to start them in native mode.

use core::arch::global_asm;

use crate::cmdline::MAX_CPUS;
use crate::percpu::{CpuArea, CPU_AREAS, STACK_TOP_OFFSET};

/// CR0.MP: WAIT/FWAIT honour TS (SDM Vol. 3A §2.5; set for SSE, §13.1.3).
const CR0_MP: u64 = 1 << 1;
/// CR0.EM: x87/SSE instructions raise #UD when set (SDM Vol. 3A §2.5).
const CR0_EM: u64 = 1 << 2;
/// CR4.OSFXSR: the OS supports FXSAVE/FXRSTOR and SSE (SDM Vol. 3A §2.5).
const CR4_OSFXSR: u64 = 1 << 9;
/// CR4.OSXMMEXCPT: SIMD floating-point exceptions raise #XM (SDM Vol. 3A §2.5).
const CR4_OSXMMEXCPT: u64 = 1 << 10;

global_asm!(
    r#"
    .pushsection .text.entry, "ax"
    .globl _start
_start:
    cld
    /* SSE on. Each control register is written only if it must change:
       under PVM every access is trapped or emulated. RSI and RDI (the boot
       arguments) are left alone. */
    mov %cr0, %rax
    mov %rax, %rcx
    or ${cr0_set}, %rax
    and ${cr0_keep}, %rax
    cmp %rax, %rcx
    je 6f
    mov %rax, %cr0
6:
    mov %cr4, %rax
    mov %rax, %rcx
    or ${cr4_set}, %rax
    cmp %rax, %rcx
    je 7f
    mov %rax, %cr4
7:
    /* Our own identity map of everything we touch, whatever the VMM's
       tables covered; from here no address depends on the VMM's map. */
    lea guest_pml4(%rip), %rax
    mov %rax, %cr3
    cmp ${max_cpus}, %rdi
    jae 2f
    imul ${area_size}, %rdi, %rax
    lea {areas}(%rip), %rsp
    add %rax, %rsp
    add ${stack_top}, %rsp
    xor %ebp, %ebp
    /* rust_entry(cpu = rdi, boot_params = rsi) */
    call {rust_entry}
    ud2
2:
    /* No per-CPU area for this vCPU index: say so and stop this vCPU. */
    lea 4f(%rip), %rsi
    mov $0x3f8, %dx
3:
    lodsb
    test %al, %al
    jz 5f
    out %al, %dx
    jmp 3b
5:
    cli
    hlt
    jmp 5b
    .popsection

    .pushsection .rodata.entry, "a"
4:
    .asciz "testguest fault: vCPU index out of range, vCPU stopped\n"
    .popsection

    /* ELF note "minivmm", type 0x4d560001, no descriptor: the VMM starts
       every vCPU at e_entry in 64-bit mode (no INIT/SIPI). */
    .pushsection .note.minivmm, "a", @note
    .balign 4
    .long 8             /* namesz, including the NUL */
    .long 0             /* descsz */
    .long 0x4d560001    /* type */
    .asciz "minivmm"
    .balign 4
    /* ELF note "minivmm", type 0x4d560002, no descriptor: on PVM, enter us
       in native mode (CS 0x33; see trap.rs for what the kernel does then). */
    .long 8
    .long 0
    .long 0x4d560002
    .asciz "minivmm"
    .balign 4
    .popsection
    "#,
    cr0_set = const CR0_MP,
    cr0_keep = const !(CR0_EM as i64),
    cr4_set = const CR4_OSFXSR | CR4_OSXMMEXCPT,
    max_cpus = const MAX_CPUS,
    area_size = const core::mem::size_of::<CpuArea>(),
    stack_top = const STACK_TOP_OFFSET,
    areas = sym CPU_AREAS,
    rust_entry = sym crate::kernel::rust_entry,
    options(att_syntax)
);
