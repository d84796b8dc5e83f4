//! What the guest reads from the Linux `boot_params` zero page
//! (Documentation/arch/x86/zero-page.rst): the command line and the e820 map.
//! The VMM is trusted to boot us but its data is still bounds-checked: every
//! address is checked against the identity map and the e820 RAM ranges before
//! it is read.

#![cfg_attr(test, allow(dead_code))]

/// `boot_params.e820_entries` (u8).
const E820_ENTRIES: usize = 0x1e8;
/// `boot_params.hdr.cmd_line_ptr` (u32, low half).
const CMD_LINE_PTR: usize = 0x228;
/// `boot_params.hdr.cmdline_size` (u32, 0 on old protocols).
const CMDLINE_SIZE: usize = 0x238;
/// `boot_params.ext_cmd_line_ptr` (u32, high half of the command line address).
const EXT_CMD_LINE_PTR: usize = 0x0c8;
/// `boot_params.e820_table`: 128 entries of 20 bytes.
const E820_TABLE: usize = 0x2d0;
/// Capacity of the zero page's e820 table (E820_MAX_ENTRIES_ZEROPAGE).
pub const E820_MAX: usize = 128;
const E820_ENTRY_SIZE: usize = 20;
/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// Size of the zero page.
pub const ZERO_PAGE_SIZE: usize = 4096;
/// Longest command line the guest reads.
pub const CMDLINE_MAX: usize = 4096;

/// One e820 entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The e820 map of a zero page, decoded on access (nothing is copied, so
/// nothing needs zero-initialising: see `mem` on why that matters here).
#[derive(Clone, Copy, Debug)]
pub struct E820Map<'a> {
    zp: &'a [u8; ZERO_PAGE_SIZE],
    len: usize,
}

impl<'a> E820Map<'a> {
    /// The map of a zero page: at most `e820_entries` (and at most 128) entries.
    pub fn from_zero_page(zp: &'a [u8; ZERO_PAGE_SIZE]) -> Self {
        E820Map {
            zp,
            len: usize::from(zp[E820_ENTRIES]).min(E820_MAX),
        }
    }

    /// Number of entries.
    #[cfg(test)]
    pub fn entry_count(&self) -> usize {
        self.len
    }

    /// The entries.
    pub fn entries(&self) -> impl Iterator<Item = E820Entry> + 'a {
        let zp = self.zp;
        (0..self.len).map(move |i| {
            let o = E820_TABLE + i * E820_ENTRY_SIZE;
            E820Entry {
                addr: read_u64(zp, o),
                size: read_u64(zp, o + 8),
                kind: read_u32(zp, o + 16),
            }
        })
    }

    /// Total bytes of RAM (type 1) entries; overlapping entries are not merged.
    pub fn ram_bytes(&self) -> u64 {
        self.entries()
            .filter(|e| e.kind == E820_RAM)
            .fold(0u64, |acc, e| acc.saturating_add(e.size))
    }

    /// How many bytes of RAM start at `addr` without a gap: adjacent or
    /// overlapping RAM entries count as one range.
    pub fn ram_extent(&self, addr: u64) -> u64 {
        let mut cur = addr;
        // Each pass moves `cur` to the end of a RAM entry that contains it;
        // no entry can be chosen twice, so `len` passes are enough.
        for _ in 0..self.len {
            let next = self
                .entries()
                .filter(|e| e.kind == E820_RAM && e.addr <= cur)
                .map(|e| e.addr.saturating_add(e.size))
                .filter(|&end| end > cur)
                .max();
            match next {
                Some(end) => cur = end,
                None => break,
            }
        }
        cur - addr
    }

    /// Whether every byte of `[start, start + len)` is RAM.
    pub fn is_ram(&self, start: u64, len: u64) -> bool {
        start.checked_add(len).is_some() && self.ram_extent(start) >= len
    }
}

/// The command line address from the zero page (`ext_cmd_line_ptr` gives the
/// high 32 bits) and the longest length to read from it.
pub fn cmdline_location(zp: &[u8; ZERO_PAGE_SIZE]) -> (u64, usize) {
    let addr =
        u64::from(read_u32(zp, CMD_LINE_PTR)) | (u64::from(read_u32(zp, EXT_CMD_LINE_PTR)) << 32);
    let size = read_u32(zp, CMDLINE_SIZE) as usize;
    let max = if size == 0 {
        CMDLINE_MAX
    } else {
        size.saturating_add(1).min(CMDLINE_MAX)
    };
    (addr, max)
}

/// The command line in `src`: up to the first NUL, if it is UTF-8 (the
/// guest only understands ASCII tokens; anything else is ignored whole).
pub fn cmdline_str(src: &[u8]) -> Option<&str> {
    let len = src.iter().position(|&b| b == 0).unwrap_or(src.len());
    core::str::from_utf8(&src[..len]).ok()
}

// One load per field: the guest's instructions may be emulated one by one.
fn read_u32(zp: &[u8; ZERO_PAGE_SIZE], o: usize) -> u32 {
    let bytes: [u8; 4] = zp[o..o + 4].try_into().unwrap_or_default();
    u32::from_le_bytes(bytes)
}

fn read_u64(zp: &[u8; ZERO_PAGE_SIZE], o: usize) -> u64 {
    let bytes: [u8; 8] = zp[o..o + 8].try_into().unwrap_or_default();
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zero_page(entries: &[(u64, u64, u32)]) -> [u8; ZERO_PAGE_SIZE] {
        let mut zp = [0u8; ZERO_PAGE_SIZE];
        zp[E820_ENTRIES] = entries.len() as u8;
        for (i, &(a, s, t)) in entries.iter().enumerate() {
            let o = E820_TABLE + i * E820_ENTRY_SIZE;
            zp[o..o + 8].copy_from_slice(&a.to_le_bytes());
            zp[o + 8..o + 16].copy_from_slice(&s.to_le_bytes());
            zp[o + 16..o + 20].copy_from_slice(&t.to_le_bytes());
        }
        zp
    }

    #[test]
    fn e820_total_and_coverage() {
        let zp = zero_page(&[
            (0, 0x9fc00, 1),
            (0x9fc00, 0x400, 2),
            (0x100000, 0xff00000, 1),
        ]);
        let map = E820Map::from_zero_page(&zp);
        assert_eq!(map.entry_count(), 3);
        assert_eq!(
            map.entries().nth(1),
            Some(E820Entry {
                addr: 0x9fc00,
                size: 0x400,
                kind: 2
            })
        );
        assert_eq!(map.ram_bytes(), 0x9fc00 + 0xff00000);
        assert!(map.is_ram(0x1000000, 16 * 4096));
        assert!(map.is_ram(0x100000, 0xff00000));
        assert!(!map.is_ram(0x100000, 0xff00001));
        assert!(!map.is_ram(0x9f000, 0x2000));
        assert!(!map.is_ram(u64::MAX - 10, 100));
        assert!(map.is_ram(0x5000, 0));
    }

    #[test]
    fn e820_adjacent_entries_cover_together() {
        let zp = zero_page(&[(0x100000, 0x100000, 1), (0x200000, 0x100000, 1)]);
        assert!(E820Map::from_zero_page(&zp).is_ram(0x180000, 0x100000));
    }

    #[test]
    fn e820_count_is_clamped() {
        let mut zp = zero_page(&[]);
        zp[E820_ENTRIES] = 255;
        assert_eq!(E820Map::from_zero_page(&zp).entry_count(), E820_MAX);
    }

    #[test]
    fn cmdline_pointer_and_copy() {
        let mut zp = [0u8; ZERO_PAGE_SIZE];
        zp[CMD_LINE_PTR..CMD_LINE_PTR + 4].copy_from_slice(&0x20000u32.to_le_bytes());
        zp[EXT_CMD_LINE_PTR..EXT_CMD_LINE_PTR + 4].copy_from_slice(&1u32.to_le_bytes());
        zp[CMDLINE_SIZE..CMDLINE_SIZE + 4].copy_from_slice(&255u32.to_le_bytes());
        assert_eq!(cmdline_location(&zp), (0x1_0002_0000, 256));
        assert_eq!(cmdline_str(b"a=b\tc"), Some("a=b\tc"));
        assert_eq!(cmdline_str(b"ab\0cd\xff"), Some("ab"));
        assert_eq!(cmdline_str(b"ab\xffcd"), None);
    }
}
