//! `minivmm image linux` on bad input: exit 1, the error as the last stderr
//! line (progress lines come before it), and nothing left behind.

use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_minivmm");

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("minivmm-image-cli-{}-{name}", std::process::id()))
}

fn minivmm(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run minivmm")
}

fn assert_failed_with(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("minivmm: ") && last.contains(needle),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "no summary on failure");
}

#[test]
fn missing_kernel_deb_is_one_line_and_creates_nothing() {
    let out_dir = temp_path("missing-out");
    let cache = temp_path("missing-cache");
    let deb = temp_path("nope.deb");
    let out = minivmm(&[
        "image",
        "linux",
        "--out",
        out_dir.to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
        "--kernel-deb",
        deb.to_str().unwrap(),
    ]);
    assert_failed_with(&out, deb.to_str().unwrap());
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    assert!(!out_dir.exists());
    assert!(!cache.exists());
}

#[test]
fn corrupt_kernel_deb_leaves_no_output_and_no_extraction() {
    let out_dir = temp_path("corrupt-out");
    let cache = temp_path("corrupt-cache");
    let deb = temp_path("corrupt.deb");
    std::fs::write(&deb, b"!<arch>\nnot really a package\n").unwrap();
    let out = minivmm(&[
        "image",
        "linux",
        "--out",
        out_dir.to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
        "--kernel-deb",
        deb.to_str().unwrap(),
    ]);
    assert_failed_with(&out, "dpkg-deb");
    assert!(!out_dir.exists());
    let leftovers: Vec<_> = std::fs::read_dir(&cache)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "left in the cache: {leftovers:?}");
    let _ = std::fs::remove_dir_all(&cache);
    std::fs::remove_file(&deb).unwrap();
}
