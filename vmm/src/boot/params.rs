//! The Linux x86 boot protocol's `boot_params` ("zero page"): setup header
//! fields, command line pointer and the e820 memory map.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use crate::layout::{self, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved ranges.
pub const E820_RESERVED: u32 = 2;
/// Magic of the setup header ("HdrS"), boot protocol §"The real-mode kernel header".
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// Boot flag at offset 0x1fe.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// "Undefined" boot loader id.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Default kernel alignment of a relocatable kernel.
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// loadflags bit: kernel loaded high (at 1 MiB).
const LOADED_HIGH: u8 = 0x01;

/// One e820 entry (address, size, type).
pub type E820Entry = (u64, u64, u32);

/// The e820 map for `mem_bytes` of RAM: low RAM below the EBDA, the legacy
/// hole reserved, RAM from 1 MiB up to the MMIO gap, the gap's IOAPIC/LAPIC
/// page range reserved, and RAM relocated above 4 GiB.
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, len) in layout::ram_regions(mem_bytes) {
        if start == 0 {
            map.push((HIMEM_START, len - HIMEM_START, E820_RAM));
        } else {
            map.push((start, len, E820_RAM));
        }
    }
    map.push((
        layout::IOAPIC_START,
        layout::MMIO_GAP_END - layout::IOAPIC_START,
        E820_RESERVED,
    ));
    map.sort_by_key(|e| e.0);
    map
}

/// Errors building the zero page.
#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    /// More e820 entries than the zero page holds.
    #[error("{0} e820 entries do not fit in the zero page")]
    TooManyE820Entries(usize),
    /// The command line is too long.
    #[error("kernel command line is {len} bytes (NUL and the VMM's additions included), longer than the kernel's limit of {max}")]
    CmdlineTooLong {
        /// Its length, NUL included.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Setup header version from which `cmdline_size` is valid (boot protocol 2.06).
const CMDLINE_SIZE_VERSION: u16 = 0x206;

/// The longest command line (NUL included) the kernel takes: its setup
/// header's `cmdline_size` (a bzImage), capped by the space we reserve for it.
pub fn cmdline_limit(header: Option<&setup_header>) -> usize {
    match header {
        Some(h) if { h.version } >= CMDLINE_SIZE_VERSION && { h.cmdline_size } != 0 => {
            (h.cmdline_size as usize)
                .saturating_add(1)
                .min(CMDLINE_MAX_SIZE)
        }
        _ => CMDLINE_MAX_SIZE,
    }
}

/// What the zero page describes besides the kernel and the command line.
#[derive(Clone, Copy, Debug, Default)]
pub struct BootExtras {
    /// The initrd: guest-physical address and size.
    pub initrd: Option<(u64, u64)>,
    /// The ACPI RSDP (boot protocol 2.14 `acpi_rsdp_addr`).
    pub acpi_rsdp: Option<u64>,
}

/// Build the zero page. `header` is the setup header of a bzImage (None for an
/// ELF kernel, which gets a synthetic one); `cmdline_len` includes the NUL.
pub fn build_zero_page(
    header: Option<setup_header>,
    cmdline_len: usize,
    e820: &[E820Entry],
    extras: BootExtras,
) -> Result<boot_params, ParamsError> {
    let max = cmdline_limit(header.as_ref());
    if cmdline_len > max {
        return Err(ParamsError::CmdlineTooLong {
            len: cmdline_len,
            max,
        });
    }
    let mut params = boot_params::default();
    if e820.len() > params.e820_table.len() {
        return Err(ParamsError::TooManyE820Entries(e820.len()));
    }
    if let Some(h) = header {
        params.hdr = h;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    if header.is_none() {
        params.hdr.cmdline_size = cmdline_len as u32;
    }
    if let Some((addr, size)) = extras.initrd {
        // Low and high halves (the ext_ fields are boot protocol 2.12).
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    if let Some(rsdp) = extras.acpi_rsdp {
        params.acpi_rsdp_addr = rsdp;
    }
    for (slot, &(addr, size, kind)) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::ByteValued;

    #[test]
    fn e820_has_the_mmio_gap_and_high_ram() {
        let map = e820_map(4 << 30);
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        // All RAM but the legacy hole (EBDA..1 MiB) is usable.
        assert_eq!(ram, (4 << 30) - (HIMEM_START - EBDA_START));
        assert!(map.contains(&(
            layout::MMIO_GAP_END,
            (4 << 30) - layout::MMIO_GAP_START,
            E820_RAM
        )));
        // No RAM entry overlaps the gap.
        for &(a, s, t) in &map {
            if t == E820_RAM {
                assert!(a + s <= layout::MMIO_GAP_START || a >= layout::MMIO_GAP_END);
            }
        }
        // Sorted and non-overlapping.
        for w in map.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0);
        }
    }

    #[test]
    fn zero_page_fields_at_protocol_offsets() {
        let map = e820_map(256 << 20);
        let p = build_zero_page(None, 12, &map, BootExtras::default()).unwrap();
        let bytes = p.as_slice();
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(bytes[o..o + 2].try_into().unwrap());
        assert_eq!(u16_at(0x1fe), 0xaa55);
        assert_eq!(u32_at(0x202), 0x5372_6448);
        assert_eq!(bytes[0x210], 0xff); // type_of_loader
        assert_eq!(u32_at(0x228), CMDLINE_START as u32);
        assert_eq!(u32_at(0x238), 12); // cmdline_size
        assert_eq!(bytes[0x1e8] as usize, map.len());
        // The second e820 entry (20 bytes each from 0x2d0).
        let e = 0x2d0 + 20;
        assert_eq!(
            u64::from_le_bytes(bytes[e..e + 8].try_into().unwrap()),
            EBDA_START
        );
        assert_eq!(u32_at(e + 16), E820_RESERVED);
    }

    #[test]
    fn initrd_and_rsdp_at_protocol_offsets() {
        let extras = BootExtras {
            initrd: Some((0x1_2345_6000, 0x2_0000_1000)),
            acpi_rsdp: Some(0xe0000),
        };
        let p = build_zero_page(None, 1, &[], extras).unwrap();
        let bytes = p.as_slice();
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        assert_eq!(u32_at(0x218), 0x2345_6000); // ramdisk_image
        assert_eq!(u32_at(0x21c), 0x1000); // ramdisk_size
        assert_eq!(u32_at(0xc0), 1); // ext_ramdisk_image
        assert_eq!(u32_at(0xc4), 2); // ext_ramdisk_size
        assert_eq!(
            u64::from_le_bytes(bytes[0x70..0x78].try_into().unwrap()),
            0xe0000
        );
    }

    #[test]
    fn bzimage_header_is_kept_and_limits_enforced() {
        let h = setup_header {
            version: 0x20f,
            setup_sects: 30,
            ..Default::default()
        };
        let p = build_zero_page(Some(h), 1, &e820_map(64 << 20), BootExtras::default()).unwrap();
        assert_eq!({ p.hdr.version }, 0x20f);
        assert_eq!({ p.hdr.setup_sects }, 30);
        assert!(build_zero_page(None, CMDLINE_MAX_SIZE + 1, &[], BootExtras::default()).is_err());
        assert!(build_zero_page(None, 1, &vec![(0, 1, 1); 200], BootExtras::default()).is_err());
        // A bzImage's own cmdline_size (without the NUL) is the limit.
        let h = setup_header {
            version: 0x20f,
            cmdline_size: 2047,
            ..Default::default()
        };
        assert_eq!(cmdline_limit(Some(&h)), 2048);
        assert!(build_zero_page(Some(h), 2048, &[], BootExtras::default()).is_ok());
        assert!(build_zero_page(Some(h), 2049, &[], BootExtras::default()).is_err());
        let old = setup_header {
            version: 0x205,
            cmdline_size: 100,
            ..Default::default()
        };
        assert_eq!(cmdline_limit(Some(&old)), CMDLINE_MAX_SIZE);
    }
}
