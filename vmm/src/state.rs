//! The saved state of a paused VM: every vCPU's registers (regs, sregs,
//! xsave, xcrs, LAPIC, MSRs, events, mp_state, debug registers, CPUID), the
//! VM's KVM clock, irqchip (PIC master/slave, IOAPIC) and PIT, and the legacy
//! devices. Plain serde data: the snapshot crate stores it without knowing
//! what is inside.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use devices::serial::SerialState;

/// kvm_clock_data.flags bit that must not be handed back to KVM_SET_CLOCK.
const KVM_CLOCK_TSC_STABLE: u32 = 2;
/// KVM's paravirtual MSRs (0x4b564d00-07) and this host's kvm_pvm MSRs
/// (0x4b564d10 control, 0x11-0x13 read-only), which KVM_GET_MSR_INDEX_LIST
/// does not list; whatever of them a vCPU can read is saved.
const PVM_MSR_RANGE: std::ops::RangeInclusive<u32> = 0x4b56_4d00..=0x4b56_4d13;

/// Everything needed to put one vCPU back exactly where it was.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID as set on the vCPU.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// MSRs that could be read (and so can be written back).
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
}

/// The VM-wide KVM state.
#[derive(Serialize, Deserialize)]
pub struct VmKvmState {
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// PIC master.
    pub pic_master: kvm_irqchip,
    /// PIC slave.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// PIT.
    pub pit: kvm_pit_state2,
}

/// A whole paused VM, minus its RAM (which lives in the memory file).
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// Guest RAM size the state belongs to.
    pub mem_mib: u64,
    /// One entry per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Clock, irqchip, PIT.
    pub kvm: VmKvmState,
    /// COM1.
    pub serial: SerialState,
    /// virtio transports and devices.
    pub virtio: crate::virtio::VirtioState,
    /// How the VMM starts a vCPU of this guest directly (guests with the
    /// minivmm note): what `Vm::add_vcpus` needs after a restore.
    #[serde(default)]
    pub direct_start: Option<DirectStart>,
}

/// The 64-bit entry every vCPU of a direct-start guest begins at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectStart {
    /// The kernel's entry point.
    pub entry: u64,
    /// Start vCPUs in PVM native mode.
    pub pvm_native: bool,
}

/// Errors saving or restoring state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Ioctl {
        /// Which (with the vCPU index where it applies).
        what: String,
        /// errno.
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than saved.
    #[error("vCPU {vcpu}: KVM_SET_MSRS stopped at MSR {index:#x} ({set} of {total} set)")]
    Msrs {
        /// vCPU.
        vcpu: usize,
        /// First MSR not set.
        index: u32,
        /// How many were set.
        set: usize,
        /// How many there are.
        total: usize,
    },
    /// The saved state does not fit the VM it is restored into.
    #[error("state does not fit: {0}")]
    Mismatch(String),
}

fn ioctl<T>(what: impl Into<String>, r: Result<T, kvm_ioctls::Error>) -> Result<T, StateError> {
    r.map_err(|source| StateError::Ioctl {
        what: what.into(),
        source,
    })
}

/// The MSRs to save: what KVM says it saves and restores, plus PVM's own.
pub fn msrs_to_save(kvm: &Kvm) -> Result<Vec<u32>, StateError> {
    let list = ioctl("KVM_GET_MSR_INDEX_LIST", kvm.get_msr_index_list())?;
    let mut msrs: Vec<u32> = list.as_slice().to_vec();
    for m in PVM_MSR_RANGE {
        if !msrs.contains(&m) {
            msrs.push(m);
        }
    }
    Ok(msrs)
}

/// Read the MSRs of `candidates` that KVM lets us read. KVM_GET_MSRS stops at
/// the first MSR it cannot read; that one is dropped and reading goes on.
fn read_msrs(fd: &VcpuFd, id: usize, candidates: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::with_capacity(candidates.len());
    let mut rest: &[u32] = candidates;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| StateError::Mismatch(format!("too many MSRs: {e:?}")))?;
        let n = ioctl(format!("vCPU {id}: KVM_GET_MSRS"), fd.get_msrs(&mut msrs))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        rest = rest.get(n + 1..).unwrap_or(&[]);
    }
    Ok(out)
}

/// Save one (paused) vCPU.
pub fn save_vcpu(fd: &VcpuFd, id: usize, msr_list: &[u32]) -> Result<VcpuState, StateError> {
    let w = |what: &str| format!("vCPU {id}: {what}");
    Ok(VcpuState {
        cpuid: ioctl(w("KVM_GET_CPUID2"), fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES))?
            .as_slice()
            .to_vec(),
        msrs: read_msrs(fd, id, msr_list)?,
        regs: ioctl(w("KVM_GET_REGS"), fd.get_regs())?,
        sregs: ioctl(w("KVM_GET_SREGS"), fd.get_sregs())?,
        xsave: ioctl(w("KVM_GET_XSAVE"), fd.get_xsave())?,
        xcrs: ioctl(w("KVM_GET_XCRS"), fd.get_xcrs())?,
        debugregs: ioctl(w("KVM_GET_DEBUGREGS"), fd.get_debug_regs())?,
        lapic: ioctl(w("KVM_GET_LAPIC"), fd.get_lapic())?,
        events: ioctl(w("KVM_GET_VCPU_EVENTS"), fd.get_vcpu_events())?,
        mp_state: ioctl(w("KVM_GET_MP_STATE"), fd.get_mp_state())?,
    })
}

/// Put a saved state into a freshly created vCPU. The order follows KVM's
/// dependencies: CPUID first (it decides which MSRs and xsave features
/// exist), sregs before the LAPIC (APIC base), events and mp_state last.
pub fn restore_vcpu(fd: &VcpuFd, id: usize, s: &VcpuState) -> Result<(), StateError> {
    let w = |what: &str| format!("vCPU {id}: {what}");
    let cpuid = CpuId::from_entries(&s.cpuid)
        .map_err(|e| StateError::Mismatch(format!("vCPU {id}: bad CPUID list: {e:?}")))?;
    ioctl(w("KVM_SET_CPUID2"), fd.set_cpuid2(&cpuid))?;
    ioctl(w("KVM_SET_MP_STATE"), fd.set_mp_state(s.mp_state))?;
    ioctl(w("KVM_SET_REGS"), fd.set_regs(&s.regs))?;
    ioctl(w("KVM_SET_SREGS"), fd.set_sregs(&s.sregs))?;
    ioctl(w("KVM_SET_XSAVE"), {
        // SAFETY: a kvm_xsave of the legacy 4 KiB size, as KVM_GET_XSAVE returned it.
        unsafe { fd.set_xsave(&s.xsave) }
    })?;
    ioctl(w("KVM_SET_XCRS"), fd.set_xcrs(&s.xcrs))?;
    ioctl(w("KVM_SET_DEBUGREGS"), fd.set_debug_regs(&s.debugregs))?;
    ioctl(w("KVM_SET_LAPIC"), fd.set_lapic(&s.lapic))?;
    write_msrs(fd, id, &s.msrs)?;
    ioctl(w("KVM_SET_VCPU_EVENTS"), fd.set_vcpu_events(&s.events))?;
    Ok(())
}

/// Write saved MSRs back. KVM_SET_MSRS stops at the first MSR it refuses;
/// a refused MSR is accepted only if the fresh vCPU already holds the saved
/// value (a read-only constant such as PVM's signature MSR), else it is an
/// error naming the MSR.
fn write_msrs(fd: &VcpuFd, id: usize, saved: &[kvm_msr_entry]) -> Result<(), StateError> {
    let mut rest = saved;
    while !rest.is_empty() {
        let msrs = Msrs::from_entries(rest)
            .map_err(|e| StateError::Mismatch(format!("vCPU {id}: bad MSR list: {e:?}")))?;
        let set = ioctl(format!("vCPU {id}: KVM_SET_MSRS"), fd.set_msrs(&msrs))?;
        if set >= rest.len() {
            break;
        }
        let refused = rest[set];
        let current = read_msrs(fd, id, &[refused.index])?;
        if current.first().map(|m| m.data) != Some(refused.data) {
            return Err(StateError::Msrs {
                vcpu: id,
                index: refused.index,
                set: saved.len() - rest.len() + set,
                total: saved.len(),
            });
        }
        rest = &rest[set + 1..];
    }
    Ok(())
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    ioctl(
        format!("KVM_GET_IRQCHIP {chip_id}"),
        vm.get_irqchip(&mut chip),
    )?;
    Ok(chip)
}

/// Save the VM-wide KVM state (VM paused).
pub fn save_vm(vm: &VmFd) -> Result<VmKvmState, StateError> {
    Ok(VmKvmState {
        clock: ioctl("KVM_GET_CLOCK", vm.get_clock())?,
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: ioctl("KVM_GET_PIT2", vm.get_pit2())?,
    })
}

/// Restore the VM-wide KVM state into a fresh VM (irqchip and PIT created).
pub fn restore_vm(vm: &VmFd, s: &VmKvmState) -> Result<(), StateError> {
    let mut clock = s.clock;
    clock.flags &= !KVM_CLOCK_TSC_STABLE;
    ioctl("KVM_SET_CLOCK", vm.set_clock(&clock))?;
    for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        ioctl(
            format!("KVM_SET_IRQCHIP {}", chip.chip_id),
            vm.set_irqchip(chip),
        )?;
    }
    ioctl("KVM_SET_PIT2", vm.set_pit2(&s.pit))
}
