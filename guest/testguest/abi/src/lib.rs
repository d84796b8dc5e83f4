//! The interface between the test guest's kernel and its agent.
//!
//! The kernel (`testguest`, CPL 0) boots the vCPUs, owns the interrupt
//! controllers and the console, and starts the agent (`testguest-agent`) in
//! user mode (CPL 3), where the agent's code runs natively even on a
//! hypervisor that emulates the guest kernel's instructions. The agent gets
//! the address of a [`BootInfo`] in RDI and asks the kernel for what needs
//! privilege with a few system calls ([`Syscall`]).
//!
//! System call convention: `int3` (the #BP gate is DPL 3 and the kernel's
//! system call entry; `int 0x80` and SYSCALL do not work on the PVM KVM of the
//! project's machines, see the kernel's `trap`) with the number in RAX and up to three
//! arguments in RDI, RSI, RDX; the result comes back in RAX. The kernel may
//! clobber every register the C ABI lets a callee clobber (RCX, RDX, RSI, RDI,
//! R8-R11, all XMM registers). When [`BootInfo::syscall_fn`] is non-zero the
//! agent runs in supervisor mode (PVM) and calls that function instead:
//! `extern "C" fn(a0, a1, a2, number) -> u64`, the same handler `int3`
//! reaches.

#![no_std]

pub mod mem;

use core::sync::atomic::AtomicU64;

/// `BootInfo::magic`: "mvmmtg01" little endian.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"mvmmtg01");

/// Most virtio-mmio devices the kernel hands over.
pub const MAX_DEVICES: usize = 16;
/// Most bytes one [`Syscall::ConsoleWrite`] takes.
pub const CONSOLE_WRITE_MAX: u64 = 4096;

/// The system calls, by number (RAX).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Syscall {
    /// Sleep until an interrupt has been handled, unless
    /// [`BootInfo::pending_irqs`] is already non-zero. Returns 0.
    Wait = 0,
    /// Write `len` (a1) bytes at `ptr` (a0) to the console, as one piece
    /// (lines from different CPUs do not interleave). Returns the bytes
    /// written, or `u64::MAX` for a bad buffer.
    ConsoleWrite = 1,
    /// The agent is ready: the kernel prints the ready line and runs the
    /// command line's action. Returns only if there is none (the agent then
    /// serves forever).
    Ready = 2,
    /// A fatal error in the agent (reported on the console before): reset the
    /// VM. Never returns.
    Exit = 3,
    /// Returns how many vCPUs are online.
    OnlineCpus = 4,
}

impl Syscall {
    /// The call for a number, `None` if there is no such call.
    pub fn from_u64(nr: u64) -> Option<Syscall> {
        Some(match nr {
            0 => Syscall::Wait,
            1 => Syscall::ConsoleWrite,
            2 => Syscall::Ready,
            3 => Syscall::Exit,
            4 => Syscall::OnlineCpus,
            _ => return None,
        })
    }
}

/// `BootInfo::flags`: the guest runs under PVM.
pub const FLAG_PVM: u64 = 1 << 0;
/// `BootInfo::flags`: the kernel registered [`BootInfo::pvclock`] and
/// [`BootInfo::wall_clock`] with KVM (kvmclock, MSR_KVM_SYSTEM_TIME_NEW).
pub const FLAG_KVMCLOCK: u64 = 1 << 1;
/// `BootInfo::flags`: the agent runs in supervisor mode (see `syscall_fn`).
pub const FLAG_SUPERVISOR: u64 = 1 << 2;

/// kvmclock's per-vCPU time information (`struct pvclock_vcpu_time_info`,
/// Linux `arch/x86/include/asm/pvclock-abi.h`), written by KVM.
#[repr(C)]
#[derive(Debug, Default)]
pub struct PvclockVcpuTimeInfo {
    /// Odd while KVM updates the structure.
    pub version: u32,
    pub pad0: u32,
    /// TSC when `system_time` was taken.
    pub tsc_timestamp: u64,
    /// Nanoseconds since the VM's clock started, at `tsc_timestamp`.
    pub system_time: u64,
    /// TSC-to-nanoseconds multiplier (32.32 fixed point, after the shift).
    pub tsc_to_system_mul: u32,
    /// Power-of-two shift applied to TSC deltas first (may be negative).
    pub tsc_shift: i8,
    /// PVCLOCK_TSC_STABLE_BIT (1) and others.
    pub flags: u8,
    pub pad: [u8; 2],
}

/// kvmclock's wall clock at the VM clock's zero (`struct pvclock_wall_clock`).
#[repr(C)]
#[derive(Debug, Default)]
pub struct PvclockWallClock {
    /// Odd while KVM updates the structure.
    pub version: u32,
    /// Seconds since the Unix epoch.
    pub sec: u32,
    /// Nanoseconds past `sec`.
    pub nsec: u32,
}

/// A virtio-mmio device from the command line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Guest-physical base of its register window.
    pub addr: u64,
    /// Size of the window.
    pub size: u64,
    /// IOAPIC pin; its interrupts set bit `irq` of `pending_irqs`.
    pub irq: u32,
    pub pad: u32,
}

/// What the kernel tells the agent. One page in the kernel's memory, readable
/// and writable from user mode; the kernel fills it before it starts the agent
/// and afterwards only changes `pending_irqs` (and KVM the clock structures).
#[repr(C, align(4096))]
pub struct BootInfo {
    /// kvmclock time information of the vCPU the agent runs on (KVM wants it
    /// 4-byte aligned and inside one page).
    pub pvclock: PvclockVcpuTimeInfo,
    /// kvmclock wall clock.
    pub wall_clock: PvclockWallClock,
    pub pad0: u32,
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// `FLAG_*`.
    pub flags: u64,
    /// Supervisor mode only: the system call handler (see the crate doc).
    pub syscall_fn: u64,
    /// One bit per IOAPIC pin whose interrupt arrived since the agent last
    /// took the bits (with an atomic swap).
    pub pending_irqs: AtomicU64,
    /// Bytes of RAM in the e820 map.
    pub ram_bytes: u64,
    /// Where the guest's scratch memory starts (`TouchMemory`, `action=touch`).
    pub touch_base: u64,
    /// Bytes of RAM from `touch_base` on, without a gap.
    pub touch_len: u64,
    /// TSC frequency in kHz when known without kvmclock (0: unknown).
    pub tsc_khz: u64,
    /// TSC when the kernel started.
    pub boot_tsc: u64,
    /// vCPUs online when the agent started.
    pub online_cpus: u32,
    /// Entries of `devices` in use.
    pub device_count: u32,
    /// The `virtio_mmio.device=` devices, in command line order.
    pub devices: [VirtioMmioDevice; MAX_DEVICES],
    /// The kernel command line (the agent reads its own tokens there):
    /// address and length in bytes, UTF-8, in RAM for as long as the guest runs.
    pub cmdline_addr: u64,
    pub cmdline_len: u64,
}

const _: () = {
    assert!(core::mem::offset_of!(BootInfo, pvclock) == 0);
    assert!(core::mem::size_of::<PvclockVcpuTimeInfo>() == 32);
    assert!(core::mem::size_of::<PvclockWallClock>() == 12);
    assert!(core::mem::size_of::<BootInfo>() <= 4096);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syscall_numbers_round_trip() {
        for s in [
            Syscall::Wait,
            Syscall::ConsoleWrite,
            Syscall::Ready,
            Syscall::Exit,
            Syscall::OnlineCpus,
        ] {
            assert_eq!(Syscall::from_u64(s as u64), Some(s));
        }
        assert_eq!(Syscall::from_u64(5), None);
        assert_eq!(&BOOT_INFO_MAGIC.to_le_bytes(), b"mvmmtg01");
    }
}
