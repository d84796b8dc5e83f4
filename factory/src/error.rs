//! Errors of the factory, each naming the file, field or step at fault.

use std::path::PathBuf;

/// Why building a template or cloning a VM failed.
#[derive(Debug, thiserror::Error)]
pub enum FactoryError {
    /// The template directory (its files, manifest, state or config).
    #[error(transparent)]
    Template(#[from] snapshot::TemplateError),
    /// Creating, restoring or driving the VM.
    #[error(transparent)]
    Vm(#[from] vmm::VmError),
    /// Talking to the guest agent.
    #[error("guest agent: {0}")]
    Agent(#[from] agent_protocol::ClientError),
    /// The template directory is not on tmpfs.
    #[error("{dir} is on {fs_type}, not tmpfs: clones would page guest RAM from disk (use --mount-tmpfs, or --allow-non-tmpfs to accept it)")]
    NotTmpfs {
        /// The directory.
        dir: PathBuf,
        /// Its filesystem type (magic number).
        fs_type: String,
    },
    /// A host call failed.
    #[error("{what} {path}: {source}")]
    Host {
        /// The operation.
        what: &'static str,
        /// Its subject.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The guest's agent never answered Check before the boot deadline.
    #[error("the guest agent did not answer within {secs} s (last attempt: {last_error}; guest exit: {exit}; last console line: {last_line:?})")]
    AgentNotReady {
        /// The deadline.
        secs: u64,
        /// Why the last attempt failed.
        last_error: String,
        /// How the VM ended, if it did.
        exit: String,
        /// The last console line.
        last_line: Option<String>,
    },
    /// The guest did not reach a step in time.
    #[error("the guest did not {step} within {secs} s (guest exit: {exit}; last console line: {last_line:?})")]
    GuestTimeout {
        /// What we waited for.
        step: &'static str,
        /// The deadline.
        secs: u64,
        /// How the VM ended, if it did.
        exit: String,
        /// The last console line.
        last_line: Option<String>,
    },
    /// The guest ended before its agent answered.
    #[error(
        "the guest ended ({exit}) before its agent answered (last console line: {last_line:?})"
    )]
    GuestEnded {
        /// How it ended.
        exit: String,
        /// The last console line.
        last_line: Option<String>,
    },
    /// A template's manifest and its decoded state describe different VMs.
    #[error("template {}: the manifest says {field} = {manifest} but its state has {state}", .dir.display())]
    StateMismatch {
        /// Template directory.
        dir: PathBuf,
        /// Manifest field at odds with the state (`vcpus`, `mem_mib`, `memory.size_bytes`, `devices`).
        field: &'static str,
        /// The manifest's value.
        manifest: String,
        /// What the state has.
        state: String,
    },
    /// The kernel image could not be read.
    #[error(transparent)]
    Kernel(#[from] vmm::boot::BootError),
    /// The request differs from the template in a field a clone cannot
    /// change (reported instead of falling back when fallback is off).
    #[error("the request does not match the template: {0}")]
    Mismatch(snapshot::ConfigMismatch),
    /// Growing a clone to the requested vCPUs and memory failed (the
    /// template is fine: this is not a reason to fall back).
    #[error("growing the clone to {vcpus} vCPUs, {mem_mib} MiB: {source}")]
    Grow {
        /// Requested vCPUs.
        vcpus: u32,
        /// Requested memory in MiB.
        mem_mib: u64,
        /// Why.
        source: Box<FactoryError>,
    },
    /// The template is missing, corrupt or cannot be cloned.
    #[error("template {dir} is unusable: {reason}")]
    TemplateUnusable {
        /// The template directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// The factory was closed.
    #[error("the factory is closed")]
    Closed,
}
