//! vCPU threads: the run loop that dispatches I/O exits to the buses, the
//! control block through which the VM pauses, resumes and stops them, and the
//! kick (a signal whose handler sets `immediate_exit`) that makes a vCPU leave
//! KVM_RUN promptly.

use std::cell::Cell;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::bus::Bus;

/// KVM_SYSTEM_EVENT types (include/uapi/linux/kvm.h).
const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

/// How a guest ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest asked for a reset (i8042 or a reset system event).
    Reset,
    /// The guest powered off.
    Shutdown,
    /// A triple fault (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// The vCPU that faulted.
        vcpu: u32,
    },
    /// KVM could not run the vCPU; carries the exit data and a register dump.
    Crashed {
        /// The vCPU.
        vcpu: u32,
        /// What happened.
        reason: String,
    },
    /// The host stopped the VM.
    Stopped,
}

impl fmt::Display for GuestExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestExit::Reset => write!(f, "guest reset"),
            GuestExit::Shutdown => write!(f, "guest powered off"),
            GuestExit::TripleFault { vcpu } => write!(f, "triple fault on vCPU {vcpu}"),
            GuestExit::Crashed { vcpu, reason } => write!(f, "vCPU {vcpu} failed: {reason}"),
            GuestExit::Stopped => write!(f, "stopped by the host"),
        }
    }
}

/// What the VM wants its vCPUs to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Run,
    Pause,
    Stop,
}

struct ControlState {
    target: Target,
    /// vCPUs that are parked (paused) or have left their loop.
    parked: usize,
    exit: Option<GuestExit>,
    threads: Vec<libc::pthread_t>,
}

/// Shared between the VM and its vCPU threads.
pub struct VcpuControl {
    state: Mutex<ControlState>,
    changed: Condvar,
    // Grows when vCPUs are hot-added (under the state lock).
    count: std::sync::atomic::AtomicUsize,
}

/// Errors of vCPU control.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// vCPUs did not acknowledge a pause in time.
    #[error("{parked} of {count} vCPUs paused within {timeout:?}")]
    PauseTimeout {
        /// How many did.
        parked: usize,
        /// How many there are.
        count: usize,
        /// The deadline.
        timeout: Duration,
    },
    /// The VM has already ended.
    #[error("the VM has ended: {0}")]
    Ended(GuestExit),
    /// vCPUs can be added only while the VM runs.
    #[error("the VM is paused or stopping")]
    NotRunning,
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let p = run.get();
        if !p.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set by
            // the run loop while its VcpuFd is alive and cleared before it is
            // dropped; a single byte store is async-signal-safe.
            unsafe { std::ptr::write_volatile(&mut (*p).immediate_exit, 1) };
        }
    });
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), handle_kick) {
            tracing::error!("cannot install the vCPU kick signal handler: {e}");
        }
    });
}

impl VcpuControl {
    /// A control block for `count` vCPUs that start running.
    pub fn new(count: usize) -> Arc<Self> {
        install_kick_handler();
        Arc::new(VcpuControl {
            state: Mutex::new(ControlState {
                target: Target::Run,
                parked: 0,
                exit: None,
                threads: Vec::new(),
            }),
            changed: Condvar::new(),
            count: std::sync::atomic::AtomicUsize::new(count),
        })
    }

    fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Count one more vCPU (hot-add), before its thread starts; refused
    /// while the VM is paused or ended, when the new thread could not join
    /// the pause accounting consistently.
    pub fn add_vcpu(&self) -> Result<(), ControlError> {
        let st = self.lock();
        if let Some(exit) = &st.exit {
            return Err(ControlError::Ended(exit.clone()));
        }
        if st.target != Target::Run {
            return Err(ControlError::NotRunning);
        }
        self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kick_all(st: &ControlState) {
        for t in &st.threads {
            // SAFETY: `t` is a joinable thread of ours that is not joined
            // before the control block's threads list is dropped.
            unsafe { libc::pthread_kill(*t, kick_signal()) };
        }
    }

    /// Record how the guest ended (the first report wins) and stop every vCPU.
    pub fn end(&self, exit: GuestExit) {
        let mut st = self.lock();
        if st.exit.is_none() {
            tracing::info!("VM ending: {exit}");
            st.exit = Some(exit);
        }
        st.target = Target::Stop;
        Self::kick_all(&st);
        self.changed.notify_all();
    }

    /// Ask every vCPU to pause and wait until all have, or `timeout` passes.
    pub fn pause(&self, timeout: Duration) -> Result<(), ControlError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        if let Some(e) = &st.exit {
            return Err(ControlError::Ended(e.clone()));
        }
        st.target = Target::Pause;
        Self::kick_all(&st);
        self.changed.notify_all();
        while st.parked < self.count() {
            let now = Instant::now();
            if now >= deadline {
                return Err(ControlError::PauseTimeout {
                    parked: st.parked,
                    count: self.count(),
                    timeout,
                });
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Whether every vCPU is parked by a pause.
    pub fn is_paused(&self) -> bool {
        let st = self.lock();
        st.target == Target::Pause && st.parked == self.count()
    }

    /// Let paused vCPUs run again.
    pub fn resume(&self) -> Result<(), ControlError> {
        let mut st = self.lock();
        if let Some(e) = &st.exit {
            return Err(ControlError::Ended(e.clone()));
        }
        st.target = Target::Run;
        self.changed.notify_all();
        Ok(())
    }

    /// Wait until the guest ends, or `timeout` passes (None: forever).
    pub fn wait_exit(&self, timeout: Option<Duration>) -> Option<GuestExit> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.lock();
        loop {
            if let Some(e) = &st.exit {
                return Some(e.clone());
            }
            st = match deadline {
                None => self.changed.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    self.changed
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// Forget the vCPU threads before they are joined, so no kick can reach a
    /// thread id that is no longer valid.
    pub fn forget_threads(&self) {
        self.lock().threads.clear();
    }

    /// How the guest ended, if it has.
    pub fn exit(&self) -> Option<GuestExit> {
        self.lock().exit.clone()
    }

    /// Block while paused; return false when the vCPU must leave its loop.
    fn wait_runnable(&self) -> bool {
        let mut st = self.lock();
        let mut parked = false;
        loop {
            match st.target {
                Target::Run => {
                    if parked {
                        st.parked -= 1;
                    }
                    return true;
                }
                Target::Stop => {
                    if !parked {
                        st.parked += 1;
                        self.changed.notify_all();
                    }
                    return false;
                }
                Target::Pause => {
                    if !parked {
                        parked = true;
                        st.parked += 1;
                        self.changed.notify_all();
                    }
                    st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }
}

/// A running vCPU thread and its fd (lockable by the VM while it is paused).
pub struct VcpuHandle {
    /// The vCPU fd; the thread holds the lock only while inside KVM_RUN.
    pub fd: Arc<Mutex<VcpuFd>>,
    thread: Option<JoinHandle<()>>,
    /// Disconnected when the thread has ended (its sender is dropped).
    done: std::sync::mpsc::Receiver<()>,
}

/// A thread that did not end within its deadline.
#[derive(Debug, thiserror::Error)]
#[error("thread {name} did not end within {timeout:?}")]
pub struct StuckThread {
    /// The thread's name.
    pub name: String,
    /// The deadline it missed.
    pub timeout: Duration,
}

impl VcpuHandle {
    /// Wait up to `timeout` for the thread to finish (after the control block
    /// said Stop). A thread stuck past the deadline (e.g. in a device call
    /// that never returns) is reported and left behind, never waited on forever.
    pub fn join(&mut self, timeout: Duration) -> Result<(), StuckThread> {
        let Some(t) = self.thread.take() else {
            return Ok(());
        };
        match self.done.recv_timeout(timeout) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(StuckThread {
                name: t.thread().name().unwrap_or("vcpu").to_owned(),
                timeout,
            }),
            _ => {
                let _ = t.join();
                Ok(())
            }
        }
    }
}

/// Everything a vCPU thread needs.
pub struct VcpuContext {
    /// Index of the vCPU.
    pub id: u32,
    /// VM id for logs.
    pub vm_id: Arc<str>,
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Control block.
    pub control: Arc<VcpuControl>,
}

/// Start the thread of a vCPU. With seccomp [enabled](crate::seccomp::enabled)
/// the thread installs its vCPU filter before it first enters the guest.
pub fn spawn(fd: VcpuFd, ctx: VcpuContext) -> std::io::Result<VcpuHandle> {
    let fd = Arc::new(Mutex::new(fd));
    let thread_fd = fd.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let (done_tx, done) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{}", ctx.id))
        .spawn(move || {
            let _done = done_tx;
            if let Err(e) = crate::seccomp::install_if_enabled(crate::seccomp::ThreadKind::Vcpu) {
                let _ = ready_tx.send(Err(e.to_string()));
                return;
            }
            // SAFETY: pthread_self has no preconditions.
            let me = unsafe { libc::pthread_self() };
            ctx.control.lock().threads.push(me);
            let _ = ready_tx.send(Ok(()));
            run_loop(&thread_fd, &ctx);
        })?;
    // The thread must be kickable before anyone may pause or stop the VM.
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = thread.join();
            return Err(std::io::Error::other(e));
        }
        Err(_) => {
            let _ = thread.join();
            return Err(std::io::Error::other(
                "the vCPU thread ended before it started",
            ));
        }
    }
    Ok(VcpuHandle {
        fd,
        thread: Some(thread),
        done,
    })
}

fn run_loop(fd: &Mutex<VcpuFd>, ctx: &VcpuContext) {
    let run_ptr: *mut kvm_run = fd.lock().unwrap_or_else(|p| p.into_inner()).get_kvm_run();
    KVM_RUN.with(|r| r.set(run_ptr));
    while ctx.control.wait_runnable() {
        let mut vcpu = fd.lock().unwrap_or_else(|p| p.into_inner());
        let outcome = match vcpu.run() {
            Ok(exit) => handle_exit(exit, ctx),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(GuestExit::Crashed {
                vcpu: ctx.id,
                reason: format!("KVM_RUN failed: {e}"),
            }),
        };
        let outcome = match outcome {
            Some(GuestExit::Crashed { vcpu: id, reason }) => Some(GuestExit::Crashed {
                vcpu: id,
                reason: format!("{reason}; {}", register_dump(&mut vcpu)),
            }),
            o => o,
        };
        drop(vcpu);
        if let Some(exit) = outcome {
            ctx.control.end(exit);
        }
    }
    KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
}

fn handle_exit(exit: VcpuExit<'_>, ctx: &VcpuContext) -> Option<GuestExit> {
    match exit {
        VcpuExit::IoOut(port, data) => {
            if !ctx.pio.write(port.into(), data) {
                tracing::trace!(vm = %ctx.vm_id, "unhandled OUT {port:#x}");
            }
            None
        }
        VcpuExit::IoIn(port, data) => {
            if !ctx.pio.read(port.into(), data) {
                data.fill(0xff);
            }
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !ctx.mmio.write(addr, data) {
                tracing::debug!(vm = %ctx.vm_id, "unhandled MMIO write at {addr:#x}");
            }
            None
        }
        VcpuExit::MmioRead(addr, data) => {
            if !ctx.mmio.read(addr, data) {
                tracing::debug!(vm = %ctx.vm_id, "unhandled MMIO read at {addr:#x}");
            }
            None
        }
        // With an in-kernel LAPIC KVM handles HLT itself; an exit here means
        // the guest halted with nothing that could wake it.
        VcpuExit::Hlt => Some(GuestExit::Crashed {
            vcpu: ctx.id,
            reason: "halted with no way to wake up (KVM_EXIT_HLT)".into(),
        }),
        VcpuExit::Shutdown => Some(GuestExit::TripleFault { vcpu: ctx.id }),
        VcpuExit::SystemEvent(kind, data) => match kind {
            KVM_SYSTEM_EVENT_RESET => Some(GuestExit::Reset),
            KVM_SYSTEM_EVENT_SHUTDOWN => Some(GuestExit::Shutdown),
            KVM_SYSTEM_EVENT_CRASH => Some(GuestExit::Crashed {
                vcpu: ctx.id,
                reason: format!("guest reported a crash (system event data {data:x?})"),
            }),
            other => Some(GuestExit::Crashed {
                vcpu: ctx.id,
                reason: format!("unknown system event {other} (data {data:x?})"),
            }),
        },
        VcpuExit::FailEntry(reason, cpu) => Some(GuestExit::Crashed {
            vcpu: ctx.id,
            reason: format!("KVM_EXIT_FAIL_ENTRY: hardware reason {reason:#x} on host CPU {cpu}"),
        }),
        VcpuExit::InternalError => Some(GuestExit::Crashed {
            vcpu: ctx.id,
            reason: "KVM_EXIT_INTERNAL_ERROR".into(),
        }),
        other => Some(GuestExit::Crashed {
            vcpu: ctx.id,
            reason: format!("unexpected exit {other:?}"),
        }),
    }
}

/// The internal-error data of the last exit (if any) and the main registers.
fn register_dump(vcpu: &mut VcpuFd) -> String {
    let run = vcpu.get_kvm_run();
    let mut out = String::new();
    if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
        // SAFETY: exit_reason says the `internal` member of the union is valid.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        out.push_str(&format!(
            "suberror {} data {:x?}; ",
            internal.suberror,
            &internal.data[..n]
        ));
    }
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => out.push_str(&format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector
        )),
        (Err(e), _) | (_, Err(e)) => out.push_str(&format!("registers unavailable: {e}")),
    }
    out
}
