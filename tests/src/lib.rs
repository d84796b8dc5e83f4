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

/// Assert that a guest's wall clock (from GetGuestTime) is within
/// `tolerance` of the host's.
pub fn assert_clock_near_host(t: &agent_protocol::GetGuestTimeResponse, tolerance: Duration) {
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let guest = Duration::new(t.sec as u64, (t.usec as u32) * 1000);
    let diff = host.abs_diff(guest);
    assert!(diff < tolerance, "guest clock off by {diff:?}");
}
