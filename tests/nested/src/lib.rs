//! The nested test bed. `/dev/kvm` on our machines is PVM, on which stock
//! Linux cannot run; QEMU's software emulation (`-cpu max`) exposes SVM, so
//! an outer VM running Debian's kernel has a hardware-style KVM in which
//! minivmm boots, templates and clones Linux guests (slowly: correctness
//! only, never timing).
//!
//! [`run`] builds the outer VM's initramfs from Debian packages (kernel and
//! busybox-static through `apt-get download`, kvm-amd with its module
//! closure, minivmm and the e2e test binaries with their shared libraries,
//! the Linux guest image from `minivmm image linux`), boots it under
//! `qemu-system-x86_64 -machine q35,accel=tcg -cpu max`, and collects each
//! check's result from the serial console. A check is a shell script in
//! `checks/NAME.sh` that the outer `/init` runs with busybox; see README.md.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use linux_image::cpio::Archive;
use linux_image::deb::{self, KernelTree};
use linux_image::modules::ModuleIndex;
use linux_image::ImageError;

/// The QEMU binary the bed needs.
pub const QEMU: &str = "qemu-system-x86_64";
/// What installs it (Debian).
pub const QEMU_INSTALL: &str = "apt-get install -y qemu-system-x86";
/// Guest RAM of the outer VM in MiB.
pub const OUTER_MEM_MIB: u32 = 4096;
/// Directory of the check scripts.
pub const CHECKS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/checks");
/// Default deadline for one outer VM run (boot, every check, poweroff).
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(20 * 60);
/// Default deadline for one check inside the outer VM.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(8 * 60);
/// Default number of outer VM boots: a fresh outer VM reruns the checks an
/// outer-kernel lockup left unfinished (see [`OUTER_LOCKUP`]), once.
pub const DEFAULT_ATTEMPTS: u32 = 2;
/// Default vCPUs of the outer VM.
pub const DEFAULT_OUTER_CPUS: u32 = 2;
/// Console lines with which the *outer* kernel reports that it has locked
/// up. Under QEMU's software emulation of SVM the outer kernel has been seen
/// to lock up for good (both CPUs in soft lockup, RCU stalled) while nested
/// guests ran; that is a fault of the emulator stack below minivmm, which
/// runs as a process in the outer VM and cannot stop its kernel.
pub const OUTER_LOCKUP: &[&str] = &[
    "watchdog: BUG: soft lockup",
    "detected stalls on CPUs/tasks",
    "self-detected stall on CPU",
    "Watchdog detected hard LOCKUP",
];
/// How long the outer VM may print nothing but kernel messages after a
/// lockup report before it is declared hung and killed.
pub const LOCKUP_GRACE: Duration = Duration::from_secs(120);
/// Kernel modules the outer VM loads (with their dependencies) for `/dev/kvm`.
const OUTER_MODULES: &[&str] = &["kvm_amd"];
/// Command line of the outer kernel: serial console, exit on panic
/// (QEMU runs with -no-reboot), little kernel chatter between the markers.
/// The checks to run follow as `nested_checks=a,b,c`.
const OUTER_CMDLINE: &str = "console=ttyS0 panic=-1 quiet no_timer_check rdinit=/init";
/// Console marker prefix; the outer /init prints `@@NESTED BEGIN NAME`,
/// `@@NESTED END NAME STATUS` and finally `@@NESTED DONE`.
const MARKER: &str = "@@NESTED";
/// e2e test binaries (cargo test targets of package `e2e`) run inside.
const E2E_TESTS: &[&str] = &["vm", "template", "agent"];

/// Errors of the bed itself (a failing check is a result, not an error).
#[derive(Debug, thiserror::Error)]
pub enum BedError {
    /// QEMU is not installed.
    #[error(
        "{QEMU} not found in PATH: the nested test bed needs it (install with `{QEMU_INSTALL}`)"
    )]
    QemuMissing,
    /// A check name with no script.
    #[error("no check named {name:?} in {CHECKS_DIR} (available: {available})")]
    UnknownCheck {
        /// The name asked for.
        name: String,
        /// The checks there are.
        available: String,
    },
    /// Building the Debian-based pieces failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// The operation.
        what: &'static str,
        /// Its subject.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A helper program failed.
    #[error("{command}: {detail}")]
    Tool {
        /// The command line.
        command: String,
        /// Exit status and the end of its output.
        detail: String,
    },
    /// The outer VM overran its deadline and was killed.
    #[error(
        "the outer VM did not finish within {secs} s and was killed (last console lines:\n{tail})"
    )]
    Deadline {
        /// The deadline.
        secs: u64,
        /// The end of its console.
        tail: String,
        /// Checks that finished before.
        finished: Vec<CheckResult>,
    },
    /// The outer kernel reported a lockup and made no progress after it;
    /// QEMU was killed.
    #[error(
        "the outer VM's kernel locked up{during} and was killed (last console lines:\n{tail})"
    )]
    OuterHung {
        /// " during check NAME", or empty.
        during: String,
        /// The end of its console.
        tail: String,
        /// Checks that finished before.
        finished: Vec<CheckResult>,
    },
    /// QEMU ended without the outer /init's final marker.
    #[error(
        "the outer VM ended ({status}) before running every check (last console lines:\n{tail})"
    )]
    EndedEarly {
        /// QEMU's exit status.
        status: String,
        /// The end of its console.
        tail: String,
        /// Checks that finished before.
        finished: Vec<CheckResult>,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BedError {
    let path = path.to_path_buf();
    move |source| BedError::Io { what, path, source }
}

/// One check's outcome, as the outer VM reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckResult {
    /// The check (script name without `.sh`).
    pub name: String,
    /// Its exit status inside (0 passes; 124/143 is the per-check timeout).
    pub status: i32,
    /// Everything it printed.
    pub output: String,
}

impl CheckResult {
    /// Whether the check passed.
    pub fn passed(&self) -> bool {
        self.status == 0
    }
}

/// What the bed brings back.
#[derive(Debug)]
pub struct Report {
    /// Per-check results, in run order.
    pub checks: Vec<CheckResult>,
    /// Time spent building the outer VM's pieces.
    pub build: Duration,
    /// Time the outer VM ran (boot, checks, poweroff), over every boot.
    pub run: Duration,
    /// Outer VM boots that ended in an outer-kernel lockup and were
    /// replaced by a fresh boot, each described in one line.
    pub retried: Vec<String>,
}

impl Report {
    /// Whether every check passed.
    pub fn all_passed(&self) -> bool {
        self.checks.iter().all(CheckResult::passed)
    }
}

/// How to run the bed.
pub struct Options {
    /// Checks to run (empty: all, in name order).
    pub checks: Vec<String>,
    /// Where the outer VM's kernel and initramfs are built.
    pub work_dir: PathBuf,
    /// Debian package cache.
    pub cache: PathBuf,
    /// Deadline for the outer VM run.
    pub deadline: Duration,
    /// Deadline for each check inside.
    pub check_timeout: Duration,
    /// Outer VM boots at most (a boot that locks up is replaced by a fresh
    /// one running the unfinished checks).
    pub attempts: u32,
    /// vCPUs of the outer VM.
    pub outer_cpus: u32,
    /// Progress and console lines for people.
    pub progress: Box<dyn FnMut(&str) + Send>,
}

impl Options {
    /// Defaults: every check, work dir under the cargo target directory.
    pub fn new(checks: Vec<String>) -> Options {
        Options {
            checks,
            work_dir: target_dir().join("nested"),
            cache: deb::default_cache_dir(),
            deadline: DEFAULT_DEADLINE,
            check_timeout: DEFAULT_CHECK_TIMEOUT,
            attempts: DEFAULT_ATTEMPTS,
            outer_cpus: DEFAULT_OUTER_CPUS,
            progress: Box::new(|line| eprintln!("nested: {line}")),
        }
    }
}

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The cargo target directory of the workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The check scripts there are, by name.
pub fn available_checks() -> Result<Vec<String>, BedError> {
    let dir = Path::new(CHECKS_DIR);
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_err("cannot list", dir))? {
        let e = e.map_err(io_err("cannot list", dir))?;
        if let Some(n) = e.file_name().to_string_lossy().strip_suffix(".sh") {
            names.push(n.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Whether `program` is an executable file in PATH.
fn in_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| {
            let p = d.join(program);
            std::fs::metadata(&p).is_ok_and(|m| m.is_file())
        })
    })
}

/// Run a command, returning its stdout; fails with its status and stderr tail.
fn output(cmd: &mut Command) -> Result<String, BedError> {
    let command = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .output()
        .map_err(|e| BedError::Tool {
            command: command.clone(),
            detail: format!("cannot start: {e}"),
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(BedError::Tool {
            command,
            detail: format!("{}: {}", out.status, tail(&stderr, 15)),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Executables cargo reported in `--message-format=json` output, as
/// (target name, target kind, path).
pub fn cargo_executables(json_lines: &str) -> Vec<(String, String, PathBuf)> {
    json_lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact")
        .filter_map(|v| {
            let exe = v["executable"].as_str()?;
            let name = v["target"]["name"].as_str()?;
            let kind = v["target"]["kind"][0].as_str()?;
            Some((name.to_string(), kind.to_string(), PathBuf::from(exe)))
        })
        .collect()
}

/// The binaries the outer VM gets: minivmm and the e2e tests, built
/// (release: they run under software emulation) by cargo.
struct Binaries {
    minivmm: PathBuf,
    e2e: Vec<(String, PathBuf)>,
}

fn build_binaries(progress: &mut dyn FnMut(&str)) -> Result<Binaries, BedError> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = workspace_root();
    progress("cargo build --release -p minivmm; cargo test --release -p e2e --no-run");
    let json = output(Command::new(&cargo).current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "minivmm",
        "--message-format=json-render-diagnostics",
    ]))?;
    let minivmm = cargo_executables(&json)
        .into_iter()
        .find(|(n, k, _)| n == "minivmm" && k == "bin")
        .map(|(_, _, p)| p)
        .ok_or_else(|| BedError::Tool {
            command: "cargo build --release -p minivmm".into(),
            detail: "reported no minivmm executable".into(),
        })?;
    let json = output(Command::new(&cargo).current_dir(&root).args([
        "test",
        "--release",
        "-p",
        "e2e",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]))?;
    let found = cargo_executables(&json);
    let mut e2e = Vec::new();
    for want in E2E_TESTS {
        let path = found
            .iter()
            .find(|(n, k, _)| n == want && k == "test")
            .map(|(_, _, p)| p.clone())
            .ok_or_else(|| BedError::Tool {
                command: "cargo test --release -p e2e --no-run".into(),
                detail: format!("reported no test executable {want:?}"),
            })?;
        e2e.push((want.to_string(), path));
    }
    Ok(Binaries { minivmm, e2e })
}

/// Shared libraries `binary` needs (ld.so included), from `ldd`.
pub fn parse_ldd(ldd: &str) -> Vec<PathBuf> {
    ldd.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

fn add_host_file(archive: &mut Archive, dest: &str, src: &Path, perm: u32) -> Result<(), BedError> {
    let data = std::fs::read(src).map_err(io_err("cannot read", src))?;
    archive.add_file(dest, perm, data)?;
    Ok(())
}

/// Add `binary` at `dest` and its shared libraries at their host paths.
fn add_binary(archive: &mut Archive, dest: &str, binary: &Path) -> Result<(), BedError> {
    add_host_file(archive, dest, binary, 0o755)?;
    for lib in parse_ldd(&output(Command::new("ldd").arg(binary))?) {
        let dest = lib.to_string_lossy().trim_start_matches('/').to_string();
        if !archive.contains(&dest) {
            // Resolve symlinks on the host: the archive gets the real bytes.
            let real = std::fs::canonicalize(&lib).map_err(io_err("cannot resolve", &lib))?;
            add_host_file(archive, &dest, &real, 0o755)?;
        }
    }
    Ok(())
}

/// The outer VM's `/init`: mounts, /dev/kvm, then every check named by
/// `nested_checks=` on the kernel command line with markers around its
/// output, then poweroff.
fn outer_init(check_timeout: Duration) -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/nested/bin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/shm /dev/pts
mount -t tmpfs -o mode=1777 shm /dev/shm
mount -t tmpfs -o mode=1777 tmp /tmp
for m in $(cat /nested/modules.order); do
    insmod "/nested/modules/$m.ko" || echo "{MARKER} insmod $m failed"
done
echo "{MARKER} READY $(uname -r) $(grep -c ^processor /proc/cpuinfo) cpus"
cd /tmp
checks=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^nested_checks=//p' | tr ',' ' ')
for c in $checks; do
    echo "{MARKER} BEGIN $c"
    NESTED=/nested NESTED_LINUX=/nested/linux timeout {secs} sh "/nested/checks/$c.sh" </dev/null 2>&1
    echo "{MARKER} END $c $?"
done
echo "{MARKER} DONE"
sync
poweroff -f
"#,
        secs = check_timeout.as_secs()
    )
}

/// Build the outer VM's kernel and initramfs into `opts.work_dir`; returns
/// (vmlinuz, initramfs) paths.
fn build_outer(opts: &mut Options, checks: &[String]) -> Result<(PathBuf, PathBuf), BedError> {
    let work = opts.work_dir.clone();
    std::fs::create_dir_all(&work).map_err(io_err("cannot create", &work))?;
    let bins = build_binaries(&mut *opts.progress)?;
    let progress = &mut *opts.progress;

    progress("minivmm image linux (the Linux guest image)");
    let linux_dir = work.join("linux-guest");
    output(
        Command::new(&bins.minivmm)
            .args(["image", "linux", "--out"])
            .arg(&linux_dir)
            .arg("--cache")
            .arg(&opts.cache),
    )?;

    let kernel_deb = deb::kernel_deb(None, &opts.cache, progress)?;
    let busybox_deb = deb::fetch_package("busybox-static", &opts.cache, progress)?;
    let extract = work.join("extract");
    let _ = std::fs::remove_dir_all(&extract);
    deb::extract_deb(&kernel_deb, &extract)?;
    deb::extract_deb(&busybox_deb, &extract)?;
    let tree = KernelTree::open(&extract)?;
    let modules = ModuleIndex::open(&tree.modules_dir)?.closure(OUTER_MODULES)?;
    progress(&format!(
        "outer kernel {} with modules {}",
        tree.release,
        modules
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    ));

    let mut archive = Archive::new();
    archive.add_char_dev("dev/console", 0o600, 5, 1)?;
    for dir in ["proc", "sys", "tmp", "run", "root"] {
        archive.add_dir(dir, 0o755)?;
    }
    archive.add_file("init", 0o755, outer_init(opts.check_timeout).into_bytes())?;
    add_host_file(
        &mut archive,
        "bin/busybox",
        &extract.join("bin/busybox"),
        0o755,
    )?;
    let mut order = String::new();
    for m in &modules {
        if m.is_compressed() {
            return Err(ImageError::BadModule {
                path: m.path.clone(),
                detail: "compressed; busybox insmod takes plain .ko files".into(),
            }
            .into());
        }
        add_host_file(
            &mut archive,
            &format!("nested/modules/{}.ko", m.name),
            &m.path,
            0o644,
        )?;
        order.push_str(&m.name);
        order.push('\n');
    }
    archive.add_file("nested/modules.order", 0o644, order.into_bytes())?;
    add_binary(&mut archive, "nested/bin/minivmm", &bins.minivmm)?;
    for (name, path) in &bins.e2e {
        add_binary(&mut archive, &format!("nested/bin/e2e-{name}"), path)?;
    }
    for f in ["vmlinuz", "initramfs.img"] {
        add_host_file(
            &mut archive,
            &format!("nested/linux/{f}"),
            &linux_dir.join(f),
            0o644,
        )?;
    }
    for c in checks {
        let src = Path::new(CHECKS_DIR).join(format!("{c}.sh"));
        add_host_file(&mut archive, &format!("nested/checks/{c}.sh"), &src, 0o755)?;
    }

    let vmlinuz = work.join("outer-vmlinuz");
    std::fs::copy(&tree.vmlinuz, &vmlinuz).map_err(io_err("cannot copy to", &vmlinuz))?;
    // Uncompressed: unpacking gzip under software emulation costs more than
    // QEMU reading a bigger file.
    let initramfs = work.join("outer-initramfs.cpio");
    std::fs::write(&initramfs, archive.to_cpio()).map_err(io_err("cannot write", &initramfs))?;
    let _ = std::fs::remove_dir_all(&extract);
    Ok((vmlinuz, initramfs))
}

/// Results parsed from the outer VM's console: finished checks, and
/// whether the final marker was seen.
pub fn parse_console(console: &str) -> (Vec<CheckResult>, bool) {
    let mut results = Vec::new();
    let mut current: Option<(String, String)> = None;
    let mut done = false;
    for line in console.lines() {
        let line = line.trim_end_matches('\r');
        let Some(rest) = line.strip_prefix(MARKER).map(str::trim) else {
            if let Some((_, out)) = current.as_mut() {
                out.push_str(line);
                out.push('\n');
            }
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        match words.as_slice() {
            ["BEGIN", name] => current = Some((name.to_string(), String::new())),
            ["END", name, status] => {
                if let Some((n, output)) = current.take().filter(|(n, _)| n == name) {
                    results.push(CheckResult {
                        name: n,
                        status: status.parse().unwrap_or(-1),
                        output,
                    });
                }
            }
            ["DONE"] => done = true,
            _ => {
                if let Some((_, out)) = current.as_mut() {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
    }
    (results, done)
}

/// Whether a console line is a kernel message (`[   12.345678] ...`) rather
/// than output of /init or a check.
fn is_kernel_line(line: &str) -> bool {
    let l = line.trim_start();
    l.starts_with('[')
        && l[1..]
            .trim_start()
            .starts_with(|c: char| c.is_ascii_digit())
}

/// The check a console so far is inside of (begun, not ended), if any.
fn running_check(console: &str) -> Option<String> {
    let mut current = None;
    for line in console.lines() {
        match line.strip_prefix(MARKER).map(str::split_whitespace) {
            Some(mut w) => match (w.next(), w.next()) {
                (Some("BEGIN"), Some(name)) => current = Some(name.to_string()),
                (Some("END"), _) => current = None,
                _ => {}
            },
            None => continue,
        }
    }
    current
}

/// One boot of the outer VM.
struct Boot<'a> {
    vmlinuz: &'a Path,
    initramfs: &'a Path,
    checks: &'a [String],
    cpus: u32,
    deadline: Duration,
}

/// How the console watch ended.
#[derive(Debug, PartialEq, Eq)]
enum Watch {
    /// QEMU closed its console: it ended.
    Ended,
    /// The deadline passed.
    Overran,
    /// The outer kernel reported a lockup and nothing but kernel messages
    /// followed for [`LOCKUP_GRACE`].
    Hung,
}

/// Read console lines from `rx` until QEMU closes it, `deadline` passes, or
/// the outer kernel reports a lockup and only kernel messages follow for
/// `grace`. Returns how it ended and the console.
fn watch_console(
    rx: &mpsc::Receiver<String>,
    deadline: Duration,
    grace: Duration,
    progress: &mut dyn FnMut(&str),
) -> (Watch, String) {
    let start = Instant::now();
    let mut console = String::new();
    // When the outer kernel reported a lockup with no output of /init or a
    // check since.
    let mut lockup_since: Option<Instant> = None;
    let watch = loop {
        let mut left = deadline.saturating_sub(start.elapsed());
        if left.is_zero() {
            break Watch::Overran;
        }
        if let Some(since) = lockup_since {
            let grace_left = grace.saturating_sub(since.elapsed());
            if grace_left.is_zero() {
                break Watch::Hung;
            }
            left = left.min(grace_left);
        }
        match rx.recv_timeout(left) {
            Ok(line) => {
                let line = line.trim_end_matches('\r');
                progress(&format!("| {line}"));
                if OUTER_LOCKUP.iter().any(|sig| line.contains(sig)) {
                    lockup_since.get_or_insert_with(Instant::now);
                } else if !is_kernel_line(line) && !line.trim().is_empty() {
                    lockup_since = None;
                }
                console.push_str(line);
                console.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break Watch::Ended,
            // The loop head decides between deadline and lockup.
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    };
    (watch, console)
}

/// Boot the outer VM and collect the checks' results, killing QEMU at the
/// deadline or when its kernel locks up.
fn run_outer(boot: &Boot, progress: &mut dyn FnMut(&str)) -> Result<Vec<CheckResult>, BedError> {
    let cmdline = format!("{OUTER_CMDLINE} nested_checks={}", boot.checks.join(","));
    let mut child = Command::new(QEMU)
        .args(["-machine", "q35,accel=tcg", "-cpu", "max"])
        .args(["-smp", &boot.cpus.to_string()])
        .args(["-m", &OUTER_MEM_MIB.to_string()])
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(boot.vmlinuz)
        .arg("-initrd")
        .arg(boot.initramfs)
        .args(["-append", &cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| BedError::Tool {
            command: QEMU.into(),
            detail: format!("cannot start: {e}"),
        })?;
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            if tx
                .send(String::from_utf8_lossy(&line).into_owned())
                .is_err()
            {
                break;
            }
        }
    });
    let (watch, console) = watch_console(&rx, boot.deadline, LOCKUP_GRACE, progress);
    if !matches!(watch, Watch::Ended) {
        let _ = child.kill();
    }
    let status = child.wait().map_err(|e| BedError::Tool {
        command: QEMU.into(),
        detail: format!("cannot wait: {e}"),
    })?;
    let _ = reader.join();
    let (finished, done) = parse_console(&console);
    match watch {
        Watch::Overran => {
            return Err(BedError::Deadline {
                secs: boot.deadline.as_secs(),
                tail: tail(&console, 20),
                finished,
            })
        }
        Watch::Hung => {
            return Err(BedError::OuterHung {
                during: running_check(&console)
                    .map(|c| format!(" during check {c}"))
                    .unwrap_or_default(),
                tail: tail(&console, 20),
                finished,
            })
        }
        Watch::Ended => {}
    }
    if !done {
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        return Err(BedError::EndedEarly {
            status: format!("{status}; {}", tail(&stderr, 5)),
            tail: tail(&console, 20),
            finished,
        });
    }
    Ok(finished)
}

/// Resolve the checks to run: all, or the named ones (each must exist).
pub fn select_checks(wanted: &[String]) -> Result<Vec<String>, BedError> {
    let available = available_checks()?;
    if wanted.is_empty() {
        return Ok(available);
    }
    for w in wanted {
        if !available.contains(w) {
            return Err(BedError::UnknownCheck {
                name: w.clone(),
                available: available.join(", "),
            });
        }
    }
    Ok(wanted.to_vec())
}

/// Build the outer VM, run the checks in it, and report.
pub fn run(mut opts: Options) -> Result<Report, BedError> {
    if !in_path(QEMU) {
        return Err(BedError::QemuMissing);
    }
    let checks = select_checks(&opts.checks)?;
    let start = Instant::now();
    let (vmlinuz, initramfs) = build_outer(&mut opts, &checks)?;
    let build = start.elapsed();
    (opts.progress)(&format!(
        "outer VM built in {:.0} s; booting it with {} check(s): {}",
        build.as_secs_f64(),
        checks.len(),
        checks.join(" ")
    ));
    let start = Instant::now();
    let mut results: Vec<CheckResult> = Vec::new();
    let mut retried = Vec::new();
    for attempt in 1..=opts.attempts.max(1) {
        let left: Vec<String> = checks
            .iter()
            .filter(|c| !results.iter().any(|r| &r.name == *c))
            .cloned()
            .collect();
        let boot = Boot {
            vmlinuz: &vmlinuz,
            initramfs: &initramfs,
            checks: &left,
            cpus: opts.outer_cpus,
            deadline: opts.deadline,
        };
        match run_outer(&boot, &mut *opts.progress) {
            Ok(found) => {
                results.extend(found);
                break;
            }
            // An outer-kernel lockup is the emulator's, not a check's: a
            // fresh outer VM runs what is left, the hung check included.
            Err(BedError::OuterHung {
                during,
                tail,
                finished,
            }) if attempt < opts.attempts => {
                let line = format!(
                    "boot {attempt}: the outer kernel locked up{during} after {} finished check(s); last console line: {}",
                    finished.len(),
                    tail.lines().last().unwrap_or("")
                );
                (opts.progress)(&format!("{line}; booting a fresh outer VM for the rest"));
                retried.push(line);
                results.extend(finished);
            }
            Err(e) => return Err(e),
        }
    }
    let run = start.elapsed();
    // A check the outer VM never reported is a failure, not a pass.
    let by_name: BTreeMap<_, _> = results.iter().map(|r| (r.name.clone(), r)).collect();
    let checks = checks
        .iter()
        .map(|c| {
            by_name.get(c).map_or_else(
                || CheckResult {
                    name: c.clone(),
                    status: -1,
                    output: "(no result reported)".into(),
                },
                |r| (*r).clone(),
            )
        })
        .collect();
    Ok(Report {
        checks,
        build,
        run,
        retried,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_markers_become_results() {
        let console = "boot noise\r\n@@NESTED READY 6.1 2 cpus\n@@NESTED BEGIN a\nline 1\r\n\
                       @@NESTED END a 0\n@@NESTED BEGIN b\noops\n@@NESTED END b 1\n\
                       @@NESTED BEGIN c\nhalf\n";
        let (r, done) = parse_console(console);
        assert!(!done);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].name.as_str(), r[0].status), ("a", 0));
        assert_eq!(r[0].output, "line 1\n");
        assert!(r[0].passed() && !r[1].passed());
        let (_, done) = parse_console("@@NESTED DONE\n");
        assert!(done);
        // An END for another check than the one begun is not a result.
        let (r, _) = parse_console("@@NESTED BEGIN a\n@@NESTED END b 0\n");
        assert!(r.is_empty());
    }

    #[test]
    fn kernel_lines_and_the_running_check_are_told_apart() {
        assert!(is_kernel_line(
            "[   59.909216] rcu: INFO: rcu_preempt detected stalls"
        ));
        assert!(is_kernel_line("[1437.224251] watchdog: BUG: soft lockup"));
        assert!(!is_kernel_line("test clone_clock_follows_the_host ... ok"));
        assert!(!is_kernel_line("[ok] not a timestamp"));
        assert!(!is_kernel_line("@@NESTED END a 0"));
        let console = "@@NESTED BEGIN a\n@@NESTED END a 0\n@@NESTED BEGIN b\nx\n";
        assert_eq!(running_check(console).as_deref(), Some("b"));
        assert_eq!(running_check("@@NESTED BEGIN a\n@@NESTED END a 0\n"), None);
    }

    #[test]
    fn a_lockup_report_followed_only_by_kernel_messages_is_a_hang() {
        let grace = Duration::from_millis(50);
        let long = Duration::from_secs(60);
        // Lockup, then silence: hung once the grace has passed.
        let (tx, rx) = mpsc::channel();
        tx.send("@@NESTED BEGIN a".to_string()).unwrap();
        tx.send("[  65.2] watchdog: BUG: soft lockup - CPU#1 stuck for 26s!".into())
            .unwrap();
        tx.send("[  85.1] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:".into())
            .unwrap();
        let (w, console) = watch_console(&rx, long, grace, &mut |_| {});
        assert_eq!(w, Watch::Hung);
        assert_eq!(running_check(&console).as_deref(), Some("a"));
        drop(tx);
        // A lockup report the checks outlive is no hang: QEMU ends normally.
        let (tx, rx) = mpsc::channel();
        for l in [
            "[  59.9] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
            "test x ... ok",
            "@@NESTED DONE",
        ] {
            tx.send(l.to_string()).unwrap();
        }
        drop(tx);
        let (w, _) = watch_console(&rx, long, grace, &mut |_| {});
        assert_eq!(w, Watch::Ended);
        // No lockup and no end: the deadline.
        let (_tx, rx) = mpsc::channel::<String>();
        let (w, _) = watch_console(&rx, Duration::from_millis(20), long, &mut |_| {});
        assert_eq!(w, Watch::Overran);
    }

    #[test]
    fn ldd_output_gives_library_paths() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(ldd),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn cargo_json_gives_executables() {
        let json = r#"{"reason":"compiler-artifact","target":{"name":"vm","kind":["test"]},"executable":"/t/vm-1"}
{"reason":"compiler-artifact","target":{"name":"e2e","kind":["lib"]},"executable":null}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            cargo_executables(json),
            vec![("vm".into(), "test".into(), PathBuf::from("/t/vm-1"))]
        );
    }

    #[test]
    fn every_check_script_is_selectable_and_unknown_ones_are_refused() {
        let all = select_checks(&[]).unwrap();
        assert!(all.contains(&"svm-info".to_string()), "{all:?}");
        assert!(matches!(
            select_checks(&["no-such-check".into()]),
            Err(BedError::UnknownCheck { .. })
        ));
    }
}
