//! Wiring virtio-mmio devices into a VM: each transport goes on the MMIO bus
//! in the 32-bit gap, its interrupt becomes a KVM irqfd on an IOAPIC pin, its
//! queue notifications KVM ioeventfds, and the devices' work runs on one
//! event-loop thread per VM. Also their saved state.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::virtio::mem::{Mem, MemRegion, MemState};
pub use devices::virtio::vsock::ConnectionWatch;
use devices::virtio::vsock::{Vsock, VsockState};
use devices::virtio::{
    kernel_cmdline_arg, EventLoop, EventLoopHandle, Fs, FsState, MmioTransport, MmioTransportState,
    Rng, VirtioDevice, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET,
};
use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::boot::acpi::MmioDevice;
use crate::bus::Bus;
use crate::layout::VIRTIO_MMIO_START;

/// First IOAPIC pin used by virtio devices (0-4 are legacy ISA devices).
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// The guest CID every VM gets (each VM has its own socket, so it need not differ).
pub const GUEST_CID: u64 = 3;

/// Default virtio-mem region of a template: how far its clones can grow.
/// Untouched, it costs address space only (MAP_NORESERVE).
pub const DEFAULT_HOTPLUG_BYTES: u64 = 2 << 30;

/// Which virtio devices a VM has.
#[derive(Clone, Debug, Default)]
pub struct VirtioConfig {
    /// virtio-rng fed from the host's getrandom.
    pub rng: bool,
    /// virtio-vsock, hybrid over this unix socket path.
    pub vsock: Option<PathBuf>,
    /// virtio-fs devices, each served by a vhost-user backend (virtiofsd)
    /// already listening on its socket.
    pub fs: Vec<FsShare>,
    /// virtio-mem with a hot-plug region of this many bytes (a multiple of
    /// 2 MiB) above RAM, nothing plugged: what `Vm::grow_memory` fills.
    pub mem: Option<u64>,
}

/// One virtio-fs device: the guest finds it by its tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsShare {
    /// The tag (virtio 1.2 §5.11.4), unique per VM.
    pub tag: String,
    /// The vhost-user socket of its backend.
    pub socket: PathBuf,
}

/// Saved state of the virtio devices.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VirtioState {
    /// The rng transport.
    pub rng: Option<MmioTransportState>,
    /// The vsock transport and device (without connections).
    pub vsock: Option<(MmioTransportState, VsockState)>,
    /// The virtio-fs transports and devices (the backends are not saved:
    /// a restored VM connects fresh ones).
    pub fs: Vec<(MmioTransportState, FsState)>,
    /// The virtio-mem transport and device (the region's contents are not
    /// saved: a VM is saved with nothing plugged).
    #[serde(default)]
    pub mem: Option<(MmioTransportState, MemState)>,
}

impl VirtioState {
    /// Names of the devices, in slot order (for manifests and comparisons).
    pub fn device_names(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.rng.is_some() {
            v.push("rng".to_string());
        }
        if self.vsock.is_some() {
            v.push("vsock".to_string());
        }
        for (_, fs) in &self.fs {
            v.push(format!("fs:{}", fs.tag));
        }
        if let Some((_, m)) = &self.mem {
            v.push(format!("mem:{}", m.region_size));
        }
        v
    }
}

/// Errors attaching virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// Creating a device failed.
    #[error("cannot create virtio-{device}: {reason}")]
    Device {
        /// Which device.
        device: &'static str,
        /// Why.
        reason: String,
    },
    /// A KVM registration failed.
    #[error("{what} for virtio-{device} failed: {source}")]
    Ioctl {
        /// Which device.
        device: &'static str,
        /// Which registration.
        what: &'static str,
        /// errno.
        source: kvm_ioctls::Error,
    },
    /// The MMIO window is taken.
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
    /// A restore needs a vsock socket path for the clone.
    #[error("the saved VM has a vsock device: give the restored VM a vsock socket path")]
    VsockPathMissing,
    /// Two virtio-fs devices with one tag.
    #[error("virtio-fs tag {0:?} is given twice")]
    DuplicateFsTag(String),
    /// The hot-plug region does not fit above RAM inside the identity map.
    #[error(
        "a virtio-mem region of {size:#x} bytes does not fit above RAM ending at {ram_end:#x}"
    )]
    MemRegion {
        /// Region size asked for.
        size: u64,
        /// End of RAM.
        ram_end: u64,
    },
    /// A restore needs a backend for each saved virtio-fs device.
    #[error("the saved VM has a virtio-fs device tagged {0:?}: give the restored VM a virtiofsd socket for it")]
    FsSocketMissing(String),
    /// Pausing the device thread failed (it is stuck or gone).
    #[error("pausing the virtio devices: {0}")]
    Pause(#[source] devices::virtio::EventLoopError),
    /// The devices were still running when their state was asked for.
    #[error("the virtio devices are not paused: their state could change while it is saved")]
    NotQuiet,
}

/// A transport shared between the MMIO bus and the VM (for saving it).
type SharedTransport = Arc<Mutex<MmioTransport>>;

/// The live virtio devices of a VM.
pub struct VirtioDevices {
    rng: Option<SharedTransport>,
    vsock: Option<(SharedTransport, Arc<Mutex<Vsock>>)>,
    fs: Vec<(SharedTransport, Arc<Mutex<Fs>>)>,
    mem: Option<(SharedTransport, Arc<Mutex<Mem>>)>,
    event_loop: Option<EventLoopHandle>,
    cmdline: Vec<String>,
    mmio: Vec<MmioDevice>,
}

fn device_err(device: &'static str) -> impl Fn(String) -> VirtioError {
    move |reason| VirtioError::Device { device, reason }
}

struct Wiring<'a> {
    vm_id: &'a str,
    vm_fd: &'a VmFd,
    mem: &'a GuestMemoryMmap,
    bus: &'a mut Bus,
    slot: u64,
    cmdline: Vec<String>,
    mmio: Vec<MmioDevice>,
}

impl Wiring<'_> {
    /// Put `device` behind a transport (new, or restored from `state`) in the next slot.
    fn attach(
        &mut self,
        name: &'static str,
        device: Arc<Mutex<dyn VirtioDevice>>,
        state: Option<&MmioTransportState>,
    ) -> Result<Arc<Mutex<MmioTransport>>, VirtioError> {
        let base = VIRTIO_MMIO_START + self.slot * MMIO_WINDOW_SIZE;
        let irq = VIRTIO_FIRST_IRQ + self.slot as u32;
        let mem = self.mem.clone();
        let transport = match state {
            Some(s) => MmioTransport::restore(self.vm_id, mem, device, s),
            None => MmioTransport::new(self.vm_id, mem, device),
        }
        .map_err(|e| device_err(name)(e.to_string()))?;
        let ioctl = |what| {
            move |source| VirtioError::Ioctl {
                device: name,
                what,
                source,
            }
        };
        self.vm_fd
            .register_irqfd(transport.irq_evt(), irq)
            .map_err(ioctl("KVM_IRQFD"))?;
        let evts = transport
            .queue_notify_evts()
            .map_err(|e| device_err(name)(e.to_string()))?;
        for (queue, evt) in evts {
            let addr = IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET);
            self.vm_fd
                .register_ioevent(&evt, &addr, u32::from(queue))
                .map_err(ioctl("KVM_IOEVENTFD"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.bus.insert(base, MMIO_WINDOW_SIZE, transport.clone())?;
        self.cmdline.push(kernel_cmdline_arg(base, irq));
        self.mmio.push(MmioDevice {
            base,
            len: MMIO_WINDOW_SIZE,
            irq,
        });
        self.slot += 1;
        Ok(transport)
    }
}

impl VirtioDevices {
    /// Create (state None) or restore the devices and wire them into the VM.
    /// On restore the device set comes from `state`; `config.vsock` gives the
    /// restored VM's own socket path.
    pub fn attach(
        vm_id: &str,
        vm_fd: &VmFd,
        mem: &GuestMemoryMmap,
        bus: &mut Bus,
        config: &VirtioConfig,
        state: Option<&VirtioState>,
    ) -> Result<VirtioDevices, VirtioError> {
        let mut w = Wiring {
            vm_id,
            vm_fd,
            mem,
            bus,
            slot: 0,
            cmdline: Vec::new(),
            mmio: Vec::new(),
        };
        let mut event_loop =
            EventLoop::new().map_err(|e| device_err("event loop")(e.to_string()))?;
        let want_rng = state.map_or(config.rng, |s| s.rng.is_some());
        let rng = if want_rng {
            let dev = Arc::new(Mutex::new(
                Rng::new(vm_id).map_err(|e| device_err("rng")(e.to_string()))?,
            ));
            let t = w.attach("rng", dev.clone(), state.and_then(|s| s.rng.as_ref()))?;
            event_loop.add_subscriber(dev);
            Some(t)
        } else {
            None
        };
        let saved_vsock = state.and_then(|s| s.vsock.as_ref());
        let want_vsock = state.map_or(config.vsock.is_some(), |s| s.vsock.is_some());
        let vsock = if want_vsock {
            let path = config.vsock.as_ref().ok_or(VirtioError::VsockPathMissing)?;
            let dev = match saved_vsock {
                Some((_, vs)) => Vsock::restore(vm_id, vs, path),
                None => Vsock::new(vm_id, GUEST_CID, path),
            }
            .map_err(|e| device_err("vsock")(e.to_string()))?;
            let dev = Arc::new(Mutex::new(dev));
            let t = w.attach("vsock", dev.clone(), saved_vsock.map(|(t, _)| t))?;
            event_loop.add_subscriber(dev.clone());
            Some((t, dev))
        } else {
            None
        };
        let mut fs = Vec::new();
        let wanted_fs: Vec<(String, Option<&(MmioTransportState, FsState)>)> = match state {
            Some(s) => s.fs.iter().map(|f| (f.1.tag.clone(), Some(f))).collect(),
            None => config.fs.iter().map(|f| (f.tag.clone(), None)).collect(),
        };
        for (i, (tag, _)) in wanted_fs.iter().enumerate() {
            if wanted_fs[..i].iter().any(|(t, _)| t == tag) {
                return Err(VirtioError::DuplicateFsTag(tag.clone()));
            }
        }
        for (tag, saved) in wanted_fs {
            let share = config
                .fs
                .iter()
                .find(|f| f.tag == tag)
                .ok_or_else(|| VirtioError::FsSocketMissing(tag.clone()))?;
            let dev = match saved {
                Some((_, st)) => Fs::restore(vm_id, st, &share.socket),
                None => Fs::new(vm_id, &tag, &share.socket),
            }
            .map_err(|e| device_err("fs")(e.to_string()))?;
            let dev = Arc::new(Mutex::new(dev));
            let t = w.attach("fs", dev.clone(), saved.map(|(t, _)| t))?;
            event_loop.add_subscriber(dev.clone());
            fs.push((t, dev));
        }
        let saved_mem = state.and_then(|s| s.mem.as_ref());
        let mem_size = match state {
            Some(_) => saved_mem.map(|(_, m)| m.region_size),
            None => config.mem,
        };
        let hotplug = match mem_size {
            Some(size) => {
                let ram_end = mem
                    .iter()
                    .map(|r| r.start_addr().0 + r.len())
                    .max()
                    .unwrap_or(0);
                let addr = crate::layout::hotplug_region_start(ram_end, size)
                    .ok_or(VirtioError::MemRegion { size, ram_end })?;
                let region = Arc::new(
                    MemRegion::new(addr, size).map_err(|e| device_err("mem")(e.to_string()))?,
                );
                let dev = match saved_mem {
                    Some((_, st)) => Mem::restore(vm_id, st, region),
                    None => Mem::new(vm_id, region),
                }
                .map_err(|e| device_err("mem")(e.to_string()))?;
                let dev = Arc::new(Mutex::new(dev));
                let t = w.attach("mem", dev.clone(), saved_mem.map(|(t, _)| t))?;
                event_loop.add_subscriber(dev.clone());
                Some((t, dev))
            }
            None => None,
        };
        let cmdline = std::mem::take(&mut w.cmdline);
        let mmio = std::mem::take(&mut w.mmio);
        let event_loop = if rng.is_some() || vsock.is_some() || !fs.is_empty() || hotplug.is_some()
        {
            Some(
                event_loop
                    .start_with(vm_id, || {
                        crate::seccomp::install_if_enabled(crate::seccomp::ThreadKind::DeviceLoop)
                            .map_err(|e| e.to_string())
                    })
                    .map_err(|e| device_err("event loop")(e.to_string()))?,
            )
        } else {
            None
        };
        Ok(VirtioDevices {
            rng,
            vsock,
            fs,
            mem: hotplug,
            event_loop,
            cmdline,
            mmio,
        })
    }

    /// The `virtio_mmio.device=` command-line arguments announcing the devices.
    pub fn cmdline(&self) -> &[String] {
        &self.cmdline
    }

    /// The transports' MMIO windows and interrupts, in slot order (for the DSDT).
    pub fn mmio_devices(&self) -> Vec<MmioDevice> {
        self.mmio.clone()
    }

    /// Tell the guest's vsock driver that every connection is gone (after a
    /// restore: connections from before the snapshot cannot survive).
    pub fn vsock_transport_reset(&self) {
        if let Some((_, dev)) = &self.vsock {
            dev.lock()
                .unwrap_or_else(|p| p.into_inner())
                .send_transport_reset();
        }
    }

    /// The virtio-mem device, if the VM has one.
    pub fn mem(&self) -> Option<&Arc<Mutex<Mem>>> {
        self.mem.as_ref().map(|(_, d)| d)
    }

    /// Hold the device thread between two events (after the vCPUs are
    /// paused): no queue moves and guest memory is not written until
    /// [`resume`](Self::resume).
    pub fn pause(&self, timeout: std::time::Duration) -> Result<(), VirtioError> {
        match &self.event_loop {
            Some(h) => h.pause(timeout).map_err(VirtioError::Pause),
            None => Ok(()),
        }
    }

    /// Let the device thread run again after [`pause`](Self::pause).
    pub fn resume(&self) {
        if let Some(h) = &self.event_loop {
            h.resume();
        }
    }

    /// Whether no device can run now (paused, stopped, or never started).
    pub fn is_quiet(&self) -> bool {
        self.event_loop.as_ref().is_none_or(|h| h.is_quiet())
    }

    /// Wait until the vsock device has no open connection, or `timeout`
    /// passes; returns how many are still open (0 without a vsock device).
    pub fn wait_vsock_idle(&self, timeout: std::time::Duration) -> usize {
        self.vsock_connection_watch()
            .map_or(0, |w| w.wait_idle(timeout))
    }

    /// The vsock device's connection count, to wait on (None without vsock).
    pub fn vsock_connection_watch(&self) -> Option<ConnectionWatch> {
        self.vsock.as_ref().map(|(_, dev)| {
            dev.lock()
                .unwrap_or_else(|p| p.into_inner())
                .connection_watch()
        })
    }

    /// Save the devices' state; they must be quiet ([`pause`](Self::pause)),
    /// or a queue could move between this state and the memory it describes.
    pub fn save(&self) -> Result<VirtioState, VirtioError> {
        if !self.is_quiet() {
            return Err(VirtioError::NotQuiet);
        }
        let lock =
            |t: &Arc<Mutex<MmioTransport>>| t.lock().unwrap_or_else(|p| p.into_inner()).save();
        Ok(VirtioState {
            rng: self.rng.as_ref().map(lock),
            vsock: self
                .vsock
                .as_ref()
                .map(|(t, d)| (lock(t), d.lock().unwrap_or_else(|p| p.into_inner()).save())),
            fs: self
                .fs
                .iter()
                .map(|(t, d)| (lock(t), d.lock().unwrap_or_else(|p| p.into_inner()).save()))
                .collect(),
            mem: self
                .mem
                .as_ref()
                .map(|(t, d)| (lock(t), d.lock().unwrap_or_else(|p| p.into_inner()).save())),
        })
    }

    /// Stop the device thread (bounded wait); false if it was stuck and left behind.
    pub fn stop(&mut self) -> bool {
        self.event_loop.take().is_none_or(|h| h.stop())
    }
}

impl Drop for VirtioDevices {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
