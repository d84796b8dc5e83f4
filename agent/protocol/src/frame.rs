//! ttrpc framing: a 10-byte header then a protobuf payload.
//!
//! Header layout (containerd/ttrpc `channel.go`), all big-endian:
//! `length: u32` (payload bytes, header excluded), `stream_id: u32`,
//! `type: u8` (1 request, 2 response), `flags: u8`.
//!
//! Input is hostile: lengths are checked against a maximum before anything is
//! buffered, and every malformed input is an error, never a panic.

use alloc::vec::Vec;
use core::fmt;

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 10;

/// Largest payload accepted or sent: 4 MiB, ttrpc's `messageLengthMax`.
pub const MAX_PAYLOAD_LEN: usize = 4 << 20;

/// What a frame carries. ttrpc's streaming `data` frames (type 3) are not used
/// by this protocol and are rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameType {
    /// A call from client to server (wire value 1).
    Request,
    /// A reply from server to client (wire value 2).
    Response,
}

impl FrameType {
    /// The wire value.
    pub const fn to_u8(self) -> u8 {
        match self {
            FrameType::Request => 1,
            FrameType::Response => 2,
        }
    }

    /// The type for a wire value, `None` if unsupported.
    pub const fn from_u8(value: u8) -> Option<FrameType> {
        match value {
            1 => Some(FrameType::Request),
            2 => Some(FrameType::Response),
            _ => None,
        }
    }
}

/// A frame header as it is on the wire, before validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload length in bytes.
    pub length: u32,
    /// Stream the frame belongs to; a response carries its request's id.
    pub stream_id: u32,
    /// Raw frame type.
    pub frame_type: u8,
    /// Type-specific flags (unused here: sent as 0, ignored on receipt).
    pub flags: u8,
}

impl FrameHeader {
    /// Parses the 10 header bytes.
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> FrameHeader {
        FrameHeader {
            length: u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            stream_id: u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            frame_type: bytes[8],
            flags: bytes[9],
        }
    }

    /// The 10 header bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&self.length.to_be_bytes());
        out[4..8].copy_from_slice(&self.stream_id.to_be_bytes());
        out[8] = self.frame_type;
        out[9] = self.flags;
        out
    }

    /// Checks type and length; returns the type and payload length.
    pub fn validate(&self, max_payload: usize) -> Result<(FrameType, usize), FrameError> {
        let length = self.length as usize;
        if length > max_payload {
            return Err(FrameError::TooLarge {
                stream_id: self.stream_id,
                length,
                max: max_payload,
            });
        }
        match FrameType::from_u8(self.frame_type) {
            Some(frame_type) => Ok((frame_type, length)),
            None => Err(FrameError::UnsupportedType {
                stream_id: self.stream_id,
                frame_type: self.frame_type,
            }),
        }
    }
}

/// One ttrpc message: header fields plus payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Stream id; clients use odd ids, a response repeats its request's id.
    pub stream_id: u32,
    /// Request or response.
    pub frame_type: FrameType,
    /// Header flags (0 for everything this crate sends).
    pub flags: u8,
    /// The encoded ttrpc `Request` or `Response`.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A request frame.
    pub fn request(stream_id: u32, payload: Vec<u8>) -> Frame {
        Frame {
            stream_id,
            frame_type: FrameType::Request,
            flags: 0,
            payload,
        }
    }

    /// A response frame.
    pub fn response(stream_id: u32, payload: Vec<u8>) -> Frame {
        Frame {
            stream_id,
            frame_type: FrameType::Response,
            flags: 0,
            payload,
        }
    }

    /// Appends the wire bytes to `out`; fails if the payload is over
    /// [`MAX_PAYLOAD_LEN`].
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let length = self.payload.len();
        if length > MAX_PAYLOAD_LEN {
            return Err(FrameError::TooLarge {
                stream_id: self.stream_id,
                length,
                max: MAX_PAYLOAD_LEN,
            });
        }
        let header = FrameHeader {
            // Fits: checked against MAX_PAYLOAD_LEN above.
            length: length as u32,
            stream_id: self.stream_id,
            frame_type: self.frame_type.to_u8(),
            flags: self.flags,
        };
        out.reserve(HEADER_LEN + length);
        out.extend_from_slice(&header.to_bytes());
        out.extend_from_slice(&self.payload);
        Ok(())
    }

    /// The wire bytes; fails if the payload is over [`MAX_PAYLOAD_LEN`].
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::new();
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Decodes exactly one frame that fills all of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Frame, FrameError> {
        let mut decoder = FrameDecoder::new();
        decoder.push(bytes)?;
        let frame = decoder.next_frame()?.ok_or(FrameError::Truncated {
            buffered: bytes.len(),
        })?;
        match decoder.buffered() {
            0 => Ok(frame),
            extra => Err(FrameError::TrailingBytes { extra }),
        }
    }
}

/// Why bytes are not a valid frame stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// A payload length over the maximum.
    TooLarge {
        /// Stream id from the header.
        stream_id: u32,
        /// Declared or actual payload length.
        length: usize,
        /// The limit it exceeds.
        max: usize,
    },
    /// A frame type other than request (1) or response (2).
    UnsupportedType {
        /// Stream id from the header.
        stream_id: u32,
        /// The raw type byte.
        frame_type: u8,
    },
    /// Input ended inside a frame.
    Truncated {
        /// Bytes of the incomplete frame that did arrive.
        buffered: usize,
    },
    /// Bytes left after the one frame expected.
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// More input was pushed than a decoder holds without it being drained.
    BufferFull {
        /// The decoder's buffer limit.
        limit: usize,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLarge {
                stream_id,
                length,
                max,
            } => write!(
                f,
                "frame on stream {stream_id} has a {length}-byte payload, over the {max}-byte limit"
            ),
            FrameError::UnsupportedType {
                stream_id,
                frame_type,
            } => write!(
                f,
                "frame on stream {stream_id} has unsupported type {frame_type} (expected 1 request or 2 response)"
            ),
            FrameError::Truncated { buffered } => {
                write!(f, "input ended inside a frame ({buffered} bytes of it received)")
            }
            FrameError::TrailingBytes { extra } => {
                write!(f, "{extra} unexpected bytes after the frame")
            }
            FrameError::BufferFull { limit } => {
                write!(f, "frame decoder buffer full ({limit} bytes) without a complete frame being taken")
            }
        }
    }
}

impl core::error::Error for FrameError {}

/// Reassembles frames from bytes as they arrive, in any split.
///
/// Feed it with [`push`](Self::push), then take frames with
/// [`next_frame`](Self::next_frame) until it returns `Ok(None)`. A header is
/// checked as soon as its 10 bytes are in, so an oversized or unknown frame is
/// refused before its payload is buffered. After an error the stream is out of
/// sync: every later call returns the same error, and the connection should be
/// dropped.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max_payload: usize,
    error: Option<FrameError>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new()
    }
}

impl FrameDecoder {
    /// A decoder accepting payloads up to [`MAX_PAYLOAD_LEN`].
    pub fn new() -> FrameDecoder {
        FrameDecoder::with_max_payload(MAX_PAYLOAD_LEN)
    }

    /// A decoder accepting payloads up to `max_payload` bytes.
    pub fn with_max_payload(max_payload: usize) -> FrameDecoder {
        FrameDecoder {
            buf: Vec::new(),
            max_payload,
            error: None,
        }
    }

    /// Most bytes held at once: one largest frame plus as much again of
    /// following input, which a caller draining after every push never reaches.
    fn buffer_limit(&self) -> usize {
        (HEADER_LEN + self.max_payload).saturating_mul(2)
    }

    /// Adds received bytes. Fails if the frame at the front has a bad header,
    /// or if more is pushed than the buffer limit without draining frames.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        self.check_error()?;
        let limit = self.buffer_limit();
        if bytes.len() > limit - self.buf.len().min(limit) {
            return self.fail(FrameError::BufferFull { limit });
        }
        self.buf.extend_from_slice(bytes);
        self.front_header().map(|_| ())
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        self.check_error()?;
        let Some((header, frame_type, length)) = self.front_header()? else {
            return Ok(None);
        };
        let end = HEADER_LEN + length;
        if self.buf.len() < end {
            return Ok(None);
        }
        let payload = self.buf[HEADER_LEN..end].to_vec();
        self.buf.drain(..end);
        Ok(Some(Frame {
            stream_id: header.stream_id,
            frame_type,
            flags: header.flags,
            payload,
        }))
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Call at end of input: an error if a frame was left incomplete.
    pub fn finish(&self) -> Result<(), FrameError> {
        self.check_error()?;
        match self.buf.len() {
            0 => Ok(()),
            buffered => Err(FrameError::Truncated { buffered }),
        }
    }

    /// Parses and validates the header at the front, if all of it is in.
    fn front_header(&mut self) -> Result<Option<(FrameHeader, FrameType, usize)>, FrameError> {
        let Some(bytes) = self.buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = FrameHeader::parse(bytes);
        match header.validate(self.max_payload) {
            Ok((frame_type, length)) => Ok(Some((header, frame_type, length))),
            Err(e) => self.fail(e),
        }
    }

    fn check_error(&self) -> Result<(), FrameError> {
        match &self.error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn fail<T>(&mut self, error: FrameError) -> Result<T, FrameError> {
        self.buf = Vec::new();
        self.error = Some(error.clone());
        Err(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn header(length: u32, stream_id: u32, frame_type: u8) -> [u8; HEADER_LEN] {
        FrameHeader {
            length,
            stream_id,
            frame_type,
            flags: 0,
        }
        .to_bytes()
    }

    #[test]
    fn header_layout_is_big_endian() {
        let bytes = header(0x0102_0304, 0x0506_0708, 2);
        assert_eq!(bytes, [1, 2, 3, 4, 5, 6, 7, 8, 2, 0]);
    }

    #[test]
    fn encode_decode_round_trip() {
        let frame = Frame::request(7, vec![1, 2, 3]);
        let bytes = frame.encode().unwrap();
        assert_eq!(bytes.len(), HEADER_LEN + 3);
        assert_eq!(Frame::decode(&bytes).unwrap(), frame);
    }

    #[test]
    fn empty_payload_frame() {
        let frame = Frame::response(1, Vec::new());
        assert_eq!(Frame::decode(&frame.encode().unwrap()).unwrap(), frame);
    }

    #[test]
    fn decoder_one_byte_at_a_time() {
        let frames = [
            Frame::request(1, vec![9; 300]),
            Frame::response(1, Vec::new()),
            Frame::request(3, vec![0xab]),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            f.encode_into(&mut wire).unwrap();
        }
        let mut decoder = FrameDecoder::new();
        let mut got = Vec::new();
        for byte in wire {
            decoder.push(&[byte]).unwrap();
            while let Some(f) = decoder.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
        decoder.finish().unwrap();
    }

    #[test]
    fn huge_length_is_refused_from_the_header_alone() {
        let mut decoder = FrameDecoder::new();
        let err = decoder.push(&header(u32::MAX, 1, 1)).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { length, .. } if length == u32::MAX as usize));
        assert_eq!(decoder.buffered(), 0);
        // Sticky: the stream is out of sync.
        assert_eq!(decoder.next_frame().unwrap_err(), err);
        assert_eq!(decoder.push(&[0]).unwrap_err(), err);
    }

    #[test]
    fn limit_is_inclusive() {
        let mut decoder = FrameDecoder::with_max_payload(4);
        decoder.push(&header(4, 1, 2)).unwrap();
        decoder.push(&[0; 4]).unwrap();
        assert!(decoder.next_frame().unwrap().is_some());
        assert!(decoder.push(&header(5, 3, 2)).is_err());
    }

    #[test]
    fn oversize_frame_is_not_encoded() {
        let frame = Frame::response(1, vec![0; MAX_PAYLOAD_LEN + 1]);
        assert!(matches!(
            frame.encode(),
            Err(FrameError::TooLarge { length, .. }) if length == MAX_PAYLOAD_LEN + 1
        ));
    }

    #[test]
    fn unknown_types_are_refused() {
        for frame_type in [0u8, 3, 4, 0xff] {
            let err = Frame::decode(&header(0, 5, frame_type)).unwrap_err();
            assert_eq!(
                err,
                FrameError::UnsupportedType {
                    stream_id: 5,
                    frame_type
                }
            );
        }
    }

    #[test]
    fn truncated_input_is_an_error_at_end() {
        let bytes = Frame::request(1, vec![1, 2, 3]).encode().unwrap();
        for cut in 1..bytes.len() {
            assert_eq!(
                Frame::decode(&bytes[..cut]).unwrap_err(),
                FrameError::Truncated { buffered: cut }
            );
        }
        let mut decoder = FrameDecoder::new();
        decoder.push(&bytes[..5]).unwrap();
        assert_eq!(decoder.next_frame().unwrap(), None);
        assert_eq!(
            decoder.finish().unwrap_err(),
            FrameError::Truncated { buffered: 5 }
        );
    }

    #[test]
    fn trailing_bytes_are_an_error_for_single_decode() {
        let mut bytes = Frame::request(1, vec![]).encode().unwrap();
        bytes.push(0);
        assert_eq!(
            Frame::decode(&bytes).unwrap_err(),
            FrameError::TrailingBytes { extra: 1 }
        );
    }

    #[test]
    fn undrained_input_is_bounded() {
        let mut decoder = FrameDecoder::with_max_payload(16);
        let frame = Frame::request(1, vec![0; 16]).encode().unwrap();
        // Complete frames that are never taken pile up only to the limit.
        let mut result = Ok(());
        for _ in 0..10 {
            result = decoder.push(&frame);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(FrameError::BufferFull { limit: 52 }));
        assert!(decoder.buffered() <= 52);
    }
}
