//! The crate builds without `std`: compiles `tests/no_std_guest`, a no_std
//! panic=abort staticlib that depends on it with `default-features = false`
//! like the freestanding test guest. Any `std` in that dependency graph clashes
//! with its `#[panic_handler]` and fails the build.

use std::path::Path;
use std::process::Command;

#[test]
fn builds_for_a_no_std_guest() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/no_std_guest");
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("no_std_guest");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .arg("build")
        .arg("--quiet")
        .arg("--manifest-path")
        .arg(fixture.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .output()
        .expect("run cargo");
    assert!(
        output.status.success(),
        "no_std guest build failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
