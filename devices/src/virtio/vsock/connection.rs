//! One stream between a host unix socket and a guest vsock port: its state,
//! the bytes in flight each way, and credit-based flow control (virtio 1.2
//! §5.10.6.3): we never send the guest more than its advertised free buffer,
//! and we advertise a fixed buffer of our own, holding at most that many guest
//! bytes the host has not read yet.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::packet::{op, PacketHeader, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// The receive buffer we advertise (buf_alloc) per connection: the most guest
/// bytes we hold while the host side is not reading.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// We send a CREDIT_UPDATE once this many forwarded bytes have not been
/// advertised to the guest yet.
pub const CREDIT_UPDATE_THRESHOLD: u32 = 64 * 1024;
/// How long a connection may wait for the other side in a transient state:
/// the host's `CONNECT` line, the guest's RESPONSE, or the final RST.
pub const CONN_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest `CONNECT <port>\n` line accepted from the host.
const CONNECT_LINE_MAX: usize = 32;

/// Where a connection is in its life.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ConnState {
    /// A host client connected to the listener; its `CONNECT <port>\n` line
    /// is being read.
    AwaitingConnect { line: Vec<u8> },
    /// We asked the guest to connect (REQUEST) and wait for RESPONSE.
    LocalInit,
    /// Bytes flow both ways.
    Established,
}

/// What reading the host's `CONNECT` line gave.
pub(super) enum ConnectLine {
    /// Not complete yet.
    Pending,
    /// The port the host wants to reach in the guest.
    Port(u32),
    /// Malformed, too long, or the host went away.
    Invalid,
}

/// The next thing a connection has for the guest.
pub(super) enum RxItem {
    /// A packet without payload.
    Control { op: u16, flags: u32 },
    /// An RW packet with this many payload bytes (in the caller's buffer).
    Data(usize),
    /// The host stream failed: reset the connection.
    Fatal,
    /// Nothing right now.
    Nothing,
}

/// Why a guest packet kills its connection.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnError {
    /// RW on a connection that is not established or whose guest side shut down sending.
    #[error("data on a connection that cannot take it")]
    UnexpectedData,
    /// The guest sent more than the credit we gave it.
    #[error("guest exceeded its credit: {pending} bytes pending, {incoming} more")]
    CreditExceeded { pending: usize, incoming: usize },
    /// Writing to the host stream failed.
    #[error("host stream: {0}")]
    Host(#[source] io::Error),
}

/// One vsock stream.
pub(super) struct Connection {
    pub stream: UnixStream,
    pub state: ConnState,
    /// Our (host-side) port.
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    /// When the connection is torn down if it has not moved on.
    pub deadline: Option<Instant>,
    /// The events it is registered for in the muxer's epoll (None: not registered).
    pub registered: Option<EventSet>,
    /// Whether it sits in the muxer's queue of connections with packets for the guest.
    pub in_rx_queue: bool,
    /// A host client opened it (`CONNECT`), so it holds a slot in the guest's listener.
    pub host_initiated: bool,
    /// Last time either side moved it (for evicting the idlest one).
    pub last_active: Instant,

    send_request: bool,
    send_response: bool,
    send_credit_update: bool,
    shutdown_due: u32,
    shutdown_sent: u32,

    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    host_readable: bool,
    host_eof: bool,
    host_hup: bool,

    ok_line: Vec<u8>,
    tx_buf: VecDeque<u8>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    peer_shutdown: u32,
    host_write_shut: bool,
}

impl Connection {
    fn with_state(stream: UnixStream, state: ConnState, local_port: u32, peer_port: u32) -> Self {
        Connection {
            stream,
            state,
            local_port,
            peer_port,
            deadline: None,
            registered: None,
            in_rx_queue: false,
            host_initiated: false,
            last_active: Instant::now(),
            send_request: false,
            send_response: false,
            send_credit_update: false,
            shutdown_due: 0,
            shutdown_sent: 0,
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            host_readable: false,
            host_eof: false,
            host_hup: false,
            ok_line: Vec::new(),
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_shutdown: 0,
            host_write_shut: false,
        }
    }

    /// A host client just accepted on the listener.
    pub fn accepted(stream: UnixStream) -> Self {
        Self::with_state(
            stream,
            ConnState::AwaitingConnect { line: Vec::new() },
            0,
            0,
        )
    }

    /// A connection the guest asked for (REQUEST in `hdr`), already connected
    /// to the host listener: we owe the guest a RESPONSE.
    pub fn guest_initiated(stream: UnixStream, hdr: &PacketHeader) -> Self {
        let mut c = Self::with_state(stream, ConnState::Established, hdr.dst_port, hdr.src_port);
        c.update_peer_credit(hdr);
        c.send_response = true;
        c
    }

    /// The host's `CONNECT` named guest port `peer_port`; we will use
    /// `local_port` and owe the guest a REQUEST.
    pub fn start_host_initiated(&mut self, local_port: u32, peer_port: u32) {
        self.state = ConnState::LocalInit;
        self.local_port = local_port;
        self.peer_port = peer_port;
        self.send_request = true;
        self.deadline = None;
        self.host_initiated = true;
        self.last_active = Instant::now();
    }

    /// Read what is available of the host's `CONNECT <port>\n` line, one byte
    /// at a time so that nothing after the newline is consumed.
    pub fn read_connect_line(&mut self) -> ConnectLine {
        let ConnState::AwaitingConnect { line } = &mut self.state else {
            return ConnectLine::Invalid;
        };
        let mut byte = [0u8];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return ConnectLine::Invalid,
                Ok(_) if byte[0] == b'\n' => return parse_connect(line),
                Ok(_) if line.len() >= CONNECT_LINE_MAX => return ConnectLine::Invalid,
                Ok(_) => line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ConnectLine::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return ConnectLine::Invalid,
            }
        }
    }

    /// Every guest packet carries its current buffer space.
    pub fn update_peer_credit(&mut self, hdr: &PacketHeader) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Bytes we may still send the guest (virtio 1.2 §5.10.6.3).
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The guest accepted our REQUEST: tell the host client its port.
    pub fn on_response(&mut self) {
        self.state = ConnState::Established;
        self.deadline = None;
        self.ok_line = format!("OK {}\n", self.local_port).into_bytes();
    }

    /// The guest asked for our buffer space.
    pub fn on_credit_request(&mut self) {
        self.send_credit_update = true;
    }

    /// The guest will send and/or receive no more.
    pub fn on_guest_shutdown(&mut self, flags: u32) -> Result<(), ConnError> {
        self.peer_shutdown |= flags & SHUTDOWN_BOTH;
        self.flush().map_err(ConnError::Host)
    }

    /// Payload from the guest: forward it to the host, keeping what the host
    /// cannot take yet (within the credit we gave).
    pub fn on_guest_data(&mut self, data: &[u8]) -> Result<(), ConnError> {
        if self.state != ConnState::Established || self.peer_shutdown & SHUTDOWN_SEND != 0 {
            return Err(ConnError::UnexpectedData);
        }
        if self.tx_buf.len() + data.len() > CONN_BUF_ALLOC as usize {
            return Err(ConnError::CreditExceeded {
                pending: self.tx_buf.len(),
                incoming: data.len(),
            });
        }
        let mut rest = data;
        if !self.has_pending_host_bytes() {
            match send_nosignal(&self.stream, data) {
                Ok(n) => {
                    self.forwarded(n);
                    rest = &data[n..];
                }
                Err(e) if is_transient(&e) => {}
                Err(e) => return Err(ConnError::Host(e)),
            }
        }
        self.tx_buf.extend(rest);
        Ok(())
    }

    /// The host stream is ready (or failed) as `events` says.
    pub fn on_host_event(&mut self, events: EventSet) -> Result<(), ConnError> {
        if events.contains(EventSet::ERROR) {
            let e = self
                .stream
                .take_error()
                .ok()
                .flatten()
                .unwrap_or_else(|| io::Error::other("socket error"));
            return Err(ConnError::Host(e));
        }
        if events.contains(EventSet::HANG_UP) {
            self.host_hup = true;
            if self.host_eof {
                self.shutdown_due |= SHUTDOWN_RCV;
            }
        }
        if events.contains(EventSet::IN) {
            self.host_readable = true;
        }
        if events.contains(EventSet::OUT) {
            self.flush().map_err(ConnError::Host)?;
        }
        Ok(())
    }

    /// Write pending bytes to the host until it would block; once the guest
    /// shut down sending and everything is written, shut the host's read side.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.ok_line.is_empty() {
            match send_nosignal(&self.stream, &self.ok_line) {
                Ok(n) => drop(self.ok_line.drain(..n)),
                Err(e) if is_transient(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match send_nosignal(&self.stream, front) {
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.forwarded(n);
                }
                Err(e) if is_transient(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            // The host may already be gone; RST follows from other events.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }

    fn forwarded(&mut self, n: usize) {
        self.fwd_cnt += Wrapping(n as u32);
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.send_credit_update = true;
        }
    }

    fn has_pending_host_bytes(&self) -> bool {
        !self.ok_line.is_empty() || !self.tx_buf.is_empty()
    }

    fn can_read_host(&self) -> bool {
        self.state == ConnState::Established
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    /// Whether the connection has a packet for the guest now.
    pub fn has_rx_work(&self) -> bool {
        self.send_response
            || self.send_request
            || self.send_credit_update
            || self.shutdown_due & !self.shutdown_sent != 0
            || (self.host_readable && self.can_read_host())
    }

    /// Produce the next packet for the guest; RW payload is read from the
    /// host stream into `buf` (at most the guest's credit).
    pub fn next_rx(&mut self, buf: &mut [u8]) -> RxItem {
        if self.send_response {
            self.send_response = false;
            return RxItem::Control {
                op: op::RESPONSE,
                flags: 0,
            };
        }
        if self.send_request {
            self.send_request = false;
            return RxItem::Control {
                op: op::REQUEST,
                flags: 0,
            };
        }
        if self.host_readable && self.can_read_host() && !buf.is_empty() {
            let n = buf.len().min(self.peer_credit() as usize);
            match self.stream.read(&mut buf[..n]) {
                Ok(0) => {
                    self.host_readable = false;
                    self.host_eof = true;
                    self.shutdown_due |= SHUTDOWN_SEND;
                    if self.host_hup {
                        self.shutdown_due |= SHUTDOWN_RCV;
                    }
                }
                Ok(n) => {
                    self.rx_cnt += Wrapping(n as u32);
                    return RxItem::Data(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.host_readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return RxItem::Fatal,
            }
        }
        let due = self.shutdown_due & !self.shutdown_sent;
        if due != 0 {
            self.shutdown_sent |= due;
            return RxItem::Control {
                op: op::SHUTDOWN,
                flags: self.shutdown_sent,
            };
        }
        if self.send_credit_update {
            self.send_credit_update = false;
            return RxItem::Control {
                op: op::CREDIT_UPDATE,
                flags: 0,
            };
        }
        RxItem::Nothing
    }

    /// Our credit fields for an outgoing packet (and note them as advertised).
    pub fn credit_fields(&mut self) -> (u32, u32) {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        (CONN_BUF_ALLOC, self.fwd_cnt.0)
    }

    /// Whether the connection should be reset and dropped: both sides are
    /// done (virtio 1.2 §5.10.6.6: SHUTDOWN(s), then RST from the peer), or
    /// the host client left before the guest answered our REQUEST.
    pub fn should_reset(&self) -> bool {
        match self.state {
            ConnState::AwaitingConnect { .. } => return false,
            ConnState::LocalInit => return self.host_hup,
            ConnState::Established => {}
        }
        let written = !self.has_pending_host_bytes();
        (self.peer_shutdown == SHUTDOWN_BOTH && written)
            || (self.host_hup && self.peer_shutdown & SHUTDOWN_RCV != 0)
            || (self.shutdown_sent & SHUTDOWN_SEND != 0
                && self.peer_shutdown & SHUTDOWN_SEND != 0
                && written)
    }

    /// The epoll events the connection needs from its host stream (None: it
    /// should not be registered, e.g. a hung-up stream it cannot act on).
    pub fn desired_events(&self) -> Option<EventSet> {
        match self.state {
            ConnState::AwaitingConnect { .. } => Some(EventSet::IN),
            // Only hang-ups matter until the guest answers.
            ConnState::LocalInit => Some(EventSet::empty()),
            ConnState::Established => {
                let mut ev = EventSet::empty();
                if !self.host_readable && self.can_read_host() {
                    ev |= EventSet::IN;
                }
                if self.has_pending_host_bytes() {
                    ev |= EventSet::OUT;
                }
                if ev.is_empty() && self.host_hup {
                    None
                } else {
                    Some(ev)
                }
            }
        }
    }

    /// Start or stop the timeout for states that wait on the other side.
    pub fn refresh_deadline(&mut self, now: Instant) {
        let waiting = match self.state {
            ConnState::AwaitingConnect { .. } | ConnState::LocalInit => true,
            ConnState::Established => {
                self.shutdown_sent == SHUTDOWN_BOTH || self.peer_shutdown == SHUTDOWN_BOTH
            }
        };
        match (waiting, self.deadline) {
            (true, None) => self.deadline = Some(now + CONN_TIMEOUT),
            (false, Some(_)) => self.deadline = None,
            _ => {}
        }
    }
}

/// `write` without SIGPIPE: a host client that went away must be an error
/// for this connection, not a signal for whatever process hosts the VMM.
fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: the pointer and length describe `buf`, which outlives the call;
    // the fd is owned by `stream`.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

fn parse_connect(line: &[u8]) -> ConnectLine {
    let text = match std::str::from_utf8(line) {
        Ok(t) => t.trim_end_matches('\r'),
        Err(_) => return ConnectLine::Invalid,
    };
    let mut words = text.split(' ');
    match (words.next(), words.next(), words.next()) {
        (Some("CONNECT"), Some(port), None) => match port.parse() {
            Ok(p) => ConnectLine::Port(p),
            Err(_) => ConnectLine::Invalid,
        },
        _ => ConnectLine::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn established() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let hdr = PacketHeader {
            src_port: 5000,
            dst_port: 1024,
            buf_alloc: 1000,
            ..Default::default()
        };
        (Connection::guest_initiated(a, &hdr), b)
    }

    #[test]
    fn connect_lines() {
        assert!(matches!(
            parse_connect(b"CONNECT 1024"),
            ConnectLine::Port(1024)
        ));
        assert!(matches!(
            parse_connect(b"CONNECT 52\r"),
            ConnectLine::Port(52)
        ));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT -1",
            b"CONNECT 1 2",
            b"connect 1",
            b"\xff",
            b"",
        ] {
            assert!(
                matches!(parse_connect(bad), ConnectLine::Invalid),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn never_sends_past_the_guest_credit() {
        let (mut c, mut host) = established();
        assert!(matches!(
            c.next_rx(&mut []),
            RxItem::Control {
                op: op::RESPONSE,
                ..
            }
        ));
        host.write_all(&[7u8; 3000]).unwrap();
        c.on_host_event(EventSet::IN).unwrap();
        let mut buf = vec![0u8; 4096];
        assert!(matches!(c.next_rx(&mut buf), RxItem::Data(1000)));
        assert_eq!(c.peer_credit(), 0);
        assert!(!c.has_rx_work());
        assert_eq!(c.desired_events(), Some(EventSet::empty()));
        // The guest consumed 600 bytes.
        c.update_peer_credit(&PacketHeader {
            buf_alloc: 1000,
            fwd_cnt: 600,
            ..Default::default()
        });
        assert!(matches!(c.next_rx(&mut buf), RxItem::Data(600)));
        // A guest lying about fwd_cnt gets no credit, not a wrapped-around one.
        c.update_peer_credit(&PacketHeader {
            buf_alloc: 10,
            fwd_cnt: 0,
            ..Default::default()
        });
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn guest_data_beyond_credit_is_refused() {
        let (mut c, _host) = established();
        // The host never reads: the socket buffer fills, then our buffer.
        let chunk = vec![1u8; 64 * 1024];
        let mut sent = 0usize;
        let err = loop {
            match c.on_guest_data(&chunk) {
                Ok(()) => sent += chunk.len(),
                Err(e) => break e,
            }
            assert!(sent < 64 << 20, "no bound on buffered bytes");
        };
        assert!(matches!(err, ConnError::CreditExceeded { .. }));
        assert!(c.tx_buf.len() <= CONN_BUF_ALLOC as usize);
    }

    #[test]
    fn host_eof_then_guest_shutdown_finishes() {
        let (mut c, host) = established();
        let _ = c.next_rx(&mut []);
        host.shutdown(Shutdown::Write).unwrap();
        c.on_host_event(EventSet::IN).unwrap();
        let mut buf = [0u8; 16];
        match c.next_rx(&mut buf) {
            RxItem::Control { op: o, flags } => {
                assert_eq!((o, flags), (op::SHUTDOWN, SHUTDOWN_SEND));
            }
            _ => panic!("expected SHUTDOWN"),
        }
        assert!(!c.should_reset());
        c.on_guest_shutdown(SHUTDOWN_SEND).unwrap();
        assert!(c.should_reset());
    }
}
