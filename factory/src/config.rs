//! The factory's TOML configuration, with Kata's key names where they mean
//! the same: `[hypervisor]` `kernel`, `initrd`, `kernel_params`,
//! `default_vcpus`, `default_memory` (MiB) and `[factory]`
//! `enable_template`, `template_path`, `vm_cache_number`,
//! `vm_cache_endpoint`. Unknown keys are errors, so a typo is not ignored.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where templates go when the config does not say.
pub const DEFAULT_TEMPLATE_PATH: &str = "/dev/shm/minivmm/template";
/// Where a VM cache server would listen when the config does not say.
pub const DEFAULT_CACHE_ENDPOINT: &str = "/run/minivmm/cache.sock";

/// Why a config file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML, or a key of the wrong type or unknown.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key and line).
        message: String,
    },
    /// A key with a value this build cannot honour.
    #[error("{path}: {key} = {value:?}: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// Its value.
        value: String,
        /// Why it is rejected.
        why: &'static str,
    },
}

/// `[hypervisor]`: the guest every factory VM is by default.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HypervisorConfig {
    /// Kernel image; empty or absent: the built-in test guest.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk; not supported by this build (rejected when set).
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub kernel_params: String,
    /// vCPUs.
    #[serde(default = "default_vcpus")]
    pub default_vcpus: u32,
    /// Guest RAM in MiB.
    #[serde(default = "default_memory")]
    pub default_memory: u64,
}

/// `[factory]`: template and cache.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FactorySection {
    /// Clone VMs from a template (otherwise every VM boots cold).
    #[serde(default)]
    pub enable_template: bool,
    /// The template directory (on tmpfs).
    #[serde(default = "default_template_path")]
    pub template_path: PathBuf,
    /// Ready VMs a cache keeps (0: no cache).
    #[serde(default)]
    pub vm_cache_number: usize,
    /// Control socket of a VM cache server.
    #[serde(default = "default_cache_endpoint")]
    pub vm_cache_endpoint: PathBuf,
}

/// A whole config file.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FactoryConfig {
    /// The guest.
    #[serde(default)]
    pub hypervisor: HypervisorConfig,
    /// The factory.
    #[serde(default)]
    pub factory: FactorySection,
}

fn default_vcpus() -> u32 {
    1
}
fn default_memory() -> u64 {
    256
}
fn default_template_path() -> PathBuf {
    DEFAULT_TEMPLATE_PATH.into()
}
fn default_cache_endpoint() -> PathBuf {
    DEFAULT_CACHE_ENDPOINT.into()
}

impl Default for HypervisorConfig {
    fn default() -> Self {
        HypervisorConfig {
            kernel: None,
            initrd: None,
            kernel_params: String::new(),
            default_vcpus: default_vcpus(),
            default_memory: default_memory(),
        }
    }
}

impl Default for FactorySection {
    fn default() -> Self {
        FactorySection {
            enable_template: false,
            template_path: default_template_path(),
            vm_cache_number: 0,
            vm_cache_endpoint: default_cache_endpoint(),
        }
    }
}

impl FactoryConfig {
    /// Read and check the config at `path`.
    pub fn load(path: &Path) -> Result<FactoryConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        FactoryConfig::parse(&text, path)
    }

    /// Parse and check `text` (named `path` in errors).
    pub fn parse(text: &str, path: &Path) -> Result<FactoryConfig, ConfigError> {
        let mut c: FactoryConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string()
                + &e.span()
                    .map(|s| format!(" (at byte {})", s.start))
                    .unwrap_or_default(),
        })?;
        if c.hypervisor
            .kernel
            .as_ref()
            .is_some_and(|k| k.as_os_str().is_empty())
        {
            c.hypervisor.kernel = None;
        }
        if c.hypervisor
            .initrd
            .as_ref()
            .is_some_and(|k| k.as_os_str().is_empty())
        {
            c.hypervisor.initrd = None;
        }
        let invalid = |key, value: String, why| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            value,
            why,
        };
        if c.hypervisor.default_vcpus == 0 {
            return Err(invalid("default_vcpus", "0".into(), "must be at least 1"));
        }
        if c.hypervisor.default_memory == 0 {
            return Err(invalid(
                "default_memory",
                "0".into(),
                "must be at least 1 MiB",
            ));
        }
        if c.factory.enable_template && c.factory.template_path.as_os_str().is_empty() {
            return Err(invalid(
                "template_path",
                String::new(),
                "enable_template needs a template directory",
            ));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FactoryConfig, ConfigError> {
        FactoryConfig::parse(text, Path::new("c.toml"))
    }

    #[test]
    fn kata_keys_are_read() {
        let c = parse(
            r#"
[hypervisor]
kernel = "/boot/vmlinux"
kernel_params = "console=hvc0"
default_vcpus = 2
default_memory = 512

[factory]
enable_template = true
template_path = "/dev/shm/t"
vm_cache_number = 4
vm_cache_endpoint = "/run/c.sock"
"#,
        )
        .unwrap();
        assert_eq!(c.hypervisor.kernel, Some(PathBuf::from("/boot/vmlinux")));
        assert_eq!(c.hypervisor.kernel_params, "console=hvc0");
        assert_eq!(
            (c.hypervisor.default_vcpus, c.hypervisor.default_memory),
            (2, 512)
        );
        assert!(c.factory.enable_template);
        assert_eq!(c.factory.template_path, PathBuf::from("/dev/shm/t"));
        assert_eq!(c.factory.vm_cache_number, 4);
        assert_eq!(c.factory.vm_cache_endpoint, PathBuf::from("/run/c.sock"));
    }

    #[test]
    fn defaults_fill_an_empty_file() {
        let c = parse("").unwrap();
        assert_eq!(c.hypervisor, HypervisorConfig::default());
        assert_eq!(c.factory, FactorySection::default());
        assert_eq!(c.hypervisor.default_memory, 256);
        let c = parse("[hypervisor]\nkernel = \"\"\n").unwrap();
        assert_eq!(c.hypervisor.kernel, None);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = parse("[factory]\nenable_templates = true\n").unwrap_err();
        assert!(e.to_string().contains("enable_templates"), "{e}");
        let e = parse("[hypervisor]\ndefault_vcpus = \"two\"\n").unwrap_err();
        assert!(e.to_string().contains("c.toml"), "{e}");
        let e = parse("[hypervisor]\ndefault_vcpus = 0\n").unwrap_err();
        assert!(e.to_string().contains("default_vcpus"), "{e}");
    }
}
