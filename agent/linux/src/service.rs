//! The agent's RPCs on Linux. [`Agent`] is shared by every connection;
//! each connection serves its requests through a [`Session`], which also
//! notes a `QuiesceForSnapshot` for the server to act on after replying.

use std::path::PathBuf;
use std::sync::Mutex;

use agent_protocol::check_response::ServingStatus;
use agent_protocol::{
    AgentService, CheckRequest, CheckResponse, Code, GetGuestTimeRequest, GetGuestTimeResponse,
    GuestDetailsRequest, GuestDetailsResponse, OnlineCpuMemRequest, QuiesceForSnapshotRequest,
    ReadRandomRequest, ReadRandomResponse, ReseedRandomDevRequest, SetGuestDateTimeRequest, Status,
    TouchMemoryRequest, TouchMemoryResponse, PROTOCOL_VERSION,
};

use crate::system;

/// Most bytes `ReadRandom` hands out per call (as the test guest).
pub const READ_RANDOM_MAX: u32 = 4096;
/// Most entropy bytes one `ReseedRandomDev` takes (the kernel's own limit
/// for one RNDADDENTROPY is far larger; the host sends 64).
pub const RESEED_MAX: usize = 4096;
/// Most pages one `TouchMemory` touches (1 GiB), besides what is free.
pub const TOUCH_MAX_PAGES: u64 = 1 << 18;

/// How the agent treats the wall clock.
#[derive(Debug)]
pub enum WallClock {
    /// `SetGuestDateTime` sets CLOCK_REALTIME (in the guest).
    System,
    /// `SetGuestDateTime` only shifts what `GetGuestTime` reports by an
    /// offset kept in the process: the host tests, which must not set the
    /// host's clock, run the same handlers with this.
    Offset(Mutex<(i64, i64)>),
}

/// Where the agent's RPCs act.
#[derive(Debug)]
pub struct AgentConfig {
    /// sysfs root (`/sys`) for OnlineCPUMem.
    pub sysfs: PathBuf,
    /// The RNG device ReseedRandomDev writes to (`/dev/urandom`).
    pub random_device: PathBuf,
    /// The wall clock.
    pub wall_clock: WallClock,
}

impl AgentConfig {
    /// The guest's configuration: real sysfs, RNG and clock.
    pub fn guest() -> AgentConfig {
        AgentConfig {
            sysfs: "/sys".into(),
            random_device: "/dev/urandom".into(),
            wall_clock: WallClock::System,
        }
    }
}

/// The agent's state shared by all connections.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    boot_time_ns: u64,
    kernel: String,
}

impl Agent {
    /// An agent acting as `config` says; `boot_time_ns` is when it became
    /// ready (CLOCK_BOOTTIME).
    pub fn new(config: AgentConfig, boot_time_ns: u64) -> Agent {
        Agent {
            config,
            boot_time_ns,
            kernel: system::kernel_release(),
        }
    }
}

/// One connection's view of the agent.
#[derive(Debug)]
pub struct Session<'a> {
    agent: &'a Agent,
    quiesce: bool,
}

impl<'a> Session<'a> {
    /// A session on `agent`.
    pub fn new(agent: &'a Agent) -> Session<'a> {
        Session {
            agent,
            quiesce: false,
        }
    }

    /// Whether QuiesceForSnapshot was answered on this session.
    pub fn quiesce_requested(&self) -> bool {
        self.quiesce
    }
}

fn io_status(what: &str, e: std::io::Error) -> Status {
    let code = match e.kind() {
        std::io::ErrorKind::PermissionDenied => Code::PermissionDenied,
        std::io::ErrorKind::OutOfMemory => Code::ResourceExhausted,
        _ => Code::Internal,
    };
    Status::new(code, format!("{what}: {e}"))
}

impl AgentService for Session<'_> {
    fn check(&mut self, _request: CheckRequest) -> Result<CheckResponse, Status> {
        Ok(CheckResponse {
            status: ServingStatus::Serving as i32,
            protocol_version: PROTOCOL_VERSION,
        })
    }

    fn get_guest_details(
        &mut self,
        _request: GuestDetailsRequest,
    ) -> Result<GuestDetailsResponse, Status> {
        Ok(GuestDetailsResponse {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: PROTOCOL_VERSION,
            online_vcpus: system::online_cpu_count(),
            memory_bytes: system::memory().0,
            boot_time_ns: self.agent.boot_time_ns,
            pvm: false,
            kernel: self.agent.kernel.clone(),
        })
    }

    fn reseed_random_dev(&mut self, request: ReseedRandomDevRequest) -> Result<(), Status> {
        if request.data.is_empty() || request.data.len() > RESEED_MAX {
            return Err(Status::invalid_argument(format!(
                "{} entropy bytes; 1..={RESEED_MAX} accepted",
                request.data.len()
            )));
        }
        let device = &self.agent.config.random_device;
        system::add_entropy_and_reseed(device, &request.data)
            .map_err(|e| io_status(&format!("reseeding through {}", device.display()), e))
    }

    fn set_guest_date_time(&mut self, request: SetGuestDateTimeRequest) -> Result<(), Status> {
        if !(0..1_000_000).contains(&request.usec) || request.sec < 0 {
            return Err(Status::invalid_argument(format!(
                "time {}s {}us: seconds must be >= 0 and usec in 0..1000000",
                request.sec, request.usec
            )));
        }
        match &self.agent.config.wall_clock {
            WallClock::System => system::set_realtime(request.sec, request.usec)
                .map_err(|e| io_status("clock_settime(CLOCK_REALTIME)", e)),
            WallClock::Offset(offset) => {
                let (sec, usec) = system::realtime();
                let mut o = offset.lock().unwrap_or_else(|p| p.into_inner());
                *o = (request.sec - sec, request.usec - usec);
                Ok(())
            }
        }
    }

    fn online_cpu_mem(&mut self, request: OnlineCpuMemRequest) -> Result<(), Status> {
        let sysfs = &self.agent.config.sysfs;
        if request.nb_cpus > 0 {
            let online = system::online_cpus_sysfs(sysfs, request.nb_cpus)
                .map_err(|e| io_status("onlining CPUs", e))?;
            if online < request.nb_cpus {
                return Err(Status::new(
                    Code::FailedPrecondition,
                    format!("{} vCPUs requested, only {online} present", request.nb_cpus),
                ));
            }
        }
        if request.memory_bytes > 0 {
            let online = system::online_memory_sysfs(sysfs, request.memory_bytes)
                .map_err(|e| io_status("onlining memory", e))?;
            if online < request.memory_bytes {
                return Err(Status::new(
                    Code::FailedPrecondition,
                    format!(
                        "{} bytes of memory requested, only {online} present",
                        request.memory_bytes
                    ),
                ));
            }
        }
        Ok(())
    }

    fn read_random(&mut self, request: ReadRandomRequest) -> Result<ReadRandomResponse, Status> {
        if request.n > READ_RANDOM_MAX {
            return Err(Status::invalid_argument(format!(
                "{} bytes requested, at most {READ_RANDOM_MAX} per call",
                request.n
            )));
        }
        let mut data = vec![0u8; request.n as usize];
        system::getrandom(&mut data).map_err(|e| io_status("getrandom", e))?;
        Ok(ReadRandomResponse { data })
    }

    fn touch_memory(&mut self, request: TouchMemoryRequest) -> Result<TouchMemoryResponse, Status> {
        // Never more than three quarters of what is free: the agent is PID 1
        // and an OOM kill of it would panic the guest kernel.
        let (_, available) = system::memory();
        let pages = request
            .pages
            .min(TOUCH_MAX_PAGES)
            .min(available / 4 * 3 / system::PAGE_SIZE);
        let checksum = system::touch_anonymous(pages, system::pattern_word(request.pattern))
            .map_err(|e| io_status(&format!("touching {pages} pages"), e))?;
        Ok(TouchMemoryResponse { checksum, pages })
    }

    fn get_guest_time(
        &mut self,
        _request: GetGuestTimeRequest,
    ) -> Result<GetGuestTimeResponse, Status> {
        let monotonic_ns = system::monotonic_ns();
        let (mut sec, mut usec) = system::realtime();
        if let WallClock::Offset(offset) = &self.agent.config.wall_clock {
            let (dsec, dusec) = *offset.lock().unwrap_or_else(|p| p.into_inner());
            let total = (sec + dsec) * 1_000_000 + usec + dusec;
            sec = total.div_euclid(1_000_000);
            usec = total.rem_euclid(1_000_000);
        }
        Ok(GetGuestTimeResponse {
            sec,
            usec,
            monotonic_ns,
        })
    }

    fn quiesce_for_snapshot(&mut self, _request: QuiesceForSnapshotRequest) -> Result<(), Status> {
        self.quiesce = true;
        Ok(())
    }
}
