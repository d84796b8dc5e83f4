//! A whole VM: KVM VM fd, guest RAM, in-kernel irqchip and PIT, the legacy
//! devices, vCPU threads, and the operations the rest of minivmm uses
//! (start, pause, resume, stop, wait for the guest to end).

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::acpi_pm::{AcpiPm, ACPI_PM_PORT_COUNT};
use devices::i8042::I8042;
use devices::serial::{Serial, COM1_IRQ, COM1_PORT, SERIAL_PORT_COUNT};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

pub use crate::boot::KernelImage;
use crate::boot::{self, ApStart, BootError, EntryProtocol};
use crate::bus::{Bus, BusError};
use crate::kvm::{self, Flavour, KvmError};
use crate::layout;
use crate::memory::{GuestRam, MemoryBackend, MemoryError};
use crate::state::{
    restore_vcpu, restore_vm, save_vcpu, save_vm, xsave_bytes, DirectStart, StateError,
    VcpuStateContext, VmState,
};
pub use crate::vcpu::GuestExit;
use crate::vcpu::{self, ControlError, VcpuContext, VcpuControl, VcpuHandle};
use crate::virtio::{VirtioConfig, VirtioDevices};

/// Most vCPUs a VM may have (the APIC id field of CPUID.1 is 8 bits).
pub const MAX_VCPUS: u32 = 254;
/// Default time a pause may take before it is reported as failed.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long stopping a VM waits for its threads before reporting them stuck.
pub const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// What to build.
pub struct VmConfig {
    /// An id for logs (and, later, sockets).
    pub id: String,
    /// vCPU count.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// RAM backing.
    pub memory: MemoryBackend,
    /// Kernel to boot.
    pub kernel: KernelImage,
    /// Kernel command line.
    pub cmdline: String,
    /// Initial ramdisk (cpio archive, plain or compressed) described in the zero page.
    pub initrd: Option<PathBuf>,
    /// Where the serial console goes.
    pub console: Box<dyn Write + Send>,
    /// virtio devices.
    pub virtio: VirtioConfig,
    /// Enter a guest that asks for it in PVM native mode (on PVM hosts).
    /// Off: such guests are entered at CPL 0 and run in KVM's emulator.
    pub allow_pvm_native: bool,
}

/// Errors creating or driving a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// KVM is not usable.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// vCPU count out of range.
    #[error("invalid vCPU count {0}: must be 1..={MAX_VCPUS}")]
    VcpuCount(u32),
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel / boot structures.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// vCPU register setup.
    #[error(transparent)]
    Regs(#[from] boot::regs::RegsError),
    /// Device bus layout.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// virtio devices.
    #[error(transparent)]
    Virtio(#[from] crate::virtio::VirtioError),
    /// Pause/resume.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A KVM ioctl on the VM failed.
    #[error("{what} failed: {source}")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// errno.
        source: kvm_ioctls::Error,
    },
    /// Creating a host resource (thread, eventfd) failed.
    #[error("cannot create {what}: {source}")]
    Host {
        /// What.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// Saving or restoring KVM state.
    #[error(transparent)]
    State(#[from] StateError),
    /// The saved serial state is invalid.
    #[error(transparent)]
    Serial(devices::serial::SerialError),
    /// save() needs the VM paused.
    #[error("the VM must be paused to be saved")]
    NotPaused,
    /// start() called twice.
    #[error("the VM was already started")]
    AlreadyStarted,
    /// Threads of the VM did not end when it was stopped.
    #[error("threads {threads:?} did not end within {timeout:?} of the stop; left behind")]
    StuckThreads {
        /// Their names.
        threads: Vec<String>,
        /// The deadline.
        timeout: Duration,
    },
    /// Plugged virtio-mem memory is not in the memory file, so such a VM
    /// cannot be saved.
    #[error("the VM has {0} bytes of virtio-mem memory plugged or requested; it cannot be saved")]
    HotplugPlugged(u64),
    /// grow_memory on a VM without a virtio-mem device.
    #[error("the VM has no virtio-mem device to grow its memory with")]
    NoHotplugMemory,
    /// The requested memory does not fit the virtio-mem region.
    #[error("cannot grow memory: {0}")]
    Grow(#[from] devices::virtio::MemError),
    /// add_vcpus on a guest the VMM cannot start vCPUs of directly.
    #[error(
        "vCPUs can be added only to a started guest with direct vCPU start (the minivmm note)"
    )]
    NoDirectStart,
}

fn ioctl<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VmError> {
    r.map_err(|source| VmError::Ioctl { what, source })
}

/// A VM. Dropping it stops its vCPUs and unmaps its memory.
pub struct Vm {
    id: Arc<str>,
    flavour: Flavour,
    vm_fd: VmFd,
    ram: GuestRam,
    vcpu_fds: Vec<kvm_ioctls::VcpuFd>,
    vcpus: Vec<VcpuHandle>,
    control: Arc<VcpuControl>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    virtio: VirtioDevices,
    serial: Arc<Mutex<Serial<Box<dyn Write + Send>>>>,
    // Kept alive: the irqfd stays registered while its eventfd lives.
    _serial_irq: EventFd,
    kvm: Kvm,
    direct_start: Option<DirectStart>,
    // Whether the virtio-mem region is a KVM memory slot yet: it becomes one
    // at the first grow_memory, so VMs that never grow (most clones) do not
    // pay for a large slot at restore (measured: ~4 ms for 2 GiB on PVM).
    hotplug_slot: Mutex<bool>,
}

static NEXT_VM: AtomicU64 = AtomicU64::new(0);

/// A process-unique default VM id.
pub fn default_vm_id() -> String {
    format!(
        "vm-{}-{}",
        std::process::id(),
        NEXT_VM.fetch_add(1, Ordering::Relaxed)
    )
}

/// What a restored VM needs besides its saved state.
pub struct RestoreConfig {
    /// An id for logs.
    pub id: String,
    /// RAM backing: normally `PrivateFile(<template>/memory)`.
    pub memory: MemoryBackend,
    /// Where the serial console goes.
    pub console: Box<dyn Write + Send>,
    /// The restored VM's own vsock socket (needed if the saved VM had vsock).
    pub vsock: Option<PathBuf>,
    /// The restored VM's own virtiofsd sockets, one per saved virtio-fs tag.
    pub fs: Vec<crate::virtio::FsShare>,
}

/// Ends a VM from another thread (see [`Vm::stopper`]).
#[derive(Clone)]
pub struct VmStopper(Arc<VcpuControl>);

impl VmStopper {
    /// Stop every vCPU; the VM's `wait_exit` returns `Stopped`.
    pub fn stop(&self) {
        self.0.end(GuestExit::Stopped);
    }
}

/// The parts every VM has before it is booted or restored.
struct Shell {
    kvm: Kvm,
    flavour: Flavour,
    vm_fd: VmFd,
    ram: GuestRam,
    vcpu_fds: Vec<kvm_ioctls::VcpuFd>,
    control: Arc<VcpuControl>,
    pio: Bus,
    mmio: Bus,
    virtio: VirtioDevices,
    serial: Arc<Mutex<Serial<Box<dyn Write + Send>>>>,
    serial_irq: EventFd,
}

impl Shell {
    /// KVM VM, RAM, irqchip, PIT, vCPUs (unconfigured) and legacy devices, in
    /// the order that keeps creation fast.
    fn new(
        id: &str,
        vcpus: u32,
        mem_mib: u64,
        memory: MemoryBackend,
        console: Box<dyn Write + Send>,
        devices: (&VirtioConfig, Option<&VmState>),
    ) -> Result<Shell, VmError> {
        let (virtio_config, saved) = devices;
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(VmError::VcpuCount(vcpus));
        }
        let kvm = kvm::open()?;
        let flavour = Flavour::detect();
        let ram = GuestRam::new(mem_mib, memory)?;
        let vm_fd = ioctl("KVM_CREATE_VM", kvm.create_vm())?;

        // Memory slots go in before the irqchip: ~0.15 ms instead of ~7 ms
        // for 256 MiB on PVM (DESIGN.md, "Order matters").
        register_memory(&vm_fd, ram.memory())?;
        if kvm.check_extension(kvm_ioctls::Cap::SetTssAddr) && flavour != Flavour::Pvm {
            ioctl(
                "KVM_SET_TSS_ADDR",
                vm_fd.set_tss_address(layout::KVM_TSS_ADDRESS),
            )?;
        }
        ioctl("KVM_CREATE_IRQCHIP", vm_fd.create_irq_chip())?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        ioctl("KVM_CREATE_PIT2", vm_fd.create_pit2(pit))?;
        let mut vcpu_fds = Vec::with_capacity(vcpus as usize);
        for i in 0..vcpus {
            vcpu_fds.push(ioctl("KVM_CREATE_VCPU", vm_fd.create_vcpu(i.into()))?);
        }

        let control = VcpuControl::new(vcpus as usize);
        let host = |what| move |source| VmError::Host { what, source };
        let serial_irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(host("serial interrupt eventfd"))?;
        ioctl(
            "KVM_IRQFD (serial)",
            vm_fd.register_irqfd(&serial_irq, COM1_IRQ),
        )?;
        let irq = serial_irq
            .try_clone()
            .map_err(host("serial interrupt eventfd"))?;
        let serial = match saved {
            Some(s) => Serial::restore(&s.serial, irq, console).map_err(VmError::Serial)?,
            None => Serial::new(irq, console),
        };
        let serial = Arc::new(Mutex::new(serial));
        let reset_control = control.clone();
        let i8042 = I8042::new(Box::new(move || reset_control.end(GuestExit::Reset)));
        let poweroff_control = control.clone();
        let acpi_pm = AcpiPm::new(Box::new(move || poweroff_control.end(GuestExit::Shutdown)));
        let mut pio = Bus::new();
        pio.insert(COM1_PORT.into(), SERIAL_PORT_COUNT, serial.clone())?;
        pio.insert(layout::I8042_PORT.into(), 5, Arc::new(Mutex::new(i8042)))?;
        pio.insert(
            layout::ACPI_PM_PORT.into(),
            ACPI_PM_PORT_COUNT,
            Arc::new(Mutex::new(acpi_pm)),
        )?;
        let mut mmio = Bus::new();
        let virtio = VirtioDevices::attach(
            id,
            &vm_fd,
            ram.memory(),
            &mut mmio,
            virtio_config,
            saved.map(|s| &s.virtio),
        )?;
        Ok(Shell {
            kvm,
            flavour,
            vm_fd,
            ram,
            vcpu_fds,
            control,
            pio,
            mmio,
            virtio,
            serial,
            serial_irq,
        })
    }

    fn into_vm(self, id: String, direct_start: Option<DirectStart>) -> Vm {
        Vm {
            id: Arc::from(id.as_str()),
            flavour: self.flavour,
            vm_fd: self.vm_fd,
            ram: self.ram,
            vcpu_fds: self.vcpu_fds,
            vcpus: Vec::new(),
            control: self.control,
            pio: Arc::new(self.pio),
            mmio: Arc::new(self.mmio),
            virtio: self.virtio,
            serial: self.serial,
            _serial_irq: self.serial_irq,
            kvm: self.kvm,
            direct_start,
            hotplug_slot: Mutex::new(false),
        }
    }
}

impl Vm {
    /// Create the VM and load the kernel; the vCPUs do not run until `start`.
    pub fn create(config: VmConfig) -> Result<Vm, VmError> {
        Self::create_with_entry(config, EntryProtocol::Minivmm)
    }

    /// [`create`](Self::create), entering the guest by `entry`: tests use
    /// `EntryProtocol::LinuxMinimal` to check that a guest needs no more than
    /// the Linux 64-bit boot protocol promises (as under Firecracker).
    pub fn create_with_entry(config: VmConfig, entry: EntryProtocol) -> Result<Vm, VmError> {
        let shell = Shell::new(
            &config.id,
            config.vcpus,
            config.mem_mib,
            config.memory,
            config.console,
            (&config.virtio, None),
        )?;
        let mem = shell.ram.memory();
        let kernel =
            boot::load_kernel(mem, shell.ram.size(), &config.kernel, shell.flavour)?.under(entry);
        let mut cmdline = config.cmdline.clone();
        for arg in shell.virtio.cmdline() {
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(arg);
        }
        if kernel.ap_start == ApStart::Direct {
            // Our test guest waits for this many vCPUs to report in.
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(&format!("cpus={}", config.vcpus));
        }
        let initrd = match &config.initrd {
            Some(path) => Some(boot::initrd::load_initrd(
                mem,
                shell.ram.size(),
                path,
                kernel.header.as_ref(),
                kernel.end,
            )?),
            None => None,
        };
        let acpi = boot::acpi::write_tables(mem, config.vcpus, &shell.virtio.mmio_devices())?;
        let extras = boot::params::BootExtras {
            initrd: initrd.map(|i| (i.addr, i.size)),
            acpi_rsdp: Some(acpi.rsdp),
        };
        boot::write_boot_structures(mem, shell.ram.size(), &kernel, &cmdline, extras, entry)?;

        let supported = ioctl(
            "KVM_GET_SUPPORTED_CPUID",
            shell.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES),
        )?;
        for (i, fd) in shell.vcpu_fds.iter().enumerate() {
            let i = i as u32;
            boot::regs::configure_common(fd, i, config.vcpus, &supported)?;
            if i == 0 && entry == EntryProtocol::LinuxMinimal {
                boot::regs::configure_minimal_linux_entry(fd, i, kernel.entry)?;
            } else if i == 0 || kernel.ap_start == ApStart::Direct {
                boot::regs::configure_64bit_entry(
                    fd,
                    i,
                    kernel.entry,
                    kernel.pvm_native && config.allow_pvm_native,
                )?;
            }
        }
        tracing::info!(vm = %config.id, flavour = ?shell.flavour, vcpus = config.vcpus, mem_mib = config.mem_mib, kernel = %config.kernel.name(), initrd = ?initrd, "VM created");
        let direct_start = (kernel.ap_start == ApStart::Direct).then_some(DirectStart {
            entry: kernel.entry,
            pvm_native: kernel.pvm_native && config.allow_pvm_native,
        });
        Ok(shell.into_vm(config.id, direct_start))
    }

    /// Rebuild a VM from a saved state over `config.memory`; the vCPUs do not
    /// run until `start`.
    pub fn restore(config: RestoreConfig, state: &VmState) -> Result<Vm, VmError> {
        let vcpus = u32::try_from(state.vcpus.len()).unwrap_or(u32::MAX);
        let virtio = VirtioConfig {
            rng: state.virtio.rng.is_some(),
            vsock: config.vsock,
            fs: config.fs,
            mem: None,
        };
        let shell = Shell::new(
            &config.id,
            vcpus,
            state.mem_mib,
            config.memory,
            config.console,
            (&virtio, Some(state)),
        )?;
        restore_vm(&shell.vm_fd, &state.kvm)?;
        let xsave = xsave_bytes(&shell.vm_fd);
        for (i, (fd, s)) in shell.vcpu_fds.iter().zip(&state.vcpus).enumerate() {
            restore_vcpu(fd, i, s, xsave)?;
        }
        // Connections from before the snapshot are gone: tell the guest now,
        // so its agent listens again before the host connects.
        shell.virtio.vsock_transport_reset();
        tracing::info!(vm = %config.id, vcpus, mem_mib = state.mem_mib, "VM restored");
        Ok(shell.into_vm(config.id, state.direct_start))
    }

    /// Save the state of a paused (or not yet started) VM; RAM is not part
    /// of it (it lives in the memory backend).
    pub fn save(&self) -> Result<VmState, VmError> {
        // Plugged memory is not in the memory file, and a restored VM
        // registers the region only at its first grow: save neither.
        let hot = self.virtio.mem().map_or(0, |d| {
            let d = d.lock().unwrap_or_else(|p| p.into_inner());
            d.plugged_size().max(d.requested_size())
        });
        if hot > 0 {
            return Err(VmError::HotplugPlugged(hot));
        }
        let ctx = VcpuStateContext::new(&self.kvm, &self.vm_fd)?;
        let mut vcpus = Vec::new();
        if self.vcpus.is_empty() {
            for (i, fd) in self.vcpu_fds.iter().enumerate() {
                vcpus.push(save_vcpu(fd, i, &ctx)?);
            }
        } else {
            if !self.control.is_paused() {
                return Err(VmError::NotPaused);
            }
            for (i, v) in self.vcpus.iter().enumerate() {
                let fd = v.fd.lock().unwrap_or_else(|p| p.into_inner());
                vcpus.push(save_vcpu(&fd, i, &ctx)?);
            }
        }
        let serial = self.serial.lock().unwrap_or_else(|p| p.into_inner()).save();
        // Not started: the device thread may still serve host sockets, so
        // hold it for the moment its state is taken.
        let hold_devices = self.vcpus.is_empty() && !self.virtio.is_quiet();
        if hold_devices {
            self.virtio.pause(PAUSE_TIMEOUT)?;
        }
        let virtio = self.virtio.save();
        if hold_devices {
            self.virtio.resume();
        }
        Ok(VmState {
            mem_mib: self.ram.size() >> 20,
            vcpus,
            kvm: save_vm(&self.vm_fd)?,
            serial,
            virtio: virtio?,
            direct_start: self.direct_start,
        })
    }

    /// Start the vCPU threads.
    pub fn start(&mut self) -> Result<(), VmError> {
        if self.vcpu_fds.is_empty() {
            return Err(VmError::AlreadyStarted);
        }
        for (i, fd) in std::mem::take(&mut self.vcpu_fds).into_iter().enumerate() {
            self.spawn_vcpu(i as u32, fd)?;
        }
        Ok(())
    }

    /// Run vCPU `id` (configured on `fd`) on its own thread.
    fn spawn_vcpu(&mut self, id: u32, fd: kvm_ioctls::VcpuFd) -> Result<(), VmError> {
        let ctx = VcpuContext {
            id,
            vm_id: self.id.clone(),
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            control: self.control.clone(),
        };
        let handle = vcpu::spawn(fd, ctx).map_err(|source| VmError::Host {
            what: "vCPU thread",
            source,
        })?;
        self.vcpus.push(handle);
        Ok(())
    }

    /// Ask the guest to have `bytes` of virtio-mem memory plugged in total
    /// (a multiple of 2 MiB, at most the region): sets the device's
    /// `requested_size` and raises a configuration-change interrupt. The
    /// guest's driver plugs the blocks; see [`Vm::plugged_memory`].
    pub fn grow_memory(&self, bytes: u64) -> Result<(), VmError> {
        let dev = self.virtio.mem().ok_or(VmError::NoHotplugMemory)?;
        let mut registered = self.hotplug_slot.lock().unwrap_or_else(|p| p.into_inner());
        if !*registered && bytes > 0 {
            let region = dev
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .region()
                .clone();
            let r = kvm_userspace_memory_region {
                slot: self.ram.memory().num_regions() as u32,
                flags: 0,
                guest_phys_addr: region.addr(),
                memory_size: region.size(),
                userspace_addr: region.host_addr(),
            };
            // SAFETY: the region is a live anonymous mapping kept alive by
            // the virtio-mem device, which the Vm owns for as long as the VM
            // fd lives (fields drop after `vm_fd`).
            ioctl("KVM_SET_USER_MEMORY_REGION (virtio-mem)", unsafe {
                self.vm_fd.set_user_memory_region(r)
            })?;
            *registered = true;
        }
        dev.lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_requested_size(bytes)?;
        Ok(())
    }

    /// Bytes of virtio-mem memory the guest has plugged (0 without the device).
    pub fn plugged_memory(&self) -> u64 {
        self.virtio.mem().map_or(0, |d| {
            d.lock().unwrap_or_else(|p| p.into_inner()).plugged_size()
        })
    }

    /// The virtio-mem region, if the VM has one (guest-physical start, host
    /// view of its contents).
    pub fn hotplug_region(&self) -> Option<Arc<devices::virtio::MemRegion>> {
        self.virtio
            .mem()
            .map(|d| d.lock().unwrap_or_else(|p| p.into_inner()).region().clone())
    }

    /// vCPUs the VM has (started or not).
    pub fn vcpu_count(&self) -> u32 {
        (self.vcpus.len() + self.vcpu_fds.len()) as u32
    }

    /// Create and start `n` more vCPUs on a started VM, each entered at the
    /// guest's 64-bit entry as its other vCPUs were (direct-start guests
    /// only), with the next vCPU indices and APIC ids. The guest counts
    /// them in as they arrive.
    pub fn add_vcpus(&mut self, n: u32) -> Result<(), VmError> {
        let start = self.direct_start.ok_or(VmError::NoDirectStart)?;
        if self.vcpus.is_empty() {
            return Err(VmError::NoDirectStart);
        }
        // Checked before any vCPU is created: a KVM vCPU cannot be removed.
        if let Some(exit) = self.control.exit() {
            return Err(ControlError::Ended(exit).into());
        }
        if self.control.is_paused() {
            return Err(ControlError::NotRunning.into());
        }
        let old = self.vcpu_count();
        let total = old.checked_add(n).filter(|&t| t <= MAX_VCPUS);
        let total = total.ok_or(VmError::VcpuCount(old.saturating_add(n)))?;
        let supported = ioctl(
            "KVM_GET_SUPPORTED_CPUID",
            self.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES),
        )?;
        for i in old..total {
            let fd = ioctl("KVM_CREATE_VCPU", self.vm_fd.create_vcpu(i.into()))?;
            boot::regs::configure_common(&fd, i, total, &supported)?;
            boot::regs::configure_64bit_entry(&fd, i, start.entry, start.pvm_native)?;
            self.control.add_vcpu()?;
            self.spawn_vcpu(i, fd)?;
        }
        tracing::info!(vm = %self.id, added = n, vcpus = total, "vCPUs added");
        Ok(())
    }

    /// Pause the whole machine: every vCPU (out of KVM_RUN), then the device
    /// thread (parked between two events). Until `resume`, no guest code
    /// runs, no queue moves and guest memory does not change.
    pub fn pause(&self) -> Result<(), VmError> {
        self.control.pause(PAUSE_TIMEOUT)?;
        // vCPUs first: once they are parked nothing new can notify a queue.
        if let Err(e) = self.virtio.pause(PAUSE_TIMEOUT) {
            let _ = self.control.resume();
            return Err(e.into());
        }
        Ok(())
    }

    /// Wait until the VM's vsock device has no open connection (e.g. the
    /// guest agent finished quiescing for a snapshot), or `timeout` passes;
    /// returns how many are still open.
    pub fn wait_vsock_idle(&self, timeout: Duration) -> usize {
        self.virtio.wait_vsock_idle(timeout)
    }

    /// The vsock device's connection count, to wait on (None without vsock).
    pub fn vsock_connection_watch(&self) -> Option<crate::virtio::ConnectionWatch> {
        self.virtio.vsock_connection_watch()
    }

    /// Resume after `pause`: devices first, so they are running by the time
    /// a vCPU notifies one.
    pub fn resume(&self) -> Result<(), VmError> {
        self.virtio.resume();
        Ok(self.control.resume()?)
    }

    /// Stop the VM (idempotent): join its vCPU threads and stop its devices,
    /// each with a deadline ([`STOP_DEADLINE`]). Threads stuck past it are
    /// logged with the VM id and left behind.
    pub fn stop(&mut self) {
        if let Err(stuck) = self.stop_checked() {
            tracing::error!(vm = %self.id, "{stuck}");
        }
    }

    /// [`stop`](Self::stop), reporting threads that did not end in time.
    pub fn stop_checked(&mut self) -> Result<(), VmError> {
        self.control.end(GuestExit::Stopped);
        // end() has kicked every thread; forget them before any is joined,
        // so no later kick can reach a thread id that is no longer valid.
        self.control.forget_threads();
        let deadline = std::time::Instant::now() + STOP_DEADLINE;
        let mut stuck = Vec::new();
        for v in &mut self.vcpus {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if let Err(e) = v.join(left) {
                stuck.push(e.name);
            }
        }
        if !self.virtio.stop() {
            stuck.push(format!("virtio-{}", self.id));
        }
        if stuck.is_empty() {
            Ok(())
        } else {
            Err(VmError::StuckThreads {
                threads: stuck,
                timeout: STOP_DEADLINE,
            })
        }
    }

    /// A handle that ends this VM from any thread (e.g. when a device's
    /// backend died): `wait_exit` then reports `Stopped`.
    pub fn stopper(&self) -> VmStopper {
        VmStopper(self.control.clone())
    }

    /// Wait until the guest ends (None: no deadline); None if it has not.
    pub fn wait_exit(&self, timeout: Option<Duration>) -> Option<GuestExit> {
        self.control.wait_exit(timeout)
    }

    /// The VM id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The host's KVM flavour.
    pub fn flavour(&self) -> Flavour {
        self.flavour
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.ram.memory()
    }

    /// Guest RAM and its backend.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The KVM VM fd (for device wiring: irqfds, ioeventfds).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

fn register_memory(vm_fd: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by GuestRam, which the
        // Vm keeps alive (and drops after the VM fd) for as long as KVM may
        // access it.
        ioctl("KVM_SET_USER_MEMORY_REGION", unsafe {
            vm_fd.set_user_memory_region(r)
        })?;
    }
    Ok(())
}
