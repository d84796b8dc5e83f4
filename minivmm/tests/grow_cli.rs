//! `minivmm clone --vcpus N --mem-mib M` as a user runs it (issue 10's
//! acceptance commands): a 1 vCPU / 256 MiB template, a clone grown to
//! 2 vCPUs / 512 MiB kept running, and `minivmm agent ... details` on it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;

mod common;

use common::{minivmm, BIN, DEADLINE};

/// A directory removed when dropped.
struct Dir(std::path::PathBuf);

impl Dir {
    fn new(base: &str, name: &str) -> Dir {
        let d = std::path::Path::new(base)
            .join(format!("minivmm-cli-grow-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        Dir(d)
    }

    fn s(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The value of `key: value` in `details` output.
fn field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("no {key} in {text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_kept_clone_grown_to_2_vcpus_and_512_mib_reports_them() {
    let d = Dir::new("/dev/shm", "tpl");
    let v = Dir::new(&std::env::temp_dir().to_string_lossy(), "vsock");
    std::fs::create_dir_all(&v.0).unwrap();
    let out = minivmm(&["template", "create", "--dir", d.s()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let memory_before = std::fs::read(d.0.join("memory")).unwrap();

    let mut clone = Command::new(BIN)
        .args([
            "clone",
            "--template",
            d.s(),
            "--vcpus",
            "2",
            "--mem-mib",
            "512",
        ])
        .args(["--vsock-dir", v.s(), "--keep"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn clone");
    // Wait for the "grown" line (the clone is then ready and grown).
    let stdout = clone.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let grown = loop {
        match rx.recv_timeout(DEADLINE) {
            Ok(l) if l.contains("grown to 2 vCPUs, 512 MiB") => break true,
            Ok(l) => lines.push(l),
            Err(_) => break false,
        }
    };
    let details = if grown {
        Some(minivmm(&[
            "agent",
            "--vsock",
            v.0.join("clone-0.vsock").to_str().unwrap(),
            "details",
        ]))
    } else {
        None
    };
    let _ = clone.kill();
    let _ = clone.wait();
    assert!(grown, "clone never said it grew: {lines:?}");
    let details = details.unwrap();
    let text = String::from_utf8_lossy(&details.stdout);
    assert!(details.status.success(), "{text}");
    assert_eq!(field(&text, "online_vcpus"), 2, "{text}");
    assert!(field(&text, "memory_bytes") >= 512 << 20, "{text}");
    // The added memory is anonymous: the template file is unchanged.
    assert!(std::fs::read(d.0.join("memory")).unwrap() == memory_before);

    // Shrinking is a one-line error.
    let out = minivmm(&["clone", "--template", d.s(), "--mem-mib", "128"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("can grow but not shrink"), "{stderr}");
}
