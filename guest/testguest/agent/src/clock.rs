//! The agent's clocks.
//!
//! Monotonic: kvmclock when the kernel registered it (nanoseconds since the
//! VM's clock started; the VMM restores it with a snapshot, so it continues
//! across a restore), read natively from the pvclock structure and RDTSC as
//! Linux does (`pvclock_clocksource_read`). Accuracy is KVM's: the host
//! computes the scale from its own clocksource, so the error is that of the
//! host's monotonic clock plus a few tens of ns of read jitter. Without
//! kvmclock: the TSC over the frequency the kernel found (CPUID or measured
//! against the LAPIC timer over 1 ms, good to a few parts in 10^4).
//!
//! Wall: kvmclock's wall clock at the VM clock's zero plus the monotonic
//! clock, until the host sets it (`SetGuestDateTime`, after a restore); then
//! the time it set plus the monotonic time since.

use core::sync::atomic::{compiler_fence, Ordering};

use testguest_abi::{BootInfo, PvclockVcpuTimeInfo, FLAG_KVMCLOCK};

/// Nanoseconds per second.
pub const NSEC_PER_SEC: u64 = 1_000_000_000;

/// Reads the TSC.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC has no memory effects (CR4.TSD is clear: allowed at CPL 3).
    unsafe {
        core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// A consistent copy of the pvclock fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PvclockSample {
    pub tsc_timestamp: u64,
    pub system_time: u64,
    pub mul: u32,
    pub shift: i8,
}

impl PvclockSample {
    /// Nanoseconds at `tsc` (Linux `pvclock_scale_delta`).
    pub fn ns_at(&self, tsc: u64) -> u64 {
        let mut delta = tsc.wrapping_sub(self.tsc_timestamp);
        // A TSC read before the sample was taken (another vCPU's update) is
        // not later than the sample.
        if delta > u64::MAX / 2 {
            delta = 0;
        }
        if self.shift < 0 {
            delta >>= u32::from(self.shift.unsigned_abs());
        } else {
            delta <<= self.shift as u32;
        }
        let scaled = ((u128::from(delta) * u128::from(self.mul)) >> 32) as u64;
        self.system_time.wrapping_add(scaled)
    }
}

/// Reads the pvclock structure KVM updates, retrying while it changes.
fn read_pvclock(p: &PvclockVcpuTimeInfo) -> (PvclockSample, u64) {
    loop {
        // SAFETY: plain loads of KVM-written fields; the version protocol
        // detects a concurrent update.
        let v1 = unsafe { core::ptr::read_volatile(&p.version) };
        compiler_fence(Ordering::Acquire);
        let sample = unsafe {
            PvclockSample {
                tsc_timestamp: core::ptr::read_volatile(&p.tsc_timestamp),
                system_time: core::ptr::read_volatile(&p.system_time),
                mul: core::ptr::read_volatile(&p.tsc_to_system_mul),
                shift: core::ptr::read_volatile(&p.tsc_shift),
            }
        };
        let tsc = rdtsc();
        compiler_fence(Ordering::Acquire);
        let v2 = unsafe { core::ptr::read_volatile(&p.version) };
        if v1 & 1 == 0 && v1 == v2 {
            return (sample, tsc);
        }
        core::hint::spin_loop();
    }
}

/// Nanoseconds from TSC ticks at `tsc_khz`.
pub fn tsc_ticks_to_ns(ticks: u64, tsc_khz: u64) -> u64 {
    if tsc_khz == 0 {
        return 0;
    }
    (u128::from(ticks) * 1_000_000 / u128::from(tsc_khz)) as u64
}

/// The wall clock: an anchor (Unix time in ns at a monotonic time).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WallClock {
    /// Unix time in nanoseconds at `at_monotonic_ns`.
    pub unix_ns: i128,
    pub at_monotonic_ns: u64,
}

impl WallClock {
    /// Unix time in nanoseconds at monotonic time `now`.
    pub fn unix_ns_at(&self, now: u64) -> i128 {
        self.unix_ns + i128::from(now) - i128::from(self.at_monotonic_ns)
    }

    /// (seconds, microseconds) at monotonic time `now`; microseconds are in
    /// 0..1_000_000 also before the epoch.
    pub fn sec_usec_at(&self, now: u64) -> (i64, i64) {
        let ns = self.unix_ns_at(now);
        let sec = ns.div_euclid(i128::from(NSEC_PER_SEC));
        let usec = ns.rem_euclid(i128::from(NSEC_PER_SEC)) / 1000;
        (sec as i64, usec as i64)
    }
}

/// The agent's time sources.
pub struct Clock {
    info: &'static BootInfo,
    kvmclock: bool,
    wall: WallClock,
}

impl Clock {
    /// The clocks the kernel set up.
    pub fn new(info: &'static BootInfo) -> Clock {
        let kvmclock = info.flags & FLAG_KVMCLOCK != 0;
        let mut clock = Clock {
            info,
            kvmclock,
            wall: WallClock::default(),
        };
        if kvmclock {
            // SAFETY: KVM wrote it when the kernel registered it; read once.
            let (sec, nsec) = unsafe {
                (
                    core::ptr::read_volatile(&info.wall_clock.sec),
                    core::ptr::read_volatile(&info.wall_clock.nsec),
                )
            };
            clock.wall = WallClock {
                unix_ns: i128::from(sec) * i128::from(NSEC_PER_SEC) + i128::from(nsec),
                at_monotonic_ns: 0,
            };
        }
        clock
    }

    /// Whether kvmclock is the source.
    pub fn is_kvmclock(&self) -> bool {
        self.kvmclock
    }

    /// Monotonic nanoseconds: since the VM clock started (kvmclock), else
    /// since the kernel started.
    pub fn monotonic_ns(&self) -> u64 {
        if self.kvmclock {
            let (sample, tsc) = read_pvclock(&self.info.pvclock);
            sample.ns_at(tsc)
        } else {
            tsc_ticks_to_ns(rdtsc().wrapping_sub(self.info.boot_tsc), self.info.tsc_khz)
        }
    }

    /// Wall clock (seconds, microseconds since the Unix epoch) at monotonic
    /// time `now`.
    pub fn wall_sec_usec_at(&self, now: u64) -> (i64, i64) {
        self.wall.sec_usec_at(now)
    }

    /// Sets the wall clock to (sec, usec) now.
    pub fn set_wall(&mut self, sec: i64, usec: i64) {
        self.wall = WallClock {
            unix_ns: i128::from(sec) * i128::from(NSEC_PER_SEC) + i128::from(usec) * 1000,
            at_monotonic_ns: self.monotonic_ns(),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvclock_scaling() {
        // 1 tick = 0.5 ns: mul 2^31, shift 0.
        let s = PvclockSample {
            tsc_timestamp: 1000,
            system_time: 5_000,
            mul: 1 << 31,
            shift: 0,
        };
        assert_eq!(s.ns_at(1000), 5_000);
        assert_eq!(s.ns_at(3000), 6_000);
        // A TSC slightly behind the sample does not go back in time.
        assert_eq!(s.ns_at(999), 5_000);
        let shifted = PvclockSample { shift: -1, ..s };
        assert_eq!(shifted.ns_at(5000), 6_000);
        let up = PvclockSample { shift: 1, ..s };
        assert_eq!(up.ns_at(2000), 6_000);
    }

    #[test]
    fn wall_clock_from_an_anchor() {
        let w = WallClock {
            unix_ns: 1_700_000_000 * 1_000_000_000 + 999_999_000,
            at_monotonic_ns: 10,
        };
        assert_eq!(w.sec_usec_at(10), (1_700_000_000, 999_999));
        assert_eq!(w.sec_usec_at(1010), (1_700_000_001, 0));
        let before = WallClock {
            unix_ns: -1,
            at_monotonic_ns: 0,
        };
        assert_eq!(before.sec_usec_at(0), (-1, 999_999));
        assert_eq!(tsc_ticks_to_ns(3_000_000, 3_000_000), 1_000_000);
    }
}
