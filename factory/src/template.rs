//! Building a template: boot the guest with its RAM as a MAP_SHARED file in
//! the template directory, wait for its agent, have it quiesce (close its
//! connections, listen again), pause, save the VM state next to the memory,
//! and commit the directory atomically (manifest last).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
    /// How long the cold boot may take until the guest's agent answers Check.
    pub boot_deadline: Duration,
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
            boot_deadline: BOOT_DEADLINE,
            progress: &|_| {},
            fs: Vec::new(),
        }
    }
}

static NEXT_SOCKET: AtomicU64 = AtomicU64::new(0);

/// A process-unique path for a temporary vsock socket. The first call of a
/// process also removes such sockets left by minivmm processes that are
/// gone (killed before they could clean up).
pub fn temp_socket_path(purpose: &str) -> PathBuf {
    static CLEANED: std::sync::Once = std::sync::Once::new();
    CLEANED.call_once(remove_stale_temp_sockets);
    std::env::temp_dir().join(format!(
        "minivmm-{purpose}-{}-{}.vsock",
        std::process::id(),
        NEXT_SOCKET.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Remove `minivmm-<purpose>-<pid>-<n>.vsock` sockets (and their `_<port>`
/// siblings) in the temporary directory whose process no longer exists.
fn remove_stale_temp_sockets() {
    use std::os::unix::fs::FileTypeExt;
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temp_socket_owner) else {
            continue;
        };
        let is_socket = entry.file_type().is_ok_and(|t| t.is_socket());
        // SAFETY: kill with signal 0 only checks that the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if is_socket && gone {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The pid in a name made by [`temp_socket_path`] (`minivmm-P-PID-N.vsock[_PORT]`).
fn temp_socket_owner(name: &str) -> Option<i32> {
    let rest = name.strip_prefix("minivmm-")?;
    let stem = rest.split(".vsock").next()?;
    if !rest[stem.len()..].starts_with(".vsock") {
        return None;
    }
    let mut parts = stem.rsplitn(3, '-');
    let _n: u64 = parts.next()?.parse().ok()?;
    let pid: i32 = parts.next()?.parse().ok()?;
    parts.next()?;
    (pid > 0).then_some(pid)
}

/// First wait between two attempts to reach a booting guest's agent (the
/// built-in guest listens within milliseconds); it doubles up to
/// [`AGENT_RETRY_MAX`] so a slow Linux boot is not hammered.
const AGENT_RETRY_FIRST: Duration = Duration::from_millis(2);
/// Longest wait between two attempts to reach a booting guest's agent.
const AGENT_RETRY_MAX: Duration = Duration::from_millis(200);

/// Wait until the agent of the booting `vm` answers Check on its hybrid
/// vsock `socket`, within `deadline`, and return the connected client.
/// Readiness is the agent's answer, never a console line, so any guest
/// (built-in or Linux) works; `console` only explains a failure.
pub fn wait_for_agent(
    vm: &Vm,
    socket: &Path,
    console: &ConsoleLines,
    deadline: Duration,
) -> Result<AgentClient, FactoryError> {
    let start = Instant::now();
    let mut retry = AGENT_RETRY_FIRST;
    loop {
        let remaining = deadline.saturating_sub(start.elapsed());
        let attempt = remaining.min(AGENT_CALL_DEADLINE);
        let last_error = match AgentClient::connect_hybrid_vsock(socket, AGENT_VSOCK_PORT, attempt)
            .and_then(|mut agent| {
                agent.check(&CheckRequest::default(), attempt)?;
                Ok(agent)
            }) {
            Ok(agent) => return Ok(agent),
            Err(e) => e.to_string(),
        };
        let remaining = deadline.saturating_sub(start.elapsed());
        // Between attempts, wait for the guest to end (an event) rather than
        // sleep: a guest that panics or powers off fails the wait at once.
        if let Some(exit) = vm.wait_exit(Some(remaining.min(retry))) {
            return Err(FactoryError::GuestEnded {
                exit: exit.to_string(),
                last_line: console.lines().last().cloned(),
            });
        }
        retry = (retry * 2).min(AGENT_RETRY_MAX);
        if start.elapsed() >= deadline {
            return Err(FactoryError::AgentNotReady {
                secs: deadline.as_secs(),
                last_error,
                exit: "still running".into(),
                last_line: console.lines().last().cloned(),
            });
        }
    }
}

/// Build and commit a template of `spec` in `dir`.
pub fn create_template(
    dir: &Path,
    spec: &GuestSpec,
    opts: &CreateOptions<'_>,
) -> Result<Manifest, FactoryError> {
    let progress = opts.progress;
    // Reads (and checks) the kernel and the initrd before anything on disk
    // changes: a bad input file leaves no directory behind.
    let config = spec.guest_config()?;
    let dir_existed = dir.exists();
    let remove_new_dir = || {
        if !dir_existed {
            let _ = std::fs::remove_dir(dir);
        }
    };
    if opts.mount_tmpfs {
        tmpfs::mount_tmpfs(dir)?;
    } else if !opts.allow_non_tmpfs {
        std::fs::create_dir_all(dir).map_err(|source| FactoryError::Host {
            what: "cannot create",
            path: dir.to_path_buf(),
            source,
        })?;
        tmpfs::require_tmpfs(dir).inspect_err(|_| remove_new_dir())?;
    }
    let writer = if opts.overwrite {
        TemplateWriter::create_overwrite(dir)?
    } else {
        TemplateWriter::create(dir)?
    };
    let mut writer = writer.record_memory_sha256(opts.record_memory_sha256);
    let state = match boot_and_save(dir, spec, opts, &writer.memory_path()) {
        Ok(state) => state,
        Err(e) => {
            // The VM never got far enough to be a template: no partial RAM
            // file (and no directory we created) stays behind.
            let _ = std::fs::remove_file(writer.memory_path());
            if !opts.mount_tmpfs {
                remove_new_dir();
            }
            return Err(e);
        }
    };
    writer.write_state(&state)?;
    // The manifest lists the devices the saved state has, not what was asked for.
    let config = snapshot::GuestConfig {
        devices: state.virtio.device_names(),
        ..config
    };
    progress("committing the template");
    Ok(writer.commit(
        &config,
        vmm::state::STATE_SCHEMA,
        "built by minivmm template create",
    )?)
}

/// Boot `spec` with its RAM in `memory` (MAP_SHARED), wait for its agent,
/// quiesce it, pause and save the VM state.
fn boot_and_save(
    dir: &Path,
    spec: &GuestSpec,
    opts: &CreateOptions<'_>,
    memory: &Path,
) -> Result<vmm::state::VmState, FactoryError> {
    let progress = opts.progress;
    progress("booting the template VM");
    // A stale socket there is replaced and a live one refused by the device;
    // it removes its own socket when the VM is dropped.
    let socket = temp_socket_path("template");
    let console = ConsoleLines::new();
    let mut vm = Vm::create(VmConfig {
        id: format!("template-{}", dir.display()),
        vcpus: spec.vcpus,
        mem_mib: spec.mem_mib,
        memory: MemoryBackend::SharedFile(memory.to_path_buf()),
        kernel: spec.kernel.clone(),
        cmdline: spec.cmdline.clone(),
        initrd: spec.initrd.clone(),
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
        progress("waiting for the guest agent");
        let mut agent = wait_for_agent(&vm, &socket, &console, opts.boot_deadline)?;
        progress("quiescing the agent for the snapshot");
        agent.quiesce_for_snapshot(&QuiesceForSnapshotRequest::default(), AGENT_CALL_DEADLINE)?;
        drop(agent);
        // The guest closes its side as it quiesces: save only once every
        // connection is gone, so none is half-open in the snapshot.
        let open = vm.wait_vsock_idle(AGENT_CALL_DEADLINE);
        if open > 0 {
            return Err(FactoryError::GuestTimeout {
                step: "close its vsock connections after quiescing",
                secs: AGENT_CALL_DEADLINE.as_secs(),
                exit: format!("{open} connection(s) still open"),
                last_line: console.lines().last().cloned(),
            });
        }
        progress("pausing and saving the VM state");
        vm.pause()?;
        Ok::<_, FactoryError>(vm.save()?)
    })();
    vm.stop();
    drop(vm);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_socket_names_give_their_owner() {
        assert_eq!(temp_socket_owner("minivmm-template-123-0.vsock"), Some(123));
        assert_eq!(
            temp_socket_owner("minivmm-clone-77-12.vsock_1024"),
            Some(77)
        );
        assert_eq!(temp_socket_owner("minivmm-e2e-5-x"), None);
        assert_eq!(temp_socket_owner("minivmm-template-abc-0.vsock"), None);
        assert_eq!(temp_socket_owner("other-template-1-0.vsock"), None);
        let p = temp_socket_path("unit");
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(temp_socket_owner(name), Some(std::process::id() as i32));
    }
}
