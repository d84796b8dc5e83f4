//! The agent's services (`agent_protocol::AgentService`) and what runs on
//! each vsock connection: the protocol on the agent port, a hello on the
//! connections the guest opens.
//!
//! RNG: ChaCha20 (`chacha::Csprng`) keyed from virtio-rng at boot; every
//! `ReadRandom` and `ReseedRandomDev` also asks virtio-rng for 64 fresh bytes,
//! mixed in when they arrive. A restored snapshot continues from the
//! snapshot's RNG state until the host reseeds it: clones are made different
//! by the host's `ReseedRandomDev`, which the factory sends before anything
//! else (DESIGN.md, "Clone correctness"; tests/template.rs checks both halves).

use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

use agent_protocol::check_response::ServingStatus;
use agent_protocol::{
    AgentService, CheckRequest, CheckResponse, Code, Dispatcher, FsListRequest, FsListResponse,
    FsPathRequest, FsReadRequest, FsReadResponse, FsWriteRequest, FsWriteResponse,
    GetGuestTimeRequest, GetGuestTimeResponse, GuestDetailsRequest, GuestDetailsResponse,
    OnlineCpuMemRequest, QuiesceForSnapshotRequest, ReadRandomRequest, ReadRandomResponse,
    ReseedRandomDevRequest, SetGuestDateTimeRequest, Status, TouchMemoryRequest,
    TouchMemoryResponse, AGENT_VSOCK_PORT, PROTOCOL_VERSION,
};
use testguest_abi::{BootInfo, FLAG_PVM};

use crate::chacha::Csprng;
use crate::clock::Clock;
use crate::sys;
use crate::virtio::fs::{Errno, FsDevice};
use crate::vsock::Application;

/// `GetGuestDetails.kernel`.
pub const KERNEL_NAME: &str = "minivmm-testguest";
/// What the guest says on the connections it opens (`vsock_connect=`).
pub const HELLO_LINE: &[u8] = b"hello from minivmm-testguest\n";
/// Most bytes `ReadRandom` hands out per call.
pub const READ_RANDOM_MAX: u32 = 4096;
/// Most bytes of an incomplete request a connection may hold; a peer that
/// sends more is cut off (the heap is a few MiB, and no request of this
/// protocol needs more).
pub const MAX_BUFFERED: usize = 64 * 1024;
/// Most bytes `FsRead` returns per call (the reply must fit the agent's
/// heap; the host asks again for the rest).
pub const FS_READ_MAX: u32 = 256 * 1024;
/// The page size of `TouchMemory`.
pub const PAGE_SIZE: u64 = 4096;

/// What runs on one connection.
pub enum Session {
    /// The agent protocol (host connected to the agent port).
    Agent(Dispatcher),
    /// A connection the guest opened: it says hello, then ignores input.
    Hello,
}

/// The agent.
pub struct Agent {
    info: &'static BootInfo,
    clock: Clock,
    rng: Csprng,
    boot_time_ns: u64,
    quiesce_requested: bool,
    entropy_wanted: bool,
    shares: Vec<FsDevice>,
    /// virtio-mem memory plugged: (guest-physical base, bytes).
    hotplug: (u64, u64),
}

impl Agent {
    /// An agent whose RNG starts from `seed`.
    pub fn new(info: &'static BootInfo, clock: Clock, seed: &[u8]) -> Agent {
        Agent {
            info,
            clock,
            rng: Csprng::new(seed),
            boot_time_ns: 0,
            quiesce_requested: false,
            entropy_wanted: false,
            shares: Vec::new(),
            hotplug: (0, 0),
        }
    }

    /// The virtio-mem memory plugged now: `bytes` from `base` up.
    pub fn set_hotplug(&mut self, base: u64, bytes: u64) {
        self.hotplug = (base, bytes);
    }

    /// RAM plus plugged memory.
    fn memory_bytes(&self) -> u64 {
        self.info.ram_bytes + self.hotplug.1
    }

    /// The virtio-fs devices the file RPCs use.
    pub fn set_shares(&mut self, shares: Vec<FsDevice>) {
        self.shares = shares;
    }

    /// The share with `tag` (empty: the first one).
    fn share(&mut self, tag: &str) -> Result<(&'static BootInfo, &Clock, &mut FsDevice), Status> {
        let dev = self
            .shares
            .iter_mut()
            .find(|d| tag.is_empty() || d.tag() == tag)
            .ok_or_else(|| {
                Status::new(
                    Code::NotFound,
                    format!("no virtio-fs share with tag {tag:?} in this guest"),
                )
            })?;
        Ok((self.info, &self.clock, dev))
    }

    /// The clocks.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Records when the agent became ready (monotonic ns).
    pub fn set_boot_time(&mut self, ns: u64) {
        self.boot_time_ns = ns;
    }

    /// Mixes entropy (virtio-rng) into the RNG.
    pub fn add_entropy(&mut self, data: &[u8]) {
        self.rng.absorb(data);
    }

    /// Whether QuiesceForSnapshot was answered since the last call.
    pub fn take_quiesce_request(&mut self) -> bool {
        core::mem::take(&mut self.quiesce_requested)
    }

    /// Whether the RNG would like fresh entropy from the device.
    pub fn take_entropy_request(&mut self) -> bool {
        core::mem::take(&mut self.entropy_wanted)
    }
}

impl Application for Agent {
    type Conn = Session;

    fn accept(&mut self, port: u32) -> Option<Session> {
        (port == AGENT_VSOCK_PORT).then(|| Session::Agent(Dispatcher::new()))
    }

    fn connected(&mut self, conn: &mut Session, out: &mut Vec<u8>) {
        if let Session::Hello = conn {
            out.extend_from_slice(HELLO_LINE);
        }
    }

    fn receive(&mut self, conn: &mut Session, data: &[u8], out: &mut Vec<u8>) -> bool {
        match conn {
            Session::Agent(dispatcher) => match dispatcher.handle_bytes(self, data, out) {
                Ok(_) => dispatcher.buffered() <= MAX_BUFFERED,
                // An unusable byte stream: answer what was answerable, close.
                Err(_) => false,
            },
            Session::Hello => true,
        }
    }
}

/// A failed file operation as a status naming the path and the errno.
fn fs_status(op: &str, path: &str, e: Errno) -> Status {
    let code = match e.0 {
        2 => Code::NotFound,
        13 | 1 => Code::PermissionDenied,
        17 => Code::AlreadyExists,
        20..=22 => Code::InvalidArgument,
        110 => Code::DeadlineExceeded,
        _ => Code::Internal,
    };
    Status::new(code, format!("{op} {path:?}: errno {}", e.0))
}

/// The 8-byte word `TouchMemory` writes for `pattern`: a pattern that fits
/// in a byte fills every byte with it, a wider one is written as a 32-bit
/// little-endian value, repeated.
pub fn touch_word(pattern: u32) -> u64 {
    if pattern <= 0xff {
        u64::from(pattern) * 0x0101_0101_0101_0101
    } else {
        u64::from(pattern) | u64::from(pattern) << 32
    }
}

/// FNV-1a (64-bit) over 8-byte little-endian words: the checksum
/// `TouchMemory` reports of what it reads back.
pub fn checksum_step(hash: u64, word: u64) -> u64 {
    (hash ^ word).wrapping_mul(0x0000_0100_0000_01b3)
}

/// The checksum's starting value (the FNV-1a 64-bit offset basis).
pub const CHECKSUM_INIT: u64 = 0xcbf2_9ce4_8422_2325;

/// Writes `word` into `pages` pages at `base` and checksums them as read back.
///
/// # Safety
/// The pages must be RAM nothing else uses.
pub unsafe fn touch_pages(base: u64, pages: u64, word: u64) -> u64 {
    touch_pages_from(CHECKSUM_INIT, base, pages, word)
}

/// [`touch_pages`] continuing the checksum `hash` (for memory in pieces).
///
/// # Safety
/// As for [`touch_pages`].
pub unsafe fn touch_pages_from(hash: u64, base: u64, pages: u64, word: u64) -> u64 {
    let words = (pages * PAGE_SIZE / 8) as usize;
    let p = base as *mut u64;
    for i in 0..words {
        p.add(i).write(word);
    }
    let mut hash = hash;
    for i in 0..words {
        // Volatile: the checksum is of memory as read back, not of what the
        // compiler knows was written.
        hash = checksum_step(hash, core::ptr::read_volatile(p.add(i)));
    }
    hash
}

impl AgentService for Agent {
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
            online_vcpus: sys::online_cpus(),
            memory_bytes: self.memory_bytes(),
            boot_time_ns: self.boot_time_ns,
            pvm: self.info.flags & FLAG_PVM != 0,
            kernel: KERNEL_NAME.into(),
        })
    }

    fn reseed_random_dev(&mut self, request: ReseedRandomDevRequest) -> Result<(), Status> {
        self.rng.absorb(&request.data);
        self.entropy_wanted = true;
        Ok(())
    }

    fn set_guest_date_time(&mut self, request: SetGuestDateTimeRequest) -> Result<(), Status> {
        if !(0..1_000_000).contains(&request.usec) {
            return Err(Status::invalid_argument(format!(
                "usec {} is not in 0..1000000",
                request.usec
            )));
        }
        self.clock.set_wall(request.sec, request.usec);
        Ok(())
    }

    fn online_cpu_mem(&mut self, request: OnlineCpuMemRequest) -> Result<(), Status> {
        let online = sys::online_cpus();
        if request.nb_cpus > online {
            return Err(Status::new(
                Code::FailedPrecondition,
                format!(
                    "{} vCPUs requested, {online} online; the test guest cannot bring up more",
                    request.nb_cpus
                ),
            ));
        }
        if request.memory_bytes > self.memory_bytes() {
            return Err(Status::new(
                Code::FailedPrecondition,
                format!(
                    "{} bytes of memory requested, {} online; the host plugs more through virtio-mem",
                    request.memory_bytes,
                    self.memory_bytes()
                ),
            ));
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
        self.rng.fill(&mut data);
        self.entropy_wanted = true;
        Ok(ReadRandomResponse { data })
    }

    fn touch_memory(&mut self, request: TouchMemoryRequest) -> Result<TouchMemoryResponse, Status> {
        // The scratch RAM first, then the plugged virtio-mem memory.
        let word = touch_word(request.pattern);
        let low = request.pages.min(self.info.touch_len / PAGE_SIZE);
        // SAFETY: [touch_base, touch_base + touch_len) is RAM that only
        // TouchMemory uses (the kernel checked it against e820).
        let checksum = unsafe { touch_pages(self.info.touch_base, low, word) };
        let (base, bytes) = self.hotplug;
        let high = (request.pages - low).min(bytes / PAGE_SIZE);
        // SAFETY: the device acknowledged plugging [base, base + bytes)
        // (inside the identity map, checked by the driver); nothing else
        // uses it.
        let checksum = unsafe { touch_pages_from(checksum, base, high, word) };
        Ok(TouchMemoryResponse {
            checksum,
            pages: low + high,
        })
    }

    fn get_guest_time(
        &mut self,
        _request: GetGuestTimeRequest,
    ) -> Result<GetGuestTimeResponse, Status> {
        let now = self.clock.monotonic_ns();
        let (sec, usec) = self.clock.wall_sec_usec_at(now);
        Ok(GetGuestTimeResponse {
            sec,
            usec,
            monotonic_ns: now,
        })
    }

    fn quiesce_for_snapshot(&mut self, _request: QuiesceForSnapshotRequest) -> Result<(), Status> {
        self.quiesce_requested = true;
        Ok(())
    }

    fn fs_read(&mut self, request: FsReadRequest) -> Result<FsReadResponse, Status> {
        let len = request.len.min(FS_READ_MAX) as usize;
        let (info, clock, dev) = self.share(&request.tag)?;
        let data = dev
            .read(info, clock, &request.path, request.offset, len)
            .map_err(|e| fs_status("read", &request.path, e))?;
        Ok(FsReadResponse { data })
    }

    fn fs_write(&mut self, request: FsWriteRequest) -> Result<FsWriteResponse, Status> {
        let (info, clock, dev) = self.share(&request.tag)?;
        let written = dev
            .write(info, clock, &request.path, request.offset, &request.data)
            .map_err(|e| fs_status("write", &request.path, e))?;
        Ok(FsWriteResponse { written })
    }

    fn fs_mkdir(&mut self, request: FsPathRequest) -> Result<(), Status> {
        let (info, clock, dev) = self.share(&request.tag)?;
        dev.mkdir(info, clock, &request.path)
            .map_err(|e| fs_status("mkdir", &request.path, e))
    }

    fn fs_unlink(&mut self, request: FsPathRequest) -> Result<(), Status> {
        let (info, clock, dev) = self.share(&request.tag)?;
        dev.unlink(info, clock, &request.path)
            .map_err(|e| fs_status("unlink", &request.path, e))
    }

    fn fs_list(&mut self, request: FsListRequest) -> Result<FsListResponse, Status> {
        let (info, clock, dev) = self.share(&request.tag)?;
        let names = dev
            .list(info, clock, &request.path)
            .map_err(|e| fs_status("list", &request.path, e))?;
        Ok(FsListResponse { names })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touch_patterns_and_checksum() {
        assert_eq!(touch_word(0x5a), 0x5a5a_5a5a_5a5a_5a5a);
        assert_eq!(touch_word(0x1234_5678), 0x1234_5678_1234_5678);
        let mut page = std::vec![0u64; 1024];
        let sum = unsafe { touch_pages(page.as_mut_ptr() as u64, 2, touch_word(0xab)) };
        assert!(page.iter().all(|&w| w == 0xabab_abab_abab_abab));
        let mut expect = CHECKSUM_INIT;
        for _ in 0..1024 {
            expect = checksum_step(expect, 0xabab_abab_abab_abab);
        }
        assert_eq!(sum, expect);
        assert_eq!(unsafe { touch_pages(0, 0, 1) }, CHECKSUM_INIT);
    }
}
