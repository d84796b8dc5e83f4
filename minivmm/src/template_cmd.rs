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
    /// Remove a template (manifest first, so a half-removed one is never valid).
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
    /// Kernel command line.
    #[arg(long, default_value = "")]
    cmdline: String,
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
            let spec = GuestSpec {
                kernel: crate::kernel_image(a.kernel),
                cmdline: a.cmdline,
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
                    progress: &progress,
                    ..CreateOptions::default()
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
            let t = if full {
                snapshot::template::validate_full(&dir, None)?
            } else {
                snapshot::template::validate(&dir, None)?
            };
            if json {
                println!("{}", serde_json::to_string_pretty(t.manifest())?);
            } else {
                let m = t.manifest();
                println!(
                    "template {} is valid: {} vCPU(s), {} MiB, kernel {}, state {} bytes{}",
                    dir.display(),
                    m.config.vcpus,
                    m.config.mem_mib,
                    m.config.kernel.path,
                    m.state.size_bytes,
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

pub fn clone(a: CloneArgs) -> Result<ExitCode> {
    if a.count == 0 {
        bail!("--count must be at least 1");
    }
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
    for i in 0..a.count {
        let vsock = a
            .vsock_dir
            .as_ref()
            .map(|d| d.join(format!("clone-{i}.vsock")));
        let mut c = handle.clone_vm(CloneOptions {
            id: Some(format!("clone-{i}")),
            vsock,
            ..CloneOptions::default()
        })?;
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
    if a.keep {
        eprintln!(
            "minivmm: {} clone(s) running; interrupt to stop",
            clones.len()
        );
        for c in &clones {
            c.vm.wait_exit(None);
        }
    }
    Ok(ExitCode::SUCCESS)
}
