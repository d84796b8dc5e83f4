//! virtio-mem (memory device, virtio 1.2 §5.15), the driver's side: the
//! device offers a region above RAM; when the host raises `requested_size`
//! (a configuration-change interrupt) the driver plugs blocks from the start
//! of the region up, one PLUG request at a time, and the agent uses what is
//! plugged (`TouchMemory`, `GetGuestDetails.memory_bytes`). When the host
//! lowers it the driver unplugs from the top.

use alloc::boxed::Box;

use super::queue::{Buffer, SplitQueue};
use super::{MmioDevice, SetupError};

/// Device ID (virtio 1.2 §5).
pub const DEVICE_ID_MEM: u32 = 24;

// Configuration offsets (virtio 1.2 §5.15.4).
const CFG_BLOCK_SIZE: usize = 0;
const CFG_ADDR: usize = 16;
const CFG_REGION_SIZE: usize = 24;
const CFG_USABLE_REGION_SIZE: usize = 32;
const CFG_PLUGGED_SIZE: usize = 40;
const CFG_REQUESTED_SIZE: usize = 48;

const REQ_PLUG: u16 = 0;
const REQ_UNPLUG: u16 = 1;
const REQ_UNPLUG_ALL: u16 = 2;
const RESP_ACK: u16 = 0;

const REQ_SIZE: usize = 24;
const RESP_SIZE: usize = 10;
/// Most blocks one request names (`nb_blocks` is 16 bits).
const MAX_BLOCKS_PER_REQUEST: u64 = 0xffff;
const QUEUE_SIZE: u16 = 4;
/// The test guest reaches only its identity map.
const IDENTITY_MAP_END: u64 = 16 << 30;

/// One request and room for its response.
struct Request {
    bytes: [u8; REQ_SIZE + RESP_SIZE],
    /// What the request changes if acknowledged: the new plugged size.
    plugged_after: u64,
}

/// The memory device.
pub struct MemDevice {
    pub mmio: MmioDevice,
    queue: SplitQueue<Box<Request>>,
    block_size: u64,
    addr: u64,
    usable: u64,
    /// Bytes plugged, from `addr` up, without a gap.
    plugged: u64,
    in_flight: bool,
}

/// What the device says about itself, checked before the driver uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: u64,
    pub addr: u64,
    pub usable: u64,
}

impl Geometry {
    /// The region, if the device's values are sane for this guest: block
    /// size a power of two of at least 4 KiB, region block aligned and
    /// inside the identity map.
    pub fn check(block_size: u64, addr: u64, region: u64, usable: u64) -> Option<Geometry> {
        if !block_size.is_power_of_two() || block_size < 4096 {
            return None;
        }
        let usable = usable.min(region);
        if !addr.is_multiple_of(block_size) || !usable.is_multiple_of(block_size) {
            return None;
        }
        let end = addr.checked_add(usable)?;
        (end <= IDENTITY_MAP_END).then_some(Geometry {
            block_size,
            addr,
            usable,
        })
    }

    /// The next request toward `requested` from `plugged`: (type, address,
    /// blocks, plugged size afterwards), None if nothing is to do.
    pub fn next_request(&self, plugged: u64, requested: u64) -> Option<(u16, u64, u16, u64)> {
        let requested = requested.min(self.usable) / self.block_size * self.block_size;
        if requested > plugged {
            let blocks = ((requested - plugged) / self.block_size).min(MAX_BLOCKS_PER_REQUEST);
            let after = plugged + blocks * self.block_size;
            Some((REQ_PLUG, self.addr + plugged, blocks as u16, after))
        } else if requested < plugged {
            let blocks = ((plugged - requested) / self.block_size).min(MAX_BLOCKS_PER_REQUEST);
            let after = plugged - blocks * self.block_size;
            Some((REQ_UNPLUG, self.addr + after, blocks as u16, after))
        } else {
            None
        }
    }
}

/// Why the device cannot be used.
#[derive(Clone, Copy, Debug)]
pub enum MemSetupError {
    Setup(SetupError),
    /// The configuration is not usable (see `Geometry::check`).
    Geometry,
}

impl core::fmt::Display for MemSetupError {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self {
            MemSetupError::Setup(e) => e.fmt(f),
            MemSetupError::Geometry => write!(f, "unusable region or block size"),
        }
    }
}

impl MemDevice {
    /// Initializes the device (virtio 1.2 §3.1.1) and reads its region.
    pub fn new(mmio: MmioDevice) -> Result<MemDevice, MemSetupError> {
        mmio.begin_init(0).map_err(MemSetupError::Setup)?;
        let g = Geometry::check(
            mmio.config_u64(CFG_BLOCK_SIZE),
            mmio.config_u64(CFG_ADDR),
            mmio.config_u64(CFG_REGION_SIZE),
            mmio.config_u64(CFG_USABLE_REGION_SIZE),
        )
        .ok_or(MemSetupError::Geometry)?;
        let queue = SplitQueue::new(QUEUE_SIZE);
        mmio.setup_queue(0, &queue).map_err(MemSetupError::Setup)?;
        mmio.finish_init();
        let mut dev = MemDevice {
            mmio,
            queue,
            block_size: g.block_size,
            addr: g.addr,
            usable: g.usable,
            plugged: 0,
            in_flight: false,
        };
        // A fresh driver starts from nothing plugged (virtio 1.2 §5.15.5.1).
        if dev.mmio.config_u64(CFG_PLUGGED_SIZE) != 0 {
            dev.send(REQ_UNPLUG_ALL, 0, 0, 0);
        }
        Ok(dev)
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            block_size: self.block_size,
            addr: self.addr,
            usable: self.usable,
        }
    }

    fn send(&mut self, kind: u16, addr: u64, blocks: u16, plugged_after: u64) {
        let mut req = Box::new(Request {
            bytes: [0; REQ_SIZE + RESP_SIZE],
            plugged_after,
        });
        req.bytes[0..2].copy_from_slice(&kind.to_le_bytes());
        req.bytes[8..16].copy_from_slice(&addr.to_le_bytes());
        req.bytes[16..18].copy_from_slice(&blocks.to_le_bytes());
        let base = req.bytes.as_ptr() as u64;
        let chain = [
            Buffer {
                addr: base,
                len: REQ_SIZE as u32,
                device_writable: false,
            },
            Buffer {
                addr: base + REQ_SIZE as u64,
                len: RESP_SIZE as u32,
                device_writable: true,
            },
        ];
        if self.queue.push(&chain, req).is_ok() {
            self.in_flight = true;
            if self.queue.needs_notification() {
                self.mmio.notify(0);
            }
        }
    }

    /// Takes the device's answers and, if `config_changed` or an answer
    /// arrived, moves toward the requested size. Returns whether the
    /// plugged size changed.
    pub fn poll(&mut self, config_changed: bool) -> bool {
        let mut changed = false;
        let mut answered = false;
        while let Some(used) = self.queue.pop_used() {
            self.in_flight = false;
            answered = true;
            let r = &used.token.bytes[REQ_SIZE..];
            let kind = u16::from_le_bytes([used.token.bytes[0], used.token.bytes[1]]);
            if used.len as usize >= 2 && u16::from_le_bytes([r[0], r[1]]) == RESP_ACK {
                if kind == REQ_UNPLUG_ALL {
                    self.plugged = 0;
                } else {
                    self.plugged = used.token.plugged_after;
                }
                changed = true;
            }
        }
        if (config_changed || answered) && !self.in_flight {
            let requested = self.mmio.config_u64(CFG_REQUESTED_SIZE);
            if let Some((kind, addr, blocks, after)) =
                self.geometry().next_request(self.plugged, requested)
            {
                self.send(kind, addr, blocks, after);
            }
        }
        changed
    }

    /// Guest-physical start of the plugged memory.
    pub fn base(&self) -> u64 {
        self.addr
    }

    /// Bytes plugged from `base` up.
    pub fn plugged(&self) -> u64 {
        self.plugged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB2: u64 = 2 << 20;

    #[test]
    fn geometry_is_checked() {
        assert!(Geometry::check(MB2, 4 << 30, 2 << 30, 2 << 30).is_some());
        assert!(Geometry::check(3 << 20, 4 << 30, 2 << 30, 2 << 30).is_none());
        assert!(Geometry::check(0, 4 << 30, 2 << 30, 2 << 30).is_none());
        assert!(Geometry::check(MB2, (4 << 30) + 4096, 2 << 30, 2 << 30).is_none());
        assert!(Geometry::check(MB2, 15 << 30, 2 << 30, 2 << 30).is_none());
        assert!(Geometry::check(MB2, u64::MAX - MB2 + 1, MB2, MB2).is_none());
        // usable is capped at the region.
        let g = Geometry::check(MB2, 4 << 30, MB2, 1 << 40).unwrap();
        assert_eq!(g.usable, MB2);
    }

    #[test]
    fn requests_move_toward_the_requested_size() {
        let g = Geometry::check(MB2, 4 << 30, 8 * MB2, 8 * MB2).unwrap();
        assert_eq!(g.next_request(0, 0), None);
        assert_eq!(
            g.next_request(0, 3 * MB2),
            Some((REQ_PLUG, 4 << 30, 3, 3 * MB2))
        );
        // Beyond the region and between blocks: capped, rounded down.
        assert_eq!(
            g.next_request(0, 100 * MB2 + 5),
            Some((REQ_PLUG, 4 << 30, 8, 8 * MB2))
        );
        assert_eq!(
            g.next_request(3 * MB2, MB2),
            Some((REQ_UNPLUG, (4 << 30) + MB2, 2, MB2))
        );
        assert_eq!(g.next_request(3 * MB2, 3 * MB2 + 7), None);
    }
}
