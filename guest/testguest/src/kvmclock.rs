//! Time sources handed to the agent: kvmclock (KVM's paravirtual clock,
//! Linux `Documentation/virt/kvm/x86/msr.rst`) when the hypervisor offers it,
//! else the TSC frequency from CPUID or measured against the LAPIC timer.
//!
//! kvmclock counts nanoseconds since the VM's clock started and is part of
//! the VM state a snapshot keeps, so it keeps running across a restore; the
//! agent reads it natively (RDTSC plus the pvclock structure, no exit).

#![cfg_attr(test, allow(dead_code))]

use testguest_abi::{PvclockVcpuTimeInfo, PvclockWallClock};

use crate::cpu::CpuidResult;

/// `KVM_CPUID_SIGNATURE` and its "KVMKVMKVM\0\0\0" answer.
const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
/// `KVM_CPUID_FEATURES`: EAX bit 3 is KVM_FEATURE_CLOCKSOURCE2.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
/// The hypervisor timing leaf (EAX: TSC kHz), offered by some VMMs.
const CPUID_HV_TIMING: u32 = 0x4000_0010;
/// `MSR_KVM_WALL_CLOCK_NEW` and `MSR_KVM_SYSTEM_TIME_NEW` (bit 0: enable).
const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// CPUID leaf 0x15: TSC / core crystal clock ratio and crystal frequency.
const CPUID_TSC_CRYSTAL: u32 = 0x15;

/// Whether CPUID says KVM offers kvmclock (KVM_FEATURE_CLOCKSOURCE2).
pub fn offered(cpuid: impl Fn(u32) -> CpuidResult) -> bool {
    let sig = cpuid(KVM_CPUID_SIGNATURE);
    [sig.ebx, sig.ecx, sig.edx] == KVM_SIGNATURE
        && sig.eax >= KVM_CPUID_FEATURES
        && cpuid(KVM_CPUID_FEATURES).eax & KVM_FEATURE_CLOCKSOURCE2 != 0
}

/// Registers this vCPU's kvmclock structures with KVM (which must offer
/// kvmclock: see `offered`).
pub fn register(system_time: &PvclockVcpuTimeInfo, wall_clock: &PvclockWallClock) {
    // SAFETY: the kvmclock MSRs exist (CLOCKSOURCE2); both structures live in
    // the guest's memory for as long as it runs (physical = virtual).
    unsafe {
        crate::cpu::wrmsr(MSR_KVM_WALL_CLOCK_NEW, wall_clock as *const _ as u64);
        crate::cpu::wrmsr(MSR_KVM_SYSTEM_TIME_NEW, system_time as *const _ as u64 | 1);
    }
}

/// The TSC frequency in kHz from CPUID, if a leaf states it: the hypervisor
/// timing leaf, else leaf 0x15 (crystal frequency times the TSC ratio).
pub fn tsc_khz_from_cpuid(cpuid: impl Fn(u32) -> CpuidResult) -> Option<u64> {
    let hv = cpuid(KVM_CPUID_SIGNATURE);
    if hv.eax >= CPUID_HV_TIMING {
        let khz = cpuid(CPUID_HV_TIMING).eax;
        if khz != 0 {
            return Some(u64::from(khz));
        }
    }
    if cpuid(0).eax >= CPUID_TSC_CRYSTAL {
        let l = cpuid(CPUID_TSC_CRYSTAL);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            return Some(u64::from(l.ecx) * u64::from(l.ebx) / u64::from(l.eax) / 1000);
        }
    }
    None
}

/// TSC ticks per millisecond measured over `lapic_counts` of the LAPIC
/// timer's count-down at `bus_hz / 16` (see `apic::timer_elapsed`).
pub fn tsc_khz_from_measurement(tsc_delta: u64, lapic_counts: u64, bus_hz: u64) -> u64 {
    let ns = u128::from(lapic_counts) * 16 * 1_000_000_000 / u128::from(bus_hz.max(1));
    if ns == 0 {
        return 0;
    }
    (u128::from(tsc_delta) * 1_000_000 / ns) as u64
}

/// Reads the TSC.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC has no memory effects.
    unsafe {
        core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measured_frequency() {
        // 62_500 counts at 1 GHz / 16 = 1 ms; 2_000_000 TSC ticks = 2 GHz.
        assert_eq!(
            tsc_khz_from_measurement(2_000_000, 62_500, 1_000_000_000),
            2_000_000
        );
        assert_eq!(tsc_khz_from_measurement(1, 0, 1_000_000_000), 0);
    }

    #[test]
    fn kvmclock_offer() {
        let kvm = |leaf: u32| match leaf {
            0x4000_0000 => CpuidResult {
                eax: 0x4000_0001,
                ebx: KVM_SIGNATURE[0],
                ecx: KVM_SIGNATURE[1],
                edx: KVM_SIGNATURE[2],
            },
            0x4000_0001 => CpuidResult {
                eax: 0x1007efb,
                ..Default::default()
            },
            _ => CpuidResult::default(),
        };
        assert!(offered(kvm));
        assert!(!offered(|leaf| CpuidResult {
            eax: 0,
            ..kvm(leaf)
        }));
        assert!(!offered(|_| CpuidResult::default()));
    }

    #[test]
    fn cpuid_frequency() {
        let leaves = |leaf: u32| match leaf {
            0 => CpuidResult {
                eax: 0x16,
                ..Default::default()
            },
            0x15 => CpuidResult {
                eax: 2,
                ebx: 166,
                ecx: 24_000_000,
                edx: 0,
            },
            0x4000_0000 => CpuidResult {
                eax: 0x4000_0001,
                ..Default::default()
            },
            _ => CpuidResult::default(),
        };
        assert_eq!(tsc_khz_from_cpuid(leaves), Some(1_992_000));
        let timing = |leaf: u32| match leaf {
            0x4000_0000 => CpuidResult {
                eax: 0x4000_0010,
                ..Default::default()
            },
            0x4000_0010 => CpuidResult {
                eax: 2_500_000,
                ..Default::default()
            },
            _ => CpuidResult::default(),
        };
        assert_eq!(tsc_khz_from_cpuid(timing), Some(2_500_000));
        assert_eq!(tsc_khz_from_cpuid(|_| CpuidResult::default()), None);
    }
}
