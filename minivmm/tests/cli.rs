//! The `minivmm` command as a user runs it: real VMs, and bad input that must
//! give a one-line error naming the problem, never a panic.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

mod common;

use common::{minivmm, BIN, DEADLINE};

fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("minivmm-cli-{}-{name}", std::process::id()))
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
        &minivmm(&[
            "agent",
            "--vsock",
            sock.to_str().unwrap(),
            "--wait",
            "0",
            "check",
        ]),
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

/// A fresh directory for one test.
fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = temp_path(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Run minivmm with `args` and extra environment.
fn minivmm_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).envs(env.iter().copied());
    cmd.output().expect("run minivmm")
}

/// virtiofsd processes whose parent is `pid`.
fn virtiofsd_children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((comm, rest)) = stat.split_once(") ") else {
            continue;
        };
        let ppid = rest.split(' ').nth(1).and_then(|s| s.parse::<u32>().ok());
        if comm.ends_with("(virtiofsd") && ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

/// Processes whose command line mentions `needle` (e.g. a share directory).
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(format!("/proc/{p}/cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(needle) {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn share_bad_configurations_are_one_line_errors() {
    let dir = temp_dir("share-bad");
    let share = dir.to_str().unwrap();
    let missing = dir.join("missing");
    let out = minivmm(&["run", "--share", missing.to_str().unwrap()]);
    assert_one_line_error(&out, "is not a directory");
    let out = minivmm(&["run", "--share", share, "--share", share]);
    assert_one_line_error(&out, "share tag \"share\" is given twice");
    let out = minivmm_env(
        &["run", "--share", share],
        &[("MINIVMM_VIRTIOFSD", "/nonexistent/virtiofsd")],
    );
    assert_one_line_error(&out, "cargo install --locked virtiofsd");
    let long = dir.join("d".repeat(110));
    std::fs::create_dir_all(&long).unwrap();
    let out = minivmm_env(
        &["run", "--share", share],
        &[("TMPDIR", long.to_str().unwrap())],
    );
    assert_one_line_error(&out, "at most 107 fit a unix socket address");
    // Nothing was left running or on disk.
    assert!(processes_mentioning(share).is_empty());
    assert_eq!(std::fs::read_dir(&long).unwrap().count(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The commands of issue 8 exactly as written, then virtiofsd killed.
#[test]
fn share_read_write_list_through_the_cli_then_daemon_killed() {
    if let Err(e) = Command::new("virtiofsd").arg("--version").output() {
        panic!("virtiofsd is needed ({e}); install it: apt-get install -y libseccomp-dev libcap-ng-dev && cargo install --locked virtiofsd");
    }
    let dir = temp_dir("share");
    let share = dir.join("share");
    std::fs::create_dir(&share).unwrap();
    let mut big = vec![0u8; 4 << 20];
    factory::clone::host_entropy(&mut big).unwrap();
    std::fs::write(share.join("big.bin"), &big).unwrap();
    std::fs::create_dir(share.join("sub")).unwrap();
    std::fs::write(share.join("sub/a.txt"), b"a").unwrap();
    let vsock = dir.join("v.sock");
    let mut child = Command::new(BIN)
        .args(["run", "--share", share.to_str().unwrap(), "--vsock"])
        .arg(&vsock)
        .args(["--console", "stdout"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        let line = rx.recv_timeout(DEADLINE).expect("ready line");
        if line.contains("minivmm-testguest ready") {
            break;
        }
    }
    let agent = |args: &[&str], stdin: Option<&[u8]>| -> Output {
        let mut c = Command::new(BIN)
            .arg("agent")
            .arg("--vsock")
            .arg(&vsock)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = c.stdin.take().unwrap();
        if let Some(data) = stdin {
            std::io::Write::write_all(&mut input, data).unwrap();
        }
        drop(input);
        c.wait_with_output().unwrap()
    };
    let out = agent(&["fs-read", "big.bin"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == big, "fs-read is not byte-identical");

    let mut data = vec![0u8; 300_000];
    factory::clone::host_entropy(&mut data).unwrap();
    let out = agent(&["fs-write", "sub/new.bin"], Some(&data));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read(share.join("sub/new.bin")).unwrap() == data);
    // Overwriting with something shorter leaves exactly the new bytes.
    let out = agent(&["fs-write", "sub/new.bin"], Some(b"short"));
    assert!(out.status.success());
    assert_eq!(std::fs::read(share.join("sub/new.bin")).unwrap(), b"short");

    let out = agent(&["fs-ls", "sub"], None);
    assert!(out.status.success());
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    names.sort();
    assert_eq!(names, ["a.txt", "new.bin"]);
    let out = agent(&["fs-ls", "."], None);
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    names.sort();
    let mut host: Vec<String> = std::fs::read_dir(&share)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    host.sort();
    assert_eq!(names, host);
    let out = agent(&["fs-read", "no-such-file"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT_FOUND"));
    let out = agent(&["fs-mkdir", "sub/dir"], None);
    assert!(out.status.success());
    assert!(share.join("sub/dir").is_dir());
    let out = agent(&["fs-rm", "sub/new.bin"], None);
    assert!(out.status.success());
    assert!(!share.join("sub/new.bin").exists());

    // The daemon dies: minivmm stops the VM and says which daemon it was.
    let daemons = virtiofsd_children(pid);
    assert_eq!(daemons.len(), 1, "one virtiofsd per share");
    // SAFETY: kill(2) on a process we found as minivmm's child.
    unsafe { libc::kill(daemons[0] as i32, libc::SIGKILL) };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx.recv_timeout(DEADLINE).expect("minivmm exits").unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("virtiofsd for share \"share\"") && stderr.contains("exited unexpectedly"),
        "{stderr}"
    );
    assert!(processes_mentioning(share.to_str().unwrap()).is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn share_run_ends_cleanly_when_the_guest_resets() {
    let dir = temp_dir("share-reset");
    let out = minivmm(&[
        "run",
        "--share",
        dir.to_str().unwrap(),
        "--console",
        "stdout",
        "--cmdline",
        "action=reset",
    ]);
    // virtiofsd ends by itself when the VM disconnects: not an error.
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("guest reset"));
    assert!(processes_mentioning(dir.to_str().unwrap()).is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Run `args` (which name files that do not exist yet), expect a one-line
/// error with `needle` (after any progress lines of `template create`), and
/// check that the failed run left none of `left` behind.
fn assert_fails_leaving_nothing(args: &[&str], needle: &str, left: &[&std::path::Path]) {
    let out = minivmm(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let progress = |l: &&str| {
        ["booting", "waiting", "quiescing", "pausing", "committing"]
            .iter()
            .any(|p| l.starts_with(&format!("minivmm: {p}")))
    };
    let errors: Vec<&str> = stderr.lines().filter(|l| !progress(l)).collect();
    assert_one_line_error(
        &Output {
            stderr: errors.join("\n").into_bytes(),
            ..out
        },
        needle,
    );
    for path in left {
        assert!(!path.exists(), "{} was left behind", path.display());
    }
}

#[test]
fn bad_initrds_are_one_line_errors_and_leave_nothing_behind() {
    let sock = temp_path("initrd.vsock");
    let console = temp_path("initrd-console.log");
    let run = |initrd: &str, mem: &str, needle: &str| {
        assert_fails_leaving_nothing(
            &[
                "run",
                "--initrd",
                initrd,
                "--mem-mib",
                mem,
                "--vsock",
                sock.to_str().unwrap(),
                "--console",
                console.to_str().unwrap(),
            ],
            needle,
            &[&sock, &console],
        )
    };
    run(
        "/nonexistent/initrd.img",
        "256",
        "cannot read initrd /nonexistent/initrd.img",
    );

    let empty = temp_path("empty-initrd");
    std::fs::write(&empty, b"").unwrap();
    run(empty.to_str().unwrap(), "256", "is empty");

    // Not an archive: neither cpio nor any compressed stream Linux unpacks.
    let text = temp_path("text-initrd");
    std::fs::write(
        &text,
        b"#!/bin/sh\necho this is a script, not an initramfs\n",
    )
    .unwrap();
    run(text.to_str().unwrap(), "256", "is not a cpio archive");

    // A gzip stream (by its magic) of 48 MiB cannot fit above the kernel in 32 MiB of RAM.
    let big = temp_path("big-initrd");
    let mut f = std::fs::File::create(&big).unwrap();
    std::io::Write::write_all(&mut f, &[0x1f, 0x8b, 8, 0]).unwrap();
    f.set_len(48 << 20).unwrap();
    drop(f);
    run(big.to_str().unwrap(), "32", "only");

    for p in [&empty, &text, &big] {
        std::fs::remove_file(p).unwrap();
    }
}

#[test]
fn a_command_line_too_long_for_boot_params_is_a_one_line_error() {
    let sock = temp_path("cmdline.vsock");
    let long = "a".repeat(5000);
    assert_fails_leaving_nothing(
        &["run", "--cmdline", &long, "--vsock", sock.to_str().unwrap()],
        "longer than the kernel's limit of 4096",
        &[&sock],
    );
}

#[test]
fn template_create_with_a_bad_initrd_creates_nothing() {
    let dir = format!("/dev/shm/minivmm-cli-bad-initrd-{}", std::process::id());
    let text = temp_path("template-text-initrd");
    std::fs::write(&text, b"not an archive").unwrap();
    assert_fails_leaving_nothing(
        &[
            "template",
            "create",
            "--dir",
            &dir,
            "--initrd",
            text.to_str().unwrap(),
        ],
        "is not a cpio archive",
        &[std::path::Path::new(&dir)],
    );
    // Too large for RAM: found only when the VM loads it, after the
    // directory was made; it must be gone again.
    let big = temp_path("template-big-initrd");
    let mut f = std::fs::File::create(&big).unwrap();
    std::io::Write::write_all(&mut f, b"070701").unwrap();
    f.set_len(48 << 20).unwrap();
    drop(f);
    assert_fails_leaving_nothing(
        &[
            "template",
            "create",
            "--dir",
            &dir,
            "--mem-mib",
            "32",
            "--initrd",
            big.to_str().unwrap(),
        ],
        "only",
        &[std::path::Path::new(&dir)],
    );
    std::fs::remove_file(&text).unwrap();
    std::fs::remove_file(&big).unwrap();
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
