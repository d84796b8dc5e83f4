//! virtio-rng (entropy device, virtio 1.2 §5.4): one request queue whose
//! device-writable buffers are filled from the host's `getrandom(2)`.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{QueueOwnedT, QueueT, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::{
    drain_event, ActivateError, ActiveState, Interrupt, VirtioCore, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_ID_RNG,
};

/// Size of the request queue.
pub const RNG_QUEUE_SIZE: u16 = 256;
/// Most bytes given for one request, however large its buffers.
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// Bytes per second a guest may draw from the host's entropy by default.
pub const DEFAULT_RATE_BYTES_PER_SEC: u64 = 1 << 20;
/// Bytes a guest may draw at once (the bucket's size) by default.
pub const DEFAULT_BURST_BYTES: u64 = 256 * 1024;
/// Event-loop data tag of the refill timer (the queue event uses 0).
const TIMER_EVENT: u32 = 1;

/// A token bucket over bytes: `rate` bytes per second refill it, up to `burst`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    tokens: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` bytes refilled at `rate` bytes per second (both at least 1).
    pub fn new(rate: u64, burst: u64) -> Self {
        let burst = burst.max(1);
        TokenBucket {
            rate: rate.max(1),
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        let new = (elapsed.as_nanos() * u128::from(self.rate) / 1_000_000_000) as u64;
        if new > 0 {
            self.tokens = self.tokens.saturating_add(new).min(self.burst);
            // Advance by the time those tokens took, keeping the remainder.
            let used = Duration::from_nanos(
                (u128::from(new) * 1_000_000_000 / u128::from(self.rate)) as u64,
            );
            self.last = if self.tokens == self.burst {
                now
            } else {
                self.last + used
            };
        }
    }

    /// Take up to `want` bytes now; returns how many were granted.
    pub fn take(&mut self, want: u64) -> u64 {
        self.refill(Instant::now());
        let n = want.min(self.tokens);
        self.tokens -= n;
        n
    }

    /// How long until `want` bytes (capped at the burst) are available.
    pub fn wait_for(&mut self, want: u64) -> Duration {
        self.refill(Instant::now());
        let want = want.min(self.burst);
        let missing = want.saturating_sub(self.tokens);
        Duration::from_nanos((u128::from(missing) * 1_000_000_000 / u128::from(self.rate)) as u64)
    }
}

/// The entropy device.
pub struct Rng {
    vm_id: String,
    core: VirtioCore,
    active: Option<ActiveState>,
    buf: Vec<u8>,
    /// What the guest may draw (the host's entropy is shared by every VM).
    limit: TokenBucket,
    /// Fires when the bucket has refilled enough for the waiting request.
    refill_timer: TimerFd,
    timer_armed: bool,
}

impl Rng {
    /// A new, inactive entropy device limited to the default rate.
    pub fn new(vm_id: &str) -> std::io::Result<Self> {
        Self::with_rate_limit(vm_id, DEFAULT_RATE_BYTES_PER_SEC, DEFAULT_BURST_BYTES)
    }

    /// A new, inactive entropy device giving at most `rate` bytes per second
    /// after an initial `burst`.
    pub fn with_rate_limit(vm_id: &str, rate: u64, burst: u64) -> std::io::Result<Self> {
        let core = VirtioCore::new(1 << VIRTIO_F_VERSION_1, &[RNG_QUEUE_SIZE])?;
        let refill_timer = TimerFd::new()?;
        set_nonblocking(refill_timer.as_raw_fd())?;
        Ok(Rng {
            vm_id: vm_id.to_owned(),
            core,
            active: None,
            buf: Vec::new(),
            limit: TokenBucket::new(rate, burst),
            refill_timer,
            timer_armed: false,
        })
    }

    /// Serve every request in the queue (at most one queue's worth per call,
    /// then reschedule itself so other devices get a turn).
    pub(crate) fn process_requests(&mut self) {
        let Some(active) = &self.active else { return };
        let queue = &mut self.core.queues[0];
        let mut served = 0u16;
        let mut throttled = None;
        while let Some(chain) = queue.pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            let limit = &mut self.limit;
            let len = match Writer::new(&active.mem, chain) {
                Ok(mut writer) => {
                    // Out of budget for this request (capped at the bucket's
                    // size): leave it queued until the bucket has refilled.
                    let want = writer.available_bytes().min(MAX_BYTES_PER_REQUEST) as u64;
                    let wait = limit.wait_for(want);
                    if !wait.is_zero() {
                        queue.go_to_previous_position();
                        throttled = Some(wait);
                        break;
                    }
                    fill_random(&mut writer, &mut self.buf, limit).unwrap_or_else(|e| {
                        tracing::debug!(vm = %self.vm_id, "virtio-rng request {head}: {e}");
                        0
                    })
                }
                Err(e) => {
                    tracing::debug!(vm = %self.vm_id, "virtio-rng bad descriptor chain {head}: {e}");
                    0
                }
            };
            if let Err(e) = queue.add_used(&active.mem, head, len) {
                crate::warn_limited!(vm = %self.vm_id, "virtio-rng used ring update failed: {e}");
                break;
            }
            served += 1;
            if served >= queue.size() {
                if let Err(e) = self.core.queue_events[0].write(1) {
                    tracing::warn!(vm = %self.vm_id, "virtio-rng reschedule failed: {e}");
                }
                break;
            }
        }
        if served > 0 && queue.needs_notification(&active.mem).unwrap_or(true) {
            active.interrupt.signal_used_queue();
        }
        if let Some(wait) = throttled {
            // Wake when the waiting request's worth has refilled.
            let wait = wait.max(Duration::from_millis(1));
            match self.refill_timer.reset(wait, None) {
                Ok(()) => self.timer_armed = true,
                Err(e) => tracing::warn!(vm = %self.vm_id, "virtio-rng refill timer: {e}"),
            }
        }
    }
}

fn set_nonblocking(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Fill the writable part of a chain (up to [`MAX_BYTES_PER_REQUEST`] and
/// what `limit` grants: a device may return fewer bytes than asked) with
/// host randomness; returns the number of bytes written.
fn fill_random(
    writer: &mut Writer<'_>,
    buf: &mut Vec<u8>,
    limit: &mut TokenBucket,
) -> std::io::Result<u32> {
    let want = writer.available_bytes().min(MAX_BYTES_PER_REQUEST);
    let len = limit.take(want as u64) as usize;
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

    fn core(&self) -> &VirtioCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut VirtioCore {
        &mut self.core
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
        if let Err(e) = self.core.queue_events[0].write(1) {
            tracing::warn!(vm = %self.vm_id, "virtio-rng initial kick failed: {e}");
        }
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        let _ = self.refill_timer.clear();
        self.timer_armed = false;
        self.core.reset();
    }
}

impl MutEventSubscriber for Rng {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.data() == TIMER_EVENT {
            // Non-blocking: a stale readiness just reads nothing.
            let _ = self.refill_timer.wait();
            self.timer_armed = false;
        } else {
            drain_event(&self.core.queue_events[0]);
        }
        // While throttled, the timer (not every guest notification) resumes work.
        if !self.timer_armed {
            self.process_requests();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.core.queue_events[0],
            0,
            EventSet::IN,
        )) {
            tracing::error!(vm = %self.vm_id, "virtio-rng: registering the queue event: {e}");
        }
        if let Err(e) = ops.add(Events::with_data(
            &self.refill_timer,
            TIMER_EVENT,
            EventSet::IN,
        )) {
            tracing::error!(vm = %self.vm_id, "virtio-rng: registering the refill timer: {e}");
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

    #[test]
    fn the_guest_gets_no_more_than_the_rate_limit_allows() {
        const RATE: u64 = 64 * 1024;
        const BURST: u64 = 16 * 1024;
        let rng = Arc::new(Mutex::new(
            Rng::with_rate_limit("test", RATE, BURST).unwrap(),
        ));
        let mut g = TestGuest::new(rng.clone(), rng.clone());
        g.init_driver(&[16]).unwrap();
        let start = Instant::now();
        // 8 requests of 16 KiB: 128 KiB, eight times the burst.
        let heads: Vec<u16> = (0..8)
            .map(|i| g.add_chain(0, &[Desc::w(g.buf(i), 4096), Desc::w(g.buf(i + 8), 4096)]))
            .collect();
        g.kick(0);
        let mut given = 0u64;
        let mut used = Vec::new();
        while used.len() < heads.len() {
            let batch = g.wait_used(0, 1, DEADLINE);
            given += batch.iter().map(|&(_, n)| u64::from(n)).sum::<u64>();
            used.extend(batch);
            // Never more than the burst plus what the elapsed time refilled
            // (a slow machine only makes the bound looser).
            let allowed = BURST + (start.elapsed().as_secs_f64() * RATE as f64) as u64;
            assert!(given <= allowed, "gave {given} bytes, allowed {allowed}");
        }
        // Every request was answered in full, in order, once budget allowed.
        let want: Vec<(u32, u32)> = heads.iter().map(|&h| (u32::from(h), 8192)).collect();
        assert_eq!(used, want);
    }

    #[test]
    fn token_bucket_grants_the_burst_then_waits() {
        let mut b = TokenBucket::new(1000, 100);
        assert_eq!(b.take(60), 60);
        assert_eq!(b.take(60), 40);
        assert!(b.wait_for(50) > Duration::ZERO);
        assert!(b.wait_for(1_000_000) <= Duration::from_millis(100));
    }
}
