//! A deterministic newc ("070701") cpio writer, the format the Linux kernel
//! unpacks as an initramfs (Documentation/driver-api/early-userspace/
//! buffer-format.rst), and gzip without a timestamp.
//!
//! Determinism: entries are written sorted by path with parents first, every
//! mtime is 0, uid/gid 0, inode numbers are assigned in write order, and the
//! gzip header carries no time and no file name. The same entries give the
//! same bytes whatever order they were added in.

use std::collections::BTreeMap;
use std::io::Write;

use crate::ImageError;

/// newc magic (buffer-format.rst).
const NEWC_MAGIC: &str = "070701";
/// File type bits of `c_mode` (inode(7)).
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
/// The newc field `c_filesize` is 8 hex digits.
const MAX_FILE_SIZE: usize = u32::MAX as usize;

/// What one archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file with its contents.
    File(Vec<u8>),
    /// A symbolic link to the target.
    Symlink(String),
    /// A character device node (major, minor).
    CharDev(u32, u32),
}

/// An in-memory initramfs: add entries in any order, then [`Archive::write`].
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<String, (EntryKind, u32)>,
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Archive {
        Archive::default()
    }

    /// Adds a directory (and its missing parents) with permission bits `perm`.
    pub fn add_dir(&mut self, path: &str, perm: u32) -> Result<(), ImageError> {
        self.insert(path, EntryKind::Dir, perm)
    }

    /// Adds a regular file (and its missing parent directories, mode 0755).
    pub fn add_file(&mut self, path: &str, perm: u32, data: Vec<u8>) -> Result<(), ImageError> {
        if data.len() > MAX_FILE_SIZE {
            return Err(ImageError::Cpio {
                name: path.into(),
                detail: format!("{} bytes is more than newc can record", data.len()),
            });
        }
        self.insert(path, EntryKind::File(data), perm)
    }

    /// Adds a symbolic link at `path` pointing to `target`.
    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<(), ImageError> {
        self.insert(path, EntryKind::Symlink(target.into()), 0o777)
    }

    /// Adds a character device node (e.g. `/dev/console`, 5:1), so the kernel
    /// can give `/init` a console before devtmpfs is mounted.
    pub fn add_char_dev(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), ImageError> {
        self.insert(path, EntryKind::CharDev(major, minor), perm)
    }

    /// Whether an entry exists at `path`.
    pub fn contains(&self, path: &str) -> bool {
        normalize(path).is_ok_and(|p| self.entries.contains_key(&p))
    }

    /// Number of entries (directories included).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the archive has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn insert(&mut self, path: &str, kind: EntryKind, perm: u32) -> Result<(), ImageError> {
        let path = normalize(path)?;
        if perm & !0o7777 != 0 {
            return Err(ImageError::Cpio {
                name: path,
                detail: format!("permission bits {perm:#o} out of range"),
            });
        }
        // Parents first, so the kernel can create the entry.
        let mut parent = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for c in &components[..components.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(c);
            match self.entries.get(&parent) {
                Some((EntryKind::Dir, _)) => {}
                Some(_) => {
                    return Err(ImageError::Cpio {
                        name: path.clone(),
                        detail: format!("parent {parent:?} is not a directory"),
                    })
                }
                None => {
                    self.entries.insert(parent.clone(), (EntryKind::Dir, 0o755));
                }
            }
        }
        match self.entries.get(&path) {
            Some((EntryKind::Dir, _)) if kind == EntryKind::Dir => {
                self.entries.insert(path, (kind, perm));
                Ok(())
            }
            Some(_) => Err(ImageError::Cpio {
                name: path,
                detail: "added twice".into(),
            }),
            None => {
                self.entries.insert(path, (kind, perm));
                Ok(())
            }
        }
    }

    /// The archive as newc cpio bytes (uncompressed), trailer included.
    pub fn to_cpio(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // BTreeMap order puts "a" before "a/b": parents precede children.
        for (ino, (name, (kind, perm))) in self.entries.iter().enumerate() {
            let (mode, data, nlink, rdev): (u32, &[u8], u32, (u32, u32)) = match kind {
                EntryKind::Dir => (S_IFDIR | perm, &[], 2, (0, 0)),
                EntryKind::File(d) => (S_IFREG | perm, d, 1, (0, 0)),
                EntryKind::Symlink(t) => (S_IFLNK | perm, t.as_bytes(), 1, (0, 0)),
                EntryKind::CharDev(ma, mi) => (S_IFCHR | perm, &[], 1, (*ma, *mi)),
            };
            write_entry(&mut out, name, ino as u32 + 1, mode, nlink, rdev, data);
        }
        write_entry(&mut out, "TRAILER!!!", 0, 0, 1, (0, 0), &[]);
        out
    }

    /// The archive as gzip-compressed newc cpio: what `--initrd` takes.
    pub fn to_cpio_gz(&self) -> Vec<u8> {
        gzip(&self.to_cpio())
    }
}

/// Strips leading `/` and `./`, rejects empty, `.` and `..` components.
fn normalize(path: &str) -> Result<String, ImageError> {
    let trimmed = path.trim_start_matches("./").trim_start_matches('/');
    let bad = trimmed.is_empty()
        || trimmed
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        || trimmed.contains('\0');
    if bad {
        return Err(ImageError::Cpio {
            name: path.into(),
            detail: "not a relative path of plain components".into(),
        });
    }
    Ok(trimmed.to_string())
}

fn write_entry(
    out: &mut Vec<u8>,
    name: &str,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    data: &[u8],
) {
    let namesize = name.len() + 1;
    // Fields in buffer-format.rst order: ino mode uid gid nlink mtime
    // filesize devmajor devminor rdevmajor rdevminor namesize check.
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        data.len() as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        namesize as u32,
        0,
    ];
    out.extend_from_slice(NEWC_MAGIC.as_bytes());
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

/// gzip with mtime 0 and no file name in the header (deterministic).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(3)
        .write(Vec::new(), flate2::Compression::default());
    // Writing into a Vec cannot fail.
    enc.write_all(data).expect("gzip into memory");
    enc.finish().expect("gzip into memory")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Parses newc bytes back into (name, mode, data) triples.
    fn parse(mut b: &[u8]) -> Vec<(String, u32, Vec<u8>, u32)> {
        let mut out = Vec::new();
        let total = b.len();
        loop {
            assert_eq!(&b[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, filesize, namesize, ino) = (field(1), field(6), field(11), field(0));
            let name = std::str::from_utf8(&b[110..110 + namesize as usize - 1])
                .unwrap()
                .to_string();
            let pad = |off: usize| (off + 3) & !3;
            let consumed = total - b.len();
            let data_start = pad(consumed + 110 + namesize as usize) - consumed;
            let data = b[data_start..data_start + filesize as usize].to_vec();
            let next = pad(consumed + data_start + filesize as usize) - consumed;
            b = &b[next..];
            if name == "TRAILER!!!" {
                assert!(b.is_empty());
                return out;
            }
            out.push((name, mode, data, ino));
        }
    }

    #[test]
    fn entries_sorted_with_parents_first_and_order_independent() {
        let mut a = Archive::new();
        a.add_file("/lib/modules/x.ko", 0o644, b"abc".to_vec())
            .unwrap();
        a.add_file("init", 0o755, b"#!".to_vec()).unwrap();
        a.add_char_dev("dev/console", 0o600, 5, 1).unwrap();
        a.add_symlink("bin/sh", "busybox").unwrap();
        let mut b = Archive::new();
        b.add_symlink("bin/sh", "busybox").unwrap();
        b.add_char_dev("/dev/console", 0o600, 5, 1).unwrap();
        b.add_file("init", 0o755, b"#!".to_vec()).unwrap();
        b.add_file("./lib/modules/x.ko", 0o644, b"abc".to_vec())
            .unwrap();
        assert_eq!(a.to_cpio(), b.to_cpio());
        assert_eq!(a.to_cpio_gz(), b.to_cpio_gz());

        let parsed = parse(&a.to_cpio());
        let names: Vec<&str> = parsed.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/x.ko"
            ]
        );
        let init = &parsed[4];
        assert_eq!(init.1, S_IFREG | 0o755);
        assert_eq!(init.2, b"#!");
        assert_eq!(parsed[1].1, S_IFLNK | 0o777);
        assert_eq!(parsed[1].2, b"busybox");
        assert_eq!(parsed[3].1, S_IFCHR | 0o600);
        // Inode numbers are distinct (hard links are keyed on them).
        let mut inos: Vec<u32> = parsed.iter().map(|e| e.3).collect();
        inos.dedup();
        assert_eq!(inos.len(), parsed.len());
    }

    #[test]
    fn gzip_round_trips_and_has_no_timestamp() {
        let mut a = Archive::new();
        a.add_file("data", 0o644, vec![7u8; 10_000]).unwrap();
        let gz = a.to_cpio_gz();
        assert_eq!(&gz[..3], &[0x1f, 0x8b, 8]);
        assert_eq!(&gz[4..8], &[0, 0, 0, 0], "MTIME must be 0");
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, a.to_cpio());
    }

    #[test]
    fn rejects_bad_paths_and_duplicates() {
        let mut a = Archive::new();
        for bad in ["", "/", "a/../b", "a//b", "./", "a/./b"] {
            assert!(a.add_dir(bad, 0o755).is_err(), "{bad:?} accepted");
        }
        a.add_file("f", 0o644, vec![]).unwrap();
        assert!(a.add_file("f", 0o644, vec![]).is_err());
        assert!(a.add_file("f/g", 0o644, vec![]).is_err(), "file as parent");
        assert!(a.add_file("h", 0o10000, vec![]).is_err());
        // A directory may be named again (idempotent), e.g. after a file made it.
        a.add_file("d/x", 0o644, vec![]).unwrap();
        a.add_dir("d", 0o700).unwrap();
        assert!(a.contains("/d/x"));
    }
}
