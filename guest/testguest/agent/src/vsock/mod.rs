//! vsock stream sockets, the guest's side of virtio-vsock (virtio 1.2
//! §5.10.6): the connection table, the packets each event answers with, and
//! credit-based flow control. Pure logic over packets; the driver
//! (`virtio::vsock`) moves the packets between it and the queues.
//!
//! Flow control (virtio 1.2 §5.10.6.3): every packet carries the sender's
//! `buf_alloc` (receive buffer) and `fwd_cnt` (bytes it has consumed, ever).
//! Received bytes wait in the connection's backlog (at most `BUF_ALLOC`: a
//! peer that sends beyond the credit it was given is reset) and are handed
//! to the application in small pieces while the connection's unsent output
//! is below `PENDING_LIMIT`; `fwd_cnt` counts what was handed over. So a peer
//! that sends requests faster than it reads the answers is slowed down by
//! its credit instead of filling the guest's memory. `fwd_cnt` is reported
//! with every packet sent, and by a CREDIT_UPDATE once a quarter of
//! `BUF_ALLOC` went unreported. Outgoing data waits until the peer's credit
//! (`buf_alloc - (tx_cnt - fwd_cnt)`) allows it; with data waiting and no
//! credit the agent sends one CREDIT_REQUEST.
//!
//! Memory per connection is bounded by `BUF_ALLOC` (backlog) plus
//! `PENDING_LIMIT` and what one `FEED_CHUNK` of input can produce (output),
//! plus what the application holds.

pub mod packet;

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;

use packet::{op, Header, HDR_LEN, HOST_CID, SHUTDOWN_RCV, TYPE_STREAM};

/// The receive buffer each connection advertises.
pub const BUF_ALLOC: u32 = 64 * 1024;
/// Unsent output above which a connection's input waits.
pub const PENDING_LIMIT: usize = 32 * 1024;
/// Most input bytes handed to the application at once (so that the output
/// of one piece stays small).
pub const FEED_CHUNK: usize = 512;
/// Largest payload put in one packet (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE,
/// also what the minivmm device accepts).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Most connections at a time; more requests are reset.
pub const MAX_CONNECTIONS: usize = 32;
/// First local port of connections the guest opens.
pub const EPHEMERAL_PORT_BASE: u32 = 49152;

/// What runs on the connections: the agent (see `agent`), or a test.
pub trait Application {
    /// Per-connection state.
    type Conn;
    /// The host connects to local port `port`: the new connection's state,
    /// or `None` to refuse (nothing listens there).
    fn accept(&mut self, port: u32) -> Option<Self::Conn>;
    /// A connection the guest opened was accepted: bytes to send first.
    fn connected(&mut self, conn: &mut Self::Conn, out: &mut Vec<u8>);
    /// Bytes arrived; append what to send back to `out`. Returns false to
    /// close the connection (after `out` is sent).
    fn receive(&mut self, conn: &mut Self::Conn, data: &[u8], out: &mut Vec<u8>) -> bool;
}

/// A connection's addresses (our CID is the transport's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_cid: u64,
    pub peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// We sent REQUEST and wait for RESPONSE.
    Connecting,
    Established,
}

struct Conn<C> {
    app: C,
    state: State,
    /// Bytes received and consumed, ever (wrapping).
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the peer.
    fwd_cnt_sent: u32,
    /// Payload bytes sent, ever (wrapping).
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes received, not yet handed to the application.
    backlog: VecDeque<u8>,
    /// Bytes to send, waiting for credit.
    pending: VecDeque<u8>,
    /// The peer sends no more (SHUTDOWN): reset once the backlog is served
    /// and `pending` sent.
    peer_done: bool,
    /// We close: take no more input, reset once `pending` is sent.
    closing: bool,
    /// A CREDIT_REQUEST went out since the peer last spoke.
    credit_requested: bool,
}

impl<C> Conn<C> {
    fn new(app: C, state: State) -> Self {
        Conn {
            app,
            state,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            backlog: VecDeque::new(),
            pending: VecDeque::new(),
            peer_done: false,
            closing: false,
            credit_requested: false,
        }
    }

    /// Whether nothing is left to do but reset.
    fn finished(&self) -> bool {
        self.pending.is_empty() && (self.closing || (self.peer_done && self.backlog.is_empty()))
    }

    /// Bytes the peer can take now.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }
}

/// Packets out, encoded (header and payload in one buffer).
type Outbox = VecDeque<Vec<u8>>;

/// The guest's vsock connections.
pub struct Transport<A: Application> {
    cid: u64,
    conns: BTreeMap<ConnKey, Conn<A::Conn>>,
    out: Outbox,
    next_port: u32,
}

/// One encoded packet.
pub fn encode(hdr: &Header, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(HDR_LEN + payload.len());
    p.resize(HDR_LEN, 0);
    hdr.encode(&mut p);
    p.extend_from_slice(payload);
    p
}

impl<A: Application> Transport<A> {
    /// No connections; our CID is `cid`.
    pub fn new(cid: u64) -> Self {
        Transport {
            cid,
            conns: BTreeMap::new(),
            out: VecDeque::new(),
            next_port: EPHEMERAL_PORT_BASE,
        }
    }

    /// Our CID (the device's `guest_cid`).
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// Changes our CID (read again after a transport reset).
    pub fn set_cid(&mut self, cid: u64) {
        self.cid = cid;
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// The next packet to send, if any.
    pub fn pop_packet(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    /// Puts a packet back at the front (the queue was full).
    pub fn unpop_packet(&mut self, p: Vec<u8>) {
        self.out.push_front(p);
    }

    /// Packets waiting to be sent.
    pub fn packets_waiting(&self) -> usize {
        self.out.len()
    }

    /// Opens a connection to the host's `port`; `app` is its state.
    pub fn connect(&mut self, port: u32, app: A::Conn) -> Option<ConnKey> {
        if self.conns.len() >= MAX_CONNECTIONS {
            return None;
        }
        let key = loop {
            let local_port = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(EPHEMERAL_PORT_BASE);
            let key = ConnKey {
                local_port,
                peer_cid: HOST_CID,
                peer_port: port,
            };
            if !self.conns.contains_key(&key) {
                break key;
            }
        };
        let mut conn = Conn::new(app, State::Connecting);
        send_control(&mut self.out, self.cid, &key, &mut conn, op::REQUEST);
        self.conns.insert(key, conn);
        Some(key)
    }

    /// The device was reset (snapshot restore): every connection is gone on
    /// the host side, so they are dropped here without a word.
    pub fn reset_all(&mut self) {
        self.conns.clear();
        self.out.clear();
    }

    /// Closes every connection: each is reset once what it has to send is
    /// sent; input not yet served is dropped (QuiesceForSnapshot).
    pub fn close_all(&mut self, app: &mut A) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.closing = true;
                conn.backlog.clear();
            }
            self.service(app, &key);
        }
    }

    /// Handles one packet from the device (`payload` is what followed the
    /// header in the buffer, at most `hdr.len` bytes of it are used).
    pub fn on_packet(&mut self, app: &mut A, hdr: &Header, payload: &[u8]) {
        if hdr.dst_cid != self.cid || hdr.type_ != TYPE_STREAM {
            self.reset_reply(hdr);
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_cid: hdr.src_cid,
            peer_port: hdr.src_port,
        };
        if hdr.op == op::REQUEST {
            self.on_request(app, hdr, key);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            self.reset_reply(hdr);
            return;
        };
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        conn.credit_requested = false;
        match hdr.op {
            op::RESPONSE if conn.state == State::Connecting => {
                conn.state = State::Established;
                let mut first = Vec::new();
                app.connected(&mut conn.app, &mut first);
                conn.pending.extend(first);
            }
            op::RW if conn.state == State::Established => {
                let data = &payload[..payload.len().min(hdr.len as usize)];
                if conn.backlog.len() + data.len() > BUF_ALLOC as usize {
                    // More than the credit we gave.
                    self.reset(&key);
                    return;
                }
                if !conn.closing {
                    conn.backlog.extend(data);
                }
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => {
                send_control(&mut self.out, self.cid, &key, conn, op::CREDIT_UPDATE);
            }
            op::SHUTDOWN if hdr.flags & SHUTDOWN_RCV == 0 => {
                // The peer sends no more but still reads: finish, then reset.
                conn.peer_done = true;
            }
            op::RST => {
                self.conns.remove(&key);
                return;
            }
            // SHUTDOWN of the peer's receive side, a RESPONSE or data out of
            // turn, an unknown operation: the connection is over.
            _ => {
                self.reset(&key);
                return;
            }
        }
        self.service(app, &key);
    }

    fn on_request(&mut self, app: &mut A, hdr: &Header, key: ConnKey) {
        if self.conns.contains_key(&key) {
            // A second REQUEST for a live connection: both are void.
            self.reset(&key);
            return;
        }
        let accepted = if self.conns.len() < MAX_CONNECTIONS {
            app.accept(key.local_port)
        } else {
            None
        };
        let Some(state) = accepted else {
            self.reset_reply(hdr);
            return;
        };
        let mut conn = Conn::new(state, State::Established);
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        send_control(&mut self.out, self.cid, &key, &mut conn, op::RESPONSE);
        self.conns.insert(key, conn);
    }

    /// Moves a connection along: sends what credit allows of its output,
    /// hands backlog to the application while the output is small, and
    /// repeats while that makes progress; then sends a CREDIT_REQUEST if it
    /// is stuck, a CREDIT_UPDATE if due, or its RST if it is done.
    fn service(&mut self, app: &mut A, key: &ConnKey) {
        let cid = self.cid;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.state != State::Established {
            return;
        }
        // Serve as much input as the output limit allows before sending, so
        // that replies go out in as few packets as possible.
        loop {
            while feed(app, conn) {}
            send_pending(&mut self.out, cid, key, conn);
            if !can_feed(conn) {
                break;
            }
        }
        if conn.finished() {
            self.reset(key);
            return;
        }
        if !conn.pending.is_empty() && !conn.credit_requested && conn.peer_credit() == 0 {
            conn.credit_requested = true;
            send_control(&mut self.out, cid, key, conn, op::CREDIT_REQUEST);
        }
        if conn.fwd_cnt.wrapping_sub(conn.fwd_cnt_sent) >= BUF_ALLOC / 4 {
            send_control(&mut self.out, cid, key, conn, op::CREDIT_UPDATE);
        }
    }

    /// Resets and forgets a connection.
    fn reset(&mut self, key: &ConnKey) {
        if let Some(mut conn) = self.conns.remove(key) {
            send_control(&mut self.out, self.cid, key, &mut conn, op::RST);
        }
    }

    /// Answers a packet that belongs to no connection with RST (never an RST).
    fn reset_reply(&mut self, hdr: &Header) {
        if hdr.op == op::RST {
            return;
        }
        let rst = Header {
            src_cid: hdr.dst_cid,
            dst_cid: hdr.src_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            type_: hdr.type_,
            op: op::RST,
            ..Header::default()
        };
        self.out.push_back(encode(&rst, &[]));
    }
}

/// Sends what the peer's credit allows of `conn`'s output, in packets of at
/// most `MAX_PAYLOAD`.
fn send_pending<C>(out: &mut Outbox, cid: u64, key: &ConnKey, conn: &mut Conn<C>) {
    while !conn.pending.is_empty() {
        let n = conn
            .pending
            .len()
            .min(conn.peer_credit() as usize)
            .min(MAX_PAYLOAD);
        if n == 0 {
            break;
        }
        let hdr = header(cid, key, conn, op::RW, n as u32);
        let mut p = Vec::with_capacity(HDR_LEN + n);
        p.resize(HDR_LEN, 0);
        hdr.encode(&mut p);
        p.extend(conn.pending.drain(..n));
        conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
        conn.fwd_cnt_sent = conn.fwd_cnt;
        out.push_back(p);
    }
}

/// Whether `conn` has input to serve and room for the output.
fn can_feed<C>(conn: &Conn<C>) -> bool {
    !conn.closing && !conn.backlog.is_empty() && conn.pending.len() < PENDING_LIMIT
}

/// Hands up to `FEED_CHUNK` bytes of `conn`'s backlog to the application if
/// its output is below `PENDING_LIMIT`. Returns whether it did.
fn feed<A: Application>(app: &mut A, conn: &mut Conn<A::Conn>) -> bool {
    if !can_feed(conn) {
        return false;
    }
    let mut chunk = [0u8; FEED_CHUNK];
    let n = conn.backlog.len().min(FEED_CHUNK);
    for (dst, src) in chunk.iter_mut().zip(conn.backlog.drain(..n)) {
        *dst = src;
    }
    conn.fwd_cnt = conn.fwd_cnt.wrapping_add(n as u32);
    let mut reply = Vec::new();
    if !app.receive(&mut conn.app, &chunk[..n], &mut reply) {
        conn.closing = true;
        conn.backlog.clear();
    }
    conn.pending.extend(reply);
    true
}

/// Our header for a packet on `conn`.
fn header<C>(cid: u64, key: &ConnKey, conn: &Conn<C>, op: u16, len: u32) -> Header {
    Header {
        src_cid: cid,
        dst_cid: key.peer_cid,
        src_port: key.local_port,
        dst_port: key.peer_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: conn.fwd_cnt,
    }
}

/// Queues a packet without payload (its header reports our credit).
fn send_control<C>(out: &mut Outbox, cid: u64, key: &ConnKey, conn: &mut Conn<C>, op: u16) {
    let hdr = header(cid, key, conn, op, 0);
    conn.fwd_cnt_sent = conn.fwd_cnt;
    out.push_back(encode(&hdr, &[]));
}

#[cfg(test)]
mod tests;
