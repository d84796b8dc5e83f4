//! The virtio-vsock packet header and its constants (virtio 1.2 §5.10.6).
//! All fields are little endian; the header is always 44 bytes. One
//! definition for both ends: the host's device model and the test guest's
//! driver, so `no_std`.

#![no_std]

/// Size of `struct virtio_vsock_hdr` (virtio 1.2 §5.10.6).
pub const HDR_LEN: usize = 44;
/// The host's CID (VMADDR_CID_HOST, virtio 1.2 §5.10.4).
pub const HOST_CID: u64 = 2;
/// VIRTIO_VSOCK_TYPE_STREAM (virtio 1.2 §5.10.6).
pub const TYPE_STREAM: u16 = 1;

/// Packet operations (virtio 1.2 §5.10.6).
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset (refused, aborted, or closed).
    pub const RST: u16 = 3;
    /// No more data will be sent and/or received (flags).
    pub const SHUTDOWN: u16 = 4;
    /// Payload bytes.
    pub const RW: u16 = 5;
    /// The sender's buffer space changed.
    pub const CREDIT_UPDATE: u16 = 6;
    /// The sender asks for a CREDIT_UPDATE.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flag: the sender will receive no more data (virtio 1.2 §5.10.6.5).
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data (virtio 1.2 §5.10.6.5).
pub const SHUTDOWN_SEND: u32 = 2;
/// Both SHUTDOWN flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Event id VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (virtio 1.2 §5.10.6.8), sent
/// on the event queue as a 4-byte little-endian `struct virtio_vsock_event`.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// `struct virtio_vsock_hdr`, decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketHeader {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length in bytes.
    pub len: u32,
    /// Socket type (only STREAM here).
    pub type_: u16,
    /// Operation, one of [`op`].
    pub op: u16,
    /// Operation flags (SHUTDOWN).
    pub flags: u32,
    /// Sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

fn u16_at(b: &[u8; HDR_LEN], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8; HDR_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8; HDR_LEN], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

impl PacketHeader {
    /// Decode a header.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        PacketHeader {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    /// Decode the first `HDR_LEN` bytes of `b`; None if `b` is shorter.
    pub fn decode(b: &[u8]) -> Option<Self> {
        b.get(..HDR_LEN)
            .and_then(|h| <&[u8; HDR_LEN]>::try_from(h).ok())
            .map(Self::from_bytes)
    }

    /// Write the header into the first `HDR_LEN` bytes of `b`, which must be
    /// at least that long.
    pub fn encode(&self, b: &mut [u8]) {
        b[..HDR_LEN].copy_from_slice(&self.to_bytes());
    }

    /// Encode the header.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The RST that answers this packet (addresses swapped).
    pub fn reset_reply(&self) -> PacketHeader {
        PacketHeader {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_is_the_spec_layout() {
        let h = PacketHeader {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x1122_3344,
            dst_port: 1024,
            len: 5,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 0x4_0000,
            fwd_cnt: 7,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[16..20], &0x1122_3344u32.to_le_bytes());
        assert_eq!(&b[28..32], &[1, 0, 5, 0]);
        assert_eq!(&b[40..44], &7u32.to_le_bytes());
        assert_eq!(PacketHeader::from_bytes(&b), h);
        assert_eq!(PacketHeader::decode(&b), Some(h));
        assert_eq!(PacketHeader::decode(&b[..43]), None);
        let mut longer = [0xffu8; HDR_LEN + 4];
        h.encode(&mut longer);
        assert_eq!(PacketHeader::decode(&longer), Some(h));
        let r = h.reset_reply();
        assert_eq!(
            (r.src_cid, r.dst_port, r.op),
            (HOST_CID, 0x1122_3344, op::RST)
        );
    }
}
