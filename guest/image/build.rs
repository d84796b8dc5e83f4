//! Builds the freestanding test guest (guest/testguest, outside the workspace
//! because it needs panic=abort, its own linker script and no std) with a
//! nested cargo, and leaves the ELF in OUT_DIR for `include_bytes!`.

use std::path::PathBuf;
use std::process::Command;

include!("../nested_cargo.rs");

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let guest_dir = manifest_dir.join("../testguest");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let target_dir = out_dir.join("testguest-target");
    watch(&guest_dir);
    // The guest uses the agent protocol crate; rebuild when it changes.
    watch(&manifest_dir.join("../../agent/protocol"));
    watch(&manifest_dir.join("../../devices/vsock-wire"));

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest_dir)
        .args(["build", "--release", "--manifest-path"])
        .arg(guest_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // Nothing of the outer build's configuration may leak into the guest's:
    // it has its own flags (build.rs of the guest) and target.
    scrub_outer_build_env(&mut cmd);
    let status = cmd
        .status()
        .expect("cannot run cargo to build the test guest");
    if !status.success() {
        panic!("building the test guest (guest/testguest) failed: {status}");
    }
    let elf = target_dir.join("x86_64-unknown-linux-gnu/release/testguest");
    let elf = if elf.exists() {
        elf
    } else {
        target_dir.join("release/testguest")
    };
    std::fs::copy(&elf, out_dir.join("testguest.elf"))
        .unwrap_or_else(|e| panic!("test guest ELF {} missing: {e}", elf.display()));
}
