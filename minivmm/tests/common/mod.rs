//! Helpers shared by the `minivmm` command's integration tests: running the
//! binary with a deadline so a stuck VM fails the test instead of hanging it.

// Each test file compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The `minivmm` binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_minivmm");
/// How long any one minivmm run or awaited line may take.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Run minivmm with `args` to completion; it is killed if it outlives DEADLINE.
pub fn minivmm(args: &[&str]) -> Output {
    let child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn minivmm");
    wait_output(child)
}

/// Collect `child`'s output; it is killed (and the test fails) past DEADLINE.
pub fn wait_output(child: Child) -> Output {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(out) => out.expect("wait for minivmm"),
        Err(_) => {
            signal(pid, libc::SIGKILL);
            panic!("minivmm (pid {pid}) did not finish within {DEADLINE:?}");
        }
    }
}

/// Send `sig` to `pid`.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child we spawned and have not reaped yet.
    unsafe { libc::kill(pid as i32, sig) };
}
