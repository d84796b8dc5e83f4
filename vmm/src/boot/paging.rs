//! Identity page tables for the 64-bit entry: PML4 -> one PDPT -> one page
//! directory per GiB, each mapping 2 MiB pages. This covers RAM, the MMIO gap
//! (IOAPIC, LAPIC, virtio-mmio) and RAM relocated above 4 GiB. Every level
//! has the U/S bit set: PVM runs a guest natively only over user-accessible
//! mappings (it executes at hardware CPL 3); for a CPL-0 guest without SMEP or
//! SMAP the bit changes nothing.

use crate::layout::{IDENTITY_MAP_GIB, PDPT_START, PD_START, PML4_START};

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_PAGE_SIZE: u64 = 1 << 7;
const ENTRIES: usize = 512;

/// One page-table page to write at a guest-physical address.
pub struct TablePage {
    /// Guest-physical address of the page.
    pub addr: u64,
    /// Its 512 entries.
    pub entries: Box<[u64; ENTRIES]>,
}

/// The page-table pages that identity-map the first `IDENTITY_MAP_GIB` GiB.
pub fn identity_tables() -> Vec<TablePage> {
    identity_tables_of(IDENTITY_MAP_GIB, PTE_USER)
}

/// The page-table pages of the minimal Linux entry (`EntryProtocol::
/// LinuxMinimal`): the first GiB only and no U/S bit, as Firecracker builds
/// them.
pub fn minimal_identity_tables() -> Vec<TablePage> {
    identity_tables_of(1, 0)
}

/// Identity tables over the first `gib` GiB (at most `IDENTITY_MAP_GIB`),
/// with `extra` flag bits at every level.
fn identity_tables_of(gib: u64, extra: u64) -> Vec<TablePage> {
    let gib = gib.min(IDENTITY_MAP_GIB);
    let mut pml4 = Box::new([0u64; ENTRIES]);
    pml4[0] = PDPT_START | PTE_PRESENT | PTE_WRITABLE | extra;
    let mut pdpt = Box::new([0u64; ENTRIES]);
    let mut pages = Vec::new();
    for gib in 0..gib {
        let pd_addr = PD_START + gib * 4096;
        pdpt[gib as usize] = pd_addr | PTE_PRESENT | PTE_WRITABLE | extra;
        let mut pd = Box::new([0u64; ENTRIES]);
        for (i, e) in pd.iter_mut().enumerate() {
            *e = (gib << 30)
                | ((i as u64) << 21)
                | PTE_PRESENT
                | PTE_WRITABLE
                | extra
                | PTE_PAGE_SIZE;
        }
        pages.push(TablePage {
            addr: pd_addr,
            entries: pd,
        });
    }
    pages.push(TablePage {
        addr: PML4_START,
        entries: pml4,
    });
    pages.push(TablePage {
        addr: PDPT_START,
        entries: pdpt,
    });
    pages
}

/// Walk the tables like the MMU would and return the physical address that
/// `virt` maps to (test helper for the layout, also used in diagnostics).
pub fn translate(pages: &[TablePage], virt: u64) -> Option<u64> {
    let lookup = |addr: u64| pages.iter().find(|p| p.addr == addr);
    let pml4e = lookup(PML4_START)?.entries[((virt >> 39) & 0x1ff) as usize];
    if pml4e & PTE_PRESENT == 0 {
        return None;
    }
    let pdpte = lookup(pml4e & !0xfff)?.entries[((virt >> 30) & 0x1ff) as usize];
    if pdpte & PTE_PRESENT == 0 {
        return None;
    }
    let pde = lookup(pdpte & !0xfff)?.entries[((virt >> 21) & 0x1ff) as usize];
    if pde & PTE_PRESENT == 0 || pde & PTE_PAGE_SIZE == 0 {
        return None;
    }
    Some((pde & !0x1f_ffff & 0x000f_ffff_ffff_ffff) | (virt & 0x1f_ffff))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{CMDLINE_START, IOAPIC_START, ZERO_PAGE_START};

    #[test]
    fn identity_maps_ram_gap_and_high_memory() {
        let t = identity_tables();
        for addr in [
            0u64,
            ZERO_PAGE_START,
            0x20_0000 + 0x1234,
            IOAPIC_START,
            5 << 30,
            (16 << 30) - 1,
        ] {
            assert_eq!(translate(&t, addr), Some(addr), "{addr:#x}");
        }
        assert_eq!(translate(&t, 16 << 30), None);
        assert_eq!(translate(&t, 0xffff_8000_0000_0000), None);
    }

    #[test]
    fn minimal_tables_map_only_the_first_gib_for_the_supervisor() {
        let t = minimal_identity_tables();
        assert_eq!(translate(&t, ZERO_PAGE_START), Some(ZERO_PAGE_START));
        assert_eq!(translate(&t, (1 << 30) - 1), Some((1 << 30) - 1));
        assert_eq!(translate(&t, 1 << 30), None);
        assert_eq!(translate(&t, IOAPIC_START), None);
        for p in &t {
            for e in p.entries.iter().filter(|e| **e & PTE_PRESENT != 0) {
                assert_eq!(e & PTE_USER, 0, "table at {:#x}", p.addr);
            }
        }
    }

    #[test]
    fn every_level_is_user_accessible() {
        for p in identity_tables() {
            for e in p.entries.iter().filter(|e| **e & PTE_PRESENT != 0) {
                assert_ne!(e & PTE_USER, 0, "table at {:#x}", p.addr);
            }
        }
    }

    #[test]
    fn tables_stay_in_their_reserved_area() {
        for p in identity_tables() {
            assert_eq!(p.addr % 4096, 0);
            assert!(
                p.addr >= PML4_START && p.addr + 4096 <= CMDLINE_START,
                "{:#x}",
                p.addr
            );
        }
    }
}
