//! Cloning a template: map its memory MAP_PRIVATE (copy-on-write), restore
//! the saved VM state, resume, and make the clone its own machine — fresh
//! host entropy into the guest RNG, the host's wall clock — before handing
//! it out with a connected agent.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent_protocol::{
    AgentClient, CheckRequest, GuestDetailsRequest, OnlineCpuMemRequest, ReseedRandomDevRequest,
    SetGuestDateTimeRequest, AGENT_VSOCK_PORT,
};
use snapshot::{GuestConfig, Template};
use vmm::console::ConsoleLines;
use vmm::memory::OpenMemoryFile;
use vmm::state::{VmState, STATE_SCHEMA};
use vmm::vm::RestoreConfig;
use vmm::{MemoryBackend, Vm};

pub use devices::virtio::rng::host_random as host_entropy;

use crate::template::temp_socket_path;
use crate::{FactoryError, AGENT_CALL_DEADLINE};

/// Bytes of host entropy every clone gets before it is handed out.
pub const RESEED_BYTES: usize = 64;

/// A validated template with its state decoded once and its memory file
/// held open, ready to clone from. Clones map that open file, never the
/// path: a template rebuilt in the same directory later does not change
/// what this handle's clones get (its own memory with its own state).
pub struct TemplateHandle {
    template: Template,
    state: VmState,
    memory: OpenMemoryFile,
}

/// Per-clone options.
#[derive(Default)]
pub struct CloneOptions {
    /// VM id for logs (default: derived from the process).
    pub id: Option<String>,
    /// The clone's vsock socket (default: a temporary path, removed on drop).
    pub vsock: Option<PathBuf>,
    /// The clone's own virtiofsd sockets, one per virtio-fs tag of the
    /// template (the caller starts the daemons, one per clone and directory).
    pub fs: Vec<vmm::FsShare>,
}

/// Where a clone's time went.
#[derive(Clone, Copy, Debug, Default)]
pub struct CloneTimings {
    /// KVM VM, memory mapping, vCPUs, devices and every piece of state.
    pub restore: Duration,
    /// Starting the vCPU threads.
    pub resume: Duration,
    /// Agent connected, RNG reseeded, clock set, health check answered.
    pub ready: Duration,
    /// Of `ready`: the agent connection.
    pub connect: Duration,
    /// Of `ready`: ReseedRandomDev with fresh host entropy.
    pub reseed: Duration,
    /// Of `ready`: SetGuestDateTime to the host's wall clock.
    pub clock: Duration,
    /// Of `ready`: the agent's Check.
    pub check: Duration,
}

/// A clone, running, with its agent connected.
pub struct ClonedVm {
    /// The VM.
    pub vm: Vm,
    /// Its agent connection.
    pub agent: AgentClient,
    /// Its console lines (from the restore on).
    pub console: ConsoleLines,
    /// Its vsock socket.
    pub vsock: PathBuf,
    /// Where the time went.
    pub timings: CloneTimings,
}

impl Drop for ClonedVm {
    /// Stops the VM; its vsock device removes its own socket (and only its
    /// own) when the VM is dropped right after.
    fn drop(&mut self) {
        self.vm.stop();
    }
}

impl TemplateHandle {
    /// Validate the template in `dir` (against `expected`, if given: the
    /// first differing field is reported), decode its state and check it
    /// against the manifest.
    pub fn open(dir: &Path, expected: Option<&GuestConfig>) -> Result<Self, FactoryError> {
        Self::from_template(snapshot::template::validate(dir, STATE_SCHEMA, expected)?)
    }

    /// [`open`](Self::open) without a config to match, and with the memory
    /// file's SHA-256 verified too if `full` (what `template check` does).
    pub fn check(dir: &Path, full: bool) -> Result<Self, FactoryError> {
        let template = if full {
            snapshot::template::validate_full(dir, STATE_SCHEMA, None)?
        } else {
            snapshot::template::validate(dir, STATE_SCHEMA, None)?
        };
        Self::from_template(template)
    }

    fn from_template(template: Template) -> Result<Self, FactoryError> {
        let state: VmState = template.read_state()?;
        check_state_matches_manifest(&template, &state)?;
        template.check_manifest_digest()?;
        if !template.memory_sealed() {
            tracing::warn!(
                template = %template.dir().display(),
                "template memory file is not immutable (a copy, or its flag was cleared): nothing stops it being changed under running clones"
            );
        }
        let memory = OpenMemoryFile::new(template.memory_file().clone(), template.memory_path());
        Ok(TemplateHandle {
            template,
            state,
            memory,
        })
    }

    /// The decoded state.
    pub fn state(&self) -> &VmState {
        &self.state
    }

    /// The open memory file clones map.
    pub fn memory(&self) -> &OpenMemoryFile {
        &self.memory
    }

    /// The template on disk.
    pub fn template(&self) -> &Template {
        &self.template
    }

    /// Restore, resume and ready a clone.
    pub fn clone_vm(&self, opts: CloneOptions) -> Result<ClonedVm, FactoryError> {
        let t0 = Instant::now();
        self.template.check_memory_unchanged()?;
        // A live socket at the path (another run's clone) is refused, never
        // unlinked; a stale one is replaced.
        let vsock = opts.vsock.unwrap_or_else(|| temp_socket_path("clone"));
        let console = ConsoleLines::new();
        let mut vm = Vm::restore(
            RestoreConfig {
                id: opts.id.unwrap_or_else(vmm::vm::default_vm_id),
                memory: MemoryBackend::PrivateFd(self.memory.clone()),
                console: Box::new(console.tap(Box::new(std::io::sink()))),
                vsock: Some(vsock.clone()),
                fs: opts.fs,
            },
            &self.state,
        )?;
        let restore = t0.elapsed();
        vm.start()?;
        let resume = t0.elapsed() - restore;
        let mut steps = ReadySteps::default();
        let agent = match ready(&vsock, &mut steps) {
            Ok(agent) => agent,
            Err(e) => {
                // Dropping the VM stops it and removes its socket.
                vm.stop();
                return Err(e);
            }
        };
        let ready = t0.elapsed() - restore - resume;
        Ok(ClonedVm {
            vm,
            agent,
            console,
            vsock,
            timings: CloneTimings {
                restore,
                resume,
                ready,
                connect: steps.connect,
                reseed: steps.reseed,
                clock: steps.clock,
                check: steps.check,
            },
        })
    }
}

/// The manifest vouches for the files; the state is what a clone becomes.
/// They must agree on the machine, or a bit flip or an edit of the manifest
/// would describe a VM the state is not (the state is checked, the manifest
/// is only JSON).
pub fn check_state_matches_manifest(
    template: &Template,
    state: &VmState,
) -> Result<(), FactoryError> {
    let manifest = template.manifest();
    let mismatch = |field: &'static str, in_manifest: String, in_state: String| {
        Err(FactoryError::StateMismatch {
            dir: template.dir().to_path_buf(),
            field,
            manifest: in_manifest,
            state: in_state,
        })
    };
    if u64::from(manifest.config.vcpus) != state.vcpus.len() as u64 {
        return mismatch(
            "vcpus",
            manifest.config.vcpus.to_string(),
            state.vcpus.len().to_string(),
        );
    }
    if manifest.config.mem_mib != state.mem_mib {
        return mismatch(
            "mem_mib",
            manifest.config.mem_mib.to_string(),
            state.mem_mib.to_string(),
        );
    }
    if state.mem_mib.checked_mul(1 << 20) != Some(manifest.memory.size_bytes) {
        return mismatch(
            "memory.size_bytes",
            manifest.memory.size_bytes.to_string(),
            format!("{} MiB of RAM", state.mem_mib),
        );
    }
    let devices = state.virtio.device_names();
    if manifest.config.devices != devices {
        return mismatch(
            "devices",
            manifest.config.devices.join(","),
            devices.join(","),
        );
    }
    Ok(())
}

/// The host's wall clock as a SetGuestDateTime request.
pub fn host_wall_clock() -> SetGuestDateTimeRequest {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    SetGuestDateTimeRequest {
        sec: now.as_secs() as i64,
        usec: i64::from(now.subsec_micros()),
    }
}

/// How long each step of [`ready`] took.
#[derive(Default)]
struct ReadySteps {
    connect: Duration,
    reseed: Duration,
    clock: Duration,
    check: Duration,
}

/// Connect to a freshly resumed clone's agent and make it its own machine.
fn ready(vsock: &Path, steps: &mut ReadySteps) -> Result<AgentClient, FactoryError> {
    let t = Instant::now();
    let mut agent =
        AgentClient::connect_hybrid_vsock(vsock, AGENT_VSOCK_PORT, AGENT_CALL_DEADLINE)?;
    steps.connect = t.elapsed();
    let t = Instant::now();
    let mut data = vec![0u8; RESEED_BYTES];
    host_entropy(&mut data).map_err(|source| FactoryError::Host {
        what: "getrandom for",
        path: vsock.to_path_buf(),
        source,
    })?;
    agent.reseed_random_dev(&ReseedRandomDevRequest { data }, AGENT_CALL_DEADLINE)?;
    steps.reseed = t.elapsed();
    let t = Instant::now();
    agent.set_guest_date_time(&host_wall_clock(), AGENT_CALL_DEADLINE)?;
    steps.clock = t.elapsed();
    let t = Instant::now();
    agent.check(&CheckRequest::default(), AGENT_CALL_DEADLINE)?;
    steps.check = t.elapsed();
    Ok(agent)
}

/// How long a grown clone's guest may take to show its new vCPUs and memory.
pub const GROW_DEADLINE: Duration = Duration::from_secs(10);

/// Where the time of [`ClonedVm::grow`] went.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrowTimings {
    /// Creating and starting the new vCPUs.
    pub vcpus: Duration,
    /// Asking virtio-mem for the memory (requested size, interrupt).
    pub memory: Duration,
    /// Until GetGuestDetails showed both, and OnlineCPUMem confirmed them.
    pub online: Duration,
}

impl ClonedVm {
    /// Grow the clone to `vcpus` vCPUs and `mem_mib` MiB: start the missing
    /// vCPUs (the guest counts them in), ask its virtio-mem driver to plug
    /// the missing memory (anonymous, never the template file), and wait
    /// until GetGuestDetails reports both, then OnlineCPUMem. Values at or
    /// below the clone's are left alone; shrinking is not supported.
    pub fn grow(&mut self, vcpus: u32, mem_mib: u64) -> Result<GrowTimings, FactoryError> {
        let have_vcpus = self.vm.vcpu_count();
        let ram_mib = self.vm.ram().size() >> 20;
        let t0 = Instant::now();
        if vcpus > have_vcpus {
            self.vm.add_vcpus(vcpus - have_vcpus)?;
        }
        let added_vcpus = t0.elapsed();
        let want_vcpus = vcpus.max(have_vcpus);
        // 0: memory is left alone (the guest's own count of its RAM is a
        // little below the VM's, see below).
        let want_bytes = if mem_mib > ram_mib { mem_mib << 20 } else { 0 };
        // The guest counts RAM as its e820 map has it (without the legacy
        // hole below 1 MiB): plug what it lacks by its own count.
        if mem_mib > ram_mib {
            let shown = self
                .agent
                .get_guest_details(&GuestDetailsRequest::default(), AGENT_CALL_DEADLINE)?
                .memory_bytes;
            if want_bytes > shown {
                let extra = (want_bytes - shown).next_multiple_of(devices::virtio::MEM_BLOCK_SIZE);
                self.vm.grow_memory(self.vm.plugged_memory() + extra)?;
            }
        }
        let asked_memory = t0.elapsed();
        let deadline = Instant::now() + GROW_DEADLINE;
        // Each GetGuestDetails round trip paces the loop; the deadline bounds it.
        loop {
            let d = self
                .agent
                .get_guest_details(&GuestDetailsRequest::default(), AGENT_CALL_DEADLINE)?;
            if d.online_vcpus >= want_vcpus && d.memory_bytes >= want_bytes {
                break;
            }
            if Instant::now() >= deadline {
                return Err(FactoryError::GuestTimeout {
                    step: "show its added vCPUs and memory",
                    secs: GROW_DEADLINE.as_secs(),
                    exit: format!(
                        "{} of {want_vcpus} vCPUs, {} of {want_bytes} bytes (VM {})",
                        d.online_vcpus,
                        d.memory_bytes,
                        self.vm
                            .wait_exit(Some(Duration::ZERO))
                            .map_or("running".to_string(), |e| e.to_string())
                    ),
                    last_line: self.console.lines().last().cloned(),
                });
            }
        }
        self.agent.online_cpu_mem(
            &OnlineCpuMemRequest {
                nb_cpus: want_vcpus,
                memory_bytes: want_bytes,
            },
            AGENT_CALL_DEADLINE,
        )?;
        tracing::info!(vm = %self.vm.id(), vcpus = want_vcpus, mem_mib = want_bytes >> 20, "clone grown");
        Ok(GrowTimings {
            vcpus: added_vcpus,
            memory: asked_memory - added_vcpus,
            online: t0.elapsed() - asked_memory,
        })
    }
}
