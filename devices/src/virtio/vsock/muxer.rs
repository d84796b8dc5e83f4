//! The host side of hybrid vsock (the Firecracker / Cloud Hypervisor
//! convention): a unix listener at the VM's socket path for host-initiated
//! connections (`CONNECT <port>\n` -> `OK <host port>\n`), unix sockets at
//! `<path>_<port>` for guest-initiated ones, and the table of connections
//! between them. All host fds sit in one epoll set of our own, which the
//! device registers with the event loop as a single fd.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{ConnState, ConnectLine, Connection, RxItem};
use super::packet::{op, PacketHeader, HOST_CID, TYPE_STREAM};

/// Most simultaneous connections (including host clients that have not sent
/// their `CONNECT` line yet); more are refused.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host-initiated connections into the guest at once. Beyond it, the
/// least recently active one is reset to make room, so idle host clients can
/// never fill the guest's listeners (the test guest's agent takes 32) and
/// lock the agent out.
pub const MAX_HOST_CONNECTIONS: usize = 16;
/// First host-side port given to host-initiated connections.
pub const HOST_PORT_BASE: u32 = 1 << 30;
/// Most RSTs for unknown connections waiting for a guest rx buffer; beyond
/// that they are dropped (the guest is not reading its rx queue anyway).
const RST_QUEUE_MAX: usize = 256;
const ACCEPTS_PER_EVENT: usize = 32;
const EVENTS_PER_WAIT: usize = 64;
const TOKEN_LISTENER: u64 = 0;
const TOKEN_TIMER: u64 = 1;
const FIRST_CONN_TOKEN: u64 = 2;
const TIMER_PERIOD: Duration = Duration::from_millis(500);

/// The connection table and host sockets of one vsock device.
pub(super) struct Muxer {
    vm_id: String,
    guest_cid: u64,
    uds_path: PathBuf,
    /// (device, inode) of the socket we bound: only that file is ours to unlink.
    socket_identity: (u64, u64),
    listener: UnixListener,
    listening: bool,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    conns: HashMap<u64, Connection>,
    /// (our port, guest port) -> connection token.
    by_ports: HashMap<(u32, u32), u64>,
    next_token: u64,
    next_host_port: u32,
    /// Connections with a packet for the guest, in service order.
    rx_queue: VecDeque<u64>,
    /// RSTs owed for packets that match no connection.
    rst_queue: VecDeque<PacketHeader>,
}

impl Muxer {
    /// Bind the listener at `uds_path`. A stale socket there (nobody
    /// listening) is replaced; a live one, or anything that is not a socket,
    /// is refused with `AddrInUse`, never unlinked. Nothing is left bound on error.
    pub fn new(vm_id: &str, guest_cid: u64, uds_path: &Path) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let timer = TimerFd::new()?;
        set_nonblocking(timer.as_raw_fd())?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_TIMER),
        )?;
        let listener = bind_unless_live(uds_path)?;
        let identity = match listener
            .set_nonblocking(true)
            .and_then(|()| std::fs::symlink_metadata(uds_path))
        {
            Ok(m) => (m.dev(), m.ino()),
            Err(e) => {
                let _ = std::fs::remove_file(uds_path);
                return Err(e);
            }
        };
        Ok(Muxer {
            vm_id: vm_id.to_owned(),
            guest_cid,
            uds_path: uds_path.to_owned(),
            socket_identity: identity,
            listener,
            listening: false,
            epoll,
            timer,
            timer_armed: false,
            conns: HashMap::new(),
            by_ports: HashMap::new(),
            next_token: FIRST_CONN_TOKEN,
            next_host_port: HOST_PORT_BASE,
            rx_queue: VecDeque::new(),
            rst_queue: VecDeque::new(),
        })
    }

    /// The epoll fd to watch for host-side activity.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Start accepting host clients (device activated).
    pub fn start(&mut self) -> io::Result<()> {
        if !self.listening {
            self.epoll.ctl(
                ControlOperation::Add,
                self.listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
            )?;
            self.listening = true;
        }
        Ok(())
    }

    /// Stop accepting and drop every connection (device reset). Host
    /// clients waiting in the listener's backlog stay there.
    pub fn stop(&mut self) {
        self.drop_connections();
        if self.listening {
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Delete,
                self.listener.as_raw_fd(),
                EpollEvent::default(),
            ) {
                tracing::warn!(vm = %self.vm_id, "vsock: unregistering the listener: {e}");
            }
            self.listening = false;
        }
    }

    /// Drop every connection without telling the guest (it is told by a
    /// transport reset event, or is being reset itself).
    pub fn drop_connections(&mut self) {
        let tokens: Vec<u64> = self.conns.keys().copied().collect();
        for t in tokens {
            self.remove(t);
        }
        self.rx_queue.clear();
        self.rst_queue.clear();
        self.sync();
    }

    /// Handle whatever the host side has ready (without blocking).
    pub fn handle_host_events(&mut self) {
        let mut events = [EpollEvent::default(); EVENTS_PER_WAIT];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::warn!(vm = %self.vm_id, "vsock: epoll wait: {e}");
                }
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_LISTENER => self.accept_clients(),
                TOKEN_TIMER => self.expire_connections(),
                token => self.host_event(token, ev.event_set()),
            }
        }
        self.sync();
    }

    fn accept_clients(&mut self) {
        for _ in 0..ACCEPTS_PER_EVENT {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() >= MAX_CONNECTIONS {
                        crate::warn_limited!(vm = %self.vm_id, "vsock: {MAX_CONNECTIONS} connections open; refusing a host client");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!(vm = %self.vm_id, "vsock: host client: {e}");
                        continue;
                    }
                    let token = self.new_token();
                    self.conns.insert(token, Connection::accepted(stream));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(vm = %self.vm_id, "vsock: accept: {e}");
                    break;
                }
            }
        }
    }

    fn host_event(&mut self, token: u64, events: EventSet) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if matches!(conn.state, ConnState::AwaitingConnect { .. }) {
            match conn.read_connect_line() {
                ConnectLine::Pending => {}
                ConnectLine::Invalid => {
                    tracing::debug!(vm = %self.vm_id, "vsock: host client sent no valid CONNECT line");
                    self.remove(token);
                }
                ConnectLine::Port(peer_port) => match self.alloc_host_port(peer_port) {
                    Some(local_port) => {
                        self.make_room_for_host_connection();
                        if let Some(conn) = self.conns.get_mut(&token) {
                            conn.start_host_initiated(local_port, peer_port);
                            self.by_ports.insert((local_port, peer_port), token);
                        }
                    }
                    None => {
                        tracing::warn!(vm = %self.vm_id, "vsock: no free host port");
                        self.remove(token);
                    }
                },
            }
            return;
        }
        conn.last_active = Instant::now();
        if let Err(e) = conn.on_host_event(events) {
            tracing::debug!(vm = %self.vm_id, "vsock: connection {}:{}: {e}", conn.local_port, conn.peer_port);
            self.reset(token);
        }
    }

    /// Handle one packet the guest sent on the tx queue.
    pub fn handle_guest_packet(&mut self, hdr: &PacketHeader, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid {
            tracing::debug!(vm = %self.vm_id, "vsock: packet from CID {} dropped", hdr.src_cid);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        let token = self.by_ports.get(&key).copied();
        if hdr.op == op::RST {
            if let Some(t) = token {
                self.remove(t);
            }
            return;
        }
        let valid = hdr.dst_cid == HOST_CID
            && hdr.type_ == TYPE_STREAM
            && (op::REQUEST..=op::CREDIT_REQUEST).contains(&hdr.op)
            && (hdr.op == op::RW || hdr.len == 0);
        if !valid {
            tracing::debug!(vm = %self.vm_id, "vsock: malformed packet {hdr:?}");
            self.reject_packet(hdr);
            return;
        }
        let Some(token) = token else {
            if hdr.op == op::REQUEST {
                self.guest_connect(hdr);
            } else {
                self.reject_packet(hdr);
            }
            return;
        };
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        conn.last_active = Instant::now();
        conn.update_peer_credit(hdr);
        let result = match hdr.op {
            op::RESPONSE if conn.state == ConnState::LocalInit => {
                conn.on_response();
                conn.flush().map_err(super::connection::ConnError::Host)
            }
            op::SHUTDOWN if conn.state == ConnState::Established => {
                conn.on_guest_shutdown(hdr.flags)
            }
            op::RW => conn.on_guest_data(payload),
            op::CREDIT_UPDATE => Ok(()),
            op::CREDIT_REQUEST => {
                conn.on_credit_request();
                Ok(())
            }
            // A second REQUEST or an out-of-place RESPONSE/SHUTDOWN.
            _ => Err(super::connection::ConnError::UnexpectedData),
        };
        if let Err(e) = result {
            tracing::debug!(vm = %self.vm_id, "vsock: connection {}:{} op {}: {e}", hdr.dst_port, hdr.src_port, hdr.op);
            self.reset(token);
        }
    }

    /// Keep host-initiated connections under [`MAX_HOST_CONNECTIONS`] before
    /// another one starts: reset the least recently active (the guest gets an
    /// RST ahead of the new REQUEST and frees its slot).
    fn make_room_for_host_connection(&mut self) {
        let open: Vec<(u64, Instant)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.host_initiated)
            .map(|(&t, c)| (t, c.last_active))
            .collect();
        if open.len() < MAX_HOST_CONNECTIONS {
            return;
        }
        let mut by_age = open;
        by_age.sort_by_key(|&(t, at)| (at, t));
        let excess = by_age.len() + 1 - MAX_HOST_CONNECTIONS;
        for &(token, _) in by_age.iter().take(excess) {
            crate::warn_limited!(vm = %self.vm_id, "vsock: {MAX_HOST_CONNECTIONS} host connections open; resetting the idlest");
            self.reset(token);
        }
    }

    /// Answer a packet that cannot be handled with RST (never an RST with an
    /// RST), resetting its connection if it has one.
    pub fn reject_packet(&mut self, hdr: &PacketHeader) {
        if hdr.src_cid != self.guest_cid {
            return;
        }
        if let Some(&t) = self.by_ports.get(&(hdr.dst_port, hdr.src_port)) {
            if hdr.op == op::RST {
                self.remove(t);
            } else {
                self.reset(t);
            }
            return;
        }
        if hdr.op == op::RST {
            return;
        }
        if self.rst_queue.len() >= RST_QUEUE_MAX {
            tracing::debug!(vm = %self.vm_id, "vsock: RST queue full; dropping a reset");
            return;
        }
        self.rst_queue.push_back(hdr.reset_reply());
    }

    /// The guest asked to connect to host port `hdr.dst_port`.
    fn guest_connect(&mut self, hdr: &PacketHeader) {
        if self.conns.len() >= MAX_CONNECTIONS {
            crate::warn_limited!(vm = %self.vm_id, "vsock: {MAX_CONNECTIONS} connections open; refusing the guest");
            self.reject_packet(hdr);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", hdr.dst_port));
        match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => {
                let token = self.new_token();
                self.conns
                    .insert(token, Connection::guest_initiated(stream, hdr));
                self.by_ports.insert((hdr.dst_port, hdr.src_port), token);
            }
            Err(e) => {
                tracing::debug!(vm = %self.vm_id, "vsock: guest connect to {}: {e}", Path::new(&path).display());
                self.reject_packet(hdr);
            }
        }
    }

    /// Whether a packet is (probably) waiting for a guest rx buffer.
    pub fn has_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rx_queue.is_empty()
    }

    /// The next packet for the guest, its RW payload read into `buf`
    /// (whose length bounds it). None if nothing is ready after all.
    pub fn next_rx_packet(&mut self, buf: &mut [u8]) -> Option<(PacketHeader, usize)> {
        if let Some(h) = self.rst_queue.pop_front() {
            return Some((h, 0));
        }
        while let Some(token) = self.rx_queue.pop_front() {
            let Some(conn) = self.conns.get_mut(&token) else {
                continue;
            };
            conn.in_rx_queue = false;
            let (op, flags, len) = match conn.next_rx(buf) {
                RxItem::Control { op, flags } => (op, flags, 0),
                RxItem::Data(n) => (op::RW, 0, n),
                RxItem::Nothing => continue,
                RxItem::Fatal => {
                    let h = self.conn_header(token, op::RST, 0, 0);
                    self.remove(token);
                    return h.map(|h| (h, 0));
                }
            };
            let h = self.conn_header(token, op, flags, len);
            if let Some(conn) = self.conns.get_mut(&token) {
                if conn.has_rx_work() {
                    conn.in_rx_queue = true;
                    self.rx_queue.push_back(token);
                }
            }
            return h.map(|h| (h, len));
        }
        None
    }

    fn conn_header(&mut self, token: u64, op: u16, flags: u32, len: usize) -> Option<PacketHeader> {
        let guest_cid = self.guest_cid;
        let conn = self.conns.get_mut(&token)?;
        let (buf_alloc, fwd_cnt) = conn.credit_fields();
        Some(PacketHeader {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: conn.local_port,
            dst_port: conn.peer_port,
            len: len as u32,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        })
    }

    /// Reconcile every connection after changes: drop finished ones, update
    /// epoll interest, queue those with packets for the guest, and arm the
    /// timeout timer while any connection waits on the other side.
    pub fn sync(&mut self) {
        let now = Instant::now();
        let mut to_reset = Vec::new();
        for (&token, conn) in self.conns.iter_mut() {
            if conn.should_reset() {
                to_reset.push(token);
                continue;
            }
            let want = conn.desired_events();
            if want != conn.registered {
                let fd = conn.stream.as_raw_fd();
                let r = match (conn.registered, want) {
                    (None, Some(ev)) => {
                        self.epoll
                            .ctl(ControlOperation::Add, fd, EpollEvent::new(ev, token))
                    }
                    (Some(_), Some(ev)) => {
                        self.epoll
                            .ctl(ControlOperation::Modify, fd, EpollEvent::new(ev, token))
                    }
                    (Some(_), None) => {
                        self.epoll
                            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
                    }
                    (None, None) => Ok(()),
                };
                if let Err(e) = r {
                    tracing::warn!(vm = %self.vm_id, "vsock: epoll update: {e}");
                    to_reset.push(token);
                    continue;
                }
                conn.registered = want;
            }
            if !conn.in_rx_queue && conn.has_rx_work() {
                conn.in_rx_queue = true;
                self.rx_queue.push_back(token);
            }
            conn.refresh_deadline(now);
        }
        for token in to_reset {
            self.reset(token);
        }
        let waiting = self.conns.values().any(|c| c.deadline.is_some());
        if waiting != self.timer_armed {
            let r = if waiting {
                self.timer.reset(TIMER_PERIOD, Some(TIMER_PERIOD))
            } else {
                self.timer.clear()
            };
            match r {
                Ok(()) => self.timer_armed = waiting,
                Err(e) => tracing::warn!(vm = %self.vm_id, "vsock: timer: {e}"),
            }
        }
    }

    fn expire_connections(&mut self) {
        // Non-blocking: a stale readiness just reads nothing.
        let _ = self.timer.wait();
        let now = Instant::now();
        let expired: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(&t, _)| t)
            .collect();
        for token in expired {
            tracing::debug!(vm = %self.vm_id, "vsock: connection timed out");
            self.reset(token);
        }
    }

    /// Drop a connection and, if the guest knows it, owe the guest an RST.
    fn reset(&mut self, token: u64) {
        let Some(conn) = self.remove(token) else {
            return;
        };
        if matches!(conn.state, ConnState::AwaitingConnect { .. }) {
            return;
        }
        if self.rst_queue.len() < RST_QUEUE_MAX {
            self.rst_queue.push_back(PacketHeader {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: conn.local_port,
                dst_port: conn.peer_port,
                type_: TYPE_STREAM,
                op: op::RST,
                ..Default::default()
            });
        }
    }

    /// Forget a connection (closing its host stream).
    fn remove(&mut self, token: u64) -> Option<Connection> {
        let conn = self.conns.remove(&token)?;
        let key = (conn.local_port, conn.peer_port);
        if self.by_ports.get(&key) == Some(&token) {
            self.by_ports.remove(&key);
        }
        if conn.registered.is_some() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        Some(conn)
    }

    fn new_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    /// A host port in `[HOST_PORT_BASE, u32::MAX]` not in use towards `peer_port`.
    fn alloc_host_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_host_port;
            self.next_host_port = port.checked_add(1).unwrap_or(HOST_PORT_BASE);
            if !self.by_ports.contains_key(&(port, peer_port)) {
                return Some(port);
            }
        }
        None
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // Do not leave our dead socket behind, but never unlink a socket
        // someone else has bound at the path since.
        if let Ok(m) = std::fs::symlink_metadata(&self.uds_path) {
            if (m.dev(), m.ino()) == self.socket_identity {
                let _ = std::fs::remove_file(&self.uds_path);
            }
        }
    }
}

/// Bind a listener at `path`; replace a stale socket (connecting to it is
/// refused), refuse a live one or a non-socket with `AddrInUse`.
fn bind_unless_live(path: &Path) -> io::Result<UnixListener> {
    match UnixListener::bind(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let meta = std::fs::symlink_metadata(path)?;
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "the path exists and is not a socket",
                ));
            }
            match UnixStream::connect(path) {
                Ok(_) => Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is listening on this socket",
                )),
                Err(c) if c.kind() == io::ErrorKind::ConnectionRefused => {
                    // Left by a process that is gone: ours to replace.
                    std::fs::remove_file(path)?;
                    UnixListener::bind(path)
                }
                Err(_) => Err(e),
            }
        }
        other => other,
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Connect to a unix socket without blocking: a listener with a full backlog
/// gives `WouldBlock` instead of stalling the event loop.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // Keep a terminating NUL.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns; the stream closes it.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid sockaddr_un and the length is its size.
    let r = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}
