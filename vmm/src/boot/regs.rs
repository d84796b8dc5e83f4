//! The register state a vCPU starts with: 64-bit mode with paging on the
//! identity tables, flat segments from the boot GDT, boot MSRs, FPU defaults
//! and LAPIC LINT0/LINT1 wired as ExtINT/NMI.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, CpuId, Msrs};
use kvm_ioctls::VcpuFd;

use super::{cpuid, gdt};
use crate::layout::{BOOT_STACK_POINTER, GDT_START, PML4_START, ZERO_PAGE_START};

/// CR0: PE | MP | ET | NE | WP | AM | PG (DESIGN.md, measured on PVM).
pub const BOOT_CR0: u64 = 0x8005_0033;
/// CR4: PAE | OSFXSR | OSXMMEXCPT.
pub const BOOT_CR4: u64 = 0x620;
/// EFER: SCE | LME | LMA | NXE.
pub const BOOT_EFER: u64 = 0xd01;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// STAR: kernel CS 0x10 / SS 0x18 (bits 47:32), user CS32 0x23 and so user
/// CS 0x33 / SS 0x2b (bits 63:48) — Linux's layout, which matches our GDT.
/// The PVM spec derives a guest's supervisor selectors from STAR and requires
/// its user selectors to be the host's __USER_CS/__USER_DS. (It does not by
/// itself make this host's kvm_pvm run a vCPU natively: see
/// `PVM_NATIVE_CONTROL_MSR`.)
pub const BOOT_STAR: u64 = 0x0023_0010_0000_0000;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default type write-back.
const MTRR_DEF_TYPE_WB_ENABLED: u64 = (1 << 11) | 6;

/// LAPIC register offsets and LVT delivery modes (SDM Vol. 3A §11.5.1).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM ioctl failed.
    #[error("vCPU {vcpu}: {what} failed: {source}")]
    Ioctl {
        /// vCPU index.
        vcpu: u32,
        /// Which ioctl.
        what: &'static str,
        /// errno.
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only some MSRs.
    #[error("vCPU {vcpu}: KVM rejected boot MSR {index:#x}")]
    Msr {
        /// vCPU index.
        vcpu: u32,
        /// The first MSR KVM did not set.
        index: u32,
    },
}

/// The boot MSRs (all zero but MISC_ENABLE and the MTRR default type).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, BOOT_STAR),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_WB_ENABLED),
    ]
}

/// The general registers of the 64-bit entry for vCPU `id`.
pub fn boot_regs(entry: u64, id: u32) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        rdi: id as u64,
        rflags: 0x2,
        ..Default::default()
    }
}

fn ioctl<T>(
    vcpu: u32,
    what: &'static str,
    r: Result<T, kvm_ioctls::Error>,
) -> Result<T, RegsError> {
    r.map_err(|source| RegsError::Ioctl { vcpu, what, source })
}

/// Set CPUID, MSRs, LAPIC LINTs, FPU for any vCPU (BSP or AP).
pub fn configure_common(
    fd: &VcpuFd,
    id: u32,
    count: u32,
    supported: &CpuId,
) -> Result<(), RegsError> {
    let mut cpuid = supported.clone();
    cpuid::patch_cpuid(cpuid.as_mut_slice(), id, count);
    ioctl(id, "KVM_SET_CPUID2", fd.set_cpuid2(&cpuid))?;

    let msrs = boot_msrs();
    let wrapper = Msrs::from_entries(&msrs).expect("boot MSR list is small");
    let set = ioctl(id, "KVM_SET_MSRS", fd.set_msrs(&wrapper))?;
    if set < msrs.len() {
        return Err(RegsError::Msr {
            vcpu: id,
            index: msrs[set].index,
        });
    }

    let mut lapic = ioctl(id, "KVM_GET_LAPIC", fd.get_lapic())?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    ioctl(id, "KVM_SET_LAPIC", fd.set_lapic(&lapic))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    ioctl(id, "KVM_SET_FPU", fd.set_fpu(&fpu))
}

/// PVM control MSR of this host's kvm_pvm: bit 0 lets a vCPU that runs at
/// CPL 3 have its privileged instructions trapped and emulated ("native
/// mode"). Measured here; not part of the public PVM ABI.
pub const PVM_NATIVE_CONTROL_MSR: u32 = 0x4b56_4d10;
/// The bit of `PVM_NATIVE_CONTROL_MSR` that enables native mode.
pub const PVM_NATIVE_ENABLE: u64 = 1;

/// Put a vCPU at `entry` in 64-bit mode (BSP, or an AP of a direct-start
/// guest). With `pvm_native` the vCPU starts in PVM native mode: CS 0x33 and
/// SS 0x2b (DPL 3) and the native-mode bit set, so PVM runs it at hardware
/// speed instead of emulating every instruction of a CPL-0 guest.
pub fn configure_64bit_entry(
    fd: &VcpuFd,
    id: u32,
    entry: u64,
    pvm_native: bool,
) -> Result<(), RegsError> {
    let mut sregs = ioctl(id, "KVM_GET_SREGS", fd.get_sregs())?;
    let data = gdt::segment_from_gdt(gdt::GDT[3], 3);
    let (code, stack) = if pvm_native {
        let mut cs = gdt::segment_from_gdt(gdt::GDT[6], 6);
        cs.selector = gdt::USER_CODE_SELECTOR;
        let mut ss = gdt::segment_from_gdt(gdt::GDT[5], 5);
        ss.selector = gdt::USER_DATA_SELECTOR;
        let enable = Msrs::from_entries(&[kvm_msr_entry {
            index: PVM_NATIVE_CONTROL_MSR,
            data: PVM_NATIVE_ENABLE,
            ..Default::default()
        }])
        .expect("one MSR fits");
        if ioctl(id, "KVM_SET_MSRS", fd.set_msrs(&enable))? != 1 {
            return Err(RegsError::Msr {
                vcpu: id,
                index: PVM_NATIVE_CONTROL_MSR,
            });
        }
        (cs, ss)
    } else {
        (gdt::segment_from_gdt(gdt::GDT[2], 2), data)
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = stack;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (gdt::GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = BOOT_CR0;
    sregs.cr3 = PML4_START;
    sregs.cr4 = BOOT_CR4;
    sregs.efer = BOOT_EFER;
    ioctl(id, "KVM_SET_SREGS", fd.set_sregs(&sregs))?;
    ioctl(id, "KVM_SET_REGS", fd.set_regs(&boot_regs(entry, id)))?;
    // With an in-kernel irqchip KVM creates APs waiting for INIT/SIPI; a
    // directly started AP must be made runnable or it never runs.
    let runnable = kvm_bindings::kvm_mp_state {
        mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
    };
    ioctl(id, "KVM_SET_MP_STATE", fd.set_mp_state(runnable))
}

/// CR0.PE | CR0.PG: all the minimal Linux entry adds to KVM's reset CR0.
const CR0_PE_PG: u64 = 0x8000_0001;
/// CR4.PAE, the only CR4 bit of the minimal Linux entry.
pub const MINIMAL_CR4: u64 = 0x20;
/// EFER.LME | EFER.LMA, the minimal Linux entry's EFER.
const MINIMAL_EFER: u64 = 0x500;

/// Put the BSP at `entry` with only what the Linux 64-bit boot protocol
/// promises, the way Firecracker enters a guest (`EntryProtocol::
/// LinuxMinimal`): CPL 0, CR0 = KVM's reset value | PE | PG (no MP, NE or WP),
/// CR4 = PAE (no OSFXSR: SSE is the guest's to enable), EFER = LME | LMA, the
/// minimal tables (`paging::minimal_identity_tables`), RSI = zero page.
pub fn configure_minimal_linux_entry(fd: &VcpuFd, id: u32, entry: u64) -> Result<(), RegsError> {
    let mut sregs = ioctl(id, "KVM_GET_SREGS", fd.get_sregs())?;
    let data = gdt::segment_from_gdt(gdt::GDT[3], 3);
    sregs.cs = gdt::segment_from_gdt(gdt::GDT[2], 2);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (gdt::GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 |= CR0_PE_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 = MINIMAL_CR4;
    sregs.efer = MINIMAL_EFER;
    ioctl(id, "KVM_SET_SREGS", fd.set_sregs(&sregs))?;
    ioctl(id, "KVM_SET_REGS", fd.set_regs(&boot_regs(entry, id)))
}

/// Write the delivery mode of a LAPIC LVT register in a KVM LAPIC page.
fn set_lvt_mode(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_registers_follow_the_boot_protocol() {
        let r = boot_regs(0x20_0000, 1);
        assert_eq!(
            (r.rip, r.rsi, r.rdi, r.rflags),
            (0x20_0000, ZERO_PAGE_START, 1, 2)
        );
    }

    #[test]
    fn lvt_mode_keeps_other_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0x30;
        regs[APIC_LVT0 + 2] = 0x01; // mask bit 16
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0] as u8, 0x30);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(regs[APIC_LVT0 + 2] as u8, 0x01);
    }

    #[test]
    fn boot_msrs_enable_write_back_mtrrs() {
        let m = boot_msrs();
        assert!(m
            .iter()
            .any(|e| e.index == MSR_MTRR_DEF_TYPE && e.data == MTRR_DEF_TYPE_WB_ENABLED));
    }
}
