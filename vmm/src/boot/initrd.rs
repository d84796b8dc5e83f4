//! The initial ramdisk: read and sanity-check the file, choose where it goes
//! in guest RAM (boot protocol §"The initrd", highest suitable address below
//! the kernel's `initrd_addr_max`), and copy it there. The zero page then
//! describes it (`ramdisk_image`/`ramdisk_size`, see `params`).

use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;
use crate::layout::{self, HIMEM_START};

/// Page alignment of the initrd (the kernel frees it in whole pages).
const INITRD_ALIGN: u64 = 4096;
/// `initrd_addr_max` of kernels with boot protocol < 2.03 (and our ELF kernels).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// Setup header version from which `initrd_addr_max` is valid (boot protocol 2.03).
const INITRD_ADDR_MAX_VERSION: u16 = 0x203;

/// Leading bytes of the formats Linux unpacks into its rootfs
/// (init/initramfs.c and lib/decompress.c): a newc/crc cpio archive or one
/// of the compressed streams the kernel can decompress.
const ARCHIVE_MAGICS: &[(&[u8], &str)] = &[
    (b"070701", "cpio (newc)"),
    (b"070702", "cpio (crc)"),
    (&[0x1f, 0x8b], "gzip"),
    (&[0x1f, 0x9e], "gzip"),
    (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], "xz"),
    (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
    (&[0x02, 0x21, 0x4c, 0x18], "lz4"),
    (b"BZh", "bzip2"),
    (&[0x5d, 0x00, 0x00], "lzma"),
    (&[0x89, b'L', b'Z', b'O'], "lzo"),
];

/// The format of an initrd, by its first bytes after any zero padding
/// (the kernel skips NUL bytes between archives); None if it is none the
/// kernel could unpack.
pub fn archive_format(data: &[u8]) -> Option<&'static str> {
    let start = data.iter().position(|&b| b != 0)?;
    let data = &data[start..];
    ARCHIVE_MAGICS
        .iter()
        .find(|(magic, _)| data.starts_with(magic))
        .map(|(_, name)| *name)
}

/// Read an initrd file and refuse what cannot be one: an unreadable,
/// empty, or non-archive file (checked by magic: the contents are the
/// guest's business, but a file that is no archive at all is a user error).
pub fn read_initrd(path: &Path) -> Result<Vec<u8>, BootError> {
    let data = std::fs::read(path).map_err(|source| BootError::ReadInitrd {
        path: path.to_path_buf(),
        source,
    })?;
    if data.is_empty() {
        return Err(BootError::InitrdEmpty {
            path: path.to_path_buf(),
        });
    }
    if archive_format(&data).is_none() {
        let head: Vec<String> = data.iter().take(8).map(|b| format!("{b:02x}")).collect();
        return Err(BootError::InitrdNotArchive {
            path: path.to_path_buf(),
            head: head.join(" "),
        });
    }
    Ok(data)
}

/// Where an initrd was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest-physical start.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// The highest page-aligned address for `size` bytes of initrd: in RAM
/// below the MMIO gap, at most the kernel's `initrd_addr_max`, and above
/// `kernel_end` (the kernel, its decompression space, and everything the
/// VMM put below it: boot structures and ACPI tables live under 1 MiB).
pub fn place_initrd(
    path: &Path,
    size: u64,
    ram_bytes: u64,
    header: Option<&setup_header>,
    kernel_end: u64,
) -> Result<InitrdPlacement, BootError> {
    let addr_max = match header {
        Some(h) if { h.version } >= INITRD_ADDR_MAX_VERSION && { h.initrd_addr_max } != 0 => {
            u64::from(h.initrd_addr_max)
        }
        _ => DEFAULT_INITRD_ADDR_MAX,
    };
    // The last byte must be at or below initrd_addr_max.
    let top = ram_bytes
        .min(layout::MMIO_GAP_START)
        .min(addr_max.saturating_add(1));
    let floor = kernel_end.max(HIMEM_START).div_ceil(INITRD_ALIGN) * INITRD_ALIGN;
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        room: top.saturating_sub(floor),
    };
    let addr = top.checked_sub(size).ok_or_else(too_large)? / INITRD_ALIGN * INITRD_ALIGN;
    if addr < floor {
        return Err(too_large());
    }
    Ok(InitrdPlacement { addr, size })
}

/// Read, place and copy the initrd at `path` into guest memory.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    ram_bytes: u64,
    path: &Path,
    header: Option<&setup_header>,
    kernel_end: u64,
) -> Result<InitrdPlacement, BootError> {
    let data = read_initrd(path)?;
    let placement = place_initrd(path, data.len() as u64, ram_bytes, header, kernel_end)?;
    mem.write_slice(&data, GuestAddress(placement.addr))
        .map_err(|source| BootError::Write {
            what: "initrd",
            source,
        })?;
    Ok(placement)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_archives_and_refuses_the_rest() {
        assert_eq!(archive_format(b"070701000000"), Some("cpio (newc)"));
        assert_eq!(archive_format(&[0x1f, 0x8b, 8, 0]), Some("gzip"));
        assert_eq!(
            archive_format(b"\x00\x00\x00\x00070701"),
            Some("cpio (newc)")
        );
        assert_eq!(archive_format(&[0x28, 0xb5, 0x2f, 0xfd, 1]), Some("zstd"));
        assert_eq!(archive_format(b"\x7fELF\x02\x01"), None);
        assert_eq!(archive_format(b"hello world"), None);
        assert_eq!(archive_format(&[0; 64]), None);
        assert_eq!(archive_format(&[]), None);
    }

    #[test]
    fn read_refuses_missing_empty_and_non_archive_files() {
        let dir = std::env::temp_dir().join(format!("minivmm-initrd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing");
        assert!(matches!(
            read_initrd(&missing),
            Err(BootError::ReadInitrd { .. })
        ));
        let empty = dir.join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            read_initrd(&empty),
            Err(BootError::InitrdEmpty { .. })
        ));
        let text = dir.join("text");
        std::fs::write(&text, b"not an archive").unwrap();
        let err = read_initrd(&text).unwrap_err();
        assert!(err.to_string().contains("6e 6f 74 20"), "{err}");
        let good = dir.join("good");
        std::fs::write(&good, [0x1f, 0x8b, 8, 0, 0]).unwrap();
        assert_eq!(read_initrd(&good).unwrap().len(), 5);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn placed_at_the_top_of_low_ram_below_the_limit() {
        let p = Path::new("i");
        let ram = 256 << 20;
        let r = place_initrd(p, 10_000, ram, None, 0x20_0000).unwrap();
        assert_eq!(r.addr % INITRD_ALIGN, 0);
        assert!(r.addr + r.size <= ram);
        assert!(ram - (r.addr + r.size) < INITRD_ALIGN);
        // A kernel limit below the end of RAM wins.
        let h = setup_header {
            version: 0x20f,
            initrd_addr_max: 0x7f_ffff,
            ..Default::default()
        };
        let r = place_initrd(p, 0x1000, ram, Some(&h), 0x20_0000).unwrap();
        assert_eq!(r.addr + r.size, 0x80_0000);
        // RAM beyond the MMIO gap is never used.
        let r = place_initrd(p, 0x1000, 8 << 30, None, 0x20_0000).unwrap();
        assert!(r.addr + r.size <= DEFAULT_INITRD_ADDR_MAX + 1);
    }

    #[test]
    fn refuses_an_initrd_that_would_overlap_the_kernel_or_not_fit() {
        let p = Path::new("i");
        let ram = 64 << 20;
        let kernel_end = 40 << 20;
        assert!(place_initrd(p, 24 << 20, ram, None, kernel_end).is_ok());
        let err = place_initrd(p, (24 << 20) + 1, ram, None, kernel_end).unwrap_err();
        assert!(
            matches!(err, BootError::InitrdTooLarge { room, .. } if room == 24 << 20),
            "{err}"
        );
        assert!(place_initrd(p, u64::MAX, ram, None, kernel_end).is_err());
        assert!(place_initrd(p, ram * 2, ram, None, 0).is_err());
    }
}
