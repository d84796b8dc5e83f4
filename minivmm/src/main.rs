//! `minivmm`: boot, inspect and benchmark KVM VMs. This file parses the
//! command line and calls the library crates; it has no VM logic of its own.

mod agent_cmd;
mod bench;
mod bench_fs;
mod factory_cmd;
mod image_cmd;
mod share;
mod signals;
mod template_cmd;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use vmm::{GuestExit, KernelImage, MemoryBackend, Vm, VmConfig};

/// Exit status when the guest triple-faulted.
const EXIT_TRIPLE_FAULT: u8 = 3;
/// Exit status when KVM could not run the guest.
const EXIT_CRASHED: u8 = 4;

#[derive(Parser)]
#[command(
    name = "minivmm",
    version,
    about = "A small KVM VMM that boots VMs and clones them copy-on-write"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// seccomp filters on every thread ("off" only for debugging: a
    /// forbidden syscall ends minivmm with a line naming it).
    #[arg(long, global = true, value_enum, default_value_t = SeccompMode::On)]
    seccomp: SeccompMode,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SeccompMode {
    On,
    Off,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM and stream its serial console until the guest ends.
    ///
    /// Without --kernel the built-in test guest boots. Exit status: 0 when the
    /// guest reset or powered off, 3 on a triple fault, 4 when KVM could not
    /// run it, 1 on a setup error, 2 on bad usage.
    Run(RunArgs),
    /// Show the host's KVM: flavour (PVM, VMX, SVM), API version, capabilities.
    Info {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The built-in test guest.
    #[command(subcommand)]
    Guest(GuestCommand),
    /// Build, check and remove VM templates.
    #[command(subcommand)]
    Template(template_cmd::TemplateCommand),
    /// Start ready VMs from a template (copy-on-write memory).
    Clone(template_cmd::CloneArgs),
    /// Build, inspect and remove the factory's template from a TOML config
    /// (Kata's factory keys).
    #[command(subcommand)]
    Factory(factory_cmd::FactoryCommand),
    /// Get one ready VM from the factory a config describes: a clone of its
    /// template when the request matches, else a direct boot (says why).
    GetVm(factory_cmd::GetVmArgs),
    /// Call the guest agent of a running VM over its vsock socket.
    Agent(agent_cmd::AgentArgs),
    /// Benchmarks (numbers, never pass/fail).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Build guest images (`image linux`: Debian kernel + initramfs with the
    /// Linux agent).
    #[command(subcommand)]
    Image(image_cmd::ImageCommand),
}

#[derive(Subcommand)]
enum GuestCommand {
    /// Write the built-in test guest ELF to PATH (for other tools).
    Export {
        /// Destination file.
        path: PathBuf,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Kernel to boot (ELF or bzImage); default: the built-in test guest.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (cpio archive, plain or compressed) for a Linux kernel.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line. The test guest understands action=reset|count|
    /// touch:PAGES:BYTE|ticks:N|cpus. Default: none for the test guest,
    /// "console=ttyS0 panic=-1 pci=off reboot=k" for a bzImage.
    #[arg(long)]
    cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    mem_mib: u64,
    /// Back guest RAM with this file instead of anonymous memory
    /// (needs --shared or --private).
    #[arg(long)]
    memory_file: Option<PathBuf>,
    /// Map --memory-file MAP_SHARED: guest writes land in the file (created and sized if needed).
    #[arg(long, conflicts_with = "private", requires = "memory_file")]
    shared: bool,
    /// Map --memory-file MAP_PRIVATE copy-on-write: the file is never written.
    #[arg(long, requires = "memory_file")]
    private: bool,
    /// Where the serial console goes: "stdout" or a file path.
    #[arg(long, default_value = "stdout")]
    console: String,
    /// Give the VM a virtio-vsock device, hybrid over this unix socket
    /// (host connects with "CONNECT <port>"; guest connections to host port P
    /// go to PATH_P). Also adds virtio-rng.
    #[arg(long)]
    vsock: Option<PathBuf>,
    /// Add a virtio-rng device even without --vsock.
    #[arg(long)]
    rng: bool,
    /// On PVM, enter the guest at CPL 0 (run by KVM's emulator) even if it
    /// asks for native mode.
    #[arg(long)]
    no_pvm_native: bool,
    /// Share a host directory with the guest over virtio-fs, served by its
    /// own virtiofsd (tag default "share"; repeatable with distinct tags).
    #[arg(long, value_name = "DIR[,tag=T]", value_parser = share::parse_share)]
    share: Vec<share::ShareArg>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MINIVMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let fd_limit = raise_fd_limit();
    match (cli.seccomp, confinement(&cli.command)) {
        (SeccompMode::On, Confinement::AtStart) => {
            // Before any other thread exists, so that every thread inherits it.
            if let Err(e) = vmm::seccomp::install(vmm::seccomp::ThreadKind::Main) {
                eprintln!("minivmm: {e}");
                return ExitCode::FAILURE;
            }
            vmm::seccomp::set_enabled(true);
        }
        (SeccompMode::On, Confinement::AfterDaemons) => {
            SECCOMP_AFTER_DAEMONS.store(true, Ordering::Relaxed)
        }
        (SeccompMode::On, Confinement::None) => {
            tracing::debug!("this command runs other programs: no seccomp filter");
        }
        (SeccompMode::Off, _) => {}
    }
    if let Err(e) = fd_limit {
        tracing::warn!("cannot raise the open-file limit: {e}");
    }
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("minivmm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// When a command confines itself with seccomp.
enum Confinement {
    /// Before any thread starts: every thread inherits the main filter.
    AtStart,
    /// After its virtiofsd daemons are spawned (a filter inherited by them
    /// would kill them), on every thread at once.
    AfterDaemons,
    /// Never: the command runs other programs throughout (apt-get and
    /// dpkg-deb for `image`, a virtiofsd per clone for `bench fs`).
    None,
}

/// Set when `run` must install the main filter once its daemons run.
static SECCOMP_AFTER_DAEMONS: AtomicBool = AtomicBool::new(false);

fn confinement(command: &Command) -> Confinement {
    match command {
        Command::Image(_) | Command::Bench(bench::BenchCommand::Fs { .. }) => Confinement::None,
        Command::Run(args) if !args.share.is_empty() => Confinement::AfterDaemons,
        _ => Confinement::AtStart,
    }
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run(args),
        Command::Info { json } => info(json),
        Command::Guest(GuestCommand::Export { path }) => {
            std::fs::write(&path, testguest_image::TESTGUEST_ELF)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Template(cmd) => template_cmd::template(cmd),
        Command::Clone(args) => template_cmd::clone(args),
        Command::Factory(cmd) => factory_cmd::factory(cmd),
        Command::GetVm(args) => factory_cmd::get_vm(args),
        Command::Agent(args) => agent_cmd::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Image(cmd) => image_cmd::run(cmd),
    }
}

/// Raise the soft RLIMIT_NOFILE to the hard limit (every clone holds ~20
/// fds; the common soft limit of 1024 would cap a process at ~50 clones).
fn raise_fd_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// The current soft limit on open files.
pub fn fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return u64::MAX;
    }
    lim.rlim_cur
}

/// The kernel to boot: a file, or the embedded test guest.
pub fn kernel_image(path: Option<PathBuf>) -> KernelImage {
    match path {
        Some(p) => KernelImage::Path(p),
        None => KernelImage::Bytes {
            name: testguest_image::TESTGUEST_NAME.into(),
            data: Arc::from(testguest_image::TESTGUEST_ELF),
        },
    }
}

/// The user's command line, or the default for `kernel`'s kind.
pub fn cmdline_for(kernel: &KernelImage, cmdline: Option<String>) -> Result<String> {
    Ok(match cmdline {
        Some(c) => c,
        None => vmm::boot::default_cmdline(kernel)?.to_string(),
    })
}

/// A console file created for this run; removed again if the VM never started.
struct ConsoleFile {
    path: PathBuf,
    created: bool,
}

impl ConsoleFile {
    fn create(path: &str) -> Result<(ConsoleFile, std::fs::File)> {
        let path = PathBuf::from(path);
        let existed = path.exists();
        let file = std::fs::File::create(&path)
            .with_context(|| format!("cannot create console file {}", path.display()))?;
        Ok((
            ConsoleFile {
                path,
                created: !existed,
            },
            file,
        ))
    }

    fn discard(self) {
        if self.created {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn run(args: RunArgs) -> Result<ExitCode> {
    // Blocked before any VM thread starts, so they all inherit the mask and a
    // signal ends the VM through `stop` (its vsock socket removed).
    let stop_signals = signals::block_stop_signals();
    let memory = match (args.memory_file, args.shared, args.private) {
        (None, _, _) => MemoryBackend::Anonymous,
        (Some(p), true, false) => {
            // Guest writes would land in the file: never in a template's memory.
            snapshot::template::refuse_template_memory(&p)?;
            MemoryBackend::SharedFile(p)
        }
        (Some(p), false, true) => MemoryBackend::PrivateFile(p),
        (Some(_), _, _) => bail!("--memory-file needs exactly one of --shared or --private"),
    };
    let kernel = kernel_image(args.kernel);
    let cmdline = cmdline_for(&kernel, args.cmdline)?;
    let (sink, console_file): (Box<dyn Write + Send>, _) = if args.console == "stdout" {
        (Box::new(std::io::stdout()), None)
    } else {
        let (f, file) = ConsoleFile::create(&args.console)?;
        (Box::new(file), Some(f))
    };
    let id = vmm::vm::default_vm_id();
    let daemons = match share::start_daemons(&id, &args.share) {
        Ok(d) => d,
        Err(e) => {
            if let Some(f) = console_file {
                f.discard();
            }
            return Err(e);
        }
    };
    if SECCOMP_AFTER_DAEMONS.load(Ordering::Relaxed) {
        if let Err(e) = vmm::seccomp::install_all_threads(vmm::seccomp::ThreadKind::Main) {
            if let Some(f) = console_file {
                f.discard();
            }
            return Err(e.into());
        }
        vmm::seccomp::set_enabled(true);
    }
    // A slow or stalled console must never block a vCPU.
    let console =
        match vmm::console::OffThreadWriter::new(&id, sink, vmm::console::OFF_THREAD_BUFFER) {
            Ok(w) => Box::new(w),
            Err(e) => {
                if let Some(f) = console_file {
                    f.discard();
                }
                return Err(
                    anyhow::Error::from(e).context("cannot start the console output thread")
                );
            }
        };
    let created = Vm::create(VmConfig {
        id,
        vcpus: args.vcpus,
        mem_mib: args.mem_mib,
        memory,
        kernel,
        cmdline,
        initrd: args.initrd,
        console,
        virtio: vmm::VirtioConfig {
            rng: args.rng || args.vsock.is_some(),
            vsock: args.vsock,
            fs: daemons.fs_config(),
            mem: None,
        },
        allow_pvm_native: !args.no_pvm_native,
    })
    .and_then(|mut vm| vm.start().map(|()| vm));
    let mut vm = match created {
        Ok(vm) => vm,
        Err(e) => {
            // Nothing left behind: the VM's socket went with it, the console file goes too.
            if let Some(f) = console_file {
                f.discard();
            }
            return Err(e.into());
        }
    };
    // A share's daemon dying ends the VM: its guest would only see errors.
    let stopper = vm.stopper();
    let share::Daemons { daemons, exits } = daemons;
    let watcher = std::thread::spawn(move || {
        let failure = exits.recv().ok();
        if failure.is_some() {
            stopper.stop();
        }
        failure
    });
    let exit = signals::wait_exit_or_signal(&vm, &stop_signals);
    // Each virtiofsd ends by itself once the VM disconnects: expected now.
    for (_, d) in &daemons {
        d.expect_exit();
    }
    vm.stop();
    // Dropping the VM drains the console thread (bounded) before we report.
    drop(vm);
    // Stopping the daemons closes the channel, which ends the watcher.
    drop(daemons);
    let daemon_failure = watcher.join().ok().flatten();
    let _ = std::io::stdout().flush();
    if let Some(msg) = daemon_failure {
        bail!("{msg}; VM stopped");
    }
    eprintln!("minivmm: {exit}");
    Ok(match exit {
        GuestExit::Reset | GuestExit::Shutdown | GuestExit::Stopped => ExitCode::SUCCESS,
        GuestExit::TripleFault { .. } => ExitCode::from(EXIT_TRIPLE_FAULT),
        GuestExit::Crashed { .. } => ExitCode::from(EXIT_CRASHED),
    })
}

fn info(json: bool) -> Result<ExitCode> {
    let kvm = kvm_ioctls::Kvm::new().map_err(vmm::kvm::KvmError::Open)?;
    let info = vmm::kvm::info(&kvm);
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("flavour      {:?}", info.flavour);
        println!("api version  {}", info.api_version);
        println!(
            "vcpus        {} recommended, {} max",
            info.recommended_vcpus, info.max_vcpus
        );
        for (name, present) in &info.capabilities {
            println!("{:<28} {}", name, if *present { "yes" } else { "no" });
        }
    }
    vmm::kvm::check(&kvm)?;
    Ok(ExitCode::SUCCESS)
}
