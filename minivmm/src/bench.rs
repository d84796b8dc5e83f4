//! `minivmm bench ...`: measurements printed as a table and JSON. Numbers are
//! reported, never asserted.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Subcommand;
use serde::Serialize;
use vmm::console::ConsoleLines;
use vmm::{MemoryBackend, Vm, VmConfig};

/// How long one boot may take before the benchmark gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Cold boot of the built-in test guest: VM creation to the ready line.
    Boot {
        /// Number of boots (the median is reported).
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// vCPUs per VM.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 256)]
        mem_mib: u64,
        /// Print JSON only.
        #[arg(long)]
        json: bool,
    },
}

/// Summary statistics of a set of durations, in microseconds.
#[derive(Serialize)]
pub struct Stats {
    /// Number of samples.
    pub n: usize,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Fastest.
    pub min_us: f64,
    /// Slowest.
    pub max_us: f64,
}

impl Stats {
    /// Statistics of `samples` (must not be empty).
    pub fn of(samples: &[Duration]) -> Stats {
        let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        us.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| us[((us.len() - 1) as f64 * p).round() as usize];
        Stats {
            n: us.len(),
            p50_us: pct(0.5),
            p90_us: pct(0.9),
            p99_us: pct(0.99),
            min_us: us[0],
            max_us: us[us.len() - 1],
        }
    }
}

#[derive(Serialize)]
struct BootReport {
    benchmark: &'static str,
    flavour: vmm::Flavour,
    vcpus: u32,
    mem_mib: u64,
    /// VM creation (KVM VM, memory, irqchip, vCPUs, kernel load) only.
    create: Stats,
    /// From the start of creation to the guest's ready line.
    boot_to_ready: Stats,
    boot_to_ready_p50_us: f64,
}

/// Boot the test guest once; returns (create time, create-to-ready time).
pub fn boot_once(vcpus: u32, mem_mib: u64) -> Result<(Duration, Duration)> {
    let lines = ConsoleLines::new();
    let t0 = Instant::now();
    let mut vm = Vm::create(VmConfig {
        id: vmm::vm::default_vm_id(),
        vcpus,
        mem_mib,
        memory: MemoryBackend::Anonymous,
        kernel: crate::kernel_image(None),
        cmdline: String::new(),
        console: Box::new(lines.tap(Box::new(std::io::sink()))),
    })?;
    let created = t0.elapsed();
    vm.start()?;
    if lines
        .wait_for(testguest_image::READY_LINE, 0, READY_TIMEOUT)
        .is_none()
    {
        bail!(
            "the guest did not print its ready line within {READY_TIMEOUT:?} (exit: {:?}, console: {:?})",
            vm.wait_exit(Some(Duration::ZERO)),
            lines.lines()
        );
    }
    let ready = t0.elapsed();
    vm.stop();
    Ok((created, ready))
}

pub fn run(cmd: BenchCommand) -> Result<ExitCode> {
    match cmd {
        BenchCommand::Boot {
            runs,
            vcpus,
            mem_mib,
            json,
        } => {
            if runs == 0 {
                bail!("--runs must be at least 1");
            }
            // One unmeasured boot warms the page cache and the allocator.
            boot_once(vcpus, mem_mib)?;
            let mut create = Vec::new();
            let mut ready = Vec::new();
            for i in 0..runs {
                let (c, r) = boot_once(vcpus, mem_mib)?;
                create.push(c);
                ready.push(r);
                if !json {
                    eprint!("\rboot {}/{runs}", i + 1);
                }
            }
            let report = BootReport {
                benchmark: "boot",
                flavour: vmm::Flavour::detect(),
                vcpus,
                mem_mib,
                boot_to_ready_p50_us: Stats::of(&ready).p50_us,
                create: Stats::of(&create),
                boot_to_ready: Stats::of(&ready),
            };
            if !json {
                eprintln!();
                println!(
                    "{:<16} {:>10} {:>10} {:>10} {:>10}",
                    "", "p50 us", "p90 us", "min us", "max us"
                );
                for (name, s) in [
                    ("create", &report.create),
                    ("boot->ready", &report.boot_to_ready),
                ] {
                    println!(
                        "{:<16} {:>10.0} {:>10.0} {:>10.0} {:>10.0}",
                        name, s.p50_us, s.p90_us, s.min_us, s.max_us
                    );
                }
            }
            println!("{}", serde_json::to_string(&report)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}
