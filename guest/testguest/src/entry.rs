//! `_start`, the ELF entry point every vCPU enters (Linux 64-bit boot
//! protocol plus minivmm's extension): long mode, paging on (identity map of
//! the first 16 GiB), interrupts off, RSI = zero page, RDI = vCPU index. It
//! moves to this CPU's stack in .bss at once and calls `kernel::rust_entry`.
//! Also the "minivmm" ELF notes that ask the VMM to start every vCPU here,
//! and (on PVM) to start them in native mode.

use core::arch::global_asm;

use crate::cmdline::MAX_CPUS;
use crate::percpu::{CpuArea, CPU_AREAS, STACK_TOP_OFFSET};

global_asm!(
    r#"
    .pushsection .text.entry, "ax"
    .globl _start
_start:
    cld
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
    max_cpus = const MAX_CPUS,
    area_size = const core::mem::size_of::<CpuArea>(),
    stack_top = const STACK_TOP_OFFSET,
    areas = sym CPU_AREAS,
    rust_entry = sym crate::kernel::rust_entry,
    options(att_syntax)
);
