//! The guest's life: BSP and AP bring-up, then the agent (see `usermode`)
//! and the command line's action.

use core::panic::PanicInfo;

use crate::boot_params::{self, E820Map, ZERO_PAGE_SIZE};
use crate::cmdline::{Action, Cmdline};
use crate::event::EventPath;
use crate::println;
use crate::usermode::AgentStart;
use crate::{apic, cpu, event, kvmclock, percpu, pvm, serial, smp, trap, usermode};

/// The VMM identity-maps this much guest-physical memory (boot contract).
const IDENTITY_MAP_END: u64 = 16 << 30;
/// Where `action=touch` writes (16 MiB, above the image).
const TOUCH_BASE: u64 = 0x100_0000;
const PAGE_SIZE: u64 = 4096;
/// How long the BSP waits for the APs before it goes on without them.
const AP_TIMEOUT_TICKS: u64 = 2 * apic::TIMER_HZ;

/// An all-zero page standing in for a zero page the VMM did not give.
static NO_ZERO_PAGE: [u8; ZERO_PAGE_SIZE] = [0; ZERO_PAGE_SIZE];

/// Called by `_start` on this CPU's own stack.
pub extern "C" fn rust_entry(cpu: u64, boot_params: u64) -> ! {
    if cpu == 0 {
        bsp_main(boot_params)
    } else {
        ap_main(cpu as u32)
    }
}

/// Per-CPU event handling on whichever path this guest uses.
fn setup_events(area: &mut percpu::CpuArea) {
    match event::path() {
        EventPath::Pvm => pvm::setup_cpu(area),
        EventPath::IdtNative => trap::setup_cpu(area, true),
        EventPath::Idt => trap::setup_cpu(area, false),
    }
}

fn cpuid(leaf: u32) -> cpu::CpuidResult {
    if event::is_pvm() {
        pvm::cpuid(leaf, 0)
    } else {
        cpu::cpuid(leaf, 0)
    }
}

fn bsp_main(boot_params: u64) -> ! {
    let boot_tsc = kvmclock::rdtsc();
    // Hardware virtualization (or real hardware), and the PVM KVM of the
    // project's machines whether it emulates our CPL-0 code or runs us in its
    // native mode (CS RPL 3, see `trap`), deliver through the IDT; under PVM
    // proper the IDT is ignored and events come through the PVCS (that path
    // is not exercised here, see `pvm`).
    let path = if pvm::detect() {
        EventPath::Pvm
    } else if cpu::read_cs() & 3 == 3 {
        EventPath::IdtNative
    } else {
        EventPath::Idt
    };
    event::set_path(path);
    let pvm = path != EventPath::Idt;
    // SAFETY: the BSP owns area 0.
    let area = unsafe { percpu::area(0) };
    area.init(0);
    setup_events(area);
    // In PVM native mode CPUID is not trapped and describes the host, not
    // the vCPU (measured): the check would be meaningless there.
    if path != EventPath::IdtNative && !apic::has_x2apic(cpuid(1).ecx) {
        panic!("x2APIC is not offered in CPUID leaf 1");
    }
    apic::enable_local();
    smp::report_in();
    smp::release_aps(apic::id());

    // From here faults are reported, so the boot data can be read.
    let (e820, cmdline_text) = read_boot_params(boot_params);
    let cmdline = Cmdline::parse(cmdline_text);

    apic::mask_pic();
    let devices = cmdline.virtio_mmio;
    apic::setup_ioapic(smp::bsp_apic_id(), |pin| {
        let is_virtio = devices.iter().flatten().any(|d| d.irq == pin);
        if pin == apic::SERIAL_PIN || is_virtio {
            apic::PinRoute::Edge
        } else {
            apic::PinRoute::Masked
        }
    });
    let bus_hz = cmdline.lapic_bus_hz.unwrap_or(apic::KVM_APIC_BUS_HZ);
    apic::start_timer(bus_hz);

    let deadline = event::ticks() + AP_TIMEOUT_TICKS;
    while smp::online() < cmdline.cpus {
        if event::ticks() >= deadline {
            println!(
                "testguest: only {} of {} cpus reported in",
                smp::online(),
                cmdline.cpus
            );
            break;
        }
        event::idle_wait();
    }

    println!(
        "minivmm-testguest: pvm={} cpus={} mem_mib={}",
        u8::from(pvm),
        smp::online(),
        e820.ram_bytes() >> 20
    );
    // The agent starts when it has something to do: serve devices, or idle
    // in their place. An action without devices runs here, as it always did.
    let has_devices = cmdline.virtio_mmio.iter().any(Option::is_some);
    if !has_devices && cmdline.action != Action::Idle {
        println!("minivmm-testguest ready");
        run(cmdline.action, &e820)
    }
    let touch_len = e820
        .ram_extent(TOUCH_BASE)
        .min(IDENTITY_MAP_END - TOUCH_BASE);
    // The agent prints the ready line (through the kernel) once it listens,
    // and then the kernel runs the action, if any.
    usermode::start_agent(AgentStart {
        cmdline: &cmdline,
        cmdline_text,
        e820,
        pvm,
        native: path == EventPath::IdtNative,
        bus_hz,
        cpuid,
        boot_tsc,
        touch_base: TOUCH_BASE,
        touch_len,
    })
}

fn ap_main(index: u32) -> ! {
    smp::wait_for_release();
    // SAFETY: AP `index` owns area `index` (`_start` checked the bound).
    let area = unsafe { percpu::area(index) };
    area.init(index);
    setup_events(area);
    apic::enable_local();
    smp::report_in();
    apic::send_ipi(smp::bsp_apic_id(), event::WAKE_VECTOR);
    loop {
        event::idle_wait();
    }
}

/// Reads the zero page and the command line in place (the guest never
/// writes below 16 MiB outside its image), checking each address against the
/// identity map and the e820 RAM ranges first.
fn read_boot_params(addr: u64) -> (E820Map<'static>, &'static str) {
    if addr == 0
        || addr
            .checked_add(ZERO_PAGE_SIZE as u64)
            .is_none_or(|end| end > IDENTITY_MAP_END)
    {
        println!("testguest: boot_params at {addr:#x} is outside memory, ignored");
        return (E820Map::from_zero_page(&NO_ZERO_PAGE), "");
    }
    // SAFETY: identity mapped, and nothing writes the zero page while the
    // guest runs.
    let zp = unsafe { &*(addr as *const [u8; ZERO_PAGE_SIZE]) };
    let e820 = E820Map::from_zero_page(zp);
    if !e820.is_ram(addr, ZERO_PAGE_SIZE as u64) {
        println!("testguest: boot_params at {addr:#x} is not in e820 RAM");
    }
    let (cl_addr, cl_max) = boot_params::cmdline_location(zp);
    if cl_addr == 0 {
        return (e820, "");
    }
    let len = e820
        .ram_extent(cl_addr)
        .min(cl_max as u64)
        .min(IDENTITY_MAP_END.saturating_sub(cl_addr));
    if len == 0 {
        println!("testguest: command line at {cl_addr:#x} is not in RAM, ignored");
        return (e820, "");
    }
    // SAFETY: `len` bytes from `cl_addr` are RAM inside the identity map,
    // and nothing writes them while the guest runs.
    let src = unsafe { core::slice::from_raw_parts(cl_addr as *const u8, len as usize) };
    match boot_params::cmdline_str(src) {
        Some(text) => (e820, text),
        None => {
            println!("testguest: command line is not UTF-8, ignored");
            (e820, "")
        }
    }
}

/// Runs the command line's action (never `Action::Idle`, which is the
/// agent's), on the BSP with interrupts off.
pub(crate) fn run(action: Action, e820: &E820Map) -> ! {
    match action {
        Action::Idle => loop {
            event::idle_wait();
        },
        Action::Reset => cpu::reset(),
        Action::Count => {
            let mut n: u64 = 0;
            loop {
                println!("count {n}");
                n = n.wrapping_add(1);
            }
        }
        Action::Touch { pages, byte } => {
            let len = pages.checked_mul(PAGE_SIZE);
            match len {
                Some(len)
                    if e820.is_ram(TOUCH_BASE, len) && TOUCH_BASE + len <= IDENTITY_MAP_END =>
                {
                    // SAFETY: RAM above the image (link.ld keeps the image
                    // below 16 MiB), identity mapped, used by nothing else.
                    unsafe { testguest_abi::mem::fill(TOUCH_BASE as *mut u8, byte, len as usize) };
                    println!("touched {pages} pages");
                }
                _ => println!(
                    "testguest error: touch: {pages} pages at {TOUCH_BASE:#x} do not fit in RAM"
                ),
            }
            cpu::reset()
        }
        Action::Ticks(n) => {
            let start = event::ticks();
            while event::ticks().wrapping_sub(start) < n {
                event::idle_wait();
            }
            println!("ticks {n} done");
            cpu::reset()
        }
        Action::Cpus => {
            println!("cpus online {}", smp::online());
            cpu::reset()
        }
        Action::Fault => {
            // SAFETY: raises #UD, which the event path reports before it resets.
            unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
            unreachable!("UD2 returned")
        }
        Action::Panic => panic!("requested by action=panic"),
        Action::Invalid(what) => {
            println!("testguest error: unknown action '{what}'");
            cpu::reset()
        }
    }
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    match info.location() {
        Some(loc) => serial::print_unlocked(format_args!(
            "testguest panic: {} ({}:{})\n",
            info.message(),
            loc.file(),
            loc.line()
        )),
        None => serial::print_unlocked(format_args!("testguest panic: {}\n", info.message())),
    }
    cpu::reset()
}

/// Never called (panic = "abort"), but the precompiled alloc/core reference
/// it and a build without LTO (the dev profile) does not drop the reference.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
