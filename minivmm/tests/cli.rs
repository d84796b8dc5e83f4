//! The `minivmm` command as a user runs it: real VMs, and bad input that must
//! give a one-line error naming the problem, never a panic.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_minivmm");
const DEADLINE: Duration = Duration::from_secs(60);

fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("minivmm-cli-{}-{name}", std::process::id()))
}

/// Run minivmm with `args`; the process is killed if it outlives DEADLINE.
fn minivmm(args: &[&str]) -> Output {
    let child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn minivmm");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(out) => out.expect("wait for minivmm"),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("minivmm {args:?} did not finish within {DEADLINE:?}");
        }
    }
}

/// Assert a failure with exit code 1 and one stderr line containing `needle`.
fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    assert!(lines[0].starts_with("minivmm: "), "{stderr}");
    assert!(
        lines[0].contains(needle),
        "expected {needle:?} in: {stderr}"
    );
}

#[test]
fn run_prints_ready_and_exits_cleanly_on_reset() {
    let out = minivmm(&["run", "--console", "stdout", "--cmdline", "action=reset"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("minivmm-testguest ready"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("guest reset"));
}

#[test]
fn console_to_a_file() {
    let path = temp_path("console.log");
    let out = minivmm(&[
        "run",
        "--console",
        path.to_str().unwrap(),
        "--cmdline",
        "action=reset",
    ]);
    assert!(out.status.success(), "{out:?}");
    let log = std::fs::read_to_string(&path).unwrap();
    assert!(log.contains("minivmm-testguest ready"), "{log}");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn streams_console_while_running() {
    // A counting guest never ends by itself: read lines as they stream, then kill it.
    let mut child = Command::new(BIN)
        .args(["run", "--cmdline", "action=count"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut got = false;
    while let Ok(line) = rx.recv_timeout(DEADLINE) {
        if line == "count 100" {
            got = true;
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(got, "no 'count 100' line streamed");
}

#[test]
fn bad_kernels() {
    assert_one_line_error(
        &minivmm(&["run", "--kernel", "/nonexistent/kernel"]),
        "/nonexistent/kernel",
    );
    let junk = temp_path("junk-kernel");
    std::fs::write(&junk, b"this is not a kernel at all, just text").unwrap();
    assert_one_line_error(
        &minivmm(&["run", "--kernel", junk.to_str().unwrap()]),
        "not an ELF or bzImage",
    );
    std::fs::remove_file(&junk).unwrap();

    // A file bigger than guest RAM.
    let big = temp_path("big-kernel");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    assert_one_line_error(
        &minivmm(&["run", "--kernel", big.to_str().unwrap(), "--mem-mib", "32"]),
        "larger than guest RAM",
    );
    std::fs::remove_file(&big).unwrap();
}

#[test]
fn bad_sizes() {
    assert_one_line_error(&minivmm(&["run", "--vcpus", "0"]), "invalid vCPU count 0");
    assert_one_line_error(&minivmm(&["run", "--mem-mib", "100000000"]), "out of range");
    assert_one_line_error(&minivmm(&["run", "--mem-mib", "1"]), "out of range");
}

#[test]
fn bad_memory_files() {
    let small = temp_path("small-mem");
    std::fs::write(&small, vec![0u8; 1 << 20]).unwrap();
    assert_one_line_error(
        &minivmm(&["run", "--memory-file", small.to_str().unwrap(), "--private"]),
        "is 1048576 bytes, guest RAM needs 268435456",
    );
    std::fs::remove_file(&small).unwrap();
    // /proc does not take new files, even for root.
    assert_one_line_error(
        &minivmm(&["run", "--memory-file", "/proc/minivmm-ram", "--shared"]),
        "/proc/minivmm-ram",
    );
    let out = minivmm(&["run", "--memory-file", "/tmp/x"]);
    assert_one_line_error(&out, "--shared or --private");
}

#[test]
fn no_kvm_access_is_a_clear_error() {
    // Drop to an unprivileged user, who may not open /dev/kvm (mode 0600 root).
    let Ok(out) = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            BIN,
            "run",
        ])
        .output()
    else {
        panic!("setpriv (util-linux) is needed for this test");
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot open /dev/kvm"), "{stderr}");
}

#[test]
fn info_reports_flavour_as_json() {
    let out = minivmm(&["info", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"flavour\""), "{text}");
    assert!(text.contains("\"api_version\": 12"), "{text}");
}

#[test]
fn guest_export_writes_the_elf() {
    let path = temp_path("guest.elf");
    let out = minivmm(&["guest", "export", path.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..4], b"\x7fELF");
    // And it boots as an explicit --kernel.
    let out = minivmm(&[
        "run",
        "--kernel",
        path.to_str().unwrap(),
        "--cmdline",
        "action=reset",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("minivmm-testguest ready"));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn agent_without_a_vm_says_so_in_one_line() {
    let sock = temp_path("no-vm.vsock");
    assert_one_line_error(
        &minivmm(&["agent", "--vsock", sock.to_str().unwrap(), "check"]),
        "no VM listening at",
    );
}

#[test]
fn template_create_refuses_a_directory_not_on_tmpfs() {
    // The cargo target directory is on disk, not tmpfs.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("not-tmpfs-template");
    assert_one_line_error(
        &minivmm(&["template", "create", "--dir", dir.to_str().unwrap()]),
        "not tmpfs",
    );
}

#[test]
fn killing_template_create_never_leaves_an_accepted_template() {
    // Kill `template create` at many points of its run (each a different
    // delay); whatever it left must be refused by `template check` unless the
    // process had already finished successfully.
    let dir = format!("/dev/shm/minivmm-cli-kill-{}", std::process::id());
    let mut killed = 0;
    for step in 0..12u64 {
        // A committed template's memory is immutable: remove() unseals it.
        let _ = snapshot::template::remove(&dir);
        let mut child = Command::new(BIN)
            .args(["template", "create", "--dir", &dir, "--mem-mib", "64"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        // Spread the kills over the run (0..33 ms in 3 ms steps): wait for
        // the child's exit with that deadline, SIGKILL it if it still runs.
        let status = match rx.recv_timeout(Duration::from_millis(3 * step)) {
            Ok(s) => s.unwrap(),
            Err(_) => {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
                rx.recv().unwrap().unwrap()
            }
        };
        let check = minivmm(&["template", "check", "--dir", &dir]);
        if status.success() {
            assert!(
                check.status.success(),
                "a finished create left a bad template"
            );
        } else {
            killed += 1;
            assert!(
                !check.status.success(),
                "template check accepted a template whose create was killed (step {step})"
            );
        }
    }
    let _ = snapshot::template::remove(&dir);
    assert!(killed > 0, "no create was killed: the test proved nothing");
}

/// Runs a command other than minivmm and returns its output.
fn tool(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

#[test]
fn template_create_seals_check_cross_checks_and_rm_removes() {
    let base = format!("/dev/shm/minivmm-cli-seal-{}", std::process::id());
    let (d, d2, d3) = (
        base.clone(),
        format!("{base}-vcpus"),
        format!("{base}-fifo"),
    );
    for dir in [&d, &d2, &d3] {
        let _ = snapshot::template::remove(dir);
    }
    let out = minivmm(&["template", "create", "--dir", &d, "--mem-mib", "64"]);
    assert!(out.status.success(), "{out:?}");

    // `lsattr D/memory` shows the immutable flag.
    let memory = format!("{d}/memory");
    let lsattr = tool("lsattr", &[&memory]);
    let flags = String::from_utf8_lossy(&lsattr.stdout);
    let flags = flags.split_whitespace().next().unwrap_or_default();
    assert!(flags.contains('i'), "lsattr: {lsattr:?}");
    let out = minivmm(&["template", "check", "--dir", &d]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("memory immutable"),
        "{out:?}"
    );

    // Guest RAM mapped shared over a template's memory is refused.
    assert_one_line_error(
        &minivmm(&["run", "--memory-file", &memory, "--shared"]),
        &memory,
    );

    // A copy whose manifest says 2 vCPUs while its state has 1.
    assert!(tool("cp", &["-r", &d, &d2]).status.success());
    let manifest = format!("{d2}/manifest");
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(text.contains("\"vcpus\": 1,"), "{text}");
    std::fs::write(
        &manifest,
        text.replacen("\"vcpus\": 1,", "\"vcpus\": 2,", 1),
    )
    .unwrap();
    assert_one_line_error(&minivmm(&["template", "check", "--dir", &d2]), "vcpus");

    // A FIFO named manifest: refused at once, never waited on.
    assert!(tool("cp", &["-r", &d, &d3]).status.success());
    let fifo = format!("{d3}/manifest");
    std::fs::remove_file(&fifo).unwrap();
    assert!(tool("mkfifo", &[&fifo]).status.success());
    assert_one_line_error(
        &minivmm(&["template", "check", "--dir", &d3]),
        "not a regular file",
    );

    // `template rm` removes it all, immutable memory included.
    for dir in [&d, &d2, &d3] {
        let out = minivmm(&["template", "rm", "--dir", dir]);
        assert!(out.status.success(), "{out:?}");
        assert!(!std::path::Path::new(dir).exists(), "{dir} still exists");
    }
}
