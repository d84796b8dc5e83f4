//! The template directory: guest RAM (`memory`), device and vCPU state
//! (`state`) and a JSON `manifest` that vouches for both.
//!
//! A template is valid only once its manifest exists, and the manifest is
//! renamed into place last; removal deletes it first. The manifest records
//! sizes and checksums, so a stale manifest cannot vouch for newer files, and
//! the build that wrote it (format version, state schema), so another build
//! refuses it in one line instead of misreading it.
//!
//! The committed memory file is read-only (0444) and immutable
//! (FS_IMMUTABLE_FL): clones map it copy-on-write and nothing may change it
//! under them. A rebuild over a committed template happens in a sibling
//! directory that is swapped in atomically (RENAME_EXCHANGE), so a failed
//! rebuild leaves the old template as it was.
//!
//! Files are opened relative to the template directory's fd, never
//! following symlinks and never blocking on a FIFO, and must be regular.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::durable;
use crate::fsfile::{self, FileIdentity, OpenError};
use crate::state::{self, StateError};
use crate::MINIVMM_VERSION;

/// Name of the guest RAM file inside a template directory.
pub const MEMORY_FILE: &str = "memory";
/// Name of the state file inside a template directory.
pub const STATE_FILE: &str = "state";
/// Name of the manifest inside a template directory.
pub const MANIFEST_FILE: &str = "manifest";
/// Manifest format version written by this build, and the only one it reads.
/// Version 2 added `state_schema` and `memory.immutable`.
pub const TEMPLATE_FORMAT_VERSION: u32 = 2;
/// Largest manifest accepted (a real one is under 2 KiB).
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Mode of the committed memory file: read-only for everyone.
pub const MEMORY_FILE_MODE: u32 = 0o444;

/// Largest state file accepted (254 vCPUs of state are a few MiB).
pub const MAX_STATE_BYTES: u64 = 64 << 20;

const MEMORY_PARTIAL: &str = "memory.partial";
const STATE_PARTIAL: &str = "state.partial";
const MANIFEST_PARTIAL: &str = "manifest.partial";
/// Every name a template directory may hold.
const TEMPLATE_NAMES: [&str; 6] = [
    MANIFEST_FILE,
    MEMORY_FILE,
    STATE_FILE,
    MEMORY_PARTIAL,
    STATE_PARTIAL,
    MANIFEST_PARTIAL,
];

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
    /// Whether the commit sealed it with FS_IMMUTABLE_FL (it could not where
    /// the filesystem or the caller's capabilities do not allow it); a sealed
    /// file that lost the flag is refused.
    pub immutable: bool,
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
    /// Identity of the schema of the state file's payload (given by the
    /// VMM that wrote it); a reader with another one cannot decode it.
    pub state_schema: String,
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
    /// Lower-case hex SHA-256 of this manifest's compact JSON with `digest`
    /// empty: a flipped bit in any field (cmdline, kernel hash...) is caught.
    #[serde(default)]
    pub digest: String,
}

impl Manifest {
    /// The digest this manifest's fields give (see [`Manifest::digest`]).
    pub fn compute_digest(&self) -> String {
        let unsigned = Manifest {
            digest: String::new(),
            ..self.clone()
        };
        // Serializing a plain struct of strings and integers cannot fail.
        durable::sha256_hex(&serde_json::to_vec(&unsigned).unwrap_or_default())
    }
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
    /// The manifest's fields do not give the digest it records.
    #[error("manifest {} was changed or corrupted after commit: it records digest {recorded}, its fields give {actual}", .path.display())]
    ManifestDigest {
        /// Manifest file.
        path: PathBuf,
        /// Digest in the manifest.
        recorded: String,
        /// Digest of its fields.
        actual: String,
    },
    /// A directory to remove holds something a template never does.
    #[error("refusing to remove {}: it holds `{entry}`, which is not a template file", .dir.display())]
    NotATemplate {
        /// The directory.
        dir: PathBuf,
        /// The first foreign entry.
        entry: String,
    },
    /// The manifest is larger than any real one.
    #[error("manifest {} is {size} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have", .path.display())]
    ManifestTooLarge {
        /// Manifest file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The template was written by a build whose formats this one cannot read.
    #[error(
        "template {} was made by an incompatible build (minivmm {found_version}, {what} {found}; this is minivmm {MINIVMM_VERSION}, {what} {expected}): rebuild it",
        .dir.display()
    )]
    IncompatibleBuild {
        /// Template directory.
        dir: PathBuf,
        /// minivmm version recorded in the manifest.
        found_version: String,
        /// What differs: "manifest format" or "state schema".
        what: &'static str,
        /// The template's value.
        found: String,
        /// This build's value.
        expected: String,
    },
    /// A manifest value is impossible on its own or against another field.
    #[error("manifest {} has {field} = {value}: {why}", .path.display())]
    BadManifestValue {
        /// Manifest file.
        path: PathBuf,
        /// Field at fault.
        field: &'static str,
        /// Its value.
        value: String,
        /// Why it cannot be.
        why: String,
    },
    /// The open memory file changed since the template was validated.
    #[error("template memory file {} changed since it was opened (was {before:?}, now {now:?})", .path.display())]
    MemoryChanged {
        /// The memory file.
        path: PathBuf,
        /// Identity when validated.
        before: FileIdentity,
        /// Identity now.
        now: FileIdentity,
    },
    /// A file that must not be written is a committed template's memory.
    #[error("{} is the memory file of the committed template {} and is never written after commit (map it --private, or copy it)", .path.display(), .template.display())]
    TemplateMemory {
        /// The file asked for.
        path: PathBuf,
        /// The template it belongs to (or the file itself when only its
        /// immutable flag tells).
        template: PathBuf,
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
    /// A template file is not a regular file (a symlink, FIFO, device...).
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
    /// Where the files are written: the template directory itself, or a
    /// sibling staging directory when a committed template is replaced.
    dir: PathBuf,
    /// The template directory a staging directory is swapped into.
    replaces: Option<PathBuf>,
    record_memory_sha256: bool,
}

impl TemplateWriter {
    /// Starts a template in `dir` (created if missing); refuses if a committed
    /// template is already there.
    pub fn create(dir: impl AsRef<Path>) -> Result<Self, TemplateError> {
        Self::begin(dir.as_ref(), false)
    }

    /// Starts a template that replaces whatever is in `dir`. A committed
    /// template stays valid (and untouched) until [`commit`](Self::commit)
    /// swaps the new one in atomically; if the build fails, it stays. (When
    /// `dir` is a mount point no sibling can be swapped with it: the old
    /// template is then invalidated first and rebuilt in place.)
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
        self.replaces.as_deref().unwrap_or(&self.dir)
    }

    /// Temporary guest RAM file for the VMM to create, size and map
    /// MAP_SHARED; it becomes `memory` at commit.
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

    /// Makes the template valid: fsyncs guest RAM, seals it (0444,
    /// immutable), renames memory and state into place, then writes the
    /// manifest (recording `state_schema`, the identity of the state's
    /// payload schema) and renames it in last; a replacement is then swapped
    /// with the old template, which is removed.
    pub fn commit(
        self,
        config: &GuestConfig,
        state_schema: &str,
        notes: &str,
    ) -> Result<Manifest, TemplateError> {
        self.commit_through(config, state_schema, notes, CommitStep::SyncDir)
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
        let committed = match fs::symlink_metadata(&manifest) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_error("inspect", &manifest, e)),
        };
        if committed && !overwrite {
            return Err(TemplateError::AlreadyExists {
                dir: dir.to_owned(),
            });
        }
        if committed {
            if let Some(staging) = staging_dir(dir)? {
                // Leftovers of a crashed rebuild by the same pid are stale too.
                remove_staging_leftovers(dir);
                remove(&staging)?;
                fs::create_dir(&staging).map_err(|e| io_error("create directory", &staging, e))?;
                return Ok(Self {
                    dir: staging,
                    replaces: Some(dir.to_owned()),
                    record_memory_sha256: false,
                });
            }
            // A mount point: rebuild in place, invalid from here on.
            fs::remove_file(&manifest).map_err(|e| io_error("remove", &manifest, e))?;
            durable::sync_dir(dir).map_err(|e| io_error("sync", dir, e))?;
        }
        // Leftovers of a crashed build (no manifest, so nothing vouches for
        // them): the VMM must start from an empty RAM file, and a sealed
        // `memory` must be unsealed before a new one can take its name.
        for name in [
            MEMORY_PARTIAL,
            STATE_PARTIAL,
            MANIFEST_PARTIAL,
            MEMORY_FILE,
            STATE_FILE,
        ] {
            let path = dir.join(name);
            fsfile::clear_immutable_at(&path).map_err(|e| io_error("unseal", &path, e))?;
            durable::remove_if_present(&path).map_err(|e| io_error("remove", &path, e))?;
        }
        Ok(Self {
            dir: dir.to_owned(),
            replaces: None,
            record_memory_sha256: false,
        })
    }

    /// Runs the commit up to and including `last`; stopping early simulates a
    /// crash in tests.
    fn commit_through(
        self,
        config: &GuestConfig,
        state_schema: &str,
        notes: &str,
        last: CommitStep,
    ) -> Result<Manifest, TemplateError> {
        let dir = &self.dir;
        let memory_partial = dir.join(MEMORY_PARTIAL);
        let state_partial = dir.join(STATE_PARTIAL);

        let memory =
            File::open(&memory_partial).map_err(|e| missing_or_io("open", &memory_partial, e))?;
        memory
            .sync_all()
            .map_err(|e| io_error("sync", &memory_partial, e))?;
        let memory_size = memory
            .metadata()
            .map_err(|e| io_error("inspect", &memory_partial, e))?
            .len();
        // Read-only before it gets its final name: no writer can open it from then on.
        memory
            .set_permissions(fs::Permissions::from_mode(MEMORY_FILE_MODE))
            .map_err(|e| io_error("make read-only", &memory_partial, e))?;
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
        let mut manifest = Manifest {
            format_version: TEMPLATE_FORMAT_VERSION,
            minivmm_version: MINIVMM_VERSION.to_owned(),
            state_schema: state_schema.to_owned(),
            created_unix_secs: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            config: config.clone(),
            memory: MemoryFileEntry {
                file: MEMORY_FILE.to_owned(),
                size_bytes: memory_size,
                immutable: false,
            },
            state: StateFileEntry {
                file: STATE_FILE.to_owned(),
                size_bytes: state_bytes.len() as u64,
                sha256: durable::sha256_hex(&state_bytes),
            },
            memory_sha256,
            notes: notes.to_owned(),
            digest: String::new(),
        };
        if last == CommitStep::SyncMemory {
            return Ok(manifest);
        }

        rename(&memory_partial, &dir.join(MEMORY_FILE))?;
        // Sealed after the rename (an immutable file cannot be renamed).
        // Where the filesystem has no such flag or the caller lacks
        // CAP_LINUX_IMMUTABLE the manifest says so and the mode must do.
        manifest.memory.immutable = fsfile::set_immutable(&memory, true).is_ok();
        drop(memory);
        if last == CommitStep::RenameMemory {
            return Ok(manifest);
        }
        rename(&state_partial, &dir.join(STATE_FILE))?;
        if last == CommitStep::RenameState {
            return Ok(manifest);
        }

        let manifest_partial = dir.join(MANIFEST_PARTIAL);
        manifest.digest = manifest.compute_digest();
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
        if let Some(target) = &self.replaces {
            // The replacement point: one rename swaps the whole directory, so
            // a reader sees the old template or the new one, never a mix.
            fsfile::exchange(dir, target).map_err(|e| io_error("swap in", target, e))?;
            durable::sync_parent_dir(target).map_err(|e| io_error("sync parent of", target, e))?;
            // `dir` now holds the old template (Drop removes it).
            return Ok(manifest);
        }
        durable::sync_parent_dir(dir).map_err(|e| io_error("sync parent of", dir, e))?;
        Ok(manifest)
    }
}

impl Drop for TemplateWriter {
    /// A staging directory never outlives its writer: it holds either an
    /// unfinished replacement or, after the swap, the old template.
    fn drop(&mut self) {
        if self.replaces.is_some() {
            let _ = remove(&self.dir);
        }
    }
}

/// Prefix of the sibling directory a replacement of `dir` is built in.
fn staging_prefix(dir: &Path) -> Option<String> {
    let name = dir.file_name()?.to_string_lossy().into_owned();
    Some(format!(".{name}.rebuild-"))
}

/// `<parent>/.<name>.rebuild-<pid>`, or None if `dir` is a mount point (or
/// the root) and so cannot be swapped with a sibling.
fn staging_dir(dir: &Path) -> Result<Option<PathBuf>, TemplateError> {
    let dir = fs::canonicalize(dir).map_err(|e| io_error("resolve", dir, e))?;
    let (Some(parent), Some(prefix)) = (dir.parent(), staging_prefix(&dir)) else {
        return Ok(None);
    };
    let dev = |p: &Path| {
        fs::metadata(p)
            .map(|m| m.dev())
            .map_err(|e| io_error("inspect", p, e))
    };
    if dev(&dir)? != dev(parent)? {
        return Ok(None);
    }
    Ok(Some(parent.join(format!("{prefix}{}", std::process::id()))))
}

/// Removes staging directories of `dir` left by processes that are gone.
fn remove_staging_leftovers(dir: &Path) {
    let Ok(dir) = fs::canonicalize(dir) else {
        return;
    };
    let (Some(parent), Some(prefix)) = (dir.parent(), staging_prefix(&dir)) else {
        return;
    };
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(&prefix)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = remove(e.path());
        }
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

/// A committed template whose files matched its manifest when opened. It
/// holds the memory file open and the state bytes it checked: clones map
/// that file and decode that state, whatever happens to the paths later.
#[derive(Debug, Clone)]
pub struct Template {
    dir: PathBuf,
    manifest: Manifest,
    memory: Arc<File>,
    memory_identity: FileIdentity,
    state_bytes: Arc<[u8]>,
}

impl Template {
    /// Opens a template with the fast checks of [`validate`] and no config check.
    pub fn open(dir: impl AsRef<Path>, state_schema: &str) -> Result<Self, TemplateError> {
        validate(dir, state_schema, None)
    }

    /// The template directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the guest RAM file (for messages: clones map [`memory_file`](Self::memory_file)).
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }

    /// State file path.
    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The manifest as read and checked.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The memory file as opened and validated, to be mapped MAP_PRIVATE.
    pub fn memory_file(&self) -> &Arc<File> {
        &self.memory
    }

    /// Whether the memory file carries FS_IMMUTABLE_FL now. A copy of a
    /// template (cp does not copy inode flags) or one whose flag was cleared
    /// does not; callers warn, and [`check_memory_unchanged`](Self::check_memory_unchanged)
    /// still catches changes made after validation.
    pub fn memory_sealed(&self) -> bool {
        fsfile::is_immutable(&self.memory)
    }

    /// Identity (inode, size, mtime) of the memory file when it was validated.
    pub fn memory_identity(&self) -> FileIdentity {
        self.memory_identity
    }

    /// Checks that the open memory file is still what was validated: same
    /// size and modification time (a template on a filesystem without the
    /// immutable flag could otherwise be changed under its clones).
    pub fn check_memory_unchanged(&self) -> Result<(), TemplateError> {
        let path = self.memory_path();
        let now = FileIdentity::of(&self.memory).map_err(|e| io_error("inspect", &path, e))?;
        if now != self.memory_identity {
            return Err(TemplateError::MemoryChanged {
                path,
                before: self.memory_identity,
                now,
            });
        }
        Ok(())
    }

    /// Checks the manifest's own digest. Kept apart from [`validate`] so a
    /// caller can first cross-check the fields it can verify (vCPUs, memory,
    /// devices against the decoded state) and name the field at fault; any
    /// other change of the manifest is caught here.
    pub fn check_manifest_digest(&self) -> Result<(), TemplateError> {
        let actual = self.manifest.compute_digest();
        if actual != self.manifest.digest {
            return Err(TemplateError::ManifestDigest {
                path: self.dir.join(MANIFEST_FILE),
                recorded: self.manifest.digest.clone(),
                actual,
            });
        }
        Ok(())
    }

    /// Decodes the state bytes that were checked against the manifest.
    pub fn read_state<T: Serialize + DeserializeOwned>(&self) -> Result<T, TemplateError> {
        Ok(state::decode_from(&self.state_bytes, &self.state_path())?)
    }
}

/// Checks that `dir` holds a committed template written by a build with
/// this `state_schema`, whose files match its manifest (sizes, state SHA-256
/// and header) and, if given, whose config is compatible
/// with `expected`. Does not hash guest RAM.
pub fn validate(
    dir: impl AsRef<Path>,
    state_schema: &str,
    expected: Option<&GuestConfig>,
) -> Result<Template, TemplateError> {
    check_template(dir.as_ref(), state_schema, expected, false)
}

/// [`validate`], plus the SHA-256 of the memory file when the manifest
/// records one (`manifest().memory_sha256` tells whether it did).
pub fn validate_full(
    dir: impl AsRef<Path>,
    state_schema: &str,
    expected: Option<&GuestConfig>,
) -> Result<Template, TemplateError> {
    check_template(dir.as_ref(), state_schema, expected, true)
}

/// Removes a template: the manifest first, so a half-removed directory is
/// never valid, then the memory file's immutable flag, then everything
/// else. A missing directory is not an error; a directory holding anything
/// but template files is refused untouched.
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
    // Only ever a template: a mistyped --dir must not take a tree with it.
    let entries = fs::read_dir(dir).map_err(|e| io_error("list", dir, e))?;
    for entry in entries {
        let name = entry.map_err(|e| io_error("list", dir, e))?.file_name();
        if !TEMPLATE_NAMES.iter().any(|n| name == *n) {
            return Err(TemplateError::NotATemplate {
                dir: dir.to_owned(),
                entry: name.to_string_lossy().into_owned(),
            });
        }
    }
    let manifest = dir.join(MANIFEST_FILE);
    durable::remove_if_present(&manifest).map_err(|e| io_error("remove", &manifest, e))?;
    durable::sync_dir(dir).map_err(|e| io_error("sync", dir, e))?;
    let entries = fs::read_dir(dir).map_err(|e| io_error("list", dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| io_error("list", dir, e))?.path();
        fsfile::clear_immutable_at(&path).map_err(|e| io_error("unseal", &path, e))?;
    }
    fs::remove_dir_all(dir).map_err(|e| io_error("remove", dir, e))
}

/// Refuses `path` as a file to write (e.g. guest RAM mapped MAP_SHARED) if
/// it is a committed template's memory file: immutable, or the `memory` of
/// a directory with a manifest. A missing file is fine.
pub fn refuse_template_memory(path: &Path) -> Result<(), TemplateError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Some(name) = path.file_name() else {
        return Ok(());
    };
    let dir = match fsfile::open_dir(parent) {
        Ok(d) => d,
        Err(_) => return Ok(()),
    };
    let file = match fsfile::open_regular_at(&dir, &name.to_string_lossy()) {
        Ok(f) => f,
        Err(_) => return Ok(()),
    };
    let refuse = |template: &Path| TemplateError::TemplateMemory {
        path: path.to_owned(),
        template: template.to_owned(),
    };
    if fsfile::is_immutable(&file) {
        let template = if parent.join(MANIFEST_FILE).exists() {
            parent
        } else {
            path
        };
        return Err(refuse(template));
    }
    if parent.join(MANIFEST_FILE).exists() {
        if let Ok(memory) = fsfile::open_regular_at(&dir, MEMORY_FILE) {
            let (a, b) = (FileIdentity::of(&file), FileIdentity::of(&memory));
            if let (Ok(a), Ok(b)) = (a, b) {
                if (a.dev, a.ino) == (b.dev, b.ino) {
                    return Err(refuse(parent));
                }
            }
        }
    }
    Ok(())
}

/// Opens `name` in the template directory as a regular file.
fn open_in(dir_fd: &File, dir: &Path, name: &str) -> Result<File, TemplateError> {
    let path = dir.join(name);
    fsfile::open_regular_at(dir_fd, name).map_err(|e| match e {
        OpenError::Missing => TemplateError::MissingFile { path },
        OpenError::NotRegular => TemplateError::NotAFile { path },
        OpenError::Io(e) => io_error("open", &path, e),
    })
}

/// The manifest fields that tell which build wrote it, read before the rest
/// so another build's manifest gets a clear refusal instead of a JSON error.
#[derive(Deserialize)]
struct ManifestProbe {
    format_version: u32,
    #[serde(default)]
    minivmm_version: String,
}

fn check_template(
    dir: &Path,
    state_schema: &str,
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
    // Every file is opened through this one fd: a directory swapped in by a
    // concurrent rebuild cannot mix its files with this one's.
    let dir_fd = fsfile::open_dir(dir).map_err(|e| io_error("open", dir, e))?;

    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest_file = match open_in(&dir_fd, dir, MANIFEST_FILE) {
        Err(TemplateError::MissingFile { .. }) => {
            return Err(TemplateError::Incomplete {
                dir: dir.to_owned(),
            })
        }
        other => other?,
    };
    let json = read_bounded(&manifest_file, &manifest_path, MAX_MANIFEST_BYTES)?;
    let manifest = parse_manifest(dir, &manifest_path, &json, state_schema)?;

    let memory_path = dir.join(MEMORY_FILE);
    let state_path = dir.join(STATE_FILE);
    let memory = open_in(&dir_fd, dir, MEMORY_FILE)?;
    let memory_identity =
        FileIdentity::of(&memory).map_err(|e| io_error("inspect", &memory_path, e))?;
    if memory_identity.size != manifest.memory.size_bytes {
        return Err(TemplateError::SizeMismatch {
            path: memory_path,
            expected: manifest.memory.size_bytes,
            actual: memory_identity.size,
        });
    }
    let state_file = open_in(&dir_fd, dir, STATE_FILE)?;
    let state_bytes =
        read_bounded(&state_file, &state_path, manifest.state.size_bytes).map_err(|e| match e {
            TemplateError::ManifestTooLarge { size, .. } => TemplateError::SizeMismatch {
                path: state_path.clone(),
                expected: manifest.state.size_bytes,
                actual: size,
            },
            other => other,
        })?;
    if state_bytes.len() as u64 != manifest.state.size_bytes {
        return Err(TemplateError::SizeMismatch {
            path: state_path,
            expected: manifest.state.size_bytes,
            actual: state_bytes.len() as u64,
        });
    }
    check_state_sha256(&manifest, &state_bytes, &state_path)?;
    state::check_from(&state_bytes, &state_path)?;

    if full {
        if let Some(recorded) = &manifest.memory_sha256 {
            let actual = durable::sha256_reader_hex(&memory)
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
        memory: Arc::new(memory),
        memory_identity,
        state_bytes: state_bytes.into(),
    })
}

/// Reads at most `limit` bytes; a longer file is reported with its size as
/// [`TemplateError::ManifestTooLarge`] (callers rename it for other files).
fn read_bounded(file: &File, path: &Path, limit: u64) -> Result<Vec<u8>, TemplateError> {
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| io_error("read", path, e))?;
    if bytes.len() as u64 > limit {
        let size = file
            .metadata()
            .map(|m| m.len())
            .unwrap_or(bytes.len() as u64);
        return Err(TemplateError::ManifestTooLarge {
            path: path.to_owned(),
            size,
        });
    }
    Ok(bytes)
}

/// Parses and checks a manifest: the build that wrote it first, then its
/// fields on their own and against each other.
fn parse_manifest(
    dir: &Path,
    path: &Path,
    json: &[u8],
    state_schema: &str,
) -> Result<Manifest, TemplateError> {
    let json_error = |source| TemplateError::ManifestJson {
        path: path.to_owned(),
        source,
    };
    let probe: ManifestProbe = serde_json::from_slice(json).map_err(json_error)?;
    if probe.format_version != TEMPLATE_FORMAT_VERSION {
        return Err(TemplateError::IncompatibleBuild {
            dir: dir.to_owned(),
            found_version: probe.minivmm_version,
            what: "manifest format",
            found: probe.format_version.to_string(),
            expected: TEMPLATE_FORMAT_VERSION.to_string(),
        });
    }
    let manifest: Manifest = serde_json::from_slice(json).map_err(json_error)?;
    if manifest.state_schema != state_schema {
        return Err(TemplateError::IncompatibleBuild {
            dir: dir.to_owned(),
            found_version: manifest.minivmm_version,
            what: "state schema",
            found: manifest.state_schema,
            expected: state_schema.to_owned(),
        });
    }
    // Fixed names: a manifest must not point clones at files outside the template.
    for (field, found, expected_name) in [
        ("memory.file", &manifest.memory.file, MEMORY_FILE),
        ("state.file", &manifest.state.file, STATE_FILE),
    ] {
        if found != expected_name {
            return Err(TemplateError::UnexpectedFileName {
                path: path.to_owned(),
                field,
                found: found.clone(),
                expected: expected_name,
            });
        }
    }
    let bad = |field, value: &dyn fmt::Display, why: String| TemplateError::BadManifestValue {
        path: path.to_owned(),
        field,
        value: value.to_string(),
        why,
    };
    if manifest.state.size_bytes > MAX_STATE_BYTES {
        return Err(bad(
            "state.size_bytes",
            &manifest.state.size_bytes,
            format!("a state file is at most {MAX_STATE_BYTES} bytes"),
        ));
    }
    let config = &manifest.config;
    if config.vcpus == 0 {
        return Err(bad("vcpus", &0, "a VM has at least one vCPU".into()));
    }
    if config.mem_mib == 0 {
        return Err(bad("mem_mib", &0, "a VM has some RAM".into()));
    }
    Ok(manifest)
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
