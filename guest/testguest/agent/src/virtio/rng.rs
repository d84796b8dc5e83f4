//! virtio-rng (entropy device, virtio 1.2 §5.4): one request queue; the
//! device fills the buffers it is given with entropy. The agent keeps at
//! most one request in flight and mixes what comes back into its CSPRNG.

use alloc::boxed::Box;

use super::queue::{Buffer, SplitQueue};
use super::{MmioDevice, SetupError};

/// Bytes asked for per request.
pub const REQUEST_BYTES: usize = 64;
/// Entries of the request queue (one request at a time needs one).
const QUEUE_SIZE: u16 = 4;

/// The entropy device.
pub struct EntropyDevice {
    pub mmio: MmioDevice,
    queue: SplitQueue<Box<[u8; REQUEST_BYTES]>>,
    in_flight: bool,
}

impl EntropyDevice {
    /// Initializes the device (virtio 1.2 §3.1.1).
    pub fn new(mmio: MmioDevice) -> Result<EntropyDevice, SetupError> {
        mmio.begin_init(0)?;
        let queue = SplitQueue::new(QUEUE_SIZE);
        mmio.setup_queue(0, &queue)?;
        mmio.finish_init();
        Ok(EntropyDevice {
            mmio,
            queue,
            in_flight: false,
        })
    }

    /// Asks for `REQUEST_BYTES` of entropy unless a request is in flight.
    pub fn request(&mut self) {
        if self.in_flight {
            return;
        }
        let buf = Box::new([0u8; REQUEST_BYTES]);
        let chain = [Buffer {
            addr: buf.as_ptr() as u64,
            len: REQUEST_BYTES as u32,
            device_writable: true,
        }];
        if self.queue.push(&chain, buf).is_ok() {
            self.in_flight = true;
            if self.queue.needs_notification() {
                self.mmio.notify(0);
            }
        }
    }

    /// Hands entropy that arrived to `absorb`; returns whether any did.
    pub fn poll(&mut self, mut absorb: impl FnMut(&[u8])) -> bool {
        let mut any = false;
        while let Some(used) = self.queue.pop_used() {
            self.in_flight = false;
            let n = (used.len as usize).min(REQUEST_BYTES);
            absorb(&used.token[..n]);
            any = n > 0 || any;
        }
        any
    }
}
