//! Confinement, limits and cleanup of the `minivmm` command: seccomp on every
//! thread, the open-file limit and clone counts, sockets removed on signals
//! and never taken from another run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

mod common;

use common::{minivmm, signal, wait_output, BIN, DEADLINE};

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("minivmm-limits-{}-{name}", std::process::id()))
}

/// A running minivmm whose stderr (or stdout) lines arrive on a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    /// Start minivmm `args` (through `prefix`, e.g. prlimit, if given),
    /// watching stderr, or stdout if `watch_stdout`.
    fn start(prefix: &[&str], args: &[&str], watch_stdout: bool) -> Running {
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let mut child = cmd
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn minivmm");
        let (tx, lines) = mpsc::channel();
        let (watched, other): (Box<dyn std::io::Read + Send>, Box<dyn std::io::Read + Send>) =
            if watch_stdout {
                (
                    Box::new(child.stdout.take().unwrap()),
                    Box::new(child.stderr.take().unwrap()),
                )
            } else {
                (
                    Box::new(child.stderr.take().unwrap()),
                    Box::new(child.stdout.take().unwrap()),
                )
            };
        std::thread::spawn(move || {
            for line in BufReader::new(watched).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Keep the other stream drained so the child never blocks on it.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut BufReader::new(other), &mut std::io::sink());
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Wait for a line containing any of `needles`; None if the stream ended.
    fn wait_line(&mut self, needles: &[&str]) -> Option<String> {
        loop {
            match self.lines.recv_timeout(DEADLINE) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if needles.iter().any(|n| line.contains(n)) {
                        return Some(line);
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    signal(self.child.id(), libc::SIGKILL);
                    panic!(
                        "no line with {needles:?} within {DEADLINE:?}; saw {:?}",
                        self.seen
                    );
                }
            }
        }
    }

    /// Send `sig` and wait for the exit status.
    fn stop(mut self, sig: i32) -> std::process::ExitStatus {
        signal(self.child.id(), sig);
        let pid = self.child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(self.child.wait());
        });
        match rx.recv_timeout(DEADLINE) {
            Ok(status) => status.expect("wait"),
            Err(_) => {
                signal(pid, libc::SIGKILL);
                panic!("minivmm did not end within {DEADLINE:?} of signal {sig}");
            }
        }
    }
}

/// A template in /dev/shm (tmpfs), removed when dropped.
struct TestTemplate(PathBuf);

impl TestTemplate {
    fn create(name: &str) -> TestTemplate {
        let dir = PathBuf::from(format!(
            "/dev/shm/minivmm-limits-{}-{name}",
            std::process::id()
        ));
        let out = minivmm(&[
            "template",
            "create",
            "--dir",
            dir.to_str().unwrap(),
            "--mem-mib",
            "64",
        ]);
        assert!(out.status.success(), "template create: {out:?}");
        TestTemplate(dir)
    }

    fn dir(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TestTemplate {
    fn drop(&mut self) {
        let _ = minivmm(&["template", "rm", "--dir", self.dir()]);
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn every_thread_of_a_running_vm_is_under_seccomp() {
    let socket = temp_path("seccomp.vsock");
    let console = temp_path("seccomp.console");
    let mut run = Running::start(
        &[],
        &[
            "run",
            "--vsock",
            socket.to_str().unwrap(),
            "--console",
            "stdout",
        ],
        true,
    );
    run.wait_line(&["minivmm-testguest ready"])
        .expect("the guest became ready");
    // Every thread the VM has by now: main, vCPU, device loop, console.
    let pid = run.child.id();
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let name = status.lines().next().unwrap_or_default().to_owned();
        let mode = status
            .lines()
            .find(|l| l.starts_with("Seccomp:"))
            .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_owned());
        threads.push((name, mode));
    }
    assert!(threads.len() >= 3, "{threads:?}");
    for (name, mode) in &threads {
        assert_eq!(mode.as_deref(), Some("2"), "thread {name}: {threads:?}");
    }
    // The agent still answers through the filtered threads.
    let out = minivmm(&["agent", "--vsock", socket.to_str().unwrap(), "check"]);
    assert!(out.status.success(), "{out:?}");
    // A signal ends it cleanly, socket removed.
    assert!(run.stop(libc::SIGTERM).success());
    assert!(!socket.exists(), "the vsock socket was left behind");
    let _ = std::fs::remove_file(console);
}

#[test]
fn seccomp_off_leaves_threads_unfiltered() {
    let mut run = Running::start(&[], &["run", "--seccomp=off", "--console", "stdout"], true);
    run.wait_line(&["minivmm-testguest ready"])
        .expect("the guest became ready");
    let pid = run.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("Seccomp:\t0"), "{status}");
    assert!(run.stop(libc::SIGINT).success());
}

#[test]
fn hundred_clones_at_1024_open_files_are_refused_up_front_or_all_run() {
    let t = TestTemplate::create("fdlimit");
    let vsock_dir = temp_path("fdlimit-sockets");
    std::fs::create_dir_all(&vsock_dir).unwrap();
    let mut clone = Running::start(
        &["prlimit", "--nofile=1024:1024", "--"],
        &[
            "clone",
            "--template",
            t.dir(),
            "--count",
            "100",
            "--keep",
            "--vsock-dir",
            vsock_dir.to_str().unwrap(),
        ],
        false,
    );
    let line = clone
        .wait_line(&["clone(s) running", "open-file limit", "minivmm: "])
        .expect("minivmm said nothing");
    if line.contains("clone(s) running") {
        // All fit: every one of them is up.
        assert!(line.contains("100 clone(s) running"), "{line}");
        assert_eq!(entries(&vsock_dir).len(), 100);
        assert!(clone.stop(libc::SIGTERM).success());
    } else {
        // Refused before the bulk started, in one clear line.
        assert!(
            line.contains("100 clones do not fit in the open-file limit")
                && line.contains("limit is 1024"),
            "{line}"
        );
        assert_eq!(clone.wait_line(&["minivmm: "]), None, "{:?}", clone.seen);
        let status = clone.stop(0);
        assert_eq!(status.code(), Some(1));
    }
    assert_eq!(
        entries(&vsock_dir),
        Vec::<String>::new(),
        "sockets left behind"
    );
    std::fs::remove_dir(&vsock_dir).unwrap();
}

#[test]
fn kept_clones_own_their_sockets_and_remove_them_on_a_signal() {
    let t = TestTemplate::create("keep");
    let vsock_dir = temp_path("keep-sockets");
    std::fs::create_dir_all(&vsock_dir).unwrap();
    let dir = vsock_dir.to_str().unwrap();
    let keep = Running::start(
        &[],
        &[
            "clone",
            "--template",
            t.dir(),
            "--count",
            "2",
            "--keep",
            "--vsock-dir",
            dir,
        ],
        false,
    );
    let mut keep = keep;
    keep.wait_line(&["2 clone(s) running"])
        .expect("clones running");
    assert_eq!(entries(&vsock_dir), vec!["clone-0.vsock", "clone-1.vsock"]);
    // A second run with the same directory must not steal the live sockets.
    let out = minivmm(&["clone", "--template", t.dir(), "--vsock-dir", dir]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("another process is listening"), "{stderr}");
    let sock0 = vsock_dir.join("clone-0.vsock");
    let out = minivmm(&["agent", "--vsock", sock0.to_str().unwrap(), "check"]);
    assert!(
        out.status.success(),
        "the first run's clone lost its socket: {out:?}"
    );
    // SIGINT: clones stopped, sockets gone, clean exit.
    assert!(keep.stop(libc::SIGINT).success());
    assert_eq!(entries(&vsock_dir), Vec::<String>::new());
    std::fs::remove_dir(&vsock_dir).unwrap();
}

#[test]
fn a_killed_template_create_leaves_no_socket_for_long() {
    let dir = format!("/dev/shm/minivmm-limits-{}-killed", std::process::id());
    let mut create = Running::start(
        &[],
        &["template", "create", "--dir", &dir, "--mem-mib", "64"],
        false,
    );
    // The socket exists from here on (the agent is being called through it).
    create
        .wait_line(&["waiting for the guest agent"])
        .expect("template create got to the agent");
    let pid = create.child.id();
    let prefix = format!("minivmm-template-{pid}-");
    let tmp = std::env::temp_dir();
    let ours = || {
        entries(&tmp)
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect::<Vec<_>>()
    };
    let _ = create.stop(libc::SIGKILL);
    assert!(
        !ours().is_empty(),
        "kill -9 left no socket: nothing to test"
    );
    // The next minivmm that makes a temporary socket removes the dead one's.
    let t = TestTemplate::create("after-kill");
    assert_eq!(ours(), Vec::<String>::new(), "a killed run's socket stayed");
    drop(t);
    let _ = minivmm(&["template", "rm", "--dir", &dir]);
}

#[test]
fn a_failed_bench_clone_removes_its_temporary_template() {
    // Refused after the temporary template directory was made (the size
    // is checked when the template is built).
    let child = Command::new(BIN)
        .args([
            "bench",
            "clone",
            "--count",
            "1",
            "--cold-boots",
            "1",
            "--mem-mib",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn minivmm");
    let dir = PathBuf::from(format!("/dev/shm/minivmm-bench-{}", child.id()));
    let out = wait_output(child);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("building a temporary template"), "{stderr}");
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn a_failed_clone_in_keep_leaves_the_others_running() {
    let t = TestTemplate::create("keep-partial");
    let vsock_dir = temp_path("partial-sockets");
    std::fs::create_dir_all(&vsock_dir).unwrap();
    // Clone 1's socket path is taken by a live listener (this test's).
    let taken = vsock_dir.join("clone-1.vsock");
    let _listener = std::os::unix::net::UnixListener::bind(&taken).unwrap();
    let dir = vsock_dir.to_str().unwrap();
    let mut keep = Running::start(
        &[],
        &[
            "clone",
            "--template",
            t.dir(),
            "--count",
            "3",
            "--keep",
            "--vsock-dir",
            dir,
        ],
        false,
    );
    let failed = keep
        .wait_line(&["clone 1 failed"])
        .expect("clone 1 reported");
    assert!(failed.contains("another process is listening"), "{failed}");
    keep.wait_line(&["2 clone(s) running"])
        .expect("the other clones run");
    for name in ["clone-0.vsock", "clone-2.vsock"] {
        let sock = vsock_dir.join(name);
        let out = minivmm(&["agent", "--vsock", sock.to_str().unwrap(), "check"]);
        assert!(out.status.success(), "{name}: {out:?}");
    }
    // Stopped by a signal: exit 1 (one clone failed), its own sockets gone,
    // the listener's socket left alone.
    assert_eq!(keep.stop(libc::SIGTERM).code(), Some(1));
    assert_eq!(entries(&vsock_dir), vec!["clone-1.vsock"]);
    std::fs::remove_file(&taken).unwrap();
    std::fs::remove_dir(&vsock_dir).unwrap();
}
