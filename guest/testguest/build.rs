//! Builds the image's two programs into one ELF.
//!
//! 1. The agent (`agent/`, user mode) is built with a nested cargo into
//!    OUT_DIR, and its loadable segments are flattened into `agent.bin`
//!    (from its link address `AGENT_START`, gaps zero-filled) plus
//!    `agent_layout.rs` / `agent_layout.ld` with its entry and extent. The
//!    kernel includes the bytes at `AGENT_START` (`usermode`), so the VMM
//!    loads one ELF as before. Two programs rather than one because the agent
//!    may use SSE and the kernel must not (see tests/image.rs): compiled
//!    together, they would share (and LLVM would mix) code.
//! 2. Link arguments for the kernel binary. They live here (not in a
//!    .cargo/config.toml) so that `cargo build --release --manifest-path
//!    .../guest/testguest/Cargo.toml` works from any directory with no
//!    environment. Only the `testguest` binary gets them: unit tests link as
//!    a normal host program.
//!
//! The agent build is deterministic and independent of where the tree and
//! the target directory are: paths that end up in panic messages are remapped.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the agent is linked (agent/agent.ld) and so loaded.
const AGENT_START: u64 = 0x60_0000;
/// Everything the guest owns ends here (`action=touch` starts at 16 MiB).
const IMAGE_LIMIT: u64 = 0x100_0000;

fn main() {
    let dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let script = dir.join("link.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=build.rs");
    println!(
        "cargo:rerun-if-changed={}",
        dir.join("Cargo.lock").display()
    );
    for watched in [
        "agent",
        "abi",
        "../../agent/protocol",
        "../../devices/vsock-wire",
    ] {
        watch(&dir.join(watched));
    }

    let agent_elf = build_agent(&dir, &out_dir);
    let elf = std::fs::read(&agent_elf)
        .unwrap_or_else(|e| panic!("reading the agent {}: {e}", agent_elf.display()));
    let flat = flatten(&elf).unwrap_or_else(|e| panic!("agent {}: {e}", agent_elf.display()));
    assert_eq!(
        flat.start, AGENT_START,
        "agent must be linked at {AGENT_START:#x}"
    );
    assert!(
        flat.end <= IMAGE_LIMIT,
        "agent ends at {:#x}, past 16 MiB",
        flat.end
    );
    let file_end = flat.start + flat.bytes.len() as u64;
    std::fs::write(out_dir.join("agent.bin"), &flat.bytes).expect("write agent.bin");
    std::fs::write(
        out_dir.join("agent_layout.rs"),
        format!(
            "/// Load address of the agent.\npub const AGENT_START: u64 = {:#x};\n\
             /// The agent's entry point (`_start`).\npub const AGENT_ENTRY: u64 = {:#x};\n\
             /// End of the agent's memory (its .bss included).\npub const AGENT_END: u64 = {:#x};\n",
            flat.start, flat.entry, flat.end
        ),
    )
    .expect("write agent_layout.rs");
    std::fs::write(
        out_dir.join("agent_layout.ld"),
        format!(
            "AGENT_START = {:#x};\nAGENT_BSS_SIZE = {:#x};\nAGENT_END = {:#x};\n",
            flat.start,
            flat.end - file_end,
            flat.end
        ),
    )
    .expect("write agent_layout.ld");

    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,norelro",
        "-Wl,-z,max-page-size=0x1000",
        "-Wl,-z,noexecstack",
        "-Wl,--no-dynamic-linker",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    // link.ld INCLUDEs agent_layout.ld from here.
    println!("cargo:rustc-link-arg-bins=-Wl,-L,{}", out_dir.display());
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
}

include!("../nested_cargo.rs");

/// Builds the agent (release) into OUT_DIR with a cargo of its own.
fn build_agent(dir: &Path, out_dir: &Path) -> PathBuf {
    let target_dir = out_dir.join("agent-target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(dir)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "testguest-agent",
            "--manifest-path",
        ])
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // Nothing of this build's configuration may leak into the agent's: it
    // has its own link arguments (agent/build.rs) and flags.
    scrub_outer_build_env(&mut cmd);
    let repo = dir
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| dir.join("../.."));
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let mut remaps = vec![(target_dir.clone(), "/agent-target"), (repo, "/minivmm")];
    if let Some(home) = cargo_home {
        remaps.push((home, "/cargo"));
    }
    let flags: Vec<String> = remaps
        .iter()
        .map(|(from, to)| format!("--remap-path-prefix={}={to}", from.display()))
        .collect();
    cmd.env("CARGO_ENCODED_RUSTFLAGS", flags.join("\u{1f}"));
    let status = cmd.status().expect("cannot run cargo to build the agent");
    if !status.success() {
        panic!("building the agent (guest/testguest/agent) failed: {status}");
    }
    target_dir.join("release/testguest-agent")
}

/// An ELF's loadable bytes as one flat block.
struct Flat {
    start: u64,
    entry: u64,
    /// End of memory (p_vaddr + p_memsz of the highest segment).
    end: u64,
    /// From `start` to the end of the last segment's file bytes.
    bytes: Vec<u8>,
}

fn flatten(elf: &[u8]) -> Result<Flat, String> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    let bad = || "not a little-endian ELF64 executable".to_string();
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err(bad());
    }
    let entry = u64_at(24).ok_or_else(bad)?;
    let phoff = u64_at(32).ok_or_else(bad)? as usize;
    let phentsize = usize::from(u16_at(54).ok_or_else(bad)?);
    let phnum = usize::from(u16_at(56).ok_or_else(bad)?);
    let mut segments = Vec::new();
    for i in 0..phnum {
        let p = phoff + i * phentsize;
        if u32_at(p).ok_or_else(bad)? != 1 {
            continue;
        }
        let offset = u64_at(p + 8).ok_or_else(bad)? as usize;
        let vaddr = u64_at(p + 16).ok_or_else(bad)?;
        let paddr = u64_at(p + 24).ok_or_else(bad)?;
        let filesz = u64_at(p + 32).ok_or_else(bad)? as usize;
        let memsz = u64_at(p + 40).ok_or_else(bad)?;
        if vaddr != paddr {
            return Err(format!("segment at {vaddr:#x} has p_paddr {paddr:#x}"));
        }
        let data = elf
            .get(offset..offset + filesz)
            .ok_or_else(|| format!("segment at {vaddr:#x} is outside the file"))?;
        segments.push((vaddr, data, memsz));
    }
    segments.sort_by_key(|s| s.0);
    let start = segments.first().ok_or("no PT_LOAD segment")?.0;
    let mut bytes = Vec::new();
    let mut end = start;
    for (vaddr, data, memsz) in segments {
        if vaddr < start + bytes.len() as u64 {
            return Err(format!("segment at {vaddr:#x} overlaps the one before"));
        }
        if !data.is_empty() {
            bytes.resize((vaddr - start) as usize, 0);
            bytes.extend_from_slice(data);
        }
        end = end.max(vaddr + memsz);
    }
    Ok(Flat {
        start,
        entry,
        end,
        bytes,
    })
}
