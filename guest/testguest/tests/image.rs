//! Checks of the built guest image (host-side): the ELF layout the VMM relies
//! on, and that the kernel contains no instruction the PVM KVM of the
//! project's machines cannot emulate. The agent (section `.agent_image`, not
//! marked executable, so objdump leaves it alone) always runs natively and
//! may use any of them.
//!
//! That KVM executes the guest's supervisor code in the kernel's x86
//! instruction emulator, which supports the SSE moves (MOVUPS/MOVAPS/MOVUPD/
//! MOVAPD/MOVDQU/MOVDQA/MOVNTDQ) but no other SSE instruction (PXOR, XORPS,
//! MOVQ, MOVD, ... end the VM with KVM_INTERNAL_ERROR_EMULATION), nor
//! CMPXCHG16B, POPCNT, RDTSCP or XGETBV (all measured). The target enables
//! SSE2 and that cannot be changed per crate on stable Rust, so the code is
//! written to keep LLVM from emitting anything else (no zero-filling of
//! structs, no `[x; N]` array initialisers) and this test holds the line.
//! Needs `objdump` (binutils).

use std::path::{Path, PathBuf};
use std::process::Command;

/// SSE instructions the emulator executes.
const EMULATED_SSE: &[&str] = &[
    "movups", "movaps", "movupd", "movapd", "movdqu", "movdqa", "movntdq",
];
/// Other instructions measured to fail in the emulator.
const NOT_EMULATED: &[&str] = &["cmpxchg16b", "popcnt", "rdtscp", "xgetbv"];

/// Builds the release image into this test's own target directory.
fn build_image() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("image");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(manifest_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("run cargo");
    assert!(status.success(), "building the guest image failed");
    target_dir.join("release/testguest")
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

#[test]
fn image_layout_and_instructions() {
    let path = build_image();
    let elf = std::fs::read(&path).expect("read image");

    // ELF64, little endian, x86-64, ET_EXEC, entry at the load address.
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(elf[4], 2, "ELFCLASS64");
    assert_eq!(elf[5], 1, "little endian");
    assert_eq!(u16_at(&elf, 16), 2, "ET_EXEC");
    assert_eq!(u16_at(&elf, 18), 62, "EM_X86_64");
    assert_eq!(u64_at(&elf, 24), 0x20_0000, "e_entry");

    let phoff = u64_at(&elf, 32) as usize;
    let phentsize = usize::from(u16_at(&elf, 54));
    let phnum = usize::from(u16_at(&elf, 56));
    let mut notes = 0;
    let mut lowest = u64::MAX;
    for i in 0..phnum {
        let p = phoff + i * phentsize;
        let (kind, offset, vaddr, paddr, filesz, memsz) = (
            u32_at(&elf, p),
            u64_at(&elf, p + 8) as usize,
            u64_at(&elf, p + 16),
            u64_at(&elf, p + 24),
            u64_at(&elf, p + 32) as usize,
            u64_at(&elf, p + 40),
        );
        assert!(kind != 2 && kind != 3, "no PT_DYNAMIC / PT_INTERP");
        if kind == 1 {
            assert_eq!(vaddr, paddr, "PT_LOAD physical = virtual");
            assert!(
                paddr >= 0x20_0000 && paddr + memsz <= 0x100_0000,
                "PT_LOAD within 2..16 MiB"
            );
            lowest = lowest.min(paddr);
        }
        if kind == 4 {
            // Two notes "minivmm\0", namesz 8, descsz 0: type 0x4d560001
            // (direct AP start), then 0x4d560002 (PVM native mode).
            let note = &elf[offset..offset + filesz];
            assert_eq!(note.len(), 40);
            for (i, kind) in [0x4d56_0001, 0x4d56_0002].into_iter().enumerate() {
                let n = &note[20 * i..20 * (i + 1)];
                assert_eq!(u32_at(n, 0), 8);
                assert_eq!(u32_at(n, 4), 0);
                assert_eq!(u32_at(n, 8), kind);
                assert_eq!(&n[12..20], b"minivmm\0");
            }
            notes += 1;
        }
    }
    assert_eq!(notes, 1, "one PT_NOTE with the minivmm notes");
    assert_eq!(lowest, 0x20_0000);

    // The agent's bytes are data to objdump (it runs natively, SSE and all).
    let headers = Command::new("objdump")
        .arg("-h")
        .arg(&path)
        .output()
        .expect("objdump (binutils) is needed for this test");
    let headers = String::from_utf8_lossy(&headers.stdout);
    let mut lines = headers.lines();
    lines
        .find(|l| l.split_whitespace().nth(1) == Some(".agent"))
        .expect("an .agent section");
    let flags = lines.next().unwrap_or("");
    assert!(flags.contains("DATA") && !flags.contains("CODE"), "{flags}");

    let out = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", "-M", "att"])
        .arg(&path)
        .output()
        .expect("objdump (binutils) is needed for this test");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let mut bad = Vec::new();
    for line in text.lines() {
        // "  addr:\tmnemonic operands"
        let Some((_, insn)) = line.split_once(":\t") else {
            continue;
        };
        let mut parts = insn.split_whitespace();
        let mnemonic = parts.next().unwrap_or("");
        let operands = parts.collect::<Vec<_>>().join(" ");
        let sse =
            operands.contains("%xmm") || operands.contains("%ymm") || operands.contains("%mm");
        if (sse && !EMULATED_SSE.contains(&mnemonic)) || NOT_EMULATED.contains(&mnemonic) {
            bad.push(line.trim().to_string());
        }
    }
    assert!(
        bad.is_empty(),
        "instructions the PVM KVM cannot emulate:\n{}",
        bad.join("\n")
    );
}
