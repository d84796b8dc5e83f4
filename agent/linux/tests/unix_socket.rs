//! The Linux agent's request handling, served over a unix socket on the host:
//! the same `Server` and `Session` code as in the guest, another listener.
//! The wall clock is the in-process offset (the host's clock is not set) and
//! OnlineCPUMem acts on a fake sysfs tree.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_protocol::check_response::ServingStatus;
use agent_protocol::{
    AgentClient, CheckRequest, ClientError, Code, GetGuestTimeRequest, GuestDetailsRequest,
    OnlineCpuMemRequest, QuiesceForSnapshotRequest, ReadRandomRequest, ReseedRandomDevRequest,
    SetGuestDateTimeRequest, TouchMemoryRequest, PROTOCOL_VERSION,
};
use linux_agent::server::{Server, MAX_CONNECTIONS};
use linux_agent::service::{Agent, AgentConfig, WallClock};

const DEADLINE: Duration = Duration::from_secs(10);

struct Fixture {
    dir: PathBuf,
    socket: PathBuf,
    server: Arc<Server>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fake_sysfs(root: &Path) {
    let cpu = root.join("devices/system/cpu");
    for (i, online) in [(0, None), (1, Some("0")), (2, Some("0")), (3, Some("1"))] {
        let d = cpu.join(format!("cpu{i}"));
        std::fs::create_dir_all(&d).unwrap();
        if let Some(v) = online {
            std::fs::write(d.join("online"), v).unwrap();
        }
    }
    std::fs::create_dir_all(cpu.join("cpufreq")).unwrap();
    let mem = root.join("devices/system/memory");
    std::fs::create_dir_all(&mem).unwrap();
    std::fs::write(mem.join("block_size_bytes"), "8000000\n").unwrap();
    for (i, state) in [(0, "online"), (1, "offline"), (2, "offline")] {
        let d = mem.join(format!("memory{i}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("state"), format!("{state}\n")).unwrap();
    }
}

fn start(name: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!("linux-agent-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sysfs = dir.join("sys");
    fake_sysfs(&sysfs);
    let socket = dir.join("agent.sock");
    let mut listener = UnixListener::bind(&socket).unwrap();
    let config = AgentConfig {
        sysfs,
        random_device: "/dev/urandom".into(),
        wall_clock: WallClock::Offset(Mutex::new((0, 0))),
    };
    let server = Server::new(Agent::new(config, 1234));
    let s = Arc::clone(&server);
    std::thread::spawn(move || s.serve(&mut listener));
    Fixture {
        dir,
        socket,
        server,
    }
}

fn client(f: &Fixture) -> AgentClient {
    AgentClient::from_stream(UnixStream::connect(&f.socket).unwrap(), "test agent")
}

fn status_code(e: ClientError) -> Code {
    match e {
        ClientError::Status { status, .. } => status.code,
        other => panic!("expected an error status, got {other}"),
    }
}

#[test]
fn check_and_details() {
    let f = start("details");
    let mut c = client(&f);
    let r = c.check(&CheckRequest::default(), DEADLINE).unwrap();
    assert_eq!(r.status, ServingStatus::Serving as i32);
    assert_eq!(r.protocol_version, PROTOCOL_VERSION);
    let d = c
        .get_guest_details(&GuestDetailsRequest::default(), DEADLINE)
        .unwrap();
    assert_eq!(d.protocol_version, PROTOCOL_VERSION);
    assert!(d.online_vcpus >= 1);
    assert!(d.memory_bytes > 0);
    assert_eq!(d.boot_time_ns, 1234);
    assert!(!d.pvm);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(d.kernel, release.trim());
}

#[test]
fn random_bytes_are_fresh_and_bounded() {
    let f = start("random");
    let mut c = client(&f);
    let a = c
        .read_random(&ReadRandomRequest { n: 32 }, DEADLINE)
        .unwrap();
    let b = c
        .read_random(&ReadRandomRequest { n: 32 }, DEADLINE)
        .unwrap();
    assert_eq!(a.data.len(), 32);
    assert_ne!(a.data, b.data);
    let big = c.read_random(&ReadRandomRequest { n: 4097 }, DEADLINE);
    assert_eq!(status_code(big.unwrap_err()), Code::InvalidArgument);
    // The connection stays usable after an error status.
    c.check(&CheckRequest::default(), DEADLINE).unwrap();
}

#[test]
fn reseed_needs_data_and_reaches_the_kernel() {
    let f = start("reseed");
    let mut c = client(&f);
    let empty = c.reseed_random_dev(&ReseedRandomDevRequest { data: vec![] }, DEADLINE);
    assert_eq!(status_code(empty.unwrap_err()), Code::InvalidArgument);
    let r = c.reseed_random_dev(
        &ReseedRandomDevRequest {
            data: vec![0x42; 64],
        },
        DEADLINE,
    );
    // SAFETY: geteuid has no memory effects.
    if unsafe { libc::geteuid() } == 0 {
        r.unwrap();
    } else {
        assert_eq!(status_code(r.unwrap_err()), Code::PermissionDenied);
    }
}

#[test]
fn wall_clock_set_then_read_back() {
    let f = start("clock");
    let mut c = client(&f);
    let bad = c.set_guest_date_time(
        &SetGuestDateTimeRequest {
            sec: 5,
            usec: 1_000_000,
        },
        DEADLINE,
    );
    assert_eq!(status_code(bad.unwrap_err()), Code::InvalidArgument);
    let before = c
        .get_guest_time(&GetGuestTimeRequest::default(), DEADLINE)
        .unwrap();
    c.set_guest_date_time(
        &SetGuestDateTimeRequest {
            sec: 1_000_000_000,
            usec: 0,
        },
        DEADLINE,
    )
    .unwrap();
    let after = c
        .get_guest_time(&GetGuestTimeRequest::default(), DEADLINE)
        .unwrap();
    // The year-2001 time was taken over (the host's clock is decades later).
    assert!(
        after.sec >= 1_000_000_000 && after.sec < 1_100_000_000,
        "{after:?}"
    );
    assert!((0..1_000_000).contains(&after.usec));
    assert!(after.monotonic_ns >= before.monotonic_ns);
}

#[test]
fn touch_memory_checksums_what_it_wrote() {
    let f = start("touch");
    let mut c = client(&f);
    for (pattern, word) in [
        (0x5au32, 0x5a5a_5a5a_5a5a_5a5au64),
        (0x1234_5678, 0x1234_5678_1234_5678),
    ] {
        let r = c
            .touch_memory(&TouchMemoryRequest { pages: 16, pattern }, DEADLINE)
            .unwrap();
        assert_eq!(r.pages, 16);
        let mut expect: u64 = 0xcbf2_9ce4_8422_2325;
        for _ in 0..16 * 4096 / 8 {
            expect = (expect ^ word).wrapping_mul(0x0000_0100_0000_01b3);
        }
        assert_eq!(r.checksum, expect, "pattern {pattern:#x}");
    }
    let r = c
        .touch_memory(
            &TouchMemoryRequest {
                pages: 0,
                pattern: 1,
            },
            DEADLINE,
        )
        .unwrap();
    assert_eq!((r.pages, r.checksum), (0, 0xcbf2_9ce4_8422_2325));
}

#[test]
fn online_cpus_and_memory_through_sysfs() {
    let f = start("online");
    let sys = f.dir.join("sys/devices/system");
    let mut c = client(&f);
    c.online_cpu_mem(
        &OnlineCpuMemRequest {
            nb_cpus: 3,
            memory_bytes: 0,
        },
        DEADLINE,
    )
    .unwrap();
    let read = |p: &str| std::fs::read_to_string(sys.join(p)).unwrap();
    assert_eq!(read("cpu/cpu1/online"), "1");
    assert_eq!(read("cpu/cpu2/online"), "0", "only as many as asked");
    let too_many = c.online_cpu_mem(
        &OnlineCpuMemRequest {
            nb_cpus: 5,
            memory_bytes: 0,
        },
        DEADLINE,
    );
    assert_eq!(status_code(too_many.unwrap_err()), Code::FailedPrecondition);
    assert_eq!(read("cpu/cpu2/online"), "1");
    c.online_cpu_mem(
        &OnlineCpuMemRequest {
            nb_cpus: 0,
            memory_bytes: 2 * 0x800_0000,
        },
        DEADLINE,
    )
    .unwrap();
    assert_eq!(read("memory/memory1/state"), "online");
    assert_eq!(read("memory/memory2/state").trim(), "offline");
}

#[test]
fn connections_are_served_concurrently_and_bounded() {
    let f = start("bounded");
    // Every connection answers while all the others stay open.
    let mut clients: Vec<AgentClient> = (0..MAX_CONNECTIONS).map(|_| client(&f)).collect();
    for c in clients.iter_mut().rev() {
        c.check(&CheckRequest::default(), DEADLINE).unwrap();
    }
    assert_eq!(f.server.active_connections(), MAX_CONNECTIONS);
    let mut extra = client(&f);
    let refused = extra.check(&CheckRequest::default(), DEADLINE).unwrap_err();
    assert!(
        matches!(refused, ClientError::Closed { .. } | ClientError::Io { .. }),
        "{refused}"
    );
    // Closing one makes room again.
    drop(clients.pop());
    // The server learns of the close when that thread reads EOF; a
    // connection accepted before then is closed at once, and retried.
    let mut again = (0..1000)
        .find_map(|_| {
            let mut c = client(&f);
            c.check(&CheckRequest::default(), DEADLINE)
                .is_ok()
                .then_some(c)
        })
        .expect("a slot frees up once a connection is closed");
    again.check(&CheckRequest::default(), DEADLINE).unwrap();
}

#[test]
fn garbage_closes_only_that_connection() {
    let f = start("garbage");
    let mut good = client(&f);
    let mut raw = UnixStream::connect(&f.socket).unwrap();
    // A frame header announcing a payload far over the limit.
    raw.write_all(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, 1, 0])
        .unwrap();
    raw.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut raw, &mut buf).unwrap();
    assert_eq!(n, 0, "the agent closes a connection it cannot parse");
    good.check(&CheckRequest::default(), DEADLINE).unwrap();
}

#[test]
fn quiesce_drops_connections_and_keeps_listening() {
    let f = start("quiesce");
    let mut idle = client(&f);
    idle.check(&CheckRequest::default(), DEADLINE).unwrap();
    let mut q = client(&f);
    q.quiesce_for_snapshot(&QuiesceForSnapshotRequest::default(), DEADLINE)
        .unwrap();
    // Both the quiescing and the idle connection were closed by the agent.
    assert!(idle.check(&CheckRequest::default(), DEADLINE).is_err());
    assert!(q.check(&CheckRequest::default(), DEADLINE).is_err());
    // A new connection is served at once: the listener stayed.
    let mut fresh = client(&f);
    fresh.check(&CheckRequest::default(), DEADLINE).unwrap();
}
