//! The saved state of a paused VM: every vCPU's registers (regs, sregs,
//! xsave, xcrs, LAPIC, MSRs, events, mp_state, debug registers, CPUID, TSC
//! frequency), the VM's KVM clock, irqchip (PIC master/slave, IOAPIC) and
//! PIT, and the legacy devices. Plain serde data: the snapshot crate stores it
//! without knowing what is inside.
//!
//! A state comes back from a file: every count and size in it is checked
//! before it reaches an ioctl.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, Xsave, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use devices::serial::SerialState;

/// Identity of the state schema this build writes and reads: a hash of every
/// serde type definition in `vmm` and `devices` and of the kvm-bindings
/// version (computed by build.rs). A template whose manifest records another
/// value was made by an incompatible build.
pub const STATE_SCHEMA: &str = env!("MINIVMM_STATE_SCHEMA");

/// kvm_clock_data.flags bit that must not be handed back to KVM_SET_CLOCK.
const KVM_CLOCK_TSC_STABLE: u32 = 2;
/// KVM's paravirtual MSRs (0x4b564d00-07) and this host's kvm_pvm MSRs
/// (0x4b564d10 control, 0x11-0x13 read-only), which KVM_GET_MSR_INDEX_LIST
/// does not list; whatever of them a vCPU can read is saved.
const PVM_MSR_RANGE: std::ops::RangeInclusive<u32> = 0x4b56_4d00..=0x4b56_4d13;
/// Size of the legacy `struct kvm_xsave` (KVM_GET_XSAVE), the smallest XSAVE area.
const LEGACY_XSAVE_BYTES: usize = std::mem::size_of::<kvm_xsave>();
/// 32-bit words in the legacy XSAVE region.
const LEGACY_XSAVE_WORDS: usize = LEGACY_XSAVE_BYTES / 4;
/// Most MSRs one KVM_GET_MSRS / KVM_SET_MSRS takes: KVM refuses
/// `nmsrs >= MAX_IO_MSRS` (256) with E2BIG (arch/x86/kvm/x86.c, msr_io).
const MSRS_PER_IOCTL: usize = 255;
const _: () = assert!(MSRS_PER_IOCTL < KVM_MAX_MSR_ENTRIES);

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
    /// FPU/SSE/AVX state as KVM_GET_XSAVE2 returned it: the legacy 4 KiB
    /// region followed by the dynamically sized components, in 32-bit words.
    pub xsave: Vec<u32>,
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
    /// Guest TSC frequency in kHz (KVM_GET_TSC_KHZ); None if KVM could not tell.
    pub tsc_khz: Option<u32>,
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
    /// The saved XSAVE area cannot be handed to this host's KVM.
    #[error(
        "vCPU {vcpu}: saved XSAVE area is {saved} bytes, this host's KVM takes {min}..={max} (KVM_CAP_XSAVE2)"
    )]
    XsaveSize {
        /// vCPU.
        vcpu: usize,
        /// Bytes in the saved state.
        saved: usize,
        /// The legacy size.
        min: usize,
        /// What KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) reports here.
        max: usize,
    },
    /// The guest TSC frequency of the saved vCPU cannot be reproduced here.
    #[error(
        "vCPU {vcpu}: cannot set the guest TSC frequency to the saved {saved_khz} kHz (this host gives {current}): {source}"
    )]
    TscFrequency {
        /// vCPU.
        vcpu: usize,
        /// Frequency in the saved state.
        saved_khz: u32,
        /// What the fresh vCPU reports, in words.
        current: String,
        /// Why KVM_SET_TSC_KHZ failed.
        source: kvm_ioctls::Error,
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

/// What saving or restoring a vCPU needs to know about its VM and host.
#[derive(Clone, Debug)]
pub struct VcpuStateContext {
    /// MSRs to save: what KVM says it saves and restores, plus PVM's own.
    pub msrs: Vec<u32>,
    /// Bytes of the XSAVE area (KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2), or the
    /// legacy 4 KiB where KVM lacks XSAVE2).
    pub xsave_bytes: usize,
}

impl VcpuStateContext {
    /// Ask KVM (and the VM, whose XSAVE size may differ from the system's).
    pub fn new(kvm: &Kvm, vm: &VmFd) -> Result<Self, StateError> {
        Ok(VcpuStateContext {
            msrs: msrs_to_save(kvm)?,
            xsave_bytes: xsave_bytes(vm),
        })
    }
}

/// The XSAVE area size KVM_GET_XSAVE2/KVM_SET_XSAVE use on `vm`.
pub fn xsave_bytes(vm: &VmFd) -> usize {
    match usize::try_from(vm.check_extension_int(Cap::Xsave2)) {
        Ok(n) if n > LEGACY_XSAVE_BYTES => n,
        _ => LEGACY_XSAVE_BYTES,
    }
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

/// Read the MSRs of `candidates` that KVM lets us read, at most
/// [`MSRS_PER_IOCTL`] per ioctl. KVM_GET_MSRS stops at the first MSR it
/// cannot read; that one is dropped and reading goes on after it.
fn read_msrs(fd: &VcpuFd, id: usize, candidates: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::with_capacity(candidates.len());
    let mut rest: &[u32] = candidates;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSRS_PER_IOCTL)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| StateError::Mismatch(format!("vCPU {id}: MSR list: {e:?}")))?;
        let n = ioctl(format!("vCPU {id}: KVM_GET_MSRS"), fd.get_msrs(&mut msrs))?;
        let n = n.min(chunk.len());
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // A full chunk read goes on with the next chunk; a short one skips
        // the MSR KVM refused.
        let skip = if n == chunk.len() { n } else { n + 1 };
        rest = rest.get(skip..).unwrap_or(&[]);
    }
    Ok(out)
}

/// Save one (paused) vCPU.
///
/// Order matters (KVM API, and Firecracker's `save_state` notes the same):
/// KVM_GET_MP_STATE goes first because it runs `kvm_apic_accept_events`,
/// which may deliver a pending INIT/SIPI and so change registers and LAPIC
/// state that later reads capture; the LAPIC read syncs posted interrupts
/// into the IRR; KVM_GET_VCPU_EVENTS goes last so the pending exception /
/// interrupt / NMI state it returns includes whatever the earlier calls moved
/// there.
pub fn save_vcpu(fd: &VcpuFd, id: usize, ctx: &VcpuStateContext) -> Result<VcpuState, StateError> {
    let w = |what: &str| format!("vCPU {id}: {what}");
    let mp_state = ioctl(w("KVM_GET_MP_STATE"), fd.get_mp_state())?;
    let regs = ioctl(w("KVM_GET_REGS"), fd.get_regs())?;
    let sregs = ioctl(w("KVM_GET_SREGS"), fd.get_sregs())?;
    let xsave = get_xsave2(fd, id, ctx.xsave_bytes)?;
    let xcrs = ioctl(w("KVM_GET_XCRS"), fd.get_xcrs())?;
    let debugregs = ioctl(w("KVM_GET_DEBUGREGS"), fd.get_debug_regs())?;
    let lapic = ioctl(w("KVM_GET_LAPIC"), fd.get_lapic())?;
    // Not every KVM can tell (an unstable host TSC): then it is not restored.
    let tsc_khz = fd.get_tsc_khz().ok();
    let cpuid = ioctl(w("KVM_GET_CPUID2"), fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES))?
        .as_slice()
        .to_vec();
    let msrs = read_msrs(fd, id, &ctx.msrs)?;
    let events = ioctl(w("KVM_GET_VCPU_EVENTS"), fd.get_vcpu_events())?;
    Ok(VcpuState {
        cpuid,
        msrs,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        events,
        mp_state,
        tsc_khz,
    })
}

/// An `Xsave` buffer whose whole area is `bytes` long.
fn xsave_buffer(bytes: usize) -> Result<Xsave, StateError> {
    let extra_words = bytes.saturating_sub(LEGACY_XSAVE_BYTES).div_ceil(4);
    Xsave::new(extra_words).map_err(|e| StateError::Mismatch(format!("XSAVE buffer: {e:?}")))
}

fn get_xsave2(fd: &VcpuFd, id: usize, bytes: usize) -> Result<Vec<u32>, StateError> {
    let mut xsave = xsave_buffer(bytes)?;
    // SAFETY: the buffer holds `bytes` = KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)
    // bytes (legacy region plus `extra` words), the size KVM writes; minivmm
    // enables no XSTATE feature with arch_prctl that could make it grow.
    ioctl(format!("vCPU {id}: KVM_GET_XSAVE2"), unsafe {
        fd.get_xsave2(&mut xsave)
    })?;
    let s = xsave.as_fam_struct_ref();
    let mut words = Vec::with_capacity(LEGACY_XSAVE_WORDS + xsave.as_slice().len());
    words.extend_from_slice(&s.xsave.region);
    words.extend_from_slice(xsave.as_slice());
    Ok(words)
}

/// Hand a saved XSAVE area to KVM after checking it fits: at least the legacy
/// region, at most what this VM's KVM reads (shorter areas from a host with
/// fewer XSAVE features are zero-padded; XSTATE_BV says what is valid).
fn set_xsave2(fd: &VcpuFd, id: usize, saved: &[u32], bytes: usize) -> Result<(), StateError> {
    let saved_bytes = saved.len().saturating_mul(4);
    if saved_bytes < LEGACY_XSAVE_BYTES || saved_bytes > bytes {
        return Err(StateError::XsaveSize {
            vcpu: id,
            saved: saved_bytes,
            min: LEGACY_XSAVE_BYTES,
            max: bytes,
        });
    }
    let mut xsave = xsave_buffer(bytes)?;
    let (region, extra) = saved.split_at(LEGACY_XSAVE_WORDS);
    // SAFETY: only the region array of the FAM struct is written here.
    unsafe { xsave.as_mut_fam_struct() }
        .xsave
        .region
        .copy_from_slice(region);
    xsave.as_mut_slice()[..extra.len()].copy_from_slice(extra);
    // SAFETY: the buffer is `bytes` long, the size KVM_SET_XSAVE reads on this
    // VM (KVM_CAP_XSAVE2); the saved data was length-checked above.
    ioctl(format!("vCPU {id}: KVM_SET_XSAVE"), unsafe {
        fd.set_xsave2(&xsave)
    })
}

/// Give a fresh vCPU the saved TSC frequency when it differs from its own.
fn restore_tsc_khz(fd: &VcpuFd, id: usize, saved: Option<u32>) -> Result<(), StateError> {
    let Some(saved_khz) = saved else {
        return Ok(());
    };
    let current = fd.get_tsc_khz();
    if current.as_ref().ok() == Some(&saved_khz) {
        return Ok(());
    }
    fd.set_tsc_khz(saved_khz)
        .map_err(|source| StateError::TscFrequency {
            vcpu: id,
            saved_khz,
            current: match current {
                Ok(khz) => format!("{khz} kHz"),
                Err(e) => format!("an unknown frequency ({e})"),
            },
            source,
        })
}

/// Put a saved state into a freshly created vCPU of a VM whose XSAVE area is
/// `xsave_bytes` long.
///
/// Order follows KVM's dependencies: the TSC frequency before anything that
/// writes the TSC (MSRs); CPUID next (it decides which MSRs and XSAVE
/// features exist); mp_state, then registers; sregs before the LAPIC
/// (KVM_SET_SREGS carries the APIC base, which resets a LAPIC it changes);
/// MSRs after the LAPIC (the TSC-deadline MSR is only accepted once the LAPIC
/// is in TSC-deadline mode); vcpu events last, because setting the LAPIC and
/// MSRs can raise or clear pending events that the saved ones must override.
pub fn restore_vcpu(
    fd: &VcpuFd,
    id: usize,
    s: &VcpuState,
    xsave_bytes: usize,
) -> Result<(), StateError> {
    let w = |what: &str| format!("vCPU {id}: {what}");
    restore_tsc_khz(fd, id, s.tsc_khz)?;
    let cpuid = CpuId::from_entries(&s.cpuid)
        .map_err(|e| StateError::Mismatch(format!("vCPU {id}: bad CPUID list: {e:?}")))?;
    ioctl(w("KVM_SET_CPUID2"), fd.set_cpuid2(&cpuid))?;
    ioctl(w("KVM_SET_MP_STATE"), fd.set_mp_state(s.mp_state))?;
    ioctl(w("KVM_SET_REGS"), fd.set_regs(&s.regs))?;
    ioctl(w("KVM_SET_SREGS"), fd.set_sregs(&s.sregs))?;
    set_xsave2(fd, id, &s.xsave, xsave_bytes)?;
    ioctl(w("KVM_SET_XCRS"), fd.set_xcrs(&s.xcrs))?;
    ioctl(w("KVM_SET_DEBUGREGS"), fd.set_debug_regs(&s.debugregs))?;
    ioctl(w("KVM_SET_LAPIC"), fd.set_lapic(&s.lapic))?;
    write_msrs(fd, id, &s.msrs)?;
    ioctl(w("KVM_SET_VCPU_EVENTS"), fd.set_vcpu_events(&s.events))?;
    Ok(())
}

/// Write saved MSRs back, at most [`MSRS_PER_IOCTL`] per ioctl.
/// KVM_SET_MSRS stops at the first MSR it refuses; a refused MSR is accepted
/// only if the fresh vCPU already holds the saved value (a read-only constant
/// such as PVM's signature MSR), else it is an error naming the MSR.
fn write_msrs(fd: &VcpuFd, id: usize, saved: &[kvm_msr_entry]) -> Result<(), StateError> {
    let mut rest = saved;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSRS_PER_IOCTL)];
        let msrs = Msrs::from_entries(chunk)
            .map_err(|e| StateError::Mismatch(format!("vCPU {id}: bad MSR list: {e:?}")))?;
        let set = ioctl(format!("vCPU {id}: KVM_SET_MSRS"), fd.set_msrs(&msrs))?;
        if set >= chunk.len() {
            rest = &rest[chunk.len()..];
            continue;
        }
        let refused = chunk[set];
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM with an in-kernel irqchip and one vCPU with the host's CPUID.
    fn vcpu() -> (Kvm, VmFd, VcpuFd) {
        let kvm = Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
        let fd = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .expect("KVM_GET_SUPPORTED_CPUID");
        fd.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
        (kvm, vm, fd)
    }

    #[test]
    fn a_saved_vcpu_restores_into_a_fresh_one() {
        let (kvm, vm, fd) = vcpu();
        let ctx = VcpuStateContext::new(&kvm, &vm).unwrap();
        let saved = save_vcpu(&fd, 0, &ctx).unwrap();
        assert_eq!(saved.xsave.len() * 4, ctx.xsave_bytes.next_multiple_of(4));
        let (_kvm2, vm2, fresh) = vcpu();
        restore_vcpu(&fresh, 0, &saved, xsave_bytes(&vm2)).unwrap();
        let again = save_vcpu(&fresh, 0, &ctx).unwrap();
        assert_eq!(again.regs.rip, saved.regs.rip);
        assert_eq!(
            again.xsave[..LEGACY_XSAVE_WORDS],
            saved.xsave[..LEGACY_XSAVE_WORDS]
        );
        assert_eq!(again.tsc_khz, saved.tsc_khz);
    }

    #[test]
    fn xsave_sizes_from_a_file_are_checked_before_kvm_sees_them() {
        let (kvm, vm, fd) = vcpu();
        let ctx = VcpuStateContext::new(&kvm, &vm).unwrap();
        let mut saved = save_vcpu(&fd, 0, &ctx).unwrap();
        let full = saved.xsave.clone();
        for words in [
            0,
            100,
            LEGACY_XSAVE_WORDS - 1,
            ctx.xsave_bytes / 4 + 1,
            1 << 20,
        ] {
            saved.xsave = vec![0; words];
            let err = restore_vcpu(&fd, 0, &saved, ctx.xsave_bytes).unwrap_err();
            assert!(
                matches!(err, StateError::XsaveSize { saved: s, .. } if s == words * 4),
                "{words} words: {err}"
            );
            assert!(err.to_string().contains("KVM_CAP_XSAVE2"), "{err}");
        }
        // A legacy-sized area (a host with fewer XSAVE features) is padded.
        saved.xsave = full[..LEGACY_XSAVE_WORDS].to_vec();
        restore_vcpu(&fd, 0, &saved, ctx.xsave_bytes).unwrap();
    }

    #[test]
    fn msr_lists_longer_than_one_ioctl_are_read_and_written_in_chunks() {
        let (kvm, _vm, fd) = vcpu();
        let list = msrs_to_save(&kvm).unwrap();
        // The same MSRs several times over: more than KVM_MAX_MSR_ENTRIES.
        let candidates: Vec<u32> = list
            .iter()
            .copied()
            .cycle()
            .take(3 * KVM_MAX_MSR_ENTRIES)
            .collect();
        let once = read_msrs(&fd, 0, &list).unwrap();
        let many = read_msrs(&fd, 0, &candidates).unwrap();
        assert!(many.len() > KVM_MAX_MSR_ENTRIES, "{} MSRs read", many.len());
        // IA32_TSC (0x10) advances between reads; every other MSR holds still.
        for m in many.iter().filter(|m| m.index != 0x10) {
            let first = once.iter().find(|o| o.index == m.index);
            assert_eq!(first.map(|o| o.data), Some(m.data), "MSR {:#x}", m.index);
        }
        write_msrs(&fd, 0, &many).unwrap();
    }

    #[test]
    fn a_tsc_frequency_that_cannot_be_set_is_reported() {
        let (_kvm, _vm, fd) = vcpu();
        let Ok(khz) = fd.get_tsc_khz() else {
            return;
        };
        // The same frequency needs no KVM_SET_TSC_KHZ at all.
        restore_tsc_khz(&fd, 0, Some(khz)).unwrap();
        match restore_tsc_khz(&fd, 0, Some(khz / 2)) {
            Ok(()) => assert_eq!(fd.get_tsc_khz().unwrap(), khz / 2),
            Err(e) => {
                assert!(matches!(e, StateError::TscFrequency { .. }), "{e}");
                let text = e.to_string();
                assert!(
                    text.contains(&format!("{} kHz", khz / 2))
                        && text.contains(&format!("{khz} kHz")),
                    "{text}"
                );
            }
        }
    }
}
