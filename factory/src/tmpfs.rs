//! Template directories belong on tmpfs: guest RAM of every clone is served
//! from the template's page cache, which must never be written back to disk.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::FactoryError;

/// statfs f_type of tmpfs (include/uapi/linux/magic.h TMPFS_MAGIC).
pub const TMPFS_MAGIC: i64 = 0x0102_1994;

fn host_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FactoryError {
    let path = path.to_path_buf();
    move |source| FactoryError::Host { what, path, source }
}

fn c_path(path: &Path) -> Result<CString, FactoryError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| FactoryError::Host {
        what: "path with a NUL byte:",
        path: path.to_path_buf(),
        source: std::io::ErrorKind::InvalidInput.into(),
    })
}

/// The statfs filesystem magic of `path`.
pub fn fs_type(path: &Path) -> Result<i64, FactoryError> {
    let c = c_path(path)?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statfs.
    let rc = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(host_err("cannot statfs", path)(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: statfs returned 0, so it filled the struct.
    Ok(unsafe { st.assume_init() }.f_type)
}

/// Error unless `dir` is on tmpfs.
pub fn require_tmpfs(dir: &Path) -> Result<(), FactoryError> {
    let t = fs_type(dir)?;
    if t == TMPFS_MAGIC {
        Ok(())
    } else {
        Err(FactoryError::NotTmpfs {
            dir: dir.to_path_buf(),
            fs_type: format!("filesystem {t:#x}"),
        })
    }
}

/// Mount a fresh tmpfs on `dir` (root only), unless it already is tmpfs.
pub fn mount_tmpfs(dir: &Path) -> Result<(), FactoryError> {
    std::fs::create_dir_all(dir).map_err(host_err("cannot create", dir))?;
    if fs_type(dir)? == TMPFS_MAGIC {
        return Ok(());
    }
    let target = c_path(dir)?;
    let source = CString::new("tmpfs").expect("static string");
    let options = CString::new("mode=0700").expect("static string");
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            source.as_ptr(),
            0,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(host_err("cannot mount tmpfs on", dir)(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_shm_is_tmpfs_and_proc_is_not() {
        assert_eq!(fs_type(Path::new("/dev/shm")).unwrap(), TMPFS_MAGIC);
        assert!(matches!(
            require_tmpfs(Path::new("/proc")),
            Err(FactoryError::NotTmpfs { .. })
        ));
        assert!(fs_type(Path::new("/nonexistent/dir")).is_err());
    }
}
