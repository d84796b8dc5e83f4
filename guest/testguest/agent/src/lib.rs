//! The test guest's agent, started by the kernel in user mode (see the
//! kernel's `usermode` and `testguest-abi`), where it runs natively even when
//! the hypervisor emulates the kernel's instructions.
//!
//! It finds its devices on the command line (`BootInfo::devices`), keys its
//! CSPRNG from virtio-rng, brings up virtio-vsock with every rx buffer
//! posted, tells the kernel it is ready (the kernel prints the ready line
//! and runs the command line's action, if any), opens the `vsock_connect=`
//! connections, and then serves: each round takes the interrupts the kernel
//! noted, acknowledges them at the devices, drains the queues through the
//! vsock transport and the agent protocol, sends what that produced, and
//! sleeps in the kernel (`sys::wait`) once nothing is left to do.

#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod agent;
pub mod chacha;
pub mod clock;
pub mod cmdline;
pub mod console;
pub mod heap;
mod rt;
pub mod sys;
pub mod virtio;
pub mod vsock;

use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use testguest_abi::{BootInfo, BOOT_INFO_MAGIC};

use agent::{Agent, Session};
use clock::Clock;
use virtio::fs::FsDevice;
use virtio::mem::{MemDevice, DEVICE_ID_MEM};
use virtio::rng::EntropyDevice;
use virtio::vsock::VsockDevice;
use virtio::{MmioDevice, DEVICE_ID_FS, DEVICE_ID_RNG, DEVICE_ID_VSOCK};
use vsock::Transport;

/// How long the agent waits for virtio-rng's first entropy before it goes on
/// with what it has (and says so).
const ENTROPY_TIMEOUT_NS: u64 = 1_000_000_000;

/// Called by `_start` on the agent's stack.
pub extern "C" fn agent_main(info: &'static BootInfo) -> ! {
    sys::init(info);
    if info.magic != BOOT_INFO_MAGIC {
        println!(
            "testguest agent: bad boot information (magic {:#x})",
            info.magic
        );
        sys::exit();
    }
    let clock = Clock::new(info);
    let (mut entropy, mut vsock, shares, mut hotplug) = find_devices(info);

    // Seed: whatever the device gives within the timeout, plus the TSC.
    let mut seed: Vec<u8> = Vec::new();
    seed.extend_from_slice(&clock::rdtsc().to_le_bytes());
    if let Some(dev) = entropy.as_mut() {
        dev.request();
        let deadline = clock.monotonic_ns().saturating_add(ENTROPY_TIMEOUT_NS);
        let mut got = false;
        while !got && clock.monotonic_ns() < deadline {
            take_interrupts(info, &[Some(&dev.mmio)]);
            got = dev.poll(|bytes| seed.extend_from_slice(bytes));
            if !got {
                sys::wait();
            }
        }
        if !got {
            println!(
                "testguest agent: no entropy from virtio-rng within 1 s; seeded from the TSC only"
            );
        }
    } else if vsock.is_some() {
        println!("testguest agent: no virtio-rng device; RNG seeded from the TSC only");
    }
    let mut agent = Agent::new(info, clock, &seed);
    agent.set_shares(shares);

    let mut transport = Transport::new(vsock.as_ref().map_or(0, VsockDevice::guest_cid));
    if vsock.is_some() {
        println!(
            "testguest agent: vsock cid {} listening on port {}",
            transport.cid(),
            agent_protocol::AGENT_VSOCK_PORT
        );
    }
    agent.set_boot_time(agent.clock().monotonic_ns());
    sys::ready();

    let connect_ports = cmdline::vsock_connect_ports(cmdline_text(info));
    if vsock.is_some() {
        for &port in &connect_ports {
            transport.connect(port, Session::Hello);
        }
    }
    // The host may have asked for memory before the agent got here.
    let mut mem_config_changed = true;
    loop {
        let pending = take_interrupts(
            info,
            &[
                entropy.as_ref().map(|d| &d.mmio),
                vsock.as_ref().map(|d| &d.mmio),
                hotplug.as_ref().map(|d| &d.mmio),
            ],
        );
        let took = pending != 0;
        if let Some(dev) = hotplug.as_mut() {
            mem_config_changed |= pending & (1 << (dev.mmio.irq & 63)) != 0;
            if dev.poll(core::mem::take(&mut mem_config_changed)) {
                agent.set_hotplug(dev.base(), dev.plugged());
            }
        }
        if let Some(dev) = entropy.as_mut() {
            dev.poll(|bytes| agent.add_entropy(bytes));
        }
        if let Some(dev) = vsock.as_mut() {
            if dev.poll_events().transport_reset {
                // A snapshot was restored: the host side forgot every
                // connection. Start over. The RNG continues from the
                // snapshot's state until the host reseeds it (see `agent`).
                transport.reset_all();
                transport.set_cid(dev.guest_cid());
                for &port in &connect_ports {
                    transport.connect(port, Session::Hello);
                }
            }
            dev.reclaim_tx();
            dev.poll_rx(|hdr, payload| transport.on_packet(&mut agent, hdr, payload));
            if agent.take_quiesce_request() {
                transport.close_all(&mut agent);
            }
            while let Some(packet) = transport.pop_packet() {
                if let Err(packet) = dev.send(packet) {
                    // The tx queue is full: the rest goes when the device
                    // has sent some (its interrupt wakes us).
                    transport.unpop_packet(packet);
                    break;
                }
            }
            dev.kick_tx();
        }
        if agent.take_entropy_request() {
            if let Some(e) = entropy.as_mut() {
                e.request();
            }
        }
        if !took && info.pending_irqs.load(Ordering::Acquire) == 0 {
            sys::wait();
        }
    }
}

/// The command line the kernel passed on.
fn cmdline_text(info: &BootInfo) -> &'static str {
    if info.cmdline_addr == 0 || info.cmdline_len == 0 {
        return "";
    }
    // SAFETY: the kernel hands over the command line in place; RAM nothing
    // writes while the guest runs.
    let bytes = unsafe {
        core::slice::from_raw_parts(info.cmdline_addr as *const u8, info.cmdline_len as usize)
    };
    core::str::from_utf8(bytes).unwrap_or("")
}

/// Takes the interrupt bits the kernel noted and acknowledges them at the
/// devices they belong to. Returns the bits (0: none).
fn take_interrupts(info: &BootInfo, devices: &[Option<&MmioDevice>]) -> u64 {
    let pending = info.pending_irqs.swap(0, Ordering::AcqRel);
    if pending == 0 {
        return 0;
    }
    for dev in devices.iter().flatten() {
        if pending & (1 << (dev.irq & 63)) != 0 {
            dev.ack_interrupt();
        }
    }
    pending
}

/// The devices the agent drives.
type Devices = (
    Option<EntropyDevice>,
    Option<VsockDevice>,
    Vec<FsDevice>,
    Option<MemDevice>,
);

/// Sets up the first virtio-rng, virtio-vsock and virtio-mem device of the
/// command line, and every virtio-fs device. Others are left alone; failures
/// are reported.
fn find_devices(info: &BootInfo) -> Devices {
    let mut hotplug = None;
    let mut entropy = None;
    let mut vsock = None;
    let mut shares = Vec::new();
    let count = (info.device_count as usize).min(info.devices.len());
    for d in &info.devices[..count] {
        // SAFETY: the command line names a virtio-mmio window; the kernel's
        // page tables map the whole MMIO gap.
        let mmio = unsafe { MmioDevice::new(d.addr, d.irq) };
        match mmio.device_id() {
            Ok(DEVICE_ID_RNG) if entropy.is_none() => match EntropyDevice::new(mmio) {
                Ok(dev) => entropy = Some(dev),
                Err(e) => println!("testguest agent: virtio-rng at {:#x}: {e}", d.addr),
            },
            Ok(DEVICE_ID_VSOCK) if vsock.is_none() => match VsockDevice::new(mmio) {
                Ok(dev) => vsock = Some(dev),
                Err(e) => println!("testguest agent: virtio-vsock at {:#x}: {e}", d.addr),
            },
            Ok(DEVICE_ID_FS) => match FsDevice::new(mmio) {
                Ok(dev) => shares.push(dev),
                Err(e) => println!("testguest agent: virtio-fs at {:#x}: {e}", d.addr),
            },
            Ok(DEVICE_ID_MEM) if hotplug.is_none() => match MemDevice::new(mmio) {
                Ok(dev) => hotplug = Some(dev),
                Err(e) => println!("testguest agent: virtio-mem at {:#x}: {e}", d.addr),
            },
            Ok(0) => {}
            Ok(id) => println!(
                "testguest agent: virtio device {id} at {:#x} not used",
                d.addr
            ),
            Err(e) => println!("testguest agent: {:#x}: {e}", d.addr),
        }
    }
    (entropy, vsock, shares, hotplug)
}
