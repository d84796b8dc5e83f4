//! ACPI tables for kernels that discover the platform through ACPI (Linux):
//! RSDP, XSDT, a hardware-reduced FADT (sleep control/status and reset
//! registers, so poweroff and reboot end the VM), a MADT with one local APIC
//! per vCPU and the IOAPIC, and a DSDT describing COM1 and every virtio-mmio
//! device (`LNRO0005`: Debian's kernels have no `virtio_mmio.device=`
//! command-line support and find virtio-mmio devices only this way).
//!
//! The tables live in the BIOS read-only area (`layout::ACPI_START` up to
//! 1 MiB), which the e820 map reserves and where Linux scans for the RSDP;
//! the zero page also carries the RSDP address (`acpi_rsdp_addr`).

use acpi_tables::aml::{
    self, Device, EISAName, Interrupt, Memory32Fixed, Name, Package, ResourceTemplate, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;
use devices::serial::{COM1_IRQ, COM1_PORT};

use crate::layout::{
    ACPI_PM_PORT, ACPI_START, HIMEM_START, I8042_COMMAND_PORT, IOAPIC_START, LAPIC_START,
};

/// OEM id in every table header.
const OEM_ID: [u8; 6] = *b"MINIVM";
/// OEM revision in every table header.
const OEM_REVISION: u32 = 1;
/// Value written to the reset register: the i8042 "pulse reset line" command.
const RESET_VALUE: u8 = 0xfe;
/// IAPC_BOOT_ARCH bits (ACPI 6.4 §5.2.9.3): no VGA, no MSI, no ASPM
/// control, no CMOS RTC. The 8042 bit stays clear: our i8042 only resets.
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5);
/// "Hypervisor Vendor Identity" of the FADT.
const HYPERVISOR_VENDOR: [u8; 8] = *b"MINIVMM\0";
/// Alignment of each table (the RSDP must be on a 16-byte boundary).
const TABLE_ALIGN: u64 = 16;
/// SLP_TYP of S5 in the `\_S5_` package (what the sleep control register expects).
const S5_SLEEP_TYPE: u8 = devices::acpi_pm::S5_SLEEP_TYPE;

/// One virtio-mmio device as the DSDT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest-physical base of its register window.
    pub base: u64,
    /// Window size.
    pub len: u64,
    /// Its IOAPIC pin (GSI).
    pub irq: u32,
}

/// Where the tables went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiLayout {
    /// The RSDP (for the zero page's `acpi_rsdp_addr`).
    pub rsdp: u64,
    /// First byte after the last table.
    pub end: u64,
}

fn aml_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// The DSDT's AML: COM1, the virtio-mmio devices and the S5 sleep type.
fn dsdt_aml(devices: &[MmioDevice]) -> Result<Vec<u8>, BootError> {
    let mut body = Vec::new();
    let com1_io = IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_irq = Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_crs = ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = EISAName::new("PNP0501");
    Device::new(
        "_SB_.COM1".into(),
        vec![
            &Name::new("_HID".into(), &com1_hid),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_CRS".into(), &com1_crs),
        ],
    )
    .to_aml_bytes(&mut body);
    for (i, dev) in devices.iter().enumerate() {
        let bad = |what: &str| BootError::Acpi(format!("virtio-mmio device {i}: {what}"));
        let base = u32::try_from(dev.base).map_err(|_| bad("base above 4 GiB"))?;
        let len = u32::try_from(dev.len).map_err(|_| bad("window larger than 4 GiB"))?;
        let window = Memory32Fixed::new(true, base, len);
        let irq = Interrupt::new(true, true, false, false, dev.irq);
        let crs = ResourceTemplate::new(vec![&window, &irq]);
        let uid = i as u32;
        Device::new(
            format!("_SB_.V{i:03X}").as_str().into(),
            vec![
                &Name::new("_HID".into(), &"LNRO0005"),
                &Name::new("_UID".into(), &uid),
                &Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut body);
    }
    Name::new(
        "_S5_".into(),
        &Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE]),
    )
    .to_aml_bytes(&mut body);
    Ok(body)
}

/// A table's guest-physical address and bytes.
pub type PlacedTable = (u64, Vec<u8>);

/// Build every table for `vcpus` vCPUs and `devices`, as (address, bytes)
/// pairs starting at `ACPI_START` (RSDP first), all below 1 MiB.
pub fn build_tables(
    vcpus: u32,
    devices: &[MmioDevice],
) -> Result<(AcpiLayout, Vec<PlacedTable>), BootError> {
    let vcpus = u8::try_from(vcpus)
        .map_err(|_| BootError::Acpi(format!("{vcpus} vCPUs do not fit 8-bit APIC ids")))?;
    let mut tables = Vec::new();
    let rsdp_addr = ACPI_START;
    let mut next = align(rsdp_addr + Rsdp::len() as u64);
    let mut place = |bytes: Vec<u8>| {
        let addr = next;
        next = align(addr + bytes.len() as u64);
        tables.push((addr, bytes));
        addr
    };

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"MVMDSDT ", OEM_REVISION);
    dsdt.append_slice(&dsdt_aml(devices)?);
    let dsdt_addr = place(dsdt.as_slice().to_vec());

    let io_byte = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port.into(),
        )
    };
    let mut fadt = FADTBuilder::new(OEM_ID, *b"MVMFACP ", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.reset_reg = io_byte(I8042_COMMAND_PORT);
    fadt.reset_value = RESET_VALUE;
    fadt.sleep_control_reg = io_byte(ACPI_PM_PORT + devices::acpi_pm::SLEEP_CONTROL_OFFSET as u16);
    fadt.sleep_status_reg = io_byte(ACPI_PM_PORT + devices::acpi_pm::SLEEP_STATUS_OFFSET as u16);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    let fadt_addr = place(aml_bytes(&fadt.finalize()));

    let mut madt = MADT::new(
        OEM_ID,
        *b"MVMAPIC ",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    let madt_addr = place(aml_bytes(&madt));

    let mut xsdt = XSDT::new(OEM_ID, *b"MVMXSDT ", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(aml_bytes(&xsdt));

    tables.insert(0, (rsdp_addr, aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr))));
    if next > HIMEM_START {
        return Err(BootError::Acpi(format!(
            "tables end at {next:#x}, beyond the BIOS area that ends at {HIMEM_START:#x}"
        )));
    }
    Ok((
        AcpiLayout {
            rsdp: rsdp_addr,
            end: next,
        },
        tables,
    ))
}

fn align(addr: u64) -> u64 {
    addr.div_ceil(TABLE_ALIGN) * TABLE_ALIGN
}

/// Build the tables and write them into guest memory.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    vcpus: u32,
    devices: &[MmioDevice],
) -> Result<AcpiLayout, BootError> {
    let (layout, tables) = build_tables(vcpus, devices)?;
    for (addr, bytes) in tables {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(|source| BootError::Write {
                what: "ACPI tables",
                source,
            })?;
    }
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    fn find(tables: &[PlacedTable], addr: u64) -> &[u8] {
        &tables.iter().find(|(a, _)| *a == addr).unwrap().1
    }

    #[test]
    fn rsdp_xsdt_fadt_madt_dsdt_link_up_with_valid_checksums() {
        let devs = [
            MmioDevice {
                base: 0xd000_0000,
                len: 0x1000,
                irq: 5,
            },
            MmioDevice {
                base: 0xd000_1000,
                len: 0x1000,
                irq: 6,
            },
        ];
        let (layout, tables) = build_tables(3, &devs).unwrap();
        assert_eq!(layout.rsdp, ACPI_START);
        assert!(layout.end <= HIMEM_START);
        let rsdp = find(&tables, layout.rsdp);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(rsdp));
        let xsdt = find(&tables, u64_at(rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(xsdt));
        assert_eq!(u32_at(xsdt, 4) as usize, xsdt.len());
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        assert_eq!(entries.len(), 2);

        let fadt = find(&tables, entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        assert!(checksum_ok(fadt));
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
        assert_ne!(flags & (1 << 10), 0, "reset register supported");
        // Reset register: system I/O, port 0x64, value 0xfe.
        assert_eq!(fadt[116], 1);
        assert_eq!(u64_at(fadt, 120), 0x64);
        assert_eq!(fadt[128], RESET_VALUE);
        // Sleep control and status registers on the PM ports.
        assert_eq!(u64_at(fadt, 244 + 4), u64::from(ACPI_PM_PORT));
        assert_eq!(u64_at(fadt, 256 + 4), u64::from(ACPI_PM_PORT) + 1);

        let madt = find(&tables, entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        assert!(checksum_ok(madt));
        assert_eq!(u32_at(madt, 36), LAPIC_START as u32);
        let mut lapics = 0;
        let mut ioapics = 0;
        let mut o = 44;
        while o < madt.len() {
            match madt[o] {
                0 => {
                    assert_eq!(madt[o + 3], lapics, "APIC id = vCPU index");
                    lapics += 1;
                }
                1 => {
                    assert_eq!(u32_at(madt, o + 4), IOAPIC_START as u32);
                    ioapics += 1;
                }
                t => panic!("unexpected MADT entry type {t}"),
            }
            o += madt[o + 1] as usize;
        }
        assert_eq!((lapics, ioapics), (3, 1));

        let dsdt = find(&tables, u64_at(fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(dsdt));
        let contains = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"LNRO0005"));
        assert!(contains(b"COM1"));
        assert!(contains(b"V001"));
        assert!(contains(b"_S5_"));
        // Memory32Fixed descriptor of the second device: base and length.
        let mut m32 = vec![0x86, 9, 0, 1];
        m32.extend_from_slice(&0xd000_1000u32.to_le_bytes());
        m32.extend_from_slice(&0x1000u32.to_le_bytes());
        assert!(contains(&m32));
        // Tables do not overlap.
        let mut sorted: Vec<_> = tables.iter().map(|(a, b)| (*a, b.len() as u64)).collect();
        sorted.sort();
        for w in sorted.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0);
        }
    }

    #[test]
    fn too_many_vcpus_for_8_bit_apic_ids_is_an_error() {
        assert!(build_tables(254, &[]).is_ok());
        assert!(build_tables(300, &[]).is_err());
    }
}
