//! x86_64 boot by the Linux 64-bit boot protocol: load the kernel (ELF or
//! bzImage), write the GDT, identity page tables, zero page and command line,
//! and describe the register state every vCPU starts with.

pub mod acpi;
pub mod cpuid;
pub mod gdt;
pub mod initrd;
pub mod paging;
pub mod params;
pub mod regs;

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::kvm::Flavour;
use crate::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, GDT_START, HIMEM_START, PVM_FORBIDDEN_START, ZERO_PAGE_START,
};

/// ELF note name by which a guest says "start every vCPU at my entry point in
/// 64-bit mode, RDI = vCPU index" (our test guest; Linux gets INIT/SIPI).
pub const MINIVMM_NOTE_NAME: &[u8] = b"minivmm\0";
/// Note type of the direct-AP-start note.
pub const MINIVMM_NOTE_DIRECT_AP: u32 = 0x4d56_0001;
/// Note type by which a guest says "on PVM, enter me in native mode" (see
/// `regs::PVM_NATIVE_CONTROL_MSR`): it runs at hardware CPL 3 with CS 0x33,
/// its IDT gates use the current CS and it needs no IST.
pub const MINIVMM_NOTE_PVM_NATIVE: u32 = 0x4d56_0002;
/// Command line a Linux kernel gets when the user gives none: console on
/// COM1 (what `--console` captures), reboot on panic so a failed boot ends
/// the VM instead of hanging, no PCI probing (minivmm has no PCI bus), and
/// reboot through the i8042 (`reboot=k`: measured in the nested bed, Linux
/// 6.1's default ACPI-first reboot never reached the reset register).
pub const LINUX_DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1 pci=off reboot=k";

/// The command line for `image` when the user gives none: Linux's default
/// for a bzImage, nothing for an ELF guest (the built-in test guest).
pub fn default_cmdline(image: &KernelImage) -> Result<&'static str, BootError> {
    let data = image.read()?;
    Ok(if is_bzimage(&data) {
        LINUX_DEFAULT_CMDLINE
    } else {
        ""
    })
}

fn is_bzimage(data: &[u8]) -> bool {
    data.len() > 0x206 && &data[0x202..0x206] == b"HdrS"
}

/// Offset of the 64-bit entry point from the protected-mode kernel of a bzImage.
const BZIMAGE_ENTRY_64_OFFSET: u64 = 0x200;

/// A kernel to boot: a file, or an image already in memory (the embedded guest).
#[derive(Clone, Debug)]
pub enum KernelImage {
    /// A kernel file on disk.
    Path(PathBuf),
    /// Kernel bytes with a name for messages.
    Bytes {
        /// Shown in errors, e.g. "builtin:testguest".
        name: String,
        /// The image.
        data: Arc<[u8]>,
    },
}

impl KernelImage {
    /// The name shown in errors and manifests.
    pub fn name(&self) -> String {
        match self {
            KernelImage::Path(p) => p.display().to_string(),
            KernelImage::Bytes { name, .. } => name.clone(),
        }
    }

    /// Read the image (a file is read whole: kernels are small).
    pub fn read(&self) -> Result<Arc<[u8]>, BootError> {
        match self {
            KernelImage::Path(p) => {
                std::fs::read(p)
                    .map(Arc::from)
                    .map_err(|source| BootError::ReadKernel {
                        path: p.clone(),
                        source,
                    })
            }
            KernelImage::Bytes { data, .. } => Ok(data.clone()),
        }
    }
}

/// How the VMM enters a guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EntryProtocol {
    /// minivmm's entry: identity map of `IDENTITY_MAP_GIB` GiB (U/S set),
    /// CR4 PAE | OSFXSR | OSXMMEXCPT, and the guest's "minivmm" notes
    /// honoured (every vCPU at the entry, PVM native mode).
    #[default]
    Minivmm,
    /// Only what the Linux 64-bit boot protocol promises, as Firecracker
    /// enters a guest: identity map of the first GiB, CR4 = PAE, CPL 0, the
    /// BSP only, notes ignored (`regs::configure_minimal_linux_entry`). For
    /// tests that a guest relies on nothing more.
    LinuxMinimal,
}

/// How the VMM brings up application processors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ApStart {
    /// Every vCPU starts at the kernel entry in 64-bit mode (guest has the note).
    Direct,
    /// APs wait for INIT/SIPI from the BSP (Linux).
    WaitForSipi,
}

/// Where a loaded kernel starts and what the zero page needs.
#[derive(Clone, Debug)]
pub struct LoadedKernel {
    /// 64-bit entry point (guest-physical = virtual under the identity map).
    pub entry: u64,
    /// Setup header of a bzImage.
    pub header: Option<setup_header>,
    /// How APs are started.
    pub ap_start: ApStart,
    /// The guest asked to be entered in PVM native mode (and the host is PVM).
    pub pvm_native: bool,
    /// First guest-physical byte above the kernel and the memory it claims
    /// while booting (a bzImage's `init_size`): nothing may be loaded below.
    pub end: u64,
}

/// Errors loading a kernel and writing boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be read.
    #[error("cannot read kernel {path}: {source}")]
    ReadKernel {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Neither ELF nor bzImage.
    #[error("kernel {name} is not an ELF or bzImage kernel (bad magic)")]
    NotAKernel {
        /// The kernel.
        name: String,
    },
    /// Bigger than guest RAM.
    #[error("kernel {name} is {size} bytes, larger than guest RAM ({ram} bytes)")]
    TooLarge {
        /// The kernel.
        name: String,
        /// Image size.
        size: u64,
        /// RAM size.
        ram: u64,
    },
    /// The loader rejected the image.
    #[error("cannot load kernel {name}: {reason}")]
    Load {
        /// The kernel.
        name: String,
        /// The loader's message, with a hint.
        reason: String,
    },
    /// Entry point not usable under PVM.
    #[error(
        "kernel {name} enters at {entry:#x}, in the top 2 GiB that PVM forbids for supervisor code"
    )]
    PvmForbiddenEntry {
        /// The kernel.
        name: String,
        /// Its entry.
        entry: u64,
    },
    /// Bad command line.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// The initrd file could not be read.
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The initrd file is empty.
    #[error("initrd {path} is empty")]
    InitrdEmpty {
        /// The file.
        path: PathBuf,
    },
    /// The initrd is neither a cpio archive nor a compressed stream Linux unpacks.
    #[error("initrd {path} is not a cpio archive or a gzip/xz/zstd/lz4/bzip2/lzma/lzo stream (first bytes: {head})")]
    InitrdNotArchive {
        /// The file.
        path: PathBuf,
        /// Its first bytes in hex.
        head: String,
    },
    /// The initrd does not fit between the kernel and the initrd address limit.
    #[error("initrd {path} is {size} bytes, but only {room} bytes of guest RAM are free for it above the kernel (give the VM more memory)")]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Room there is.
        room: u64,
    },
    /// The ACPI tables could not be built.
    #[error("cannot build the ACPI tables: {0}")]
    Acpi(String),
    /// Zero page.
    #[error(transparent)]
    Params(#[from] params::ParamsError),
    /// Writing boot structures into guest memory failed.
    #[error("cannot write {what} into guest memory: {source}")]
    Write {
        /// Which structure.
        what: &'static str,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
}

/// Load `image` into `mem` and return its entry point.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    ram_bytes: u64,
    image: &KernelImage,
    flavour: Flavour,
) -> Result<LoadedKernel, BootError> {
    let name = image.name();
    let data = image.read()?;
    if data.len() as u64 > ram_bytes.saturating_sub(HIMEM_START) {
        return Err(BootError::TooLarge {
            name,
            size: data.len() as u64,
            ram: ram_bytes,
        });
    }
    let load_err = |e: loader::Error| BootError::Load {
        name: name.clone(),
        reason: match e {
            loader::Error::Elf(loader::elf::Error::InvalidProgramHeaderAddress)
            | loader::Error::Elf(loader::elf::Error::ReadKernelImage)
            | loader::Error::Bzimage(loader::bzimage::Error::ReadBzImageCompressedKernel) => {
                format!("{e} (a segment lies outside guest RAM: kernel too large for RAM?)")
            }
            e => e.to_string(),
        },
    };
    let loaded = if data.starts_with(b"\x7fELF") {
        let r = Elf::load(
            mem,
            None,
            &mut Cursor::new(&data[..]),
            Some(GuestAddress(HIMEM_START)),
        )
        .map_err(load_err)?;
        let notes = minivmm_notes(&data);
        let ap_start = if notes.contains(&MINIVMM_NOTE_DIRECT_AP) {
            ApStart::Direct
        } else {
            ApStart::WaitForSipi
        };
        LoadedKernel {
            entry: r.kernel_load.0,
            header: None,
            ap_start,
            pvm_native: flavour == Flavour::Pvm && notes.contains(&MINIVMM_NOTE_PVM_NATIVE),
            end: r.kernel_end,
        }
    } else if is_bzimage(&data) {
        let r = BzImage::load(
            mem,
            None,
            &mut Cursor::new(&data[..]),
            Some(GuestAddress(HIMEM_START)),
        )
        .map_err(load_err)?;
        // The decompressor needs init_size bytes from where the kernel runs
        // (boot protocol 2.10+): the load address, or pref_address (where a
        // relocatable kernel moves itself without KASLR); older kernels only
        // their image.
        let (init_size, pref) = r
            .setup_header
            .map_or((0, 0), |h| (u64::from(h.init_size), h.pref_address));
        let runs_at = r.kernel_load.0.max(pref);
        LoadedKernel {
            entry: r.kernel_load.0 + BZIMAGE_ENTRY_64_OFFSET,
            header: r.setup_header,
            ap_start: ApStart::WaitForSipi,
            pvm_native: false,
            end: r.kernel_end.max(runs_at.saturating_add(init_size)),
        }
    } else {
        return Err(BootError::NotAKernel { name });
    };
    if flavour == Flavour::Pvm && loaded.entry >= PVM_FORBIDDEN_START {
        return Err(BootError::PvmForbiddenEntry {
            name,
            entry: loaded.entry,
        });
    }
    Ok(loaded)
}

/// The types of the "minivmm" notes an ELF image carries. Every offset is
/// bounds-checked: the image is untrusted input.
pub fn minivmm_notes(elf: &[u8]) -> Vec<u32> {
    let mut found = Vec::new();
    const PT_NOTE: u32 = 4;
    let bytes = |o: usize, n: usize| o.checked_add(n).and_then(|end| elf.get(o..end));
    let u16_at = |o: usize| bytes(o, 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| bytes(o, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |o: usize| {
        bytes(o, 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    let as_usize = |v: u64| usize::try_from(v).ok();
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (u64_at(0x20).and_then(as_usize), u16_at(0x36), u16_at(0x38))
    else {
        return found;
    };
    for i in 0..usize::from(phnum) {
        let Some(ph) = usize::from(phentsize)
            .checked_mul(i)
            .and_then(|o| o.checked_add(phoff))
        else {
            return found;
        };
        if u32_at(ph) != Some(PT_NOTE) {
            continue;
        }
        let (Some(mut pos), Some(size)) = (
            ph.checked_add(8).and_then(u64_at).and_then(as_usize),
            ph.checked_add(32).and_then(u64_at).and_then(as_usize),
        ) else {
            return found;
        };
        let end = pos.saturating_add(size).min(elf.len());
        // Each note: namesz, descsz, type, then name and desc padded to 4 bytes.
        while pos.saturating_add(12) <= end {
            let (Some(namesz), Some(descsz), Some(kind)) =
                (u32_at(pos), u32_at(pos + 4), u32_at(pos + 8))
            else {
                break;
            };
            let name_start = pos + 12;
            let align4 = |n: u32| (n as usize).div_ceil(4) * 4;
            if bytes(name_start, namesz as usize) == Some(MINIVMM_NOTE_NAME) {
                found.push(kind);
            }
            pos = name_start
                .saturating_add(align4(namesz))
                .saturating_add(align4(descsz));
        }
    }
    found
}

impl LoadedKernel {
    /// What of the guest's requests `protocol` honours: the minimal Linux
    /// entry starts only the BSP, at CPL 0.
    pub fn under(mut self, protocol: EntryProtocol) -> LoadedKernel {
        if protocol == EntryProtocol::LinuxMinimal {
            self.ap_start = ApStart::WaitForSipi;
            self.pvm_native = false;
        }
        self
    }
}

/// Write the GDT, page tables (those of `protocol`), command line and zero
/// page into guest memory.
pub fn write_boot_structures(
    mem: &GuestMemoryMmap,
    ram_bytes: u64,
    kernel: &LoadedKernel,
    cmdline: &str,
    extras: params::BootExtras,
    protocol: EntryProtocol,
) -> Result<(), BootError> {
    let max = params::cmdline_limit(kernel.header.as_ref());
    if cmdline.len() + 1 > max {
        return Err(params::ParamsError::CmdlineTooLong {
            len: cmdline.len() + 1,
            max,
        }
        .into());
    }
    let write = |what: &'static str, r: Result<(), vm_memory::GuestMemoryError>| {
        r.map_err(|source| BootError::Write { what, source })
    };
    for (i, entry) in gdt::GDT.iter().enumerate() {
        write(
            "GDT",
            mem.write_obj(*entry, GuestAddress(GDT_START + 8 * i as u64)),
        )?;
    }
    let tables = match protocol {
        EntryProtocol::Minivmm => paging::identity_tables(),
        EntryProtocol::LinuxMinimal => paging::minimal_identity_tables(),
    };
    for page in tables {
        for (i, e) in page.entries.iter().enumerate() {
            write(
                "page tables",
                mem.write_obj(*e, GuestAddress(page.addr + 8 * i as u64)),
            )?;
        }
    }
    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    if !cmdline.is_empty() {
        cl.insert_str(cmdline)
            .map_err(|e| BootError::Cmdline(format!("{e} ({} bytes)", cmdline.len())))?;
    }
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let zero_page = params::build_zero_page(
        kernel.header,
        cmdline.len() + 1,
        &params::e820_map(ram_bytes),
        extras,
    )?;
    write(
        "zero page",
        mem.write_obj(zero_page, GuestAddress(ZERO_PAGE_START)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 header + one PT_NOTE program header + the note.
    fn elf_with_note(name: &[u8], kind: u32) -> Vec<u8> {
        let mut v = vec![0u8; 0x40 + 0x38];
        v[..4].copy_from_slice(b"\x7fELF");
        v[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        v[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
        v[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let note_off = v.len() as u64;
        let mut note = Vec::new();
        note.extend_from_slice(&(name.len() as u32).to_le_bytes());
        note.extend_from_slice(&0u32.to_le_bytes());
        note.extend_from_slice(&kind.to_le_bytes());
        note.extend_from_slice(name);
        while note.len() % 4 != 0 {
            note.push(0);
        }
        let ph = 0x40;
        v[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes());
        v[ph + 8..ph + 16].copy_from_slice(&note_off.to_le_bytes());
        v[ph + 32..ph + 40].copy_from_slice(&(note.len() as u64).to_le_bytes());
        v.extend_from_slice(&note);
        v
    }

    #[test]
    fn finds_minivmm_notes_only() {
        let notes = minivmm_notes(&elf_with_note(MINIVMM_NOTE_NAME, MINIVMM_NOTE_DIRECT_AP));
        assert_eq!(notes, vec![MINIVMM_NOTE_DIRECT_AP]);
        assert!(minivmm_notes(&elf_with_note(b"Xen\0", 18)).is_empty());
        assert_eq!(minivmm_notes(&elf_with_note(MINIVMM_NOTE_NAME, 7)), vec![7]);
    }

    #[test]
    fn hostile_elf_headers_do_not_panic() {
        let good = elf_with_note(MINIVMM_NOTE_NAME, MINIVMM_NOTE_DIRECT_AP);
        for len in 0..good.len() {
            let _ = minivmm_notes(&good[..len]);
        }
        let mut bad = good.clone();
        bad[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(minivmm_notes(&bad).is_empty());
        let mut bad = good.clone();
        bad[0x38..0x3a].copy_from_slice(&u16::MAX.to_le_bytes());
        let _ = minivmm_notes(&bad);
        let mut bad = good;
        let n = 0x40 + 0x38;
        bad[n..n + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(minivmm_notes(&bad).is_empty());
    }
}
