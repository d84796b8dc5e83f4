//! `minivmm template create|check|rm` and `minivmm clone`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use factory::{create_template, CloneOptions, CreateOptions, GuestSpec, TemplateHandle};

#[derive(Subcommand)]
pub enum TemplateCommand {
    /// Boot a guest, wait for its agent, quiesce, pause and save it as a
    /// template in DIR (on tmpfs: clones share its memory file's page cache).
    Create(CreateArgs),
    /// Validate a template: files, sizes, checksums, format versions.
    Check {
        /// Template directory.
        #[arg(long)]
        dir: PathBuf,
        /// Also verify the memory file's SHA-256 (if recorded at creation).
        #[arg(long)]
        full: bool,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a template (manifest first, so a half-removed one is never
    /// valid; the memory file's immutable flag is cleared first).
    Rm {
        /// Template directory.
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    /// Template directory (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    mem_mib: u64,
    /// Kernel (default: the built-in test guest).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk for a Linux kernel (its hash goes into the manifest;
    /// clones do not need the file).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (default: as for `minivmm run`).
    #[arg(long)]
    cmdline: Option<String>,
    /// Seconds the cold boot may take until the guest's agent answers Check.
    #[arg(long, default_value_t = factory::BOOT_DEADLINE.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    boot_timeout: u64,
    /// Accept a directory that is not on tmpfs.
    #[arg(long)]
    allow_non_tmpfs: bool,
    /// Mount a tmpfs on the directory first (needs root).
    #[arg(long)]
    mount_tmpfs: bool,
    /// Replace an existing template in the directory.
    #[arg(long)]
    force: bool,
    /// Record the memory file's SHA-256 (for `template check --full`).
    #[arg(long)]
    memory_checksum: bool,
    /// Print the manifest as JSON when done.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct CloneArgs {
    /// Template directory.
    #[arg(long)]
    template: PathBuf,
    /// Number of clones to start, one after the other.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Directory for the clones' vsock sockets (clone-N.vsock); default: a temporary path.
    #[arg(long)]
    vsock_dir: Option<PathBuf>,
    /// vCPUs each clone gets: more than the template's are hot-added
    /// after the clone; fewer is an error.
    #[arg(long)]
    vcpus: Option<u32>,
    /// Guest memory in MiB each clone gets: more than the template's is
    /// plugged through virtio-mem after the clone; less is an error.
    #[arg(long)]
    mem_mib: Option<u64>,
    /// Keep the clones running until interrupted (otherwise stop them when ready).
    #[arg(long)]
    keep: bool,
    /// Print one JSON line per clone.
    #[arg(long)]
    json: bool,
}

pub fn template(cmd: TemplateCommand) -> Result<ExitCode> {
    match cmd {
        TemplateCommand::Create(a) => {
            let kernel = crate::kernel_image(a.kernel);
            let spec = GuestSpec {
                cmdline: crate::cmdline_for(&kernel, a.cmdline)?,
                kernel,
                initrd: a.initrd,
                ..GuestSpec::testguest(a.vcpus, a.mem_mib)
            };
            let progress = |m: &str| eprintln!("minivmm: {m}");
            let manifest = create_template(
                &a.dir,
                &spec,
                &CreateOptions {
                    allow_non_tmpfs: a.allow_non_tmpfs,
                    mount_tmpfs: a.mount_tmpfs,
                    overwrite: a.force,
                    record_memory_sha256: a.memory_checksum,
                    boot_deadline: std::time::Duration::from_secs(a.boot_timeout),
                    progress: &progress,
                    fs: Vec::new(),
                },
            )?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&manifest)?);
            } else {
                println!("template {} ready", a.dir.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        TemplateCommand::Check { dir, full, json } => {
            // Validates the files, decodes the state and checks it against the manifest.
            let handle = TemplateHandle::check(&dir, full)?;
            let t = handle.template();
            if json {
                println!("{}", serde_json::to_string_pretty(t.manifest())?);
            } else {
                let m = t.manifest();
                println!(
                    "template {} is valid: {} vCPU(s), {} MiB, devices {}, kernel {}, state {} bytes, memory {}{}",
                    dir.display(),
                    handle.state().vcpus.len(),
                    handle.state().mem_mib,
                    m.config.devices.join(","),
                    m.config.kernel.path,
                    m.state.size_bytes,
                    match (t.memory_sealed(), m.memory.immutable) {
                        (true, _) => "immutable",
                        (false, true) => "NOT immutable (sealed at commit, since copied or unsealed)",
                        (false, false) => "read-only (the filesystem took no immutable flag)",
                    },
                    match (full, &m.memory_sha256) {
                        (true, Some(_)) => ", memory checksum verified",
                        (true, None) => ", memory checksum not recorded",
                        _ => "",
                    }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        TemplateCommand::Rm { dir } => {
            snapshot::template::remove(&dir)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Open files a process needs besides its clones (std streams, KVM, the
/// template, logs, and a margin for the agent calls in flight).
const FD_RESERVE: u64 = 64;
/// How often `clone --keep` looks at its clones while waiting for a signal.
const KEEP_CHECK_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// Number of open file descriptors of this process.
fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

pub fn clone(a: CloneArgs) -> Result<ExitCode> {
    if a.count == 0 {
        bail!("--count must be at least 1");
    }
    // Before any clone thread exists, so that every thread inherits the mask.
    let stop_signals = a.keep.then(crate::signals::block_stop_signals);
    let handle = TemplateHandle::open(&a.template, None)?;
    let base = &handle.template().manifest().config;
    let (vcpus, mem_mib) = (
        a.vcpus.unwrap_or(base.vcpus),
        a.mem_mib.unwrap_or(base.mem_mib),
    );
    if vcpus < base.vcpus || mem_mib < base.mem_mib {
        bail!(
            "the template has {} vCPUs and {} MiB; a clone can grow but not shrink (asked for {vcpus} vCPUs, {mem_mib} MiB)",
            base.vcpus,
            base.mem_mib
        );
    }
    let grow = vcpus > base.vcpus || mem_mib > base.mem_mib;
    let mut clones = Vec::new();
    let mut failed = 0usize;
    for i in 0..a.count {
        let vsock = a
            .vsock_dir
            .as_ref()
            .map(|d| d.join(format!("clone-{i}.vsock")));
        let fds_before = open_fds();
        let mut c = match handle.clone_vm(CloneOptions {
            id: Some(format!("clone-{i}")),
            vsock,
            ..CloneOptions::default()
        }) {
            Ok(c) => c,
            // With --keep the clones already running stay up: report this one.
            Err(e) if a.keep && !clones.is_empty() => {
                eprintln!("minivmm: clone {i} failed: {e}");
                failed += 1;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if a.keep && i == 0 && a.count > 1 {
            // Refuse up front what cannot fit in the open-file limit, rather
            // than fail half-way: the first clone shows what one costs.
            let per_clone = open_fds().saturating_sub(fds_before).max(1);
            let limit = crate::fd_limit();
            let room = limit.saturating_sub(fds_before + FD_RESERVE) / per_clone;
            if (a.count as u64) > room {
                drop(c);
                bail!(
                    "{} clones do not fit in the open-file limit: each takes {per_clone} files and the limit is {limit}, room for {room}; raise the hard limit (ulimit -Hn) or use --count {room}",
                    a.count
                );
            }
        }
        let g = if grow {
            c.grow(vcpus, mem_mib)?
        } else {
            factory::GrowTimings::default()
        };
        let t = c.timings;
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "clone": i, "vsock": c.vsock,
                    "restore_us": t.restore.as_secs_f64() * 1e6,
                    "resume_us": t.resume.as_secs_f64() * 1e6,
                    "ready_us": t.ready.as_secs_f64() * 1e6,
                    "total_us": (t.restore + t.resume + t.ready).as_secs_f64() * 1e6,
                    "vcpus": vcpus, "mem_mib": mem_mib,
                    "grow_vcpus_us": g.vcpus.as_secs_f64() * 1e6,
                    "grow_memory_us": g.memory.as_secs_f64() * 1e6,
                    "grow_online_us": g.online.as_secs_f64() * 1e6,
                })
            );
        } else {
            println!(
                "clone {i} ready at {} in {:.0} us (restore {:.0}, resume {:.0}, agent {:.0})",
                c.vsock.display(),
                (t.restore + t.resume + t.ready).as_secs_f64() * 1e6,
                t.restore.as_secs_f64() * 1e6,
                t.resume.as_secs_f64() * 1e6,
                t.ready.as_secs_f64() * 1e6
            );
            if grow {
                println!(
                    "clone {i} grown to {vcpus} vCPUs, {mem_mib} MiB in {:.0} us (vCPUs {:.0}, memory {:.0}, online {:.0})",
                    (g.vcpus + g.memory + g.online).as_secs_f64() * 1e6,
                    g.vcpus.as_secs_f64() * 1e6,
                    g.memory.as_secs_f64() * 1e6,
                    g.online.as_secs_f64() * 1e6
                );
            }
        }
        if a.keep {
            clones.push(c);
        }
    }
    if let Some(set) = stop_signals {
        eprintln!(
            "minivmm: {} clone(s) running; interrupt to stop",
            clones.len()
        );
        loop {
            if let Some(sig) = crate::signals::wait_for_signal(&set, KEEP_CHECK_PERIOD) {
                eprintln!("minivmm: signal {sig}: stopping {} clone(s)", clones.len());
                break;
            }
            if clones
                .iter()
                .all(|c| c.vm.wait_exit(Some(std::time::Duration::ZERO)).is_some())
            {
                break;
            }
        }
        // Dropping the clones stops them and removes their sockets.
        drop(clones);
    }
    if failed > 0 {
        bail!("{failed} of {} clone(s) failed", a.count);
    }
    Ok(ExitCode::SUCCESS)
}
