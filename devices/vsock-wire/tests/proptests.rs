//! Property tests of the virtio-vsock header codec, which both the host
//! device and the guest driver apply to bytes the other side wrote.
//! `cargo test -p vsock-wire --test proptests -- --ignored` runs the long
//! version.

use proptest::collection::vec;
use proptest::prelude::*;
use vsock_wire::{PacketHeader, HDR_LEN};

/// Cases per property in the normal run.
const CASES: u32 = 5_000;
/// Cases per property in the long (`--ignored`) run.
const LONG_CASES: u32 = 500_000;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn header() -> impl Strategy<Value = PacketHeader> {
    (
        (any::<u64>(), any::<u64>(), any::<u32>(), any::<u32>()),
        (any::<u32>(), any::<u16>(), any::<u16>()),
        (any::<u32>(), any::<u32>(), any::<u32>()),
    )
        .prop_map(
            |(
                (src_cid, dst_cid, src_port, dst_port),
                (len, type_, op),
                (flags, buf_alloc, fwd_cnt),
            )| {
                PacketHeader {
                    src_cid,
                    dst_cid,
                    src_port,
                    dst_port,
                    len,
                    type_,
                    op,
                    flags,
                    buf_alloc,
                    fwd_cnt,
                }
            },
        )
}

fn bytes_decode_to_their_own_header(bytes: &[u8]) -> Result<(), TestCaseError> {
    match PacketHeader::decode(bytes) {
        None => prop_assert!(bytes.len() < HDR_LEN),
        Some(h) => {
            prop_assert!(bytes.len() >= HDR_LEN);
            // Every field comes from the first HDR_LEN bytes and nothing else.
            prop_assert_eq!(&h.to_bytes()[..], &bytes[..HDR_LEN]);
        }
    }
    Ok(())
}

fn header_round_trips(h: PacketHeader, tail: &[u8]) -> Result<(), TestCaseError> {
    let mut buf = vec![0u8; HDR_LEN];
    buf.extend_from_slice(tail);
    h.encode(&mut buf);
    prop_assert_eq!(&buf[HDR_LEN..], tail, "encode wrote past the header");
    prop_assert_eq!(PacketHeader::decode(&buf), Some(h));
    let r = h.reset_reply();
    prop_assert_eq!(
        (r.src_cid, r.dst_cid, r.src_port, r.dst_port, r.len),
        (h.dst_cid, h.src_cid, h.dst_port, h.src_port, 0)
    );
    prop_assert_eq!(r.op, vsock_wire::op::RST);
    Ok(())
}

macro_rules! properties {
    ($cases:expr $(, #[$attr:meta])?) => {
        proptest! {
            #![proptest_config(config($cases))]

            #[test]
            $(#[$attr])?
            fn any_bytes_decode_to_the_header_they_hold(bytes in vec(any::<u8>(), 0..2 * HDR_LEN)) {
                bytes_decode_to_their_own_header(&bytes)?;
            }

            #[test]
            $(#[$attr])?
            fn headers_round_trip(h in header(), tail in vec(any::<u8>(), 0..16)) {
                header_round_trips(h, &tail)?;
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
