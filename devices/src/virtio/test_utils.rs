//! A simulated guest driver for tests: guest RAM, the transport's registers
//! written the way a driver writes them, split rings built by hand (so tests
//! can make them as hostile as they like), and waits on the irq event fd with
//! deadlines.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::event_loop::{EventLoop, EventLoopHandle, Subscriber};
use super::{status, MmioTransport, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;

/// How long a test waits for something that should happen.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// Size of the test guest's RAM (one region at 0).
pub const MEM_SIZE: u64 = 16 << 20;
/// Queue `i`'s rings live at `QUEUE_AREA * (i + 1)`.
const QUEUE_AREA: u64 = 0x1_0000;
/// Data buffers start here, 64 KiB apart.
const BUF_AREA: u64 = 0x10_0000;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// Wait until `fd` is readable or `timeout` passes; true if readable.
pub fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `pfd` is a valid pollfd and we pass a count of 1.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r > 0 {
            return true;
        }
        if r == 0 || Instant::now() >= deadline {
            return false;
        }
    }
}

/// One descriptor of a chain the test builds.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    addr: u64,
    len: u32,
    write: bool,
}

impl Desc {
    /// A device-writable buffer.
    pub fn w(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            write: true,
        }
    }
    /// A device-readable buffer.
    pub fn r(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            write: false,
        }
    }
}

struct DriverQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

/// The guest side of one device.
pub struct TestGuest {
    pub mem: GuestMemoryMmap,
    pub transport: MmioTransport,
    irq: EventFd,
    queues: Vec<DriverQueue>,
    event_loop: Option<EventLoopHandle>,
}

impl TestGuest {
    /// A guest for `device`, whose work runs on a real event loop thread
    /// (`subscriber` is the same device).
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>, subscriber: Subscriber) -> Self {
        let mut g = Self::without_loop(device);
        let mut el = EventLoop::new().unwrap();
        el.add_subscriber(subscriber);
        g.event_loop = Some(el.start("test").unwrap());
        g
    }

    /// A guest for `device` with no event loop: the test runs the device's
    /// processing itself.
    pub fn without_loop(device: Arc<Mutex<dyn VirtioDevice>>) -> Self {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let transport = MmioTransport::new("test", mem.clone(), device).unwrap();
        let irq = transport.irq_evt().try_clone().unwrap();
        TestGuest {
            mem,
            transport,
            irq,
            queues: Vec::new(),
            event_loop: None,
        }
    }

    /// Swap in another transport (e.g. one restored from a snapshot of
    /// this one), keeping guest memory and the driver's ring bookkeeping.
    pub fn replace_transport(&mut self, transport: MmioTransport) {
        self.irq = transport.irq_evt().try_clone().unwrap();
        self.transport = transport;
    }

    /// Stop the event loop, if any.
    pub fn stop_loop(&mut self) {
        if let Some(l) = self.event_loop.take() {
            l.stop();
        }
    }

    /// Run `subscriber` on an event loop from now on.
    pub fn start_loop(&mut self, subscriber: Subscriber) {
        let mut el = EventLoop::new().unwrap();
        el.add_subscriber(subscriber);
        self.event_loop = Some(el.start("test").unwrap());
    }

    /// Read a 32-bit register.
    pub fn read_reg(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Write a 32-bit register.
    pub fn write_reg(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    /// The driver initialization sequence (virtio 1.2 §3.1.1) with queues of
    /// `sizes`, accepting every offered feature.
    pub fn init_driver(&mut self, sizes: &[u16]) -> Result<(), String> {
        self.write_reg(0x70, 0);
        self.write_reg(0x70, status::ACKNOWLEDGE);
        self.write_reg(0x70, status::ACKNOWLEDGE | status::DRIVER);
        let mut features = 0u64;
        for sel in 0..2u32 {
            self.write_reg(0x14, sel);
            features |= u64::from(self.read_reg(0x10)) << (32 * sel);
        }
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err("device does not offer VERSION_1".into());
        }
        for sel in 0..2u32 {
            self.write_reg(0x24, sel);
            self.write_reg(0x20, (features >> (32 * sel)) as u32);
        }
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write_reg(0x70, s);
        if self.read_reg(0x70) & status::FEATURES_OK == 0 {
            return Err("FEATURES_OK refused".into());
        }
        self.queues.clear();
        for (i, &size) in sizes.iter().enumerate() {
            let q = queue_layout(i, size);
            // Zero the rings so a re-initialization starts clean.
            self.mem
                .write_slice(&vec![0u8; QUEUE_AREA as usize], GuestAddress(q.desc))
                .unwrap();
            self.write_reg(0x30, i as u32);
            if self.read_reg(0x44) != 0 {
                return Err(format!("queue {i} already ready"));
            }
            let max = self.read_reg(0x34);
            if u32::from(size) > max {
                return Err(format!("queue {i}: size {size} > max {max}"));
            }
            self.write_reg(0x38, u32::from(size));
            self.write_reg(0x80, q.desc as u32);
            self.write_reg(0x84, (q.desc >> 32) as u32);
            self.write_reg(0x90, q.avail as u32);
            self.write_reg(0x94, (q.avail >> 32) as u32);
            self.write_reg(0xa0, q.used as u32);
            self.write_reg(0xa4, (q.used >> 32) as u32);
            self.write_reg(0x44, 1);
            self.queues.push(q);
        }
        self.write_reg(0x70, s | status::DRIVER_OK);
        let st = self.read_reg(0x70);
        if st & status::DEVICE_NEEDS_RESET != 0 || st & status::DRIVER_OK == 0 {
            return Err(format!("DRIVER_OK failed, status {st:#x}"));
        }
        Ok(())
    }

    /// Write status 0.
    pub fn reset_device(&mut self) {
        self.write_reg(0x70, 0);
        self.queues.clear();
    }

    /// Address of the `i`-th 64 KiB data buffer.
    pub fn buf(&self, i: u64) -> u64 {
        BUF_AREA + i * 0x1_0000
    }

    /// First address past guest RAM.
    pub fn mem_end(&self) -> u64 {
        MEM_SIZE
    }

    /// Copy guest memory out.
    pub fn read_mem(&self, addr: u64, buf: &mut [u8]) {
        self.mem.read_slice(buf, GuestAddress(addr)).unwrap();
    }

    /// Copy into guest memory.
    pub fn write_mem(&self, addr: u64, buf: &[u8]) {
        self.mem.write_slice(buf, GuestAddress(addr)).unwrap();
    }

    fn write_desc(&self, q: usize, index: u16, d: Desc, next: Option<u16>) {
        let dq = &self.queues[q];
        let mut flags = if d.write { VRING_DESC_F_WRITE } else { 0 };
        if next.is_some() {
            flags |= VRING_DESC_F_NEXT;
        }
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&d.len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.unwrap_or(0).to_le_bytes());
        self.write_mem(dq.desc + 16 * u64::from(index), &raw);
    }

    fn publish(&mut self, q: usize, head: u16) {
        let dq = &mut self.queues[q];
        let slot = dq.avail + 4 + 2 * u64::from(dq.avail_idx % dq.size);
        let idx_addr = dq.avail + 2;
        dq.avail_idx = dq.avail_idx.wrapping_add(1);
        let idx = dq.avail_idx;
        self.write_mem(slot, &head.to_le_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.write_mem(idx_addr, &idx.to_le_bytes());
    }

    /// Put a chain of `descs` on queue `q`'s available ring; returns its head.
    pub fn add_chain(&mut self, q: usize, descs: &[Desc]) -> u16 {
        let size = self.queues[q].size;
        let first = self.queues[q].next_desc;
        for (i, d) in descs.iter().enumerate() {
            let index = (first + i as u16) % size;
            let next = (i + 1 < descs.len()).then(|| (index + 1) % size);
            self.write_desc(q, index, *d, next);
        }
        self.queues[q].next_desc = (first + descs.len().max(1) as u16) % size;
        self.publish(q, first);
        first
    }

    /// Put a two-descriptor loop (a -> b -> a) of writable buffers on queue `q`.
    pub fn add_loop(&mut self, q: usize, addr: u64, len: u32) -> u16 {
        let size = self.queues[q].size;
        let a = self.queues[q].next_desc;
        let b = (a + 1) % size;
        self.write_desc(q, a, Desc::w(addr, len), Some(b));
        self.write_desc(q, b, Desc::w(addr, len), Some(a));
        self.queues[q].next_desc = (a + 2) % size;
        self.publish(q, a);
        a
    }

    /// Overwrite queue `q`'s available index.
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        let dq = &mut self.queues[q];
        dq.avail_idx = idx;
        let addr = dq.avail + 2;
        self.write_mem(addr, &idx.to_le_bytes());
    }

    /// Notify queue `q` through the QueueNotify register.
    pub fn kick(&mut self, q: u16) {
        self.write_reg(0x50, u32::from(q));
    }

    /// New `(id, len)` used-ring entries of queue `q` since the last call.
    pub fn used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let mut idx = [0u8; 2];
        let used = self.queues[q].used;
        self.read_mem(used + 2, &mut idx);
        let idx = u16::from_le_bytes(idx);
        let mut out = Vec::new();
        while self.queues[q].used_seen != idx {
            let dq = &self.queues[q];
            let mut e = [0u8; 8];
            self.read_mem(used + 4 + 8 * u64::from(dq.used_seen % dq.size), &mut e);
            out.push((
                u32::from_le_bytes(e[0..4].try_into().unwrap()),
                u32::from_le_bytes(e[4..8].try_into().unwrap()),
            ));
            self.queues[q].used_seen = self.queues[q].used_seen.wrapping_add(1);
        }
        out
    }

    /// Wait (on the irq event fd) until queue `q` has `n` new used entries.
    pub fn wait_used(&mut self, q: usize, n: usize, timeout: Duration) -> Vec<(u32, u32)> {
        let got = self.wait_used_timeout(q, n, timeout);
        assert!(
            got.len() >= n,
            "queue {q}: {} of {n} used entries before the deadline",
            got.len()
        );
        got
    }

    /// Like `wait_used`, but returns what arrived when the deadline passes.
    pub fn wait_used_timeout(&mut self, q: usize, n: usize, timeout: Duration) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            got.extend(self.used(q));
            if got.len() >= n {
                return got;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !wait_readable(&self.irq, left) {
                got.extend(self.used(q));
                return got;
            }
            let _ = self.irq.read();
        }
    }

    /// Whether an interrupt was raised since the last wait (clears it).
    pub fn take_irq(&self) -> bool {
        self.irq.read().is_ok()
    }
}

fn queue_layout(i: usize, size: u16) -> DriverQueue {
    let base = QUEUE_AREA * (i as u64 + 1);
    DriverQueue {
        size,
        desc: base,
        avail: base + 0x1000,
        used: base + 0x2000,
        next_desc: 0,
        avail_idx: 0,
        used_seen: 0,
    }
}
