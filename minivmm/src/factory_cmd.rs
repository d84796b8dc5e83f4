//! `minivmm factory init|status|destroy --config C` (like `kata-runtime
//! factory …`) and `minivmm get-vm`: parse, call the factory, print.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use factory::{
    check_config, CreateOptions, DirectFactory, Factory, FactoryConfig, GuestSpec, TemplateFactory,
    VmRequest,
};
use serde_json::json;

#[derive(Subcommand)]
pub enum FactoryCommand {
    /// Build the template the config describes (when enable_template = true).
    Init {
        /// The TOML config.
        #[arg(long)]
        config: PathBuf,
    },
    /// Show whether the template is valid and matches the config, and the cache.
    Status {
        /// The TOML config.
        #[arg(long)]
        config: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove the template the config names.
    Destroy {
        /// The TOML config.
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Args)]
pub struct GetVmArgs {
    /// The TOML config (its template and default guest).
    #[arg(long)]
    config: PathBuf,
    /// vCPUs (default: the config's default_vcpus).
    #[arg(long)]
    vcpus: Option<u32>,
    /// Guest RAM in MiB (default: the config's default_memory).
    #[arg(long)]
    mem_mib: Option<u64>,
    /// Kernel command line (default: the config's kernel_params).
    #[arg(long)]
    cmdline: Option<String>,
    /// Make a request that differs from the template an error instead of a direct boot.
    #[arg(long)]
    no_fallback: bool,
    /// The VM's vsock socket (default: a temporary path).
    #[arg(long)]
    vsock: Option<PathBuf>,
    /// Keep the VM running until interrupted (otherwise stop it when ready).
    #[arg(long)]
    keep: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// The config's default guest.
fn guest_spec(c: &FactoryConfig) -> GuestSpec {
    GuestSpec {
        vcpus: c.hypervisor.default_vcpus,
        mem_mib: c.hypervisor.default_memory,
        kernel: crate::kernel_image(c.hypervisor.kernel.clone()),
        cmdline: c.hypervisor.kernel_params.clone(),
        initrd: c.hypervisor.initrd.clone(),
    }
}

pub fn factory(cmd: FactoryCommand) -> Result<ExitCode> {
    match cmd {
        FactoryCommand::Init { config } => init(&config),
        FactoryCommand::Status { config, json } => status(&config, json),
        FactoryCommand::Destroy { config } => {
            let c = FactoryConfig::load(&config)?;
            snapshot::template::remove(&c.factory.template_path)?;
            println!("template {} removed", c.factory.template_path.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn init(config: &Path) -> Result<ExitCode> {
    let c = FactoryConfig::load(config)?;
    if !c.factory.enable_template {
        bail!(
            "{}: enable_template is false: the factory has no template to build",
            config.display()
        );
    }
    let dir = &c.factory.template_path;
    // Checked before booting anything, with the config key to change.
    if let Some(existing) = dir.ancestors().find(|a| a.exists()) {
        if factory::tmpfs::fs_type(existing)? != factory::tmpfs::TMPFS_MAGIC {
            bail!(
                "{}: template_path {} is not on tmpfs (clones would page guest RAM from disk): put it under /dev/shm or a tmpfs mount",
                config.display(),
                dir.display()
            );
        }
    }
    let request = VmRequest::new(guest_spec(&c))?;
    if let Ok(t) = snapshot::template::validate(dir, vmm::state::STATE_SCHEMA, None) {
        if check_config(&t.manifest().config, request.config()).is_ok_and(|g| g.is_none()) {
            println!("template {} already initialized", dir.display());
            return Ok(ExitCode::SUCCESS);
        }
    }
    let progress = |m: &str| eprintln!("minivmm: {m}");
    factory::create_template(
        dir,
        request.spec(),
        &CreateOptions {
            overwrite: true,
            progress: &progress,
            ..CreateOptions::default()
        },
    )?;
    println!("template {} initialized", dir.display());
    Ok(ExitCode::SUCCESS)
}

fn status(config: &Path, as_json: bool) -> Result<ExitCode> {
    let c = FactoryConfig::load(config)?;
    let dir = &c.factory.template_path;
    let request = VmRequest::new(guest_spec(&c))?;
    let (valid, error, manifest_config, mismatch) =
        match snapshot::template::validate(dir, vmm::state::STATE_SCHEMA, None) {
            Ok(t) => {
                let m = t.manifest().config.clone();
                let mismatch = match check_config(&m, request.config()) {
                    Ok(g) if g.is_none() => None,
                    Ok(g) => Some(format!(
                        "the config asks for more than the template: vCPUs {:?}, memory {:?} MiB",
                        g.vcpus, g.mem_mib
                    )),
                    Err(e) => Some(e.to_string()),
                };
                (true, None, Some(m), mismatch)
            }
            Err(e) => (false, Some(e.to_string()), None, None),
        };
    // A cache lives in the process that holds it; this build has no cache
    // server, so the fill is unknown unless something serves the endpoint.
    let endpoint = &c.factory.vm_cache_endpoint;
    let server_running =
        c.factory.vm_cache_number > 0 && std::os::unix::net::UnixStream::connect(endpoint).is_ok();
    let report = json!({
        "config": config,
        "template": {
            "enabled": c.factory.enable_template,
            "path": dir,
            "valid": valid,
            "error": error,
            "matches_config": valid && mismatch.is_none(),
            "mismatch": mismatch,
            "vcpus": manifest_config.as_ref().map(|m| m.vcpus),
            "mem_mib": manifest_config.as_ref().map(|m| m.mem_mib),
            "kernel": manifest_config.as_ref().map(|m| m.kernel.path.clone()),
            "cmdline": manifest_config.as_ref().map(|m| m.cmdline.clone()),
        },
        "cache": {
            "vm_cache_number": c.factory.vm_cache_number,
            "endpoint": endpoint,
            "server_running": server_running,
            "ready": serde_json::Value::Null,
        },
    });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "template  {} ({})",
        dir.display(),
        if c.factory.enable_template {
            "enabled"
        } else {
            "disabled"
        }
    );
    match (&error, &manifest_config, &mismatch) {
        (Some(e), _, _) => println!("  invalid: {e}"),
        (None, Some(m), None) => println!(
            "  valid: {} vCPU(s), {} MiB, kernel {}, matches the config",
            m.vcpus, m.mem_mib, m.kernel.path
        ),
        (None, _, Some(why)) => println!("  valid, but does not match the config: {why}"),
        (None, None, None) => {}
    }
    println!(
        "cache     {} VM(s) configured at {}: {}",
        c.factory.vm_cache_number,
        endpoint.display(),
        if server_running {
            "server running"
        } else {
            "no server running (fill unknown)"
        }
    );
    Ok(ExitCode::SUCCESS)
}

pub fn get_vm(a: GetVmArgs) -> Result<ExitCode> {
    let c = FactoryConfig::load(&a.config)?;
    let mut spec = guest_spec(&c);
    spec.vcpus = a.vcpus.unwrap_or(spec.vcpus);
    spec.mem_mib = a.mem_mib.unwrap_or(spec.mem_mib);
    if let Some(cmdline) = a.cmdline {
        spec.cmdline = cmdline;
    }
    let mut request = VmRequest::new(spec)?;
    request.vsock = a.vsock;
    let f: Box<dyn Factory> = if c.factory.enable_template {
        Box::new(TemplateFactory::open(
            &c.factory.template_path,
            DirectFactory::default(),
            a.no_fallback,
        ))
    } else {
        Box::new(DirectFactory::default())
    };
    let vm = f.get_vm(&request)?;
    let fallback = vm.fallback.as_ref().map(|r| r.to_string());
    let field = match &vm.fallback {
        Some(factory::FallbackReason::Mismatch(m)) => Some(m.field),
        Some(factory::FallbackReason::Template(_)) => Some("template"),
        None => None,
    };
    if a.json {
        let steps: serde_json::Map<String, serde_json::Value> = vm
            .steps
            .iter()
            .map(|s| (s.name.to_string(), json!(s.took.as_secs_f64() * 1e6)))
            .collect();
        println!(
            "{}",
            json!({
                "source": vm.source.name(),
                "vsock": vm.vsock(),
                "fallback_field": field,
                "fallback": fallback,
                "total_us": vm.total.as_secs_f64() * 1e6,
                "steps_us": steps,
            })
        );
    } else {
        let steps: Vec<String> = vm
            .steps
            .iter()
            .map(|s| format!("{} {:.0}", s.name, s.took.as_secs_f64() * 1e6))
            .collect();
        println!(
            "vm ready at {} from {} in {:.0} us ({})",
            vm.vsock().display(),
            vm.source.name(),
            vm.total.as_secs_f64() * 1e6,
            steps.join(", ")
        );
        if let (Some(field), Some(why)) = (field, &fallback) {
            println!("fell back to a direct boot: {field}: {why}");
        }
    }
    if a.keep {
        eprintln!("minivmm: VM running; interrupt to stop");
        vm.vm().wait_exit(None);
    }
    drop(vm);
    f.close();
    Ok(ExitCode::SUCCESS)
}
