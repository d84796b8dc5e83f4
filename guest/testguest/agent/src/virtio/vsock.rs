//! virtio-vsock (socket device, virtio 1.2 §5.10), the driver: the rx, tx
//! and event queues and their buffers. Connections are `crate::vsock`'s.
//!
//! rx: `RX_BUFFERS` device-writable buffers of one header plus 4 KiB are
//! posted at all times; each is reposted as soon as its packet was handled.
//! Reposting notifies the device only if it may have run out (every buffer
//! it had came back): it reads the available ring afresh whenever it needs a
//! buffer, so it only waits for a notification after finding it empty, and a
//! notification is a costly exit to the VMM.
//! tx: every packet is one device-readable buffer (header and payload
//! together), freed when the device is done with it. event: a few 4-byte
//! `virtio_vsock_event` buffers, reposted after each event and then the
//! device notified (unless it asked not to be), as Linux's driver does: a
//! device may hold host-to-guest traffic after a transport reset until the
//! driver has given its event buffers back (Firecracker 1.16 does).

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;

use super::queue::{Buffer, SplitQueue};
use super::{MmioDevice, SetupError};
use crate::vsock::packet::{Header, EVENT_TRANSPORT_RESET, HDR_LEN};

/// Queue indexes (virtio 1.2 §5.10.2).
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const EVENT_QUEUE: u16 = 2;
/// Payload room of one rx buffer.
pub const RX_PAYLOAD: usize = 4096;
/// rx buffers kept posted.
pub const RX_BUFFERS: u16 = 64;
/// tx queue entries (packets in flight to the device).
const TX_QUEUE_SIZE: u16 = 128;
/// Event buffers kept posted.
const EVENT_BUFFERS: u16 = 4;
/// `guest_cid` in the configuration space (virtio 1.2 §5.10.4).
const CONFIG_GUEST_CID: usize = 0;

/// The socket device.
pub struct VsockDevice {
    pub mmio: MmioDevice,
    rx: SplitQueue<Box<[u8]>>,
    tx: SplitQueue<Vec<u8>>,
    event: SplitQueue<Box<[u8; 4]>>,
    tx_pushed: bool,
}

/// What the event queue said.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Events {
    /// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET arrived.
    pub transport_reset: bool,
}

fn writable(buf: &[u8]) -> [Buffer; 1] {
    [Buffer {
        addr: buf.as_ptr() as u64,
        len: buf.len() as u32,
        device_writable: true,
    }]
}

impl VsockDevice {
    /// Initializes the device (virtio 1.2 §3.1.1) with every rx and event
    /// buffer posted. The device is live when this returns.
    pub fn new(mmio: MmioDevice) -> Result<VsockDevice, SetupError> {
        mmio.begin_init(0)?;
        let size = |index: u16, want: u16| -> Result<u16, SetupError> {
            let max = mmio.queue_max(index);
            // The largest power of two the device takes, up to `want`.
            let fit = (1..=want)
                .rev()
                .find(|s| s.is_power_of_two() && u32::from(*s) <= max);
            fit.ok_or(SetupError::Queue { index, max })
        };
        let rx = SplitQueue::new(size(RX_QUEUE, RX_BUFFERS)?);
        let tx = SplitQueue::new(size(TX_QUEUE, TX_QUEUE_SIZE)?);
        let event = SplitQueue::new(size(EVENT_QUEUE, EVENT_BUFFERS)?);
        let mut dev = VsockDevice {
            mmio,
            rx,
            tx,
            event,
            tx_pushed: false,
        };
        dev.mmio.setup_queue(RX_QUEUE, &dev.rx)?;
        dev.mmio.setup_queue(TX_QUEUE, &dev.tx)?;
        dev.mmio.setup_queue(EVENT_QUEUE, &dev.event)?;
        for _ in 0..dev.rx.size() {
            let buf: Box<[u8]> = vec![0u8; HDR_LEN + RX_PAYLOAD].into_boxed_slice();
            let _ = dev.rx.push(&writable(&buf), buf);
        }
        for _ in 0..dev.event.size() {
            let buf = Box::new([0u8; 4]);
            let _ = dev.event.push(&writable(&buf[..]), buf);
        }
        dev.mmio.finish_init();
        // Buffers may be posted before DRIVER_OK, but not announced.
        dev.mmio.notify(RX_QUEUE);
        dev.mmio.notify(EVENT_QUEUE);
        Ok(dev)
    }

    /// Our CID (configuration space).
    pub fn guest_cid(&self) -> u64 {
        self.mmio.config_u64(CONFIG_GUEST_CID)
    }

    /// Hands every received packet to `handle` (header, payload) and reposts
    /// its buffer. Returns how many there were.
    pub fn poll_rx(&mut self, mut handle: impl FnMut(&Header, &[u8])) -> usize {
        let mut n = 0;
        let mut ran_dry = false;
        while let Some(used) = self.rx.pop_used() {
            ran_dry |= self.rx.outstanding() == 0;
            let buf = used.token;
            let len = (used.len as usize).min(buf.len());
            if let Some(hdr) = Header::decode(&buf[..len]) {
                handle(&hdr, &buf[HDR_LEN..len]);
            }
            let chain = writable(&buf);
            // Cannot fail: this chain's descriptor was just freed.
            let _ = self.rx.push(&chain, buf);
            n += 1;
        }
        if ran_dry && self.rx.needs_notification() {
            self.mmio.notify(RX_QUEUE);
        }
        n
    }

    /// Reads the event queue, reposts its buffers and notifies the device
    /// of them (events are rare: the exit costs nothing that matters).
    pub fn poll_events(&mut self) -> Events {
        let mut events = Events::default();
        let mut reposted = false;
        while let Some(used) = self.event.pop_used() {
            let buf = used.token;
            if used.len >= 4 && u32::from_le_bytes(*buf) == EVENT_TRANSPORT_RESET {
                events.transport_reset = true;
            }
            let chain = writable(&buf[..]);
            let _ = self.event.push(&chain, buf);
            reposted = true;
        }
        if reposted && self.event.needs_notification() {
            self.mmio.notify(EVENT_QUEUE);
        }
        events
    }

    /// Frees the packets the device has sent.
    pub fn reclaim_tx(&mut self) {
        while self.tx.pop_used().is_some() {}
    }

    /// Queues an encoded packet; gives it back if the queue is full.
    pub fn send(&mut self, packet: Vec<u8>) -> Result<(), Vec<u8>> {
        let chain = [Buffer {
            addr: packet.as_ptr() as u64,
            len: packet.len() as u32,
            device_writable: false,
        }];
        self.tx.push(&chain, packet)?;
        self.tx_pushed = true;
        Ok(())
    }

    /// Notifies the device of queued packets, if any (one notification for a
    /// batch).
    pub fn kick_tx(&mut self) {
        if self.tx_pushed {
            self.tx_pushed = false;
            if self.tx.needs_notification() {
                self.mmio.notify(TX_QUEUE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::queue::tests::FakeDevice;

    /// QueueNotify as an index into a window of u32 registers.
    const NOTIFY_WORD: usize = 0x50 / 4;

    #[test]
    fn event_buffers_reposted_after_an_event_are_notified() {
        // Host memory standing in for the register window: what the driver
        // writes stays there to be read back.
        let mut window = vec![u32::MAX; 0x40];
        // SAFETY: the window covers every register `poll_events` writes.
        let mmio = unsafe { MmioDevice::new(window.as_mut_ptr() as u64, 5) };
        let mut dev = VsockDevice {
            mmio,
            rx: SplitQueue::new(4),
            tx: SplitQueue::new(4),
            event: SplitQueue::new(EVENT_BUFFERS),
            tx_pushed: false,
        };
        for _ in 0..EVENT_BUFFERS {
            let buf = Box::new([0u8; 4]);
            dev.event.push(&writable(&buf[..]), buf).unwrap();
        }
        let mut device = FakeDevice::default();
        for _ in 0..EVENT_BUFFERS {
            assert!(device.take(&dev.event).is_some());
        }
        assert!(device.take(&dev.event).is_none());

        // One transport reset, with the other buffers still posted: Linux
        // notifies after the repost all the same, and so must we.
        let head = 1;
        let (desc, _, _) = dev.event.addresses();
        // SAFETY: descriptor `head` of the table points at a live 4-byte buffer.
        unsafe {
            let addr = core::ptr::read_volatile((desc + 16 * head) as *const u64);
            core::ptr::write_volatile(addr as *mut u32, EVENT_TRANSPORT_RESET.to_le());
        }
        device.give_back(&dev.event, head as u16, 4);
        assert!(dev.poll_events().transport_reset);
        // SAFETY: reads back the window the driver wrote.
        let notified = unsafe { core::ptr::read_volatile(window.as_ptr().add(NOTIFY_WORD)) };
        assert_eq!(notified, u32::from(EVENT_QUEUE), "event queue not notified");
        assert!(
            device.take(&dev.event).is_some(),
            "event buffer not reposted"
        );

        // Nothing used: nothing reposted, no notification.
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(window.as_mut_ptr().add(NOTIFY_WORD), u32::MAX) };
        assert!(!dev.poll_events().transport_reset);
        // SAFETY: as above.
        let notified = unsafe { core::ptr::read_volatile(window.as_ptr().add(NOTIFY_WORD)) };
        assert_eq!(notified, u32::MAX);
    }
}
