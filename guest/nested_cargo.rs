// Shared by the guest build scripts (guest/image, guest/linux-image,
// guest/testguest) with `include!`: each builds another crate with a nested
// cargo, and build scripts cannot share a library crate cheaply.

/// Ask cargo to rerun the build script when anything under `dir` (but its
/// `target` folders) changes.
fn watch(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.file_name().is_some_and(|n| n == "target") {
            continue;
        }
        if p.is_dir() {
            watch(&p);
        } else {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
}

/// Remove the outer build's configuration (its `CARGO_*` variables but
/// `CARGO_HOME`, its rustc flags and wrappers) from a nested cargo's
/// environment: the inner crate has its own target, flags and link arguments.
fn scrub_outer_build_env(cmd: &mut std::process::Command) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().to_string();
        if k.starts_with("CARGO_") && k != "CARGO_HOME"
            || k == "RUSTFLAGS"
            || k == "RUSTC_WRAPPER"
            || k == "RUSTC_WORKSPACE_WRAPPER"
            || k == "RUSTDOCFLAGS"
        {
            cmd.env_remove(&k);
        }
    }
}
