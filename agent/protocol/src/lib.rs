//! The minivmm guest agent protocol: protobuf messages in ttrpc framing, carried
//! over virtio-vsock port [`AGENT_VSOCK_PORT`].
//!
//! One schema (`proto/agent.proto`) serves both ends:
//! - the guest (no_std + alloc): [`AgentService`] is implemented by the agent and
//!   [`server::Dispatcher`] turns bytes read from vsock into reply bytes;
//! - the host (feature `std`, on by default): `client::AgentClient` connects
//!   through the VM's hybrid-vsock unix socket, with a deadline on every call.
//!
//! The crate is always `#![no_std]`; the `std` feature only adds the client.
//! A freestanding guest depends on it with `default-features = false`.

#![no_std]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

#[cfg(feature = "std")]
pub mod client;
pub mod frame;
pub mod server;
mod status;

/// Messages of `minivmm.agent.v1`, the [`AgentService`] trait, its dispatcher
/// and (with `std`) the typed client methods, all generated from
/// `proto/agent.proto` by `build.rs`.
pub mod agent {
    #![allow(clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/minivmm.agent.v1.rs"));
}

/// The ttrpc envelope (`Request`, `Response`, `Status`) carried in frame
/// payloads, generated from `proto/ttrpc.proto`.
pub mod ttrpc {
    #![allow(clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/ttrpc.rs"));
}

pub use agent::*;
#[cfg(feature = "std")]
pub use client::{AgentClient, ClientError};
pub use frame::{Frame, FrameDecoder, FrameError, FrameType};
pub use server::{serve_frame, Dispatcher};
pub use status::{Code, Status};

/// Version of this protocol, reported by the agent in `Check` and
/// `GetGuestDetails`; bumped on incompatible changes to `proto/agent.proto`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;
