//! Debian packages as inputs: find the real kernel package behind
//! `linux-image-amd64`, download packages into a cache with `apt-get
//! download` (reused afterwards without network), and extract them with
//! `dpkg-deb -x`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::ImageError;

/// Debian's meta-package that depends on the current amd64 kernel.
pub const KERNEL_META_PACKAGE: &str = "linux-image-amd64";

/// The default package cache: `$XDG_CACHE_HOME/minivmm/debs`, else
/// `$HOME/.cache/minivmm/debs`, else `/var/cache/minivmm/debs`.
pub fn default_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("minivmm").join("debs")
}

fn run(tool: &'static str, args: &[&str], cwd: Option<&Path>) -> Result<String, ImageError> {
    let mut cmd = Command::new(tool);
    cmd.args(args);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let joined = args.join(" ");
    let out = cmd.output().map_err(|e| ImageError::Tool {
        tool,
        args: joined.clone(),
        detail: format!("cannot run: {e}"),
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(ImageError::Tool {
            tool,
            args: joined,
            detail: format!("{}: {}", out.status, tail.join(" | ")),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The kernel package `linux-image-amd64` depends on, e.g.
/// `linux-image-6.1.0-57-amd64`, from the local apt lists (`apt-cache
/// depends`; no network).
pub fn resolve_kernel_package() -> Result<String, ImageError> {
    let out = run("apt-cache", &["depends", KERNEL_META_PACKAGE], None)?;
    parse_kernel_dependency(&out).ok_or_else(|| {
        ImageError::Resolve(format!(
            "`apt-cache depends {KERNEL_META_PACKAGE}` names no linux-image-*-amd64 package \
             (run `apt-get update`, or pass the kernel .deb)"
        ))
    })
}

/// Picks the `Depends: linux-image-…-amd64` line out of `apt-cache depends`.
pub fn parse_kernel_dependency(apt_cache_depends: &str) -> Option<String> {
    apt_cache_depends.lines().find_map(|line| {
        let dep = line.trim().strip_prefix("Depends:")?.trim();
        let dep = dep.trim_start_matches('|').trim();
        (dep.starts_with("linux-image-")
            && dep.ends_with("-amd64")
            && !dep.contains("unsigned")
            && !dep.contains("dbg")
            && dep != KERNEL_META_PACKAGE)
            .then(|| dep.to_string())
    })
}

/// Cached `.deb` files (`PACKAGE_VERSION_ARCH.deb`) whose package name
/// satisfies `wanted`, sorted by file name.
fn cached_debs_where(
    cache: &Path,
    wanted: impl Fn(&str) -> bool,
) -> Result<Vec<PathBuf>, ImageError> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(cache) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(ImageError::io(cache, e)),
    };
    for e in entries {
        let e = e.map_err(|e| ImageError::io(cache, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((package, _)) = name.split_once('_') else {
            continue;
        };
        if name.ends_with(".deb") && wanted(package) {
            found.push(e.path());
        }
    }
    found.sort();
    Ok(found)
}

/// Cached `.deb` files of `package`, sorted.
fn cached_debs(package: &str, cache: &Path) -> Result<Vec<PathBuf>, ImageError> {
    cached_debs_where(cache, |p| p == package)
}

/// The `.deb` of `package` in `cache`, downloaded with `apt-get download`
/// if it is not there yet. With several cached versions the last in name
/// order is taken.
pub fn fetch_package(
    package: &str,
    cache: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, ImageError> {
    if package.is_empty()
        || !package
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    {
        return Err(ImageError::Resolve(format!(
            "{package:?} is not a Debian package name"
        )));
    }
    if let Some(deb) = cached_debs(package, cache)?.pop() {
        progress(&format!("using cached {}", deb.display()));
        return Ok(deb);
    }
    std::fs::create_dir_all(cache).map_err(|e| ImageError::io(cache, e))?;
    // Download into a private directory first: an interrupted download
    // must not leave a partial .deb that a later run would take as cached.
    let staging = cache.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| ImageError::io(&staging, e))?;
    progress(&format!("apt-get download {package}"));
    let result = run("apt-get", &["download", "-q", package], Some(&staging))
        .and_then(|_| cached_debs(package, &staging))
        .and_then(|mut debs| {
            let deb = debs.pop().ok_or_else(|| ImageError::Tool {
                tool: "apt-get",
                args: format!("download {package}"),
                detail: "succeeded but left no .deb".into(),
            })?;
            let dest = cache.join(deb.file_name().unwrap_or_default());
            std::fs::rename(&deb, &dest).map_err(|e| ImageError::io(&dest, e))?;
            Ok(dest)
        });
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// The kernel `.deb` to use: `explicit` if given (it must exist); else the
/// package `linux-image-amd64` depends on, from the cache or downloaded;
/// else, when apt cannot tell or cannot download (no lists, offline), the
/// newest cached `linux-image-*-amd64` package.
pub fn kernel_deb(
    explicit: Option<&Path>,
    cache: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, ImageError> {
    if let Some(path) = explicit {
        std::fs::metadata(path).map_err(|e| ImageError::io(path, e))?;
        return Ok(path.to_path_buf());
    }
    let resolved = resolve_kernel_package().and_then(|package| {
        progress(&format!("kernel package: {package}"));
        fetch_package(&package, cache, progress)
    });
    let err = match resolved {
        Ok(deb) => return Ok(deb),
        Err(e) => e,
    };
    match newest_cached_kernel(cache) {
        Some(deb) => {
            progress(&format!("{err}; using cached {}", deb.display()));
            Ok(deb)
        }
        None => Err(err),
    }
}

/// The last (in name order) cached `linux-image-*-amd64` package.
fn newest_cached_kernel(cache: &Path) -> Option<PathBuf> {
    cached_debs_where(cache, |package| {
        package.starts_with("linux-image-")
            && package.ends_with("-amd64")
            && package != KERNEL_META_PACKAGE
            && !package.contains("unsigned")
            && !package.contains("dbg")
    })
    .ok()?
    .pop()
}

/// Extracts the files of `deb` under `dest` (`dpkg-deb -x`).
pub fn extract_deb(deb: &Path, dest: &Path) -> Result<(), ImageError> {
    std::fs::create_dir_all(dest).map_err(|e| ImageError::io(dest, e))?;
    let deb_s = deb.to_string_lossy();
    let dest_s = dest.to_string_lossy();
    run("dpkg-deb", &["-x", &deb_s, &dest_s], None)?;
    Ok(())
}

/// An extracted Debian kernel package: `boot/vmlinuz-REL` and
/// `lib/modules/REL/`.
#[derive(Debug, Clone)]
pub struct KernelTree {
    /// The kernel release (`uname -r`), e.g. `6.1.0-57-amd64`.
    pub release: String,
    /// The compressed kernel image (bzImage).
    pub vmlinuz: PathBuf,
    /// `lib/modules/REL` (Debian bookworm ships it under `/lib`, later
    /// releases under `/usr/lib`).
    pub modules_dir: PathBuf,
}

impl KernelTree {
    /// Finds the one kernel under an extraction root.
    pub fn open(root: &Path) -> Result<KernelTree, ImageError> {
        let boot = root.join("boot");
        let mut releases = Vec::new();
        let entries = std::fs::read_dir(&boot).map_err(|e| ImageError::io(&boot, e))?;
        for e in entries {
            let e = e.map_err(|e| ImageError::io(&boot, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(release) = name.strip_prefix("vmlinuz-") {
                releases.push(release.to_string());
            }
        }
        releases.sort();
        let release = match releases.as_slice() {
            [one] => one.clone(),
            [] => {
                return Err(ImageError::Layout {
                    path: boot,
                    detail: "no vmlinuz-* (not a kernel package?)".into(),
                })
            }
            many => {
                return Err(ImageError::Layout {
                    path: boot,
                    detail: format!("several kernels: {}", many.join(", ")),
                })
            }
        };
        let modules_dir = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|d| root.join(d).join(&release))
            .find(|d| d.is_dir())
            .ok_or_else(|| ImageError::Layout {
                path: root.join("lib/modules").join(&release),
                detail: "no modules directory for the kernel".into(),
            })?;
        Ok(KernelTree {
            vmlinuz: boot.join(format!("vmlinuz-{release}")),
            release,
            modules_dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_versioned_kernel_dependency() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n";
        assert_eq!(
            parse_kernel_dependency(out).as_deref(),
            Some("linux-image-6.1.0-57-amd64")
        );
        let alt = "linux-image-amd64\n |Depends: linux-image-6.1.0-9-amd64-unsigned\n  Depends: linux-image-6.1.0-9-amd64\n";
        assert_eq!(
            parse_kernel_dependency(alt).as_deref(),
            Some("linux-image-6.1.0-9-amd64")
        );
        assert_eq!(parse_kernel_dependency("linux-image-amd64\n"), None);
    }

    #[test]
    fn rejects_package_names_that_are_not() {
        let dir = std::env::temp_dir().join(format!("linux-image-deb-{}", std::process::id()));
        for bad in ["", "a b", "../x", "x;rm"] {
            assert!(fetch_package(bad, &dir, &mut |_| {}).is_err(), "{bad:?}");
        }
        assert!(!dir.exists(), "nothing created for a bad name");
    }

    #[test]
    fn cached_package_is_used_without_apt() {
        let dir = std::env::temp_dir().join(format!("linux-image-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("busybox-static_1.35.0-4+b3_amd64.deb"), b"x").unwrap();
        std::fs::write(dir.join("busybox_1.35.0-4+b3_amd64.deb"), b"y").unwrap();
        let got = fetch_package("busybox-static", &dir, &mut |_| {}).unwrap();
        assert_eq!(got, dir.join("busybox-static_1.35.0-4+b3_amd64.deb"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn offline_fallback_takes_a_cached_kernel_package_only() {
        let dir = std::env::temp_dir().join(format!("linux-image-offline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(newest_cached_kernel(&dir), None);
        for name in [
            "linux-image-amd64_6.1.1-1_amd64.deb",
            "linux-image-6.1.0-7-amd64-unsigned_6.1.1-1_amd64.deb",
            "linux-image-6.1.0-7-amd64-dbg_6.1.1-1_amd64.deb",
            "busybox-static_1_amd64.deb",
        ] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        assert_eq!(newest_cached_kernel(&dir), None);
        for name in [
            "linux-image-6.1.0-1-amd64_6.1.1-1_amd64.deb",
            "linux-image-6.1.0-5-amd64_6.1.5-1_amd64.deb",
        ] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        assert_eq!(
            newest_cached_kernel(&dir),
            Some(dir.join("linux-image-6.1.0-5-amd64_6.1.5-1_amd64.deb"))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kernel_tree_needs_one_vmlinuz_and_its_modules() {
        let root = std::env::temp_dir().join(format!("linux-image-tree-{}", std::process::id()));
        std::fs::create_dir_all(root.join("boot")).unwrap();
        assert!(KernelTree::open(&root).is_err());
        std::fs::write(root.join("boot/vmlinuz-6.1.0-1-amd64"), b"k").unwrap();
        assert!(KernelTree::open(&root).is_err(), "modules dir missing");
        std::fs::create_dir_all(root.join("lib/modules/6.1.0-1-amd64")).unwrap();
        let tree = KernelTree::open(&root).unwrap();
        assert_eq!(tree.release, "6.1.0-1-amd64");
        assert_eq!(tree.vmlinuz, root.join("boot/vmlinuz-6.1.0-1-amd64"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
