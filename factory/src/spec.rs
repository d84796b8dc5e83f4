//! What guest to build a template of: vCPUs, memory, kernel, initrd,
//! command line.

use std::path::PathBuf;
use std::sync::Arc;

use snapshot::{GuestConfig, KernelRef};
use vmm::KernelImage;

use crate::FactoryError;

/// The devices every template VM has (agent over vsock, entropy over rng,
/// virtio-mem to grow clones), named as the saved state names them
/// (`VirtioState::device_names`).
pub fn template_devices() -> Vec<String> {
    vec![
        "rng".to_string(),
        "vsock".to_string(),
        format!("mem:{}", vmm::virtio::DEFAULT_HOTPLUG_BYTES),
    ]
}

/// A guest to boot into a template.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    /// vCPUs.
    pub vcpus: u32,
    /// RAM in MiB.
    pub mem_mib: u64,
    /// Kernel image.
    pub kernel: KernelImage,
    /// Kernel command line (without the VMM's own additions).
    pub cmdline: String,
    /// Initial ramdisk (a Linux guest's initramfs with its agent). Only the
    /// template boots it; clones restore its memory and never read it.
    pub initrd: Option<PathBuf>,
}

impl GuestSpec {
    /// The built-in test guest with `vcpus` and `mem_mib`.
    pub fn testguest(vcpus: u32, mem_mib: u64) -> GuestSpec {
        GuestSpec {
            vcpus,
            mem_mib,
            kernel: KernelImage::Bytes {
                name: testguest_image::TESTGUEST_NAME.into(),
                data: Arc::from(testguest_image::TESTGUEST_ELF),
            },
            cmdline: String::new(),
            initrd: None,
        }
    }

    /// The config recorded in (and compared against) a template manifest.
    pub fn guest_config(&self) -> Result<GuestConfig, FactoryError> {
        let image = self.kernel.read()?;
        let initrd = match &self.initrd {
            Some(path) => Some(KernelRef {
                path: path.display().to_string(),
                sha256: snapshot::sha256_hex(&vmm::boot::initrd::read_initrd(path)?),
            }),
            None => None,
        };
        Ok(GuestConfig {
            vcpus: self.vcpus,
            mem_mib: self.mem_mib,
            kernel: KernelRef {
                path: self.kernel.name(),
                sha256: snapshot::sha256_hex(&image),
            },
            cmdline: self.cmdline.clone(),
            initrd,
            devices: template_devices(),
        })
    }
}
