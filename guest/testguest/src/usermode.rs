//! The agent (`testguest-agent`, embedded in this image at `AGENT_START`) and
//! the kernel's side of its interface (`testguest-abi`): the boot information
//! page, the start in user mode, and the system calls.
//!
//! Why user mode: on the PVM KVM of the project's machines the guest's CPL-0
//! code runs in KVM's instruction emulator (about 0.5 us per instruction, no
//! SSE arithmetic) while CPL-3 code runs natively. So the kernel stays small
//! and the agent (virtio drivers, vsock, protobuf, ChaCha20) runs at CPL 3:
//! the guest runs on its own page tables (`paging`, user-accessible, loaded
//! in `_start`), and the BSP IRETs to the agent's entry with CS 0x33 / SS 0x2b and IF=1. Interrupts
//! from user mode arrive on the IST stacks like any other; system calls
//! (`int3`, see `trap` for why) run on the BSP's normal stack, which the
//! kernel no longer needs once the agent runs.
//!
//! When the kernel itself runs at hardware CPL 3 — PVM native mode (the VMM
//! honoured the image's native note, see `trap`) or PVM proper — it already
//! runs natively, and user mode would be pointless (native mode has no
//! privilege levels to switch; under PVM proper it would need PVM's ERETU
//! path, which is not written). The agent then runs in the kernel's mode with
//! interrupts off like the rest of the kernel, and calls the system call
//! handler directly (`BootInfo::syscall_fn`). User mode is the fallback for
//! a PVM host that emulates the kernel (a VMM without native mode; native
//! mode rests on a control MSR that is not part of PVM's public ABI).

#![cfg_attr(test, allow(dead_code))]

use core::cell::UnsafeCell;
use core::sync::atomic::Ordering;

use testguest_abi::BootInfo;

/// Where the agent's image is linked and loaded, and its entry point (the
/// agent's ELF as built by build.rs).
mod layout {
    include!(concat!(env!("OUT_DIR"), "/agent_layout.rs"));
}
pub use layout::{AGENT_END, AGENT_ENTRY, AGENT_START};

/// A value the kernel writes before the agent starts and only reads (or
/// changes atomically) afterwards.
#[repr(transparent)]
struct Shared<T>(UnsafeCell<T>);

// SAFETY: written by the BSP before the agent (the only other user) starts;
// afterwards only atomics are written (see `BootInfo`).
unsafe impl<T> Sync for Shared<T> {}

/// The boot information page the agent gets in RDI (zero in .bss until
/// `start_agent` fills it).
static BOOT_INFO: Shared<BootInfo> = Shared(UnsafeCell::new(unsafe { core::mem::zeroed() }));

const _: () = assert!(AGENT_START >= 0x20_0000 && AGENT_END <= 0x100_0000);

/// Records that IOAPIC pin `pin` interrupted, for the agent's drivers.
pub fn note_irq(pin: u32) {
    // SAFETY: only the atomic field is touched.
    let info = unsafe { &*BOOT_INFO.0.get() };
    info.pending_irqs
        .fetch_or(1 << (pin & 63), Ordering::Release);
}

#[cfg(not(test))]
pub use imp::*;

#[cfg(not(test))]
mod imp {
    use core::arch::asm;
    use core::sync::atomic::Ordering;

    use testguest_abi::{
        BootInfo, Syscall, VirtioMmioDevice, BOOT_INFO_MAGIC, CONSOLE_WRITE_MAX, FLAG_KVMCLOCK,
        FLAG_PVM, FLAG_SUPERVISOR,
    };

    use super::{Shared, AGENT_ENTRY, BOOT_INFO};
    use crate::boot_params::E820Map;
    use crate::cmdline::{Action, Cmdline};
    use crate::cpu::CpuidResult;
    use crate::trap::{USER_CS, USER_DS};
    use crate::{apic, cpu, event, kvmclock, paging, serial, smp};

    /// RFLAGS of the agent at entry: IF set, reserved bit 1.
    const USER_RFLAGS: u64 = 0x202;
    /// How long the TSC is measured against the LAPIC timer when neither
    /// kvmclock nor CPUID gives its frequency (in timer counts: 1 ms at 1 GHz).
    const TSC_MEASURE_COUNTS: u64 = 62_500;

    /// What the kernel does once the agent says it is ready.
    struct AfterReady {
        action: Action<'static>,
        e820: E820Map<'static>,
        bus_hz: u64,
    }

    static AFTER_READY: Shared<Option<AfterReady>> = Shared(core::cell::UnsafeCell::new(None));

    /// What `start_agent` hands over.
    pub struct AgentStart<'a> {
        pub cmdline: &'a Cmdline<'static>,
        /// The command line's text (in place, in RAM).
        pub cmdline_text: &'static str,
        pub e820: E820Map<'static>,
        /// The kernel runs at CPL 3 under PVM (native mode or PVM proper):
        /// reported as PVM, and the agent is called directly.
        pub pvm: bool,
        /// LAPIC timer input rate.
        pub bus_hz: u64,
        /// PVM native mode (see `trap`).
        pub native: bool,
        /// CPUID as this guest must execute it.
        pub cpuid: fn(u32) -> CpuidResult,
        /// TSC when the BSP started.
        pub boot_tsc: u64,
        /// Scratch memory for `TouchMemory`: its start and the RAM after it.
        pub touch_base: u64,
        pub touch_len: u64,
    }

    /// Fills the boot information page and starts the agent on this CPU (the
    /// BSP). Never returns: the agent gives control back only through system
    /// calls.
    pub fn start_agent(start: AgentStart) -> ! {
        // SAFETY: the agent has not started; nothing else uses the page yet.
        let info = unsafe { &mut *BOOT_INFO.0.get() };
        fill_boot_info(info, &start);
        // SAFETY: as above, the agent has not started.
        unsafe {
            *AFTER_READY.0.get() = Some(AfterReady {
                action: start.cmdline.action,
                e820: start.e820,
                bus_hz: start.bus_hz,
            });
        }
        let info_addr = info as *const BootInfo as u64;
        if start.pvm {
            info.flags |= FLAG_SUPERVISOR;
            info.syscall_fn = syscall as *const () as u64;
            // SAFETY: the agent's entry sets up its own stack and never
            // returns; interrupts stay off (supervisor rules, see `event`).
            unsafe {
                asm!("jmp {entry}", entry = in(reg) AGENT_ENTRY, in("rdi") info_addr, options(noreturn))
            }
        }
        // SAFETY: an interrupt frame to the agent's entry in user mode. Its
        // entry sets up its own stack before it uses one; the TSS already has
        // RSP0 and the ISTs for what arrives from user mode.
        unsafe {
            asm!(
                "push {ss}",
                "push 0",
                "push {rflags}",
                "push {cs}",
                "push {rip}",
                "iretq",
                ss = in(reg) u64::from(USER_DS),
                rflags = in(reg) USER_RFLAGS,
                cs = in(reg) u64::from(USER_CS),
                rip = in(reg) AGENT_ENTRY,
                in("rdi") info_addr,
                options(noreturn)
            )
        }
    }

    fn fill_boot_info(info: &mut BootInfo, start: &AgentStart) {
        // Field by field: the page is zero (.bss), and building a whole
        // BootInfo value would make LLVM zero-fill it with SSE stores the
        // emulating hypervisor cannot run (see tests/image.rs).
        info.magic = BOOT_INFO_MAGIC;
        let mut flags = 0;
        if start.pvm {
            flags |= FLAG_PVM;
        }
        // CPUID does not describe the vCPU in PVM native mode (it is not
        // trapped there); native mode exists only under kvm_pvm, whose KVM
        // always implements kvmclock.
        if start.native || kvmclock::offered(start.cpuid) {
            kvmclock::register(&info.pvclock, &info.wall_clock);
            flags |= FLAG_KVMCLOCK;
        } else {
            info.tsc_khz = kvmclock::tsc_khz_from_cpuid(start.cpuid)
                .unwrap_or_else(|| measure_tsc_khz(start.bus_hz));
        }
        info.flags = flags;
        info.boot_tsc = start.boot_tsc;
        info.ram_bytes = start.e820.ram_bytes();
        info.touch_base = start.touch_base;
        info.touch_len = start.touch_len;
        info.online_cpus = smp::online();
        let mut n = 0;
        for dev in start.cmdline.virtio_mmio.iter().flatten() {
            let slot: &mut VirtioMmioDevice = &mut info.devices[n];
            slot.addr = dev.addr;
            slot.size = dev.size;
            slot.irq = dev.irq;
            n += 1;
        }
        info.device_count = n as u32;
        info.cmdline_addr = start.cmdline_text.as_ptr() as u64;
        info.cmdline_len = start.cmdline_text.len() as u64;
    }

    /// TSC kHz measured over about a millisecond of the LAPIC timer (running
    /// periodically since boot). Used only without kvmclock and CPUID leaves.
    fn measure_tsc_khz(bus_hz: u64) -> u64 {
        let (c0, initial) = apic::timer_counts();
        let t0 = kvmclock::rdtsc();
        let mut elapsed = 0;
        while elapsed < TSC_MEASURE_COUNTS {
            cpu::relax();
            elapsed = apic::timer_elapsed(c0, apic::timer_counts().0, initial);
        }
        let t1 = kvmclock::rdtsc();
        kvmclock::tsc_khz_from_measurement(t1.wrapping_sub(t0), elapsed, bus_hz)
    }

    /// The system call handler: `int3` from user mode (via `trap`), or a
    /// direct call in supervisor mode. Runs with interrupts off.
    pub extern "C" fn syscall(a0: u64, a1: u64, _a2: u64, nr: u64) -> u64 {
        match Syscall::from_u64(nr) {
            Some(Syscall::Wait) => {
                // SAFETY: only the atomic field is read.
                let info = unsafe { &*BOOT_INFO.0.get() };
                // Interrupts are off: one arriving after this check is taken
                // in the halt (STI's shadow covers the HLT).
                if info.pending_irqs.load(Ordering::Acquire) == 0 {
                    event::idle_wait();
                }
                0
            }
            Some(Syscall::ConsoleWrite) => console_write(a0, a1),
            Some(Syscall::Ready) => ready(),
            Some(Syscall::Exit) => cpu::reset(),
            Some(Syscall::OnlineCpus) => u64::from(smp::online()),
            None => u64::MAX,
        }
    }

    fn console_write(addr: u64, len: u64) -> u64 {
        let in_memory = addr
            .checked_add(len)
            .is_some_and(|end| end <= paging::MAPPED_BYTES);
        if len > CONSOLE_WRITE_MAX || !in_memory {
            return u64::MAX;
        }
        // SAFETY: identity mapped (checked above); the agent passes its own
        // buffer and does not change it during the call.
        let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) };
        serial::write_bytes_locked(bytes);
        len
    }

    fn ready() -> u64 {
        crate::println!("minivmm-testguest ready");
        // SAFETY: taken once, on the BSP, with interrupts off.
        let after = unsafe { (*AFTER_READY.0.get()).take() };
        let Some(after) = after else { return 0 };
        match after.action {
            Action::Idle => {
                apic::set_timer_hz(after.bus_hz, apic::AGENT_TIMER_HZ);
                0
            }
            action => crate::kernel::run(action, &after.e820),
        }
    }
}

// The agent's bytes, placed at AGENT_START by link.ld.
#[cfg(not(test))]
core::arch::global_asm!(concat!(
    ".pushsection .agent_image, \"a\"\n",
    ".incbin \"",
    env!("OUT_DIR"),
    "/agent.bin\"\n",
    ".popsection\n"
));
