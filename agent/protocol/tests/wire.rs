//! Wire format: every message through ttrpc framing and back, the envelope's
//! field numbers against hand-encoded bytes, and hostile input to the server.

use std::fmt::Debug;

use agent_protocol::agent_service_method as method;
use agent_protocol::check_response::ServingStatus;
use agent_protocol::frame::{FrameHeader, HEADER_LEN, MAX_PAYLOAD_LEN};
use agent_protocol::ttrpc;
use agent_protocol::*;
use prost::Message;

/// Sends `message` as the payload of a call to `method` in a request frame,
/// decodes it back through a byte-at-a-time decoder, and compares.
fn request_round_trip<M: Message + Default + PartialEq + Debug>(method: &str, message: M) {
    let envelope = ttrpc::Request {
        service: AGENT_SERVICE_NAME.into(),
        method: method.into(),
        payload: message.encode_to_vec(),
        timeout_nano: 1_500_000_000,
        metadata: vec![ttrpc::KeyValue {
            key: "k".into(),
            value: "v".into(),
        }],
    };
    let wire = Frame::request(41, envelope.encode_to_vec())
        .encode()
        .unwrap();
    let mut decoder = FrameDecoder::new();
    let mut frames = Vec::new();
    for byte in &wire {
        decoder.push(std::slice::from_ref(byte)).unwrap();
        frames.extend(decoder.next_frame().unwrap());
    }
    assert_eq!(frames.len(), 1);
    let frame = frames.remove(0);
    assert_eq!(
        (frame.stream_id, frame.frame_type),
        (41, FrameType::Request)
    );
    let decoded = ttrpc::Request::decode(frame.payload.as_slice()).unwrap();
    assert_eq!(decoded, envelope);
    assert_eq!(M::decode(decoded.payload.as_slice()).unwrap(), message);
}

/// Same for a reply carried in a response frame.
fn response_round_trip<M: Message + Default + PartialEq + Debug>(message: M) {
    let envelope = ttrpc::Response {
        status: Some(ttrpc::Status::default()),
        payload: message.encode_to_vec(),
    };
    let frame = Frame::response(41, envelope.encode_to_vec());
    let decoded = Frame::decode(&frame.encode().unwrap()).unwrap();
    assert_eq!(decoded, frame);
    let decoded = ttrpc::Response::decode(decoded.payload.as_slice()).unwrap();
    assert_eq!(M::decode(decoded.payload.as_slice()).unwrap(), message);
}

#[test]
fn every_message_round_trips_through_frames() {
    request_round_trip(
        method::CHECK,
        CheckRequest {
            service: "agent".into(),
        },
    );
    response_round_trip(CheckResponse {
        status: ServingStatus::Serving as i32,
        protocol_version: PROTOCOL_VERSION,
    });
    request_round_trip(method::GET_GUEST_DETAILS, GuestDetailsRequest {});
    response_round_trip(GuestDetailsResponse {
        agent_version: "0.1.0".into(),
        protocol_version: PROTOCOL_VERSION,
        online_vcpus: 4,
        memory_bytes: 512 << 20,
        boot_time_ns: 12_345_678,
        pvm: true,
        kernel: "minivmm-testguest".into(),
    });
    request_round_trip(
        method::RESEED_RANDOM_DEV,
        ReseedRandomDevRequest {
            data: (0..=255).collect(),
        },
    );
    request_round_trip(
        method::SET_GUEST_DATE_TIME,
        SetGuestDateTimeRequest {
            sec: 1_700_000_000,
            usec: -1,
        },
    );
    request_round_trip(
        method::ONLINE_CPU_MEM,
        OnlineCpuMemRequest {
            nb_cpus: 8,
            memory_bytes: u64::MAX,
        },
    );
    request_round_trip(method::READ_RANDOM, ReadRandomRequest { n: 32 });
    response_round_trip(ReadRandomResponse { data: vec![7; 32] });
    request_round_trip(
        method::TOUCH_MEMORY,
        TouchMemoryRequest {
            pages: 1 << 20,
            pattern: 0xdead_beef,
        },
    );
    response_round_trip(TouchMemoryResponse {
        checksum: u64::MAX,
        pages: 1 << 20,
    });
    request_round_trip(method::GET_GUEST_TIME, GetGuestTimeRequest {});
    response_round_trip(GetGuestTimeResponse {
        sec: i64::MIN,
        usec: 999_999,
        monotonic_ns: 42,
    });
    request_round_trip(method::QUIESCE_FOR_SNAPSHOT, QuiesceForSnapshotRequest {});
    response_round_trip(());
}

#[test]
fn ttrpc_envelope_field_numbers_match_containerd() {
    // Request{service=1, method=2, payload=3, timeout_nano=4, metadata=5}.
    let request = ttrpc::Request {
        service: "s".into(),
        method: "m".into(),
        payload: vec![1],
        timeout_nano: 5,
        metadata: vec![ttrpc::KeyValue {
            key: "k".into(),
            value: "v".into(),
        }],
    };
    assert_eq!(
        request.encode_to_vec(),
        [
            0x0a, 1, b's', 0x12, 1, b'm', 0x1a, 1, 1, 0x20, 5, 0x2a, 6, 0x0a, 1, b'k', 0x12, 1,
            b'v'
        ]
    );
    // Response{status=1 {code=1, message=2}, payload=2}.
    let response = ttrpc::Response {
        status: Some(ttrpc::Status {
            code: 12,
            message: "x".into(),
        }),
        payload: vec![9],
    };
    assert_eq!(
        response.encode_to_vec(),
        [0x0a, 5, 0x08, 12, 0x12, 1, b'x', 0x12, 1, 9]
    );
}

#[test]
fn kata_field_numbers_are_kept() {
    // ReseedRandomDevRequest.data = 2, OnlineCPUMemRequest.nb_cpus = 2,
    // SetGuestDateTimeRequest.Sec = 1 / Usec = 2.
    assert_eq!(
        ReseedRandomDevRequest { data: vec![0xaa] }.encode_to_vec(),
        [0x12, 1, 0xaa]
    );
    assert_eq!(
        OnlineCpuMemRequest {
            nb_cpus: 3,
            memory_bytes: 0
        }
        .encode_to_vec(),
        [0x10, 3]
    );
    assert_eq!(
        SetGuestDateTimeRequest { sec: 1, usec: 2 }.encode_to_vec(),
        [0x08, 1, 0x10, 2]
    );
}

/// A service with only `check`, to see routing and defaults.
struct CheckOnly;

impl AgentService for CheckOnly {
    fn check(&mut self, _: CheckRequest) -> Result<CheckResponse, Status> {
        Ok(CheckResponse {
            status: ServingStatus::Serving as i32,
            protocol_version: PROTOCOL_VERSION,
        })
    }
}

fn call_frame(stream_id: u32, service: &str, method: &str, payload: Vec<u8>) -> Frame {
    let envelope = ttrpc::Request {
        service: service.into(),
        method: method.into(),
        payload,
        ..Default::default()
    };
    Frame::request(stream_id, envelope.encode_to_vec())
}

/// Serves `frame` and returns the reply's stream id and outcome.
fn serve(frame: &Frame) -> (u32, Result<Vec<u8>, Status>) {
    let reply = Frame::decode(&serve_frame(&mut CheckOnly, frame)).unwrap();
    assert_eq!(reply.frame_type, FrameType::Response);
    let response = ttrpc::Response::decode(reply.payload.as_slice()).unwrap();
    let status = response.status.expect("every reply carries a status");
    let outcome = match status.code {
        0 => Ok(response.payload),
        _ => Err(Status::from_wire(status)),
    };
    (reply.stream_id, outcome)
}

#[test]
fn server_routes_and_keeps_stream_id() {
    let (stream_id, outcome) = serve(&call_frame(
        9,
        AGENT_SERVICE_NAME,
        method::CHECK,
        CheckRequest::default().encode_to_vec(),
    ));
    assert_eq!(stream_id, 9);
    let reply = CheckResponse::decode(outcome.unwrap().as_slice()).unwrap();
    assert_eq!(reply.protocol_version, PROTOCOL_VERSION);
}

#[test]
fn server_answers_unimplemented_for_unknown_or_default_methods() {
    for (service, method) in [
        (AGENT_SERVICE_NAME, "NoSuchMethod"),
        ("grpc.AgentService", method::CHECK),
        (AGENT_SERVICE_NAME, method::TOUCH_MEMORY),
    ] {
        let (_, outcome) = serve(&call_frame(1, service, method, Vec::new()));
        let status = outcome.unwrap_err();
        assert_eq!(status.code, Code::Unimplemented, "{service}/{method}");
        assert!(status.message.contains(method), "{status}");
    }
}

#[test]
fn server_answers_invalid_argument_for_garbage() {
    // Garbage ttrpc envelope.
    let (stream_id, outcome) = serve(&Frame::request(3, vec![0xff; 16]));
    assert_eq!(stream_id, 3);
    assert_eq!(outcome.unwrap_err().code, Code::InvalidArgument);
    // Valid envelope, garbage request message (truncated length-delimited field).
    let (_, outcome) = serve(&call_frame(
        5,
        AGENT_SERVICE_NAME,
        method::CHECK,
        vec![0x0a, 0x7f],
    ));
    let status = outcome.unwrap_err();
    assert_eq!(status.code, Code::InvalidArgument);
    assert!(status.message.contains("Check"), "{status}");
    // A response frame sent to the server.
    let (_, outcome) = serve(&Frame::response(7, Vec::new()));
    assert_eq!(outcome.unwrap_err().code, Code::InvalidArgument);
}

#[test]
fn dispatcher_serves_split_and_batched_input() {
    let mut input = Vec::new();
    for stream_id in [1, 3, 5] {
        call_frame(stream_id, AGENT_SERVICE_NAME, method::CHECK, Vec::new())
            .encode_into(&mut input)
            .unwrap();
    }
    let mut dispatcher = Dispatcher::new();
    let mut out = Vec::new();
    let (head, tail) = input.split_at(HEADER_LEN + 3);
    assert_eq!(
        dispatcher
            .handle_bytes(&mut CheckOnly, head, &mut out)
            .unwrap(),
        0
    );
    assert!(out.is_empty());
    assert_eq!(
        dispatcher
            .handle_bytes(&mut CheckOnly, tail, &mut out)
            .unwrap(),
        3
    );
    assert_eq!(dispatcher.buffered(), 0);
    let mut decoder = FrameDecoder::new();
    decoder.push(&out).unwrap();
    for stream_id in [1, 3, 5] {
        assert_eq!(decoder.next_frame().unwrap().unwrap().stream_id, stream_id);
    }
}

#[test]
fn dispatcher_refuses_hostile_headers() {
    let huge = FrameHeader {
        length: u32::MAX,
        stream_id: 1,
        frame_type: 1,
        flags: 0,
    };
    let mut out = Vec::new();
    let err = Dispatcher::new()
        .handle_bytes(&mut CheckOnly, &huge.to_bytes(), &mut out)
        .unwrap_err();
    assert!(matches!(
        err,
        FrameError::TooLarge {
            max: MAX_PAYLOAD_LEN,
            ..
        }
    ));
    let data_frame = FrameHeader {
        frame_type: 3,
        length: 0,
        ..huge
    };
    let err = Dispatcher::new()
        .handle_bytes(&mut CheckOnly, &data_frame.to_bytes(), &mut out)
        .unwrap_err();
    assert!(matches!(
        err,
        FrameError::UnsupportedType { frame_type: 3, .. }
    ));
    assert!(out.is_empty());
}

#[test]
fn random_input_never_panics() {
    // xorshift64: deterministic noise, some of it shaped like frames.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..2000 {
        let len = (next() % 64) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if round % 2 == 0 && bytes.len() >= HEADER_LEN {
            // Plausible header: small length, request type.
            let payload_len = (bytes.len() - HEADER_LEN) as u32;
            bytes[..4].copy_from_slice(&payload_len.to_be_bytes());
            bytes[8] = 1;
        }
        let mut out = Vec::new();
        let _ = Dispatcher::new().handle_bytes(&mut CheckOnly, &bytes, &mut out);
        if let Ok(frame) = Frame::decode(&bytes) {
            assert!(!serve_frame(&mut CheckOnly, &frame).is_empty());
        }
    }
}
