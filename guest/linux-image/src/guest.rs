//! minivmm's Linux guest image: Debian's kernel (`vmlinuz`) and an
//! initramfs holding the modules minivmm's devices need and the Linux agent
//! as `/init` (`minivmm image linux`).

use std::path::{Path, PathBuf};

use crate::cpio::Archive;
use crate::deb::{self, KernelTree};
use crate::modules::{Module, ModuleIndex};
use crate::ImageError;

/// The Linux guest agent (agent/linux), a static executable: `/init`.
pub static LINUX_AGENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/minivmm-linux-agent"));

/// Where the agent reads its module list (keep equal to
/// `linux_agent::MODULE_LIST_PATH`, without the leading `/`).
pub const MODULE_LIST: &str = "etc/minivmm/modules";

/// Modules for minivmm's devices: the virtio-mmio transport (found through
/// ACPI `LNRO0005`), vsock over virtio (the agent's port), virtio-rng, and
/// FUSE + virtio-fs. Their dependencies are added from the kernel's tree.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "virtio_rng",
    "fuse",
    "virtiofs",
];

/// File names inside the output directory.
pub const VMLINUZ_NAME: &str = "vmlinuz";
/// The initramfs file name.
pub const INITRAMFS_NAME: &str = "initramfs.img";

/// What to build from.
#[derive(Debug, Clone)]
pub struct GuestImageOptions {
    /// Output directory (created if missing).
    pub out: PathBuf,
    /// A kernel .deb to use instead of resolving and fetching one.
    pub kernel_deb: Option<PathBuf>,
    /// Package cache (downloads are kept there and reused offline).
    pub cache: PathBuf,
}

/// What was built.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The kernel package file used.
    pub kernel_deb: PathBuf,
    /// Kernel release (`uname -r` in the guest).
    pub release: String,
    /// `OUT/vmlinuz`.
    pub vmlinuz: PathBuf,
    /// `OUT/initramfs.img`.
    pub initramfs: PathBuf,
    /// Size of the initramfs in bytes.
    pub initramfs_bytes: u64,
    /// Modules in the image, in load order.
    pub modules: Vec<String>,
}

/// The initramfs for `tree`: `/init` (the agent), `/dev/console`, mount
/// points, the closure of [`GUEST_MODULES`] under `lib/modules/REL/` and
/// their load order in [`MODULE_LIST`].
pub fn guest_initramfs(
    tree: &KernelTree,
    index: &ModuleIndex,
    agent: &[u8],
) -> Result<(Archive, Vec<Module>), ImageError> {
    let modules = index.closure(GUEST_MODULES)?;
    let mut archive = Archive::new();
    archive.add_file("init", 0o755, agent.to_vec())?;
    // The kernel opens /dev/console for init's stdio before devtmpfs exists.
    archive.add_char_dev("dev/console", 0o600, 5, 1)?;
    for dir in ["proc", "sys", "tmp", "run", "root"] {
        archive.add_dir(dir, if dir == "tmp" { 0o1777 } else { 0o755 })?;
    }
    let mut list = String::new();
    for m in &modules {
        let dest = format!("lib/modules/{}/{}", tree.release, m.rel_path);
        let data = std::fs::read(&m.path).map_err(|e| ImageError::io(&m.path, e))?;
        archive.add_file(&dest, 0o644, data)?;
        list.push('/');
        list.push_str(&dest);
        list.push('\n');
    }
    archive.add_file(MODULE_LIST, 0o644, list.into_bytes())?;
    Ok((archive, modules))
}

/// Writes `data` to `path` through a temporary name in the same directory.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, data).map_err(|e| ImageError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ImageError::io(path, e)
    })
}

/// Builds `OUT/vmlinuz` and `OUT/initramfs.img`. Progress goes to
/// `progress`. Nothing is written to OUT unless everything before succeeded;
/// the extraction directory (under the cache) is removed in every case.
pub fn build_guest_image(
    opts: &GuestImageOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<GuestImage, ImageError> {
    let deb_path = deb::kernel_deb(opts.kernel_deb.as_deref(), &opts.cache, progress)?;
    std::fs::create_dir_all(&opts.cache).map_err(|e| ImageError::io(&opts.cache, e))?;
    let extract = opts.cache.join(format!(".extract-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&extract);
    let result = (|| {
        progress(&format!("extracting {}", deb_path.display()));
        deb::extract_deb(&deb_path, &extract)?;
        let tree = KernelTree::open(&extract)?;
        progress(&format!("kernel {}", tree.release));
        let index = ModuleIndex::open(&tree.modules_dir)?;
        let (archive, modules) = guest_initramfs(&tree, &index, LINUX_AGENT)?;
        progress(&format!(
            "initramfs: agent as /init and {} modules ({})",
            modules.len(),
            modules
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        ));
        let initramfs = archive.to_cpio_gz();
        let vmlinuz = std::fs::read(&tree.vmlinuz).map_err(|e| ImageError::io(&tree.vmlinuz, e))?;
        std::fs::create_dir_all(&opts.out).map_err(|e| ImageError::io(&opts.out, e))?;
        let vmlinuz_path = opts.out.join(VMLINUZ_NAME);
        let initramfs_path = opts.out.join(INITRAMFS_NAME);
        write_atomic(&vmlinuz_path, &vmlinuz)?;
        write_atomic(&initramfs_path, &initramfs)?;
        Ok(GuestImage {
            kernel_deb: deb_path.clone(),
            release: tree.release.clone(),
            vmlinuz: vmlinuz_path,
            initramfs: initramfs_path,
            initramfs_bytes: initramfs.len() as u64,
            modules: modules.into_iter().map(|m| m.name).collect(),
        })
    })();
    let _ = std::fs::remove_dir_all(&extract);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offset of PT_INTERP in a little-endian ELF64's program headers, if any.
    fn has_interpreter(elf: &[u8]) -> bool {
        let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
        let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
        let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
        (0..phnum).any(|i| {
            let h = phoff + i * phentsize;
            u32::from_le_bytes(elf[h..h + 4].try_into().unwrap()) == 3
        })
    }

    #[test]
    fn embedded_agent_is_a_static_executable() {
        assert_eq!(&LINUX_AGENT[..4], b"\x7fELF");
        assert!(
            !has_interpreter(LINUX_AGENT),
            "the agent must not need ld.so"
        );
    }
}
