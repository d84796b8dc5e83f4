//! The transport against a scripted host.

use super::packet::{SHUTDOWN_SEND, TYPE_STREAM};
use super::*;
use std::vec;

const GUEST_CID: u64 = 3;
const AGENT_PORT: u32 = 1024;
const HOST_PORT: u32 = 0x4000_0001;

/// Echoes what it gets; "close" closes, "big" gets a reply longer than a
/// packet, data starting with '#' gets no reply; accepts only port 1024.
struct Echo;

impl Application for Echo {
    type Conn = Vec<u8>;

    fn accept(&mut self, port: u32) -> Option<Vec<u8>> {
        (port == AGENT_PORT).then(Vec::new)
    }

    fn connected(&mut self, _: &mut Vec<u8>, out: &mut Vec<u8>) {
        out.extend_from_slice(b"hello\n");
    }

    fn receive(&mut self, seen: &mut Vec<u8>, data: &[u8], out: &mut Vec<u8>) -> bool {
        seen.extend_from_slice(data);
        if data == b"close" {
            out.extend_from_slice(b"bye");
            return false;
        }
        if data.first() == Some(&b'#') {
            return true;
        }
        if data == b"big" {
            out.resize(MAX_PAYLOAD + 10, 7);
            return true;
        }
        out.extend_from_slice(data);
        true
    }
}

fn host(op: u16, src_port: u32, dst_port: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: GUEST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

fn send(t: &mut Transport<Echo>, hdr: Header, payload: &[u8]) {
    let hdr = Header {
        len: payload.len() as u32,
        ..hdr
    };
    t.on_packet(&mut Echo, &hdr, payload);
}

fn drain(t: &mut Transport<Echo>) -> Vec<(Header, Vec<u8>)> {
    let mut v = Vec::new();
    while let Some(p) = t.pop_packet() {
        let h = Header::decode(&p).unwrap();
        assert_eq!(h.len as usize, p.len() - HDR_LEN);
        v.push((h, p[HDR_LEN..].to_vec()));
    }
    v
}

fn ops(packets: &[(Header, Vec<u8>)]) -> Vec<u16> {
    packets.iter().map(|p| p.0.op).collect()
}

fn connected() -> Transport<Echo> {
    let mut t = Transport::new(GUEST_CID);
    send(
        &mut t,
        host(op::REQUEST, HOST_PORT, AGENT_PORT, 4096, 0),
        &[],
    );
    assert_eq!(ops(&drain(&mut t)), [op::RESPONSE]);
    t
}

#[test]
fn request_is_answered_and_data_echoed() {
    let mut t = Transport::new(GUEST_CID);
    send(
        &mut t,
        host(op::REQUEST, HOST_PORT, AGENT_PORT, 4096, 0),
        &[],
    );
    let out = drain(&mut t);
    let (h, _) = &out[0];
    assert_eq!(h.op, op::RESPONSE);
    assert_eq!((h.src_cid, h.dst_cid), (GUEST_CID, HOST_CID));
    assert_eq!((h.src_port, h.dst_port), (AGENT_PORT, HOST_PORT));
    assert_eq!(
        (h.buf_alloc, h.fwd_cnt, h.type_),
        (BUF_ALLOC, 0, TYPE_STREAM)
    );
    assert_eq!(t.connection_count(), 1);

    send(
        &mut t,
        host(op::RW, HOST_PORT, AGENT_PORT, 4096, 0),
        b"ping",
    );
    let out = drain(&mut t);
    assert_eq!(ops(&out), [op::RW]);
    assert_eq!(out[0].0.fwd_cnt, 4, "reports what it consumed");
    assert_eq!(out[0].1, b"ping");
}

#[test]
fn nothing_listening_is_reset() {
    let mut t = Transport::new(GUEST_CID);
    send(&mut t, host(op::REQUEST, HOST_PORT, 9999, 4096, 0), &[]);
    let out = drain(&mut t);
    assert_eq!(ops(&out), [op::RST]);
    assert_eq!((out[0].0.src_port, out[0].0.dst_port), (9999, HOST_PORT));
    assert_eq!(t.connection_count(), 0);
    // Data for no connection gets an RST, an RST nothing.
    send(&mut t, host(op::RW, HOST_PORT, AGENT_PORT, 4096, 0), b"x");
    assert_eq!(ops(&drain(&mut t)), [op::RST]);
    send(&mut t, host(op::RST, HOST_PORT, AGENT_PORT, 0, 0), &[]);
    assert!(drain(&mut t).is_empty());
}

#[test]
fn wrong_cid_or_type_is_reset() {
    let mut t = Transport::new(GUEST_CID);
    let mut h = host(op::REQUEST, HOST_PORT, AGENT_PORT, 4096, 0);
    h.dst_cid = 4;
    send(&mut t, h, &[]);
    assert_eq!(ops(&drain(&mut t)), [op::RST]);
    let mut h = host(op::REQUEST, HOST_PORT, AGENT_PORT, 4096, 0);
    h.type_ = 2;
    send(&mut t, h, &[]);
    assert_eq!(ops(&drain(&mut t)), [op::RST]);
    assert_eq!(t.connection_count(), 0);
}

#[test]
fn sends_only_within_the_peers_credit() {
    let mut t = Transport::new(GUEST_CID);
    // The host has 4 bytes of buffer.
    send(&mut t, host(op::REQUEST, HOST_PORT, AGENT_PORT, 4, 0), &[]);
    drain(&mut t);
    send(
        &mut t,
        host(op::RW, HOST_PORT, AGENT_PORT, 4, 0),
        b"0123456789",
    );
    let out = drain(&mut t);
    assert_eq!(ops(&out), [op::RW, op::CREDIT_REQUEST]);
    assert_eq!(out[0].1, b"0123");
    // A credit update that frees nothing sends nothing.
    send(
        &mut t,
        host(op::CREDIT_UPDATE, HOST_PORT, AGENT_PORT, 4, 0),
        &[],
    );
    assert!(!ops(&drain(&mut t)).contains(&op::RW));
    // The host consumed 4: four more.
    send(
        &mut t,
        host(op::CREDIT_UPDATE, HOST_PORT, AGENT_PORT, 4, 4),
        &[],
    );
    let out = drain(&mut t);
    assert_eq!(out[0].1, b"4567");
    // A bigger buffer: the rest.
    send(
        &mut t,
        host(op::CREDIT_UPDATE, HOST_PORT, AGENT_PORT, 1000, 8),
        &[],
    );
    let out = drain(&mut t);
    assert_eq!(ops(&out), [op::RW]);
    assert_eq!(out[0].1, b"89");
}

#[test]
fn large_replies_are_split_into_max_payload_packets() {
    let mut t = Transport::new(GUEST_CID);
    send(
        &mut t,
        host(op::REQUEST, HOST_PORT, AGENT_PORT, 1 << 20, 0),
        &[],
    );
    drain(&mut t);
    send(
        &mut t,
        host(op::RW, HOST_PORT, AGENT_PORT, 1 << 20, 0),
        b"big",
    );
    let sizes: Vec<usize> = drain(&mut t).iter().map(|p| p.1.len()).collect();
    assert_eq!(sizes, [MAX_PAYLOAD, 10]);
    // Input is served in pieces, but their replies leave together.
    send(
        &mut t,
        host(op::RW, HOST_PORT, AGENT_PORT, 1 << 20, 0),
        &vec![1u8; 4000],
    );
    let sizes: Vec<usize> = drain(&mut t).iter().map(|p| p.1.len()).collect();
    assert_eq!(sizes, [4000]);
}

#[test]
fn credit_is_returned_for_data_that_got_no_reply() {
    let mut t = connected();
    // Data that gets no reply: the host must still learn that the guest
    // consumed it, once enough went unreported.
    let quarter = (BUF_ALLOC / 4) as usize;
    send(
        &mut t,
        host(op::RW, HOST_PORT, AGENT_PORT, 4096, 0),
        &vec![b'#'; quarter - 1],
    );
    assert!(drain(&mut t).is_empty());
    send(&mut t, host(op::RW, HOST_PORT, AGENT_PORT, 4096, 0), b"#");
    let out = drain(&mut t);
    assert_eq!(ops(&out), [op::CREDIT_UPDATE]);
    assert_eq!(out[0].0.fwd_cnt, BUF_ALLOC / 4);
}

#[test]
fn credit_request_is_answered() {
    let mut t = connected();
    send(
        &mut t,
        host(op::CREDIT_REQUEST, HOST_PORT, AGENT_PORT, 4096, 0),
        &[],
    );
    let out = drain(&mut t);
    assert_eq!(ops(&out), [op::CREDIT_UPDATE]);
    assert_eq!(out[0].0.buf_alloc, BUF_ALLOC);
}

#[test]
fn shutdown_and_reset_end_a_connection() {
    let mut t = connected();
    send(
        &mut t,
        host(op::SHUTDOWN, HOST_PORT, AGENT_PORT, 4096, 0),
        &[],
    );
    assert_eq!(ops(&drain(&mut t)), [op::RST]);
    assert_eq!(t.connection_count(), 0);

    let mut t = connected();
    send(&mut t, host(op::RST, HOST_PORT, AGENT_PORT, 0, 0), &[]);
    assert!(drain(&mut t).is_empty());
    assert_eq!(t.connection_count(), 0);
}

#[test]
fn half_close_flushes_before_the_reset() {
    let mut t = Transport::new(GUEST_CID);
    send(&mut t, host(op::REQUEST, HOST_PORT, AGENT_PORT, 2, 0), &[]);
    drain(&mut t);
    send(&mut t, host(op::RW, HOST_PORT, AGENT_PORT, 2, 0), b"abcd");
    drain(&mut t);
    let mut shut = host(op::SHUTDOWN, HOST_PORT, AGENT_PORT, 2, 0);
    shut.flags = SHUTDOWN_SEND;
    send(&mut t, shut, &[]);
    assert!(
        !ops(&drain(&mut t)).contains(&op::RST),
        "still owes 2 bytes"
    );
    send(
        &mut t,
        host(op::CREDIT_UPDATE, HOST_PORT, AGENT_PORT, 2, 2),
        &[],
    );
    assert_eq!(ops(&drain(&mut t)), [op::RW, op::RST]);
    assert_eq!(t.connection_count(), 0);
}

#[test]
fn application_close_sends_its_reply_then_resets() {
    let mut t = connected();
    send(
        &mut t,
        host(op::RW, HOST_PORT, AGENT_PORT, 4096, 0),
        b"close",
    );
    let out = drain(&mut t);
    assert_eq!(ops(&out), [op::RW, op::RST]);
    assert_eq!(out[0].1, b"bye");
}

#[test]
fn duplicate_request_resets() {
    let mut t = connected();
    send(
        &mut t,
        host(op::REQUEST, HOST_PORT, AGENT_PORT, 4096, 0),
        &[],
    );
    assert_eq!(ops(&drain(&mut t)), [op::RST]);
    assert_eq!(t.connection_count(), 0);
}

#[test]
fn connection_limit() {
    let mut t = Transport::new(GUEST_CID);
    for port in 0..MAX_CONNECTIONS as u32 + 1 {
        send(
            &mut t,
            host(op::REQUEST, HOST_PORT + port, AGENT_PORT, 4096, 0),
            &[],
        );
    }
    let out = drain(&mut t);
    assert_eq!(
        out.iter().filter(|p| p.0.op == op::RESPONSE).count(),
        MAX_CONNECTIONS
    );
    assert_eq!(out.last().unwrap().0.op, op::RST);
    assert_eq!(t.connection_count(), MAX_CONNECTIONS);
}

#[test]
fn many_connections_are_independent() {
    let mut t = Transport::new(GUEST_CID);
    for i in 0..8 {
        send(
            &mut t,
            host(op::REQUEST, HOST_PORT + i, AGENT_PORT, 4096, 0),
            &[],
        );
    }
    drain(&mut t);
    for i in (0..8).rev() {
        send(
            &mut t,
            host(op::RW, HOST_PORT + i, AGENT_PORT, 4096, 0),
            &[b'a' + i as u8],
        );
    }
    let out = drain(&mut t);
    for (k, i) in (0..8).rev().enumerate() {
        assert_eq!(out[k].0.dst_port, HOST_PORT + i);
        assert_eq!(out[k].1, [b'a' + i as u8]);
    }
}

#[test]
fn guest_initiated_connection_says_hello() {
    let mut t: Transport<Echo> = Transport::new(GUEST_CID);
    let key = t.connect(5000, Vec::new()).unwrap();
    assert_eq!(key.local_port, EPHEMERAL_PORT_BASE);
    let out = drain(&mut t);
    assert_eq!(ops(&out), [op::REQUEST]);
    assert_eq!((out[0].0.dst_cid, out[0].0.dst_port), (HOST_CID, 5000));
    send(
        &mut t,
        host(op::RESPONSE, 5000, key.local_port, 4096, 0),
        &[],
    );
    let out = drain(&mut t);
    assert_eq!(ops(&out), [op::RW]);
    assert_eq!(out[0].1, b"hello\n");
    assert_eq!(t.connection_count(), 1);
    // A second connection gets the next port.
    assert_eq!(
        t.connect(5000, Vec::new()).unwrap().local_port,
        EPHEMERAL_PORT_BASE + 1
    );
}

#[test]
fn data_before_the_response_resets() {
    let mut t: Transport<Echo> = Transport::new(GUEST_CID);
    let key = t.connect(5000, Vec::new()).unwrap();
    drain(&mut t);
    send(
        &mut t,
        host(op::RW, 5000, key.local_port, 4096, 0),
        b"early",
    );
    assert_eq!(ops(&drain(&mut t)), [op::RST]);
    assert_eq!(t.connection_count(), 0);
}

#[test]
fn close_all_flushes_then_resets_everything() {
    let mut t = connected();
    send(
        &mut t,
        host(op::REQUEST, HOST_PORT + 1, AGENT_PORT, 4096, 0),
        &[],
    );
    send(
        &mut t,
        host(op::RW, HOST_PORT, AGENT_PORT, 4096, 0),
        b"reply",
    );
    t.close_all(&mut Echo);
    assert_eq!(
        ops(&drain(&mut t)),
        [op::RESPONSE, op::RW, op::RST, op::RST]
    );
    assert_eq!(t.connection_count(), 0);
    // Still listening.
    send(
        &mut t,
        host(op::REQUEST, HOST_PORT, AGENT_PORT, 4096, 0),
        &[],
    );
    assert_eq!(ops(&drain(&mut t)), [op::RESPONSE]);
}

#[test]
fn transport_reset_forgets_everything_silently() {
    let mut t = connected();
    t.connect(5000, Vec::new());
    t.reset_all();
    assert_eq!(t.connection_count(), 0);
    assert!(drain(&mut t).is_empty());
}

#[test]
fn payload_beyond_len_is_ignored() {
    let mut t = connected();
    let mut h = host(op::RW, HOST_PORT, AGENT_PORT, 4096, 0);
    h.len = 2;
    t.on_packet(&mut Echo, &h, b"abcdef");
    assert_eq!(drain(&mut t)[0].1, b"ab");
}

#[test]
fn input_waits_while_output_cannot_leave() {
    let mut t = Transport::new(GUEST_CID);
    // The host never reads (no credit for the guest): the guest must stop
    // consuming once its unsent output reaches the limit.
    send(&mut t, host(op::REQUEST, HOST_PORT, AGENT_PORT, 0, 0), &[]);
    drain(&mut t);
    let packet = vec![b'x'; 4096];
    let total = 15 * 4096;
    for _ in 0..15 {
        send(&mut t, host(op::RW, HOST_PORT, AGENT_PORT, 0, 0), &packet);
    }
    let out = drain(&mut t);
    assert!(!ops(&out).contains(&op::RW));
    let reported = out.iter().map(|p| p.0.fwd_cnt).max().unwrap();
    assert!(
        (reported as usize) < PENDING_LIMIT + FEED_CHUNK,
        "consumed {reported} bytes with nowhere to put the replies"
    );
    // The host reads: everything flows, the echo is complete and in order.
    send(
        &mut t,
        host(op::CREDIT_UPDATE, HOST_PORT, AGENT_PORT, 1 << 20, 0),
        &[],
    );
    let out = drain(&mut t);
    let echoed: usize = out
        .iter()
        .filter(|p| p.0.op == op::RW)
        .map(|p| p.1.len())
        .sum();
    assert_eq!(echoed, total);
    assert_eq!(
        out.iter().map(|p| p.0.fwd_cnt).max().unwrap() as usize,
        total
    );
}

#[test]
fn peer_beyond_its_credit_is_reset() {
    let mut t = Transport::new(GUEST_CID);
    send(&mut t, host(op::REQUEST, HOST_PORT, AGENT_PORT, 0, 0), &[]);
    drain(&mut t);
    let packet = vec![b'x'; 4096];
    // PENDING_LIMIT consumed, then BUF_ALLOC waiting: the next byte is over.
    let fits = (PENDING_LIMIT + BUF_ALLOC as usize) / 4096;
    for _ in 0..fits {
        send(&mut t, host(op::RW, HOST_PORT, AGENT_PORT, 0, 0), &packet);
    }
    assert!(!ops(&drain(&mut t)).contains(&op::RST));
    for _ in 0..2 {
        send(&mut t, host(op::RW, HOST_PORT, AGENT_PORT, 0, 0), &packet);
    }
    assert!(ops(&drain(&mut t)).contains(&op::RST));
    assert_eq!(t.connection_count(), 0);
}
