//! `minivmm bench ...`: measurements printed as a table and JSON. Numbers are
//! reported, never asserted.

use std::path::{Path, PathBuf};
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
    /// Agent RPCs over vsock: round trip of Check (p50/p99) and bulk
    /// guest->host bytes (ReadRandom of 4 KiB per call).
    Agent {
        /// Round trips to time.
        #[arg(long, default_value_t = 2000)]
        calls: usize,
        /// Bulk transfer size in MiB.
        #[arg(long, default_value_t = 16)]
        bulk_mib: usize,
        /// Print JSON only.
        #[arg(long)]
        json: bool,
    },
    /// virtio-fs through virtiofsd: sequential read MiB/s and 4 KiB
    /// open+read+close per second against the host directly, and the extra
    /// latency of a clone with a virtio-fs device (virtiofsd start included).
    Fs {
        /// Size of the sequentially read file in MiB.
        #[arg(long, default_value_t = 64)]
        file_mib: usize,
        /// Number of 4 KiB files opened, read and closed.
        #[arg(long, default_value_t = 500)]
        small_files: usize,
        /// Clones measured with and without the device.
        #[arg(long, default_value_t = 20)]
        clones: usize,
        /// virtiofsd's --sandbox (namespace, chroot, none).
        #[arg(long, default_value = "namespace")]
        sandbox: String,
        /// Print JSON only.
        #[arg(long)]
        json: bool,
    },
    /// The factory's get_vm for one guest, in one run: taken from a cache
    /// factory (filled in the background first), cloned from the template,
    /// and booted directly; then the cost of growing a clone by one vCPU and
    /// by 256 MiB.
    Factory {
        /// Template directory (default: build a temporary one on /dev/shm).
        #[arg(long)]
        template: Option<PathBuf>,
        /// VMs per path (also the cache's size).
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// Guest RAM in MiB of a temporary template.
        #[arg(long, default_value_t = 256)]
        mem_mib: u64,
        /// Print JSON only.
        #[arg(long)]
        json: bool,
    },
    /// Template clones: restore, resume and ready latency, cold boot of the
    /// same guest for the ratio, private memory per live clone, clones/s.
    Clone {
        /// Template directory (default: build a temporary one on /dev/shm).
        #[arg(long)]
        template: Option<PathBuf>,
        /// Number of clones (sequential for latency; all alive for memory).
        #[arg(long, default_value_t = 50)]
        count: usize,
        /// Cold boots to measure for the ratio.
        #[arg(long, default_value_t = 10)]
        cold_boots: usize,
        /// Guest RAM in MiB of a temporary template.
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
        initrd: None,
        console: Box::new(lines.tap(Box::new(std::io::sink()))),
        virtio: vmm::VirtioConfig::default(),
        allow_pvm_native: true,
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

/// Sum of a field (kB) over the mappings of `path` in /proc/self/smaps.
fn smaps_kib(path: &Path, fields: &[&str]) -> Result<Vec<u64>> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let target = path.to_string_lossy();
    let mut sums = vec![0u64; fields.len()];
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [path]".
            inside = line.ends_with(target.as_ref());
            continue;
        }
        if inside {
            for (i, f) in fields.iter().enumerate() {
                if let Some(rest) = line.strip_prefix(f).and_then(|r| r.strip_prefix(':')) {
                    sums[i] += rest
                        .trim()
                        .trim_end_matches(" kB")
                        .parse::<u64>()
                        .unwrap_or(0);
                }
            }
        }
    }
    Ok(sums)
}

#[derive(Serialize)]
struct CloneReport {
    benchmark: &'static str,
    flavour: vmm::Flavour,
    clones: usize,
    mem_mib: u64,
    clone_ready_p50_us: f64,
    clone_ready_p99_us: f64,
    restore_p50_us: f64,
    restore_p99_us: f64,
    resume_p50_us: f64,
    agent_ready_p50_us: f64,
    cold_boot_p50_us: f64,
    cold_to_clone_ratio: f64,
    private_kib_per_clone: f64,
    pss_kib_per_clone: f64,
    clones_per_sec: f64,
    clone_total: Stats,
    restore: Stats,
    resume: Stats,
    agent_ready: Stats,
    teardown: Stats,
    cold_boot: Stats,
}

/// Cold boot of the template's guest with its devices, to an answered
/// agent Check: the direct factory's path.
fn cold_boot_to_agent(spec: &factory::GuestSpec) -> Result<Duration> {
    let request = factory::VmRequest::new(spec.clone())?;
    let t0 = Instant::now();
    let vm = factory::DirectFactory::default().boot(&request)?;
    let t = t0.elapsed();
    drop(vm);
    Ok(t)
}

fn bench_clone(
    template: Option<PathBuf>,
    count: usize,
    cold_boots: usize,
    mem_mib: u64,
    json: bool,
) -> Result<ExitCode> {
    if count == 0 || cold_boots == 0 {
        bail!("--count and --cold-boots must be at least 1");
    }
    let spec = factory::GuestSpec::testguest(1, mem_mib);
    // A template we build is ours: removed on every way out, errors included.
    let mut owned = None;
    let dir = match template {
        Some(d) => d,
        None => {
            let dir = PathBuf::from(format!("/dev/shm/minivmm-bench-{}", std::process::id()));
            owned = Some(TemporaryTemplate(dir.clone()));
            if !json {
                eprintln!("building a temporary template in {}", dir.display());
            }
            factory::create_template(&dir, &spec, &factory::CreateOptions::default())?;
            dir
        }
    };
    let handle = factory::TemplateHandle::open(&dir, None)?;
    // Warm-up clone (page cache, allocator), not measured.
    drop(handle.clone_vm(factory::CloneOptions::default())?);

    let (mut total, mut restore, mut resume, mut ready) = (vec![], vec![], vec![], vec![]);
    let mut teardown = vec![];
    let seq_start = Instant::now();
    for i in 0..count {
        let c = handle.clone_vm(factory::CloneOptions::default())?;
        let t = c.timings;
        total.push(t.restore + t.resume + t.ready);
        restore.push(t.restore);
        resume.push(t.resume);
        ready.push(t.ready);
        let t_drop = Instant::now();
        drop(c);
        teardown.push(t_drop.elapsed());
        if !json {
            eprint!("\rclone {}/{count}", i + 1);
        }
    }
    let clones_per_sec = count as f64 / seq_start.elapsed().as_secs_f64();
    if !json {
        eprintln!();
    }

    // Memory: all clones alive at once, each touching nothing beyond readiness.
    let mem_path = handle.template().memory_path();
    let mut alive = Vec::with_capacity(count);
    for _ in 0..count {
        alive.push(handle.clone_vm(factory::CloneOptions::default())?);
    }
    let sums = smaps_kib(&mem_path, &["Private_Dirty", "Pss"])?;
    drop(alive);

    let mut cold = Vec::new();
    for _ in 0..cold_boots {
        cold.push(cold_boot_to_agent(&spec)?);
    }
    let clone_total = Stats::of(&total);
    let cold_boot = Stats::of(&cold);
    let report = CloneReport {
        benchmark: "clone",
        flavour: vmm::Flavour::detect(),
        clones: count,
        mem_mib: handle.template().manifest().config.mem_mib,
        clone_ready_p50_us: clone_total.p50_us,
        clone_ready_p99_us: clone_total.p99_us,
        restore_p50_us: Stats::of(&restore).p50_us,
        restore_p99_us: Stats::of(&restore).p99_us,
        resume_p50_us: Stats::of(&resume).p50_us,
        agent_ready_p50_us: Stats::of(&ready).p50_us,
        cold_boot_p50_us: cold_boot.p50_us,
        cold_to_clone_ratio: cold_boot.p50_us / clone_total.p50_us,
        private_kib_per_clone: sums[0] as f64 / count as f64,
        pss_kib_per_clone: sums[1] as f64 / count as f64,
        clones_per_sec,
        clone_total,
        restore: Stats::of(&restore),
        resume: Stats::of(&resume),
        agent_ready: Stats::of(&ready),
        teardown: Stats::of(&teardown),
        cold_boot,
    };
    if !json {
        println!(
            "{:<22} {:>10} {:>10} {:>10}",
            "", "p50 us", "p99 us", "max us"
        );
        for (name, s) in [
            ("clone -> ready", &report.clone_total),
            ("  restore", &report.restore),
            ("  resume", &report.resume),
            ("  agent (reseed,time)", &report.agent_ready),
            ("teardown", &report.teardown),
            ("cold boot -> agent", &report.cold_boot),
        ] {
            println!(
                "{:<22} {:>10.0} {:>10.0} {:>10.0}",
                name, s.p50_us, s.p99_us, s.max_us
            );
        }
        println!(
            "cold/clone {:.1}x, {:.0} KiB private (Pss {:.0} KiB) per live clone, {:.0} clones/s",
            report.cold_to_clone_ratio,
            report.private_kib_per_clone,
            report.pss_kib_per_clone,
            report.clones_per_sec
        );
    }
    println!("{}", serde_json::to_string(&report)?);
    drop(handle);
    drop(owned);
    Ok(ExitCode::SUCCESS)
}

/// A template directory this process built for itself; removed when dropped.
struct TemporaryTemplate(PathBuf);

impl Drop for TemporaryTemplate {
    fn drop(&mut self) {
        // remove() also clears the memory file's immutable flag; whatever a
        // failed build left (no manifest) goes with the directory.
        let _ = snapshot::template::remove(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Serialize)]
struct AgentReport {
    benchmark: &'static str,
    flavour: vmm::Flavour,
    rpc_round_trip: Stats,
    rpc_p50_us: f64,
    rpc_p99_us: f64,
    bulk_bytes: usize,
    bulk_mib_per_sec: f64,
}

fn bench_agent(calls: usize, bulk_mib: usize, json: bool) -> Result<ExitCode> {
    if calls == 0 || bulk_mib == 0 {
        bail!("--calls and --bulk-mib must be at least 1");
    }
    let request = factory::VmRequest::new(factory::GuestSpec::testguest(1, 256))?;
    let mut vm = factory::DirectFactory::default().boot(&request)?;
    let agent = vm.agent();
    let req = agent_protocol::CheckRequest::default();
    for _ in 0..calls.min(100) {
        agent.check(&req, READY_TIMEOUT)?;
    }
    let mut rtt = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        agent.check(&req, READY_TIMEOUT)?;
        rtt.push(t.elapsed());
    }
    let chunk = 4096usize;
    let total = bulk_mib << 20;
    let t = Instant::now();
    let mut got = 0;
    while got < total {
        let r = agent.read_random(
            &agent_protocol::ReadRandomRequest { n: chunk as u32 },
            READY_TIMEOUT,
        )?;
        if r.data.is_empty() {
            bail!("the guest returned no bytes");
        }
        got += r.data.len();
    }
    let secs = t.elapsed().as_secs_f64();
    drop(vm);
    let stats = Stats::of(&rtt);
    let report = AgentReport {
        benchmark: "agent",
        flavour: vmm::Flavour::detect(),
        rpc_p50_us: stats.p50_us,
        rpc_p99_us: stats.p99_us,
        rpc_round_trip: stats,
        bulk_bytes: got,
        bulk_mib_per_sec: got as f64 / (1 << 20) as f64 / secs,
    };
    if !json {
        println!(
            "Check round trip: p50 {:.0} us, p99 {:.0} us ({} calls); bulk guest->host {:.1} MiB/s",
            report.rpc_p50_us, report.rpc_p99_us, calls, report.bulk_mib_per_sec
        );
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct FactoryReport {
    benchmark: &'static str,
    flavour: vmm::Flavour,
    count: usize,
    mem_mib: u64,
    cache_p50_us: f64,
    template_p50_us: f64,
    direct_p50_us: f64,
    /// get_vm from a full cache factory (a take).
    cache: Stats,
    /// get_vm from the template factory (restore, resume, reseed, clock, check).
    template: Stats,
    /// get_vm from the direct factory (cold boot to the agent's Check).
    direct: Stats,
    /// Growing a clone, on top of its get_vm.
    growth: GrowthReport,
}

#[derive(Serialize)]
struct GrowthReport {
    vcpu_add_p50_us: f64,
    memory_add_p50_us: f64,
    /// One more vCPU: creating and starting it, until the guest shows it online.
    vcpu_add: Stats,
    /// 256 MiB more through virtio-mem, until the guest shows it online.
    memory_add_mib: u64,
    memory_add: Stats,
}

/// MiB added per memory-growth sample.
const GROW_MEM_MIB: u64 = 256;

/// `count` grown clones of `request` grown per `grown`; the named steps' sums.
fn time_growth(
    f: &dyn factory::Factory,
    grown: &factory::VmRequest,
    count: usize,
    steps: &[&str],
) -> Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let vm = f.get_vm(grown)?;
        let mut sum = Duration::ZERO;
        for s in steps {
            sum += vm
                .step(s)
                .ok_or_else(|| anyhow::anyhow!("the grown VM has no {s} step"))?;
        }
        out.push(sum);
    }
    Ok(out)
}

/// `count` get_vm calls on `f`, each VM dropped after; their latencies.
fn time_get_vm(
    f: &dyn factory::Factory,
    request: &factory::VmRequest,
    count: usize,
    want: factory::VmSource,
) -> Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let vm = f.get_vm(request)?;
        if vm.source != want {
            bail!(
                "expected a VM from the {} path, got one from {}",
                want.name(),
                vm.source.name()
            );
        }
        out.push(vm.total);
    }
    Ok(out)
}

fn bench_factory(
    template: Option<PathBuf>,
    count: usize,
    mem_mib: u64,
    json: bool,
) -> Result<ExitCode> {
    use factory::{CacheFactory, DirectFactory, Factory, TemplateFactory, VmRequest, VmSource};
    use std::sync::Arc;
    if count == 0 {
        bail!("--count must be at least 1");
    }
    let spec = factory::GuestSpec::testguest(1, mem_mib);
    let owned = template.is_none();
    let dir = match template {
        Some(d) => d,
        None => {
            let dir = PathBuf::from(format!(
                "/dev/shm/minivmm-bench-factory-{}",
                std::process::id()
            ));
            if !json {
                eprintln!("building a temporary template in {}", dir.display());
            }
            factory::create_template(&dir, &spec, &factory::CreateOptions::default())?;
            dir
        }
    };
    let result = (|| {
        let template = Arc::new(TemplateFactory::open(&dir, DirectFactory::default(), true));
        let spec = match template.handle() {
            Ok(h) => factory::GuestSpec {
                vcpus: h.template().manifest().config.vcpus,
                mem_mib: h.template().manifest().config.mem_mib,
                cmdline: h.template().manifest().config.cmdline.clone(),
                ..spec
            },
            Err(e) => bail!("template {}: {e}", dir.display()),
        };
        let request = VmRequest::new(spec)?;
        // Warm-up (page cache, allocator), not measured.
        drop(template.get_vm(&request)?);
        let templ = time_get_vm(template.as_ref(), &request, count, VmSource::Template)?;
        let direct = time_get_vm(&DirectFactory::default(), &request, count, VmSource::Direct)?;
        let base = request.spec();
        let more_vcpus = VmRequest::new(factory::GuestSpec {
            vcpus: base.vcpus + 1,
            ..base.clone()
        })?;
        let more_memory = VmRequest::new(factory::GuestSpec {
            mem_mib: base.mem_mib + GROW_MEM_MIB,
            ..base.clone()
        })?;
        let vcpu_add = time_growth(
            template.as_ref(),
            &more_vcpus,
            count,
            &["add_vcpus", "online"],
        )?;
        let memory_add = time_growth(
            template.as_ref(),
            &more_memory,
            count,
            &["add_memory", "online"],
        )?;
        let as_factory: Arc<dyn Factory> = template.clone();
        let cache = CacheFactory::new(as_factory.clone(), as_factory, request.clone(), count);
        let (status, full) = cache.wait_status(READY_TIMEOUT * 4, |s| s.ready == count);
        if !full {
            bail!("the cache did not fill: {status:?}");
        }
        // Keep the taken VMs so every take comes from the full cache.
        let mut taken = Vec::with_capacity(count);
        let mut cached = Vec::with_capacity(count);
        for _ in 0..count {
            let vm = cache.get_vm(&request)?;
            if vm.source != VmSource::Cache {
                bail!("a take from the full cache came from {}", vm.source.name());
            }
            cached.push(vm.total);
            taken.push(vm);
        }
        cache.close();
        drop(taken);
        Ok((
            request.spec().mem_mib,
            cached,
            templ,
            direct,
            vcpu_add,
            memory_add,
        ))
    })();
    if owned {
        let _ = snapshot::template::remove(&dir);
    }
    let (mem_mib, cached, templ, direct, vcpu_add, memory_add) = result?;
    let report = FactoryReport {
        benchmark: "factory",
        flavour: vmm::Flavour::detect(),
        count,
        mem_mib,
        cache_p50_us: Stats::of(&cached).p50_us,
        template_p50_us: Stats::of(&templ).p50_us,
        direct_p50_us: Stats::of(&direct).p50_us,
        cache: Stats::of(&cached),
        template: Stats::of(&templ),
        direct: Stats::of(&direct),
        growth: GrowthReport {
            vcpu_add_p50_us: Stats::of(&vcpu_add).p50_us,
            memory_add_p50_us: Stats::of(&memory_add).p50_us,
            vcpu_add: Stats::of(&vcpu_add),
            memory_add_mib: GROW_MEM_MIB,
            memory_add: Stats::of(&memory_add),
        },
    };
    if !json {
        println!(
            "{:<18} {:>10} {:>10} {:>10}",
            "get_vm from", "p50 us", "p99 us", "max us"
        );
        for (name, s) in [
            ("cache", &report.cache),
            ("template", &report.template),
            ("direct", &report.direct),
        ] {
            println!(
                "{:<18} {:>10.0} {:>10.0} {:>10.0}",
                name, s.p50_us, s.p99_us, s.max_us
            );
        }
        for (name, s) in [
            ("grow: +1 vCPU", &report.growth.vcpu_add),
            ("grow: +256 MiB", &report.growth.memory_add),
        ] {
            println!(
                "{:<18} {:>10.0} {:>10.0} {:>10.0}",
                name, s.p50_us, s.p99_us, s.max_us
            );
        }
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}

pub fn run(cmd: BenchCommand) -> Result<ExitCode> {
    match cmd {
        BenchCommand::Factory {
            template,
            count,
            mem_mib,
            json,
        } => bench_factory(template, count, mem_mib, json),
        BenchCommand::Fs {
            file_mib,
            small_files,
            clones,
            sandbox,
            json,
        } => crate::bench_fs::bench_fs(file_mib, small_files, clones, &sandbox, json),
        BenchCommand::Agent {
            calls,
            bulk_mib,
            json,
        } => bench_agent(calls, bulk_mib, json),
        BenchCommand::Clone {
            template,
            count,
            cold_boots,
            mem_mib,
            json,
        } => bench_clone(template, count, cold_boots, mem_mib, json),
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
