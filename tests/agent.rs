//! The guest agent over virtio-vsock, with real VMs (the test guest).

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agent_protocol::{
    AgentClient, CheckRequest, GetGuestTimeRequest, GuestDetailsRequest, ReadRandomRequest,
    SetGuestDateTimeRequest, AGENT_VSOCK_PORT,
};
use e2e::{temp_path, testguest, DEADLINE, READY_LINE};
use vmm::boot::EntryProtocol;
use vmm::console::ConsoleLines;
use vmm::{MemoryBackend, Vm, VmConfig};

const CALL: Duration = Duration::from_secs(10);

struct AgentVm {
    vm: Vm,
    socket: PathBuf,
    _console: ConsoleLines,
}

impl Drop for AgentVm {
    fn drop(&mut self) {
        self.vm.stop();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn boot_with_agent(name: &str, cmdline: &str) -> AgentVm {
    boot_with_agent_mode(name, cmdline, true)
}

fn boot_with_agent_mode(name: &str, cmdline: &str, allow_pvm_native: bool) -> AgentVm {
    boot_with_agent_entry(name, cmdline, allow_pvm_native, EntryProtocol::Minivmm)
}

fn boot_with_agent_entry(
    name: &str,
    cmdline: &str,
    allow_pvm_native: bool,
    entry: EntryProtocol,
) -> AgentVm {
    let socket = temp_path(&format!("{name}.vsock"));
    let _ = std::fs::remove_file(&socket);
    let console = ConsoleLines::new();
    let vm = Vm::create_with_entry(
        VmConfig {
            id: name.into(),
            vcpus: 1,
            mem_mib: 128,
            memory: MemoryBackend::Anonymous,
            kernel: testguest(),
            cmdline: cmdline.into(),
            initrd: None,
            console: Box::new(console.tap(Box::new(std::io::sink()))),
            virtio: vmm::VirtioConfig {
                rng: true,
                vsock: Some(socket.clone()),
                fs: Vec::new(),
                mem: None,
            },
            allow_pvm_native,
        },
        entry,
    );
    let mut vm = vm.expect("create VM");
    vm.start().expect("start");
    if console.wait_for(READY_LINE, 0, DEADLINE).is_none() {
        panic!(
            "no ready line; exit: {:?}; console: {:?}",
            vm.wait_exit(Some(Duration::ZERO)),
            console.lines()
        );
    }
    AgentVm {
        vm,
        socket,
        _console: console,
    }
}

fn connect(v: &AgentVm) -> AgentClient {
    AgentClient::connect_hybrid_vsock(&v.socket, AGENT_VSOCK_PORT, CALL).expect("connect to agent")
}

#[test]
fn check_and_details_answer() {
    let v = boot_with_agent("agent-check", "");
    let mut a = connect(&v);
    let r = a.check(&CheckRequest::default(), CALL).unwrap();
    assert_eq!(r.protocol_version, agent_protocol::PROTOCOL_VERSION);
    let d = a
        .get_guest_details(&GuestDetailsRequest::default(), CALL)
        .unwrap();
    assert_eq!(d.online_vcpus, 1);
    assert!(
        d.memory_bytes > 100 << 20 && d.memory_bytes <= 128 << 20,
        "{}",
        d.memory_bytes
    );
}

#[test]
fn guest_runs_in_pvm_native_mode_on_pvm() {
    let v = boot_with_agent("agent-native", "");
    let d = connect(&v)
        .get_guest_details(&GuestDetailsRequest::default(), CALL)
        .unwrap();
    assert_eq!(d.pvm, v.vm.flavour() == vmm::Flavour::Pvm);
}

#[test]
fn agent_also_serves_when_the_guest_is_entered_at_cpl0() {
    // Without native mode the test guest runs its agent in user mode (CPL 3,
    // native speed) over a kernel that KVM emulates.
    let v = boot_with_agent_mode("agent-cpl0", "", false);
    let mut a = connect(&v);
    a.check(&CheckRequest::default(), CALL).unwrap();
    let d = a
        .get_guest_details(&GuestDetailsRequest::default(), CALL)
        .unwrap();
    assert!(!d.pvm, "a guest entered at CPL 0 reported PVM native mode");
    let x = a
        .read_random(&ReadRandomRequest { n: 16 }, CALL)
        .unwrap()
        .data;
    assert_eq!(x.len(), 16);
}

#[test]
fn guest_needs_no_more_than_the_linux_64bit_boot_protocol() {
    // Entered as Firecracker enters it: identity map of the first GiB only
    // (the IOAPIC and the virtio windows lie above), CR4 = PAE (no OSFXSR:
    // SSE off), CPL 0. The guest must load its own tables and enable SSE
    // before it relies on either.
    let v = boot_with_agent_entry("agent-minimal-entry", "", true, EntryProtocol::LinuxMinimal);
    let mut a = connect(&v);
    let r = a.check(&CheckRequest::default(), CALL).unwrap();
    assert_eq!(r.protocol_version, agent_protocol::PROTOCOL_VERSION);
    let d = a
        .get_guest_details(&GuestDetailsRequest::default(), CALL)
        .unwrap();
    assert!(
        !d.pvm,
        "entered at CPL 0, the guest reported PVM native mode"
    );
    assert_eq!(d.online_vcpus, 1);
    let x = a
        .read_random(&ReadRandomRequest { n: 16 }, CALL)
        .unwrap()
        .data;
    assert_eq!(x.len(), 16);
}

#[test]
fn random_bytes_differ_between_calls() {
    let v = boot_with_agent("agent-rng", "");
    let mut a = connect(&v);
    let x = a
        .read_random(&ReadRandomRequest { n: 32 }, CALL)
        .unwrap()
        .data;
    let y = a
        .read_random(&ReadRandomRequest { n: 32 }, CALL)
        .unwrap()
        .data;
    assert_eq!((x.len(), y.len()), (32, 32));
    assert_ne!(x, y);
}

#[test]
fn guest_clock_follows_set_time() {
    let v = boot_with_agent("agent-time", "");
    let mut a = connect(&v);
    let before = SystemTime::now();
    let now = before.duration_since(UNIX_EPOCH).unwrap();
    a.set_guest_date_time(
        &SetGuestDateTimeRequest {
            sec: now.as_secs() as i64,
            usec: i64::from(now.subsec_micros()),
        },
        CALL,
    )
    .unwrap();
    let t = a
        .get_guest_time(&GetGuestTimeRequest::default(), CALL)
        .unwrap();
    // The guest counts from the value set (taken at `before`): its answer
    // cannot be earlier than that nor later than our reading after it.
    e2e::assert_clock_between(&t, before, SystemTime::now());
}

#[test]
fn eight_concurrent_connections_each_make_100_calls() {
    let v = boot_with_agent("agent-concurrent", "");
    let socket = v.socket.clone();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut a = AgentClient::connect_hybrid_vsock(&socket, AGENT_VSOCK_PORT, CALL)
                    .expect("connect");
                for _ in 0..100 {
                    a.check(&CheckRequest::default(), CALL).expect("check");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a connection failed");
    }
}

#[test]
fn guest_initiated_connection_reaches_the_host_port_socket() {
    let socket = temp_path("agent-guest-connect.vsock");
    let port_socket = PathBuf::from(format!("{}_5000", socket.display()));
    let _ = std::fs::remove_file(&port_socket);
    let listener = UnixListener::bind(&port_socket).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        if let Ok((stream, _)) = listener.accept() {
            let mut line = String::new();
            let _ = BufReader::new(stream).read_line(&mut line);
            let _ = tx.send(line);
        }
    });
    let v = boot_with_agent("agent-guest-connect", "vsock_connect=5000");
    // boot_with_agent names the socket after the test: temp_path("<name>.vsock").
    let line = rx
        .recv_timeout(DEADLINE)
        .expect("guest connection to host port 5000");
    assert_eq!(line, "hello from minivmm-testguest\n");
    assert_eq!(v.socket, socket);
    let _ = std::fs::remove_file(&port_socket);
}

#[test]
fn no_vm_behind_the_socket_is_a_one_line_error() {
    let e = AgentClient::connect_hybrid_vsock(temp_path("nothing.vsock"), AGENT_VSOCK_PORT, CALL)
        .unwrap_err();
    assert!(e.to_string().starts_with("no VM listening at"), "{e}");
}
