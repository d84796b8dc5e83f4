//! The template factory: clone the template when the request matches it,
//! fall back to a direct boot when it does not (or when the template is
//! missing or corrupt), unless told to treat that as an error. Never builds
//! a template on the hot path.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::ready::{grow_steps, FallbackReason, Machine, ReadyVm, Step, VmSource};
use crate::request::check_config;
use crate::{CloneOptions, DirectFactory, Factory, FactoryError, TemplateHandle, VmRequest};

/// Clones a template; see the module doc for the fallback rules.
pub struct TemplateFactory {
    dir: PathBuf,
    handle: Result<TemplateHandle, String>,
    direct: DirectFactory,
    no_fallback: bool,
}

impl TemplateFactory {
    /// A factory over the template in `dir`. A template that does not
    /// validate is remembered, not an error: requests then fall back.
    pub fn open(dir: &Path, direct: DirectFactory, no_fallback: bool) -> TemplateFactory {
        let handle = TemplateHandle::open(dir, None).map_err(|e| e.to_string());
        if let Err(e) = &handle {
            tracing::warn!(template = %dir.display(), error = %e, "template unusable; requests will boot directly");
        }
        TemplateFactory {
            dir: dir.to_path_buf(),
            handle,
            direct,
            no_fallback,
        }
    }

    /// The template directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The validated template, or why it is not usable.
    pub fn handle(&self) -> Result<&TemplateHandle, &str> {
        self.handle.as_ref().map_err(String::as_str)
    }

    /// Clone the template for `request` without any fallback.
    pub fn clone_for(&self, request: &VmRequest) -> Result<ReadyVm, FactoryError> {
        let handle = self
            .handle
            .as_ref()
            .map_err(|e| FactoryError::TemplateUnusable {
                dir: self.dir.clone(),
                reason: e.clone(),
            })?;
        let base = &handle.template().manifest().config;
        let growth = check_config(base, request.config()).map_err(FactoryError::Mismatch)?;
        if !handle.template().memory_path().exists() {
            return Err(FactoryError::TemplateUnusable {
                dir: self.dir.clone(),
                reason: "its memory file is gone".into(),
            });
        }
        let t0 = Instant::now();
        let mut clone = handle.clone_vm(CloneOptions {
            id: request.id.clone(),
            vsock: request.vsock.clone(),
            fs: Vec::new(),
        })?;
        let t = clone.timings;
        let grown = if growth.is_none() {
            None
        } else {
            let (vcpus, mem_mib) = (request.config().vcpus, request.config().mem_mib);
            Some(clone.grow(vcpus, mem_mib).map_err(|e| FactoryError::Grow {
                vcpus,
                mem_mib,
                source: Box::new(e),
            })?)
        };
        let mut steps = vec![
            Step {
                name: "restore",
                took: t.restore,
            },
            Step {
                name: "resume",
                took: t.resume,
            },
            Step {
                name: "connect",
                took: t.connect,
            },
            Step {
                name: "reseed",
                took: t.reseed,
            },
            Step {
                name: "clock",
                took: t.clock,
            },
            Step {
                name: "check",
                took: t.check,
            },
        ];
        if let Some(g) = grown {
            steps.extend(grow_steps(&g));
        }
        Ok(ReadyVm {
            machine: Machine::Clone(clone),
            source: VmSource::Template,
            fallback: None,
            steps,
            total: t0.elapsed(),
        })
    }

    fn fall_back(
        &self,
        request: &VmRequest,
        reason: FallbackReason,
    ) -> Result<ReadyVm, FactoryError> {
        let mut vm = self.direct.boot(request)?;
        vm.fallback = Some(reason);
        Ok(vm)
    }
}

impl Factory for TemplateFactory {
    fn get_vm(&self, request: &VmRequest) -> Result<ReadyVm, FactoryError> {
        let t0 = Instant::now();
        let err = match self.clone_for(request) {
            Ok(vm) => return Ok(vm),
            Err(e) => e,
        };
        let reason = match err {
            FactoryError::Mismatch(m) => FallbackReason::Mismatch(m),
            FactoryError::Grow { .. } => return Err(err),
            other => FallbackReason::Template(other.to_string()),
        };
        if self.no_fallback {
            return Err(match reason {
                FallbackReason::Mismatch(m) => FactoryError::Mismatch(m),
                FallbackReason::Template(reason) => FactoryError::TemplateUnusable {
                    dir: self.dir.clone(),
                    reason,
                },
            });
        }
        match &reason {
            FallbackReason::Mismatch(m) => tracing::warn!(
                template = %self.dir.display(),
                field = m.field,
                template_value = %m.template,
                requested = %m.requested,
                "request differs from the template; booting directly"
            ),
            FallbackReason::Template(e) => tracing::warn!(
                template = %self.dir.display(),
                error = %e,
                "template unusable; booting directly"
            ),
        }
        let mut vm = self.fall_back(request, reason)?;
        vm.total = t0.elapsed();
        Ok(vm)
    }

    fn close(&self) {}
}
