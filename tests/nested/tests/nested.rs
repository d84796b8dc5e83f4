//! The nested suite as part of `cargo test --workspace`: builds the outer
//! VM, runs every check in tests/nested/checks inside it, and fails on any
//! failed or unreported check. It never skips: without qemu-system-x86_64
//! it fails with the command that installs it.

#[test]
fn nested_suite_passes_on_svm_inside_qemu() {
    let report = match nested::run(nested::Options::new(Vec::new())) {
        Ok(report) => report,
        Err(e) => {
            if let nested::BedError::Deadline { finished, .. }
            | nested::BedError::EndedEarly { finished, .. }
            | nested::BedError::OuterHung { finished, .. } = &e
            {
                for c in finished {
                    eprintln!("nested: finished before: {} (status {})", c.name, c.status);
                }
            }
            panic!("nested test bed: {e}")
        }
    };
    let mut failed = Vec::new();
    for c in &report.checks {
        eprintln!(
            "nested: {} {} (status {})",
            if c.passed() { "PASS" } else { "FAIL" },
            c.name,
            c.status
        );
        if !c.passed() {
            eprintln!("{}", c.output);
            failed.push(c.name.as_str());
        }
    }
    for r in &report.retried {
        eprintln!("nested: retried: {r}");
    }
    eprintln!(
        "nested: build {:.0} s, outer VM {:.0} s",
        report.build.as_secs_f64(),
        report.run.as_secs_f64()
    );
    assert!(failed.is_empty(), "failed nested checks: {failed:?}");
}
