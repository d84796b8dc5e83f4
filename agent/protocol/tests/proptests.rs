//! Property tests of what the agent reads from an untrusted peer: frames
//! (any bytes, any split) and the server's dispatch of whatever they carry.
//! Thousands of cases in the normal run; `cargo test -p agent-protocol --test
//! proptests -- --ignored` runs the long version of each property.

use agent_protocol::frame::{FrameDecoder, HEADER_LEN};
use agent_protocol::*;
use proptest::collection::vec;
use proptest::prelude::*;
use prost::Message;

/// Cases per property in the normal run.
const CASES: u32 = 2_000;
/// Cases per property in the long (`--ignored`) run.
const LONG_CASES: u32 = 100_000;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // No regression files written into the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Answers Check and ReseedRandomDev; every other method keeps the
/// generated UNIMPLEMENTED default.
#[derive(Default)]
struct Agent {
    reseeds: usize,
}

impl AgentService for Agent {
    fn check(&mut self, _: CheckRequest) -> Result<CheckResponse, Status> {
        Ok(CheckResponse {
            status: check_response::ServingStatus::Serving as i32,
            protocol_version: PROTOCOL_VERSION,
        })
    }

    fn reseed_random_dev(&mut self, _: ReseedRandomDevRequest) -> Result<(), Status> {
        self.reseeds += 1;
        Ok(())
    }
}

/// Methods of the agent service, plus names it does not have.
const METHODS: &[&str] = &[
    "Check",
    "GetGuestDetails",
    "ReseedRandomDev",
    "SetGuestDateTime",
    "OnlineCPUMem",
    "ReadRandom",
    "TouchMemory",
    "GetGuestTime",
    "QuiesceForSnapshot",
    "",
    "NoSuchMethod",
];

/// A frame header (stream id, type byte, flags) over `payload`; the length
/// field is the payload's.
fn frame_bytes(stream_id: u32, frame_type: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_LEN + payload.len());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(&stream_id.to_be_bytes());
    b.push(frame_type);
    b.push(flags);
    b.extend_from_slice(payload);
    b
}

/// Arbitrary bytes, biased to look like frames: a header with a small length
/// and a plausible type, then garbage.
fn wire_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..96),
        (any::<u32>(), 0u8..4, any::<u8>(), vec(any::<u8>(), 0..64))
            .prop_map(|(id, kind, flags, payload)| frame_bytes(id, kind, flags, &payload)),
    ]
}

/// A ttrpc request: a real or made-up method of the real or another
/// service, with a payload that is either arbitrary or a valid message.
fn ttrpc_request() -> impl Strategy<Value = Vec<u8>> {
    let service = prop_oneof![
        3 => Just(AGENT_SERVICE_NAME.to_string()),
        1 => "[a-z.]{0,12}",
    ];
    let payload = prop_oneof![
        vec(any::<u8>(), 0..48),
        vec(any::<u8>(), 0..32).prop_map(|data| ReseedRandomDevRequest { data }.encode_to_vec()),
        Just(CheckRequest::default().encode_to_vec()),
    ];
    (service, prop::sample::select(METHODS), payload).prop_map(|(service, method, payload)| {
        ttrpc::Request {
            service,
            method: method.to_string(),
            payload,
            ..Default::default()
        }
        .encode_to_vec()
    })
}

/// Every response frame in `out`, decoded; fails the case if `out` is not a
/// sequence of whole response frames carrying ttrpc responses with a status.
fn responses(out: &[u8]) -> Result<Vec<(u32, ttrpc::Response)>, TestCaseError> {
    let mut decoder = FrameDecoder::new();
    decoder
        .push(out)
        .map_err(|e| TestCaseError::fail(format!("server output is not frames: {e}")))?;
    let mut v = Vec::new();
    while let Some(frame) = decoder
        .next_frame()
        .map_err(|e| TestCaseError::fail(format!("server output is not frames: {e}")))?
    {
        prop_assert_eq!(frame.frame_type, FrameType::Response);
        let response = ttrpc::Response::decode(&frame.payload[..])
            .map_err(|e| TestCaseError::fail(format!("not a ttrpc response: {e}")))?;
        prop_assert!(response.status.is_some(), "response without a status");
        v.push((frame.stream_id, response));
    }
    prop_assert_eq!(decoder.buffered(), 0, "server output ends inside a frame");
    Ok(v)
}

fn decode_then_reencode(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(frame) = Frame::decode(bytes) {
        prop_assert_eq!(frame.encode().expect("a decoded frame encodes"), bytes);
    }
    Ok(())
}

fn any_split_gives_the_same_frames(
    frames: &[(u32, bool, Vec<u8>)],
    cuts: &[usize],
) -> Result<(), TestCaseError> {
    let frames: Vec<Frame> = frames
        .iter()
        .map(|(id, request, payload)| {
            if *request {
                Frame::request(*id, payload.clone())
            } else {
                Frame::response(*id, payload.clone())
            }
        })
        .collect();
    let mut wire = Vec::new();
    for f in &frames {
        f.encode_into(&mut wire).expect("small frame");
    }
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.push(wire.len());
    let mut decoder = FrameDecoder::new();
    let mut got = Vec::new();
    let mut at = 0;
    for cut in cuts {
        decoder.push(&wire[at..cut]).expect("valid frames");
        at = cut;
        while let Some(f) = decoder.next_frame().expect("valid frames") {
            got.push(f);
        }
    }
    decoder.finish().expect("nothing left over");
    prop_assert_eq!(got, frames);
    Ok(())
}

fn dispatcher_survives_any_bytes(chunks: &[Vec<u8>]) -> Result<(), TestCaseError> {
    let mut agent = Agent::default();
    let mut dispatcher = Dispatcher::new();
    let mut out = Vec::new();
    for chunk in chunks {
        let before = out.len();
        match dispatcher.handle_bytes(&mut agent, chunk, &mut out) {
            Ok(served) => {
                prop_assert_eq!(responses(&out[before..])?.len(), served);
            }
            // The stream is unusable: the connection would be closed; what
            // was answered before stays well-formed.
            Err(_) => {
                responses(&out)?;
                return Ok(());
            }
        }
    }
    responses(&out)?;
    Ok(())
}

fn every_request_gets_one_answer_on_its_stream(
    requests: &[(u32, Vec<u8>)],
    split: usize,
) -> Result<(), TestCaseError> {
    let mut wire = Vec::new();
    for (id, payload) in requests {
        Frame::request(*id, payload.clone())
            .encode_into(&mut wire)
            .expect("small frame");
    }
    let split = split % (wire.len() + 1);
    let mut agent = Agent::default();
    let mut dispatcher = Dispatcher::new();
    let mut out = Vec::new();
    let served = dispatcher
        .handle_bytes(&mut agent, &wire[..split], &mut out)
        .expect("valid frames")
        + dispatcher
            .handle_bytes(&mut agent, &wire[split..], &mut out)
            .expect("valid frames");
    prop_assert_eq!(served, requests.len());
    prop_assert_eq!(dispatcher.buffered(), 0);
    let answers = responses(&out)?;
    let ids: Vec<u32> = answers.iter().map(|(id, _)| *id).collect();
    let want: Vec<u32> = requests.iter().map(|(id, _)| *id).collect();
    prop_assert_eq!(ids, want);
    for ((_, payload), (_, answer)) in requests.iter().zip(&answers) {
        let ok = answer
            .status
            .as_ref()
            .is_some_and(|s| s.code == Code::Ok as i32);
        let request = ttrpc::Request::decode(&payload[..]).ok();
        let known = request.as_ref().is_some_and(|r| {
            r.service == AGENT_SERVICE_NAME
                && (r.method == "Check" || r.method == "ReseedRandomDev")
        });
        // Only the two methods the test agent implements can succeed; a
        // Check whose message decodes always does; a failure is one of the
        // dispatcher's typed statuses.
        if ok {
            prop_assert!(known, "OK for {:?}", request);
        } else {
            let code = answer.status.as_ref().map_or(-1, |s| s.code);
            prop_assert!(
                code == Code::InvalidArgument as i32 || code == Code::Unimplemented as i32,
                "unexpected status {:?}",
                answer.status
            );
        }
        let valid_check = request.is_some_and(|r| {
            r.service == AGENT_SERVICE_NAME
                && r.method == "Check"
                && CheckRequest::decode(&r.payload[..]).is_ok()
        });
        if valid_check {
            prop_assert!(ok, "Check failed: {:?}", answer.status);
        }
    }
    Ok(())
}

macro_rules! properties {
    ($cases:expr $(, #[$attr:meta])?) => {
        proptest! {
            #![proptest_config(config($cases))]

            #[test]
            $(#[$attr])?
            fn frame_decode_is_total_and_reencodes_exactly(bytes in wire_bytes()) {
                decode_then_reencode(&bytes)?;
            }

            #[test]
            $(#[$attr])?
            fn frames_survive_any_split(
                frames in vec((any::<u32>(), any::<bool>(), vec(any::<u8>(), 0..40)), 0..6),
                cuts in vec(any::<usize>(), 0..8),
            ) {
                any_split_gives_the_same_frames(&frames, &cuts)?;
            }

            #[test]
            $(#[$attr])?
            fn dispatcher_never_panics_on_arbitrary_bytes(chunks in vec(wire_bytes(), 1..6)) {
                dispatcher_survives_any_bytes(&chunks)?;
            }

            #[test]
            $(#[$attr])?
            fn dispatcher_answers_every_request_once(
                requests in vec((any::<u32>(), prop_oneof![ttrpc_request(), vec(any::<u8>(), 0..48)]), 0..6),
                split in any::<usize>(),
            ) {
                every_request_gets_one_answer_on_its_stream(&requests, split)?;
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
