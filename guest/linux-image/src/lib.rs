//! Pieces for building Linux initramfs images from Debian packages only:
//!
//! - [`deb`]: resolve Debian's `linux-image-amd64` to the real kernel package,
//!   `apt-get download` it into a cache directory (or take a given `.deb`),
//!   and extract it;
//! - [`modules`]: index a kernel's modules and compute the load-ordered
//!   closure of the modules a guest needs (from `modules.dep`, or from each
//!   module's `.modinfo` `depends=` when the package ships no `modules.dep`,
//!   which Debian's do not: `depmod` runs at install time);
//! - [`cpio`]: a deterministic newc cpio writer and gzip without a timestamp,
//!   so the same inputs give the same bytes;
//! - [`guest`]: minivmm's Linux guest image (Debian kernel + initramfs with
//!   the embedded Linux agent as `/init`).
//!
//! Used by `minivmm image linux` (the Linux guest image) and by the nested
//! test bed (the outer VM's initramfs).

#![warn(missing_docs)]

pub mod cpio;
pub mod deb;
pub mod guest;
pub mod modules;

use std::path::PathBuf;

/// Errors of image building; each names the file, package or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file or directory could not be read, written or created. (The
    /// error is in the message, not a `source`, so a chained display
    /// does not print it twice.)
    #[error("{}: {error}", path.display())]
    Io {
        /// The path at fault.
        path: PathBuf,
        /// The underlying error.
        error: std::io::Error,
    },
    /// An external tool (apt-get, apt-cache, dpkg-deb) could not be started
    /// or failed.
    #[error("{tool} {args}: {detail}")]
    Tool {
        /// The program.
        tool: &'static str,
        /// Its arguments, joined.
        args: String,
        /// Why it failed (exit status and the end of its stderr).
        detail: String,
    },
    /// The kernel package could not be determined.
    #[error("cannot determine the kernel package: {0}")]
    Resolve(String),
    /// The extracted package is not a kernel package of the expected layout.
    #[error("{}: {detail}", path.display())]
    Layout {
        /// The directory or file at fault.
        path: PathBuf,
        /// What is missing or wrong.
        detail: String,
    },
    /// A module that was asked for (or is a dependency) is not in the tree.
    #[error("kernel module {name:?} not found under {} (needed by {needed_by})", tree.display())]
    MissingModule {
        /// Module name.
        name: String,
        /// The modules directory searched.
        tree: PathBuf,
        /// Who needs it ("request" for a module asked for directly).
        needed_by: String,
    },
    /// A module file could not be understood.
    #[error("kernel module {}: {detail}", path.display())]
    BadModule {
        /// The module file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A cpio entry that newc cannot hold or that is malformed.
    #[error("cpio entry {name:?}: {detail}")]
    Cpio {
        /// The entry's path inside the archive.
        name: String,
        /// What is wrong.
        detail: String,
    },
}

impl ImageError {
    /// An [`ImageError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> ImageError {
        ImageError::Io {
            path: path.into(),
            error,
        }
    }
}
