//! A paused VM is quiet (devices included), and host clients cannot lock
//! the guest agent out: real VMs booting the test guest.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use agent_protocol::{AgentClient, CheckRequest, AGENT_VSOCK_PORT};
use e2e::{temp_path, testguest, DEADLINE, READY_LINE};
use vmm::console::ConsoleLines;
use vmm::{MemoryBackend, Vm, VmConfig};

const CALL: Duration = Duration::from_secs(10);
/// How long a paused VM is watched for a device that moves anyway (a bound
/// on the wait, not a timing claim: on the old code the move took ~1 ms).
const QUIET_WATCH: Duration = Duration::from_secs(2);

struct VsockVm {
    vm: Vm,
    socket: PathBuf,
    _console: ConsoleLines,
}

fn boot(name: &str, memory: MemoryBackend) -> VsockVm {
    let socket = temp_path(&format!("{name}.vsock"));
    let console = ConsoleLines::new();
    let mut vm = Vm::create(VmConfig {
        id: name.into(),
        vcpus: 1,
        mem_mib: 64,
        memory,
        kernel: testguest(),
        cmdline: String::new(),
        initrd: None,
        console: Box::new(console.tap(Box::new(std::io::sink()))),
        virtio: vmm::VirtioConfig {
            rng: true,
            vsock: Some(socket.clone()),
            fs: Vec::new(),
            mem: None,
        },
        allow_pvm_native: true,
    })
    .expect("create VM");
    vm.start().expect("start");
    assert!(
        console.wait_for(READY_LINE, 0, DEADLINE).is_some(),
        "no ready line: {:?}",
        console.lines()
    );
    VsockVm {
        vm,
        socket,
        _console: console,
    }
}

/// Read one line (without the newline); empty on EOF or reset.
fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8];
    while let Ok(1) = s.read(&mut b) {
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

#[test]
fn a_host_connection_during_pause_moves_nothing_until_resume() {
    let mem = PathBuf::from(format!(
        "/dev/shm/minivmm-e2e-{}-pause.mem",
        std::process::id()
    ));
    let v = boot("pause-quiet", MemoryBackend::SharedFile(mem.clone()));
    // The agent answers (the device is active and listening), then its
    // connection is gone.
    let mut agent = AgentClient::connect_hybrid_vsock(&v.socket, AGENT_VSOCK_PORT, CALL)
        .expect("connect to agent");
    agent.check(&CheckRequest::default(), CALL).unwrap();
    drop(agent);
    assert_eq!(v.vm.wait_vsock_idle(DEADLINE), 0);

    v.vm.pause().expect("pause");
    let before = v.vm.save().expect("save");
    let memory_before = std::fs::read(&mem).unwrap();

    let mut host = UnixStream::connect(&v.socket).expect("connect while paused");
    host.write_all(format!("CONNECT {AGENT_VSOCK_PORT}\n").as_bytes())
        .unwrap();
    // Paused devices do not take the connection (it waits in the backlog).
    let watch = v.vm.vsock_connection_watch().unwrap();
    assert_eq!(
        watch.wait_until(|n| n > 0, QUIET_WATCH),
        0,
        "the device accepted a connection while the VM was paused"
    );
    let after = v.vm.save().expect("save again");
    assert_eq!(
        before.virtio.vsock, after.virtio.vsock,
        "vsock queues moved"
    );
    assert_eq!(before.virtio.rng, after.virtio.rng, "rng queue moved");
    assert!(
        std::fs::read(&mem).unwrap() == memory_before,
        "guest memory changed while paused"
    );

    // After resume the same connection is served.
    v.vm.resume().expect("resume");
    host.set_read_timeout(Some(DEADLINE)).unwrap();
    let ok = read_line(&mut host);
    assert!(ok.starts_with("OK "), "got {ok:?}");
    drop(v);
    std::fs::remove_file(&mem).unwrap();
}

#[test]
fn idle_host_connections_cannot_lock_the_agent_out() {
    let v = boot("agent-lockout", MemoryBackend::Anonymous);
    // Far more idle clients than the guest's agent has slots (32): each one
    // is accepted (the idlest are reset to make room) and then sits there.
    let mut idle = Vec::new();
    for _ in 0..48 {
        let mut s = UnixStream::connect(&v.socket).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s.write_all(format!("CONNECT {AGENT_VSOCK_PORT}\n").as_bytes())
            .unwrap();
        let _ = read_line(&mut s);
        idle.push(s);
    }
    let mut agent = AgentClient::connect_hybrid_vsock(&v.socket, AGENT_VSOCK_PORT, CALL)
        .expect("the agent is locked out by idle connections");
    agent.check(&CheckRequest::default(), CALL).expect("check");
    let _ = std::fs::remove_file(&v.socket);
}
