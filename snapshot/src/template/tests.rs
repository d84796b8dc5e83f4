use super::*;
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

/// A scratch area whose `template` subdirectory does not exist yet.
fn scratch() -> (TempDir, PathBuf) {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.as_path().join("template");
    (tmp, dir)
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
        .commit(&config(), "built by a test")
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
    let template = validate(&dir, Some(&config())).unwrap();
    assert_eq!(template.manifest(), &manifest);
    assert_eq!(template.dir(), dir.as_path());
    assert_eq!(template.memory_path(), dir.join("memory"));
    assert_eq!(template.state_path(), dir.join("state"));
    assert_eq!(template.read_state::<VmState>().unwrap(), vm_state(0x1000));
    assert_eq!(fs::read(template.memory_path()).unwrap(), vec![7u8; 8192]);
    assert_eq!(manifest.memory.size_bytes, 8192);
    assert_eq!(manifest.notes, "built by a test");
    assert!(manifest.memory_sha256.is_some());
    validate_full(&dir, Some(&config())).unwrap();
    Template::open(&dir).unwrap();

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
        .commit(&config(), "")
        .unwrap();
    assert_eq!(manifest.memory_sha256, None);
    let json = fs::read_to_string(dir.join("manifest")).unwrap();
    assert!(!json.contains("memory_sha256"));
    validate_full(&dir, None).unwrap();
}

#[test]
fn missing_dir_is_named() {
    let (_tmp, dir) = scratch();
    let err = validate(&dir, None).unwrap_err();
    assert!(matches!(err, TemplateError::MissingDir { .. }), "{err}");
    assert_names(&err, &dir);
}

#[test]
fn no_manifest_is_incomplete() {
    let (_tmp, dir) = scratch();
    fs::create_dir(&dir).unwrap();
    let err = validate(&dir, None).unwrap_err();
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
    let err = validate(&dir, None).unwrap_err();
    assert!(matches!(err, TemplateError::ManifestJson { .. }), "{err}");
    assert_names(&err, &dir.join("manifest"));
    assert!(err.to_string().contains("EOF"), "{err}");
}

/// Rewrites the manifest through a JSON edit.
fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest");
    let mut json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    edit(&mut json);
    fs::write(&path, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
}

#[test]
fn unsupported_format_version() {
    let (_tmp, dir) = scratch();
    build(&dir, &[0; 4096], 1);
    edit_manifest(&dir, |m| m["format_version"] = 99.into());
    let err = validate(&dir, None).unwrap_err();
    assert!(
        matches!(
            err,
            TemplateError::UnsupportedFormat {
                found: 99,
                supported: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn manifest_cannot_point_outside_the_template() {
    let (_tmp, dir) = scratch();
    build(&dir, &[0; 4096], 1);
    edit_manifest(&dir, |m| m["memory"]["file"] = "../memory".into());
    let err = validate(&dir, None).unwrap_err();
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
        validate(&dir, None),
        Err(TemplateError::SizeMismatch { .. })
    ));
    edit_manifest(&dir, |m| m["memory"]["size_bytes"] = (-1).into());
    assert!(matches!(
        validate(&dir, None),
        Err(TemplateError::ManifestJson { .. })
    ));
}

#[test]
fn missing_files_are_named() {
    for name in ["memory", "state"] {
        let (_tmp, dir) = scratch();
        build(&dir, &[0; 4096], 1);
        fs::remove_file(dir.join(name)).unwrap();
        let err = validate(&dir, None).unwrap_err();
        assert!(matches!(err, TemplateError::MissingFile { .. }), "{err}");
        assert_names(&err, &dir.join(name));
    }
}

#[test]
fn memory_size_mismatch_says_expected_and_actual() {
    let (_tmp, dir) = scratch();
    build(&dir, &[0; 4096], 1);
    fs::write(dir.join("memory"), [0u8; 8192]).unwrap();
    let err = validate(&dir, None).unwrap_err();
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
    let err = validate(&dir, None).unwrap_err();
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
    let err = validate(&dir, None).unwrap_err();
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
    let mut ram = vec![0u8; 4096];
    ram[100] = 1;
    fs::write(dir.join("memory"), &ram).unwrap();
    validate(&dir, None).unwrap();
    let err = validate_full(&dir, None).unwrap_err();
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
        let err = validate(&dir, Some(&requested)).unwrap_err();
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
            .commit_through(&config(), "", step)
            .unwrap();
        let err = validate_full(&dir, None).unwrap_err();
        assert!(
            matches!(err, TemplateError::Incomplete { .. }),
            "{step:?}: {err}"
        );
    }
    // The manifest rename is the commit point.
    let (_tmp, dir) = scratch();
    prepare(TemplateWriter::create(&dir), &[3; 4096], 1)
        .commit_through(&config(), "", CommitStep::RenameManifest)
        .unwrap();
    validate_full(&dir, Some(&config())).unwrap();
}

#[test]
fn crash_while_overwriting_never_leaves_a_valid_template() {
    let steps = [
        CommitStep::SyncMemory,
        CommitStep::RenameMemory,
        CommitStep::RenameState,
        CommitStep::WriteManifest,
    ];
    for step in steps {
        let (_tmp, dir) = scratch();
        build(&dir, &[1; 4096], 1);
        prepare(TemplateWriter::create_overwrite(&dir), &[2; 8192], 2)
            .commit_through(&config(), "", step)
            .unwrap();
        let err = validate_full(&dir, None).unwrap_err();
        assert!(
            matches!(err, TemplateError::Incomplete { .. }),
            "{step:?}: {err}"
        );
    }
}

#[test]
fn crash_before_commit_leaves_no_manifest_and_a_rebuild_starts_clean() {
    let (_tmp, dir) = scratch();
    let mut writer = TemplateWriter::create(&dir).unwrap();
    fs::write(writer.memory_path(), [9u8; 4096]).unwrap();
    writer.write_state(&vm_state(1)).unwrap();
    drop(writer);
    assert!(matches!(
        validate(&dir, None),
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
    let err = writer.commit(&config(), "").unwrap_err();
    assert!(matches!(err, TemplateError::MissingFile { .. }), "{err}");
    assert_names(&err, &dir.join("memory.partial"));

    let writer = TemplateWriter::create(&dir).unwrap();
    fs::write(writer.memory_path(), [0u8; 4096]).unwrap();
    let err = writer.commit(&config(), "").unwrap_err();
    assert!(matches!(err, TemplateError::MissingFile { .. }), "{err}");
    assert_names(&err, &dir.join("state.partial"));
    assert!(matches!(
        validate(&dir, None),
        Err(TemplateError::Incomplete { .. })
    ));
}

#[test]
fn overwrite_semantics() {
    let (_tmp, dir) = scratch();
    build(&dir, &[1; 4096], 1);
    let err = TemplateWriter::create(&dir).unwrap_err();
    assert!(matches!(err, TemplateError::AlreadyExists { .. }), "{err}");
    validate(&dir, None).unwrap();

    let writer = TemplateWriter::create_overwrite(&dir).unwrap();
    // Invalid from the moment the rewrite starts, before any file changes.
    assert!(matches!(
        validate(&dir, None),
        Err(TemplateError::Incomplete { .. })
    ));
    assert!(dir.join("memory").exists() && dir.join("state").exists());
    let writer = prepare(Ok(writer), &[2; 8192], 2);
    let manifest = writer.commit(&config(), "second").unwrap();
    let template = validate_full(&dir, Some(&config())).unwrap();
    assert_eq!(template.manifest(), &manifest);
    assert_eq!(template.read_state::<VmState>().unwrap(), vm_state(2));
    assert_eq!(fs::read(template.memory_path()).unwrap(), vec![2u8; 8192]);
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
        validate(&dir, None),
        Err(TemplateError::NotADirectory { .. })
    ));
}

#[test]
fn read_state_rechecks_the_manifest_hash() {
    let (_tmp, dir) = scratch();
    build(&dir, &[0; 4096], 1);
    let template = Template::open(&dir).unwrap();
    state::write_state(dir.join("state"), &vm_state(5)).unwrap();
    let err = template.read_state::<VmState>().unwrap_err();
    assert!(
        matches!(err, TemplateError::ChecksumMismatch { .. }),
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
        validate(&dir, None),
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
        assert!(validate(&dir, None).is_err(), "byte {i}");
    }
    for len in 0..original.len() {
        fs::write(dir.join("state"), &original[..len]).unwrap();
        assert!(validate(&dir, None).is_err(), "length {len}");
    }
}
