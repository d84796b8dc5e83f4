//! The guest's own page tables: an identity map of the first 16 GiB of
//! guest-physical memory (RAM, the MMIO gap with the virtio-mmio windows, RAM
//! relocated above 4 GiB) in 2 MiB pages, user-accessible at every level so
//! the agent can run in user mode over all of it. The tables are data the
//! assembler computes (like the IDT): nothing is built at boot, where every
//! guest instruction may be emulated. They do not depend on the tables the VMM
//! entered us with: every vCPU loads them first thing in `_start` (`entry`),
//! before it touches anything the VMM's map may lack (the Linux boot protocol
//! promises little: Firecracker maps only the first 1 GiB).
//!
//! User access to everything is deliberate: the agent is the guest's own
//! trusted code, and user mode is used for speed, not isolation (no SMEP/SMAP,
//! so the kernel reaches user data as before).

#![cfg_attr(test, allow(dead_code))]

/// Bytes identity-mapped (what kernel.rs relies on).
pub const MAPPED_BYTES: u64 = 16 << 30;
/// Page directories, one per GiB.
const PD_COUNT: u64 = MAPPED_BYTES >> 30;
/// Present | writable | user.
pub const PTE_PWU: u64 = 0x7;
/// Present | writable | user | 2 MiB page.
pub const PDE_2M_PWU: u64 = 0x87;

/// The page-directory entry that maps the 2 MiB page `index` (pure; checked
/// by the unit tests against what the assembler emits).
pub const fn pde(index: u64) -> u64 {
    (index << 21) | PDE_2M_PWU
}

#[cfg(not(test))]
core::arch::global_asm!(
    r#"
    .pushsection .data.page_tables, "aw"
    .balign 4096
    .globl guest_pml4
guest_pml4:
    .quad guest_pdpt + {pwu}
    .fill 511, 8, 0
guest_pdpt:
    .set pt_i, 0
    .rept {pd_count}
    .quad guest_pd + pt_i * 4096 + {pwu}
    .set pt_i, pt_i + 1
    .endr
    .fill 512 - {pd_count}, 8, 0
guest_pd:
    .set pt_i, 0
    .rept {pd_count} * 512
    .quad (pt_i << 21) + {pde_bits}
    .set pt_i, pt_i + 1
    .endr
    .popsection
    "#,
    pwu = const PTE_PWU,
    pde_bits = const PDE_2M_PWU,
    pd_count = const PD_COUNT,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_map_identity_with_user_access() {
        assert_eq!(pde(0), 0x87);
        assert_eq!(pde(1), 0x20_0087);
        // The last 2 MiB page below 16 GiB.
        assert_eq!(pde(PD_COUNT * 512 - 1) & !0xfff, MAPPED_BYTES - (2 << 20));
        assert_eq!(PDE_2M_PWU & 0x4, 0x4, "user bit");
    }
}
