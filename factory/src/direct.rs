//! The direct factory: boot the requested guest cold and hand it out once
//! its agent answers Check. Readiness is the agent, never a console line, so
//! any guest with the agent works (the test guest, a Linux guest).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use agent_protocol::AgentClient;
use vmm::console::ConsoleLines;
use vmm::{MemoryBackend, Vm, VmConfig};

use crate::ready::{Machine, ReadyVm, Step, VmSource};
use crate::template::{temp_socket_path, wait_for_agent};
use crate::{Factory, FactoryError, VmRequest, BOOT_DEADLINE};

/// A cold-booted VM with its agent connected.
pub struct BootedVm {
    /// The VM.
    pub vm: Vm,
    /// Its agent connection.
    pub agent: AgentClient,
    /// Its console lines.
    pub console: ConsoleLines,
    /// Its vsock socket.
    pub vsock: PathBuf,
}

impl Drop for BootedVm {
    fn drop(&mut self) {
        self.vm.stop();
        let _ = std::fs::remove_file(&self.vsock);
    }
}

/// Boots every request cold (the fallback of the other factories).
#[derive(Clone, Debug)]
pub struct DirectFactory {
    /// Let a PVM guest enter native mode (on PVM hosts).
    pub allow_pvm_native: bool,
    /// Deadline for the guest's agent to answer after the boot starts.
    pub deadline: Duration,
}

impl Default for DirectFactory {
    fn default() -> Self {
        DirectFactory {
            allow_pvm_native: true,
            deadline: BOOT_DEADLINE,
        }
    }
}

impl DirectFactory {
    /// Boot `request` and wait for its agent; timed steps `boot` and `agent`.
    pub fn boot(&self, request: &VmRequest) -> Result<ReadyVm, FactoryError> {
        let t0 = Instant::now();
        let spec = request.spec();
        let vsock = request
            .vsock
            .clone()
            .unwrap_or_else(|| temp_socket_path("direct"));
        let _ = std::fs::remove_file(&vsock);
        let console = ConsoleLines::new();
        let mut vm = Vm::create(VmConfig {
            id: request.id.clone().unwrap_or_else(vmm::vm::default_vm_id),
            vcpus: spec.vcpus,
            mem_mib: spec.mem_mib,
            memory: MemoryBackend::Anonymous,
            kernel: spec.kernel.clone(),
            cmdline: spec.cmdline.clone(),
            initrd: spec.initrd.clone(),
            console: Box::new(console.tap(Box::new(std::io::sink()))),
            virtio: vmm::VirtioConfig {
                rng: true,
                vsock: Some(vsock.clone()),
                ..vmm::VirtioConfig::default()
            },
            allow_pvm_native: self.allow_pvm_native,
        })?;
        let started = vm.start();
        let boot = t0.elapsed();
        let agent = started
            .map_err(FactoryError::from)
            .and_then(|()| wait_for_agent(&vm, &vsock, &console, self.deadline));
        let agent = match agent {
            Ok(a) => a,
            Err(e) => {
                vm.stop();
                let _ = std::fs::remove_file(&vsock);
                return Err(e);
            }
        };
        let total = t0.elapsed();
        Ok(ReadyVm {
            machine: Machine::Direct(BootedVm {
                vm,
                agent,
                console,
                vsock,
            }),
            source: VmSource::Direct,
            fallback: None,
            steps: vec![
                Step {
                    name: "boot",
                    took: boot,
                },
                Step {
                    name: "agent",
                    took: total - boot,
                },
            ],
            total,
        })
    }
}

impl Factory for DirectFactory {
    fn get_vm(&self, request: &VmRequest) -> Result<ReadyVm, FactoryError> {
        self.boot(request)
    }

    fn close(&self) {}
}
