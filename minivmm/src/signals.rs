//! SIGINT / SIGTERM as events: blocked before any VM thread exists (so no
//! thread is killed by them with sockets left behind) and waited for by the
//! main thread, which then stops its VMs and cleans up.

/// Block SIGINT and SIGTERM in this thread (and so in every thread it starts
/// from now on), so that they wait for `wait_for_signal` instead of killing
/// the process with its sockets left behind.
pub fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    set
}

/// Wait up to `timeout` for one of the blocked signals in `set`.
pub fn wait_for_signal(set: &libc::sigset_t, timeout: std::time::Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `set` and `ts` are valid; a null siginfo pointer is allowed.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

/// Wait until the guest of `vm` ends or a stop signal in `set` arrives;
/// a signal stops the VM as [`GuestExit::Stopped`](vmm::GuestExit::Stopped).
pub fn wait_exit_or_signal(vm: &vmm::Vm, set: &libc::sigset_t) -> vmm::GuestExit {
    loop {
        if let Some(exit) = vm.wait_exit(Some(CHECK_PERIOD)) {
            return exit;
        }
        if let Some(sig) = wait_for_signal(set, std::time::Duration::ZERO) {
            eprintln!("minivmm: signal {sig}: stopping the VM");
            return vmm::GuestExit::Stopped;
        }
    }
}

/// How long one wait for the guest lasts before pending signals are looked at.
const CHECK_PERIOD: std::time::Duration = std::time::Duration::from_millis(200);
