//! The agent's side: routes request frames to an [`AgentService`] and builds
//! the response frames. no_std; the transport (vsock) belongs to the caller.

use alloc::format;
use alloc::vec::Vec;

use prost::Message;

use crate::agent::{dispatch_agent_service, AgentService, AGENT_SERVICE_NAME};
use crate::frame::{Frame, FrameDecoder, FrameError, FrameType, MAX_PAYLOAD_LEN};
use crate::status::{Code, Status};
use crate::ttrpc;

/// Answers one frame: decodes the ttrpc request, routes it by service and
/// method to `service`, and returns the encoded response frame on the same
/// stream id. Every failure becomes a status in the response: unknown
/// service or method UNIMPLEMENTED, undecodable input INVALID_ARGUMENT, a
/// reply too large to frame RESOURCE_EXHAUSTED. Never panics on input.
pub fn serve_frame<S: AgentService + ?Sized>(service: &mut S, frame: &Frame) -> Vec<u8> {
    let outcome = match frame.frame_type {
        FrameType::Request => handle_request(service, &frame.payload),
        FrameType::Response => Err(Status::invalid_argument(format!(
            "stream {}: expected a request frame, got a response",
            frame.stream_id
        ))),
    };
    encode_response(frame.stream_id, outcome)
}

/// One connection's server state: buffers partial frames between reads.
///
/// Create one per accepted connection; the [`AgentService`] can be shared by
/// all of them.
#[derive(Debug, Default)]
pub struct Dispatcher {
    decoder: FrameDecoder,
}

impl Dispatcher {
    /// A dispatcher for a new connection.
    pub fn new() -> Dispatcher {
        Dispatcher::default()
    }

    /// Takes bytes read from the connection, serves every request they
    /// complete and appends the response frames to `out` (to be written back).
    /// Returns how many requests were served. An error means the byte stream
    /// is unusable (oversize or unknown frame) and the connection should be
    /// closed; responses already appended to `out` are still valid.
    pub fn handle_bytes<S: AgentService + ?Sized>(
        &mut self,
        service: &mut S,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<usize, FrameError> {
        let mut served = 0;
        // Push in pieces no bigger than one frame so a large read never trips
        // the decoder's buffer limit while complete frames are waiting.
        for chunk in input.chunks(MAX_PAYLOAD_LEN) {
            self.decoder.push(chunk)?;
            while let Some(frame) = self.decoder.next_frame()? {
                out.extend_from_slice(&serve_frame(service, &frame));
                served += 1;
            }
        }
        Ok(served)
    }

    /// Bytes of an incomplete frame held for the next read.
    pub fn buffered(&self) -> usize {
        self.decoder.buffered()
    }
}

/// Decodes a request message for `service/method`; INVALID_ARGUMENT if the
/// payload is not one. Used by the generated dispatcher.
pub fn decode_request<M: Message + Default>(
    service: &str,
    method: &str,
    payload: &[u8],
) -> Result<M, Status> {
    M::decode(payload).map_err(|e| {
        Status::invalid_argument(format!("{service}/{method}: undecodable request: {e}"))
    })
}

fn handle_request<S: AgentService + ?Sized>(
    service: &mut S,
    payload: &[u8],
) -> Result<Vec<u8>, Status> {
    let request = ttrpc::Request::decode(payload)
        .map_err(|e| Status::invalid_argument(format!("undecodable ttrpc request: {e}")))?;
    if request.service != AGENT_SERVICE_NAME {
        return Err(Status::unimplemented(format!(
            "unknown service {:?} (method {:?}); this agent serves {AGENT_SERVICE_NAME}",
            request.service, request.method
        )));
    }
    dispatch_agent_service(service, &request.method, &request.payload)
}

fn encode_response(stream_id: u32, outcome: Result<Vec<u8>, Status>) -> Vec<u8> {
    let response = match outcome {
        // Like containerd's ttrpc server, success carries an explicit OK status.
        Ok(payload) => ttrpc::Response {
            status: Some(ttrpc::Status {
                code: Code::Ok as i32,
                message: Default::default(),
            }),
            payload,
        },
        Err(status) => error_response(&status),
    };
    let frame = Frame::response(stream_id, response.encode_to_vec());
    match frame.encode() {
        Ok(bytes) => bytes,
        Err(e) => {
            let status = Status::new(Code::ResourceExhausted, format!("reply not sent: {e}"));
            let frame = Frame::response(stream_id, error_response(&status).encode_to_vec());
            // A status-only response is a few dozen bytes, far below the limit.
            frame.encode().unwrap_or_default()
        }
    }
}

fn error_response(status: &Status) -> ttrpc::Response {
    ttrpc::Response {
        status: Some(status.to_wire()),
        payload: Vec::new(),
    }
}
