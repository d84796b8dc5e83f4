//! The template directory: guest RAM (`memory`), device and vCPU state
//! (`state`) and a JSON `manifest` that vouches for both.
//!
//! A template is valid only once its manifest exists, and the manifest is
//! renamed into place last; removal deletes it first. The manifest records
//! sizes and checksums, so a stale manifest cannot vouch for newer files.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::durable;
use crate::state::{self, StateError};
use crate::MINIVMM_VERSION;

/// Name of the guest RAM file inside a template directory.
pub const MEMORY_FILE: &str = "memory";
/// Name of the state file inside a template directory.
pub const STATE_FILE: &str = "state";
/// Name of the manifest inside a template directory.
pub const MANIFEST_FILE: &str = "manifest";
/// Manifest format version written by this build, and the only one it reads.
pub const TEMPLATE_FORMAT_VERSION: u32 = 1;

const MEMORY_PARTIAL: &str = "memory.partial";
const STATE_PARTIAL: &str = "state.partial";
const MANIFEST_PARTIAL: &str = "manifest.partial";

/// The kernel a guest was booted from, identified by its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelRef {
    /// Where the image came from (a file path or e.g. `builtin:testguest`).
    pub path: String,
    /// Lower-case hex SHA-256 of the kernel image.
    pub sha256: String,
}

/// The guest a template was built for; a clone must ask for the same one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestConfig {
    /// Number of vCPUs at snapshot time.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Kernel image.
    pub kernel: KernelRef,
    /// Kernel command line.
    pub cmdline: String,
    /// Initial ramdisk, if the guest booted with one (absent in manifests
    /// of guests without one, and in those written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<KernelRef>,
    /// Device kinds in attach order, e.g. `["vsock", "rng"]`.
    pub devices: Vec<String>,
}

/// The first field in which a template's config differs from a requested one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config field `{field}` differs: template has {template}, requested {requested}")]
pub struct ConfigMismatch {
    /// Name of the differing field (`vcpus`, `mem_mib`, `kernel.sha256`,
    /// `initrd.sha256`, `cmdline`, `devices`).
    pub field: &'static str,
    /// The template's value.
    pub template: String,
    /// The requested value.
    pub requested: String,
}

impl GuestConfig {
    /// Checks that a clone of a template built with `self` is the guest
    /// `requested` asks for. The kernel is compared by hash, not path; devices
    /// are compared in order, since order fixes their MMIO slots and IRQs.
    pub fn compatible_with(&self, requested: &GuestConfig) -> Result<(), ConfigMismatch> {
        fn differ(
            field: &'static str,
            template: impl fmt::Display,
            requested: impl fmt::Display,
        ) -> ConfigMismatch {
            ConfigMismatch {
                field,
                template: template.to_string(),
                requested: requested.to_string(),
            }
        }
        if self.vcpus != requested.vcpus {
            return Err(differ("vcpus", self.vcpus, requested.vcpus));
        }
        if self.mem_mib != requested.mem_mib {
            return Err(differ("mem_mib", self.mem_mib, requested.mem_mib));
        }
        if !self
            .kernel
            .sha256
            .eq_ignore_ascii_case(&requested.kernel.sha256)
        {
            return Err(differ(
                "kernel.sha256",
                &self.kernel.sha256,
                &requested.kernel.sha256,
            ));
        }
        let initrd_hash = |c: &GuestConfig| {
            c.initrd
                .as_ref()
                .map_or("none".to_string(), |i| i.sha256.to_ascii_lowercase())
        };
        if initrd_hash(self) != initrd_hash(requested) {
            return Err(differ(
                "initrd.sha256",
                initrd_hash(self),
                initrd_hash(requested),
            ));
        }
        if self.cmdline != requested.cmdline {
            return Err(differ("cmdline", &self.cmdline, &requested.cmdline));
        }
        if self.devices != requested.devices {
            return Err(differ(
                "devices",
                self.devices.join(","),
                requested.devices.join(","),
            ));
        }
        Ok(())
    }
}

/// The manifest's record of the guest RAM file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFileEntry {
    /// File name inside the template directory (always [`MEMORY_FILE`]).
    pub file: String,
    /// Size of the file in bytes.
    pub size_bytes: u64,
}

/// The manifest's record of the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFileEntry {
    /// File name inside the template directory (always [`STATE_FILE`]).
    pub file: String,
    /// Size of the file in bytes.
    pub size_bytes: u64,
    /// Lower-case hex SHA-256 of the file.
    pub sha256: String,
}

/// Contents of `<template>/manifest` (pretty JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version.
    pub format_version: u32,
    /// minivmm version that built the template.
    pub minivmm_version: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix_secs: u64,
    /// Guest the template was built for.
    pub config: GuestConfig,
    /// Guest RAM file.
    pub memory: MemoryFileEntry,
    /// State file.
    pub state: StateFileEntry,
    /// Lower-case hex SHA-256 of the memory file, if computed at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_sha256: Option<String>,
    /// Free-form notes from whoever built the template.
    #[serde(default)]
    pub notes: String,
}

/// Why a template could not be created, opened or trusted.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// An I/O operation failed.
    #[error("cannot {op} {}: {source}", .path.display())]
    Io {
        /// What was being done: "read", "rename", ...
        op: &'static str,
        /// File or directory at fault.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The template directory does not exist.
    #[error("template directory does not exist: {}", .dir.display())]
    MissingDir {
        /// Directory asked for.
        dir: PathBuf,
    },
    /// The template path exists but is not a directory.
    #[error("template path is not a directory: {}", .path.display())]
    NotADirectory {
        /// Path asked for.
        path: PathBuf,
    },
    /// The directory has no manifest: never committed, or half removed.
    #[error("incomplete template (no manifest): {}", .dir.display())]
    Incomplete {
        /// Directory asked for.
        dir: PathBuf,
    },
    /// A committed template already exists where a new one was to be created.
    #[error("a template already exists in {} (use overwrite to replace it)", .dir.display())]
    AlreadyExists {
        /// Directory asked for.
        dir: PathBuf,
    },
    /// The manifest is not valid JSON for [`Manifest`].
    #[error("invalid manifest {}: {source}", .path.display())]
    ManifestJson {
        /// Manifest file.
        path: PathBuf,
        /// Parser's description of the problem.
        #[source]
        source: serde_json::Error,
    },
    /// The manifest's format version is not the one this build reads.
    #[error(
        "manifest {} has format version {found}, this minivmm supports version {supported}",
        .path.display()
    )]
    UnsupportedFormat {
        /// Manifest file.
        path: PathBuf,
        /// Version in the manifest.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// The manifest names a file other than the fixed one for that role.
    #[error("manifest {} names `{found}` for {field}, expected `{expected}`", .path.display())]
    UnexpectedFileName {
        /// Manifest file.
        path: PathBuf,
        /// Manifest field (`memory.file` or `state.file`).
        field: &'static str,
        /// Name found.
        found: String,
        /// Name required.
        expected: &'static str,
    },
    /// A file the template needs is missing.
    #[error("template file is missing: {}", .path.display())]
    MissingFile {
        /// File expected.
        path: PathBuf,
    },
    /// A template file is not a regular file.
    #[error("template file is not a regular file: {}", .path.display())]
    NotAFile {
        /// Path at fault.
        path: PathBuf,
    },
    /// A file's size differs from the manifest's record.
    #[error(
        "size mismatch for {}: manifest says {expected} bytes, file has {actual}",
        .path.display()
    )]
    SizeMismatch {
        /// File at fault.
        path: PathBuf,
        /// Size in the manifest.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },
    /// A file's SHA-256 differs from the manifest's record.
    #[error(
        "checksum mismatch for {}: manifest says sha256 {expected}, file has {actual}",
        .path.display()
    )]
    ChecksumMismatch {
        /// File at fault.
        path: PathBuf,
        /// SHA-256 in the manifest.
        expected: String,
        /// SHA-256 of the file.
        actual: String,
    },
    /// The state file itself is invalid (its error names the file).
    #[error(transparent)]
    State(#[from] StateError),
    /// The template was built for a different guest than the one requested.
    #[error("template {} does not match the requested guest: {mismatch}", .dir.display())]
    ConfigMismatch {
        /// Template directory.
        dir: PathBuf,
        /// First differing field.
        #[source]
        mismatch: ConfigMismatch,
    },
}

/// Builds a template directory so that it becomes valid only at the end of
/// [`TemplateWriter::commit`].
#[derive(Debug)]
pub struct TemplateWriter {
    dir: PathBuf,
    record_memory_sha256: bool,
}

impl TemplateWriter {
    /// Starts a template in `dir` (created if missing); refuses if a committed
    /// template is already there.
    pub fn create(dir: impl AsRef<Path>) -> Result<Self, TemplateError> {
        Self::begin(dir.as_ref(), false)
    }

    /// Starts a template in `dir`, invalidating any committed template there
    /// first (its manifest is removed before anything else changes).
    pub fn create_overwrite(dir: impl AsRef<Path>) -> Result<Self, TemplateError> {
        Self::begin(dir.as_ref(), true)
    }

    /// Whether [`commit`](Self::commit) hashes the whole memory file into the
    /// manifest (needed by [`validate_full`]; costs one read of guest RAM).
    pub fn record_memory_sha256(mut self, record: bool) -> Self {
        self.record_memory_sha256 = record;
        self
    }

    /// The template directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Temporary guest RAM file for the VMM to create, size and map
    /// MAP_SHARED; it is renamed to `memory` at commit.
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(MEMORY_PARTIAL)
    }

    /// Encodes `value` into the temporary state file and fsyncs it.
    pub fn write_state<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), TemplateError> {
        Ok(state::write_state_synced(
            &self.dir.join(STATE_PARTIAL),
            value,
        )?)
    }

    /// Makes the template valid: fsyncs guest RAM, renames memory and state
    /// into place, then writes the manifest and renames it in last.
    pub fn commit(self, config: &GuestConfig, notes: &str) -> Result<Manifest, TemplateError> {
        self.commit_through(config, notes, CommitStep::SyncDir)
    }

    fn begin(dir: &Path, overwrite: bool) -> Result<Self, TemplateError> {
        match fs::metadata(dir) {
            Ok(meta) if !meta.is_dir() => {
                return Err(TemplateError::NotADirectory {
                    path: dir.to_owned(),
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(dir).map_err(|e| io_error("create directory", dir, e))?;
            }
            Err(e) => return Err(io_error("inspect", dir, e)),
        }
        let manifest = dir.join(MANIFEST_FILE);
        match fs::symlink_metadata(&manifest) {
            Ok(_) if !overwrite => {
                return Err(TemplateError::AlreadyExists {
                    dir: dir.to_owned(),
                })
            }
            Ok(_) => {
                fs::remove_file(&manifest).map_err(|e| io_error("remove", &manifest, e))?;
                durable::sync_dir(dir).map_err(|e| io_error("sync", dir, e))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("inspect", &manifest, e)),
        }
        // Leftovers of a crashed build: the VMM must start from an empty RAM file.
        for name in [MEMORY_PARTIAL, STATE_PARTIAL, MANIFEST_PARTIAL] {
            let path = dir.join(name);
            durable::remove_if_present(&path).map_err(|e| io_error("remove", &path, e))?;
        }
        Ok(Self {
            dir: dir.to_owned(),
            record_memory_sha256: false,
        })
    }

    /// Runs the commit up to and including `last`; stopping early simulates a
    /// crash in tests.
    fn commit_through(
        self,
        config: &GuestConfig,
        notes: &str,
        last: CommitStep,
    ) -> Result<Manifest, TemplateError> {
        let dir = &self.dir;
        let memory_partial = dir.join(MEMORY_PARTIAL);
        let state_partial = dir.join(STATE_PARTIAL);

        let memory = fs::File::open(&memory_partial)
            .map_err(|e| missing_or_io("open", &memory_partial, e))?;
        memory
            .sync_all()
            .map_err(|e| io_error("sync", &memory_partial, e))?;
        let memory_size = memory
            .metadata()
            .map_err(|e| io_error("inspect", &memory_partial, e))?
            .len();
        drop(memory);
        let memory_sha256 = if self.record_memory_sha256 {
            Some(
                durable::sha256_file_hex(&memory_partial)
                    .map_err(|e| io_error("read", &memory_partial, e))?,
            )
        } else {
            None
        };
        let state_bytes =
            fs::read(&state_partial).map_err(|e| missing_or_io("read", &state_partial, e))?;
        let manifest = Manifest {
            format_version: TEMPLATE_FORMAT_VERSION,
            minivmm_version: MINIVMM_VERSION.to_owned(),
            created_unix_secs: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            config: config.clone(),
            memory: MemoryFileEntry {
                file: MEMORY_FILE.to_owned(),
                size_bytes: memory_size,
            },
            state: StateFileEntry {
                file: STATE_FILE.to_owned(),
                size_bytes: state_bytes.len() as u64,
                sha256: durable::sha256_hex(&state_bytes),
            },
            memory_sha256,
            notes: notes.to_owned(),
        };
        if last == CommitStep::SyncMemory {
            return Ok(manifest);
        }

        rename(&memory_partial, &dir.join(MEMORY_FILE))?;
        if last == CommitStep::RenameMemory {
            return Ok(manifest);
        }
        rename(&state_partial, &dir.join(STATE_FILE))?;
        if last == CommitStep::RenameState {
            return Ok(manifest);
        }

        let manifest_partial = dir.join(MANIFEST_PARTIAL);
        let mut json =
            serde_json::to_vec_pretty(&manifest).map_err(|source| TemplateError::ManifestJson {
                path: manifest_partial.clone(),
                source,
            })?;
        json.push(b'\n');
        durable::write_synced(&manifest_partial, &json)
            .map_err(|e| io_error("write", &manifest_partial, e))?;
        if last == CommitStep::WriteManifest {
            return Ok(manifest);
        }
        // The commit point: before this rename the directory has no manifest.
        rename(&manifest_partial, &dir.join(MANIFEST_FILE))?;
        if last == CommitStep::RenameManifest {
            return Ok(manifest);
        }
        durable::sync_dir(dir).map_err(|e| io_error("sync", dir, e))?;
        durable::sync_parent_dir(dir).map_err(|e| io_error("sync parent of", dir, e))?;
        Ok(manifest)
    }
}

/// Steps of [`TemplateWriter::commit`], in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CommitStep {
    SyncMemory,
    RenameMemory,
    RenameState,
    WriteManifest,
    RenameManifest,
    SyncDir,
}

/// A committed template whose files matched its manifest when opened.
#[derive(Debug, Clone)]
pub struct Template {
    dir: PathBuf,
    manifest: Manifest,
}

impl Template {
    /// Opens a template with the fast checks of [`validate`] and no config check.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, TemplateError> {
        validate(dir, None)
    }

    /// The template directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Guest RAM file, to be mapped MAP_PRIVATE by clones.
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }

    /// State file.
    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The manifest as read and checked.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Reads and decodes the state, checking it is still the file the
    /// manifest vouches for.
    pub fn read_state<T: DeserializeOwned>(&self) -> Result<T, TemplateError> {
        let path = self.state_path();
        let bytes = fs::read(&path).map_err(|e| missing_or_io("read", &path, e))?;
        check_state_sha256(&self.manifest, &bytes, &path)?;
        Ok(state::decode_from(&bytes, &path)?)
    }
}

/// Checks that `dir` holds a committed template whose files match its
/// manifest (sizes, state SHA-256 and header) and, if given, whose config is
/// compatible with `expected`. Does not hash guest RAM.
pub fn validate(
    dir: impl AsRef<Path>,
    expected: Option<&GuestConfig>,
) -> Result<Template, TemplateError> {
    check_template(dir.as_ref(), expected, false)
}

/// [`validate`], plus the SHA-256 of the memory file when the manifest
/// records one (`manifest().memory_sha256` tells whether it did).
pub fn validate_full(
    dir: impl AsRef<Path>,
    expected: Option<&GuestConfig>,
) -> Result<Template, TemplateError> {
    check_template(dir.as_ref(), expected, true)
}

/// Removes a template: the manifest first, so a half-removed directory is
/// never valid, then everything else. A missing directory is not an error.
pub fn remove(dir: impl AsRef<Path>) -> Result<(), TemplateError> {
    let dir = dir.as_ref();
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error("inspect", dir, e)),
        Ok(meta) if !meta.is_dir() => {
            return Err(TemplateError::NotADirectory {
                path: dir.to_owned(),
            })
        }
        Ok(_) => {}
    }
    let manifest = dir.join(MANIFEST_FILE);
    durable::remove_if_present(&manifest).map_err(|e| io_error("remove", &manifest, e))?;
    durable::sync_dir(dir).map_err(|e| io_error("sync", dir, e))?;
    fs::remove_dir_all(dir).map_err(|e| io_error("remove", dir, e))
}

fn check_template(
    dir: &Path,
    expected: Option<&GuestConfig>,
    full: bool,
) -> Result<Template, TemplateError> {
    match fs::metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(TemplateError::MissingDir {
                dir: dir.to_owned(),
            })
        }
        Err(e) => return Err(io_error("inspect", dir, e)),
        Ok(meta) if !meta.is_dir() => {
            return Err(TemplateError::NotADirectory {
                path: dir.to_owned(),
            })
        }
        Ok(_) => {}
    }

    let manifest_path = dir.join(MANIFEST_FILE);
    let json = match fs::read(&manifest_path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(TemplateError::Incomplete {
                dir: dir.to_owned(),
            })
        }
        Err(e) => return Err(io_error("read", &manifest_path, e)),
        Ok(json) => json,
    };
    let manifest: Manifest =
        serde_json::from_slice(&json).map_err(|source| TemplateError::ManifestJson {
            path: manifest_path.clone(),
            source,
        })?;
    if manifest.format_version != TEMPLATE_FORMAT_VERSION {
        return Err(TemplateError::UnsupportedFormat {
            path: manifest_path,
            found: manifest.format_version,
            supported: TEMPLATE_FORMAT_VERSION,
        });
    }
    // Fixed names: a manifest must not point clones at files outside the template.
    for (field, found, expected_name) in [
        ("memory.file", &manifest.memory.file, MEMORY_FILE),
        ("state.file", &manifest.state.file, STATE_FILE),
    ] {
        if found != expected_name {
            return Err(TemplateError::UnexpectedFileName {
                path: manifest_path,
                field,
                found: found.clone(),
                expected: expected_name,
            });
        }
    }

    let memory_path = dir.join(MEMORY_FILE);
    let state_path = dir.join(STATE_FILE);
    let memory_size = regular_file_size(&memory_path)?;
    let state_size = regular_file_size(&state_path)?;
    if memory_size != manifest.memory.size_bytes {
        return Err(TemplateError::SizeMismatch {
            path: memory_path,
            expected: manifest.memory.size_bytes,
            actual: memory_size,
        });
    }
    if state_size != manifest.state.size_bytes {
        return Err(TemplateError::SizeMismatch {
            path: state_path,
            expected: manifest.state.size_bytes,
            actual: state_size,
        });
    }
    let state_bytes = fs::read(&state_path).map_err(|e| missing_or_io("read", &state_path, e))?;
    check_state_sha256(&manifest, &state_bytes, &state_path)?;
    state::check_from(&state_bytes, &state_path)?;

    if full {
        if let Some(recorded) = &manifest.memory_sha256 {
            let actual = durable::sha256_file_hex(&memory_path)
                .map_err(|e| io_error("read", &memory_path, e))?;
            if !actual.eq_ignore_ascii_case(recorded) {
                return Err(TemplateError::ChecksumMismatch {
                    path: memory_path,
                    expected: recorded.clone(),
                    actual,
                });
            }
        }
    }

    if let Some(requested) = expected {
        manifest
            .config
            .compatible_with(requested)
            .map_err(|mismatch| TemplateError::ConfigMismatch {
                dir: dir.to_owned(),
                mismatch,
            })?;
    }
    Ok(Template {
        dir: dir.to_owned(),
        manifest,
    })
}

fn check_state_sha256(manifest: &Manifest, bytes: &[u8], path: &Path) -> Result<(), TemplateError> {
    let actual = durable::sha256_hex(bytes);
    if actual.eq_ignore_ascii_case(&manifest.state.sha256) {
        Ok(())
    } else {
        Err(TemplateError::ChecksumMismatch {
            path: path.to_owned(),
            expected: manifest.state.sha256.clone(),
            actual,
        })
    }
}

fn regular_file_size(path: &Path) -> Result<u64, TemplateError> {
    let meta = fs::metadata(path).map_err(|e| missing_or_io("inspect", path, e))?;
    if !meta.is_file() {
        return Err(TemplateError::NotAFile {
            path: path.to_owned(),
        });
    }
    Ok(meta.len())
}

fn rename(from: &Path, to: &Path) -> Result<(), TemplateError> {
    fs::rename(from, to).map_err(|e| missing_or_io("rename", from, e))
}

fn missing_or_io(op: &'static str, path: &Path, source: io::Error) -> TemplateError {
    if source.kind() == io::ErrorKind::NotFound {
        TemplateError::MissingFile {
            path: path.to_owned(),
        }
    } else {
        io_error(op, path, source)
    }
}

fn io_error(op: &'static str, path: &Path, source: io::Error) -> TemplateError {
    TemplateError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests;
