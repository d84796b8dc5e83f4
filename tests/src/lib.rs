//! Helpers for end-to-end tests: boot the built-in test guest with a config
//! and watch its console, always with deadlines.

use std::sync::Arc;
use std::time::Duration;

use vmm::console::ConsoleLines;
use vmm::{KernelImage, MemoryBackend, Vm, VmConfig};

pub use testguest_image::READY_LINE;

/// Generous deadline for anything a guest must do (CI machines are slow and
/// busy; this bounds a hang, it is not a performance check).
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A booted test guest and its console.
pub struct TestVm {
    /// The VM.
    pub vm: Vm,
    /// Its console lines.
    pub console: ConsoleLines,
}

/// The embedded test guest image.
pub fn testguest() -> KernelImage {
    KernelImage::Bytes {
        name: testguest_image::TESTGUEST_NAME.into(),
        data: Arc::from(testguest_image::TESTGUEST_ELF),
    }
}

/// Boot the test guest with `cmdline`, `vcpus`, 256 MiB and `memory`.
pub fn boot(cmdline: &str, vcpus: u32, memory: MemoryBackend) -> TestVm {
    let console = ConsoleLines::new();
    let mut vm = Vm::create(VmConfig {
        id: vmm::vm::default_vm_id(),
        vcpus,
        mem_mib: 256,
        memory,
        kernel: testguest(),
        cmdline: cmdline.into(),
        initrd: None,
        console: Box::new(console.tap(Box::new(std::io::sink()))),
        virtio: vmm::VirtioConfig::default(),
        allow_pvm_native: true,
    })
    .expect("create VM");
    vm.start().expect("start VM");
    TestVm { vm, console }
}

impl TestVm {
    /// Wait for a console line containing `needle`; panics with the console
    /// and the VM's exit if it does not come.
    pub fn expect_line(&self, needle: &str) -> (usize, String) {
        self.expect_line_from(needle, 0)
    }

    /// Like `expect_line`, looking only at lines from index `from` on.
    pub fn expect_line_from(&self, needle: &str, from: usize) -> (usize, String) {
        self.console.wait_for(needle, from, DEADLINE).unwrap_or_else(|| {
            panic!(
                "no console line containing {needle:?} within {DEADLINE:?}; exit: {:?}; console: {:#?}",
                self.vm.wait_exit(Some(Duration::ZERO)),
                self.console.lines()
            )
        })
    }
}

/// A unique temporary path for this test process.
pub fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("minivmm-e2e-{}-{name}", std::process::id()))
}

/// How far the guest's wall clock may legitimately stray from the host's,
/// other than by the time between the readings: the protocol's unit (1 us)
/// at each of the two truncations (set, get), and a rate difference of at
/// most 1000 ppm (the host's realtime clock is slewed by NTP by at most
/// 500 ppm, kvmclock follows the host's monotonic clock; a guest without
/// kvmclock counts the TSC at a frequency good to a few parts in 10^4).
pub const CLOCK_GRANULARITY: Duration = Duration::from_micros(2);
/// See [`CLOCK_GRANULARITY`]: the most the two clocks' rates may differ.
pub const CLOCK_RATE_PPM: u32 = 1000;

/// Assert causality of a guest's wall clock (from GetGuestTime, taken after
/// the host set it from its own clock): it must lie between `before`, a host
/// reading taken before the clock was set, and `after`, one taken after the
/// answer arrived, up to [`CLOCK_GRANULARITY`] and the rate difference over
/// that interval. Nothing here depends on how long the calls took.
pub fn assert_clock_between(
    t: &agent_protocol::GetGuestTimeResponse,
    before: std::time::SystemTime,
    after: std::time::SystemTime,
) {
    let since_epoch = |s: std::time::SystemTime| s.duration_since(std::time::UNIX_EPOCH).unwrap();
    let (before, after) = (since_epoch(before), since_epoch(after));
    assert!(
        (0..1_000_000).contains(&t.usec) && t.sec >= 0,
        "guest time out of range: {t:?}"
    );
    let guest = Duration::new(t.sec as u64, (t.usec as u32) * 1000);
    let slack = CLOCK_GRANULARITY + (after - before) * CLOCK_RATE_PPM / 1_000_000;
    assert!(
        guest + slack >= before && guest <= after + slack,
        "guest clock {guest:?} outside the host's [{before:?}, {after:?}] (slack {slack:?})"
    );
}
