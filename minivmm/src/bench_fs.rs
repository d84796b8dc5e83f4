//! `minivmm bench fs`: virtio-fs through the shadow queue and the real
//! virtiofsd, driven by the test guest's agent, against the host reading the
//! same files directly; and what a virtio-fs device adds to a clone.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agent_protocol::{AgentClient, CheckRequest, FsReadRequest, AGENT_VSOCK_PORT};
use anyhow::{bail, Context, Result};
use devices::virtio::fs::daemon::{Virtiofsd, VirtiofsdConfig, DEFAULT_STOP_TIMEOUT};
use devices::virtio::fs::pool::VirtiofsdPool;
use serde::Serialize;
use vmm::console::ConsoleLines;
use vmm::{FsShare, MemoryBackend, Vm, VmConfig};

use crate::bench::Stats;

const CALL: Duration = Duration::from_secs(30);
/// Bytes per FsRead call (the test guest's agent answers at most 256 KiB).
const READ_CHUNK: u32 = 256 * 1024;
/// Size of each small file.
const SMALL: usize = 4096;

#[derive(Serialize)]
struct FsReport {
    benchmark: &'static str,
    flavour: vmm::Flavour,
    virtiofsd_sandbox: String,
    seq_file_mib: usize,
    seq_read_mib_per_sec: f64,
    host_seq_read_mib_per_sec: f64,
    small_files: usize,
    small_open_read_close_per_sec: f64,
    host_small_open_read_close_per_sec: f64,
    agent_check_p50_us: f64,
    virtiofsd_start: Stats,
    clone_ready: Stats,
    fs_clone_ready_incl_virtiofsd: Stats,
    extra_clone_latency_p50_us: f64,
    /// With a daemon taken from a pool of pre-started ones (refilled
    /// between clones, unmeasured) and a file put in its directory.
    fs_clone_ready_pooled_virtiofsd: Stats,
    extra_clone_latency_pooled_p50_us: f64,
}

/// A temporary directory removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start_daemon(name: &str, dir: &Path, socket: PathBuf, sandbox: &str) -> Result<Virtiofsd> {
    let _ = std::fs::remove_file(&socket);
    let mut config = VirtiofsdConfig::new(dir, socket);
    config.sandbox = sandbox.into();
    // A daemon that dies makes the next file request fail, which ends the
    // benchmark with that error; nothing else to do on its exit.
    let d = Virtiofsd::start(name, &config, Box::new(|_| {}))?;
    Ok(d)
}

fn share(d: &Virtiofsd) -> Vec<FsShare> {
    vec![FsShare {
        tag: "share".into(),
        socket: d.socket_path().to_path_buf(),
    }]
}

fn read_file(agent: &mut AgentClient, path: &str) -> Result<usize> {
    let mut offset = 0u64;
    loop {
        let r = agent.fs_read(
            &FsReadRequest {
                tag: String::new(),
                path: path.into(),
                offset,
                len: READ_CHUNK,
            },
            CALL,
        )?;
        offset += r.data.len() as u64;
        if r.data.len() < READ_CHUNK as usize {
            return Ok(offset as usize);
        }
    }
}

/// Run the benchmark.
pub fn bench_fs(
    file_mib: usize,
    small_files: usize,
    clones: usize,
    sandbox: &str,
    json: bool,
) -> Result<ExitCode> {
    if file_mib == 0 || small_files == 0 || clones == 0 {
        bail!("--file-mib, --small-files and --clones must be at least 1");
    }
    let scratch =
        Scratch(std::env::temp_dir().join(format!("minivmm-bench-fs-{}", std::process::id())));
    let dir = scratch.0.join("share");
    std::fs::create_dir_all(dir.join("small")).context("creating the share")?;
    let mut big = vec![0u8; file_mib << 20];
    factory::clone::host_entropy(&mut big)?;
    std::fs::write(dir.join("big.bin"), &big)?;
    for i in 0..small_files {
        std::fs::write(dir.join(format!("small/{i}")), &big[..SMALL])?;
    }
    drop(big);

    // Through the guest.
    let daemon = start_daemon("bench-fs", &dir, scratch.0.join("fs.sock"), sandbox)?;
    let vsock = scratch.0.join("v.sock");
    let lines = ConsoleLines::new();
    let mut vm = Vm::create(VmConfig {
        id: "bench-fs".into(),
        vcpus: 1,
        mem_mib: 256,
        memory: MemoryBackend::Anonymous,
        kernel: crate::kernel_image(None),
        cmdline: String::new(),
        console: Box::new(lines.tap(Box::new(std::io::sink()))),
        virtio: vmm::VirtioConfig {
            rng: true,
            vsock: Some(vsock.clone()),
            fs: share(&daemon),
            mem: None,
        },
        initrd: None,
        allow_pvm_native: true,
    })?;
    vm.start()?;
    if lines
        .wait_for(testguest_image::READY_LINE, 0, CALL)
        .is_none()
    {
        bail!("the guest did not become ready within {CALL:?}");
    }
    let mut agent = AgentClient::connect_hybrid_vsock(&vsock, AGENT_VSOCK_PORT, CALL)?;
    let mut rtt = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        agent.check(&CheckRequest::default(), CALL)?;
        rtt.push(t.elapsed());
    }
    // One unmeasured pass warms the host page cache and the FUSE session.
    read_file(&mut agent, "big.bin")?;
    let t = Instant::now();
    let n = read_file(&mut agent, "big.bin")?;
    let seq = n as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..small_files {
        let r = agent.fs_read(
            &FsReadRequest {
                tag: String::new(),
                path: format!("small/{i}"),
                offset: 0,
                len: SMALL as u32,
            },
            CALL,
        )?;
        if r.data.len() != SMALL {
            bail!("small/{i}: {} bytes read", r.data.len());
        }
    }
    let small = small_files as f64 / t.elapsed().as_secs_f64();
    drop(agent);
    vm.stop();
    drop(vm);
    daemon.stop(DEFAULT_STOP_TIMEOUT);

    // The host, directly.
    let t = Instant::now();
    let n = std::fs::read(dir.join("big.bin"))?.len();
    let host_seq = n as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..small_files {
        let data = std::fs::read(dir.join(format!("small/{i}")))?;
        std::hint::black_box(data);
    }
    let host_small = small_files as f64 / t.elapsed().as_secs_f64();

    // Clones with and without the device.
    let template_share = scratch.0.join("template-share");
    std::fs::create_dir_all(&template_share)?;
    let template_daemon = start_daemon(
        "bench-fs-template",
        &template_share,
        scratch.0.join("t.sock"),
        sandbox,
    )?;
    let fs_template = PathBuf::from(format!("/dev/shm/minivmm-bench-fs-{}", std::process::id()));
    let plain_template = PathBuf::from(format!(
        "/dev/shm/minivmm-bench-fs-plain-{}",
        std::process::id()
    ));
    let spec = factory::GuestSpec::testguest(1, 256);
    let built = (|| -> Result<_> {
        factory::create_template(
            &fs_template,
            &spec,
            &factory::CreateOptions {
                fs: share(&template_daemon),
                ..factory::CreateOptions::default()
            },
        )?;
        factory::create_template(&plain_template, &spec, &factory::CreateOptions::default())?;
        let fs_handle = factory::TemplateHandle::open(&fs_template, None)?;
        let plain_handle = factory::TemplateHandle::open(&plain_template, None)?;
        Ok((fs_handle, plain_handle))
    })();
    template_daemon.stop(DEFAULT_STOP_TIMEOUT);
    let remove_templates = || {
        for t in [&fs_template, &plain_template] {
            let _ = snapshot::template::remove(t);
            let _ = std::fs::remove_dir(t);
        }
    };
    let (fs_handle, plain_handle) = match built {
        Ok(h) => h,
        Err(e) => {
            remove_templates();
            return Err(e);
        }
    };
    let measured = (|| -> Result<_> {
        drop(plain_handle.clone_vm(factory::CloneOptions::default())?);
        let (mut plain, mut with_fs, mut starts) = (Vec::new(), Vec::new(), Vec::new());
        let mut pooled = Vec::new();
        let mut base = VirtiofsdConfig::new(&dir, scratch.0.join("unused.sock"));
        base.sandbox = sandbox.into();
        let pool_root = scratch.0.join("pool");
        let mut pool = VirtiofsdPool::new("bench-fs-pool", &pool_root, base);
        for i in 0..clones {
            pool.fill(1)?;
            let t = Instant::now();
            let d = pool.take().context("the pool is empty after a fill")?;
            std::fs::write(d.dir.join("file"), b"sandbox data")?;
            let c = fs_handle.clone_vm(factory::CloneOptions {
                fs: share(&d.daemon),
                ..factory::CloneOptions::default()
            })?;
            pooled.push(t.elapsed());
            drop(c);
            let _ = std::fs::remove_file(d.dir.join("file"));
            drop(d);

            let t = Instant::now();
            let c = plain_handle.clone_vm(factory::CloneOptions::default())?;
            plain.push(t.elapsed());
            drop(c);
            let t = Instant::now();
            let d = start_daemon(
                "bench-fs-clone",
                &dir,
                scratch.0.join(format!("c{i}.sock")),
                sandbox,
            )?;
            starts.push(t.elapsed());
            let c = fs_handle.clone_vm(factory::CloneOptions {
                fs: share(&d),
                ..factory::CloneOptions::default()
            })?;
            with_fs.push(t.elapsed());
            drop(c);
            d.stop(DEFAULT_STOP_TIMEOUT);
            if !json {
                eprint!("\rclone {}/{clones}", i + 1);
            }
        }
        if !json {
            eprintln!();
        }
        Ok((plain, with_fs, starts, pooled))
    })();
    drop((fs_handle, plain_handle));
    remove_templates();
    let (plain, with_fs, starts, pooled) = measured?;

    let clone_ready = Stats::of(&plain);
    let fs_clone = Stats::of(&with_fs);
    let pooled = Stats::of(&pooled);
    let report = FsReport {
        benchmark: "fs",
        flavour: vmm::Flavour::detect(),
        virtiofsd_sandbox: sandbox.into(),
        seq_file_mib: file_mib,
        seq_read_mib_per_sec: seq,
        host_seq_read_mib_per_sec: host_seq,
        small_files,
        small_open_read_close_per_sec: small,
        host_small_open_read_close_per_sec: host_small,
        agent_check_p50_us: Stats::of(&rtt).p50_us,
        virtiofsd_start: Stats::of(&starts),
        extra_clone_latency_p50_us: fs_clone.p50_us - clone_ready.p50_us,
        extra_clone_latency_pooled_p50_us: pooled.p50_us - clone_ready.p50_us,
        fs_clone_ready_pooled_virtiofsd: pooled,
        clone_ready,
        fs_clone_ready_incl_virtiofsd: fs_clone,
    };
    if !json {
        println!(
            "sequential read {:.1} MiB/s through virtio-fs (host direct {:.0} MiB/s)",
            report.seq_read_mib_per_sec, report.host_seq_read_mib_per_sec
        );
        println!(
            "4 KiB open+read+close {:.0}/s through virtio-fs, one agent RPC each (Check p50 {:.0} us); host direct {:.0}/s",
            report.small_open_read_close_per_sec,
            report.agent_check_p50_us,
            report.host_small_open_read_close_per_sec
        );
        println!(
            "clone -> ready p50 {:.0} us; with virtio-fs incl. virtiofsd start p50 {:.0} us (virtiofsd start p50 {:.0} us): +{:.0} us",
            report.clone_ready.p50_us,
            report.fs_clone_ready_incl_virtiofsd.p50_us,
            report.virtiofsd_start.p50_us,
            report.extra_clone_latency_p50_us
        );
        println!(
            "with a pre-started virtiofsd from a pool: p50 {:.0} us (+{:.0} us)",
            report.fs_clone_ready_pooled_virtiofsd.p50_us, report.extra_clone_latency_pooled_p50_us
        );
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}
