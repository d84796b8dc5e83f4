//! Templates and copy-on-write clones with real VMs (the test guest).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use agent_protocol::{
    AgentClient, CheckRequest, GetGuestTimeRequest, ReadRandomRequest, TouchMemoryRequest,
    AGENT_VSOCK_PORT,
};
use factory::{create_template, CloneOptions, CreateOptions, GuestSpec, TemplateHandle};
use vm_memory::{Bytes, GuestAddress};

const CALL: Duration = Duration::from_secs(10);
/// Where the guest's TouchMemory writes.
const TOUCH_BASE: u64 = 0x100_0000;

/// One template for the tests of this file, built once on /dev/shm.
fn shared_template() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        remove_stale_dirs();
        let dir = PathBuf::from(format!(
            "/dev/shm/minivmm-e2e-template-{}",
            std::process::id()
        ));
        create_template(
            &dir,
            &GuestSpec::testguest(1, 128),
            &CreateOptions::default(),
        )
        .expect("build template");
        dir
    })
}

/// Tests hold this shared; the fd/thread census holds it exclusively.
static CENSUS: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    CENSUS.read().unwrap_or_else(|p| p.into_inner())
}

fn exclusive() -> std::sync::RwLockWriteGuard<'static, ()> {
    CENSUS.write().unwrap_or_else(|p| p.into_inner())
}

/// Remove /dev/shm directories left by earlier test processes that are gone
/// (a test binary has no teardown hook; each run cleans up after the last).
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir("/dev/shm") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix("minivmm-e2e-")
            .and_then(|rest| rest.rsplit('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            // Templates' memory files are immutable: remove() unseals them.
            let _ = snapshot::template::remove(e.path());
            let _ = std::fs::remove_dir_all(e.path());
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn sha(path: &Path) -> String {
    snapshot::sha256_hex(&std::fs::read(path).unwrap())
}

fn read_random(agent: &mut AgentClient) -> Vec<u8> {
    agent
        .read_random(&ReadRandomRequest { n: 32 }, CALL)
        .unwrap()
        .data
}

#[test]
fn clones_have_distinct_rng_streams_unlike_the_template() {
    let _shared = shared();
    let handle = TemplateHandle::open(shared_template(), None).unwrap();
    // A raw restore without the readiness step continues the template's own
    // stream: what every clone would produce without a reseed.
    let raw_socket = factory::template::temp_socket_path("raw");
    let state: vmm::state::VmState = handle.template().read_state().unwrap();
    let mut raw = vmm::Vm::restore(
        vmm::vm::RestoreConfig {
            id: "raw".into(),
            memory: vmm::MemoryBackend::PrivateFile(handle.template().memory_path()),
            console: Box::new(std::io::sink()),
            vsock: Some(raw_socket.clone()),
            fs: Vec::new(),
        },
        &state,
    )
    .unwrap();
    raw.start().unwrap();
    let mut raw_agent =
        AgentClient::connect_hybrid_vsock(&raw_socket, AGENT_VSOCK_PORT, CALL).unwrap();
    let template_stream = read_random(&mut raw_agent);
    raw.stop();
    let _ = std::fs::remove_file(&raw_socket);

    let mut a = handle.clone_vm(CloneOptions::default()).unwrap();
    let mut b = handle.clone_vm(CloneOptions::default()).unwrap();
    let (ra, rb) = (read_random(&mut a.agent), read_random(&mut b.agent));
    assert_ne!(ra, rb, "two clones produced the same random bytes");
    assert_ne!(ra, template_stream);
    assert_ne!(rb, template_stream);
    // Each call advances the stream.
    assert_ne!(read_random(&mut a.agent), ra);
}

#[test]
fn clone_clock_follows_the_host() {
    let _shared = shared();
    let handle = TemplateHandle::open(shared_template(), None).unwrap();
    // The clone's wall clock is set from the host's during readiness, inside
    // clone_vm: it lies between a reading before and one after.
    let before = std::time::SystemTime::now();
    let mut c = handle.clone_vm(CloneOptions::default()).unwrap();
    let t = c
        .agent
        .get_guest_time(&GetGuestTimeRequest::default(), CALL)
        .unwrap();
    e2e::assert_clock_between(&t, before, std::time::SystemTime::now());
}

#[test]
fn clone_writes_reach_neither_the_template_nor_other_clones() {
    let _shared = shared();
    let dir = shared_template();
    let handle = TemplateHandle::open(dir, None).unwrap();
    let memory = handle.template().memory_path();
    let before = sha(&memory);
    let mut a = handle.clone_vm(CloneOptions::default()).unwrap();
    let b = handle.clone_vm(CloneOptions::default()).unwrap();
    let mut b_before = vec![0u8; 64 * 4096];
    b.vm.memory()
        .read_slice(&mut b_before, GuestAddress(TOUCH_BASE))
        .unwrap();
    let r = a
        .agent
        .touch_memory(
            &TouchMemoryRequest {
                pages: 64,
                pattern: 0xa7,
            },
            CALL,
        )
        .unwrap();
    assert_eq!(r.pages, 64);
    // The writing clone sees its own pattern...
    let mut a_now = vec![0u8; 64 * 4096];
    a.vm.memory()
        .read_slice(&mut a_now, GuestAddress(TOUCH_BASE))
        .unwrap();
    assert!(a_now.iter().all(|&x| x == 0xa7));
    // ...the other clone and the template file do not.
    let mut b_now = vec![0u8; 64 * 4096];
    b.vm.memory()
        .read_slice(&mut b_now, GuestAddress(TOUCH_BASE))
        .unwrap();
    assert!(b_now == b_before, "clone B saw clone A's writes");
    drop(a);
    drop(b);
    assert_eq!(sha(&memory), before, "the template memory file changed");
}

#[test]
fn a_clone_can_be_paused_and_resumed() {
    let _shared = shared();
    let handle = TemplateHandle::open(shared_template(), None).unwrap();
    let mut c = handle.clone_vm(CloneOptions::default()).unwrap();
    c.vm.pause().unwrap();
    c.vm.resume().unwrap();
    c.agent.check(&CheckRequest::default(), CALL).unwrap();
}

fn count_dir(path: &str) -> usize {
    std::fs::read_dir(path).unwrap().count()
}

// Runs as its own test binary section: other tests in this file start and
// stop VMs concurrently, so it takes the lock they all share.
#[test]
fn fifty_clones_leave_no_fds_or_threads_behind() {
    let _alone = exclusive();
    let handle = TemplateHandle::open(shared_template(), None).unwrap();
    // One clone first so lazily created process-wide resources exist.
    drop(handle.clone_vm(CloneOptions::default()).unwrap());
    let (fds, threads) = (count_dir("/proc/self/fd"), count_dir("/proc/self/task"));
    for _ in 0..50 {
        drop(handle.clone_vm(CloneOptions::default()).unwrap());
    }
    assert_eq!(count_dir("/proc/self/fd"), fds, "fds leaked");
    assert_eq!(count_dir("/proc/self/task"), threads, "threads leaked");
}

#[test]
fn restores_without_reseed_repeat_the_template_stream_and_a_reseed_changes_it() {
    let _shared = shared();
    let handle = TemplateHandle::open(shared_template(), None).unwrap();
    let state: vmm::state::VmState = handle.template().read_state().unwrap();
    let raw_stream = |reseed: Option<Vec<u8>>| {
        let socket = factory::template::temp_socket_path("raw");
        let mut vm = vmm::Vm::restore(
            vmm::vm::RestoreConfig {
                id: "raw".into(),
                memory: vmm::MemoryBackend::PrivateFile(handle.template().memory_path()),
                console: Box::new(std::io::sink()),
                vsock: Some(socket.clone()),
                fs: Vec::new(),
            },
            &state,
        )
        .unwrap();
        vm.start().unwrap();
        let mut agent = AgentClient::connect_hybrid_vsock(&socket, AGENT_VSOCK_PORT, CALL).unwrap();
        if let Some(data) = reseed {
            agent
                .reseed_random_dev(&agent_protocol::ReseedRandomDevRequest { data }, CALL)
                .unwrap();
        }
        let bytes = read_random(&mut agent);
        vm.stop();
        let _ = std::fs::remove_file(&socket);
        bytes
    };
    let first = raw_stream(None);
    assert_eq!(
        raw_stream(None),
        first,
        "the guest RNG is not deterministic across restores"
    );
    assert_ne!(
        raw_stream(Some(vec![0x42; 64])),
        first,
        "ReseedRandomDev did not change the stream"
    );
}

/// Copy the shared template into a fresh directory for corruption.
fn copy_template(name: &str) -> PathBuf {
    let src = shared_template();
    let dst = PathBuf::from(format!(
        "/dev/shm/minivmm-e2e-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["memory", "state", "manifest"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    dst
}

/// Name and SHA-256 of every file in `dir`.
fn fingerprint(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().to_string(), sha(&e.path()))
        })
        .collect();
    v.sort();
    v
}

/// Open a bad template: the error text, after checking that nothing on disk changed.
fn open_err(dir: &Path, expected: Option<&snapshot::GuestConfig>) -> String {
    let before = fingerprint(dir);
    let result = TemplateHandle::open(dir, expected);
    assert_eq!(fingerprint(dir), before, "opening the template modified it");
    match result {
        Ok(_) => panic!("a bad template in {} was accepted", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_templates_are_reported_and_left_as_they_were() {
    let _shared = shared();
    // A flipped byte in the state file.
    let dir = copy_template("flipped");
    let mut state = std::fs::read(dir.join("state")).unwrap();
    let mid = state.len() / 2;
    state[mid] ^= 0x40;
    std::fs::write(dir.join("state"), &state).unwrap();
    let e = open_err(&dir, None);
    assert!(e.contains("state") && e.contains("checksum"), "{e}");
    assert_eq!(
        std::fs::read(dir.join("state")).unwrap(),
        state,
        "the template was modified"
    );

    // Truncated memory.
    let dir = copy_template("truncated");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("memory"))
        .unwrap();
    f.set_len(1 << 20).unwrap();
    let e = open_err(&dir, None);
    assert!(
        e.contains("memory") && e.contains("1048576") && e.contains(&(128u64 << 20).to_string()),
        "{e}"
    );

    // No manifest.
    let dir = copy_template("nomanifest");
    std::fs::remove_file(dir.join("manifest")).unwrap();
    let e = open_err(&dir, None);
    assert!(e.contains("incomplete template"), "{e}");

    // Built with 1 vCPU, asked for 2.
    let dir = copy_template("vcpus");
    let mut want = snapshot::Template::open(&dir, vmm::state::STATE_SCHEMA)
        .unwrap()
        .manifest()
        .config
        .clone();
    want.vcpus = 2;
    let e = open_err(&dir, Some(&want));
    assert!(e.contains("vcpus"), "{e}");
    for name in ["flipped", "truncated", "nomanifest", "vcpus"] {
        let _ = std::fs::remove_dir_all(format!(
            "/dev/shm/minivmm-e2e-{name}-{}",
            std::process::id()
        ));
    }
}

/// A template of its own for one test, in /dev/shm (so a crashed run's is
/// found by `remove_stale_dirs`), removed (unsealed first) when dropped.
struct OwnTemplate {
    dir: PathBuf,
}

impl OwnTemplate {
    fn path(name: &str) -> PathBuf {
        remove_stale_dirs();
        PathBuf::from(format!(
            "/dev/shm/minivmm-e2e-{name}-{}",
            std::process::id()
        ))
    }

    fn build(name: &str, spec: &GuestSpec) -> OwnTemplate {
        let dir = Self::path(name);
        let _ = snapshot::template::remove(&dir);
        create_template(&dir, spec, &CreateOptions::default()).expect("build template");
        OwnTemplate { dir }
    }
}

impl Drop for OwnTemplate {
    fn drop(&mut self) {
        let _ = snapshot::template::remove(&self.dir);
    }
}

fn lsattr_immutable(path: &Path) -> bool {
    let file = std::fs::File::open(path).unwrap();
    snapshot::fsfile::is_immutable(&file)
}

/// Every vCPU of a multi-vCPU guest goes through pause, save (KVM state in
/// KVM's order, XSAVE2, TSC frequency) and restore, and the clones answer.
fn multi_vcpu_round_trip(vcpus: u32) {
    let _shared = shared();
    let t = OwnTemplate::build(&format!("vcpus{vcpus}"), &GuestSpec::testguest(vcpus, 64));
    let handle = TemplateHandle::open(&t.dir, None).unwrap();
    let state = handle.state();
    assert_eq!(state.vcpus.len(), vcpus as usize);
    // KVM_GET_XSAVE2 returns at least the legacy 4 KiB area for every vCPU.
    for v in &state.vcpus {
        assert!(
            v.xsave.len() * 4 >= 4096,
            "xsave of {} bytes",
            v.xsave.len() * 4
        );
    }
    let mut a = handle.clone_vm(CloneOptions::default()).unwrap();
    let mut b = handle.clone_vm(CloneOptions::default()).unwrap();
    a.agent.check(&CheckRequest::default(), CALL).unwrap();
    b.agent.check(&CheckRequest::default(), CALL).unwrap();

    // A clone pauses with every vCPU, saves (each vCPU's state read in
    // KVM's order), runs on after resume, and its saved state restores into
    // a new VM that answers.
    a.vm.pause().unwrap();
    let saved = a.vm.save().unwrap();
    assert_eq!(saved.vcpus.len(), vcpus as usize);
    for (i, (v, t)) in saved.vcpus.iter().zip(&state.vcpus).enumerate() {
        assert_eq!(v.xsave.len(), t.xsave.len(), "vCPU {i}: XSAVE size changed");
        assert_eq!(v.tsc_khz, t.tsc_khz, "vCPU {i}: TSC frequency changed");
    }
    // Its RAM as it was at the save (a copy of its private view), so the
    // saved state can be restored over the memory it belongs to.
    let ram_file = PathBuf::from(format!(
        "/dev/shm/minivmm-e2e-resave{vcpus}-{}",
        std::process::id()
    ));
    let mut ram = vec![0u8; a.vm.ram().size() as usize];
    a.vm.memory().read_slice(&mut ram, GuestAddress(0)).unwrap();
    std::fs::write(&ram_file, &ram).unwrap();
    drop(ram);
    a.vm.resume().unwrap();
    a.agent.check(&CheckRequest::default(), CALL).unwrap();

    let socket = factory::template::temp_socket_path("resaved");
    let mut c = vmm::Vm::restore(
        vmm::vm::RestoreConfig {
            id: "resaved".into(),
            memory: vmm::MemoryBackend::PrivateFile(ram_file.clone()),
            console: Box::new(std::io::sink()),
            vsock: Some(socket.clone()),
            fs: Vec::new(),
        },
        &saved,
    )
    .unwrap();
    c.start().unwrap();
    let mut agent = AgentClient::connect_hybrid_vsock(&socket, AGENT_VSOCK_PORT, CALL).unwrap();
    agent.check(&CheckRequest::default(), CALL).unwrap();
    c.stop();
    drop(c);
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&ram_file);
    b.agent.check(&CheckRequest::default(), CALL).unwrap();
}

#[test]
fn two_vcpu_template_pauses_saves_restores_and_its_clones_answer() {
    multi_vcpu_round_trip(2);
}

#[test]
fn four_vcpu_template_pauses_saves_restores_and_its_clones_answer() {
    multi_vcpu_round_trip(4);
}

#[test]
fn cp_and_truncate_over_a_template_under_a_running_clone_are_refused() {
    let _shared = shared();
    let dir = shared_template();
    let memory = dir.join("memory");
    assert!(
        lsattr_immutable(&memory),
        "committed memory is not immutable"
    );
    let handle = TemplateHandle::open(dir, None).unwrap();
    let mut c = handle.clone_vm(CloneOptions::default()).unwrap();
    let before = sha(&memory);

    // Identical bytes copied over it, as in the demonstrated crash.
    let copy = std::env::temp_dir().join(format!("minivmm-e2e-copy-{}", std::process::id()));
    std::fs::copy(&memory, &copy).unwrap();
    let cp = std::process::Command::new("cp")
        .arg(&copy)
        .arg(&memory)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&copy);
    assert!(
        !cp.status.success(),
        "cp over the template memory succeeded"
    );
    assert!(
        String::from_utf8_lossy(&cp.stderr).contains("Operation not permitted"),
        "{cp:?}"
    );
    let truncate = std::process::Command::new("truncate")
        .args(["-s", "0"])
        .arg(&memory)
        .output()
        .unwrap();
    assert!(
        !truncate.status.success(),
        "truncate of the template memory succeeded"
    );
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EPERM), "{err}");

    // The clone keeps answering and writing its own memory; new clones work.
    c.agent.check(&CheckRequest::default(), CALL).unwrap();
    let r = c
        .agent
        .touch_memory(
            &TouchMemoryRequest {
                pages: 16,
                pattern: 0x3c,
            },
            CALL,
        )
        .unwrap();
    assert_eq!(r.pages, 16);
    let mut d = handle.clone_vm(CloneOptions::default()).unwrap();
    d.agent.check(&CheckRequest::default(), CALL).unwrap();
    assert_eq!(sha(&memory), before, "the template memory file changed");
}

/// EPERM (include/uapi/asm-generic/errno-base.h).
const EPERM: i32 = 1;

#[test]
fn manifest_that_disagrees_with_the_state_is_refused_naming_the_field() {
    let _shared = shared();
    // Edits of the manifest text, as a person (or one flipped bit) makes them.
    let cases = [
        ("vcpus", "\"vcpus\": 1,", "\"vcpus\": 2,"),
        // '1' -> '0' is one bit.
        ("vcpus", "\"vcpus\": 1,", "\"vcpus\": 0,"),
        ("mem_mib", "\"mem_mib\": 128,", "\"mem_mib\": 256,"),
        ("devices", "\"rng\",", ""),
        // Fields the state cannot vouch for are covered by the manifest's digest.
        (
            "changed or corrupted",
            "\"cmdline\": \"\"",
            "\"cmdline\": \"a\"",
        ),
    ];
    for (i, (field, from, to)) in cases.into_iter().enumerate() {
        let dir = copy_template(&format!("mismatch{i}"));
        let path = dir.join("manifest");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{text}");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
        let e = open_err(&dir, None);
        assert!(e.contains(field), "case {i}: {e}");
        assert_eq!(e.lines().count(), 1, "{e}");
        let check = TemplateHandle::check(&dir, false)
            .err()
            .unwrap()
            .to_string();
        assert!(check.contains(field), "case {i}: {check}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn a_failed_force_rebuild_keeps_the_old_template_and_old_handles_keep_their_memory() {
    let _shared = shared();
    let t = OwnTemplate::build("force", &GuestSpec::testguest(1, 64));
    let old_manifest = std::fs::read(t.dir.join("manifest")).unwrap();
    let old_handle = TemplateHandle::open(&t.dir, None).unwrap();
    let overwrite = CreateOptions {
        overwrite: true,
        ..CreateOptions::default()
    };

    // The guest resets right after its ready line: the rebuild fails.
    let failing = GuestSpec {
        cmdline: "action=reset".into(),
        ..GuestSpec::testguest(1, 96)
    };
    assert!(create_template(&t.dir, &failing, &overwrite).is_err());
    assert_eq!(
        std::fs::read(t.dir.join("manifest")).unwrap(),
        old_manifest,
        "a failed rebuild changed the template"
    );
    TemplateHandle::open(&t.dir, None).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".minivmm-e2e-force-") && n.contains(".rebuild-"))
        .collect();
    assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");

    // A rebuild that succeeds swaps in a 96 MiB template...
    create_template(&t.dir, &GuestSpec::testguest(1, 96), &overwrite).unwrap();
    let new_handle = TemplateHandle::open(&t.dir, None).unwrap();
    assert_eq!(new_handle.state().mem_mib, 96);
    let n = new_handle.clone_vm(CloneOptions::default()).unwrap();
    assert_eq!(n.vm.ram().size(), 96 << 20);
    // ...while the handle opened before it maps its own 64 MiB memory with
    // its own state, and its clones answer.
    let mut o = old_handle.clone_vm(CloneOptions::default()).unwrap();
    assert_eq!(o.vm.ram().size(), 64 << 20);
    o.agent.check(&CheckRequest::default(), CALL).unwrap();
}
