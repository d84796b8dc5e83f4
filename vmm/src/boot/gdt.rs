//! The boot GDT and the segment state of the 64-bit entry. Under PVM a vCPU
//! becomes a PVM vCPU when it is put in 64-bit mode with a DPL-0 64-bit CS.

use kvm_bindings::kvm_segment;

/// Selector of the 64-bit code segment.
pub const CODE_SELECTOR: u16 = 0x10;
/// Selector of the data segment.
pub const DATA_SELECTOR: u16 = 0x18;

/// Selector of the DPL-3 data segment (Linux's __USER_DS).
pub const USER_DATA_SELECTOR: u16 = 0x2b;
/// Selector of the DPL-3 64-bit code segment (Linux's __USER_CS).
pub const USER_CODE_SELECTOR: u16 = 0x33;

/// GDT descriptors: null, unused, code (L=1, DPL 0, type 0xb), data (type
/// 0x3), unused (user CS32), user data (DPL 3), user code (L=1, DPL 3). The
/// user entries describe the segments of PVM native mode.
pub const GDT: [u64; 7] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    0,
    gdt_entry(0xc0f3, 0, 0xfffff),
    gdt_entry(0xa0fb, 0, 0xfffff),
];

/// Encode a segment descriptor from its flags word (G, D/B, L, AVL in bits
/// 12..15; P, DPL, S, type in bits 0..7), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = flags as u64;
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The KVM segment register that matches GDT entry `index`.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granular = (entry >> 55) & 1 == 1;
    kvm_segment {
        base: (((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000)),
        limit: if granular {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64bit_dpl0() {
        assert_eq!(GDT[2], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT[3], 0x00cf_9300_0000_ffff);
        let cs = segment_from_gdt(GDT[2], 2);
        assert_eq!(cs.selector, CODE_SELECTOR);
        assert_eq!(
            (cs.l, cs.db, cs.dpl, cs.type_, cs.present, cs.s),
            (1, 0, 0, 0xb, 1, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(GDT[3], 3);
        assert_eq!(ds.selector, DATA_SELECTOR);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 3));
        let ucs = segment_from_gdt(GDT[6], 6);
        assert_eq!(
            (ucs.selector | 3, ucs.dpl, ucs.l),
            (USER_CODE_SELECTOR, 3, 1)
        );
        let uds = segment_from_gdt(GDT[5], 5);
        assert_eq!((uds.selector | 3, uds.dpl), (USER_DATA_SELECTOR, 3));
    }
}
