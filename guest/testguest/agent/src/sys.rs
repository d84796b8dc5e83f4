//! System calls to the kernel (see `testguest_abi` for the convention).

use core::sync::atomic::{AtomicU64, Ordering};

use testguest_abi::{BootInfo, Syscall, CONSOLE_WRITE_MAX, FLAG_SUPERVISOR};

/// Supervisor mode only: the kernel's handler to call instead of `int3`.
static DIRECT: AtomicU64 = AtomicU64::new(0);

/// Chooses how to reach the kernel, once, before any other call.
pub fn init(info: &BootInfo) {
    if info.flags & FLAG_SUPERVISOR != 0 {
        DIRECT.store(info.syscall_fn, Ordering::Relaxed);
    }
}

#[cfg(not(test))]
fn call(nr: Syscall, a0: u64, a1: u64, a2: u64) -> u64 {
    let direct = DIRECT.load(Ordering::Relaxed);
    if direct != 0 {
        // SAFETY: the kernel put its handler's address there (see the ABI).
        let f: extern "C" fn(u64, u64, u64, u64) -> u64 = unsafe { core::mem::transmute(direct) };
        return f(a0, a1, a2, nr as u64);
    }
    let ret: u64;
    // SAFETY: the kernel's system call entry (the #BP gate); it clobbers at
    // most what the C ABI lets a callee clobber, which clobber_abi declares.
    unsafe {
        core::arch::asm!(
            "int3",
            inlateout("rax") nr as u64 => ret,
            in("rdi") a0,
            in("rsi") a1,
            in("rdx") a2,
            clobber_abi("C"),
        );
    }
    ret
}

/// Host unit tests have no kernel: console output goes to stderr, the rest
/// does nothing.
#[cfg(test)]
fn call(nr: Syscall, a0: u64, a1: u64, _a2: u64) -> u64 {
    extern crate std;
    match nr {
        Syscall::ConsoleWrite => {
            // SAFETY: as the kernel, trusts the caller's buffer.
            let bytes = unsafe { core::slice::from_raw_parts(a0 as *const u8, a1 as usize) };
            std::eprint!("{}", std::string::String::from_utf8_lossy(bytes));
            a1
        }
        Syscall::OnlineCpus => 1,
        Syscall::Exit => std::process::abort(),
        _ => 0,
    }
}

/// Sleeps until an interrupt has been handled (at once if one is pending).
pub fn wait() {
    call(Syscall::Wait, 0, 0, 0);
}

/// Writes bytes to the console (split in pieces the kernel accepts).
pub fn console_write(bytes: &[u8]) {
    for chunk in bytes.chunks(CONSOLE_WRITE_MAX as usize) {
        call(
            Syscall::ConsoleWrite,
            chunk.as_ptr() as u64,
            chunk.len() as u64,
            0,
        );
    }
}

/// Tells the kernel the agent is ready (it prints the ready line and runs
/// the command line's action, which may never return).
pub fn ready() {
    call(Syscall::Ready, 0, 0, 0);
}

/// Resets the VM after a fatal error.
pub fn exit() -> ! {
    call(Syscall::Exit, 0, 0, 0);
    #[allow(clippy::empty_loop)]
    loop {}
}

/// vCPUs online.
pub fn online_cpus() -> u32 {
    call(Syscall::OnlineCpus, 0, 0, 0) as u32
}
