//! Guest-physical memory map of a minivmm x86_64 VM. The boot structures sit
//! in the first 128 KiB; the kernel loads at or above 1 MiB.

/// GDT used for the 64-bit entry (null, null, code 0x10, data 0x18).
pub const GDT_START: u64 = 0x500;
/// Linux `boot_params` ("zero page"), passed in RSI.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer handed to every vCPU (guests switch to their own).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: the PML4.
pub const PML4_START: u64 = 0x9000;
/// The single PDPT (covers 512 GiB, of which we use the first entries).
pub const PDPT_START: u64 = 0xa000;
/// First of the page directories, one per GiB mapped with 2 MiB pages.
pub const PD_START: u64 = 0x1_0000;
/// How many GiB of guest-physical space the boot page tables identity-map.
pub const IDENTITY_MAP_GIB: u64 = 16;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line we accept, NUL included.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// ACPI tables, RSDP first: in the BIOS area (reserved in e820) that
/// Linux scans for the RSDP, up to `HIMEM_START`.
pub const ACPI_START: u64 = 0xe_0000;
/// Start of "high" memory: kernels load here or above.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the EBDA; RAM below 1 MiB ends here in the e820 map.
pub const EBDA_START: u64 = 0x9_fc00;

/// i8042 data port (the command port is 4 above it).
pub const I8042_PORT: u16 = 0x60;
/// i8042 command port: the FADT's reset register.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// ACPI sleep control (+0) and status (+1) registers of the hardware-reduced FADT.
pub const ACPI_PM_PORT: u16 = 0x600;

/// Start of the 32-bit MMIO gap (RAM above it is relocated past 4 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Where virtio-mmio devices are placed inside the gap.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// IOAPIC registers (in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers (in-kernel irqchip).
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM's TSS area for VMX guests (three pages just below the IOAPIC).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Smallest guest RAM we boot (the test guest uses the first 16 MiB for itself).
pub const MIN_MEM_MIB: u64 = 32;
/// Largest guest RAM we boot: all of it must fit under the identity map.
pub const MAX_MEM_MIB: u64 = (IDENTITY_MAP_GIB << 10) - ((MMIO_GAP_END - MMIO_GAP_START) >> 20);

// The command line ends before the ACPI tables.
const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= ACPI_START);
// The page directories must not run into the command line.
const _: () = assert!(PD_START + IDENTITY_MAP_GIB * 4096 <= CMDLINE_START);

/// PVM forbids supervisor addresses in the top 2 GiB of the address space.
pub const PVM_FORBIDDEN_START: u64 = 0xffff_ffff_8000_0000;

/// The guest-physical RAM regions for `mem_bytes` of RAM: below the MMIO gap,
/// then the remainder from 4 GiB. Returns (start, length) pairs.
pub fn ram_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    let low = mem_bytes.min(MMIO_GAP_START);
    let mut regions = vec![(0, low)];
    if mem_bytes > low {
        regions.push((MMIO_GAP_END, mem_bytes - low));
    }
    regions
}

/// Alignment of the virtio-mem hot-plug region (guests map it in large pages).
pub const HOTPLUG_ALIGN: u64 = 1 << 30;

/// Where a hot-plug (virtio-mem) region of `size` bytes goes for RAM ending
/// at `ram_end`: the first GiB boundary above both RAM and the 32-bit MMIO
/// gap. None if it would not fit under the identity map (the test guest
/// reaches only that much).
pub fn hotplug_region_start(ram_end: u64, size: u64) -> Option<u64> {
    let start = ram_end
        .max(MMIO_GAP_END)
        .checked_next_multiple_of(HOTPLUG_ALIGN)?;
    let end = start.checked_add(size)?;
    (size > 0 && end <= IDENTITY_MAP_GIB << 30).then_some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hotplug_region_sits_above_ram_and_the_gap() {
        assert_eq!(hotplug_region_start(256 << 20, 2 << 30), Some(4 << 30));
        assert_eq!(hotplug_region_start(5 << 30, 1 << 30), Some(5 << 30));
        assert_eq!(
            hotplug_region_start((5 << 30) + 4096, 1 << 30),
            Some(6 << 30)
        );
        assert_eq!(hotplug_region_start(15 << 30, 2 << 30), None);
        assert_eq!(hotplug_region_start(256 << 20, 0), None);
        assert_eq!(hotplug_region_start(u64::MAX - 10, 1 << 30), None);
    }

    #[test]
    fn regions_split_around_the_mmio_gap() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_regions(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
    }

    #[test]
    fn max_memory_fits_the_identity_map() {
        let top = ram_regions(MAX_MEM_MIB << 20)
            .iter()
            .map(|(s, l)| s + l)
            .max()
            .unwrap();
        assert_eq!(top, IDENTITY_MAP_GIB << 30);
    }
}
