//! Opening template files safely and sealing the committed memory file.
//!
//! Template files are opened relative to the template directory's fd, with
//! O_NOFOLLOW (a symlink is refused, not followed out of the template) and
//! O_NONBLOCK (a FIFO put in place of a file must not block the open), and
//! must be regular files. The committed memory file is sealed with
//! FS_IMMUTABLE_FL: then not even root may write, truncate, rename or unlink
//! it until the flag is cleared (tmpfs honours it).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// `FS_IOC_GETFLAGS`: `_IOR('f', 1, long)` (include/uapi/linux/fs.h).
const FS_IOC_GETFLAGS: libc::c_ulong = 0x8008_6601;
/// `FS_IOC_SETFLAGS`: `_IOW('f', 2, long)` (include/uapi/linux/fs.h).
const FS_IOC_SETFLAGS: libc::c_ulong = 0x4008_6602;
/// `FS_IMMUTABLE_FL` (include/uapi/linux/fs.h).
pub const FS_IMMUTABLE_FL: libc::c_int = 0x10;

/// Identity of an open file: the file it is, and its size and last change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileIdentity {
    /// Device of the filesystem.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, seconds.
    pub mtime_sec: i64,
    /// Last modification, nanoseconds.
    pub mtime_nsec: i64,
}

impl FileIdentity {
    /// The identity of `file` now (fstat).
    pub fn of(file: &File) -> io::Result<Self> {
        let m = file.metadata()?;
        Ok(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime_sec: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        })
    }
}

fn c_name(name: &Path) -> io::Result<CString> {
    CString::new(name.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput.into())
}

/// Opens a directory for `openat`.
pub(crate) fn open_dir(dir: &Path) -> io::Result<File> {
    let c = c_name(dir)?;
    // SAFETY: `c` is a valid NUL-terminated path; the returned fd is owned below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Why a template file could not be opened as a regular file.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// No such file.
    Missing,
    /// A symlink, FIFO, device, directory or socket.
    NotRegular,
    /// Anything else.
    Io(io::Error),
}

/// Opens `name` inside `dir` read-only with O_NOFOLLOW|O_NONBLOCK and
/// refuses anything but a regular file.
pub(crate) fn open_regular_at(dir: &File, name: &str) -> Result<File, OpenError> {
    let c = c_name(Path::new(name)).map_err(OpenError::Io)?;
    // SAFETY: `dir` is an open directory fd and `c` a valid NUL-terminated
    // name; the returned fd is owned below.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ENOENT) => OpenError::Missing,
            // O_NOFOLLOW on a symlink.
            Some(libc::ELOOP) => OpenError::NotRegular,
            _ => OpenError::Io(e),
        });
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    match file.metadata() {
        Ok(m) if m.is_file() => Ok(file),
        Ok(_) => Err(OpenError::NotRegular),
        Err(e) => Err(OpenError::Io(e)),
    }
}

/// The inode flags of an open file (FS_IOC_GETFLAGS).
pub fn inode_flags(file: &File) -> io::Result<libc::c_int> {
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int (the kernel reads and writes an
    // int despite the `long` in the macro) to the valid pointer given.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_GETFLAGS, &mut flags) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags)
}

/// Whether an open file carries FS_IMMUTABLE_FL (false if the filesystem
/// has no inode flags).
pub fn is_immutable(file: &File) -> bool {
    inode_flags(file).is_ok_and(|f| f & FS_IMMUTABLE_FL != 0)
}

/// Sets or clears FS_IMMUTABLE_FL on an open file (needs CAP_LINUX_IMMUTABLE).
pub fn set_immutable(file: &File, immutable: bool) -> io::Result<()> {
    let flags = inode_flags(file)?;
    let wanted = if immutable {
        flags | FS_IMMUTABLE_FL
    } else {
        flags & !FS_IMMUTABLE_FL
    };
    if wanted == flags {
        return Ok(());
    }
    // SAFETY: FS_IOC_SETFLAGS reads one int from the valid pointer given.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_SETFLAGS, &wanted) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Clears FS_IMMUTABLE_FL on `path` if it is a regular file that has it
/// (without following symlinks); anything else is left alone.
pub(crate) fn clear_immutable_at(path: &Path) -> io::Result<()> {
    let c = c_name(path)?;
    // SAFETY: `c` is a valid NUL-terminated path; the returned fd is owned below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ELOOP) => Ok(()),
            _ => Err(e),
        };
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    if !file.metadata()?.is_file() || !is_immutable(&file) {
        return Ok(());
    }
    set_immutable(&file, false)
}

/// Atomically swaps two paths on one filesystem (renameat2 RENAME_EXCHANGE).
pub(crate) fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    let (ca, cb) = (c_name(a)?, c_name(b)?);
    // SAFETY: both are valid NUL-terminated paths; renameat2 only reads them.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
