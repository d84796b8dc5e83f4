//! virtio-rng (entropy device, virtio 1.2 §5.4): one request queue whose
//! device-writable buffers are filled from the host's `getrandom(2)`.

use std::io::Write;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{
    drain_event, new_queues, ActivateError, ActiveState, Interrupt, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_ID_RNG,
};

/// Size of the request queue.
pub const RNG_QUEUE_SIZE: u16 = 256;
/// Most bytes given for one request, however large its buffers.
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// The entropy device.
pub struct Rng {
    vm_id: String,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    acked_features: u64,
    active: Option<ActiveState>,
    buf: Vec<u8>,
}

impl Rng {
    /// A new, inactive entropy device.
    pub fn new(vm_id: &str) -> std::io::Result<Self> {
        let (queues, queue_events) = new_queues(&[RNG_QUEUE_SIZE])?;
        Ok(Rng {
            vm_id: vm_id.to_owned(),
            queues,
            queue_events,
            acked_features: 0,
            active: None,
            buf: Vec::new(),
        })
    }

    /// Serve every request in the queue (at most one queue's worth per call,
    /// then reschedule itself so other devices get a turn).
    pub(crate) fn process_requests(&mut self) {
        let Some(active) = &self.active else { return };
        let queue = &mut self.queues[0];
        let mut served = 0u16;
        while let Some(chain) = queue.pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            let len = match Writer::new(&active.mem, chain) {
                Ok(mut writer) => fill_random(&mut writer, &mut self.buf).unwrap_or_else(|e| {
                    tracing::debug!(vm = %self.vm_id, "virtio-rng request {head}: {e}");
                    0
                }),
                Err(e) => {
                    tracing::debug!(vm = %self.vm_id, "virtio-rng bad descriptor chain {head}: {e}");
                    0
                }
            };
            if let Err(e) = queue.add_used(&active.mem, head, len) {
                tracing::warn!(vm = %self.vm_id, "virtio-rng used ring update failed: {e}");
                break;
            }
            served += 1;
            if served >= queue.size() {
                if let Err(e) = self.queue_events[0].write(1) {
                    tracing::warn!(vm = %self.vm_id, "virtio-rng reschedule failed: {e}");
                }
                break;
            }
        }
        if served > 0 && queue.needs_notification(&active.mem).unwrap_or(true) {
            active.interrupt.signal_used_queue();
        }
    }
}

/// Fill the writable part of a chain (up to [`MAX_BYTES_PER_REQUEST`]) with
/// host randomness; returns the number of bytes written.
fn fill_random(writer: &mut Writer<'_>, buf: &mut Vec<u8>) -> std::io::Result<u32> {
    let len = writer.available_bytes().min(MAX_BYTES_PER_REQUEST);
    buf.resize(len, 0);
    host_random(buf)?;
    writer.write_all(buf)?;
    Ok(len as u32)
}

/// Fill `buf` from the host kernel's CSPRNG (getrandom(2)).
pub fn host_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe `rest`, a live, writable
        // byte slice; getrandom writes at most that many bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn queues(&self) -> &[Queue] {
        &self.queues
    }

    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// virtio-rng has no configuration space (virtio 1.2 §5.4.4).
    fn read_config(&self, _offset: u64, _data: &mut [u8]) {}

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        self.active = Some(ActiveState { mem, interrupt });
        // The driver may have queued requests before DRIVER_OK.
        if let Err(e) = self.queue_events[0].write(1) {
            tracing::warn!(vm = %self.vm_id, "virtio-rng initial kick failed: {e}");
        }
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        for q in &mut self.queues {
            q.reset();
        }
    }
}

impl MutEventSubscriber for Rng {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        drain_event(&self.queue_events[0]);
        self.process_requests();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_events[0], EventSet::IN)) {
            tracing::error!(vm = %self.vm_id, "virtio-rng: registering the queue event: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{Desc, TestGuest, DEADLINE};
    use std::sync::{Arc, Mutex};

    fn rng_guest() -> (TestGuest, Arc<Mutex<Rng>>) {
        let rng = Arc::new(Mutex::new(Rng::new("test").unwrap()));
        let guest = TestGuest::new(rng.clone(), rng.clone());
        (guest, rng)
    }

    #[test]
    fn fills_writable_buffers_with_random_bytes() {
        let (mut g, _rng) = rng_guest();
        g.init_driver(&[16]).unwrap();
        let a = g.buf(0);
        let b = g.buf(1);
        let head = g.add_chain(0, &[Desc::w(a, 100), Desc::w(b, 28)]);
        g.kick(0);
        let used = g.wait_used(0, 1, DEADLINE);
        assert_eq!(used, vec![(u32::from(head), 128)]);
        let mut bytes = vec![0u8; 100];
        g.read_mem(a, &mut bytes);
        assert!(bytes.iter().any(|&b| b != 0), "buffer still zero");
    }

    #[test]
    fn requests_are_bounded_and_bad_chains_complete_empty() {
        let (mut g, _rng) = rng_guest();
        g.init_driver(&[16]).unwrap();
        let big = g.buf(0);
        // 1 MiB writable: only MAX_BYTES_PER_REQUEST are produced.
        let h1 = g.add_chain(0, &[Desc::w(big, 1 << 20)]);
        // Outside guest RAM.
        let h2 = g.add_chain(0, &[Desc::w(0xffff_ffff_0000, 64)]);
        // Crossing the end of guest RAM.
        let h3 = g.add_chain(0, &[Desc::w(g.mem_end() - 16, 64)]);
        // Zero-length and read-only buffers.
        let h4 = g.add_chain(0, &[Desc::w(big, 0)]);
        let h5 = g.add_chain(0, &[Desc::r(big, 64)]);
        g.kick(0);
        let used = g.wait_used(0, 5, DEADLINE);
        assert_eq!(
            used,
            vec![
                (u32::from(h1), MAX_BYTES_PER_REQUEST as u32),
                (u32::from(h2), 0),
                (u32::from(h3), 0),
                (u32::from(h4), 0),
                (u32::from(h5), 0),
            ]
        );
    }

    #[test]
    fn descriptor_loop_terminates() {
        let (mut g, _rng) = rng_guest();
        g.init_driver(&[16]).unwrap();
        let head = g.add_loop(0, g.buf(0), 32);
        g.kick(0);
        let used = g.wait_used(0, 1, DEADLINE);
        // The chain is cut at the queue size: at most 16 descriptors of 32 bytes.
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, u32::from(head));
        assert!(used[0].1 <= 16 * 32);
        // The device still serves the next, sane request.
        let h = g.add_chain(0, &[Desc::w(g.buf(1), 8)]);
        g.kick(0);
        assert_eq!(g.wait_used(0, 1, DEADLINE), vec![(u32::from(h), 8)]);
    }

    #[test]
    fn avail_index_far_ahead_is_refused_without_hanging() {
        let rng = Arc::new(Mutex::new(Rng::new("test").unwrap()));
        let mut g = TestGuest::without_loop(rng.clone());
        g.init_driver(&[16]).unwrap();
        g.add_chain(0, &[Desc::w(g.buf(0), 8)]);
        g.set_avail_idx(0, 40_000);
        rng.lock().unwrap().process_requests();
        assert!(g.used(0).is_empty());
        // A reset and a fresh driver initialization bring the device back.
        g.reset_device();
        g.init_driver(&[16]).unwrap();
        let h = g.add_chain(0, &[Desc::w(g.buf(0), 8)]);
        rng.lock().unwrap().process_requests();
        assert_eq!(g.used(0), vec![(u32::from(h), 8)]);
    }
}
