//! The virtio-vsock packet header: defined once in `vsock-wire`, which the
//! test guest's driver shares.

pub use vsock_wire::*;
