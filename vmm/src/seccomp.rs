//! seccomp-bpf filters, one per kind of thread, built with `seccompiler`.
//!
//! The process's main thread installs the [`ThreadKind::Main`] filter before
//! it starts any other thread, so every thread inherits it (the union of what
//! minivmm does at all); each vCPU and device thread then stacks its own,
//! narrower filter before it runs guest work (the kernel applies every
//! filter of a thread, so the narrowest decides). `PR_SET_NO_NEW_PRIVS` is set
//! with the first filter.
//!
//! A forbidden syscall raises SIGSYS (`SeccompAction::Trap`); the handler
//! writes one line naming the thread kind and the syscall number to stderr
//! with write(2) and ends the process with status [`SECCOMP_EXIT_STATUS`].
//!
//! The lists come from what the threads really call (`strace -f` of `run`,
//! `clone --keep`, `template create` and `bench clone`).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

/// Exit status of a process killed for a forbidden syscall (128 + SIGSYS).
pub const SECCOMP_EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// The kinds of threads minivmm runs, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The process's main thread (and, by inheritance, every other thread):
    /// VM setup, templates, clones, the CLI.
    Main,
    /// A control / API thread: sockets and files, no KVM.
    Api,
    /// A vCPU thread: KVM_RUN and the device registers it dispatches to.
    Vcpu,
    /// A device thread: the virtio event loop and console output.
    DeviceLoop,
}

impl ThreadKind {
    fn name(self) -> &'static [u8] {
        match self {
            ThreadKind::Main => b"main",
            ThreadKind::Api => b"api",
            ThreadKind::Vcpu => b"vcpu",
            ThreadKind::DeviceLoop => b"device",
        }
    }

    fn code(self) -> u8 {
        match self {
            ThreadKind::Main => 1,
            ThreadKind::Api => 2,
            ThreadKind::Vcpu => 3,
            ThreadKind::DeviceLoop => 4,
        }
    }

    fn from_code(code: u8) -> Option<ThreadKind> {
        [
            ThreadKind::Main,
            ThreadKind::Api,
            ThreadKind::Vcpu,
            ThreadKind::DeviceLoop,
        ]
        .into_iter()
        .find(|k| k.code() == code)
    }
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter could not be compiled.
    #[error("building the {kind:?} seccomp filter: {reason}")]
    Build {
        /// Which filter.
        kind: ThreadKind,
        /// Why.
        reason: String,
    },
    /// The kernel refused the filter.
    #[error("installing the {kind:?} seccomp filter: {reason}")]
    Install {
        /// Which filter.
        kind: ThreadKind,
        /// Why.
        reason: String,
    },
    /// The SIGSYS handler could not be installed.
    #[error("installing the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
}

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turn per-thread filters on for the threads this library starts (vCPUs,
/// device loops). Off by default: a program that links minivmm opts in,
/// normally right after installing [`ThreadKind::Main`] on its main thread.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Release);
}

/// Whether threads started from now on install their filters.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// Install the filter of `kind` on the calling thread if filters are
/// [`enabled`]; a no-op otherwise.
pub fn install_if_enabled(kind: ThreadKind) -> Result<(), SeccompError> {
    if enabled() {
        install(kind)
    } else {
        Ok(())
    }
}

thread_local! {
    /// The kind of the last filter this thread installed (0: none), for the SIGSYS report.
    static KIND: Cell<u8> = const { Cell::new(0) };
}

/// Install the filter of `kind` on the calling thread (and the SIGSYS
/// reporter, once per process). Threads created afterwards inherit it.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    install_with(kind, seccompiler::apply_filter)
}

/// Install the filter of `kind` on every thread of the process at once
/// (SECCOMP_FILTER_FLAG_TSYNC), for a process that had to start helper
/// threads before it could confine itself (e.g. the watchers of a spawned
/// virtiofsd: a filter installed before spawning would be inherited by the
/// daemon itself).
pub fn install_all_threads(kind: ThreadKind) -> Result<(), SeccompError> {
    install_with(kind, seccompiler::apply_filter_all_threads)
}

/// Install the filter of `kind` through `apply` (this thread or all of
/// them), after the SIGSYS reporter, and remember `kind` for its reports.
fn install_with(
    kind: ThreadKind,
    apply: impl FnOnce(&[seccompiler::sock_filter]) -> Result<(), seccompiler::Error>,
) -> Result<(), SeccompError> {
    install_sigsys_handler()?;
    let program = filter(kind)?;
    apply(&program).map_err(|e| SeccompError::Install {
        kind,
        reason: e.to_string(),
    })?;
    KIND.with(|k| k.set(kind.code()));
    Ok(())
}

/// The compiled filter of `kind`.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> =
        allowed(kind).iter().map(|&nr| (nr, Vec::new())).collect();
    let build = |reason: String| SeccompError::Build { kind, reason };
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| build(e.to_string()))?;
    f.try_into()
        .map_err(|e: seccompiler::BackendError| build(e.to_string()))
}

/// What every thread needs: memory, locks, signals, time, its own exit,
/// reads and writes on fds it already has, and logging.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_getrandom,
    libc::SYS_rseq,
];

/// A vCPU: KVM ioctls; device register writes that activate or reset a
/// device (epoll and timer updates, closing its connections); kicks.
const VCPU: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_epoll_ctl,
    libc::SYS_timerfd_settime,
    libc::SYS_shutdown,
];

/// The device loop: epoll, the vsock listener and guest-initiated
/// connections, timers, entropy; console output.
const DEVICE_LOOP: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_accept4,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_fcntl,
    libc::SYS_ioctl,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_fsync,
];

/// A control / API thread: sockets and files, no KVM, no new processes.
const API: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_socket,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockname,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_fcntl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_kill,
];

/// The main thread: everything above plus VM and thread creation, files,
/// mounts, limits and installing the other threads' filters. Not allowed
/// anywhere: execve, fork, ptrace, module loading, raw I/O ports and the like.
const MAIN: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_set_tid_address,
    libc::SYS_prctl,
    libc::SYS_seccomp,
    libc::SYS_prlimit64,
    libc::SYS_getrlimit,
    libc::SYS_setrlimit,
    libc::SYS_open,
    libc::SYS_creat,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fdatasync,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_getdents64,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rmdir,
    libc::SYS_link,
    libc::SYS_linkat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_chmod,
    libc::SYS_utimensat,
    libc::SYS_flock,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_socketpair,
    libc::SYS_memfd_create,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_getcwd,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getppid,
    libc::SYS_mincore,
    libc::SYS_mlock,
    libc::SYS_munlock,
    libc::SYS_membarrier,
    libc::SYS_sched_setaffinity,
    libc::SYS_getrusage,
    libc::SYS_times,
    // Watching and stopping an external daemon (virtiofsd) started before
    // the filter: its pidfd, exit status, signals and socket appearance.
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_waitid,
    libc::SYS_wait4,
    libc::SYS_kill,
    libc::SYS_inotify_init1,
    libc::SYS_inotify_add_watch,
    libc::SYS_inotify_rm_watch,
];

fn allowed(kind: ThreadKind) -> Vec<i64> {
    let mut v: Vec<i64> = COMMON.to_vec();
    match kind {
        ThreadKind::Vcpu => v.extend_from_slice(VCPU),
        ThreadKind::DeviceLoop => v.extend_from_slice(DEVICE_LOOP),
        ThreadKind::Api => v.extend_from_slice(API),
        ThreadKind::Main => {
            v.extend_from_slice(VCPU);
            v.extend_from_slice(DEVICE_LOOP);
            v.extend_from_slice(API);
            v.extend_from_slice(MAIN);
        }
    }
    v.sort_unstable();
    v.dedup();
    v
}

/// Offset of `si_syscall` in a SIGSYS siginfo_t on x86_64: three ints
/// (signo, errno, code), 4 bytes of padding, then `_sigsys { void
/// *_call_addr; int _syscall; unsigned _arch; }` (include/uapi/asm-generic/siginfo.h).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn report_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS (SA_SIGINFO), and
    // `si_syscall` is an int at SI_SYSCALL_OFFSET of it.
    let nr =
        unsafe { std::ptr::read_unaligned(info.cast::<u8>().add(SI_SYSCALL_OFFSET).cast::<i32>()) };
    let kind = KIND
        .try_with(|k| ThreadKind::from_code(k.get()))
        .ok()
        .flatten();
    // Only async-signal-safe work from here on: a stack buffer and write(2).
    let mut buf = [0u8; 128];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        for &b in bytes {
            if len < buf.len() {
                buf[len] = b;
                len += 1;
            }
        }
    };
    put(b"minivmm: seccomp: forbidden syscall ");
    let mut digits = [0u8; 12];
    let mut n = i64::from(nr).unsigned_abs();
    let mut d = digits.len();
    loop {
        d -= 1;
        digits[d] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if nr < 0 {
        put(b"-");
    }
    put(&digits[d..]);
    put(b" on a ");
    // A thread without a filter of its own runs under the one it inherited.
    put(kind.map_or(b"main (inherited)".as_slice(), ThreadKind::name));
    put(b" thread; exiting\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `buf[..len]` is valid.
    unsafe {
        libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len);
        libc::_exit(SECCOMP_EXIT_STATUS);
    }
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: sigaction is plain data; all zeroes is a valid starting value.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = report_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        // SAFETY: installs a handler that only does async-signal-safe work;
        // the pointers are valid for the call.
        let r = unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) };
        if r != 0 {
            result = Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    });
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_and_none_allows_exec() {
        for kind in [
            ThreadKind::Main,
            ThreadKind::Api,
            ThreadKind::Vcpu,
            ThreadKind::DeviceLoop,
        ] {
            assert!(!filter(kind).unwrap().is_empty());
            let list = allowed(kind);
            for nr in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_fork,
                libc::SYS_ptrace,
            ] {
                assert!(!list.contains(&nr), "{kind:?} allows syscall {nr}");
            }
        }
        // The narrower kinds are narrower.
        assert!(!allowed(ThreadKind::Vcpu).contains(&libc::SYS_socket));
        assert!(!allowed(ThreadKind::DeviceLoop).contains(&libc::SYS_openat));
    }

    /// Set in the child process of `a_vcpu_thread_cannot_exec`.
    const CHILD_ENV: &str = "MINIVMM_SECCOMP_TEST_CHILD";

    #[test]
    fn a_vcpu_thread_cannot_exec() {
        if std::env::var_os(CHILD_ENV).is_some() {
            // In the child: a thread with the vCPU filter tries to run a program.
            let t = std::thread::spawn(|| {
                install(ThreadKind::Vcpu).expect("install the vCPU filter");
                let path = c"/bin/true";
                let argv = [path.as_ptr(), std::ptr::null()];
                let envp = [std::ptr::null::<libc::c_char>()];
                // SAFETY: valid NUL-terminated path and NULL-terminated arrays.
                let r = unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
                // Not reached: the filter ends the process first.
                println!("exec returned {r}");
            });
            let _ = t.join();
            std::process::exit(0);
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "seccomp::tests::a_vcpu_thread_cannot_exec",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(SECCOMP_EXIT_STATUS),
            "stderr: {stderr}"
        );
        assert!(
            stderr.contains(&format!(
                "minivmm: seccomp: forbidden syscall {} on a vcpu thread",
                libc::SYS_execve
            )),
            "stderr: {stderr}"
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains("exec returned"));
    }
}
