//! The host's side (feature `std`): a blocking ttrpc client for the agent over
//! the VM's hybrid-vsock unix socket.
//!
//! Hybrid vsock (Firecracker, Cloud Hypervisor): the host connects to the VM's
//! unix socket, writes `CONNECT <port>\n` and reads `OK <host port>\n`; from
//! then on the stream is a connection to the guest's vsock port.
//!
//! Every call has a deadline: socket timeouts are set from the time left before
//! each read and write, and the request's `timeout_nano` tells the agent.

use std::format;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::time::{Duration, Instant};
use std::vec::Vec;

use prost::Message;

use crate::frame::{Frame, FrameDecoder, FrameError, FrameType};
use crate::status::Status;
use crate::ttrpc;

/// Longest hybrid-vsock handshake reply accepted (`OK 4294967295\n` is 14).
const HANDSHAKE_REPLY_MAX: usize = 64;

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 64 * 1024;

/// Why a connection or call to the agent failed. Each variant displays as one
/// line naming the socket or call at fault.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing at the socket path.
    #[error("no VM listening at {}: {source}", path.display())]
    NoVm {
        /// The hybrid-vsock socket path.
        path: PathBuf,
        /// The connect error.
        source: io::Error,
    },
    /// The socket exists but nobody accepts on it (VM gone, stale socket).
    #[error("connection refused at {} (VM not running?): {source}", path.display())]
    ConnectionRefused {
        /// The hybrid-vsock socket path.
        path: PathBuf,
        /// The connect error.
        source: io::Error,
    },
    /// Any other failure to connect to the socket.
    #[error("cannot connect to {}: {source}", path.display())]
    Connect {
        /// The hybrid-vsock socket path.
        path: PathBuf,
        /// The connect error.
        source: io::Error,
    },
    /// The VMM did not answer `CONNECT <port>` with `OK <n>`, typically
    /// because nothing in the guest listens on the port.
    #[error("hybrid-vsock handshake for port {port} at {endpoint} rejected: expected \"OK <n>\\n\", got {reply}")]
    HandshakeRejected {
        /// The hybrid-vsock socket.
        endpoint: String,
        /// The guest vsock port asked for.
        port: u32,
        /// What came back, quoted, and how it ended.
        reply: String,
    },
    /// The deadline passed before the call completed.
    #[error("{call}: deadline exceeded after {elapsed:?} (deadline {deadline:?})")]
    DeadlineExceeded {
        /// The call, e.g. `Check via /run/vm0/vsock.sock`.
        call: String,
        /// The deadline the caller gave.
        deadline: Duration,
        /// Time spent when it was given up.
        elapsed: Duration,
    },
    /// The agent answered with an error status.
    #[error("{call}: agent returned {status}")]
    Status {
        /// The call.
        call: String,
        /// Code and message from the agent.
        status: Status,
    },
    /// The peer closed the connection before the reply.
    #[error("{call}: connection closed by the agent{detail}")]
    Closed {
        /// The call.
        call: String,
        /// Extra context (e.g. a partial frame), empty or starting with "; ".
        detail: String,
    },
    /// The bytes from the agent are not valid ttrpc.
    #[error("{call}: protocol error: {detail}")]
    Protocol {
        /// The call.
        call: String,
        /// What was wrong.
        detail: String,
    },
    /// A socket read or write failed.
    #[error("{call}: I/O error: {source}")]
    Io {
        /// The call.
        call: String,
        /// The error.
        source: io::Error,
    },
    /// An earlier failure left the connection mid-frame; reconnect.
    #[error("{call}: connection unusable after an earlier failure ({cause}); reconnect")]
    Unusable {
        /// The call.
        call: String,
        /// The earlier failure.
        cause: String,
    },
}

/// A connection to the guest agent. Calls are blocking and one at a time;
/// stream ids are odd and increase by 2 from 1, as for any ttrpc client.
#[derive(Debug)]
pub struct AgentClient {
    stream: UnixStream,
    endpoint: String,
    decoder: FrameDecoder,
    next_stream_id: u32,
    read_buf: Vec<u8>,
    broken: Option<String>,
}

impl AgentClient {
    /// Connects to the VM's hybrid-vsock socket at `socket_path` and opens the
    /// guest's vsock `port` (normally [`crate::AGENT_VSOCK_PORT`]) with the
    /// `CONNECT`/`OK` handshake, all within `deadline`.
    pub fn connect_hybrid_vsock(
        socket_path: impl AsRef<Path>,
        port: u32,
        deadline: Duration,
    ) -> Result<AgentClient, ClientError> {
        let path = socket_path.as_ref();
        let timer = Timer::start(deadline);
        let stream = UnixStream::connect(path).map_err(|source| {
            let path = path.to_path_buf();
            match source.kind() {
                io::ErrorKind::NotFound => ClientError::NoVm { path, source },
                io::ErrorKind::ConnectionRefused => ClientError::ConnectionRefused { path, source },
                _ => ClientError::Connect { path, source },
            }
        })?;
        let endpoint = path.display().to_string();
        AgentClient::handshake(stream, &endpoint, port, &timer)
    }

    /// Does the hybrid-vsock handshake for `port` on a stream already
    /// connected to a VM's socket (named `endpoint` in errors), within
    /// `deadline`.
    pub fn from_hybrid_vsock_stream(
        stream: UnixStream,
        endpoint: &str,
        port: u32,
        deadline: Duration,
    ) -> Result<AgentClient, ClientError> {
        AgentClient::handshake(stream, endpoint, port, &Timer::start(deadline))
    }

    fn handshake(
        mut stream: UnixStream,
        endpoint: &str,
        port: u32,
        timer: &Timer,
    ) -> Result<AgentClient, ClientError> {
        hybrid_vsock_handshake(&mut stream, endpoint, port, timer)?;
        Ok(AgentClient::from_stream(
            stream,
            format!("{endpoint} port {port}"),
        ))
    }

    /// Wraps a stream already connected to the agent (handshake done, if any).
    /// `endpoint` names it in errors.
    pub fn from_stream(stream: UnixStream, endpoint: impl Into<String>) -> AgentClient {
        AgentClient {
            stream,
            endpoint: endpoint.into(),
            decoder: FrameDecoder::new(),
            next_stream_id: 1,
            read_buf: std::vec![0; READ_CHUNK],
            broken: None,
        }
    }

    /// Calls `service/method` with `request` and decodes the reply, all within
    /// `deadline`. The typed methods (`check`, `get_guest_details`, ...) wrap
    /// this. A reply to an earlier call that timed out is skipped.
    pub fn call<Req: Message, Resp: Message + Default>(
        &mut self,
        service: &str,
        method: &str,
        request: &Req,
        deadline: Duration,
    ) -> Result<Resp, ClientError> {
        let call = format!("{method} via {}", self.endpoint);
        if let Some(cause) = &self.broken {
            return Err(ClientError::Unusable {
                call,
                cause: cause.clone(),
            });
        }
        let timer = Timer::start(deadline);
        let stream_id = self.next_stream_id;
        // Client streams are odd; wrap back to 1 rather than overflow.
        self.next_stream_id = self.next_stream_id.checked_add(2).unwrap_or(1);

        let envelope = ttrpc::Request {
            service: service.to_string(),
            method: method.to_string(),
            payload: request.encode_to_vec(),
            timeout_nano: i64::try_from(deadline.as_nanos()).unwrap_or(i64::MAX),
            metadata: Vec::new(),
        };
        let bytes = Frame::request(stream_id, envelope.encode_to_vec())
            .encode()
            .map_err(|e| ClientError::Protocol {
                call: call.clone(),
                detail: format!("request not sent: {e}"),
            })?;
        self.write_frame(&bytes, &timer, &call)?;

        let frame = loop {
            let frame = self.read_frame(&timer, &call)?;
            if frame.frame_type != FrameType::Response {
                return Err(self.poison(ClientError::Protocol {
                    call,
                    detail: format!("stream {}: agent sent a request frame", frame.stream_id),
                }));
            }
            if frame.stream_id == stream_id {
                break frame;
            }
            // Calls are sequential, so any other id is a late reply to a call
            // that already gave up; it is dropped.
        };
        let response = ttrpc::Response::decode(frame.payload.as_slice()).map_err(|e| {
            ClientError::Protocol {
                call: call.clone(),
                detail: format!("undecodable ttrpc response: {e}"),
            }
        })?;
        if let Some(status) = response.status {
            if status.code != 0 {
                return Err(ClientError::Status {
                    call,
                    status: Status::from_wire(status),
                });
            }
        }
        Resp::decode(response.payload.as_slice()).map_err(|e| ClientError::Protocol {
            call,
            detail: format!("undecodable {method} reply: {e}"),
        })
    }

    fn write_frame(&mut self, bytes: &[u8], timer: &Timer, call: &str) -> Result<(), ClientError> {
        let remaining = timer.remaining(call)?;
        let result = self
            .stream
            .set_write_timeout(Some(remaining))
            .and_then(|()| self.stream.write_all(bytes));
        result.map_err(|e| {
            // A partial write leaves the agent mid-frame: the stream is lost.
            let error = timer.io_error(call, e);
            self.poison(error)
        })
    }

    fn read_frame(&mut self, timer: &Timer, call: &str) -> Result<Frame, ClientError> {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => {}
                Err(e) => return Err(self.poison(protocol_error(call, e))),
            }
            let remaining = timer.remaining(call)?;
            let read = self
                .stream
                .set_read_timeout(Some(remaining))
                .and_then(|()| self.stream.read(&mut self.read_buf));
            match read {
                Ok(0) => {
                    let detail = match self.decoder.finish() {
                        Ok(()) => String::new(),
                        Err(e) => format!("; {e}"),
                    };
                    let error = ClientError::Closed {
                        call: call.to_string(),
                        detail,
                    };
                    return Err(self.poison(error));
                }
                Ok(n) => {
                    if let Err(e) = self.decoder.push(&self.read_buf[..n]) {
                        return Err(self.poison(protocol_error(call, e)));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    let error = ClientError::Closed {
                        call: call.to_string(),
                        detail: format!("; {e}"),
                    };
                    return Err(self.poison(error));
                }
                Err(e) => {
                    let error = timer.io_error(call, e);
                    // A timed-out read leaves at most a partial reply in the
                    // decoder, which later calls complete and skip.
                    if !matches!(error, ClientError::DeadlineExceeded { .. }) {
                        return Err(self.poison(error));
                    }
                    return Err(error);
                }
            }
        }
    }

    fn poison(&mut self, error: ClientError) -> ClientError {
        self.broken = Some(error.to_string());
        error
    }
}

/// Sends `CONNECT <port>\n` and expects `OK <n>\n`, reading one byte at a time
/// so nothing after the reply line is consumed.
fn hybrid_vsock_handshake(
    stream: &mut UnixStream,
    endpoint: &str,
    port: u32,
    timer: &Timer,
) -> Result<(), ClientError> {
    let call = &format!("hybrid-vsock handshake for port {port} at {endpoint}");
    let remaining = timer.remaining(call)?;
    stream
        .set_write_timeout(Some(remaining))
        .and_then(|()| stream.write_all(format!("CONNECT {port}\n").as_bytes()))
        .map_err(|e| timer.io_error(call, e))?;

    let mut reply = Vec::new();
    let rejected = |reply: &[u8], how: &str| ClientError::HandshakeRejected {
        endpoint: endpoint.to_string(),
        port,
        reply: format!("{:?} ({how})", String::from_utf8_lossy(reply)),
    };
    loop {
        let remaining = timer.remaining(call)?;
        let mut byte = [0u8; 1];
        let read = stream
            .set_read_timeout(Some(remaining))
            .and_then(|()| stream.read(&mut byte));
        match read {
            Ok(0) => return Err(rejected(&reply, "then the connection closed")),
            Ok(_) => {
                reply.push(byte[0]);
                if byte[0] == b'\n' {
                    break;
                }
                if reply.len() >= HANDSHAKE_REPLY_MAX {
                    return Err(rejected(&reply, "no newline"));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(timer.io_error(call, e)),
        }
    }
    let line = &reply[..reply.len() - 1];
    let accepted = line
        .strip_prefix(b"OK ")
        .and_then(|n| std::str::from_utf8(n).ok())
        .is_some_and(|n| n.parse::<u32>().is_ok());
    if accepted {
        Ok(())
    } else {
        Err(rejected(&reply, "not OK"))
    }
}

/// Tracks one call's deadline.
struct Timer {
    start: Instant,
    deadline: Duration,
}

impl Timer {
    fn start(deadline: Duration) -> Timer {
        Timer {
            start: Instant::now(),
            deadline,
        }
    }

    fn exceeded(&self, call: &str) -> ClientError {
        ClientError::DeadlineExceeded {
            call: call.to_string(),
            deadline: self.deadline,
            elapsed: self.start.elapsed(),
        }
    }

    /// Time left, or the deadline error if none. Never zero: a zero socket
    /// timeout is rejected by the OS API.
    fn remaining(&self, call: &str) -> Result<Duration, ClientError> {
        match self.deadline.checked_sub(self.start.elapsed()) {
            Some(left) if !left.is_zero() => Ok(left),
            _ => Err(self.exceeded(call)),
        }
    }

    /// Socket timeouts become the deadline error, the rest I/O errors.
    fn io_error(&self, call: &str, source: io::Error) -> ClientError {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => self.exceeded(call),
            _ => ClientError::Io {
                call: call.to_string(),
                source,
            },
        }
    }
}

fn protocol_error(call: &str, error: FrameError) -> ClientError {
    ClientError::Protocol {
        call: call.to_string(),
        detail: error.to_string(),
    }
}
