//! The virtio-vsock packet header (virtio 1.2 §5.10.6): defined once in
//! `vsock-wire`, shared with the host's device model.

pub use vsock_wire::{
    op, PacketHeader as Header, EVENT_TRANSPORT_RESET, HDR_LEN, HOST_CID, SHUTDOWN_RCV,
    SHUTDOWN_SEND, TYPE_STREAM,
};
