//! Call outcomes: google.rpc status codes as ttrpc carries them.

use alloc::format;
use alloc::string::String;
use core::fmt;

use crate::ttrpc;

/// A google.rpc.Code (google/rpc/code.proto), the error space of ttrpc.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum Code {
    /// Not an error.
    Ok = 0,
    /// Cancelled by the caller.
    Cancelled = 1,
    /// Unknown error, or a code outside this list.
    Unknown = 2,
    /// The request was malformed.
    InvalidArgument = 3,
    /// The deadline expired first.
    DeadlineExceeded = 4,
    /// A requested entity was not found.
    NotFound = 5,
    /// The entity already exists.
    AlreadyExists = 6,
    /// The caller may not do this.
    PermissionDenied = 7,
    /// A resource (quota, memory, message size) ran out.
    ResourceExhausted = 8,
    /// The system is not in the state the call needs.
    FailedPrecondition = 9,
    /// Aborted by a concurrency conflict.
    Aborted = 10,
    /// A value was out of range.
    OutOfRange = 11,
    /// The service or method is not implemented.
    Unimplemented = 12,
    /// An internal invariant broke.
    Internal = 13,
    /// Transiently unavailable; retrying may help.
    Unavailable = 14,
    /// Unrecoverable data loss.
    DataLoss = 15,
    /// No valid credentials.
    Unauthenticated = 16,
}

impl Code {
    /// The code for a wire value, `None` if outside google.rpc.Code.
    pub fn from_i32(value: i32) -> Option<Code> {
        use Code::*;
        Some(match value {
            0 => Ok,
            1 => Cancelled,
            2 => Unknown,
            3 => InvalidArgument,
            4 => DeadlineExceeded,
            5 => NotFound,
            6 => AlreadyExists,
            7 => PermissionDenied,
            8 => ResourceExhausted,
            9 => FailedPrecondition,
            10 => Aborted,
            11 => OutOfRange,
            12 => Unimplemented,
            13 => Internal,
            14 => Unavailable,
            15 => DataLoss,
            16 => Unauthenticated,
            _ => return None,
        })
    }

    /// The canonical upper-case name, e.g. `"UNIMPLEMENTED"`.
    pub fn as_str(self) -> &'static str {
        use Code::*;
        match self {
            Ok => "OK",
            Cancelled => "CANCELLED",
            Unknown => "UNKNOWN",
            InvalidArgument => "INVALID_ARGUMENT",
            DeadlineExceeded => "DEADLINE_EXCEEDED",
            NotFound => "NOT_FOUND",
            AlreadyExists => "ALREADY_EXISTS",
            PermissionDenied => "PERMISSION_DENIED",
            ResourceExhausted => "RESOURCE_EXHAUSTED",
            FailedPrecondition => "FAILED_PRECONDITION",
            Aborted => "ABORTED",
            OutOfRange => "OUT_OF_RANGE",
            Unimplemented => "UNIMPLEMENTED",
            Internal => "INTERNAL",
            Unavailable => "UNAVAILABLE",
            DataLoss => "DATA_LOSS",
            Unauthenticated => "UNAUTHENTICATED",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.as_str(), *self as i32)
    }
}

/// A failed call's outcome: what an [`crate::AgentService`] method returns as
/// its error and what the host client reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// What kind of failure.
    pub code: Code,
    /// Developer-facing detail.
    pub message: String,
}

impl Status {
    /// A status with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Status {
        Status {
            code,
            message: message.into(),
        }
    }

    /// INVALID_ARGUMENT: the request was malformed.
    pub fn invalid_argument(message: impl Into<String>) -> Status {
        Status::new(Code::InvalidArgument, message)
    }

    /// UNIMPLEMENTED: the server does not support this.
    pub fn unimplemented(message: impl Into<String>) -> Status {
        Status::new(Code::Unimplemented, message)
    }

    /// INTERNAL: the server failed.
    pub fn internal(message: impl Into<String>) -> Status {
        Status::new(Code::Internal, message)
    }

    /// UNIMPLEMENTED for `service/method`, the answer to an unknown RPC.
    pub fn unimplemented_method(service: &str, method: &str) -> Status {
        Status::unimplemented(format!("{service}/{method} is not implemented"))
    }

    /// Reads a wire status. Codes outside google.rpc.Code become UNKNOWN with
    /// the raw value kept in the message.
    pub fn from_wire(wire: ttrpc::Status) -> Status {
        match Code::from_i32(wire.code) {
            Some(code) => Status::new(code, wire.message),
            None => Status::new(
                Code::Unknown,
                format!("status code {}: {}", wire.code, wire.message),
            ),
        }
    }

    /// The wire form of this status.
    pub fn to_wire(&self) -> ttrpc::Status {
        ttrpc::Status {
            code: self.code as i32,
            message: self.message.clone(),
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl core::error::Error for Status {}
