//! Property tests of the vsock device against what a hostile guest puts on
//! its queues: packets with any header (CIDs, ports, op, type, length that
//! disagrees with the payload, flags, credit) and tx chains of any shape. The
//! device runs synchronously here (no event loop). It must never panic,
//! return every tx chain exactly once, put only well-formed packets on rx,
//! write guest memory only into the rings and the buffers the driver gave it
//! to write, and still answer a sane request afterwards.

use proptest::collection::vec;
use proptest::prelude::*;
use vmm_sys_util::tempdir::TempDir;

use super::packet::{op, PacketHeader, HDR_LEN, HOST_CID, TYPE_STREAM};
use super::*;
use crate::virtio::proptests::{changed_ranges, config, desc, ram, CASES, LONG_CASES};
use crate::virtio::test_utils::{Desc, TestGuest};

const CID: u64 = 3;
/// rx buffers kept posted, 4 KiB each.
const RX_BUFS: u64 = 32;
const RX_BUF_LEN: u32 = 4096;
/// tx packets are written from the `TX_AREA`-th 64 KiB buffer on.
const TX_AREA: u64 = 64;
/// tx buffers in use, round robin.
const TX_BUFS: u64 = 16;
/// The three queues' rings (test_utils' layout: 64 KiB each from 64 KiB).
const RING_AREA: (u64, u64) = (0x1_0000, 0x4_0000);

/// What the guest puts on tx.
#[derive(Clone, Debug)]
enum Tx {
    /// A header (any field) and a payload in one readable buffer.
    Packet(PacketHeader, Vec<u8>),
    /// A chain of arbitrary descriptors.
    Chain(Vec<(u64, u32, bool)>),
}

fn header() -> impl Strategy<Value = PacketHeader> {
    let cid = |usual: u64| prop_oneof![4 => Just(usual), 1 => any::<u64>()];
    let port = prop_oneof![Just(1024u32), Just(5000), 1u32..8, any::<u32>()];
    (
        (cid(CID), cid(HOST_CID), port.clone(), port),
        (
            prop_oneof![4 => Just(TYPE_STREAM), 1 => any::<u16>()],
            0u16..10,
            prop_oneof![Just(0u32), 0u32..4, any::<u32>()],
        ),
        (any::<u32>(), any::<u32>()),
    )
        .prop_map(
            |((src_cid, dst_cid, src_port, dst_port), (type_, op, flags), (buf_alloc, fwd_cnt))| {
                PacketHeader {
                    src_cid,
                    dst_cid,
                    src_port,
                    dst_port,
                    len: 0,
                    type_,
                    op,
                    flags,
                    buf_alloc,
                    fwd_cnt,
                }
            },
        )
}

fn tx() -> impl Strategy<Value = Tx> {
    prop_oneof![
        6 => (header(), vec(any::<u8>(), 0..96), prop_oneof![3 => Just(None), 1 => any::<u32>().prop_map(Some)])
            .prop_map(|(mut h, payload, len)| {
                // Mostly the true length; sometimes a lie.
                h.len = len.unwrap_or(payload.len() as u32);
                Tx::Packet(h, payload)
            }),
        1 => vec(desc(), 0..4).prop_map(Tx::Chain),
    ]
}

struct Guest {
    g: TestGuest,
    dev: Arc<Mutex<Vsock>>,
    _dir: TempDir,
    /// rx buffer of each posted head.
    rx_bufs: std::collections::HashMap<u32, u64>,
    next_rx: u64,
    next_tx: u64,
}

impl Guest {
    fn new() -> Guest {
        let dir = TempDir::new_with_prefix("/tmp/minivmm-vsock-prop-").unwrap();
        let dev = Arc::new(Mutex::new(
            Vsock::new("proptest", CID, &dir.as_path().join("v.sock")).unwrap(),
        ));
        let mut g = TestGuest::without_loop(dev.clone());
        g.init_driver(&[VSOCK_QUEUE_SIZE; 3]).unwrap();
        let mut guest = Guest {
            g,
            dev,
            _dir: dir,
            rx_bufs: Default::default(),
            next_rx: 0,
            next_tx: 0,
        };
        for _ in 0..RX_BUFS {
            guest.post_rx();
        }
        guest
    }

    fn post_rx(&mut self) {
        let addr = self.g.buf(self.next_rx % RX_BUFS);
        self.next_rx += 1;
        let head = self.g.add_chain(RX_QUEUE, &[Desc::w(addr, RX_BUF_LEN)]);
        self.rx_bufs.insert(u32::from(head), addr);
    }

    /// One pass of the device over its queues, as its event loop makes.
    fn run_device(&mut self) {
        let mut dev = self.dev.lock().unwrap();
        dev.process_tx();
        dev.process_rx();
        dev.process_event_queue();
    }

    fn send(&mut self, tx: &Tx) -> u16 {
        match tx {
            Tx::Packet(h, payload) => {
                let addr = self.g.buf(TX_AREA + self.next_tx % TX_BUFS);
                self.next_tx += 1;
                let mut bytes = h.to_bytes().to_vec();
                bytes.extend_from_slice(payload);
                self.g.write_mem(addr, &bytes);
                self.g
                    .add_chain(TX_QUEUE, &[Desc::r(addr, bytes.len() as u32)])
            }
            Tx::Chain(descs) => {
                let descs: Vec<Desc> = descs
                    .iter()
                    .map(|&(a, l, w)| if w { Desc::w(a, l) } else { Desc::r(a, l) })
                    .collect();
                self.g.add_chain(TX_QUEUE, &descs)
            }
        }
    }

    /// Every packet the device put on rx since the last call, checked for
    /// form and address, its buffer posted again.
    fn received(&mut self) -> Result<Vec<PacketHeader>, TestCaseError> {
        let mut out = Vec::new();
        for (head, len) in self.g.used(RX_QUEUE) {
            let addr = self.rx_bufs.remove(&head);
            prop_assert!(addr.is_some(), "rx used id {} was not posted", head);
            prop_assert!(len <= RX_BUF_LEN, "rx packet of {} bytes", len);
            let mut bytes = vec![0u8; len as usize];
            self.g.read_mem(addr.unwrap(), &mut bytes);
            prop_assert!(bytes.len() >= HDR_LEN, "rx packet of {} bytes", len);
            let h = PacketHeader::decode(&bytes).unwrap();
            prop_assert_eq!(h.len as usize, bytes.len() - HDR_LEN);
            // Replies echo the addresses the guest used (a reset to a packet
            // for CID 0 comes from CID 0), so only the type is fixed.
            prop_assert_eq!(h.type_, TYPE_STREAM);
            out.push(h);
            self.post_rx();
        }
        Ok(out)
    }
}

fn any_tx_traffic_leaves_the_device_consistent(packets: &[Tx]) -> Result<(), TestCaseError> {
    let mut guest = Guest::new();
    let before = ram(&guest.g).to_vec();
    // Where writes may land: the rings, the rx buffers, the tx buffers (the
    // test writes those), and any buffer a chain marked device-writable.
    let mut allowed = vec![
        RING_AREA,
        (guest.g.buf(0), guest.g.buf(RX_BUFS)),
        (guest.g.buf(TX_AREA), guest.g.buf(TX_AREA + TX_BUFS)),
    ];
    for tx in packets {
        if let Tx::Chain(descs) = tx {
            for (addr, len, write) in descs {
                if *write {
                    allowed.push((*addr, addr.saturating_add(u64::from(*len))));
                }
            }
        }
    }
    for chunk in packets.chunks(4) {
        let heads: Vec<u16> = chunk.iter().map(|tx| guest.send(tx)).collect();
        guest.g.kick(TX_QUEUE as u16);
        guest.run_device();
        let used = guest.g.used(TX_QUEUE);
        let ids: Vec<u32> = used.iter().map(|u| u.0).collect();
        let want: Vec<u32> = heads.iter().map(|h| u32::from(*h)).collect();
        prop_assert_eq!(ids, want, "every tx chain comes back once, in order");
        guest.received()?;
    }
    // A sane connection request to a host port nobody listens on is still
    // answered, with a reset to the port it came from.
    let request = PacketHeader {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: 7777,
        dst_port: 4242,
        len: 0,
        type_: TYPE_STREAM,
        op: op::REQUEST,
        flags: 0,
        buf_alloc: 65536,
        fwd_cnt: 0,
    };
    guest.send(&Tx::Packet(request, Vec::new()));
    guest.g.kick(TX_QUEUE as u16);
    guest.g.kick(RX_QUEUE as u16);
    guest.run_device();
    let answers = guest.received()?;
    prop_assert!(
        answers
            .iter()
            .any(|h| h.op == op::RST && h.dst_port == 7777 && h.src_port == 4242),
        "no reset for the final request: {:?}",
        answers
    );
    for (start, end) in changed_ranges(&guest.g, &before) {
        prop_assert!(
            allowed.iter().any(|(a, b)| *a <= start && end <= *b),
            "guest RAM {:#x}..{:#x} changed, outside the rings and buffers",
            start,
            end
        );
    }
    Ok(())
}

macro_rules! properties {
    ($cases:expr $(, #[$attr:meta])?) => {
        // Each case compares all 16 MiB of guest RAM: fewer of them.
        proptest! {
            #![proptest_config(config($cases / 4))]

            #[test]
            $(#[$attr])?
            fn any_tx_traffic_leaves_the_device_consistent_and_serving(
                packets in vec(tx(), 0..24),
            ) {
                any_tx_traffic_leaves_the_device_consistent(&packets)?;
            }
        }
    };
}

mod normal {
    use super::*;
    properties!(CASES);
}

mod long {
    use super::*;
    properties!(LONG_CASES, #[ignore = "long property run: cargo test -- --ignored"]);
}
