//! Guest RAM and its backends: anonymous memory, a file mapped MAP_SHARED
//! (building a template: guest writes land in the file) and a file mapped
//! MAP_PRIVATE|MAP_NORESERVE (a clone: reads share the page cache, writes
//! copy a page and never reach the file), either opened by path or handed
//! over as an already open file (a template's memory, held by fd so that a
//! file put in its place later is never mapped).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::layout;

/// How guest RAM is backed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemoryBackend {
    /// Private anonymous memory.
    Anonymous,
    /// A file (created and sized if needed) mapped MAP_SHARED.
    SharedFile(PathBuf),
    /// An existing file mapped MAP_PRIVATE|MAP_NORESERVE (copy-on-write).
    PrivateFile(PathBuf),
    /// An already open file mapped MAP_PRIVATE|MAP_NORESERVE from its fd.
    PrivateFd(OpenMemoryFile),
}

/// An open guest RAM file and the path it was opened from (for messages).
/// Clones share one: each maps a dup of the same fd.
#[derive(Clone, Debug)]
pub struct OpenMemoryFile {
    file: Arc<File>,
    path: PathBuf,
}

impl OpenMemoryFile {
    /// Wrap `file`, opened from `path`.
    pub fn new(file: impl Into<Arc<File>>, path: PathBuf) -> Self {
        OpenMemoryFile {
            file: file.into(),
            path,
        }
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl PartialEq for OpenMemoryFile {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.file, &other.file)
    }
}

impl Eq for OpenMemoryFile {}

/// Errors creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is outside what we support.
    #[error("guest memory of {mib} MiB is out of range ({min}..={max} MiB)")]
    SizeOutOfRange {
        /// Requested MiB.
        mib: u64,
        /// Smallest supported.
        min: u64,
        /// Largest supported.
        max: u64,
    },
    /// The memory file could not be opened or created.
    #[error("cannot open memory file {path}: {source}")]
    OpenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The memory file could not be sized.
    #[error("cannot size memory file {path} to {size} bytes: {source}")]
    SizeFile {
        /// The file.
        path: PathBuf,
        /// Wanted size.
        size: u64,
        /// Why.
        source: std::io::Error,
    },
    /// A private (copy-on-write) memory file is smaller than guest RAM.
    #[error("memory file {path} is {actual} bytes, guest RAM needs {expected}")]
    FileTooSmall {
        /// The file.
        path: PathBuf,
        /// Needed bytes.
        expected: u64,
        /// File bytes.
        actual: u64,
    },
    /// mmap failed.
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Mmap {
        /// Mapping size.
        size: u64,
        /// Why.
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The regions could not be assembled (overlap; a bug).
    #[error("invalid guest memory layout: {0}")]
    Layout(String),
}

/// Guest RAM: the vm-memory view plus how it is backed.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    backend: MemoryBackend,
    size: u64,
}

impl GuestRam {
    /// Map `mem_mib` MiB of guest RAM with `backend`, laid out around the
    /// 32-bit MMIO gap. Files are addressed linearly: RAM above 4 GiB follows
    /// the low part in the file.
    pub fn new(mem_mib: u64, backend: MemoryBackend) -> Result<Self, MemoryError> {
        if !(layout::MIN_MEM_MIB..=layout::MAX_MEM_MIB).contains(&mem_mib) {
            return Err(MemoryError::SizeOutOfRange {
                mib: mem_mib,
                min: layout::MIN_MEM_MIB,
                max: layout::MAX_MEM_MIB,
            });
        }
        let size = mem_mib << 20;
        let file = match &backend {
            MemoryBackend::Anonymous => None,
            MemoryBackend::SharedFile(path) => Some(open_shared(path, size)?),
            MemoryBackend::PrivateFile(path) => Some(open_private(path, size)?),
            MemoryBackend::PrivateFd(open) => {
                let file = open
                    .file()
                    .try_clone()
                    .map_err(|source| MemoryError::OpenFile {
                        path: open.path().to_path_buf(),
                        source,
                    })?;
                check_private_size(&file, open.path(), size)?;
                Some(file)
            }
        };
        let (prot, flags) = match backend {
            MemoryBackend::Anonymous => (
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            ),
            MemoryBackend::SharedFile(_) => (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED),
            MemoryBackend::PrivateFile(_) | MemoryBackend::PrivateFd(_) => (
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            ),
        };
        let mut regions = Vec::new();
        let mut file_offset = 0u64;
        for (start, len) in layout::ram_regions(size) {
            let fo = match &file {
                Some(f) => Some(FileOffset::new(
                    f.try_clone().map_err(|e| MemoryError::OpenFile {
                        path: backend_path(&backend).to_path_buf(),
                        source: e,
                    })?,
                    file_offset,
                )),
                None => None,
            };
            let region = MmapRegion::build(fo, len as usize, prot, flags)
                .map_err(|source| MemoryError::Mmap { size: len, source })?;
            regions.push(
                GuestRegionMmap::new(region, GuestAddress(start)).ok_or_else(|| {
                    MemoryError::Layout(format!("region at {start:#x} overflows"))
                })?,
            );
            file_offset += len;
        }
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| MemoryError::Layout(e.to_string()))?;
        Ok(GuestRam { mem, backend, size })
    }

    /// The vm-memory view (checked accessors for everything guest-controlled).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The backend this RAM was created with.
    pub fn backend(&self) -> &MemoryBackend {
        &self.backend
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}

fn backend_path(backend: &MemoryBackend) -> &Path {
    match backend {
        MemoryBackend::SharedFile(p) | MemoryBackend::PrivateFile(p) => p,
        MemoryBackend::PrivateFd(open) => open.path(),
        MemoryBackend::Anonymous => Path::new(""),
    }
}

fn open_shared(path: &Path, size: u64) -> Result<File, MemoryError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| MemoryError::OpenFile {
            path: path.to_path_buf(),
            source,
        })?;
    let len = file_len(&file, path)?;
    if len < size {
        file.set_len(size).map_err(|source| MemoryError::SizeFile {
            path: path.to_path_buf(),
            size,
            source,
        })?;
    }
    Ok(file)
}

fn open_private(path: &Path, size: u64) -> Result<File, MemoryError> {
    let file = File::open(path).map_err(|source| MemoryError::OpenFile {
        path: path.to_path_buf(),
        source,
    })?;
    check_private_size(&file, path, size)?;
    Ok(file)
}

/// A copy-on-write file must cover guest RAM: pages past its end would fault
/// with SIGBUS when the guest touches them.
fn check_private_size(file: &File, path: &Path, size: u64) -> Result<(), MemoryError> {
    let actual = file_len(file, path)?;
    if actual < size {
        return Err(MemoryError::FileTooSmall {
            path: path.to_path_buf(),
            expected: size,
            actual,
        });
    }
    Ok(())
}

fn file_len(file: &File, path: &Path) -> Result<u64, MemoryError> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|source| MemoryError::OpenFile {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("minivmm-mem-{}-{name}", std::process::id()))
    }

    #[test]
    fn shared_file_sees_guest_writes_private_does_not() {
        let path = tmp("shared");
        let _ = std::fs::remove_file(&path);
        {
            let ram = GuestRam::new(32, MemoryBackend::SharedFile(path.clone())).unwrap();
            ram.memory()
                .write_obj(0xabcdu32, GuestAddress(0x1000))
                .unwrap();
        }
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 32 << 20);
        assert_eq!(&bytes[0x1000..0x1004], &0xabcdu32.to_le_bytes());
        {
            let ram = GuestRam::new(32, MemoryBackend::PrivateFile(path.clone())).unwrap();
            let v: u32 = ram.memory().read_obj(GuestAddress(0x1000)).unwrap();
            assert_eq!(v, 0xabcd);
            ram.memory()
                .write_obj(0x1234u32, GuestAddress(0x1000))
                .unwrap();
        }
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[0x1000..0x1004], &0xabcdu32.to_le_bytes());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn private_fd_maps_the_open_file_not_what_is_at_its_path_now() {
        let path = tmp("fd");
        std::fs::write(&path, vec![0x5au8; 32 << 20]).unwrap();
        let open = OpenMemoryFile::new(File::open(&path).unwrap(), path.clone());
        // Another file takes the name: the open fd still maps the first one.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, vec![0x11u8; 32 << 20]).unwrap();
        let ram = GuestRam::new(32, MemoryBackend::PrivateFd(open.clone())).unwrap();
        let v: u8 = ram.memory().read_obj(GuestAddress(0x2000)).unwrap();
        assert_eq!(v, 0x5a);
        ram.memory()
            .write_obj(0x77u8, GuestAddress(0x2000))
            .unwrap();
        drop(ram);
        // Copy-on-write: the open file did not change.
        let again = GuestRam::new(32, MemoryBackend::PrivateFd(open.clone())).unwrap();
        let v: u8 = again.memory().read_obj(GuestAddress(0x2000)).unwrap();
        assert_eq!(v, 0x5a);
        // Too small for the RAM asked for: an error naming the path.
        let err = GuestRam::new(64, MemoryBackend::PrivateFd(open))
            .err()
            .unwrap();
        assert!(matches!(err, MemoryError::FileTooSmall { .. }), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn bad_sizes_and_files_are_errors() {
        assert!(matches!(
            GuestRam::new(0, MemoryBackend::Anonymous),
            Err(MemoryError::SizeOutOfRange { .. })
        ));
        assert!(matches!(
            GuestRam::new(1 << 40, MemoryBackend::Anonymous),
            Err(MemoryError::SizeOutOfRange { .. })
        ));
        let path = tmp("small");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let err = GuestRam::new(32, MemoryBackend::PrivateFile(path.clone()))
            .err()
            .unwrap();
        assert!(err.to_string().contains("4096 bytes"), "{err}");
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            GuestRam::new(32, MemoryBackend::PrivateFile(tmp("missing"))),
            Err(MemoryError::OpenFile { .. })
        ));
    }

    #[test]
    fn high_memory_is_relocated_above_4g() {
        let ram = GuestRam::new((4 << 10) + 16, MemoryBackend::Anonymous).unwrap();
        let mem = ram.memory();
        assert_eq!(mem.num_regions(), 2);
        assert!(mem.address_in_range(GuestAddress(layout::MMIO_GAP_START - 1)));
        assert!(!mem.address_in_range(GuestAddress(layout::MMIO_GAP_START)));
        assert!(mem.address_in_range(GuestAddress(layout::MMIO_GAP_END)));
    }
}
