//! `minivmm`: boot, inspect and benchmark KVM VMs. This file parses the
//! command line and calls the library crates; it has no VM logic of its own.

mod agent_cmd;
mod bench;
mod bench_fs;
mod factory_cmd;
mod share;
mod template_cmd;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
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
    /// Kernel command line. The test guest understands action=reset|count|
    /// touch:PAGES:BYTE|ticks:N|cpus.
    #[arg(long, default_value = "")]
    cmdline: String,
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
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("minivmm: {e:#}");
            ExitCode::FAILURE
        }
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
    }
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

fn run(args: RunArgs) -> Result<ExitCode> {
    let memory = match (args.memory_file, args.shared, args.private) {
        (None, _, _) => MemoryBackend::Anonymous,
        (Some(p), true, false) => MemoryBackend::SharedFile(p),
        (Some(p), false, true) => MemoryBackend::PrivateFile(p),
        (Some(_), _, _) => bail!("--memory-file needs exactly one of --shared or --private"),
    };
    let console: Box<dyn Write + Send> = if args.console == "stdout" {
        Box::new(std::io::stdout())
    } else {
        Box::new(
            std::fs::File::create(&args.console)
                .with_context(|| format!("cannot create console file {}", args.console))?,
        )
    };
    let id = vmm::vm::default_vm_id();
    let daemons = share::start_daemons(&id, &args.share)?;
    let mut vm = Vm::create(VmConfig {
        id,
        vcpus: args.vcpus,
        mem_mib: args.mem_mib,
        memory,
        kernel: kernel_image(args.kernel),
        cmdline: args.cmdline,
        console,
        virtio: vmm::VirtioConfig {
            rng: args.rng || args.vsock.is_some(),
            vsock: args.vsock,
            fs: daemons.fs_config(),
            mem: None,
        },
        allow_pvm_native: !args.no_pvm_native,
    })?;
    vm.start()?;
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
    let exit = vm.wait_exit(None).unwrap_or(GuestExit::Stopped);
    // Each virtiofsd ends by itself once the VM disconnects: expected now.
    for (_, d) in &daemons {
        d.expect_exit();
    }
    vm.stop();
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
