//! Building a template: boot the guest with its RAM as a MAP_SHARED file in
//! the template directory, wait for its agent, have it quiesce (close its
//! connections, listen again), pause, save the VM state next to the memory,
//! and commit the directory atomically (manifest last).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use agent_protocol::{AgentClient, CheckRequest, QuiesceForSnapshotRequest, AGENT_VSOCK_PORT};
use snapshot::{Manifest, TemplateWriter};
use vmm::console::ConsoleLines;
use vmm::{MemoryBackend, Vm, VmConfig};

use crate::{tmpfs, FactoryError, GuestSpec, AGENT_CALL_DEADLINE, BOOT_DEADLINE};

/// How to build a template.
pub struct CreateOptions<'a> {
    /// Accept a directory that is not on tmpfs.
    pub allow_non_tmpfs: bool,
    /// Mount a tmpfs on the directory first (root).
    pub mount_tmpfs: bool,
    /// Replace a committed template in the directory.
    pub overwrite: bool,
    /// Record a SHA-256 of the memory file (slower; `template check --full` uses it).
    pub record_memory_sha256: bool,
    /// The console line after which the guest's agent listens.
    pub ready_line: &'a str,
    /// Progress messages for people.
    pub progress: &'a dyn Fn(&str),
    /// virtio-fs devices of the template VM (their virtiofsd already
    /// listening). The guest negotiates them at boot and mounts nothing;
    /// each clone connects its own virtiofsd (`CloneOptions::fs`).
    pub fs: Vec<vmm::FsShare>,
}

impl Default for CreateOptions<'_> {
    fn default() -> Self {
        CreateOptions {
            allow_non_tmpfs: false,
            mount_tmpfs: false,
            overwrite: false,
            record_memory_sha256: false,
            ready_line: testguest_image::READY_LINE,
            progress: &|_| {},
            fs: Vec::new(),
        }
    }
}

static NEXT_SOCKET: AtomicU64 = AtomicU64::new(0);

/// A process-unique path for a temporary vsock socket.
pub fn temp_socket_path(purpose: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "minivmm-{purpose}-{}-{}.vsock",
        std::process::id(),
        NEXT_SOCKET.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Wait for a console line, or explain (with the guest's exit and last line) why not.
pub(crate) fn wait_console(
    vm: &Vm,
    console: &ConsoleLines,
    needle: &str,
    step: &'static str,
    deadline: Duration,
) -> Result<(), FactoryError> {
    match console.wait_for(needle, 0, deadline) {
        Some(_) => Ok(()),
        None => Err(FactoryError::GuestTimeout {
            step,
            secs: deadline.as_secs(),
            exit: vm
                .wait_exit(Some(Duration::ZERO))
                .map_or("still running".into(), |e| e.to_string()),
            last_line: console.lines().last().cloned(),
        }),
    }
}

/// Build and commit a template of `spec` in `dir`.
pub fn create_template(
    dir: &Path,
    spec: &GuestSpec,
    opts: &CreateOptions<'_>,
) -> Result<Manifest, FactoryError> {
    let progress = opts.progress;
    if opts.mount_tmpfs {
        tmpfs::mount_tmpfs(dir)?;
    } else if !opts.allow_non_tmpfs {
        std::fs::create_dir_all(dir).map_err(|source| FactoryError::Host {
            what: "cannot create",
            path: dir.to_path_buf(),
            source,
        })?;
        tmpfs::require_tmpfs(dir)?;
    }
    let config = spec.guest_config()?;
    let writer = if opts.overwrite {
        TemplateWriter::create_overwrite(dir)?
    } else {
        TemplateWriter::create(dir)?
    };
    let mut writer = writer.record_memory_sha256(opts.record_memory_sha256);

    progress("booting the template VM");
    let socket = temp_socket_path("template");
    let _ = std::fs::remove_file(&socket);
    let console = ConsoleLines::new();
    let mut vm = Vm::create(VmConfig {
        id: format!("template-{}", dir.display()),
        vcpus: spec.vcpus,
        mem_mib: spec.mem_mib,
        memory: MemoryBackend::SharedFile(writer.memory_path()),
        kernel: spec.kernel.clone(),
        cmdline: spec.cmdline.clone(),
        console: Box::new(console.tap(Box::new(std::io::sink()))),
        virtio: vmm::VirtioConfig {
            rng: true,
            vsock: Some(socket.clone()),
            fs: opts.fs.clone(),
            // Room for the clones to grow into (virtio-mem, nothing plugged).
            mem: Some(vmm::virtio::DEFAULT_HOTPLUG_BYTES),
        },
        allow_pvm_native: true,
    })?;
    let result = (|| {
        vm.start()?;
        wait_console(
            &vm,
            &console,
            opts.ready_line,
            "become ready",
            BOOT_DEADLINE,
        )?;
        progress("waiting for the guest agent");
        let mut agent =
            AgentClient::connect_hybrid_vsock(&socket, AGENT_VSOCK_PORT, AGENT_CALL_DEADLINE)?;
        agent.check(&CheckRequest::default(), AGENT_CALL_DEADLINE)?;
        progress("quiescing the agent for the snapshot");
        agent.quiesce_for_snapshot(&QuiesceForSnapshotRequest::default(), AGENT_CALL_DEADLINE)?;
        drop(agent);
        progress("pausing and saving the VM state");
        vm.pause()?;
        Ok::<_, FactoryError>(vm.save()?)
    })();
    vm.stop();
    drop(vm);
    let _ = std::fs::remove_file(&socket);
    let state = result?;
    writer.write_state(&state)?;
    progress("committing the template");
    Ok(writer.commit(&config, "built by minivmm template create")?)
}
