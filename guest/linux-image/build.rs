//! Builds the Linux guest agent (agent/linux) as a static executable with a
//! nested cargo, and leaves it in OUT_DIR for `include_bytes!`: it becomes
//! `/init` of the Linux guest image, where no shared libraries exist.

use std::path::PathBuf;
use std::process::Command;

include!("../nested_cargo.rs");

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let agent_dir = manifest_dir.join("../../agent/linux");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let target_dir = out_dir.join("agent-target");
    watch(&agent_dir);
    watch(&manifest_dir.join("../../agent/protocol"));

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--bin", "minivmm-linux-agent"])
        .arg("--manifest-path")
        .arg(agent_dir.join("Cargo.toml"))
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .arg("--target-dir")
        .arg(&target_dir);
    // Nothing of the outer build's configuration may leak in; the agent gets
    // exactly one flag: static linking (with --target it applies to the
    // agent only, not to build scripts and proc macros).
    scrub_outer_build_env(&mut cmd);
    cmd.env("RUSTFLAGS", "-C target-feature=+crt-static");
    let status = cmd
        .status()
        .expect("cannot run cargo to build the Linux guest agent");
    if !status.success() {
        panic!("building the Linux guest agent (agent/linux) failed: {status}");
    }
    let bin = target_dir.join("x86_64-unknown-linux-gnu/release/minivmm-linux-agent");
    std::fs::copy(&bin, out_dir.join("minivmm-linux-agent"))
        .unwrap_or_else(|e| panic!("Linux agent {} missing: {e}", bin.display()));
}
