//! Property tests of what a guest drives: the virtio-mmio registers (any
//! offset, width and value, in any device state) and descriptor chains
//! (addresses anywhere, in or out of guest RAM), here on virtio-rng; the
//! vsock packets are in `vsock::proptests`. The device must never panic,
//! write guest memory only where the driver allowed it, and stay usable
//! after a reset. `cargo test -p devices proptests -- --ignored` runs the
//! long version.

use std::sync::{Arc, Mutex};

use proptest::collection::vec;
use proptest::prelude::*;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::rng::{Rng, MAX_BYTES_PER_REQUEST};
use super::test_utils::{Desc, TestGuest, MEM_SIZE};
use crate::bus::BusDevice;

/// Cases per property in the normal run.
pub(crate) const CASES: u32 = 1_000;
/// Cases per property in the long (`--ignored`) run.
pub(crate) const LONG_CASES: u32 = 20_000;
/// Queue size the simulated driver sets up.
const QUEUE_SIZE: u16 = 64;
/// The rings of queue 0 (test_utils' layout: 64 KiB at 64 KiB).
const RING_AREA: (u64, u64) = (0x1_0000, 0x2_0000);

pub(crate) fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A guest-physical address: anywhere in RAM, at its very end, or outside.
pub(crate) fn guest_addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0x10_0000u64..MEM_SIZE,
        1 => (0u64..0x1000).prop_map(|d| MEM_SIZE - d),
        1 => MEM_SIZE..MEM_SIZE + 0x1_0000,
        1 => any::<u64>(),
    ]
}

/// A descriptor: address, length (0 to past a page), device-writable or not.
pub(crate) fn desc() -> impl Strategy<Value = (u64, u32, bool)> {
    (
        guest_addr(),
        prop_oneof![0u32..64, 0u32..0x2_0000, Just(u32::MAX)],
        any::<bool>(),
    )
}

fn to_desc((addr, len, write): (u64, u32, bool)) -> Desc {
    if write {
        Desc::w(addr, len)
    } else {
        Desc::r(addr, len)
    }
}

/// One thing a (hostile) driver does.
#[derive(Clone, Debug)]
enum Op {
    /// A register access of any width (1, 2, 4, 8 or an odd 3 bytes).
    Write {
        offset: u64,
        width: usize,
        value: u64,
    },
    Read {
        offset: u64,
        width: usize,
    },
    /// A chain on queue 0, then the device's processing.
    Chain(Vec<(u64, u32, bool)>),
    /// The available index set to anything.
    AvailIdx(u16),
    /// The device runs its queue.
    Process,
    /// Reset and initialize again, as a driver would.
    Reinit,
}

fn register_offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        // The registers the transport defines (virtio 1.2 §4.2.2), aligned.
        4 => (0u64..0x40).prop_map(|i| i * 4),
        // The configuration space and anything near it, unaligned too.
        1 => 0u64..0x200,
        1 => any::<u64>(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let width = prop::sample::select(&[1usize, 2, 3, 4, 8][..]);
    prop_oneof![
        6 => (register_offset(), width.clone(), any::<u64>())
            .prop_map(|(offset, width, value)| Op::Write { offset, width, value }),
        3 => (register_offset(), width).prop_map(|(offset, width)| Op::Read { offset, width }),
        3 => vec(desc(), 0..4).prop_map(Op::Chain),
        1 => any::<u16>().prop_map(Op::AvailIdx),
        2 => Just(Op::Process),
        1 => Just(Op::Reinit),
    ]
}

/// Bytes the rng may give at once here: far more than any case asks for, so
/// its rate limit (tested in `rng`) never holds a request back.
const RNG_BURST: u64 = 1 << 30;

fn rng_guest() -> (TestGuest, Arc<Mutex<Rng>>) {
    let rng = Rng::with_rate_limit("proptest", RNG_BURST, RNG_BURST).unwrap();
    let rng = Arc::new(Mutex::new(rng));
    (TestGuest::without_loop(rng.clone()), rng)
}

/// After whatever happened, a reset and a fresh initialization make the
/// device serve a sane request again.
fn recovers(g: &mut TestGuest, rng: &Mutex<Rng>) -> Result<(), TestCaseError> {
    g.reset_device();
    g.init_driver(&[QUEUE_SIZE])
        .map_err(|e| TestCaseError::fail(format!("re-initialization failed: {e}")))?;
    let head = g.add_chain(0, &[Desc::w(g.buf(0), 16)]);
    g.kick(0);
    rng.lock().unwrap().process_requests();
    prop_assert_eq!(g.used(0), vec![(u32::from(head), 16)]);
    Ok(())
}

fn registers_never_break_the_device(ops: &[Op]) -> Result<(), TestCaseError> {
    let (mut g, rng) = rng_guest();
    let mut initialized = g.init_driver(&[QUEUE_SIZE]).is_ok();
    prop_assert!(initialized);
    for op in ops {
        match op {
            Op::Write {
                offset,
                width,
                value,
            } => g.transport.write(*offset, &value.to_le_bytes()[..*width]),
            Op::Read { offset, width } => {
                let mut data = [0xa5u8; 8];
                g.transport.read(*offset, &mut data[..*width]);
            }
            Op::Chain(descs) if initialized => {
                let descs: Vec<Desc> = descs.iter().copied().map(to_desc).collect();
                g.add_chain(0, &descs);
                g.kick(0);
                rng.lock().unwrap().process_requests();
            }
            Op::AvailIdx(idx) if initialized => g.set_avail_idx(0, *idx),
            Op::Process => rng.lock().unwrap().process_requests(),
            Op::Reinit => {
                g.reset_device();
                initialized = g.init_driver(&[QUEUE_SIZE]).is_ok();
            }
            _ => {}
        }
    }
    recovers(&mut g, &rng)
}

/// All of the test guest's RAM, borrowed while no device thread runs.
pub(crate) fn ram(g: &TestGuest) -> &[u8] {
    let host = g.mem.get_host_address(GuestAddress(0)).unwrap();
    // SAFETY: test_utils maps one region of MEM_SIZE bytes at guest address
    // 0, alive as long as `g`; no event loop runs (`without_loop`), so only
    // this thread writes it, and not while the slice is borrowed.
    unsafe { std::slice::from_raw_parts(host, MEM_SIZE as usize) }
}

/// The bytes of guest RAM that differ between `before` and now, as ranges
/// (compared page by page first: byte by byte only where a page changed).
pub(crate) fn changed_ranges(g: &TestGuest, before: &[u8]) -> Vec<(u64, u64)> {
    const PAGE: usize = 4096;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (page, (a, b)) in ram(g).chunks(PAGE).zip(before.chunks(PAGE)).enumerate() {
        if a == b {
            continue;
        }
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            if x != y {
                let at = (page * PAGE + i) as u64;
                match ranges.last_mut() {
                    Some((_, end)) if *end == at => *end = at + 1,
                    _ => ranges.push((at, at + 1)),
                }
            }
        }
    }
    ranges
}

fn chains_write_only_where_allowed(chains: &[Vec<(u64, u32, bool)>]) -> Result<(), TestCaseError> {
    let (mut g, rng) = rng_guest();
    g.init_driver(&[QUEUE_SIZE]).unwrap();
    // Everything the driver itself writes goes into the ring area; data
    // buffers are only ever written by the device.
    let mut heads = Vec::new();
    let mut allowed = vec![RING_AREA];
    for chain in chains {
        let descs: Vec<Desc> = chain.iter().copied().map(to_desc).collect();
        for (addr, len, write) in chain {
            if *write {
                allowed.push((*addr, addr.saturating_add(u64::from(*len))));
            }
        }
        heads.push(g.add_chain(0, &descs));
    }
    let before = ram(&g).to_vec();
    g.kick(0);
    rng.lock().unwrap().process_requests();
    let used = g.used(0);
    prop_assert_eq!(used.len(), chains.len(), "every chain comes back once");
    for ((id, len), (head, chain)) in used.iter().zip(heads.iter().zip(chains)) {
        prop_assert_eq!(*id, u32::from(*head));
        let writable: u64 = chain.iter().filter(|d| d.2).map(|d| u64::from(d.1)).sum();
        prop_assert!(
            u64::from(*len) <= writable.min(MAX_BYTES_PER_REQUEST as u64),
            "used length {} for a chain with {} writable bytes",
            len,
            writable
        );
    }
    for (start, end) in changed_ranges(&g, &before) {
        prop_assert!(
            allowed.iter().any(|(a, b)| *a <= start && end <= *b),
            "device wrote guest RAM {:#x}..{:#x}, outside every writable buffer",
            start,
            end
        );
    }
    recovers(&mut g, &rng)
}

macro_rules! properties {
    ($cases:expr $(, #[$attr:meta])?) => {
        proptest! {
            #![proptest_config(config($cases))]

            #[test]
            $(#[$attr])?
            fn mmio_registers_in_any_order_never_break_the_device(ops in vec(op(), 0..40)) {
                registers_never_break_the_device(&ops)?;
            }

        }

        // Each case compares all 16 MiB of guest RAM: fewer of them.
        proptest! {
            #![proptest_config(config($cases / 5))]

            #[test]
            $(#[$attr])?
            fn rng_writes_only_into_writable_buffers(
                chains in vec(vec(desc(), 0..4), 1..8),
            ) {
                chains_write_only_where_allowed(&chains)?;
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
