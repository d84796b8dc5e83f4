//! Thin wrappers over the x86 instructions the guest needs: port I/O, MSRs,
//! CPUID, and the detection of PVM's synthetic CPUID.

#![cfg_attr(test, allow(dead_code))]

use core::arch::asm;

/// Writes one byte to an I/O port.
#[inline]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a model-specific register.
///
/// # Safety
/// The MSR must exist (else #GP, which is fatal here).
#[inline]
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a model-specific register.
///
/// # Safety
/// The MSR must exist and the value must be valid for it.
#[inline]
pub unsafe fn wrmsr(msr: u32, value: u64) {
    asm!(
        "wrmsr",
        in("ecx") msr,
        in("eax") value as u32,
        in("edx") (value >> 32) as u32,
        options(nostack, preserves_flags)
    );
}

/// The four registers CPUID returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidResult {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Plain CPUID (hardware KVM).
pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    let (eax, ebx, ecx, edx): (u32, u32, u32, u32);
    // SAFETY: CPUID has no memory effects. RBX is reserved by LLVM, so it is
    // saved and restored around the instruction.
    unsafe {
        asm!(
            "mov {tmp:r}, rbx",
            "cpuid",
            "xchg {tmp:r}, rbx",
            tmp = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") subleaf => ecx,
            out("edx") edx,
            options(nomem, nostack, preserves_flags)
        );
    }
    CpuidResult { eax, ebx, ecx, edx }
}

/// PVM_SYNTHETIC_CPUID: `invlpg 0xffffffffff4d5650; cpuid` (pvm_para.h). Under
/// PVM the hypervisor emulates both instructions and answers for the PVM
/// guest; on real or hardware-virtualized CPUs at CPL 0 the INVLPG is a
/// harmless TLB flush of one unmapped address and CPUID is the normal one.
pub fn pvm_synthetic_cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    let (eax, ebx, ecx, edx): (u32, u32, u32, u32);
    // SAFETY: as `cpuid`; the INVLPG only drops a TLB entry.
    unsafe {
        asm!(
            "mov {tmp:r}, rbx",
            ".byte 0x0f, 0x01, 0x3c, 0x25, 0x50, 0x56, 0x4d, 0xff, 0x0f, 0xa2",
            "xchg {tmp:r}, rbx",
            tmp = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") subleaf => ecx,
            out("edx") edx,
            options(nostack, preserves_flags)
        );
    }
    CpuidResult { eax, ebx, ecx, edx }
}

/// The RFLAGS register as the CPU reports it (PUSHF is not trapped by PVM, so
/// under PVM this is the underlying value with IF=1).
pub fn read_rflags() -> u64 {
    let flags: u64;
    // SAFETY: pushes and pops one word on the stack.
    unsafe { asm!("pushfq", "pop {}", out(reg) flags, options(nomem, preserves_flags)) }
    flags
}

/// The CS selector as the CPU reports it (under PVM: the underlying one, RPL 3).
pub fn read_cs() -> u16 {
    let cs: u16;
    // SAFETY: reads a segment register.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) }
    cs
}

/// `pause` for the short spin-waits (AP start-up, serial lock).
#[inline]
pub fn relax() {
    core::hint::spin_loop();
}

/// Requests a machine reset from the i8042 (the VMM ends the VM). Never returns.
pub fn reset() -> ! {
    const I8042_COMMAND: u16 = 0x64;
    const I8042_CMD_RESET: u8 = 0xfe;
    outb(I8042_COMMAND, I8042_CMD_RESET);
    // The VMM should not come back here; if it does, stop this vCPU for good
    // (interrupts stay disabled so HLT only ends on NMI/INIT).
    loop {
        // SAFETY: stops the CPU until an NMI.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}
