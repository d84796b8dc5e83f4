//! Sharing an extra host directory into a running VM's share (what Kata
//! left unimplemented): the directory is bind-mounted under a name inside
//! the shared directory, and unmounted (lazily, so files the guest still has
//! open do not block it) and its mount point removed again.
//!
//! virtiofsd's default sandbox runs it in its own mount namespace, copied
//! when it starts; a mount made later on the host reaches that copy only by
//! mount propagation. [`SharedDir::new`] therefore turns the shared directory
//! into a bind mount of itself with *shared* propagation, and must be called
//! before the daemon starts: the daemon's copy becomes a slave of it, so each
//! later bind mount under it — and each unmount — propagates into the
//! daemon's view. Start virtiofsd with `--announce-submounts` so a guest
//! driver that understands submounts sees the extra directory as its own
//! filesystem (distinct inode space).
//!
//! The guest can write into the share, so it could swap a fresh mount point
//! for a symlink between our mkdir and our mount: the mount point is opened
//! with `O_NOFOLLOW` relative to the shared directory and the mount targets
//! that open file (`/proc/self/fd/N`), never the path again.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Errors adding or removing an extra directory. Each names the path at fault.
#[derive(Debug, thiserror::Error)]
pub enum SubShareError {
    /// The shared directory or the extra host directory is not a directory.
    #[error("{path}: not an existing directory")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// The name is not one plain path component.
    #[error(
        "sub-share name {name:?} in {root}: must be one path component (no '/', '.', '..' or NUL)"
    )]
    BadName {
        /// The shared directory.
        root: PathBuf,
        /// The rejected name.
        name: String,
    },
    /// Something already exists under that name in the shared directory.
    #[error("{path} already exists")]
    Exists {
        /// The would-be mount point.
        path: PathBuf,
    },
    /// No extra directory of that name was added.
    #[error("{path}: no extra directory was shared there")]
    Unknown {
        /// The mount point asked for.
        path: PathBuf,
    },
    /// A system call failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path it was done on.
        path: PathBuf,
        /// errno.
        source: std::io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SubShareError {
    let path = path.to_path_buf();
    move |source| SubShareError::Io { what, path, source }
}

fn cstr(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn mount(source: Option<&Path>, target: &Path, flags: libc::c_ulong) -> std::io::Result<()> {
    let target = cstr(target)?;
    let source = source.map(cstr).transpose()?;
    // SAFETY: NUL-terminated strings that outlive the call; no fs type or data.
    check(unsafe {
        libc::mount(
            source.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    })
}

fn umount_detach(target: &Path) -> std::io::Result<()> {
    let target = cstr(target)?;
    // SAFETY: a NUL-terminated path; UMOUNT_NOFOLLOW keeps a symlink from
    // redirecting the unmount.
    check(unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) })
}

fn open_dir(path: &Path) -> std::io::Result<OwnedFd> {
    let c = cstr(path)?;
    // SAFETY: a NUL-terminated path; the returned fd is checked and owned.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether `path` is the mount point of a mount in this process's namespace
/// (per `/proc/self/mountinfo`, whose paths escape space, tab, newline and
/// backslash as octal).
pub fn is_mount_point(path: &Path) -> std::io::Result<bool> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let want = path.as_os_str().as_bytes();
    Ok(info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|m| unescape_mountinfo(m) == want)
    }))
}

fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// One extra host directory shared into the VM's share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubShare {
    /// The name the guest sees it under (relative to the share's root).
    pub name: String,
    /// The host directory.
    pub host_dir: PathBuf,
    /// Where it is mounted on the host (`shared dir / name`).
    pub mount_point: PathBuf,
}

/// A VM's shared directory, made ready to receive extra host directories
/// while the VM runs. Dropping it removes every extra directory still
/// shared and undoes its own bind mount.
pub struct SharedDir {
    vm_id: String,
    root: PathBuf,
    subs: BTreeMap<String, SubShare>,
}

impl SharedDir {
    /// Prepare `root` (before its virtiofsd starts): bind-mount it onto
    /// itself and mark that mount shared, so later mounts under it reach the
    /// daemon's mount namespace.
    pub fn new(vm_id: &str, root: &Path) -> Result<SharedDir, SubShareError> {
        let root = root
            .canonicalize()
            .ok()
            .filter(|p| p.is_dir())
            .ok_or_else(|| SubShareError::NotADirectory {
                path: root.to_path_buf(),
            })?;
        mount(Some(&root), &root, libc::MS_BIND).map_err(io_err("bind-mounting", &root))?;
        if let Err(e) = mount(None, &root, libc::MS_SHARED) {
            let _ = umount_detach(&root);
            return Err(io_err("making shared", &root)(e));
        }
        tracing::info!(vm = %vm_id, root = %root.display(), "shared directory ready for extra directories");
        Ok(SharedDir {
            vm_id: vm_id.to_owned(),
            root,
            subs: BTreeMap::new(),
        })
    }

    /// The shared directory (canonical): give this to virtiofsd.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The extra directories shared now, by name.
    pub fn sub_shares(&self) -> impl Iterator<Item = &SubShare> {
        self.subs.values()
    }

    fn mount_point(&self, name: &str) -> Result<PathBuf, SubShareError> {
        let plain = !name.is_empty()
            && name != "."
            && name != ".."
            && !name.contains('/')
            && !name.contains('\0');
        if !plain {
            return Err(SubShareError::BadName {
                root: self.root.clone(),
                name: name.to_owned(),
            });
        }
        Ok(self.root.join(name))
    }

    /// Share `host_dir` into the running VM as `name` (one path component
    /// that does not exist yet in the shared directory): a recursive bind
    /// mount on a new directory `name`. The guest sees it on its next lookup.
    pub fn add_dir(&mut self, host_dir: &Path, name: &str) -> Result<SubShare, SubShareError> {
        let mount_point = self.mount_point(name)?;
        let host = host_dir
            .canonicalize()
            .ok()
            .filter(|p| p.is_dir())
            .ok_or_else(|| SubShareError::NotADirectory {
                path: host_dir.to_path_buf(),
            })?;
        let root_fd = open_dir(&self.root).map_err(io_err("opening", &self.root))?;
        let cname = cstr(Path::new(name)).map_err(io_err("naming", &mount_point))?;
        // SAFETY: mkdirat on our open directory with a NUL-terminated name;
        // EEXIST reports anything (even a dangling symlink) already there.
        let r = unsafe { libc::mkdirat(root_fd.as_raw_fd(), cname.as_ptr(), 0o755) };
        if let Err(e) = check(r) {
            return Err(if e.raw_os_error() == Some(libc::EEXIST) {
                SubShareError::Exists { path: mount_point }
            } else {
                io_err("creating", &mount_point)(e)
            });
        }
        let rmdir = || {
            // SAFETY: removes the (empty) directory we just made.
            unsafe { libc::unlinkat(root_fd.as_raw_fd(), cname.as_ptr(), libc::AT_REMOVEDIR) };
        };
        // SAFETY: openat on our directory fd with a NUL-terminated name;
        // O_NOFOLLOW|O_DIRECTORY refuse whatever the guest may have swapped in.
        let fd = unsafe {
            libc::openat(
                root_fd.as_raw_fd(),
                cname.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            rmdir();
            return Err(io_err("opening", &mount_point)(e));
        }
        // SAFETY: a fresh fd that nothing else owns.
        let mp_fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let via_fd = PathBuf::from(format!("/proc/self/fd/{}", mp_fd.as_raw_fd()));
        if let Err(e) = mount(Some(&host), &via_fd, libc::MS_BIND | libc::MS_REC) {
            drop(mp_fd);
            rmdir();
            return Err(io_err("bind-mounting onto", &mount_point)(e));
        }
        let sub = SubShare {
            name: name.to_owned(),
            host_dir: host,
            mount_point,
        };
        tracing::info!(vm = %self.vm_id, host_dir = %sub.host_dir.display(), mount_point = %sub.mount_point.display(), "extra directory shared");
        self.subs.insert(name.to_owned(), sub.clone());
        Ok(sub)
    }

    /// Stop sharing the extra directory `name`: detach its mount (even while
    /// the guest has files open in it), then remove the mount point. The
    /// host directory itself is never touched.
    pub fn remove_dir(&mut self, name: &str) -> Result<(), SubShareError> {
        let mount_point = self.mount_point(name)?;
        let Some(sub) = self.subs.get(name) else {
            return Err(SubShareError::Unknown { path: mount_point });
        };
        let mount_point = sub.mount_point.clone();
        umount_detach(&mount_point).map_err(io_err("unmounting", &mount_point))?;
        // Unmounted: from here on the name is no longer ours to unmount,
        // even if removing the directory fails.
        self.subs.remove(name);
        std::fs::remove_dir(&mount_point).map_err(io_err("removing", &mount_point))?;
        tracing::info!(vm = %self.vm_id, mount_point = %mount_point.display(), "extra directory unshared");
        Ok(())
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        let names: Vec<String> = self.subs.keys().cloned().collect();
        for name in names {
            if let Err(e) = self.remove_dir(&name) {
                tracing::warn!(vm = %self.vm_id, "{e}");
            }
        }
        if let Err(e) = umount_detach(&self.root) {
            tracing::warn!(vm = %self.vm_id, "unmounting {}: {e}", self.root.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), b"/a b\\c");
        assert_eq!(unescape_mountinfo(r"/x\04"), b"/x\\04");
    }

    /// A fresh directory under the temp dir (removed on drop, after the
    /// `SharedDir` using it, which is declared later).
    struct Tmp(PathBuf);
    impl Tmp {
        fn new(name: &str) -> Tmp {
            let p = std::env::temp_dir()
                .join(format!("minivmm-subshare-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(p.join("root")).unwrap();
            std::fs::create_dir_all(p.join("host")).unwrap();
            Tmp(p)
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    // These mount, so they need root (the project's test machines run as root).
    #[test]
    fn add_and_remove_a_directory_leaves_the_host_directory_alone() {
        let t = Tmp::new("add");
        std::fs::write(t.0.join("host/f"), b"data").unwrap();
        let mut shared = SharedDir::new("t", &t.0.join("root")).unwrap();
        let root = shared.path().to_path_buf();
        assert!(is_mount_point(&root).unwrap());
        let sub = shared.add_dir(&t.0.join("host"), "extra").unwrap();
        assert_eq!(sub.mount_point, root.join("extra"));
        assert!(is_mount_point(&sub.mount_point).unwrap());
        assert_eq!(std::fs::read(root.join("extra/f")).unwrap(), b"data");
        // A file held open does not keep the directory shared.
        let open = std::fs::File::open(root.join("extra/f")).unwrap();
        shared.remove_dir("extra").unwrap();
        drop(open);
        assert!(!sub.mount_point.exists());
        assert!(!is_mount_point(&sub.mount_point).unwrap());
        assert_eq!(std::fs::read(t.0.join("host/f")).unwrap(), b"data");
        drop(shared);
        assert!(!is_mount_point(&root).unwrap());
    }

    #[test]
    fn bad_names_existing_names_and_unknown_names_are_refused() {
        let t = Tmp::new("bad");
        let mut shared = SharedDir::new("t", &t.0.join("root")).unwrap();
        let host = t.0.join("host");
        for name in ["", ".", "..", "a/b", "../x", "a\0b"] {
            let e = shared.add_dir(&host, name).unwrap_err();
            assert!(matches!(e, SubShareError::BadName { .. }), "{name:?}: {e}");
        }
        std::fs::write(shared.path().join("taken"), b"").unwrap();
        std::os::unix::fs::symlink("/etc", shared.path().join("link")).unwrap();
        for name in ["taken", "link"] {
            let e = shared.add_dir(&host, name).unwrap_err();
            assert!(matches!(e, SubShareError::Exists { .. }), "{name}: {e}");
            assert!(e.to_string().contains(name), "{e}");
        }
        let e = shared.add_dir(&t.0.join("missing"), "m").unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        assert!(!shared.path().join("m").exists());
        let e = shared.remove_dir("never").unwrap_err();
        assert!(matches!(e, SubShareError::Unknown { .. }), "{e}");
        shared.add_dir(&host, "twice").unwrap();
        let e = shared.add_dir(&host, "twice").unwrap_err();
        assert!(matches!(e, SubShareError::Exists { .. }), "{e}");
        let mp = shared.path().join("twice");
        // Dropping the shared directory removes what is still shared.
        drop(shared);
        assert!(!mp.exists());
        assert!(!is_mount_point(&mp).unwrap());
        let e = SharedDir::new("t", &t.0.join("nope")).err().unwrap();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
