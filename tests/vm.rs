//! Real VMs booting the test guest on this host's KVM (PVM here).

use std::time::Duration;

use e2e::{boot, temp_path, DEADLINE, READY_LINE};
use vmm::{GuestExit, MemoryBackend};

/// Guest-physical address where the test guest's `touch` action writes.
const TOUCH_BASE: usize = 0x100_0000;

#[test]
fn ready_line_then_reset_ends_the_vm() {
    let t = boot("action=reset", 1, MemoryBackend::Anonymous);
    t.expect_line(READY_LINE);
    assert_eq!(t.vm.wait_exit(Some(DEADLINE)), Some(GuestExit::Reset));
}

#[test]
fn guest_sees_its_memory_map_and_vcpu_count() {
    let t = boot("action=reset", 1, MemoryBackend::Anonymous);
    let (_, info) = t.expect_line("minivmm-testguest: pvm=");
    // 256 MiB less the legacy hole below 1 MiB, as the e820 map says.
    assert!(info.contains("cpus=1 mem_mib=255"), "{info}");
}

#[test]
fn two_vcpus_come_up() {
    let t = boot("action=cpus", 2, MemoryBackend::Anonymous);
    t.expect_line("cpus online 2");
    assert_eq!(t.vm.wait_exit(Some(DEADLINE)), Some(GuestExit::Reset));
}

#[test]
fn timer_interrupts_wake_a_halted_guest() {
    let t = boot("action=ticks:20", 1, MemoryBackend::Anonymous);
    t.expect_line("ticks 20 done");
    assert_eq!(t.vm.wait_exit(Some(DEADLINE)), Some(GuestExit::Reset));
}

#[test]
fn pause_stops_a_counting_guest_and_resume_continues_it() {
    let mut t = boot("action=count", 1, MemoryBackend::Anonymous);
    t.expect_line("count 10");
    t.vm.pause().expect("pause");
    let seen = t.console.len();
    // Paused vCPUs cannot produce output: no new count line may appear.
    assert_eq!(
        t.console
            .wait_for("count", seen, Duration::from_millis(300)),
        None,
        "guest kept counting while paused"
    );
    t.vm.resume().expect("resume");
    t.expect_line_from("count", seen);
    t.vm.stop();
    assert_eq!(
        t.vm.wait_exit(Some(Duration::ZERO)),
        Some(GuestExit::Stopped)
    );
}

#[test]
fn shared_memory_file_receives_guest_writes_private_does_not() {
    let path = temp_path("touch-mem");
    let _ = std::fs::remove_file(&path);
    let t = boot(
        "action=touch:16:0xa5",
        1,
        MemoryBackend::SharedFile(path.clone()),
    );
    t.expect_line("touched 16 pages");
    assert_eq!(t.vm.wait_exit(Some(DEADLINE)), Some(GuestExit::Reset));
    drop(t);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 256 << 20);
    assert!(bytes[TOUCH_BASE..TOUCH_BASE + 16 * 4096]
        .iter()
        .all(|&b| b == 0xa5));
    assert_ne!(bytes[TOUCH_BASE + 16 * 4096], 0xa5);

    // The same file mapped privately: the guest writes another pattern, the file keeps 0xa5.
    let before = bytes;
    let t = boot(
        "action=touch:16:0x3c",
        1,
        MemoryBackend::PrivateFile(path.clone()),
    );
    t.expect_line("touched 16 pages");
    assert_eq!(t.vm.wait_exit(Some(DEADLINE)), Some(GuestExit::Reset));
    drop(t);
    let after = std::fs::read(&path).unwrap();
    assert!(after == before, "a private mapping changed the memory file");
    std::fs::remove_file(&path).unwrap();
}

/// The number in a `count N` console line.
fn count_of(line: &str) -> u64 {
    line.trim_start_matches("count ")
        .parse()
        .expect("count line")
}

#[test]
fn saved_state_restores_into_a_copy_on_write_clone_that_continues() {
    let path = temp_path("save-restore-mem");
    let _ = std::fs::remove_file(&path);
    let mut t = boot("action=count", 1, MemoryBackend::SharedFile(path.clone()));
    t.expect_line("count 20");
    t.vm.pause().expect("pause");
    let state = t.vm.save().expect("save");
    let last = t
        .console
        .lines()
        .iter()
        .rev()
        .find(|l| l.starts_with("count "))
        .map(|l| count_of(l))
        .unwrap();
    t.vm.stop();
    drop(t);
    let file_before = std::fs::read(&path).unwrap();

    for _ in 0..2 {
        let console = vmm::console::ConsoleLines::new();
        let mut clone = vmm::Vm::restore(
            vmm::vm::RestoreConfig {
                id: vmm::vm::default_vm_id(),
                memory: MemoryBackend::PrivateFile(path.clone()),
                console: Box::new(console.tap(Box::new(std::io::sink()))),
                vsock: None,
                fs: Vec::new(),
            },
            &state,
        )
        .expect("restore");
        clone.start().expect("start clone");
        // The clone continues the count where the original was paused (one
        // line may have been half printed at the pause: its tail comes first).
        let (_, first) = console
            .wait_for("count ", 0, DEADLINE)
            .expect("restored guest prints");
        let n = count_of(&first);
        assert!(
            n == last + 1 || n == last + 2,
            "last before pause {last}, first after restore: {first}"
        );
        clone.stop();
    }
    // Clones never write the memory file.
    assert!(std::fs::read(&path).unwrap() == file_before);
    std::fs::remove_file(&path).unwrap();
}
