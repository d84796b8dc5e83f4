//! A VM handed out by a factory: running, its agent answering, with where it
//! came from, why (if it fell back) and where the time went.

use std::path::Path;
use std::time::Duration;

use agent_protocol::AgentClient;
use snapshot::ConfigMismatch;
use vmm::console::ConsoleLines;
use vmm::Vm;

use crate::clone::GrowTimings;
use crate::direct::BootedVm;
use crate::ClonedVm;

/// Which path produced a ready VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmSource {
    /// Taken from a cache factory's ready VMs.
    Cache,
    /// Cloned from a template on the caller's thread.
    Template,
    /// Booted cold.
    Direct,
}

impl VmSource {
    /// Lower-case name for output.
    pub fn name(self) -> &'static str {
        match self {
            VmSource::Cache => "cache",
            VmSource::Template => "template",
            VmSource::Direct => "direct",
        }
    }
}

/// Why a request for a clone was served by a direct boot instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FallbackReason {
    /// The request differs from the template in a field a clone cannot change.
    Mismatch(ConfigMismatch),
    /// The template is missing, corrupt or failed to clone.
    Template(String),
}

impl std::fmt::Display for FallbackReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FallbackReason::Mismatch(m) => m.fmt(f),
            FallbackReason::Template(e) => write!(f, "template unusable: {e}"),
        }
    }
}

/// The running machine behind a ready VM.
pub enum Machine {
    /// A template clone (copy-on-write memory).
    Clone(ClonedVm),
    /// A cold-booted VM.
    Direct(BootedVm),
}

/// One timed step of getting a VM ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// What the step did (`restore`, `resume`, `connect`, `reseed`, `clock`, `check`, `add_vcpus`, `add_memory`, `online`, `boot`, `agent`, `take`).
    pub name: &'static str,
    /// How long it took.
    pub took: Duration,
}

/// A VM ready for use.
pub struct ReadyVm {
    /// The machine.
    pub machine: Machine,
    /// Where it came from.
    pub source: VmSource,
    /// Set when a template request fell back to a direct boot.
    pub fallback: Option<FallbackReason>,
    /// The steps on the caller's path, in order (a cached VM's build steps
    /// happened earlier, in the background, and are kept for reference).
    pub steps: Vec<Step>,
    /// Time spent on the caller's path from request to ready.
    pub total: Duration,
}

impl ReadyVm {
    /// The VM.
    pub fn vm(&self) -> &Vm {
        match &self.machine {
            Machine::Clone(c) => &c.vm,
            Machine::Direct(d) => &d.vm,
        }
    }

    /// Its agent connection.
    pub fn agent(&mut self) -> &mut AgentClient {
        match &mut self.machine {
            Machine::Clone(c) => &mut c.agent,
            Machine::Direct(d) => &mut d.agent,
        }
    }

    /// Its vsock socket.
    pub fn vsock(&self) -> &Path {
        match &self.machine {
            Machine::Clone(c) => &c.vsock,
            Machine::Direct(d) => &d.vsock,
        }
    }

    /// Its console lines.
    pub fn console(&self) -> &ConsoleLines {
        match &self.machine {
            Machine::Clone(c) => &c.console,
            Machine::Direct(d) => &d.console,
        }
    }

    /// The duration of step `name`, if it ran.
    pub fn step(&self, name: &str) -> Option<Duration> {
        self.steps.iter().find(|s| s.name == name).map(|s| s.took)
    }
}

/// The steps of growing a clone, as get_vm reports them.
pub fn grow_steps(g: &GrowTimings) -> [Step; 3] {
    [
        Step {
            name: "add_vcpus",
            took: g.vcpus,
        },
        Step {
            name: "add_memory",
            took: g.memory,
        },
        Step {
            name: "online",
            took: g.online,
        },
    ]
}
