//! Property tests of the state decoder *past* the checksums: every image here
//! has a valid header and valid CRCs (a corrupt file that still checks out,
//! or one written by a hostile hand), so what is exercised is the decoding of
//! a real VM's state (`vmm::state::VmState`, KVM structures included). It
//! must return the state or a typed `StateError::Decode`, never panic, and a
//! state it accepts must encode back to the very bytes it came from.
//! `cargo test -p e2e --test state_decoder -- --ignored` runs the long version.

use std::sync::OnceLock;

use proptest::collection::vec;
use proptest::prelude::*;
use snapshot::state::{check, decode, encode, StateError};
use vmm::state::VmState;
use vmm::{MemoryBackend, Vm, VmConfig};

/// Cases per property in the normal run.
const CASES: u32 = 1_000;
/// Cases per property in the long (`--ignored`) run.
const LONG_CASES: u32 = 50_000;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The state file image of a real VM (2 vCPUs, virtio-rng and vsock),
/// created but not started, saved once for all cases.
fn sample_image() -> &'static [u8] {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let socket = e2e::temp_path("state-decoder.vsock");
        let _ = std::fs::remove_file(&socket);
        let mut vm = Vm::create(VmConfig {
            id: "state-decoder".into(),
            vcpus: 2,
            mem_mib: 64,
            memory: MemoryBackend::Anonymous,
            kernel: e2e::testguest(),
            cmdline: String::new(),
            initrd: None,
            console: Box::new(std::io::sink()),
            virtio: vmm::VirtioConfig {
                rng: true,
                vsock: Some(socket.clone()),
                fs: Vec::new(),
                mem: None,
            },
            allow_pvm_native: true,
        })
        .expect("create VM");
        let state = vm.save().expect("save a VM that was never started");
        vm.stop();
        let _ = std::fs::remove_file(&socket);
        encode(&state).expect("encode the state")
    })
}

/// Where the payload starts: magic, version, version string, length, CRCs.
fn payload_offset(image: &[u8]) -> usize {
    8 + 4 + 1 + usize::from(image[12]) + 8 + 4 + 4
}

/// `payload` under the sample's header, with its length and both CRCs
/// computed afresh, as a writer would have.
fn sealed(payload: &[u8]) -> Vec<u8> {
    let sample = sample_image();
    let n = usize::from(sample[12]);
    let mut image = sample[..13 + n].to_vec();
    image.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    image.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let header_crc = crc32fast::hash(&image);
    image.extend_from_slice(&header_crc.to_le_bytes());
    image.extend_from_slice(payload);
    image
}

/// How to corrupt the sample's payload.
#[derive(Clone, Debug)]
enum Mutation {
    /// Overwrite the byte at (index modulo the length).
    Set(usize, u8),
    /// Flip one bit.
    Flip(usize, u8),
    /// Insert bytes.
    Insert(usize, Vec<u8>),
    /// Remove up to this many bytes.
    Remove(usize, usize),
    /// Cut the payload short.
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        4 => (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        2 => (any::<usize>(), vec(any::<u8>(), 1..9)).prop_map(|(i, v)| Mutation::Insert(i, v)),
        2 => (any::<usize>(), 1usize..64).prop_map(|(i, n)| Mutation::Remove(i, n)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(payload: &mut Vec<u8>, m: &Mutation) {
    let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
    match m {
        Mutation::Set(i, b) if !payload.is_empty() => {
            let i = at(*i, payload.len());
            payload[i] = *b;
        }
        Mutation::Flip(i, bit) if !payload.is_empty() => {
            let i = at(*i, payload.len());
            payload[i] ^= 1 << bit;
        }
        Mutation::Insert(i, bytes) => {
            let i = at(*i, payload.len() + 1);
            payload.splice(i..i, bytes.iter().copied());
        }
        Mutation::Remove(i, n) if !payload.is_empty() => {
            let i = at(*i, payload.len());
            let end = (i + n).min(payload.len());
            payload.drain(i..end);
        }
        Mutation::Truncate(n) => {
            let n = at(*n, payload.len() + 1);
            payload.truncate(n);
        }
        _ => {}
    }
}

/// The property: a sealed image checks out, and decodes to a state that
/// encodes back to the same bytes, or to a typed decode error.
fn decodes_or_fails_typed(image: &[u8]) -> Result<(), TestCaseError> {
    prop_assert!(check(image).is_ok(), "the image must pass the checksums");
    match decode::<VmState>(image) {
        Ok(state) => {
            let again = encode(&state).expect("a decoded state encodes");
            let first_difference = again
                .iter()
                .zip(image)
                .skip(payload_offset(image))
                .position(|(a, b)| a != b)
                .map(|i| i + payload_offset(image));
            prop_assert!(
                again == image,
                "decoded state re-encodes differently: {} bytes instead of {}, first difference at {:?} (payload at {}): {:02x?} vs {:02x?}",
                again.len(),
                image.len(),
                first_difference,
                payload_offset(image),
                first_difference.map(|i| &again[i..(i + 12).min(again.len())]),
                first_difference.map(|i| &image[i..(i + 12).min(image.len())]),
            );
        }
        Err(StateError::Decode { .. }) => {}
        Err(e) => prop_assert!(false, "not a decode error past the checksums: {e}"),
    }
    Ok(())
}

#[test]
fn the_sample_itself_round_trips() {
    let image = sample_image();
    assert_eq!(sealed(&image[payload_offset(image)..]), image);
    decodes_or_fails_typed(image).unwrap();
    let state: VmState = decode(image).unwrap();
    assert_eq!(state.vcpus.len(), 2);
    assert_eq!(state.virtio.device_names(), ["rng", "vsock"]);
}

macro_rules! properties {
    ($cases:expr $(, #[$attr:meta])?) => {
        proptest! {
            #![proptest_config(config($cases))]

            #[test]
            $(#[$attr])?
            fn mutated_states_decode_or_fail_typed(mutations in vec(mutation(), 1..5)) {
                let image = sample_image();
                let mut payload = image[payload_offset(image)..].to_vec();
                for m in &mutations {
                    mutate(&mut payload, m);
                }
                decodes_or_fails_typed(&sealed(&payload))?;
            }

            #[test]
            $(#[$attr])?
            fn random_payloads_decode_or_fail_typed(payload in vec(any::<u8>(), 0..4096)) {
                decodes_or_fails_typed(&sealed(&payload))?;
            }

            #[test]
            $(#[$attr])?
            fn a_random_tail_after_a_valid_prefix_fails_typed(
                keep in any::<usize>(),
                tail in vec(any::<u8>(), 0..256),
            ) {
                let image = sample_image();
                let payload = &image[payload_offset(image)..];
                let keep = keep % (payload.len() + 1);
                let mut p = payload[..keep].to_vec();
                p.extend_from_slice(&tail);
                decodes_or_fails_typed(&sealed(&p))?;
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
