//! Computes `MINIVMM_STATE_SCHEMA`: an identity of the saved-state schema.
//!
//! A template's state is postcard-encoded, which carries no field names: a
//! build whose state types differ would misread it with a confusing codec
//! error. The identity is a hash of every serde type definition (the item
//! after a `#[derive(..Serialize..)]` / `Deserialize`, comments and blank
//! lines left out) in `vmm` and `devices`, and of the kvm-bindings version
//! (whose structs are part of the state). Templates record it; a mismatch is
//! reported as "made by an incompatible build".

use std::fs;
use std::path::{Path, PathBuf};

/// 64-bit FNV-1a: enough to tell builds apart, needs no dependency.
fn fnv1a(hash: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *hash ^= u64::from(*b);
        *hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// The serde type definitions of one source file, normalized.
fn serde_items(source: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut current: Option<(String, i64, bool)> = None;
    for raw in source.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with("//") {
            continue;
        }
        if current.is_none()
            && line.starts_with("#[derive(")
            && (line.contains("Serialize") || line.contains("Deserialize"))
        {
            current = Some((String::new(), 0, false));
        }
        let Some((text, depth, started)) = current.as_mut() else {
            continue;
        };
        text.push_str(line);
        text.push('\n');
        if !*started && (line.contains("struct ") || line.contains("enum ")) {
            *started = true;
        }
        *depth += line.matches('{').count() as i64 - line.matches('}').count() as i64;
        let ended = *started && *depth <= 0 && (line.ends_with('}') || line.ends_with(';'));
        if ended {
            if let Some((text, _, _)) = current.take() {
                items.push(text);
            }
        }
    }
    items
}

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let roots = [manifest_dir.join("src"), manifest_dir.join("../devices")];
    let lock = manifest_dir.join("../Cargo.lock");
    let mut files = Vec::new();
    for root in &roots {
        println!("cargo:rerun-if-changed={}", root.display());
        rust_files(root, &mut files);
    }
    println!("cargo:rerun-if-changed={}", lock.display());
    files.sort();

    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for file in &files {
        let source = fs::read_to_string(file).unwrap_or_default();
        for item in serde_items(&source) {
            fnv1a(&mut hash, item.as_bytes());
        }
    }
    // The version of kvm-bindings in the lock file (its structs are saved as they are).
    let lock_text = fs::read_to_string(&lock).unwrap_or_default();
    let mut lines = lock_text.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "name = \"kvm-bindings\"" {
            if let Some(version) = lines.next() {
                fnv1a(&mut hash, version.trim().as_bytes());
            }
        }
    }
    println!("cargo:rustc-env=MINIVMM_STATE_SCHEMA=vmstate-{hash:016x}");
}
