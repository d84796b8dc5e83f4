//! What a caller asks the factory for, and the config check (Kata's
//! checkVMConfig): which differences a clone of the base can absorb by
//! growing (vCPUs, memory) and which force a direct boot.

use std::path::PathBuf;

use snapshot::{ConfigMismatch, GuestConfig};

use crate::{FactoryError, GuestSpec};

/// A request for a ready VM. The guest config (with the kernel's hash) is
/// computed once here, so comparing it on the hot path costs no hashing.
#[derive(Clone, Debug)]
pub struct VmRequest {
    spec: GuestSpec,
    config: GuestConfig,
    /// VM id for logs (default: derived from the process).
    pub id: Option<String>,
    /// The VM's vsock socket (default: a temporary path, removed on drop).
    pub vsock: Option<PathBuf>,
}

impl VmRequest {
    /// A request for the guest `spec` (reads and hashes its kernel).
    pub fn new(spec: GuestSpec) -> Result<VmRequest, FactoryError> {
        let config = spec.guest_config()?;
        Ok(VmRequest {
            spec,
            config,
            id: None,
            vsock: None,
        })
    }

    /// The guest to boot.
    pub fn spec(&self) -> &GuestSpec {
        &self.spec
    }

    /// The guest config compared with a template's.
    pub fn config(&self) -> &GuestConfig {
        &self.config
    }
}

/// What a clone of the base must grow by to become the requested VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Growth {
    /// vCPUs to reach (more than the base has), if any.
    pub vcpus: Option<u32>,
    /// Guest RAM in MiB to reach (more than the base has), if any.
    pub mem_mib: Option<u64>,
}

impl Growth {
    /// True when the clone is the requested VM as it is.
    pub fn is_none(&self) -> bool {
        self.vcpus.is_none() && self.mem_mib.is_none()
    }
}

/// Compares a request with the base config field by field: kernel identity
/// (hash), command line, devices must be equal; vCPUs and memory may be
/// larger than the base (the clone grows), never smaller (nothing shrinks a
/// running guest). The first field that differs otherwise is returned.
pub fn check_config(base: &GuestConfig, requested: &GuestConfig) -> Result<Growth, ConfigMismatch> {
    let differ = |field: &'static str, base: String, requested: String| ConfigMismatch {
        field,
        template: base,
        requested,
    };
    if !base
        .kernel
        .sha256
        .eq_ignore_ascii_case(&requested.kernel.sha256)
    {
        return Err(differ(
            "kernel.sha256",
            base.kernel.sha256.clone(),
            requested.kernel.sha256.clone(),
        ));
    }
    let initrd_hash = |c: &GuestConfig| c.initrd.as_ref().map(|i| i.sha256.to_ascii_lowercase());
    if initrd_hash(base) != initrd_hash(requested) {
        let show = |c: &GuestConfig| {
            c.initrd
                .as_ref()
                .map_or("none".to_string(), |i| i.sha256.clone())
        };
        return Err(differ("initrd.sha256", show(base), show(requested)));
    }
    if base.cmdline != requested.cmdline {
        return Err(differ(
            "cmdline",
            format!("{:?}", base.cmdline),
            format!("{:?}", requested.cmdline),
        ));
    }
    if base.devices != requested.devices {
        return Err(differ(
            "devices",
            base.devices.join(","),
            requested.devices.join(","),
        ));
    }
    if requested.vcpus < base.vcpus {
        return Err(differ(
            "vcpus",
            base.vcpus.to_string(),
            requested.vcpus.to_string(),
        ));
    }
    if requested.mem_mib < base.mem_mib {
        return Err(differ(
            "mem_mib",
            base.mem_mib.to_string(),
            requested.mem_mib.to_string(),
        ));
    }
    Ok(Growth {
        vcpus: (requested.vcpus > base.vcpus).then_some(requested.vcpus),
        mem_mib: (requested.mem_mib > base.mem_mib).then_some(requested.mem_mib),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot::KernelRef;

    fn base() -> GuestConfig {
        GuestConfig {
            vcpus: 1,
            mem_mib: 256,
            kernel: KernelRef {
                path: "builtin:testguest".into(),
                sha256: "ab".repeat(32),
            },
            cmdline: String::new(),
            initrd: None,
            devices: vec!["rng".into(), "vsock".into()],
        }
    }

    #[test]
    fn another_initrd_is_a_mismatch_named_initrd() {
        let mut other = base();
        other.initrd = Some(KernelRef {
            path: "/tmp/initrd.img".into(),
            sha256: "cd".repeat(32),
        });
        let e = check_config(&base(), &other).unwrap_err();
        assert_eq!(e.field, "initrd.sha256");
        assert_eq!(e.template, "none");
    }

    #[test]
    fn equal_configs_need_no_growth() {
        assert_eq!(check_config(&base(), &base()), Ok(Growth::default()));
        assert!(Growth::default().is_none());
    }

    #[test]
    fn kernel_is_compared_by_hash_not_path() {
        let mut r = base();
        r.kernel.path = "/boot/other-name".into();
        r.kernel.sha256 = r.kernel.sha256.to_uppercase();
        assert_eq!(check_config(&base(), &r), Ok(Growth::default()));
        r.kernel.sha256 = "cd".repeat(32);
        let m = check_config(&base(), &r).unwrap_err();
        assert_eq!(m.field, "kernel.sha256");
        assert_eq!(m.template, "ab".repeat(32));
        assert_eq!(m.requested, "cd".repeat(32));
    }

    #[test]
    fn cmdline_difference_names_both_values() {
        let mut r = base();
        r.cmdline = "action=count".into();
        let m = check_config(&base(), &r).unwrap_err();
        assert_eq!(m.field, "cmdline");
        assert_eq!(m.template, "\"\"");
        assert_eq!(m.requested, "\"action=count\"");
        assert!(m.to_string().contains("action=count"), "{m}");
    }

    #[test]
    fn devices_must_match_in_order() {
        let mut r = base();
        r.devices.reverse();
        assert_eq!(check_config(&base(), &r).unwrap_err().field, "devices");
        r.devices = vec!["rng".into()];
        let m = check_config(&base(), &r).unwrap_err();
        assert_eq!(
            (m.template.as_str(), m.requested.as_str()),
            ("rng,vsock", "rng")
        );
    }

    #[test]
    fn vcpus_and_memory_grow_but_never_shrink() {
        let mut r = base();
        r.vcpus = 2;
        r.mem_mib = 512;
        assert_eq!(
            check_config(&base(), &r),
            Ok(Growth {
                vcpus: Some(2),
                mem_mib: Some(512)
            })
        );
        r.mem_mib = 256;
        assert_eq!(
            check_config(&base(), &r),
            Ok(Growth {
                vcpus: Some(2),
                mem_mib: None
            })
        );
        let mut small = base();
        small.mem_mib = 128;
        let m = check_config(&base(), &small).unwrap_err();
        assert_eq!(
            (m.field, m.template.as_str(), m.requested.as_str()),
            ("mem_mib", "256", "128")
        );
        let mut mut_base = base();
        mut_base.vcpus = 2;
        assert_eq!(check_config(&mut_base, &base()).unwrap_err().field, "vcpus");
    }

    #[test]
    fn identity_fields_are_checked_before_sizes() {
        // A request that differs in both reports the field that forces a
        // direct boot, not a growable one.
        let mut r = base();
        r.vcpus = 4;
        r.cmdline = "x".into();
        assert_eq!(check_config(&base(), &r).unwrap_err().field, "cmdline");
    }
}
