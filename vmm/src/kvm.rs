//! Opening `/dev/kvm`, checking that it offers everything minivmm relies on,
//! and telling which flavour of KVM it is (PVM or hardware VMX/SVM).

use std::path::Path;

use kvm_ioctls::{Cap, Kvm};
use serde::Serialize;

/// The KVM API version every KVM since 2.6.22 reports.
pub const KVM_API_VERSION: i32 = 12;

/// Capabilities minivmm cannot work without, with the name shown to users.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::MpState, "KVM_CAP_MP_STATE"),
    (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
    (Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK"),
];

/// Capabilities reported by `minivmm info` but not required.
pub const OPTIONAL_CAPS: &[(Cap, &str)] = &[
    (Cap::KvmclockCtrl, "KVM_CAP_KVMCLOCK_CTRL"),
    (Cap::Xsave2, "KVM_CAP_XSAVE2"),
    (Cap::Xcrs, "KVM_CAP_XCRS"),
    (Cap::Debugregs, "KVM_CAP_DEBUGREGS"),
    (Cap::TscDeadlineTimer, "KVM_CAP_TSC_DEADLINE_TIMER"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
];

/// Which implementation of KVM the host runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavour {
    /// Pagetable-based VM (`kvm_pvm`): no hardware virtualization, guest
    /// supervisor code at CPL 3, events through the PVCS page.
    Pvm,
    /// Intel VT-x (`kvm_intel`).
    Vmx,
    /// AMD-V (`kvm_amd`).
    Svm,
    /// None of the modules we know is loaded (e.g. KVM built in).
    Unknown,
}

impl Flavour {
    /// Detect the flavour from the loaded KVM vendor module.
    pub fn detect() -> Flavour {
        Self::detect_in(Path::new("/sys/module"))
    }

    /// Detect the flavour from a `/sys/module`-like directory.
    pub fn detect_in(sys_module: &Path) -> Flavour {
        if sys_module.join("kvm_pvm").exists() {
            Flavour::Pvm
        } else if sys_module.join("kvm_intel").exists() {
            Flavour::Vmx
        } else if sys_module.join("kvm_amd").exists() {
            Flavour::Svm
        } else {
            Flavour::Unknown
        }
    }
}

/// Errors opening or checking KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM loaded, and may this user open /dev/kvm?)")]
    Open(#[source] kvm_ioctls::Error),
    /// The API version is not the one we speak.
    #[error("/dev/kvm reports API version {found}, minivmm needs {KVM_API_VERSION}")]
    ApiVersion {
        /// The version KVM reported.
        found: i32,
    },
    /// A capability we rely on is missing.
    #[error("/dev/kvm lacks {0}, which minivmm needs")]
    MissingCap(&'static str),
}

/// What `minivmm info` reports about the host's KVM.
#[derive(Clone, Debug, Serialize)]
pub struct KvmInfo {
    /// Detected flavour.
    pub flavour: Flavour,
    /// `KVM_GET_API_VERSION`.
    pub api_version: i32,
    /// `KVM_CAP_NR_VCPUS` (recommended maximum vCPUs).
    pub recommended_vcpus: usize,
    /// `KVM_CAP_MAX_VCPUS`.
    pub max_vcpus: usize,
    /// Every capability we check, with whether it is present.
    pub capabilities: Vec<(String, bool)>,
}

/// Open `/dev/kvm` and verify the API version and every required capability.
pub fn open() -> Result<Kvm, KvmError> {
    let kvm = Kvm::new().map_err(KvmError::Open)?;
    check(&kvm)?;
    Ok(kvm)
}

/// Verify the API version and every required capability of an open KVM.
pub fn check(kvm: &Kvm) -> Result<(), KvmError> {
    let found = kvm.get_api_version();
    if found != KVM_API_VERSION {
        return Err(KvmError::ApiVersion { found });
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(KvmError::MissingCap(name));
        }
    }
    Ok(())
}

/// Describe the host's KVM (flavour, version, capabilities).
pub fn info(kvm: &Kvm) -> KvmInfo {
    let capabilities = REQUIRED_CAPS
        .iter()
        .chain(OPTIONAL_CAPS)
        .map(|(cap, name)| (name.to_string(), kvm.check_extension(*cap)))
        .collect();
    KvmInfo {
        flavour: Flavour::detect(),
        api_version: kvm.get_api_version(),
        recommended_vcpus: kvm.get_nr_vcpus(),
        max_vcpus: kvm.get_max_vcpus(),
        capabilities,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavour_from_module_directory() {
        let dir = std::env::temp_dir().join(format!("minivmm-flavour-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(Flavour::detect_in(&dir), Flavour::Unknown);
        std::fs::create_dir(dir.join("kvm_intel")).unwrap();
        assert_eq!(Flavour::detect_in(&dir), Flavour::Vmx);
        std::fs::create_dir(dir.join("kvm_pvm")).unwrap();
        assert_eq!(Flavour::detect_in(&dir), Flavour::Pvm);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
