//! The lifecycle of one virtiofsd (the real one, `cargo install virtiofsd`,
//! 1.14): started on a unix socket path with the share's options, ready when
//! its socket appears (an inotify event on the socket's directory, raced
//! against the daemon's own exit through a pidfd, with a deadline), its
//! stderr forwarded to `tracing` with the VM id, an unexpected exit reported
//! once to the owner, and stopped with SIGTERM, then SIGKILL after a
//! deadline. Nothing is left behind: the child is reaped, its socket and
//! pid file removed.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest unix socket path (`sizeof(sockaddr_un.sun_path)` minus the NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// Environment variable naming the virtiofsd binary to use.
pub const VIRTIOFSD_ENV: &str = "MINIVMM_VIRTIOFSD";
/// How the project installs virtiofsd (for error messages).
pub const INSTALL_HINT: &str =
    "apt-get install -y libseccomp-dev libcap-ng-dev && cargo install --locked virtiofsd";
/// What virtiofsd logs once it listens on its socket: a connect before it
/// would be refused (the socket file exists from bind(), before listen()),
/// and virtiofsd serves exactly one connection, so it cannot be probed.
pub const LISTENING_LINE: &str = "Waiting for vhost-user socket connection";
/// Default time a daemon gets to create its socket.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time between SIGTERM and SIGKILL.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// How one virtiofsd is started.
#[derive(Clone, Debug)]
pub struct VirtiofsdConfig {
    /// The binary; `None`: `$MINIVMM_VIRTIOFSD`, then `virtiofsd` on PATH,
    /// then `~/.cargo/bin/virtiofsd`.
    pub binary: Option<PathBuf>,
    /// The directory shared with the guest.
    pub shared_dir: PathBuf,
    /// The vhost-user socket virtiofsd listens on (must not exist yet).
    pub socket_path: PathBuf,
    /// `--cache` (never, metadata, auto, always).
    pub cache: String,
    /// `--sandbox` (namespace, chroot, none).
    pub sandbox: String,
    /// `--seccomp` (none, log, trap, kill).
    pub seccomp: String,
    /// `--announce-submounts`.
    pub announce_submounts: bool,
    /// `--thread-pool-size` (`None`: virtiofsd's default).
    pub thread_pool_size: Option<u32>,
    /// Further arguments, passed as they are.
    pub extra_args: Vec<OsString>,
    /// Deadline for the socket to appear.
    pub ready_timeout: Duration,
}

impl VirtiofsdConfig {
    /// virtiofsd's own defaults for `shared_dir` on `socket_path`.
    pub fn new(shared_dir: impl Into<PathBuf>, socket_path: impl Into<PathBuf>) -> Self {
        VirtiofsdConfig {
            binary: None,
            shared_dir: shared_dir.into(),
            socket_path: socket_path.into(),
            cache: "auto".into(),
            sandbox: "namespace".into(),
            seccomp: "kill".into(),
            announce_submounts: false,
            thread_pool_size: None,
            extra_args: Vec::new(),
            ready_timeout: DEFAULT_READY_TIMEOUT,
        }
    }
}

/// Errors starting or stopping virtiofsd. Each names the path or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The shared directory does not exist or is no directory.
    #[error("shared directory {path}: not an existing directory")]
    ShareDir {
        /// The directory.
        path: PathBuf,
    },
    /// No virtiofsd binary.
    #[error("virtiofsd not found ({tried}); install it: {INSTALL_HINT}")]
    BinaryNotFound {
        /// Where it was looked for.
        tried: String,
    },
    /// The socket path does not fit a `sockaddr_un`.
    #[error("virtiofsd socket path {path} is {len} bytes, at most {MAX_SOCKET_PATH} fit a unix socket address")]
    SocketPathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// Something already exists at the socket path.
    #[error("virtiofsd socket path {path} already exists")]
    SocketExists {
        /// The path.
        path: PathBuf,
    },
    /// The socket's directory does not exist.
    #[error("directory of the virtiofsd socket {path} does not exist")]
    SocketDir {
        /// The socket path.
        path: PathBuf,
    },
    /// A system call failed.
    #[error("virtiofsd {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// errno.
        source: std::io::Error,
    },
    /// virtiofsd exited before it was ready.
    #[error("virtiofsd {binary} exited before creating {socket} ({status})")]
    ExitedEarly {
        /// The binary.
        binary: PathBuf,
        /// The socket it should have created.
        socket: PathBuf,
        /// How it ended.
        status: ExitStatus,
    },
    /// The shared directory could not be prepared for extra directories.
    #[error(transparent)]
    SharedDir(#[from] super::subshare::SubShareError),
    /// virtiofsd did not create its socket in time.
    #[error("virtiofsd did not create {socket} within {timeout:?}")]
    NotReady {
        /// The socket path.
        socket: PathBuf,
        /// The deadline.
        timeout: Duration,
    },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> DaemonError {
    move |source| DaemonError::Io { what, source }
}

/// Lifecycle of a daemon, shared with its wait thread: only an exit in
/// `RUNNING` is reported to the owner, and exactly once.
const STARTING: u8 = 0;
const RUNNING: u8 = 1;
const STOPPING: u8 = 2;
const EXITED: u8 = 3;

/// Who is told when a daemon exits without being asked to.
pub type ExitCallback = Box<dyn FnOnce(ExitStatus) + Send>;

/// A running virtiofsd. Dropping it stops it (SIGTERM, then SIGKILL).
pub struct Virtiofsd {
    vm_id: String,
    binary: PathBuf,
    socket_path: PathBuf,
    pid: u32,
    pidfd: OwnedFd,
    state: Arc<AtomicU8>,
    exited: Receiver<ExitStatus>,
    status: Option<ExitStatus>,
    threads: Vec<JoinHandle<()>>,
}

/// The binary to run: explicit, `$MINIVMM_VIRTIOFSD`, PATH, `~/.cargo/bin`.
pub fn find_virtiofsd(explicit: Option<&Path>) -> Result<PathBuf, DaemonError> {
    let is_file = |p: &Path| p.is_file();
    if let Some(p) = explicit {
        return if is_file(p) {
            Ok(p.to_path_buf())
        } else {
            Err(DaemonError::BinaryNotFound {
                tried: p.display().to_string(),
            })
        };
    }
    if let Some(p) = std::env::var_os(VIRTIOFSD_ENV) {
        let p = PathBuf::from(p);
        return if is_file(&p) {
            Ok(p)
        } else {
            Err(DaemonError::BinaryNotFound {
                tried: format!("{VIRTIOFSD_ENV}={}", p.display()),
            })
        };
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("virtiofsd"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cargo/bin/virtiofsd"));
    }
    candidates
        .into_iter()
        .find(|p| is_file(p))
        .ok_or(DaemonError::BinaryNotFound {
            tried: "$PATH and ~/.cargo/bin".into(),
        })
}

/// The pid file virtiofsd writes next to its socket.
fn pid_file(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".pid");
    PathBuf::from(s)
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// An inotify watch on a directory for created entries.
struct DirWatch(OwnedFd);

impl DirWatch {
    fn new(dir: &Path) -> std::io::Result<DirWatch> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        // SAFETY: a valid inotify fd and a NUL-terminated path.
        let wd = unsafe {
            libc::inotify_add_watch(
                fd.as_raw_fd(),
                c.as_ptr(),
                libc::IN_CREATE | libc::IN_MOVED_TO,
            )
        };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(DirWatch(fd))
    }

    fn drain(&self) {
        let mut buf = [0u8; 4096];
        // SAFETY: reads into a local buffer of the given size.
        while unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }
}

/// Waits until one of `fds` is readable or `timeout` passes; returns which are.
fn poll_readable(fds: &[i32], timeout: Duration) -> std::io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: pfds is a live array of pollfd of the given length.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(pfds.iter().map(|p| p.revents != 0).collect())
}

impl Virtiofsd {
    /// Start virtiofsd for `config` and wait until its socket exists.
    /// `on_exit` is called once, from another thread, if it exits without
    /// [`stop`](Self::stop) having been called. On error nothing is left
    /// running or on disk.
    pub fn start(
        vm_id: &str,
        config: &VirtiofsdConfig,
        on_exit: ExitCallback,
    ) -> Result<Virtiofsd, DaemonError> {
        let socket = &config.socket_path;
        let len = socket.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(DaemonError::SocketPathTooLong {
                path: socket.clone(),
                len,
            });
        }
        if !config.shared_dir.is_dir() {
            return Err(DaemonError::ShareDir {
                path: config.shared_dir.clone(),
            });
        }
        if std::fs::symlink_metadata(socket).is_ok() {
            return Err(DaemonError::SocketExists {
                path: socket.clone(),
            });
        }
        let binary = find_virtiofsd(config.binary.as_deref())?;
        let dir = match socket.parent() {
            Some(d) if d.as_os_str().is_empty() => Path::new("."),
            Some(d) => d,
            None => Path::new("/"),
        };
        if !dir.is_dir() {
            return Err(DaemonError::SocketDir {
                path: socket.clone(),
            });
        }
        // Watch before the daemon starts, so the socket's creation cannot be missed.
        let watch = DirWatch::new(dir).map_err(io("watching the socket directory"))?;

        let mut cmd = Command::new(&binary);
        cmd.arg("--socket-path")
            .arg(socket)
            .arg("--shared-dir")
            .arg(&config.shared_dir)
            .arg("--cache")
            .arg(&config.cache)
            .arg("--sandbox")
            .arg(&config.sandbox)
            .arg("--seccomp")
            .arg(&config.seccomp);
        if config.announce_submounts {
            cmd.arg("--announce-submounts");
        }
        if let Some(n) = config.thread_pool_size {
            cmd.arg("--thread-pool-size").arg(n.to_string());
        }
        cmd.args(&config.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(io("spawn"))?;
        let pid = child.id();
        let pidfd = match pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io("pidfd_open")(e));
            }
        };
        tracing::info!(vm = %vm_id, pid, socket = %socket.display(), shared_dir = %config.shared_dir.display(), "virtiofsd started");

        let listening = Arc::new(AtomicBool::new(false));
        let listening_evt = match vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
            .and_then(|e| Ok((e.try_clone()?, e)))
        {
            Ok(e) => e,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io("eventfd")(e));
            }
        };
        let mut threads = Vec::new();
        if let Some(stderr) = child.stderr.take() {
            let vm = vm_id.to_owned();
            let seen = listening.clone();
            let wake = listening_evt.0;
            let t = std::thread::Builder::new()
                .name(format!("virtiofsd-log-{pid}"))
                .spawn(move || {
                    for line in BufReader::new(stderr).lines() {
                        match line {
                            Ok(l) => {
                                tracing::info!(vm = %vm, pid, "virtiofsd: {l}");
                                if l.contains(LISTENING_LINE) && !seen.swap(true, Ordering::SeqCst)
                                {
                                    let _ = wake.write(1);
                                }
                            }
                            Err(_) => break,
                        }
                    }
                })
                .map_err(io("spawning the log thread"));
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e);
                }
            }
        }
        let state = Arc::new(AtomicU8::new(STARTING));
        let (tx, exited) = mpsc::channel();
        let waiter = {
            let state = state.clone();
            let vm = vm_id.to_owned();
            std::thread::Builder::new()
                .name(format!("virtiofsd-wait-{pid}"))
                .spawn(move || wait_child(child, &vm, state, tx, on_exit))
                .map_err(io("spawning the wait thread"))
        };
        let mut daemon = Virtiofsd {
            vm_id: vm_id.to_owned(),
            binary: binary.clone(),
            socket_path: socket.clone(),
            pid,
            pidfd,
            state,
            exited,
            status: None,
            threads,
        };
        match waiter {
            Ok(t) => daemon.threads.push(t),
            Err(e) => {
                // The child was moved into the failed closure and dropped
                // unreaped: kill it through the pidfd and reap it by pid.
                daemon.signal(libc::SIGKILL);
                // SAFETY: waits for our own child by pid.
                unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), 0) };
                daemon.state.store(EXITED, Ordering::SeqCst);
                daemon.status = Some(ExitStatus::default());
                return Err(e);
            }
        }
        daemon.wait_ready(&watch, &listening, &listening_evt.1, config.ready_timeout)?;
        if daemon
            .state
            .compare_exchange(STARTING, RUNNING, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            // It exited right after creating its socket.
            return Err(daemon.exited_early());
        }
        Ok(daemon)
    }

    /// Ready: the socket exists and virtiofsd said it listens. Woken by the
    /// socket's creation (inotify), the log line (eventfd) or its exit (pidfd).
    fn wait_ready(
        &mut self,
        watch: &DirWatch,
        listening: &AtomicBool,
        listening_evt: &vmm_sys_util::eventfd::EventFd,
        timeout: Duration,
    ) -> Result<(), DaemonError> {
        let deadline = Instant::now() + timeout;
        loop {
            if is_socket(&self.socket_path) && listening.load(Ordering::SeqCst) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.stop_now();
                return Err(DaemonError::NotReady {
                    socket: self.socket_path.clone(),
                    timeout,
                });
            }
            let fds = [
                watch.0.as_raw_fd(),
                self.pidfd.as_raw_fd(),
                listening_evt.as_raw_fd(),
            ];
            let ready = poll_readable(&fds, left).map_err(io("waiting for the socket"));
            let ready = match ready {
                Ok(r) => r,
                Err(e) => {
                    self.stop_now();
                    return Err(e);
                }
            };
            if ready[1] {
                return Err(self.exited_early());
            }
            if ready[0] {
                watch.drain();
            }
            if ready[2] {
                let _ = listening_evt.read();
            }
        }
    }

    /// The daemon died while starting: reap it (the wait thread does) and
    /// clean up.
    fn exited_early(&mut self) -> DaemonError {
        let status = self.exited.recv().unwrap_or_default();
        self.status = Some(status);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.cleanup_files();
        DaemonError::ExitedEarly {
            binary: self.binary.clone(),
            socket: self.socket_path.clone(),
            status,
        }
    }

    /// From now on an exit is expected and not reported to the owner: call
    /// it before disconnecting the VM, since virtiofsd ends by itself (status
    /// 0) when its one vhost-user connection closes.
    pub fn expect_exit(&self) {
        let _ = self
            .state
            .compare_exchange(RUNNING, STOPPING, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The vhost-user socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn signal(&self, sig: i32) {
        // SAFETY: sends a signal through our own pidfd; a reaped process
        // gives ESRCH, never another process.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                tracing::warn!(vm = %self.vm_id, pid = self.pid, "signalling virtiofsd: {e}");
            }
        }
    }

    /// Stop the daemon: SIGTERM, SIGKILL if it is still there after
    /// `timeout`; then reap it and remove its socket and pid file. Returns
    /// how it ended.
    pub fn stop(mut self, timeout: Duration) -> ExitStatus {
        self.stop_with(timeout)
    }

    fn stop_now(&mut self) {
        self.stop_with(Duration::ZERO);
    }

    fn stop_with(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        self.state.store(STOPPING, Ordering::SeqCst);
        let status = match self.exited.try_recv() {
            Ok(s) => s,
            Err(_) => {
                self.signal(libc::SIGTERM);
                match self.exited.recv_timeout(timeout) {
                    Ok(s) => s,
                    Err(RecvTimeoutError::Timeout) => {
                        tracing::warn!(vm = %self.vm_id, pid = self.pid, "virtiofsd ignored SIGTERM for {timeout:?}: SIGKILL");
                        self.signal(libc::SIGKILL);
                        self.exited.recv().unwrap_or_default()
                    }
                    Err(RecvTimeoutError::Disconnected) => ExitStatus::default(),
                }
            }
        };
        self.status = Some(status);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.cleanup_files();
        tracing::info!(vm = %self.vm_id, pid = self.pid, "virtiofsd stopped ({status})");
        status
    }

    fn cleanup_files(&self) {
        for p in [self.socket_path.clone(), pid_file(&self.socket_path)] {
            if let Err(e) = std::fs::remove_file(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(vm = %self.vm_id, "removing {}: {e}", p.display());
                }
            }
        }
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.stop_with(DEFAULT_STOP_TIMEOUT);
    }
}

/// The wait thread: reaps the child, hands its status to `stop`, and tells
/// the owner if nobody asked it to end.
fn wait_child(
    mut child: Child,
    vm_id: &str,
    state: Arc<AtomicU8>,
    tx: mpsc::Sender<ExitStatus>,
    on_exit: ExitCallback,
) {
    let status = match child.wait() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(vm = %vm_id, "waiting for virtiofsd: {e}");
            ExitStatus::default()
        }
    };
    if state.swap(EXITED, Ordering::SeqCst) == RUNNING {
        tracing::error!(vm = %vm_id, pid = child.id(), "virtiofsd exited unexpectedly ({status})");
        on_exit(status);
    }
    let _ = tx.send(status);
}
