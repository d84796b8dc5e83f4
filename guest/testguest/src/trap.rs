//! Event handling on hardware-virtualized KVM (VMX/SVM) and on any hypervisor
//! that delivers events through the IDT: per-CPU GDT and TSS, one constant
//! IDT, entry stubs, the frame both paths hand to `event`, the system call
//! entry and the idle halt.
//!
//! Every interrupt and exception gate uses an IST stack (interrupts IST1,
//! exceptions IST2), so the CPU never pushes a frame onto the interrupted
//! stack and its red zone survives. Interrupts do not nest: kernel code and
//! handlers run with IF=0, and a handler returns to kernel code with IF=0
//! (see `event`). User mode (the agent, see `usermode`) runs with IF=1.
//!
//! PVM native mode (the VMM enters the guest at CS 0x33 with PVM's native
//! control bit set, so PVM runs it at hardware CPL 3 and traps and emulates
//! its privileged instructions, measured on the project's machines): events
//! still come through this IDT, but the gates must name the current CS
//! (0x33), the TSS's RSP0 and ISTs are ignored (the frame lands on the
//! current stack, which is why interrupts stay limited to the idle halt), and
//! IRETQ does not restore the virtual IF. `setup_cpu` then loads a second
//! constant IDT (`idt_table_native`) and leaves the segment registers and TR
//! as the VMM set them.
//!
//! System calls are `int3` from user mode: the #BP gate (vector 3) is DPL 3
//! without IST, so the CPU switches to the TSS's RSP0 and `syscall_entry`
//! calls `usermode::syscall` there with interrupts off; a system call that
//! idles takes its interrupts on IST1, not on its stack. Not `int 0x80` or
//! SYSCALL: on the PVM KVM of the project's machines (measured) `int 0x80`
//! from user mode raises #UD, and SYSCALL jumps to MSR_LSTAR but stays at
//! CPL 3, while exceptions, #BP included, are delivered through the IDT
//! like on hardware.

#![cfg_attr(test, allow(dead_code))]

#[cfg(not(test))]
use crate::percpu::CpuArea;

/// IA32_GS_BASE.
pub const MSR_GS_BASE: u32 = 0xc000_0101;
/// The vector of system calls: #BP, raised by `int3`.
pub const SYSCALL_VECTOR: u8 = 3;
/// IA32_KERNEL_GS_BASE.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// Selectors of the guest's GDT; kernel code and data match the VMM's boot
/// GDT, user data and code sit where SYSRET would want them (STAR base 0x23,
/// as Linux), the TSS after them.
pub const KERNEL_CS: u16 = 0x10;
pub const KERNEL_DS: u16 = 0x18;
pub const USER_DS: u16 = 0x2b;
pub const USER_CS: u16 = 0x33;
const TSS_SEL: u16 = 0x38;
/// 64-bit code, DPL 0, present, long mode (same as the VMM's boot GDT).
const GDT_CODE64: u64 = 0x00af_9b00_0000_ffff;
/// Data, DPL 0, present, writable.
const GDT_DATA: u64 = 0x00cf_9300_0000_ffff;
/// Data, DPL 3, present, writable.
const GDT_USER_DATA: u64 = 0x00cf_f300_0000_ffff;
/// 64-bit code, DPL 3, present, long mode.
const GDT_USER_CODE64: u64 = 0x00af_fb00_0000_ffff;
/// Number of 8-byte GDT slots (the TSS descriptor takes the last two).
pub const GDT_SLOTS: usize = 9;
/// IST index for interrupts (vectors >= 32) and for exceptions.
const IST_IRQ: u8 = 1;
const IST_FAULT: u8 = 2;

/// The registers an event entry saves, lowest address first. Both event paths
/// build this frame: the hardware path from the CPU's interrupt frame, the PVM
/// path from the PVCS.
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    /// Vector (hardware) or the PVCS event word (PVM: flags in bits 8-10).
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// Where link.ld places the entry stubs. The IDT is then a constant table
/// the assembler computes (no boot-time construction: every guest
/// instruction counts when the hypervisor emulates them).
pub const TRAP_STUBS_ADDR: u64 = 0x20_1000;

/// Per-CPU setup on the IDT paths: GDT with a TSS whose RSP0 (system calls)
/// and IST1/IST2 point at this CPU's stacks, segment reload, TR, IDT, GS base.
/// In PVM native mode (`native`): GDT, the native IDT and GS base only.
#[cfg(not(test))]
pub fn setup_cpu(area: &mut CpuArea, native: bool) {
    use core::arch::asm;

    let tss_addr = area.info.tss.as_ptr() as u64;
    let tss_limit = (core::mem::size_of_val(&area.info.tss) - 1) as u64;
    let irq_top = area.irq_stack_top();
    let rsp0 = area.stack_top();
    let fault_top = area.info.fault_stack_top;
    // The area is zero (.bss) and set up once, so only non-zero fields are
    // written: zero-filling would make LLVM emit SSE (see tests/image.rs).
    let tss = &mut area.info.tss;
    // 64-bit TSS: RSP0 at byte 4, IST1 at 36, IST2 at 44, I/O map base at 102.
    let set64 = |tss: &mut [u32; 26], byte: usize, v: u64| {
        tss[byte / 4] = v as u32;
        tss[byte / 4 + 1] = (v >> 32) as u32;
    };
    // System calls run on the normal stack: user mode never returns to the
    // kernel code that entered it.
    set64(tss, 4, rsp0);
    set64(tss, 36 + 8 * (IST_IRQ as usize - 1), irq_top);
    set64(tss, 36 + 8 * (IST_FAULT as usize - 1), fault_top);
    // No I/O permission bitmap: its offset is the TSS limit + 1.
    tss[25] = 104 << 16;

    let gdt = &mut area.info.gdt;
    gdt[(KERNEL_CS >> 3) as usize] = GDT_CODE64;
    gdt[(KERNEL_DS >> 3) as usize] = GDT_DATA;
    gdt[(USER_DS >> 3) as usize] = GDT_USER_DATA;
    gdt[(USER_CS >> 3) as usize] = GDT_USER_CODE64;
    // Available 64-bit TSS (type 9), present, DPL 0; 16-byte descriptor.
    let tss_slot = (TSS_SEL >> 3) as usize;
    gdt[tss_slot] = (tss_limit & 0xffff)
        | ((tss_addr & 0xff_ffff) << 16)
        | (0x89 << 40)
        | ((tss_limit >> 16) & 0xf) << 48
        | ((tss_addr >> 24) & 0xff) << 56;
    gdt[tss_slot + 1] = tss_addr >> 32;

    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let gdtr = Pointer {
        limit: (core::mem::size_of_val(gdt) - 1) as u16,
        base: gdt.as_ptr() as u64,
    };
    let idt = if native {
        entry::idt_table_native as *const () as u64
    } else {
        entry::idt_table as *const () as u64
    };
    let idtr = Pointer {
        limit: (16 * 256 - 1) as u16,
        base: idt,
    };
    let base = area.addr();
    if native {
        // SAFETY: the GDT keeps the user selectors the VMM entered us with
        // (0x33, 0x2b); the IDT lives as long as the guest.
        unsafe {
            asm!("lgdt [{gdtr}]", "lidt [{idtr}]", gdtr = in(reg) &gdtr, idtr = in(reg) &idtr);
            crate::cpu::wrmsr(MSR_GS_BASE, base);
            crate::cpu::wrmsr(MSR_KERNEL_GS_BASE, base);
        }
        return;
    }
    // SAFETY: the GDT keeps the selectors the VMM booted us with, so the
    // reloads are valid; the TSS and IDT live as long as the guest.
    unsafe {
        asm!(
            "lgdt [{gdtr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ss, {ds:x}",
            "mov ds, {ds:x}",
            "mov es, {ds:x}",
            "mov fs, {ds:x}",
            "mov gs, {ds:x}",
            "ltr {tss:x}",
            "lidt [{idtr}]",
            gdtr = in(reg) &gdtr,
            idtr = in(reg) &idtr,
            cs = in(reg) u64::from(KERNEL_CS),
            ds = in(reg) u64::from(KERNEL_DS),
            tss = in(reg) u64::from(TSS_SEL),
            tmp = out(reg) _,
        );
        // After the GS selector load, which may clear the base.
        crate::cpu::wrmsr(MSR_GS_BASE, base);
        crate::cpu::wrmsr(MSR_KERNEL_GS_BASE, base);
    }
}

/// Idle until an event has been handled: `STI; HLT` (the STI shadow makes
/// the pair atomic), then interrupts off again.
pub fn idle_halt() {
    #[cfg(not(test))]
    // SAFETY: assembly routine with the C ABI; see `entry`.
    unsafe {
        entry::hw_idle_halt()
    }
}

/// CR2 (the faulting address of a #PF).
pub fn read_cr2() -> u64 {
    let cr2: u64;
    // SAFETY: reads a control register.
    unsafe {
        core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags))
    }
    cr2
}

#[cfg(not(test))]
mod entry {
    use core::arch::global_asm;

    extern "C" {
        pub fn idt_table();
        pub fn idt_table_native();
        pub fn hw_idle_halt();
    }

    // One 16-byte stub per vector at TRAP_STUBS_ADDR + 16 * vector: push a
    // zero error code where the CPU pushes none, push the vector, go to the
    // common path. The common path saves the GPRs and the SSE state (compiled
    // handlers may use XMM registers, and user mode's must survive), calls
    // `event::hw_event` with the frame, and returns with IRETQ.
    //
    // The stub of the system call vector jumps to `syscall_entry`, which
    // calls `usermode::syscall(a0, a1, a2, number)` on the RSP0 stack and
    // returns its result in RAX. It saves nothing the C ABI lets a callee
    // clobber: the caller declares those clobbered (see testguest-abi).
    //
    // The IDT: interrupt gates (type 0xe, present, DPL 0) to the stubs, on
    // IST2 for exceptions and IST1 for everything else; the system call gate
    // is DPL 3 without IST. The native-mode IDT: the same gates with the
    // selector 0x33 and no IST.
    global_asm!(
        r#"
        .pushsection .text.trap_stubs, "ax"
        .balign 16
        .globl trap_stubs
    trap_stubs:
        .set trap_vec, 0
        .rept 256
        .balign 16
        .if trap_vec == {syscall_vector}
        jmp syscall_entry
        .else
        .if (trap_vec == 8) || (trap_vec == 10) || (trap_vec == 11) || (trap_vec == 12) || (trap_vec == 13) || (trap_vec == 14) || (trap_vec == 17) || (trap_vec == 21) || (trap_vec == 29) || (trap_vec == 30)
        .else
        pushq $0
        .endif
        pushq $trap_vec
        jmp trap_common
        .endif
        .set trap_vec, trap_vec + 1
        .endr

    trap_common:
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
        add $16, %rsp
        iretq

    syscall_entry:
        cld
        /* The CPU pushed five words onto the 16-byte aligned RSP0. */
        sub $8, %rsp
        mov %rax, %rcx
        call {syscall}
        add $8, %rsp
        iretq

        .globl hw_idle_halt
    hw_idle_halt:
        sti
        hlt
        cli
        ret
        .popsection

        .macro idt_gates selector, with_ist
        .set idt_vec, 0
        .rept 256
        .set idt_handler, {stubs} + 16 * idt_vec
        .word idt_handler & 0xffff
        .word \selector
        .if idt_vec == {syscall_vector}
        .byte 0
        .byte 0xee
        .elseif \with_ist == 0
        .byte 0
        .byte 0x8e
        .elseif idt_vec < 32
        .byte {ist_fault}
        .byte 0x8e
        .else
        .byte {ist_irq}
        .byte 0x8e
        .endif
        .word (idt_handler >> 16) & 0xffff
        .long idt_handler >> 32
        .long 0
        .set idt_vec, idt_vec + 1
        .endr
        .endm

        .pushsection .rodata.idt, "a"
        .balign 16
        .globl idt_table
    idt_table:
        idt_gates {cs}, 1
        .globl idt_table_native
    idt_table_native:
        idt_gates {user_cs}, 0
        .popsection
        "#,
        dispatch = sym crate::event::hw_event,
        syscall = sym crate::usermode::syscall,
        syscall_vector = const super::SYSCALL_VECTOR,
        stubs = const super::TRAP_STUBS_ADDR,
        cs = const super::KERNEL_CS,
        user_cs = const super::USER_CS,
        ist_fault = const super::IST_FAULT,
        ist_irq = const super::IST_IRQ,
        options(att_syntax)
    );
}
