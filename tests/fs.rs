//! virtio-fs with real VMs (the test guest) and the real virtiofsd: file
//! access through the shadow queue, a daemon killed mid-read, and a template
//! with the device whose clones each get their own daemon and directory.
//! These tests fail (never skip) when virtiofsd is missing.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::mpsc;
use std::time::Duration;

use agent_protocol::{
    AgentClient, CheckRequest, FsListRequest, FsPathRequest, FsReadRequest, FsWriteRequest,
    AGENT_VSOCK_PORT,
};
use devices::virtio::fs::daemon::{find_virtiofsd, Virtiofsd, VirtiofsdConfig, INSTALL_HINT};
use devices::virtio::fs::pool::VirtiofsdPool;
use devices::virtio::fs::subshare::{is_mount_point, SharedDir};
use e2e::{temp_path, testguest, DEADLINE, READY_LINE};
use factory::{create_template, CloneOptions, CreateOptions, GuestSpec, TemplateHandle};
use vmm::console::ConsoleLines;
use vmm::{FsShare, MemoryBackend, Vm, VmConfig};

const CALL: Duration = Duration::from_secs(10);
const CHUNK: u32 = 256 * 1024;

fn require_virtiofsd() {
    if let Err(e) = find_virtiofsd(None) {
        panic!("virtio-fs tests need virtiofsd 1.14 ({e}); install it: {INSTALL_HINT}");
    }
}

/// A fresh directory (removed on drop).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = temp_path(name);
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A virtiofsd on `dir`; its unexpected exit arrives on the receiver.
fn daemon(name: &str, dir: &Path) -> (Virtiofsd, mpsc::Receiver<ExitStatus>) {
    daemon_with(name, dir, |_| {})
}

/// A virtiofsd on `dir`, its configuration adjusted by `adjust`.
fn daemon_with(
    name: &str,
    dir: &Path,
    adjust: impl FnOnce(&mut VirtiofsdConfig),
) -> (Virtiofsd, mpsc::Receiver<ExitStatus>) {
    require_virtiofsd();
    let socket = temp_path(&format!("{name}.fs.sock"));
    let _ = std::fs::remove_file(&socket);
    let (tx, rx) = mpsc::channel();
    let mut config = VirtiofsdConfig::new(dir, socket);
    adjust(&mut config);
    let d = Virtiofsd::start(
        name,
        &config,
        Box::new(move |s| {
            let _ = tx.send(s);
        }),
    )
    .expect("start virtiofsd");
    (d, rx)
}

fn share(d: &Virtiofsd) -> FsShare {
    FsShare {
        tag: "share".into(),
        socket: d.socket_path().to_path_buf(),
    }
}

struct FsVm {
    vm: Vm,
    socket: PathBuf,
    _console: ConsoleLines,
}

impl Drop for FsVm {
    fn drop(&mut self) {
        self.vm.stop();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn boot(name: &str, fs: Vec<FsShare>) -> FsVm {
    let socket = temp_path(&format!("{name}.vsock"));
    let _ = std::fs::remove_file(&socket);
    let console = ConsoleLines::new();
    let mut vm = Vm::create(VmConfig {
        id: name.into(),
        vcpus: 1,
        mem_mib: 128,
        memory: MemoryBackend::Anonymous,
        kernel: testguest(),
        cmdline: String::new(),
        console: Box::new(console.tap(Box::new(std::io::sink()))),
        virtio: vmm::VirtioConfig {
            rng: true,
            vsock: Some(socket.clone()),
            fs,
            mem: None,
        },
        initrd: None,
        allow_pvm_native: true,
    })
    .expect("create VM");
    vm.start().expect("start");
    if console.wait_for(READY_LINE, 0, DEADLINE).is_none() {
        panic!("no ready line; console: {:?}", console.lines());
    }
    FsVm {
        vm,
        socket,
        _console: console,
    }
}

fn read_chunk(a: &mut AgentClient, path: &str, offset: u64) -> Result<Vec<u8>, String> {
    a.fs_read(
        &FsReadRequest {
            tag: String::new(),
            path: path.into(),
            offset,
            len: CHUNK,
        },
        CALL,
    )
    .map(|r| r.data)
    .map_err(|e| e.to_string())
}

fn read_all(a: &mut AgentClient, path: &str) -> Vec<u8> {
    let mut data = Vec::new();
    loop {
        let chunk = read_chunk(a, path, data.len() as u64).unwrap();
        let n = chunk.len();
        data.extend(chunk);
        if n < CHUNK as usize {
            return data;
        }
    }
}

fn write_file(a: &mut AgentClient, path: &str, data: &[u8]) {
    // The test guest's agent takes at most 64 KiB per request: chunks.
    let mut offset = 0;
    loop {
        let chunk = &data[offset..(offset + 32 * 1024).min(data.len())];
        let r = a
            .fs_write(
                &FsWriteRequest {
                    tag: String::new(),
                    path: path.into(),
                    offset: offset as u64,
                    data: chunk.to_vec(),
                },
                CALL,
            )
            .unwrap();
        assert_eq!(r.written as usize, chunk.len());
        offset += chunk.len();
        if offset >= data.len() {
            return;
        }
    }
}

fn list(a: &mut AgentClient, path: &str) -> Vec<String> {
    let mut names = a
        .fs_list(
            &FsListRequest {
                tag: String::new(),
                path: path.into(),
            },
            CALL,
        )
        .unwrap()
        .names;
    names.sort();
    names
}

fn random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    factory::clone::host_entropy(&mut v).unwrap();
    v
}

/// SIGKILL a virtiofsd and the process it serves from: its sandbox runs
/// the server as a child of the process we started, which would otherwise
/// outlive the parent's kill for a moment and still answer a request. Each
/// child is waited for (pidfd) before the parent is killed.
fn kill_daemon_tree(pid: u32) {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .expect("read the daemon's children");
    for child in children.split_whitespace() {
        let child: i32 = child.parse().expect("a pid");
        // SAFETY: pidfd_open takes a pid and flags; the result is checked.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child, 0) } as i32;
        assert!(fd >= 0, "pidfd_open {child}");
        // SAFETY: kill(2) on the daemon's own server process.
        unsafe { libc::kill(child, libc::SIGKILL) };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd; a pidfd is readable once the process ended.
        let n = unsafe { libc::poll(&mut pfd, 1, DEADLINE.as_millis() as i32) };
        // SAFETY: closes the pidfd opened above, used nowhere else.
        unsafe { libc::close(fd) };
        assert_eq!(n, 1, "virtiofsd server {child} did not end");
    }
    // SAFETY: kill(2) on the daemon, our own unreaped child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

#[test]
fn virtiofsd_killed_while_the_guest_reads_fails_the_read_not_the_vm() {
    let dir = TempDir::new("fs-kill");
    let big = random(4 << 20);
    std::fs::write(dir.0.join("big.bin"), &big).unwrap();
    let (d, exits) = daemon("fs-kill", &dir.0);
    let v = boot("fs-kill", vec![share(&d)]);
    let mut a = AgentClient::connect_hybrid_vsock(&v.socket, AGENT_VSOCK_PORT, CALL).unwrap();
    let first = read_chunk(&mut a, "big.bin", 0).unwrap();
    assert_eq!(first, big[..CHUNK as usize]);
    kill_daemon_tree(d.pid());
    let status = exits.recv_timeout(DEADLINE).expect("the owner is told");
    assert!(!status.success());
    // The rest of the file: the guest's request fails with EIO, it does not hang.
    let err = read_chunk(&mut a, "big.bin", u64::from(CHUNK)).unwrap_err();
    assert!(err.contains("errno 5"), "{err}");
    // The VM and its agent are still up.
    a.check(&CheckRequest::default(), CALL).unwrap();
    assert!(v.vm.wait_exit(Some(Duration::ZERO)).is_none());
    drop(d);
    assert!(exits.try_recv().is_err(), "reported once");
}

#[test]
fn guest_makes_directories_writes_into_them_and_removes_files() {
    let dir = TempDir::new("fs-mkdir");
    let (d, _exits) = daemon("fs-mkdir", &dir.0);
    let v = boot("fs-mkdir", vec![share(&d)]);
    let mut a = AgentClient::connect_hybrid_vsock(&v.socket, AGENT_VSOCK_PORT, CALL).unwrap();
    let req = |path: &str| FsPathRequest {
        tag: "share".into(),
        path: path.into(),
    };
    a.fs_mkdir(&req("d1"), CALL).unwrap();
    a.fs_mkdir(&req("d1/d2"), CALL).unwrap();
    assert!(dir.0.join("d1/d2").is_dir());
    let data = random(100_000);
    write_file(&mut a, "d1/d2/f", &data);
    assert_eq!(std::fs::read(dir.0.join("d1/d2/f")).unwrap(), data);
    assert_eq!(read_all(&mut a, "d1/d2/f"), data);
    let e = a.fs_mkdir(&req("d1"), CALL).unwrap_err().to_string();
    assert!(e.contains("ALREADY_EXISTS"), "{e}");
    a.fs_unlink(&req("d1/d2/f"), CALL).unwrap();
    assert!(!dir.0.join("d1/d2/f").exists());
    assert!(list(&mut a, "d1/d2").is_empty());
    let e = a.fs_unlink(&req("d1/d2/f"), CALL).unwrap_err().to_string();
    assert!(e.contains("NOT_FOUND"), "{e}");
    // Paths stay inside the share.
    let e = a.fs_mkdir(&req("../escape"), CALL).unwrap_err().to_string();
    assert!(e.contains("INVALID_ARGUMENT"), "{e}");
}

#[test]
fn an_extra_host_directory_is_shared_into_a_running_vm_and_removed() {
    let base = TempDir::new("fs-extra");
    let root = base.0.join("share");
    let host = base.0.join("host");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&host).unwrap();
    std::fs::write(root.join("base.txt"), b"base").unwrap();
    let inner = random(300_000);
    std::fs::write(host.join("inner.bin"), &inner).unwrap();
    // Declared after `base`: dropped (unmounted) before the directories go.
    let mut shared = SharedDir::new("fs-extra", &root).expect("prepare the share");
    let (d, exits) = daemon_with("fs-extra", shared.path(), |c| c.announce_submounts = true);
    let v = boot("fs-extra", vec![share(&d)]);
    let mut a = AgentClient::connect_hybrid_vsock(&v.socket, AGENT_VSOCK_PORT, CALL).unwrap();
    assert_eq!(list(&mut a, "."), ["base.txt"]);

    let sub = shared
        .add_dir(&host, "extra")
        .expect("add the extra directory");
    assert!(is_mount_point(&sub.mount_point).unwrap());
    assert_eq!(list(&mut a, "."), ["base.txt", "extra"]);
    assert_eq!(list(&mut a, "extra"), ["inner.bin"]);
    assert_eq!(read_all(&mut a, "extra/inner.bin"), inner);
    // The guest writes through the extra directory into the host directory.
    let written = random(50_000);
    write_file(&mut a, "extra/from-guest", &written);
    assert_eq!(std::fs::read(host.join("from-guest")).unwrap(), written);

    shared
        .remove_dir("extra")
        .expect("remove the extra directory");
    assert_eq!(list(&mut a, "."), ["base.txt"]);
    let e = read_chunk(&mut a, "extra/inner.bin", 0).unwrap_err();
    assert!(e.contains("NOT_FOUND"), "{e}");
    assert!(!sub.mount_point.exists());
    assert!(!is_mount_point(&sub.mount_point).unwrap());
    assert!(!is_mount_point(&host).unwrap());
    // The host directory is untouched.
    let mut names: Vec<_> = std::fs::read_dir(&host)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["from-guest", "inner.bin"]);
    assert_eq!(std::fs::read(host.join("inner.bin")).unwrap(), inner);
    // The daemon kept serving throughout.
    assert_eq!(read_all(&mut a, "base.txt"), b"base");
    assert!(exits.try_recv().is_err());
    drop(v);
    drop(d);
    let root_mount = shared.path().to_path_buf();
    drop(shared);
    assert!(!is_mount_point(&root_mount).unwrap());
}

#[test]
fn a_pooled_daemon_serves_a_directory_its_owner_bind_mounts_after_the_start() {
    require_virtiofsd();
    let base = TempDir::new("fs-pool-mount");
    let host = base.0.join("rootfs");
    std::fs::create_dir(&host).unwrap();
    let data = random(70_000);
    std::fs::write(host.join("app.bin"), &data).unwrap();
    // virtiofsd's default sandbox: its own mount namespace.
    let mut pool = VirtiofsdPool::new(
        "fs-pool-mount",
        &base.0.join("pool"),
        VirtiofsdConfig::new(&base.0, base.0.join("unused.sock")),
    );
    pool.fill(1).unwrap();
    let mut d = pool.take().unwrap();
    // The daemon already runs; the sandbox's rootfs arrives now.
    d.shared_dir().add_dir(&host, "rootfs").unwrap();
    let v = boot("fs-pool-mount", vec![share(&d.daemon)]);
    let mut a = AgentClient::connect_hybrid_vsock(&v.socket, AGENT_VSOCK_PORT, CALL).unwrap();
    assert_eq!(list(&mut a, "."), ["rootfs"]);
    assert_eq!(read_all(&mut a, "rootfs/app.bin"), data);
    drop(v);
    let mount_point = d.dir.join("rootfs");
    drop(d);
    assert!(!is_mount_point(&mount_point).unwrap());
    assert_eq!(std::fs::read(host.join("app.bin")).unwrap(), data);
}

#[test]
fn template_with_virtio_fs_and_clones_with_their_own_shares() {
    let base = TempDir::new("fs-template");
    let empty = base.0.join("template-share");
    std::fs::create_dir(&empty).unwrap();
    let (template_daemon, _) = daemon("fs-template", &empty);
    let template_dir = PathBuf::from(format!(
        "/dev/shm/minivmm-e2e-fs-template-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&template_dir);
    create_template(
        &template_dir,
        &GuestSpec::testguest(1, 128),
        &CreateOptions {
            fs: vec![share(&template_daemon)],
            ..CreateOptions::default()
        },
    )
    .expect("build template");
    drop(template_daemon);
    let memory = template_dir.join("memory");
    let sha_before = snapshot::sha256_hex(&std::fs::read(&memory).unwrap());

    let handle = TemplateHandle::open(&template_dir, None).unwrap();
    let mut clones = Vec::new();
    for i in 0..3 {
        let dir = base.0.join(format!("clone-{i}"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(format!("own-{i}.txt")), format!("clone {i}")).unwrap();
        let (d, _exits) = daemon(&format!("fs-clone-{i}"), &dir);
        let c = handle
            .clone_vm(CloneOptions {
                id: Some(format!("fs-clone-{i}")),
                fs: vec![share(&d)],
                ..CloneOptions::default()
            })
            .expect("clone");
        clones.push((dir, d, c));
    }
    for (i, (_, _, c)) in clones.iter_mut().enumerate() {
        let own = format!("own-{i}.txt");
        assert_eq!(list(&mut c.agent, "."), std::slice::from_ref(&own));
        assert_eq!(
            read_all(&mut c.agent, &own),
            format!("clone {i}").as_bytes()
        );
        write_file(&mut c.agent, &format!("written-by-{i}"), &[i as u8; 1000]);
    }
    for (i, (dir, _, c)) in clones.iter_mut().enumerate() {
        // Each sees its own two files, none of the others'.
        assert_eq!(
            list(&mut c.agent, "."),
            [format!("own-{i}.txt"), format!("written-by-{i}")]
        );
        assert_eq!(
            std::fs::read(dir.join(format!("written-by-{i}"))).unwrap(),
            [i as u8; 1000]
        );
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), 2);
    }
    drop(clones);
    drop(handle);
    let sha_after = snapshot::sha256_hex(&std::fs::read(&memory).unwrap());
    assert_eq!(sha_before, sha_after, "the template's memory changed");
    let _ = snapshot::template::remove(&template_dir);
    let _ = std::fs::remove_dir_all(&template_dir);
}
