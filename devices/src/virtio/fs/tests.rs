//! The shadow queue against a fake backend that drives the shadow rings in
//! the bounce region by hand (and can misbehave or die), with a simulated
//! guest driver on a real event loop.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::virtio::test_utils::{Desc, TestGuest, DEADLINE};

/// The backend's side of the shadow rings.
struct FakeBackend {
    bounce: GuestMemoryMmap,
    layout: ShadowLayout,
    call: EventFd,
    kick: EventFd,
    last_avail: u16,
    used_idx: u16,
}

/// A request as the backend sees it: the shadow head, the readable bytes,
/// the writable buffer.
struct Seen {
    head: u16,
    request: Vec<u8>,
    reply_addr: u64,
    reply_cap: u32,
}

impl FakeBackend {
    fn read_u16(&self, addr: u64) -> u16 {
        self.bounce.read_obj(GuestAddress(addr)).unwrap()
    }

    fn desc(&self, i: u16) -> (u64, u32, u16, u16) {
        let d = self.layout.desc() + 16 * u64::from(i);
        (
            self.bounce.read_obj(GuestAddress(d)).unwrap(),
            self.bounce.read_obj(GuestAddress(d + 8)).unwrap(),
            self.read_u16(d + 12),
            self.read_u16(d + 14),
        )
    }

    /// Every chain posted since the last call.
    fn take(&mut self) -> Vec<Seen> {
        let mut out = Vec::new();
        let idx = self.read_u16(self.layout.avail() + 2);
        while self.last_avail != idx {
            let slot = u64::from(self.last_avail % self.layout.queue_size());
            let head = self.read_u16(self.layout.avail() + 4 + 2 * slot);
            self.last_avail = self.last_avail.wrapping_add(1);
            let (addr, len, flags, next) = self.desc(head);
            assert_eq!(flags & 2, 0, "first descriptor is readable");
            let mut request = vec![0u8; len as usize];
            self.bounce
                .read_slice(&mut request, GuestAddress(addr))
                .unwrap();
            let (reply_addr, reply_cap) = if flags & 1 != 0 {
                let (a, l, f, _) = self.desc(next);
                assert_eq!(f & 2, 2, "second descriptor is writable");
                (a, l)
            } else {
                (0, 0)
            };
            out.push(Seen {
                head,
                request,
                reply_addr,
                reply_cap,
            });
        }
        out
    }

    /// Put `id` with `len` in the used ring (after writing `reply`).
    fn give_back(&mut self, id: u32, reply_addr: u64, reply: &[u8], len: u32) {
        if !reply.is_empty() {
            self.bounce
                .write_slice(reply, GuestAddress(reply_addr))
                .unwrap();
        }
        let used = self.layout.used();
        let at = used + 4 + 8 * u64::from(self.used_idx % self.layout.queue_size());
        self.bounce.write_obj(id, GuestAddress(at)).unwrap();
        self.bounce.write_obj(len, GuestAddress(at + 4)).unwrap();
        self.used_idx = self.used_idx.wrapping_add(1);
        self.bounce
            .write_obj(self.used_idx, GuestAddress(used + 2))
            .unwrap();
        self.call.write(1).unwrap();
    }

    /// Answer `seen` with a FUSE reply carrying `body`.
    fn reply(&mut self, seen: &Seen, body: &[u8]) {
        let unique = u64::from_le_bytes(seen.request[8..16].try_into().unwrap());
        let mut r = Vec::new();
        r.extend_from_slice(&(16 + body.len() as u32).to_le_bytes());
        r.extend_from_slice(&0i32.to_le_bytes());
        r.extend_from_slice(&unique.to_le_bytes());
        r.extend_from_slice(body);
        let len = r.len() as u32;
        self.give_back(u32::from(seen.head), seen.reply_addr, &r, len);
    }
}

struct Rig {
    device: Arc<Mutex<Fs>>,
    guest: TestGuest,
    backend: FakeBackend,
    /// Dropping it hangs up the device's "backend socket".
    peer: Option<UnixStream>,
}

/// A device on fake shadow rings: hiprio is queue 0, requests queue 1.
fn rig() -> Rig {
    let (bounce, shadows) = Fs::shadow_rings().unwrap();
    let layout = shadows[1].layout();
    let call = shadows[1].call.try_clone().unwrap();
    let kick = shadows[1].kick.try_clone().unwrap();
    let (ours, peer) = UnixStream::pair().unwrap();
    let fs = Fs::assemble("test", "share", bounce.clone(), shadows, ours.as_raw_fd()).unwrap();
    // The device's end must outlive the device: leak it into the test.
    std::mem::forget(ours);
    let fs = Arc::new(Mutex::new(fs));
    let mut guest = TestGuest::new(fs.clone(), fs.clone());
    guest.init_driver(&[16, 64]).unwrap();
    Rig {
        device: fs,
        guest,
        backend: FakeBackend {
            bounce,
            layout,
            call,
            kick,
            last_avail: 0,
            used_idx: 0,
        },
        peer: Some(peer),
    }
}

/// A FUSE request: in header (unique, opcode) and `payload`.
fn fuse_request(unique: u64, payload: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&(40 + payload.len() as u32).to_le_bytes());
    r.extend_from_slice(&15u32.to_le_bytes());
    r.extend_from_slice(&unique.to_le_bytes());
    r.extend_from_slice(&[0u8; 24]);
    r.extend_from_slice(payload);
    r
}

/// Post a request in guest buffer `i` (readable) and `i + 1` (writable `cap`).
fn post(g: &mut TestGuest, i: u64, unique: u64, payload: &[u8], cap: u32) -> u16 {
    let req = fuse_request(unique, payload);
    g.write_mem(g.buf(i), &req);
    // Split the readable part in two descriptors, as a driver may.
    let cut = 20u32;
    g.add_chain(
        1,
        &[
            Desc::r(g.buf(i), cut),
            Desc::r(g.buf(i) + u64::from(cut), req.len() as u32 - cut),
            Desc::w(g.buf(i + 1), cap),
        ],
    )
}

fn out_header(g: &TestGuest, addr: u64) -> (u32, i32, u64) {
    let mut h = [0u8; 16];
    g.read_mem(addr, &mut h);
    (
        u32::from_le_bytes(h[0..4].try_into().unwrap()),
        i32::from_le_bytes(h[4..8].try_into().unwrap()),
        u64::from_le_bytes(h[8..16].try_into().unwrap()),
    )
}

#[test]
fn config_space_has_tag_and_queue_count() {
    let r = rig();
    let mut g = r.guest;
    let mut tag = [0u8; 40];
    for i in 0..10 {
        tag[4 * i..4 * i + 4].copy_from_slice(&g.read_reg(0x100 + 4 * i as u64).to_le_bytes());
    }
    assert_eq!(&tag[..6], b"share\0");
    assert_eq!(u32::from_le_bytes(tag[36..40].try_into().unwrap()), 1);
    assert_eq!(g.read_reg(0x08), VIRTIO_ID_FS);
}

#[test]
fn request_goes_through_the_bounce_region_and_the_reply_back() {
    let mut r = rig();
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    let head = post(&mut r.guest, 0, 42, &payload, 8192);
    r.guest.kick(1);
    assert!(crate::virtio::test_utils::wait_readable(
        &r.backend.kick,
        DEADLINE
    ));
    let seen = r.backend.take();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].request, fuse_request(42, &payload));
    assert_eq!(seen[0].reply_cap, 8192);
    // The backend's addresses are inside the bounce region, not guest RAM.
    assert!(seen[0].reply_addr >= r.backend.layout.slot(0));
    let body: Vec<u8> = (0..5000u32).map(|i| (i * 13) as u8).collect();
    r.backend.reply(&seen[0], &body);
    let used = r.guest.wait_used(1, 1, DEADLINE);
    assert_eq!(used, vec![(u32::from(head), 16 + 5000)]);
    assert_eq!(out_header(&r.guest, r.guest.buf(1)), (5016, 0, 42));
    let mut got = vec![0u8; 5000];
    r.guest.read_mem(r.guest.buf(1) + 16, &mut got);
    assert_eq!(got, body);
}

#[test]
fn bad_requests_fail_with_eio_and_never_reach_the_backend() {
    let mut r = rig();
    let g = &mut r.guest;
    // Larger than a slot.
    let h1 = g.add_chain(
        1,
        &[Desc::r(g.buf(0), 64), Desc::w(g.buf(1), REQUEST_SLOT_SIZE)],
    );
    g.write_mem(g.buf(0), &fuse_request(7, &[0u8; 24]));
    // Readable after writable.
    let h2 = g.add_chain(1, &[Desc::w(g.buf(3), 64), Desc::r(g.buf(0), 64)]);
    // Shorter than a fuse_in_header.
    let h3 = g.add_chain(1, &[Desc::r(g.buf(0), 8), Desc::w(g.buf(5), 64)]);
    // Outside guest RAM.
    let h4 = g.add_chain(1, &[Desc::r(0xffff_0000_0000, 64), Desc::w(g.buf(7), 64)]);
    g.kick(1);
    let used = g.wait_used(1, 4, DEADLINE);
    assert_eq!(
        used,
        vec![
            (u32::from(h1), 16),
            (u32::from(h2), 16),
            (u32::from(h3), 16),
            (u32::from(h4), 16)
        ]
    );
    assert_eq!(out_header(g, g.buf(1)), (16, -5, 7));
    assert!(r.backend.take().is_empty());
}

#[test]
fn full_slots_hold_requests_back_and_none_is_lost_or_doubled() {
    let mut r = rig();
    let n = u64::from(REQUEST_SLOTS) + 5;
    let mut heads = Vec::new();
    for i in 0..n {
        heads.push(post(&mut r.guest, 2 * (i % 8), 100 + i, b"x", 64));
    }
    r.guest.kick(1);
    assert!(crate::virtio::test_utils::wait_readable(
        &r.backend.kick,
        DEADLINE
    ));
    let first = r.backend.take();
    assert_eq!(
        first.len(),
        usize::from(REQUEST_SLOTS),
        "bounded by the slots"
    );
    let mut done = Vec::new();
    for s in &first {
        r.backend.reply(s, b"ok");
    }
    done.extend(r.guest.wait_used(1, first.len(), DEADLINE));
    // Freed slots let the rest through.
    let mut rest = Vec::new();
    while rest.len() < 5 {
        assert!(crate::virtio::test_utils::wait_readable(
            &r.backend.kick,
            DEADLINE
        ));
        let _ = r.backend.kick.read();
        rest.extend(r.backend.take());
    }
    for s in &rest {
        r.backend.reply(s, b"ok");
    }
    done.extend(r.guest.wait_used(1, 5, DEADLINE));
    let mut ids: Vec<u32> = done.iter().map(|d| d.0).collect();
    ids.sort_unstable();
    let mut want: Vec<u32> = heads.iter().map(|&h| u32::from(h)).collect();
    want.sort_unstable();
    assert_eq!(ids, want);
    assert!(done.iter().all(|d| d.1 == 18));
}

#[test]
fn hostile_backend_entries_are_ignored_and_lengths_capped() {
    let mut r = rig();
    let head = post(&mut r.guest, 0, 9, b"abc", 32);
    r.guest.kick(1);
    assert!(crate::virtio::test_utils::wait_readable(
        &r.backend.kick,
        DEADLINE
    ));
    let seen = r.backend.take();
    // Chains never posted, an odd (non-head) id, and far out of range.
    r.backend.give_back(6, 0, &[], 10);
    r.backend.give_back(1, 0, &[], 10);
    r.backend.give_back(60_000, 0, &[], 10);
    // A length beyond the writable buffer is capped to it. The bogus
    // entries before it produced nothing: this is the only used entry.
    let addr = seen[0].reply_addr;
    r.backend
        .give_back(u32::from(seen[0].head), addr, &[0xee; 32], 4096);
    assert_eq!(
        r.guest.wait_used(1, 1, DEADLINE),
        vec![(u32::from(head), 32)]
    );
    // The same chain again is not in flight any more: ignored, and the
    // next real request is the only one completed.
    r.backend.give_back(u32::from(seen[0].head), addr, &[], 8);
    let _ = r.backend.kick.read();
    let next = post(&mut r.guest, 2, 10, b"d", 64);
    r.guest.kick(1);
    assert!(crate::virtio::test_utils::wait_readable(
        &r.backend.kick,
        DEADLINE
    ));
    let seen = r.backend.take();
    assert_eq!(seen.len(), 1);
    r.backend.reply(&seen[0], b"");
    assert_eq!(
        r.guest.wait_used(1, 1, DEADLINE),
        vec![(u32::from(next), 16)]
    );
}

#[test]
fn backend_hangup_fails_pending_and_later_requests_with_eio() {
    let mut r = rig();
    let h1 = post(&mut r.guest, 0, 1001, b"a", 64);
    let h2 = post(&mut r.guest, 2, 1002, b"b", 64);
    r.guest.kick(1);
    assert!(crate::virtio::test_utils::wait_readable(
        &r.backend.kick,
        DEADLINE
    ));
    assert_eq!(r.backend.take().len(), 2);
    drop(r.peer.take());
    let mut used = r.guest.wait_used(1, 2, DEADLINE);
    used.sort_unstable();
    let mut want = vec![(u32::from(h1), 16), (u32::from(h2), 16)];
    want.sort_unstable();
    assert_eq!(used, want);
    assert_eq!(out_header(&r.guest, r.guest.buf(1)), (16, -5, 1001));
    assert_eq!(out_header(&r.guest, r.guest.buf(3)), (16, -5, 1002));
    // A request after the hang-up fails at once, without the backend.
    let h3 = post(&mut r.guest, 4, 1003, b"c", 64);
    r.guest.kick(1);
    assert_eq!(r.guest.wait_used(1, 1, DEADLINE), vec![(u32::from(h3), 16)]);
    assert_eq!(out_header(&r.guest, r.guest.buf(5)), (16, -5, 1003));
}

#[test]
fn requests_in_flight_at_a_snapshot_fail_after_restore_instead_of_vanishing() {
    let mut r = rig();
    let head = post(&mut r.guest, 0, 555, b"pending", 64);
    r.guest.kick(1);
    assert!(crate::virtio::test_utils::wait_readable(
        &r.backend.kick,
        DEADLINE
    ));
    assert_eq!(r.backend.take().len(), 1);
    r.guest.stop_loop();
    let state = r.device.lock().unwrap().save();
    assert_eq!(state.in_flight.len(), 1);
    assert_eq!(
        (state.in_flight[0].head, state.in_flight[0].unique),
        (head, 555)
    );
    let transport_state = r.guest.transport.save();
    // The restored VM's device, on a fresh backend.
    let (bounce, shadows) = Fs::shadow_rings().unwrap();
    let (ours, _peer) = UnixStream::pair().unwrap();
    let mut fs = Fs::assemble("test", &state.tag, bounce, shadows, ours.as_raw_fd()).unwrap();
    std::mem::forget(ours);
    fs.restored = state.in_flight.clone();
    let fs = Arc::new(Mutex::new(fs));
    let t = crate::virtio::MmioTransport::restore(
        "test",
        r.guest.mem.clone(),
        fs.clone(),
        &transport_state,
    )
    .unwrap();
    r.guest.replace_transport(t);
    r.guest.start_loop(fs);
    assert_eq!(
        r.guest.wait_used(1, 1, DEADLINE),
        vec![(u32::from(head), 16)]
    );
    assert_eq!(out_header(&r.guest, r.guest.buf(1)), (16, -5, 555));
}

mod with_virtiofsd {
    //! The device and the daemon lifecycle against the real virtiofsd.
    //! These fail (never skip) when virtiofsd is not installed.

    use std::path::PathBuf;
    use std::sync::mpsc;

    use super::*;
    use crate::virtio::fs::daemon::{DaemonError, Virtiofsd, VirtiofsdConfig, INSTALL_HINT};

    /// A fresh directory under /tmp for one test (removed on drop).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!("minivmm-fs-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(p.join("share")).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn require_virtiofsd() {
        if let Err(e) = daemon::find_virtiofsd(None) {
            panic!("these tests need virtiofsd 1.14 ({e}); install it: {INSTALL_HINT}");
        }
    }

    fn config(dir: &TempDir) -> VirtiofsdConfig {
        let mut c = VirtiofsdConfig::new(dir.0.join("share"), dir.0.join("fs.sock"));
        c.sandbox = "none".into();
        c
    }

    fn start(dir: &TempDir) -> (Virtiofsd, mpsc::Receiver<std::process::ExitStatus>) {
        require_virtiofsd();
        let (tx, rx) = mpsc::channel();
        let d = Virtiofsd::start(
            "test",
            &config(dir),
            Box::new(move |s| {
                let _ = tx.send(s);
            }),
        )
        .unwrap();
        (d, rx)
    }

    fn init_request(unique: u64) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend_from_slice(&56u32.to_le_bytes());
        r.extend_from_slice(&26u32.to_le_bytes()); // FUSE_INIT
        r.extend_from_slice(&unique.to_le_bytes());
        r.extend_from_slice(&[0u8; 24]);
        r.extend_from_slice(&7u32.to_le_bytes());
        r.extend_from_slice(&31u32.to_le_bytes());
        r.extend_from_slice(&[0u8; 8]);
        r
    }

    fn device_guest(socket: &std::path::Path) -> TestGuest {
        let fs = Arc::new(Mutex::new(Fs::new("test", "share", socket).unwrap()));
        let mut g = TestGuest::new(fs.clone(), fs);
        g.init_driver(&[16, 64]).unwrap();
        g
    }

    #[test]
    fn fuse_init_round_trip_through_the_shadow_queue() {
        let dir = TempDir::new("init");
        let (daemon, exits) = start(&dir);
        let mut g = device_guest(daemon.socket_path());
        g.write_mem(g.buf(0), &init_request(77));
        let head = g.add_chain(1, &[Desc::r(g.buf(0), 56), Desc::w(g.buf(1), 256)]);
        g.kick(1);
        let used = g.wait_used(1, 1, DEADLINE);
        assert_eq!(used[0].0, u32::from(head));
        assert!(used[0].1 >= 16 + 24, "init reply of {} bytes", used[0].1);
        let (len, error, unique) = out_header(&g, g.buf(1));
        assert_eq!((len, error, unique), (used[0].1, 0, 77));
        let mut major = [0u8; 4];
        g.read_mem(g.buf(1) + 16, &mut major);
        assert_eq!(u32::from_le_bytes(major), 7);
        drop(g);
        let status = daemon.stop(daemon::DEFAULT_STOP_TIMEOUT);
        assert!(
            exits.try_recv().is_err(),
            "a requested stop is not reported ({status})"
        );
        assert!(!dir.0.join("fs.sock").exists());
        assert!(!dir.0.join("fs.sock.pid").exists());
    }

    #[test]
    fn daemon_killed_mid_session_fails_requests_and_is_reported_once() {
        let dir = TempDir::new("kill");
        let (daemon, exits) = start(&dir);
        let mut g = device_guest(daemon.socket_path());
        // SAFETY: kill(2) on the daemon's pid; it is our unreaped child.
        unsafe { libc::kill(daemon.pid() as i32, libc::SIGKILL) };
        let status = exits.recv_timeout(DEADLINE).expect("exit reported");
        assert!(!status.success());
        g.write_mem(g.buf(0), &init_request(5));
        let head = g.add_chain(1, &[Desc::r(g.buf(0), 56), Desc::w(g.buf(1), 256)]);
        g.kick(1);
        assert_eq!(g.wait_used(1, 1, DEADLINE), vec![(u32::from(head), 16)]);
        assert_eq!(out_header(&g, g.buf(1)), (16, -5, 5));
        drop(daemon);
        assert!(exits.try_recv().is_err(), "reported once");
        assert!(!dir.0.join("fs.sock").exists());
    }

    #[test]
    fn bad_configurations_are_refused_and_leave_nothing() {
        require_virtiofsd();
        let dir = TempDir::new("bad");
        let never = || -> daemon::ExitCallback { Box::new(|_| panic!("no daemon should run")) };
        let mut c = config(&dir);
        c.shared_dir = dir.0.join("missing");
        let e = Virtiofsd::start("test", &c, never()).err().unwrap();
        assert!(matches!(e, DaemonError::ShareDir { .. }), "{e}");
        assert!(e.to_string().contains("missing"));

        let mut c = config(&dir);
        c.binary = Some(dir.0.join("no-such-virtiofsd"));
        let e = Virtiofsd::start("test", &c, never()).err().unwrap();
        assert!(matches!(e, DaemonError::BinaryNotFound { .. }), "{e}");
        assert!(e.to_string().contains("cargo install --locked virtiofsd"));

        let mut c = config(&dir);
        c.socket_path = dir.0.join("x".repeat(120));
        let e = Virtiofsd::start("test", &c, never()).err().unwrap();
        assert!(matches!(e, DaemonError::SocketPathTooLong { .. }), "{e}");

        // virtiofsd itself refuses an unknown option: it exits before its
        // socket appears, and that is reported as an error, not a callback.
        let mut c = config(&dir);
        c.extra_args = vec!["--no-such-option".into()];
        let e = Virtiofsd::start("test", &c, never()).err().unwrap();
        assert!(matches!(e, DaemonError::ExitedEarly { .. }), "{e}");

        let left: Vec<_> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("share")]);
    }

    #[test]
    fn pooled_daemons_serve_their_own_directories_and_clean_up() {
        require_virtiofsd();
        let dir = TempDir::new("pool");
        let mut base = config(&dir);
        base.sandbox = "none".into();
        let mut pool = crate::virtio::fs::pool::VirtiofsdPool::new("test", &dir.0, base);
        pool.fill(2).unwrap();
        assert_eq!(pool.len(), 2);
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        assert!(pool.take().is_none());
        assert_ne!(a.dir, b.dir);
        assert_ne!(a.daemon.socket_path(), b.daemon.socket_path());
        let mut g = device_guest(a.daemon.socket_path());
        g.write_mem(g.buf(0), &init_request(3));
        g.add_chain(1, &[Desc::r(g.buf(0), 56), Desc::w(g.buf(1), 256)]);
        g.kick(1);
        g.wait_used(1, 1, DEADLINE);
        assert_eq!(out_header(&g, g.buf(1)).1, 0);
        drop(g);
        a.daemon.expect_exit();
        // The owner bind-mounts a directory into its slot; dropping the
        // daemon unmounts it and leaves that directory alone.
        let host = dir.0.join("host");
        std::fs::create_dir(&host).unwrap();
        std::fs::write(host.join("f"), b"kept").unwrap();
        let mut a = a;
        let sub = a.shared_dir().add_dir(&host, "rootfs").unwrap();
        assert_eq!(std::fs::read(a.dir.join("rootfs/f")).unwrap(), b"kept");
        let (a_dir, b_dir) = (a.dir.clone(), b.dir.clone());
        drop((a, b));
        assert!(!a_dir.exists() && !b_dir.exists());
        assert!(!crate::virtio::fs::subshare::is_mount_point(&sub.mount_point).unwrap());
        assert_eq!(std::fs::read(host.join("f")).unwrap(), b"kept");
        std::fs::remove_dir_all(&host).unwrap();
        // A handed-out daemon's unexpected exit reaches its new owner.
        pool.fill(1).unwrap();
        let c = pool.take().unwrap();
        // SAFETY: kill(2) on the pooled daemon, our own child.
        unsafe { libc::kill(c.daemon.pid() as i32, libc::SIGKILL) };
        assert!(c.exits.recv_timeout(DEADLINE).is_ok());
        drop(c);
        let left: Vec<_> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("share")]);
    }

    #[test]
    fn tags_are_checked() {
        for bad in ["", &"t".repeat(37), "a\0b"] {
            assert!(matches!(
                Fs::new("test", bad, std::path::Path::new("/nonexistent")),
                Err(FsError::Tag { .. })
            ));
        }
    }
}
