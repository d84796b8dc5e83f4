use super::*;
use std::io::Read;
use vmm_sys_util::tempdir::TempDir;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct VmState {
    rip: u64,
    devices: Vec<String>,
}

fn config() -> GuestConfig {
    GuestConfig {
        vcpus: 2,
        mem_mib: 256,
        kernel: KernelRef {
            path: "builtin:testguest".into(),
            sha256: "ab".repeat(32),
        },
        cmdline: "console=ttyS0 quiet".into(),
        initrd: None,
        devices: vec!["vsock".into(), "rng".into()],
    }
}

fn vm_state(rip: u64) -> VmState {
    VmState {
        rip,
        devices: vec!["vsock".into()],
    }
}

/// State schema identity the tests write and expect.
const SCHEMA: &str = "test-schema-1";

/// A scratch area whose `template` subdirectory does not exist yet; it
/// unseals and removes the template before the temporary directory goes.
struct Scratch {
    tmp: TempDir,
    dir: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = remove(&self.dir);
    }
}

fn scratch() -> (Scratch, PathBuf) {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.as_path().join("template");
    (
        Scratch {
            tmp,
            dir: dir.clone(),
        },
        dir,
    )
}

/// Starts a template as the VMM would: RAM file, state, then returns the writer.
fn prepare(
    writer_result: Result<TemplateWriter, TemplateError>,
    ram: &[u8],
    rip: u64,
) -> TemplateWriter {
    let mut writer = writer_result.unwrap();
    fs::write(writer.memory_path(), ram).unwrap();
    writer.write_state(&vm_state(rip)).unwrap();
    writer
}

fn build(dir: &Path, ram: &[u8], rip: u64) -> Manifest {
    prepare(TemplateWriter::create(dir), ram, rip)
        .record_memory_sha256(true)
        .commit(&config(), SCHEMA, "built by a test")
        .unwrap()
}

fn assert_names(err: &TemplateError, path: &Path) {
    let text = err.to_string();
    assert!(
        text.contains(&path.display().to_string()),
        "{text} does not name {}",
        path.display()
    );
}

#[test]
fn round_trip() {
    let (_tmp, dir) = scratch();
    let manifest = build(&dir, &[7u8; 8192], 0x1000);
    let template = validate(&dir, SCHEMA, Some(&config())).unwrap();
    assert_eq!(template.manifest(), &manifest);
    assert_eq!(template.dir(), dir.as_path());
    assert_eq!(template.memory_path(), dir.join("memory"));
    assert_eq!(template.state_path(), dir.join("state"));
    assert_eq!(template.read_state::<VmState>().unwrap(), vm_state(0x1000));
    assert_eq!(fs::read(template.memory_path()).unwrap(), vec![7u8; 8192]);
    assert_eq!(manifest.memory.size_bytes, 8192);
    assert_eq!(manifest.notes, "built by a test");
    assert!(manifest.memory_sha256.is_some());
    validate_full(&dir, SCHEMA, Some(&config())).unwrap();
    Template::open(&dir, SCHEMA).unwrap();

    let mut names: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["manifest", "memory", "state"]);
    let json: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("manifest")).unwrap()).unwrap();
    assert_eq!(json["memory"]["file"], "memory");
    assert_eq!(json["state"]["file"], "state");
    assert_eq!(json["config"]["kernel"]["path"], "builtin:testguest");
}

#[test]
fn memory_hash_is_optional() {
    let (_tmp, dir) = scratch();
    let manifest = prepare(TemplateWriter::create(&dir), &[1; 4096], 1)
        .commit(&config(), SCHEMA, "")
        .unwrap();
    assert_eq!(manifest.memory_sha256, None);
    let json = fs::read_to_string(dir.join("manifest")).unwrap();
    assert!(!json.contains("memory_sha256"));
    validate_full(&dir, SCHEMA, None).unwrap();
}

#[test]
fn missing_dir_is_named() {
    let (_tmp, dir) = scratch();
    let err = validate(&dir, SCHEMA, None).unwrap_err();
    assert!(matches!(err, TemplateError::MissingDir { .. }), "{err}");
    assert_names(&err, &dir);
}

#[test]
fn no_manifest_is_incomplete() {
    let (_tmp, dir) = scratch();
    fs::create_dir(&dir).unwrap();
    let err = validate(&dir, SCHEMA, None).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("incomplete template (no manifest): {}", dir.display())
    );
}

#[test]
fn bad_json_names_manifest_and_parser_message() {
    let (_tmp, dir) = scratch();
    build(&dir, &[0; 4096], 1);
    fs::write(dir.join("manifest"), b"{ \"format_version\": 1,").unwrap();
    let err = validate(&dir, SCHEMA, None).unwrap_err();
    assert!(matches!(err, TemplateError::ManifestJson { .. }), "{err}");
    assert_names(&err, &dir.join("manifest"));
    assert!(err.to_string().contains("EOF"), "{err}");
}

/// Makes a committed template what a filesystem without inode flags gives:
/// memory not immutable, and a manifest that says so.
fn unseal(dir: &Path) {
    let file = File::open(dir.join("memory")).unwrap();
    let _ = fsfile::set_immutable(&file, false);
    edit_manifest(dir, |m| m["memory"]["immutable"] = false.into());
}

/// Rewrites the manifest through a JSON edit.
fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest");
    let mut json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    edit(&mut json);
    fs::write(&path, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
}

#[test]
fn another_manifest_format_is_an_incompatible_build_in_one_line() {
    let (_tmp, dir) = scratch();
    build(&dir, &[0; 4096], 1);
    edit_manifest(&dir, |m| {
        m["format_version"] = 1.into();
        // What a format-1 manifest lacked: the error must not be about JSON.
        m.as_object_mut().unwrap().remove("state_schema");
        m["minivmm_version"] = "0.0.1".into();
    });
    let err = validate(&dir, SCHEMA, None).unwrap_err();
    assert!(
        matches!(
            err,
            TemplateError::IncompatibleBuild {
                what: "manifest format",
                ..
            }
        ),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("made by an incompatible build"), "{text}");
    assert!(text.contains("minivmm 0.0.1"), "{text}");
    assert_eq!(text.lines().count(), 1, "{text}");
    assert_names(&err, &dir);
}

#[test]
fn another_state_schema_is_an_incompatible_build() {
    let (_tmp, dir) = scratch();
    build(&dir, &[0; 4096], 1);
    let err = validate(&dir, "test-schema-2", None).unwrap_err();
    assert!(
        matches!(
            &err,
            TemplateError::IncompatibleBuild { what: "state schema", found, expected, .. }
                if found == SCHEMA && expected == "test-schema-2"
        ),
        "{err}"
    );
    assert!(err.to_string().contains("made by an incompatible build"));
}

#[test]
fn impossible_manifest_values_name_the_field() {
    let (_tmp, dir) = scratch();
    build(&dir, &[0; 4096], 1);
    // "vcpus": 2 -> 0 is one bit.
    edit_manifest(&dir, |m| m["config"]["vcpus"] = 0.into());
    let err = validate(&dir, SCHEMA, None).unwrap_err();
    assert!(
        matches!(err, TemplateError::BadManifestValue { field: "vcpus", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("vcpus"), "{err}");
    edit_manifest(&dir, |m| {
        m["config"]["vcpus"] = 2.into();
        m["config"]["mem_mib"] = 0.into();
    });
    let err = validate(&dir, SCHEMA, None).unwrap_err();
    assert!(
        matches!(
            err,
            TemplateError::BadManifestValue {
                field: "mem_mib",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_fifo_manifest_is_refused_without_blocking() {
    let (_tmp, dir) = scratch();
    build(&dir, &[0; 4096], 1);
    let manifest = dir.join("manifest");
    fs::remove_file(&manifest).unwrap();
    let c = std::ffi::CString::new(manifest.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    // No writer ever opens the FIFO: a blocking open would never return.
    let err = validate(&dir, SCHEMA, None).unwrap_err();
    assert!(matches!(err, TemplateError::NotAFile { .. }), "{err}");
    assert_names(&err, &manifest);
}

#[test]
fn symlinked_or_special_files_are_refused() {
    let (_tmp, dir) = scratch();
    build(&dir, &[0; 4096], 1);
    // A symlink to an identical copy outside the template is still refused.
    let outside = dir.parent().unwrap().join("state-copy");
    fs::copy(dir.join("state"), &outside).unwrap();
    fs::remove_file(dir.join("state")).unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("state")).unwrap();
    let err = validate(&dir, SCHEMA, None).unwrap_err();
    assert!(matches!(err, TemplateError::NotAFile { .. }), "{err}");
    assert_names(&err, &dir.join("state"));
}

#[test]
fn manifest_cannot_point_outside_the_template() {
    let (_tmp, dir) = scratch();
    build(&dir, &[0; 4096], 1);
    edit_manifest(&dir, |m| m["memory"]["file"] = "../memory".into());
    let err = validate(&dir, SCHEMA, None).unwrap_err();
    assert!(
        matches!(
            err,
            TemplateError::UnexpectedFileName {
                field: "memory.file",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn absurd_manifest_values_are_errors() {
    let (_tmp, dir) = scratch();
    build(&dir, &[0; 4096], 1);
    edit_manifest(&dir, |m| {
        m["memory"]["size_bytes"] = u64::MAX.into();
        m["state"]["sha256"] = "".into();
    });
    assert!(matches!(
        validate(&dir, SCHEMA, None),
        Err(TemplateError::SizeMismatch { .. })
    ));
    edit_manifest(&dir, |m| m["memory"]["size_bytes"] = (-1).into());
    assert!(matches!(
        validate(&dir, SCHEMA, None),
        Err(TemplateError::ManifestJson { .. })
    ));
}

#[test]
fn missing_files_are_named() {
    for name in ["memory", "state"] {
        let (_tmp, dir) = scratch();
        build(&dir, &[0; 4096], 1);
        unseal(&dir);
        fs::remove_file(dir.join(name)).unwrap();
        let err = validate(&dir, SCHEMA, None).unwrap_err();
        assert!(matches!(err, TemplateError::MissingFile { .. }), "{err}");
        assert_names(&err, &dir.join(name));
    }
}

#[test]
fn memory_size_mismatch_says_expected_and_actual() {
    let (_tmp, dir) = scratch();
    build(&dir, &[0; 4096], 1);
    unseal(&dir);
    fs::write(dir.join("memory"), [0u8; 8192]).unwrap();
    let err = validate(&dir, SCHEMA, None).unwrap_err();
    assert!(
        matches!(
            err,
            TemplateError::SizeMismatch {
                expected: 4096,
                actual: 8192,
                ..
            }
        ),
        "{err}"
    );
    assert_names(&err, &dir.join("memory"));
    let text = err.to_string();
    assert!(text.contains("4096") && text.contains("8192"), "{text}");
}

#[test]
fn state_sha256_mismatch_names_the_state_file() {
    let (_tmp, dir) = scratch();
    build(&dir, &[0; 4096], 1);
    // Another valid state of the same size: only the hash can tell.
    state::write_state(dir.join("state"), &vm_state(2)).unwrap();
    let err = validate(&dir, SCHEMA, None).unwrap_err();
    assert!(
        matches!(err, TemplateError::ChecksumMismatch { .. }),
        "{err}"
    );
    assert_names(&err, &dir.join("state"));
}

#[test]
fn invalid_state_header_is_reported_even_if_the_manifest_vouches_for_it() {
    let (_tmp, dir) = scratch();
    build(&dir, &[0; 4096], 1);
    let garbage = b"NOTSTATE and then some bytes".to_vec();
    fs::write(dir.join("state"), &garbage).unwrap();
    edit_manifest(&dir, |m| {
        m["state"]["size_bytes"] = garbage.len().into();
        m["state"]["sha256"] = durable::sha256_hex(&garbage).into();
    });
    let err = validate(&dir, SCHEMA, None).unwrap_err();
    assert!(
        matches!(err, TemplateError::State(StateError::BadMagic { .. })),
        "{err}"
    );
    assert_names(&err, &dir.join("state"));
}

#[test]
fn full_validation_catches_same_size_memory_changes() {
    let (_tmp, dir) = scratch();
    build(&dir, &[0; 4096], 1);
    unseal(&dir);
    let mut ram = vec![0u8; 4096];
    ram[100] = 1;
    fs::write(dir.join("memory"), &ram).unwrap();
    validate(&dir, SCHEMA, None).unwrap();
    let err = validate_full(&dir, SCHEMA, None).unwrap_err();
    assert!(
        matches!(err, TemplateError::ChecksumMismatch { .. }),
        "{err}"
    );
    assert_names(&err, &dir.join("memory"));
}

#[test]
fn config_mismatch_names_the_field() {
    let (_tmp, dir) = scratch();
    build(&dir, &[0; 4096], 1);
    type Change = fn(&mut GuestConfig);
    let cases: [(&str, Change); 5] = [
        ("vcpus", |c| c.vcpus = 4),
        ("mem_mib", |c| c.mem_mib = 512),
        ("kernel.sha256", |c| c.kernel.sha256 = "cd".repeat(32)),
        ("cmdline", |c| c.cmdline.push_str(" debug")),
        ("devices", |c| c.devices.reverse()),
    ];
    for (field, change) in cases {
        let mut requested = config();
        change(&mut requested);
        let err = validate(&dir, SCHEMA, Some(&requested)).unwrap_err();
        match &err {
            TemplateError::ConfigMismatch { mismatch, .. } => assert_eq!(mismatch.field, field),
            other => panic!("expected a config mismatch on {field}, got {other}"),
        }
        assert!(err.to_string().contains(field), "{err}");
        assert_names(&err, &dir);
    }
}

#[test]
fn initrd_is_compared_by_hash_and_optional_in_old_manifests() {
    let with_initrd = GuestConfig {
        initrd: Some(KernelRef {
            path: "/tmp/initramfs.img".into(),
            sha256: "cd".repeat(32),
        }),
        ..config()
    };
    let mismatch = with_initrd.compatible_with(&config()).unwrap_err();
    assert_eq!(mismatch.field, "initrd.sha256");
    let mut moved = with_initrd.clone();
    moved.initrd.as_mut().unwrap().path = "/elsewhere.img".into();
    with_initrd.compatible_with(&moved).unwrap();
    // A manifest without the field (written before initrds) reads as None.
    let mut json = serde_json::to_value(config()).unwrap();
    assert!(json.get("initrd").is_none());
    json.as_object_mut().unwrap().remove("initrd");
    let back: GuestConfig = serde_json::from_value(json).unwrap();
    assert_eq!(back.initrd, None);
}

#[test]
fn kernel_path_alone_is_not_a_mismatch() {
    let mut requested = config();
    requested.kernel.path = "/boot/vmlinuz".into();
    requested.kernel.sha256 = requested.kernel.sha256.to_uppercase();
    config().compatible_with(&requested).unwrap();
    let mismatch = config()
        .compatible_with(&GuestConfig {
            vcpus: 1,
            ..config()
        })
        .unwrap_err();
    assert_eq!(
        mismatch,
        ConfigMismatch {
            field: "vcpus",
            template: "2".into(),
            requested: "1".into()
        }
    );
}

#[test]
fn crash_before_the_manifest_rename_never_leaves_a_valid_template() {
    let steps = [
        CommitStep::SyncMemory,
        CommitStep::RenameMemory,
        CommitStep::RenameState,
        CommitStep::WriteManifest,
    ];
    for step in steps {
        let (_tmp, dir) = scratch();
        prepare(TemplateWriter::create(&dir), &[3; 4096], 1)
            .commit_through(&config(), SCHEMA, "", step)
            .unwrap();
        let err = validate_full(&dir, SCHEMA, None).unwrap_err();
        assert!(
            matches!(err, TemplateError::Incomplete { .. }),
            "{step:?}: {err}"
        );
    }
    // The manifest rename is the commit point.
    let (_tmp, dir) = scratch();
    prepare(TemplateWriter::create(&dir), &[3; 4096], 1)
        .commit_through(&config(), SCHEMA, "", CommitStep::RenameManifest)
        .unwrap();
    validate_full(&dir, SCHEMA, Some(&config())).unwrap();
}

#[test]
fn a_replacement_that_never_commits_leaves_the_old_template_valid() {
    let steps = [
        CommitStep::SyncMemory,
        CommitStep::RenameMemory,
        CommitStep::RenameState,
        CommitStep::WriteManifest,
        CommitStep::RenameManifest,
    ];
    for step in steps {
        let (_tmp, dir) = scratch();
        let old = build(&dir, &[1; 4096], 1);
        prepare(TemplateWriter::create_overwrite(&dir), &[2; 8192], 2)
            .commit_through(&config(), SCHEMA, "", step)
            .unwrap();
        let template = validate_full(&dir, SCHEMA, None).unwrap();
        assert_eq!(template.manifest(), &old, "{step:?}");
        assert_eq!(template.read_state::<VmState>().unwrap(), vm_state(1));
        assert_eq!(fs::read(template.memory_path()).unwrap(), vec![1u8; 4096]);
        assert_eq!(
            siblings(&dir),
            ["template"],
            "{step:?}: staging left behind"
        );
    }
}

/// Names in the directory holding `dir`.
fn siblings(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn crash_before_commit_leaves_no_manifest_and_a_rebuild_starts_clean() {
    let (_tmp, dir) = scratch();
    let mut writer = TemplateWriter::create(&dir).unwrap();
    fs::write(writer.memory_path(), [9u8; 4096]).unwrap();
    writer.write_state(&vm_state(1)).unwrap();
    drop(writer);
    assert!(matches!(
        validate(&dir, SCHEMA, None),
        Err(TemplateError::Incomplete { .. })
    ));

    let writer = TemplateWriter::create(&dir).unwrap();
    assert!(
        !writer.memory_path().exists(),
        "stale RAM file must not be reused"
    );
    assert!(!dir.join("state.partial").exists());
}

#[test]
fn commit_requires_memory_and_state() {
    let (_tmp, dir) = scratch();
    let writer = TemplateWriter::create(&dir).unwrap();
    let err = writer.commit(&config(), SCHEMA, "").unwrap_err();
    assert!(matches!(err, TemplateError::MissingFile { .. }), "{err}");
    assert_names(&err, &dir.join("memory.partial"));

    let writer = TemplateWriter::create(&dir).unwrap();
    fs::write(writer.memory_path(), [0u8; 4096]).unwrap();
    let err = writer.commit(&config(), SCHEMA, "").unwrap_err();
    assert!(matches!(err, TemplateError::MissingFile { .. }), "{err}");
    assert_names(&err, &dir.join("state.partial"));
    assert!(matches!(
        validate(&dir, SCHEMA, None),
        Err(TemplateError::Incomplete { .. })
    ));
}

#[test]
fn overwrite_semantics() {
    let (_tmp, dir) = scratch();
    build(&dir, &[1; 4096], 1);
    let err = TemplateWriter::create(&dir).unwrap_err();
    assert!(matches!(err, TemplateError::AlreadyExists { .. }), "{err}");
    let old = validate(&dir, SCHEMA, None).unwrap();

    let writer = TemplateWriter::create_overwrite(&dir).unwrap();
    assert_eq!(writer.dir(), dir.as_path());
    // The old template stays valid while the new one is built beside it.
    validate(&dir, SCHEMA, None).unwrap();
    assert!(!writer.memory_path().starts_with(&dir));
    let writer = prepare(Ok(writer), &[2; 8192], 2);
    validate(&dir, SCHEMA, None).unwrap();
    let manifest = writer.commit(&config(), SCHEMA, "second").unwrap();
    let template = validate_full(&dir, SCHEMA, Some(&config())).unwrap();
    assert_eq!(template.manifest(), &manifest);
    assert_eq!(template.read_state::<VmState>().unwrap(), vm_state(2));
    assert_eq!(fs::read(template.memory_path()).unwrap(), vec![2u8; 8192]);
    assert_eq!(
        siblings(&dir),
        ["template"],
        "the old template was not removed"
    );

    // A handle opened before the swap keeps its own memory and state.
    let mut old_ram = Vec::new();
    old.memory_file()
        .as_ref()
        .read_to_end(&mut old_ram)
        .unwrap();
    assert_eq!(old_ram, vec![1u8; 4096]);
    assert_eq!(old.read_state::<VmState>().unwrap(), vm_state(1));
    old.check_memory_unchanged().unwrap();
}

#[test]
fn writer_refuses_a_file_as_directory() {
    let (_tmp, dir) = scratch();
    fs::write(&dir, b"").unwrap();
    assert!(matches!(
        TemplateWriter::create(&dir),
        Err(TemplateError::NotADirectory { .. })
    ));
    assert!(matches!(
        validate(&dir, SCHEMA, None),
        Err(TemplateError::NotADirectory { .. })
    ));
}

#[test]
fn an_open_template_decodes_the_state_it_checked() {
    let (_tmp, dir) = scratch();
    build(&dir, &[0; 4096], 1);
    let template = Template::open(&dir, SCHEMA).unwrap();
    state::write_state(dir.join("state"), &vm_state(5)).unwrap();
    // The file on disk changed; the open template still holds what it checked...
    assert_eq!(template.read_state::<VmState>().unwrap(), vm_state(1));
    // ...and opening it again sees the change.
    let err = Template::open(&dir, SCHEMA).unwrap_err();
    assert!(
        matches!(err, TemplateError::ChecksumMismatch { .. }),
        "{err}"
    );
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn committed_memory_is_read_only_and_sealed() {
    let (_tmp, dir) = scratch();
    let manifest = build(&dir, &[4; 4096], 1);
    let meta = fs::metadata(dir.join("memory")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, MEMORY_FILE_MODE);
    let file = File::open(dir.join("memory")).unwrap();
    assert_eq!(manifest.memory.immutable, fsfile::is_immutable(&file));
    if is_root() {
        // Root has CAP_LINUX_IMMUTABLE and ext4/tmpfs keep the flag.
        assert!(manifest.memory.immutable);
        let err = fs::OpenOptions::new()
            .write(true)
            .open(dir.join("memory"))
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
        assert!(fs::remove_file(dir.join("memory")).is_err());
    }
    // remove() unseals it first.
    remove(&dir).unwrap();
    assert!(!dir.exists());
}

#[test]
fn an_unsealed_template_says_so_and_changes_are_caught() {
    if !is_root() {
        return;
    }
    let (_tmp, dir) = scratch();
    build(&dir, &[4; 4096], 1);
    let template = Template::open(&dir, SCHEMA).unwrap();
    assert!(template.memory_sealed());
    let file = File::open(dir.join("memory")).unwrap();
    fsfile::set_immutable(&file, false).unwrap();
    assert!(!validate(&dir, SCHEMA, None).unwrap().memory_sealed());
    // Same bytes written over it: the open template notices.
    template.check_memory_unchanged().unwrap();
    fs::write(dir.join("memory"), [4u8; 4096]).unwrap();
    let err = template.check_memory_unchanged().unwrap_err();
    assert!(matches!(err, TemplateError::MemoryChanged { .. }), "{err}");
    assert_names(&err, &dir.join("memory"));
}

#[test]
fn template_memory_is_refused_for_writing() {
    let (tmp, dir) = scratch();
    build(&dir, &[4; 4096], 1);
    let err = refuse_template_memory(&dir.join("memory")).unwrap_err();
    assert!(matches!(err, TemplateError::TemplateMemory { .. }), "{err}");
    assert_names(&err, &dir.join("memory"));
    // Other files, and files that do not exist yet, are fine.
    refuse_template_memory(&dir.join("state")).unwrap();
    refuse_template_memory(&tmp.tmp.as_path().join("ram")).unwrap();
    // A hard link to an unsealed template's memory is still its memory.
    if is_root() {
        let file = File::open(dir.join("memory")).unwrap();
        fsfile::set_immutable(&file, false).unwrap();
    }
    fs::hard_link(dir.join("memory"), dir.join("ram")).unwrap();
    assert!(refuse_template_memory(&dir.join("ram")).is_err());
    fs::remove_file(dir.join("ram")).unwrap();
}

#[test]
fn the_manifest_digest_catches_a_change_of_any_field() {
    let (_tmp, dir) = scratch();
    let manifest = build(&dir, &[0; 4096], 1);
    assert_eq!(manifest.digest, manifest.compute_digest());
    assert_eq!(manifest.digest.len(), 64);
    validate(&dir, SCHEMA, None)
        .unwrap()
        .check_manifest_digest()
        .unwrap();
    type Edit = fn(&mut serde_json::Value);
    let edits: [Edit; 4] = [
        |m| m["config"]["cmdline"] = "console=ttyS0 quieu".into(),
        |m| m["config"]["kernel"]["sha256"] = format!("{}aa", "ab".repeat(31)).into(),
        |m| m["notes"] = "built by a tesu".into(),
        |m| m["digest"] = "00".repeat(32).into(),
    ];
    let original = fs::read(dir.join("manifest")).unwrap();
    for edit in edits {
        fs::write(dir.join("manifest"), &original).unwrap();
        edit_manifest(&dir, edit);
        // The files still match, so validation passes; the digest does not.
        let template = validate(&dir, SCHEMA, None).unwrap();
        let err = template.check_manifest_digest().unwrap_err();
        assert!(matches!(err, TemplateError::ManifestDigest { .. }), "{err}");
        assert_names(&err, &dir.join("manifest"));
    }
}

#[test]
fn remove_refuses_a_directory_that_is_not_a_template() {
    let (_tmp, dir) = scratch();
    build(&dir, &[0; 4096], 1);
    fs::write(dir.join("notes.txt"), b"mine").unwrap();
    let err = remove(&dir).unwrap_err();
    assert!(
        matches!(&err, TemplateError::NotATemplate { entry, .. } if entry == "notes.txt"),
        "{err}"
    );
    // Untouched: still a valid template.
    validate(&dir, SCHEMA, None).unwrap();
    fs::remove_file(dir.join("notes.txt")).unwrap();
    remove(&dir).unwrap();
    assert!(!dir.exists());
}

#[test]
fn an_absurd_state_size_is_refused_before_reading() {
    let (_tmp, dir) = scratch();
    build(&dir, &[0; 4096], 1);
    edit_manifest(&dir, |m| {
        m["state"]["size_bytes"] = (MAX_STATE_BYTES + 1).into()
    });
    let err = validate(&dir, SCHEMA, None).unwrap_err();
    assert!(
        matches!(
            err,
            TemplateError::BadManifestValue {
                field: "state.size_bytes",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn remove_deletes_the_manifest_first_and_is_idempotent() {
    let (_tmp, dir) = scratch();
    build(&dir, &[0; 4096], 1);
    remove(&dir).unwrap();
    assert!(!dir.exists());
    remove(&dir).unwrap();
    assert!(matches!(
        validate(&dir, SCHEMA, None),
        Err(TemplateError::MissingDir { .. })
    ));
}

#[test]
fn corrupting_any_state_byte_is_rejected() {
    let (_tmp, dir) = scratch();
    build(&dir, &[0; 4096], 1);
    let original = fs::read(dir.join("state")).unwrap();
    for i in 0..original.len() {
        let mut corrupt = original.clone();
        corrupt[i] ^= 0x5a;
        fs::write(dir.join("state"), &corrupt).unwrap();
        assert!(validate(&dir, SCHEMA, None).is_err(), "byte {i}");
    }
    for len in 0..original.len() {
        fs::write(dir.join("state"), &original[..len]).unwrap();
        assert!(validate(&dir, SCHEMA, None).is_err(), "length {len}");
    }
}
