//! vsock with a simulated guest driver on the queues (through a real event
//! loop thread) and real host unix sockets.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vmm_sys_util::tempdir::TempDir;

use super::packet::{
    op, PacketHeader, HDR_LEN, HOST_CID, SHUTDOWN_BOTH, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::*;
use crate::bus::BusDevice;
use crate::virtio::test_utils::{Desc, TestGuest, DEADLINE};

const CID: u64 = 3;
const GUEST_BUF_ALLOC: u32 = 64 * 1024;
const RX_BUF_LEN: u32 = 4096;
const RX_BUFS: u64 = 64;
const TX_AREA: u64 = 128;

/// The guest side: rx buffers kept posted, packets sent synchronously.
struct VsockGuest {
    g: TestGuest,
    dev: Arc<Mutex<Vsock>>,
    path: PathBuf,
    _dir: TempDir,
    rx_bufs: HashMap<u32, u64>,
    rx_pending: VecDeque<(u32, u32)>,
    next_rx: u64,
    next_tx: u64,
    /// Bytes the guest "application" consumed, advertised in every header.
    fwd_cnt: u32,
}

impl VsockGuest {
    fn new() -> Self {
        let dir = TempDir::new_with_prefix("/tmp/minivmm-vsock-").unwrap();
        let path = dir.as_path().join("v.sock");
        let dev = Arc::new(Mutex::new(Vsock::new("test", CID, &path).unwrap()));
        let mut g = TestGuest::new(dev.clone(), dev.clone());
        g.init_driver(&[VSOCK_QUEUE_SIZE; 3]).unwrap();
        let mut v = VsockGuest {
            g,
            dev,
            path,
            _dir: dir,
            rx_bufs: HashMap::new(),
            rx_pending: VecDeque::new(),
            next_rx: 0,
            next_tx: 0,
            fwd_cnt: 0,
        };
        for _ in 0..RX_BUFS {
            v.post_rx();
        }
        v.g.kick(RX_QUEUE as u16);
        v
    }

    fn post_rx(&mut self) {
        let addr = self.g.buf(self.next_rx % RX_BUFS);
        self.next_rx += 1;
        let head = self.g.add_chain(RX_QUEUE, &[Desc::w(addr, RX_BUF_LEN)]);
        self.rx_bufs.insert(u32::from(head), addr);
    }

    fn hdr(&self, op: u16, src_port: u32, dst_port: u32, len: u32) -> PacketHeader {
        PacketHeader {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    fn tx_addr(&mut self) -> u64 {
        let addr = self.g.buf(TX_AREA + self.next_tx % 32);
        self.next_tx += 1;
        addr
    }

    /// Queue `descs` on tx and wait until the device has consumed them.
    fn send_chain(&mut self, descs: &[Desc]) {
        let head = self.g.add_chain(TX_QUEUE, descs);
        self.g.kick(TX_QUEUE as u16);
        let used = self.g.wait_used(TX_QUEUE, 1, DEADLINE);
        assert_eq!(used, vec![(u32::from(head), 0)]);
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        let addr = self.tx_addr();
        self.g.write_mem(addr, bytes);
        self.send_chain(&[Desc::r(addr, bytes.len() as u32)]);
    }

    fn send(&mut self, hdr: PacketHeader, payload: &[u8]) {
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        self.send_raw(&bytes);
    }

    /// The next packet the device put on rx (the buffer is re-posted).
    fn recv(&mut self) -> (PacketHeader, Vec<u8>) {
        if self.rx_pending.is_empty() {
            let used = self.g.wait_used(RX_QUEUE, 1, DEADLINE);
            self.rx_pending.extend(used);
        }
        let (head, len) = self.rx_pending.pop_front().unwrap();
        let addr = self.rx_bufs.remove(&head).expect("unknown rx buffer");
        let mut bytes = vec![0u8; len as usize];
        self.g.read_mem(addr, &mut bytes);
        assert!(bytes.len() >= HDR_LEN, "rx packet of {len} bytes");
        let hdr = PacketHeader::from_bytes(bytes[..HDR_LEN].try_into().unwrap());
        assert_eq!(hdr.len as usize, bytes.len() - HDR_LEN);
        self.post_rx();
        self.g.kick(RX_QUEUE as u16);
        (hdr, bytes.split_off(HDR_LEN))
    }

    fn expect_rst(&mut self, src_port: u32, dst_port: u32) {
        let (h, _) = self.recv();
        assert_eq!(
            (h.op, h.src_cid, h.dst_cid, h.src_port, h.dst_port),
            (op::RST, HOST_CID, CID, src_port, dst_port),
            "{h:?}"
        );
    }

    fn host_client(&self) -> UnixStream {
        let s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s
    }

    /// Host connects to guest port `port`, the guest accepts: (stream, host port).
    fn establish_host(&mut self, port: u32) -> (UnixStream, u32) {
        let mut host = self.host_client();
        host.write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        let (h, _) = self.recv();
        assert_eq!(
            (h.op, h.src_cid, h.dst_cid, h.dst_port, h.type_),
            (op::REQUEST, HOST_CID, CID, port, TYPE_STREAM)
        );
        assert!(h.src_port >= HOST_PORT_BASE);
        assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);
        self.send(self.hdr(op::RESPONSE, port, h.src_port, 0), &[]);
        assert_eq!(read_line(&mut host), format!("OK {}", h.src_port));
        (host, h.src_port)
    }

    fn connections(&self) -> usize {
        self.dev.lock().unwrap().connection_count()
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8];
    loop {
        s.read_exact(&mut b).unwrap();
        if b[0] == b'\n' {
            return String::from_utf8(line).unwrap();
        }
        line.push(b[0]);
    }
}

/// Read until EOF (with the stream's read timeout as deadline).
fn read_to_eof(s: &mut UnixStream) -> Vec<u8> {
    let mut all = Vec::new();
    s.read_to_end(&mut all).expect("no EOF before the deadline");
    all
}

/// Wait until the device closed `s`: EOF, or a reset if it closed with our
/// bytes still unread (a timeout fails).
fn assert_closed(s: &mut UnixStream) {
    let mut sink = Vec::new();
    match s.read_to_end(&mut sink) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("host stream not closed: {e}"),
    }
}

#[test]
fn config_space_holds_the_guest_cid() {
    let v = VsockGuest::new();
    let mut g = v.g;
    let mut cid = [0u8; 8];
    g.transport.read(0x100, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), CID);
    let mut hi = [0xffu8; 4];
    g.transport.read(0x104, &mut hi);
    assert_eq!(hi, [0; 4]);
    let mut past = [0u8; 4];
    g.transport.read(0x106, &mut past);
    assert_eq!(
        past, [0; 4],
        "read crossing the end of config space is ignored"
    );
    g.transport.write(0x100, &[9; 8]);
    g.transport.read(0x100, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), CID);
    assert!(matches!(
        Vsock::new("test", 2, std::path::Path::new("/nonexistent/x")),
        Err(VsockError::InvalidCid(2))
    ));
}

#[test]
fn host_initiated_connection_carries_data_both_ways_under_credit() {
    let mut v = VsockGuest::new();
    let (mut host, hp) = v.establish_host(1024);

    host.write_all(b"hello").unwrap();
    let (h, data) = v.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RW, hp, 1024));
    assert_eq!(data, b"hello");
    v.fwd_cnt = 5;
    v.send(v.hdr(op::RW, 1024, hp, 5), b"world");
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"world");

    // 200 000 bytes from the host: the device stops at the guest's credit.
    const BIG: usize = 200_000;
    let mut writer_end = host.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let big: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
        writer_end.write_all(&big).unwrap();
    });
    let mut got = Vec::new();
    while got.len() < GUEST_BUF_ALLOC as usize {
        let (h, data) = v.recv();
        assert_eq!(h.op, op::RW);
        got.extend(data);
        assert!(got.len() <= GUEST_BUF_ALLOC as usize, "credit exceeded");
    }
    // With no credit left, the next packet can only be the credit update.
    v.send(v.hdr(op::CREDIT_REQUEST, 1024, hp, 0), &[]);
    let (h, _) = v.recv();
    assert_eq!(h.op, op::CREDIT_UPDATE);
    assert_eq!((h.buf_alloc, h.fwd_cnt), (CONN_BUF_ALLOC, 5));
    // The guest consumes as it goes and says so.
    while got.len() < BIG {
        v.fwd_cnt = 5 + got.len() as u32;
        v.send(v.hdr(op::CREDIT_UPDATE, 1024, hp, 0), &[]);
        let (h, data) = v.recv();
        assert_eq!(h.op, op::RW);
        got.extend(data);
    }
    writer.join().unwrap();
    assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));

    // Clean close from the guest: SHUTDOWN both, the device answers RST.
    let mut shut = v.hdr(op::SHUTDOWN, 1024, hp, 0);
    shut.flags = SHUTDOWN_BOTH;
    v.send(shut, &[]);
    v.expect_rst(hp, 1024);
    assert!(read_to_eof(&mut host).is_empty());
    assert_eq!(v.connections(), 0);
}

#[test]
fn guest_initiated_connection_and_refusal() {
    let mut v = VsockGuest::new();
    let mut port_path = v.path.clone().into_os_string();
    port_path.push("_5000");
    let listener = UnixListener::bind(&port_path).unwrap();

    v.send(v.hdr(op::REQUEST, 7000, 5000, 0), &[]);
    let (h, _) = v.recv();
    assert_eq!(
        (h.op, h.src_cid, h.dst_cid, h.src_port, h.dst_port),
        (op::RESPONSE, HOST_CID, CID, 5000, 7000)
    );
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    v.send(v.hdr(op::RW, 7000, 5000, 4), b"ping");
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    s.write_all(b"pong").unwrap();
    let (h, data) = v.recv();
    assert_eq!((h.op, data.as_slice()), (op::RW, &b"pong"[..]));

    // The host closes: the guest is told no more data will come.
    drop(s);
    let mut flags = 0;
    while flags != SHUTDOWN_BOTH {
        let (h, _) = v.recv();
        assert_eq!(h.op, op::SHUTDOWN);
        assert_ne!(h.flags & SHUTDOWN_SEND, 0);
        flags = h.flags;
    }
    v.send(v.hdr(op::RST, 7000, 5000, 0), &[]);
    assert_eq!(v.connections(), 0);

    // Nothing listens on 5001.
    v.send(v.hdr(op::REQUEST, 7001, 5001, 0), &[]);
    v.expect_rst(5001, 7001);
    // A duplicate REQUEST resets the connection it collides with.
    v.send(v.hdr(op::REQUEST, 7002, 5000, 0), &[]);
    assert_eq!(v.recv().0.op, op::RESPONSE);
    v.send(v.hdr(op::REQUEST, 7002, 5000, 0), &[]);
    v.expect_rst(5000, 7002);
    assert_eq!(v.connections(), 0);
}

#[test]
fn malformed_packets_get_rst_or_are_ignored() {
    let mut v = VsockGuest::new();
    // Unknown connection.
    v.send(v.hdr(op::RW, 1, 2, 3), b"abc");
    v.expect_rst(2, 1);
    v.send(v.hdr(op::CREDIT_UPDATE, 1, 2, 0), &[]);
    v.expect_rst(2, 1);
    // Bad ops, bad type, wrong destination CID.
    for bad_op in [0, 8, 99, u16::MAX] {
        v.send(v.hdr(bad_op, 10, 11, 0), &[]);
        v.expect_rst(11, 10);
    }
    let mut h = v.hdr(op::REQUEST, 12, 13, 0);
    h.type_ = 2;
    v.send(h, &[]);
    v.expect_rst(13, 12);
    let mut h = v.hdr(op::REQUEST, 14, 15, 0);
    h.dst_cid = 7;
    v.send(h, &[]);
    let (r, _) = v.recv();
    assert_eq!(
        (r.op, r.src_cid, r.src_port, r.dst_port),
        (op::RST, 7, 15, 14)
    );
    // Length beyond the chain, beyond the maximum, and payload on control ops.
    v.send(v.hdr(op::RW, 16, 17, 100), &[0; 10]);
    v.expect_rst(17, 16);
    let huge = vec![0u8; MAX_PKT_PAYLOAD + 1];
    v.send(v.hdr(op::RW, 18, 19, huge.len() as u32), &huge);
    v.expect_rst(19, 18);
    v.send(v.hdr(op::REQUEST, 20, 21, 4), b"junk");
    v.expect_rst(21, 20);

    // Ignored: a header shorter than 44 bytes, an RST for nothing, a packet
    // from another CID, a chain outside guest RAM, an empty chain. Each is
    // followed by a packet that does get an RST, which must come next.
    let probe = |v: &mut VsockGuest, port: u32| {
        v.send(v.hdr(op::RW, port, port + 1, 0), &[]);
        v.expect_rst(port + 1, port);
    };
    v.send_raw(&[0u8; 20]);
    probe(&mut v, 30);
    v.send(v.hdr(op::RST, 40, 41, 0), &[]);
    probe(&mut v, 32);
    let mut h = v.hdr(op::RW, 42, 43, 0);
    h.src_cid = 99;
    v.send(h, &[]);
    probe(&mut v, 34);
    v.send_chain(&[Desc::r(1 << 40, 44)]);
    probe(&mut v, 36);
    v.send_chain(&[Desc::r(v.g.buf(TX_AREA), 0)]);
    probe(&mut v, 38);
    // Header split over descriptors is fine.
    let addr = v.tx_addr();
    let h = v.hdr(op::RW, 50, 51, 2).to_bytes();
    v.g.write_mem(addr, &h);
    v.g.write_mem(addr + 0x100, b"xy");
    v.send_chain(&[
        Desc::r(addr, 20),
        Desc::r(addr + 20, 24),
        Desc::r(addr + 0x100, 2),
    ]);
    v.expect_rst(51, 50);
    assert_eq!(v.connections(), 0);
}

#[test]
fn bad_packets_on_a_connection_reset_it() {
    let mut v = VsockGuest::new();
    let (mut host, hp) = v.establish_host(1024);
    v.send(v.hdr(op::RW, 1024, hp, 100), &[0; 10]);
    v.expect_rst(hp, 1024);
    assert!(read_to_eof(&mut host).is_empty());

    let (mut host, hp) = v.establish_host(1024);
    v.send(v.hdr(op::RESPONSE, 1024, hp, 0), &[]);
    v.expect_rst(hp, 1024);
    assert!(read_to_eof(&mut host).is_empty());
    assert_eq!(v.connections(), 0);
}

#[test]
fn guest_exceeding_its_credit_is_reset_not_buffered() {
    let mut v = VsockGuest::new();
    let (mut host, hp) = v.establish_host(1024);
    // The host never reads; the guest ignores the credit it was given.
    let chunk = vec![7u8; MAX_PKT_PAYLOAD];
    let limit = 4 * CONN_BUF_ALLOC as usize;
    let mut sent = 0;
    while sent < limit {
        v.send(v.hdr(op::RW, 1024, hp, chunk.len() as u32), &chunk);
        sent += chunk.len();
        if v.connections() == 0 {
            break;
        }
    }
    assert_eq!(
        v.connections(),
        0,
        "connection survived {sent} unread bytes"
    );
    // Credit updates for what the host did take may come first.
    loop {
        let (h, _) = v.recv();
        if h.op == op::RST {
            assert_eq!(h.src_port, hp);
            break;
        }
        assert_eq!(h.op, op::CREDIT_UPDATE);
    }
    let delivered = read_to_eof(&mut host);
    assert!(delivered.len() < sent);
}

#[test]
fn host_clients_without_a_valid_connect_line_are_closed() {
    let v = VsockGuest::new();
    let mut a = v.host_client();
    a.write_all(b"HELLO 1024\n").unwrap();
    assert_closed(&mut a);
    let mut b = v.host_client();
    b.write_all(&[b'9'; 64]).unwrap();
    assert_closed(&mut b);
    let mut c = v.host_client();
    c.write_all(b"CONNECT 99999999999\n").unwrap();
    assert_closed(&mut c);
    assert_eq!(v.connections(), 0);
}

#[test]
fn unanswered_request_times_out() {
    let mut v = VsockGuest::new();
    let mut host = v.host_client();
    host.write_all(b"CONNECT 77\n").unwrap();
    let (h, _) = v.recv();
    assert_eq!(h.op, op::REQUEST);
    // The guest never answers: after CONN_TIMEOUT the host is closed and
    // the guest told.
    assert!(read_to_eof(&mut host).is_empty());
    v.expect_rst(h.src_port, 77);
    assert_eq!(v.connections(), 0);
}

#[test]
fn transport_reset_event_drops_connections() {
    let mut v = VsockGuest::new();
    let (mut host, _) = v.establish_host(1024);
    // Requested before the guest has an event buffer: delivered once it has.
    v.dev.lock().unwrap().send_transport_reset();
    assert!(read_to_eof(&mut host).is_empty());
    assert_eq!(v.connections(), 0);
    let ev = v.g.buf(200);
    v.g.write_mem(ev, &[0xff; 8]);
    let head = v.g.add_chain(EVENT_QUEUE, &[Desc::w(ev, 8)]);
    v.g.kick(EVENT_QUEUE as u16);
    assert_eq!(
        v.g.wait_used(EVENT_QUEUE, 1, DEADLINE),
        vec![(u32::from(head), 4)]
    );
    let mut id = [0u8; 4];
    v.g.read_mem(ev, &mut id);
    assert_eq!(
        u32::from_le_bytes(id),
        0,
        "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET"
    );
    // Until the driver re-posts an event buffer (it has handled the reset)
    // nothing goes on rx: a connection it accepted first would be reset.
    assert!(!v.dev.lock().unwrap().reset_acknowledged());
    // With a buffer already posted it is delivered at once; a too-small
    // buffer is returned empty.
    let small = v.g.add_chain(EVENT_QUEUE, &[Desc::w(ev, 2)]);
    let good = v.g.add_chain(EVENT_QUEUE, &[Desc::w(ev, 4)]);
    assert!(v.dev.lock().unwrap().reset_acknowledged());
    v.dev.lock().unwrap().send_transport_reset();
    assert_eq!(
        v.g.wait_used(EVENT_QUEUE, 2, DEADLINE),
        vec![(u32::from(small), 0), (u32::from(good), 4)]
    );
    assert!(!v.dev.lock().unwrap().reset_acknowledged());
    // A host client arriving now waits; the driver re-posts the event
    // buffer (as Linux does after handling the event) and it is served.
    let mut host = v.host_client();
    host.write_all(b"CONNECT 1024\n").unwrap();
    v.g.add_chain(EVENT_QUEUE, &[Desc::w(ev, 4)]);
    v.g.kick(EVENT_QUEUE as u16);
    let (h, _) = v.recv();
    assert_eq!((h.op, h.dst_port), (op::REQUEST, 1024));
    v.send(v.hdr(op::RESPONSE, 1024, h.src_port, 0), &[]);
    assert_eq!(read_line(&mut host), format!("OK {}", h.src_port));
    // Connections work again afterwards.
    let hp = h.src_port;
    host.write_all(b"x").unwrap();
    assert_eq!(
        v.recv(),
        (v.hdr_from_host(op::RW, hp, 1024, 1), b"x".to_vec())
    );
}

impl VsockGuest {
    fn hdr_from_host(&self, op: u16, src_port: u32, dst_port: u32, len: u32) -> PacketHeader {
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: 0,
        }
    }
}

#[test]
fn snapshot_state_round_trips_and_restored_device_works() {
    let mut v = VsockGuest::new();
    let (_host, _) = v.establish_host(1024);
    let ev = v.g.buf(200);
    let ev_head = v.g.add_chain(EVENT_QUEUE, &[Desc::w(ev, 4)]);

    // Pause (stop the loop) and save.
    v.g.stop_loop();
    let dev_state = v.dev.lock().unwrap().save();
    let transport_state = v.g.transport.save();
    let dev_json = serde_json::to_string(&dev_state).unwrap();
    let t_json = serde_json::to_string(&transport_state).unwrap();
    let dev_state: VsockState = serde_json::from_str(&dev_json).unwrap();
    let transport_state: crate::virtio::MmioTransportState = serde_json::from_str(&t_json).unwrap();
    assert_eq!(dev_state, VsockState { guest_cid: CID });
    assert_eq!(transport_state.queues.len(), 3);
    assert_eq!(transport_state.device_type, 19);

    // The clone: its own socket path, the same guest memory and rings.
    let clone_path = v._dir.as_path().join("clone.sock");
    let dev2 = Arc::new(Mutex::new(
        Vsock::restore("clone", &dev_state, &clone_path).unwrap(),
    ));
    let t2 = crate::virtio::MmioTransport::restore(
        "clone",
        v.g.mem.clone(),
        dev2.clone(),
        &transport_state,
    )
    .unwrap();
    assert_eq!(t2.save(), transport_state);
    v.g.replace_transport(t2);
    v.dev = dev2.clone();
    v.path = clone_path;
    v.g.start_loop(dev2.clone());
    dev2.lock().unwrap().send_transport_reset();
    assert_eq!(
        v.g.wait_used(EVENT_QUEUE, 1, DEADLINE),
        vec![(u32::from(ev_head), 4)]
    );
    // The driver handles the reset and re-posts its event buffer.
    v.g.add_chain(EVENT_QUEUE, &[Desc::w(ev, 4)]);
    v.g.kick(EVENT_QUEUE as u16);
    // The restored rx ring continues where it was.
    let (mut host, hp) = v.establish_host(1024);
    host.write_all(b"after").unwrap();
    let (h, data) = v.recv();
    assert_eq!(
        (h.op, h.src_port, data.as_slice()),
        (op::RW, hp, &b"after"[..])
    );
}

#[test]
fn device_reset_drops_connections_and_stops_listening() {
    let mut v = VsockGuest::new();
    let (mut host, _) = v.establish_host(1024);
    v.g.reset_device();
    assert!(read_to_eof(&mut host).is_empty());
    assert_eq!(v.connections(), 0);
    // A client arriving while the device is reset waits in the backlog and
    // is served once the driver is back.
    let mut early = v.host_client();
    early.write_all(b"CONNECT 1024\n").unwrap();
    v.g.init_driver(&[VSOCK_QUEUE_SIZE; 3]).unwrap();
    v.rx_bufs.clear();
    v.rx_pending.clear();
    for _ in 0..RX_BUFS {
        v.post_rx();
    }
    v.g.kick(RX_QUEUE as u16);
    let (h, _) = v.recv();
    assert_eq!((h.op, h.dst_port), (op::REQUEST, 1024));
    v.send(v.hdr(op::RESPONSE, 1024, h.src_port, 0), &[]);
    assert_eq!(read_line(&mut early), format!("OK {}", h.src_port));
}

#[test]
fn idle_host_connections_cannot_lock_out_a_new_client() {
    let mut v = VsockGuest::new();
    let mut idle = Vec::new();
    for _ in 0..MAX_HOST_CONNECTIONS {
        idle.push(v.establish_host(1024));
    }
    assert_eq!(v.connections(), MAX_HOST_CONNECTIONS);
    // One more client: the idlest (the first) is reset before its REQUEST,
    // so the guest frees a slot first.
    let mut host = v.host_client();
    host.write_all(b"CONNECT 1024\n").unwrap();
    v.expect_rst(idle[0].1, 1024);
    let (h, _) = v.recv();
    assert_eq!((h.op, h.dst_port), (op::REQUEST, 1024));
    v.send(v.hdr(op::RESPONSE, 1024, h.src_port, 0), &[]);
    assert_eq!(read_line(&mut host), format!("OK {}", h.src_port));
    assert_closed(&mut idle[0].0);
    assert_eq!(v.connections(), MAX_HOST_CONNECTIONS);
    // The others were left alone.
    idle[1].0.write_all(b"x").unwrap();
    let (h, data) = v.recv();
    assert_eq!(
        (h.op, h.src_port, data.as_slice()),
        (op::RW, idle[1].1, b"x".as_slice())
    );
}

#[test]
fn a_live_socket_is_never_taken_over_and_a_stale_one_is_replaced() {
    let dir = TempDir::new_with_prefix("/tmp/minivmm-vsock-").unwrap();
    let path = dir.as_path().join("v.sock");
    let first = Vsock::new("first", CID, &path).unwrap();
    // A second device at the same path is refused; the first keeps its socket.
    let err = Vsock::new("second", CID, &path).err().expect("second bind");
    assert!(
        err.to_string().contains("another process is listening"),
        "{err}"
    );
    assert!(UnixStream::connect(&path).is_ok());
    drop(first);
    assert!(!path.exists(), "the device removes its own socket");
    // A stale socket (its listener is gone, the file stayed) is replaced.
    let stale = UnixListener::bind(&path).unwrap();
    drop(stale);
    assert!(path.exists());
    let dev = Vsock::new("third", CID, &path).unwrap();
    assert!(UnixStream::connect(&path).is_ok());
    // Someone else's socket at our path (ours was unlinked behind our back)
    // survives our drop.
    std::fs::remove_file(&path).unwrap();
    let theirs = UnixListener::bind(&path).unwrap();
    drop(dev);
    assert!(path.exists(), "a socket that is not ours was unlinked");
    drop(theirs);
    // A regular file is not a socket: refused, left alone.
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, b"data").unwrap();
    assert!(Vsock::new("fourth", CID, &path).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
}
