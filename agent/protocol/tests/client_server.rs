//! The host client against the no_std server over real unix sockets, with the
//! hybrid-vsock handshake played by the test's server thread.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use agent_protocol::check_response::ServingStatus;
use agent_protocol::frame::FrameDecoder;
use agent_protocol::*;

const DEADLINE: Duration = Duration::from_secs(10);
/// Short deadline for calls that are meant to time out.
const SHORT: Duration = Duration::from_millis(200);

/// What the test agent saw, returned when its connection closes.
#[derive(Default, Debug)]
struct TestAgent {
    reseeds: Vec<Vec<u8>>,
    date_time: Option<(i64, i64)>,
    online: Option<(u32, u64)>,
    quiesced: bool,
}

impl AgentService for TestAgent {
    fn check(&mut self, _: CheckRequest) -> Result<CheckResponse, Status> {
        Ok(CheckResponse {
            status: ServingStatus::Serving as i32,
            protocol_version: PROTOCOL_VERSION,
        })
    }

    fn get_guest_details(
        &mut self,
        _: GuestDetailsRequest,
    ) -> Result<GuestDetailsResponse, Status> {
        Ok(GuestDetailsResponse {
            agent_version: "test".into(),
            protocol_version: PROTOCOL_VERSION,
            online_vcpus: 2,
            memory_bytes: 256 << 20,
            boot_time_ns: 1_000,
            pvm: false,
            kernel: "unit-test".into(),
        })
    }

    fn reseed_random_dev(&mut self, request: ReseedRandomDevRequest) -> Result<(), Status> {
        self.reseeds.push(request.data);
        Ok(())
    }

    fn set_guest_date_time(&mut self, request: SetGuestDateTimeRequest) -> Result<(), Status> {
        self.date_time = Some((request.sec, request.usec));
        Ok(())
    }

    fn online_cpu_mem(&mut self, request: OnlineCpuMemRequest) -> Result<(), Status> {
        self.online = Some((request.nb_cpus, request.memory_bytes));
        Ok(())
    }

    fn read_random(&mut self, request: ReadRandomRequest) -> Result<ReadRandomResponse, Status> {
        if request.n > 4096 {
            return Err(Status::invalid_argument(format!(
                "n = {} is over the 4096-byte limit",
                request.n
            )));
        }
        Ok(ReadRandomResponse {
            data: (0..request.n).map(|i| i as u8).collect(),
        })
    }

    fn touch_memory(&mut self, request: TouchMemoryRequest) -> Result<TouchMemoryResponse, Status> {
        Ok(TouchMemoryResponse {
            checksum: request.pages.wrapping_mul(u64::from(request.pattern)),
            pages: request.pages,
        })
    }

    fn get_guest_time(&mut self, _: GetGuestTimeRequest) -> Result<GetGuestTimeResponse, Status> {
        Ok(GetGuestTimeResponse {
            sec: 1_700_000_000,
            usec: 5,
            monotonic_ns: 77,
        })
    }

    fn quiesce_for_snapshot(&mut self, _: QuiesceForSnapshotRequest) -> Result<(), Status> {
        self.quiesced = true;
        Ok(())
    }
}

/// The VMM's side of the hybrid-vsock handshake: expects `CONNECT 1024\n`.
fn accept_handshake(stream: &mut UnixStream) {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        stream.read_exact(&mut byte).unwrap();
        line.push(byte[0]);
    }
    assert_eq!(line, b"CONNECT 1024\n");
    stream.write_all(b"OK 1\n").unwrap();
}

/// Runs a handshake then the test agent on `stream` until the client hangs up.
fn spawn_agent(mut stream: UnixStream) -> JoinHandle<TestAgent> {
    thread::spawn(move || {
        accept_handshake(&mut stream);
        let mut agent = TestAgent::default();
        let mut dispatcher = Dispatcher::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).unwrap();
            if n == 0 {
                return agent;
            }
            let mut out = Vec::new();
            dispatcher
                .handle_bytes(&mut agent, &buf[..n], &mut out)
                .unwrap();
            stream.write_all(&out).unwrap();
        }
    })
}

fn connected_pair() -> (AgentClient, JoinHandle<TestAgent>) {
    let (host, guest) = UnixStream::pair().unwrap();
    let agent = spawn_agent(guest);
    let client =
        AgentClient::from_hybrid_vsock_stream(host, "pair", AGENT_VSOCK_PORT, DEADLINE).unwrap();
    (client, agent)
}

#[test]
fn every_rpc_over_a_socket_pair() {
    let (mut client, agent) = connected_pair();

    let check = client.check(&CheckRequest::default(), DEADLINE).unwrap();
    assert_eq!(check.status(), ServingStatus::Serving);
    assert_eq!(check.protocol_version, PROTOCOL_VERSION);

    let details = client
        .get_guest_details(&GuestDetailsRequest {}, DEADLINE)
        .unwrap();
    assert_eq!(
        (details.online_vcpus, details.kernel.as_str()),
        (2, "unit-test")
    );

    client
        .reseed_random_dev(
            &ReseedRandomDevRequest {
                data: vec![1, 2, 3],
            },
            DEADLINE,
        )
        .unwrap();
    client
        .set_guest_date_time(&SetGuestDateTimeRequest { sec: 10, usec: 20 }, DEADLINE)
        .unwrap();
    client
        .online_cpu_mem(
            &OnlineCpuMemRequest {
                nb_cpus: 4,
                memory_bytes: 1 << 30,
            },
            DEADLINE,
        )
        .unwrap();

    let random = client
        .read_random(&ReadRandomRequest { n: 300 }, DEADLINE)
        .unwrap();
    assert_eq!(random.data.len(), 300);

    let touched = client
        .touch_memory(
            &TouchMemoryRequest {
                pages: 3,
                pattern: 5,
            },
            DEADLINE,
        )
        .unwrap();
    assert_eq!((touched.checksum, touched.pages), (15, 3));

    let time = client
        .get_guest_time(&GetGuestTimeRequest {}, DEADLINE)
        .unwrap();
    assert_eq!(time.monotonic_ns, 77);

    client
        .quiesce_for_snapshot(&QuiesceForSnapshotRequest {}, DEADLINE)
        .unwrap();

    drop(client);
    let agent = agent.join().unwrap();
    assert_eq!(agent.reseeds, [vec![1, 2, 3]]);
    assert_eq!(agent.date_time, Some((10, 20)));
    assert_eq!(agent.online, Some((4, 1 << 30)));
    assert!(agent.quiesced);
}

#[test]
fn agent_status_reaches_the_client() {
    let (mut client, agent) = connected_pair();

    let err = client
        .call::<_, ()>(AGENT_SERVICE_NAME, "NoSuchMethod", &(), DEADLINE)
        .unwrap_err();
    match &err {
        ClientError::Status { status, .. } => assert_eq!(status.code, Code::Unimplemented),
        other => panic!("expected UNIMPLEMENTED, got {other}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("NoSuchMethod") && text.contains("UNIMPLEMENTED (12)"),
        "{text}"
    );

    let err = client
        .read_random(&ReadRandomRequest { n: 1 << 20 }, DEADLINE)
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Status { status, .. } if status.code == Code::InvalidArgument),
        "{err}"
    );
    assert!(err.to_string().contains("4096-byte limit"), "{err}");

    // An error status leaves the connection usable.
    client.check(&CheckRequest::default(), DEADLINE).unwrap();
    drop(client);
    agent.join().unwrap();
}

/// Handshake done, then reads requests and never answers until the client
/// hangs up. Returns how many request bytes arrived.
fn spawn_silent_agent(mut stream: UnixStream) -> JoinHandle<usize> {
    thread::spawn(move || {
        accept_handshake(&mut stream);
        let mut total = 0;
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    })
}

#[test]
fn silent_agent_hits_the_deadline() {
    let (host, guest) = UnixStream::pair().unwrap();
    let agent = spawn_silent_agent(guest);
    let mut client =
        AgentClient::from_hybrid_vsock_stream(host, "pair", AGENT_VSOCK_PORT, DEADLINE).unwrap();

    let start = Instant::now();
    let err = client.check(&CheckRequest::default(), SHORT).unwrap_err();
    let waited = start.elapsed();
    match &err {
        ClientError::DeadlineExceeded {
            call,
            deadline,
            elapsed,
        } => {
            assert!(call.starts_with("Check via pair"), "{call}");
            assert_eq!(*deadline, SHORT);
            assert!(*elapsed >= SHORT, "{elapsed:?}");
        }
        other => panic!("expected a deadline error, got {other}"),
    }
    assert!(waited >= SHORT && waited < DEADLINE, "{waited:?}");
    assert!(err.to_string().contains("deadline exceeded"), "{err}");
    drop(client);
    assert!(agent.join().unwrap() > 0);
}

#[test]
fn late_reply_to_a_timed_out_call_is_skipped() {
    let (host, mut guest) = UnixStream::pair().unwrap();
    // Holds the first request until the second arrives, then answers both in
    // order: the first answer is late and must not be taken for the second.
    let agent = thread::spawn(move || {
        accept_handshake(&mut guest);
        let mut agent = TestAgent::default();
        let mut decoder = FrameDecoder::new();
        let mut frames = Vec::new();
        let mut buf = [0u8; 4096];
        while frames.len() < 2 {
            let n = guest.read(&mut buf).unwrap();
            assert_ne!(n, 0);
            decoder.push(&buf[..n]).unwrap();
            while let Some(frame) = decoder.next_frame().unwrap() {
                frames.push(frame);
            }
        }
        assert_eq!((frames[0].stream_id, frames[1].stream_id), (1, 3));
        for frame in &frames {
            guest.write_all(&serve_frame(&mut agent, frame)).unwrap();
        }
        let _ = guest.read(&mut buf);
    });
    let mut client =
        AgentClient::from_hybrid_vsock_stream(host, "pair", AGENT_VSOCK_PORT, DEADLINE).unwrap();

    let err = client
        .get_guest_time(&GetGuestTimeRequest {}, SHORT)
        .unwrap_err();
    assert!(matches!(err, ClientError::DeadlineExceeded { .. }), "{err}");
    let check = client.check(&CheckRequest::default(), DEADLINE).unwrap();
    assert_eq!(check.protocol_version, PROTOCOL_VERSION);
    drop(client);
    agent.join().unwrap();
}

#[test]
fn handshake_rejection_names_the_reply() {
    for (reply, expected) in [
        (&b"ERR no listener\n"[..], "\"ERR no listener\\n\""),
        (b"", "\"\" (then the connection closed)"),
        (b"OK\n", "\"OK\\n\""),
    ] {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let vmm = thread::spawn(move || {
            let mut line = [0u8; 13];
            guest.read_exact(&mut line).unwrap();
            guest.write_all(reply).unwrap();
        });
        let err =
            AgentClient::from_hybrid_vsock_stream(host, "vm.sock", 1024, DEADLINE).unwrap_err();
        vmm.join().unwrap();
        assert!(
            matches!(err, ClientError::HandshakeRejected { port: 1024, .. }),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains(expected) && text.contains("vm.sock"),
            "{text}"
        );
    }
}

#[test]
fn handshake_without_reply_hits_the_deadline() {
    let (host, _guest) = UnixStream::pair().unwrap();
    let err = AgentClient::from_hybrid_vsock_stream(host, "vm.sock", 1024, SHORT).unwrap_err();
    match err {
        ClientError::DeadlineExceeded { call, .. } => {
            assert!(
                call.contains("handshake for port 1024 at vm.sock"),
                "{call}"
            )
        }
        other => panic!("expected a deadline error, got {other}"),
    }
}

/// A socket path unique to this test process, removed on drop.
struct TempSocket(PathBuf);

impl TempSocket {
    fn new(name: &str) -> TempSocket {
        let path =
            std::env::temp_dir().join(format!("agent-protocol-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        TempSocket(path)
    }
}

impl Drop for TempSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn connect_through_a_socket_path() {
    let socket = TempSocket::new("connect");
    let listener = UnixListener::bind(&socket.0).unwrap();
    let vmm = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        spawn_agent(stream).join().unwrap()
    });
    let mut client =
        AgentClient::connect_hybrid_vsock(&socket.0, AGENT_VSOCK_PORT, DEADLINE).unwrap();
    client
        .reseed_random_dev(&ReseedRandomDevRequest { data: vec![9] }, DEADLINE)
        .unwrap();
    drop(client);
    assert_eq!(vmm.join().unwrap().reseeds, [vec![9]]);
}

#[test]
fn missing_or_dead_socket_is_a_clear_error() {
    let socket = TempSocket::new("missing");
    let err = AgentClient::connect_hybrid_vsock(&socket.0, AGENT_VSOCK_PORT, DEADLINE).unwrap_err();
    assert!(matches!(err, ClientError::NoVm { .. }), "{err}");
    let text = err.to_string();
    assert!(text.starts_with("no VM listening at /"), "{text}");
    assert!(text.contains(&*socket.0.to_string_lossy()), "{text}");

    // A socket file whose listener is gone refuses connections.
    drop(UnixListener::bind(&socket.0).unwrap());
    let err = AgentClient::connect_hybrid_vsock(&socket.0, AGENT_VSOCK_PORT, DEADLINE).unwrap_err();
    assert!(
        matches!(err, ClientError::ConnectionRefused { .. }),
        "{err}"
    );
    assert!(
        err.to_string().starts_with("connection refused at /"),
        "{err}"
    );
}

#[test]
fn agent_hanging_up_mid_call_is_reported() {
    let (host, mut guest) = UnixStream::pair().unwrap();
    let agent = thread::spawn(move || {
        accept_handshake(&mut guest);
        // The whole request: leaving any unread makes the close a reset.
        let mut decoder = FrameDecoder::new();
        let mut buf = [0u8; 4096];
        while decoder.next_frame().unwrap().is_none() {
            let n = guest.read(&mut buf).unwrap();
            decoder.push(&buf[..n]).unwrap();
        }
        // Half a header, then gone.
        guest.write_all(&[0, 0, 0]).unwrap();
    });
    let mut client =
        AgentClient::from_hybrid_vsock_stream(host, "pair", AGENT_VSOCK_PORT, DEADLINE).unwrap();
    let err = client
        .check(&CheckRequest::default(), DEADLINE)
        .unwrap_err();
    agent.join().unwrap();
    assert!(matches!(err, ClientError::Closed { .. }), "{err}");
    assert!(err.to_string().contains("3 bytes"), "{err}");
    let err = client
        .check(&CheckRequest::default(), DEADLINE)
        .unwrap_err();
    assert!(matches!(err, ClientError::Unusable { .. }), "{err}");
}
