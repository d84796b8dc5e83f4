//! `minivmm factory init|status|destroy` and `minivmm get-vm` as a user runs
//! them: real templates and VMs, output and exit status checked.

use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_minivmm");

fn minivmm(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run minivmm")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{o:?}");
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

/// A config whose template lives under /dev/shm; removes both on drop.
struct Config {
    path: PathBuf,
    template: PathBuf,
}

impl Config {
    fn new(name: &str) -> Config {
        let base = PathBuf::from(format!(
            "/dev/shm/minivmm-cli-{}-{name}",
            std::process::id()
        ));
        let template = base.join("template");
        let path =
            std::env::temp_dir().join(format!("minivmm-cli-{}-{name}.toml", std::process::id()));
        std::fs::write(
            &path,
            format!(
                "[hypervisor]\ndefault_vcpus = 1\ndefault_memory = 128\n\n\
                 [factory]\nenable_template = true\ntemplate_path = \"{}\"\nvm_cache_number = 4\n",
                template.display()
            ),
        )
        .expect("write config");
        Config { path, template }
    }

    fn arg(&self) -> &str {
        self.path.to_str().expect("utf-8 path")
    }
}

impl Drop for Config {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.template.parent().expect("parent"));
        let _ = std::fs::remove_file(&self.path);
    }
}

#[test]
fn factory_init_status_destroy_round_trip() {
    let c = Config::new("round-trip");
    let before = json(&minivmm(&[
        "factory",
        "status",
        "--config",
        c.arg(),
        "--json",
    ]));
    assert_eq!(before["template"]["valid"], false, "{before}");
    assert!(before["template"]["error"].is_string(), "{before}");

    let init = minivmm(&["factory", "init", "--config", c.arg()]);
    assert!(init.status.success(), "{init:?}");
    let s = json(&minivmm(&[
        "factory",
        "status",
        "--config",
        c.arg(),
        "--json",
    ]));
    assert_eq!(s["template"]["valid"], true, "{s}");
    assert_eq!(s["template"]["matches_config"], true, "{s}");
    assert_eq!(s["template"]["vcpus"], 1, "{s}");
    assert_eq!(s["template"]["mem_mib"], 128, "{s}");
    assert_eq!(s["cache"]["vm_cache_number"], 4, "{s}");
    assert_eq!(s["cache"]["server_running"], false, "{s}");
    let text = stdout(&minivmm(&["factory", "status", "--config", c.arg()]));
    assert!(text.contains("valid: 1 vCPU(s), 128 MiB"), "{text}");

    // A second init finds the template in place.
    let again = minivmm(&["factory", "init", "--config", c.arg()]);
    assert!(stdout(&again).contains("already initialized"), "{again:?}");

    let destroy = minivmm(&["factory", "destroy", "--config", c.arg()]);
    assert!(destroy.status.success(), "{destroy:?}");
    assert!(!c.template.exists());
    let after = json(&minivmm(&[
        "factory",
        "status",
        "--config",
        c.arg(),
        "--json",
    ]));
    assert_eq!(after["template"]["valid"], false, "{after}");
}

#[test]
fn get_vm_falls_back_on_another_cmdline_and_no_fallback_refuses() {
    let c = Config::new("get-vm");
    let init = minivmm(&["factory", "init", "--config", c.arg()]);
    assert!(init.status.success(), "{init:?}");

    let same = json(&minivmm(&["get-vm", "--config", c.arg(), "--json"]));
    assert_eq!(same["source"], "template", "{same}");
    assert!(same["fallback"].is_null(), "{same}");

    let other = minivmm(&["get-vm", "--config", c.arg(), "--json", "--cmdline", "x=1"]);
    let v = json(&other);
    assert_eq!(v["source"], "direct", "{v}");
    assert_eq!(v["fallback_field"], "cmdline", "{v}");
    // One log line names the field and both values.
    let log = String::from_utf8_lossy(&other.stderr);
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("booting directly"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].contains("cmdline") && lines[0].contains("x=1"),
        "{log}"
    );

    let refused = minivmm(&[
        "get-vm",
        "--config",
        c.arg(),
        "--cmdline",
        "x=1",
        "--no-fallback",
    ]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("`cmdline`") && err.contains("x=1"), "{err}");
    assert!(refused.stdout.is_empty(), "{refused:?}");
}

#[test]
fn bad_factory_config_is_one_line() {
    let path = std::env::temp_dir().join(format!("minivmm-cli-{}-bad.toml", std::process::id()));
    std::fs::write(&path, "[factory]\nenable_templates = true\n").unwrap();
    let out = minivmm(&["factory", "status", "--config", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("enable_templates"), "{err}");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn factory_init_refuses_a_template_path_off_tmpfs() {
    let dir = std::env::temp_dir().join(format!("minivmm-cli-{}-disk", std::process::id()));
    if factory_on_tmpfs(&std::env::temp_dir()) {
        // Nothing to check where the temporary directory itself is tmpfs.
        return;
    }
    let path = std::env::temp_dir().join(format!("minivmm-cli-{}-disk.toml", std::process::id()));
    std::fs::write(
        &path,
        format!(
            "[factory]\nenable_template = true\ntemplate_path = \"{}\"\n",
            dir.join("template").display()
        ),
    )
    .unwrap();
    let out = minivmm(&["factory", "init", "--config", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("template_path") && err.contains("not on tmpfs"),
        "{err}"
    );
    assert!(!dir.exists(), "init left {} behind", dir.display());
    std::fs::remove_file(&path).unwrap();
}

/// Whether `dir` is on tmpfs.
fn factory_on_tmpfs(dir: &std::path::Path) -> bool {
    factory::tmpfs::fs_type(dir).expect("statfs") == factory::tmpfs::TMPFS_MAGIC
}
