//! PID 1: mount the kernel file systems, load the image's modules, serve the
//! agent on vsock, reap children, and never exit (the kernel panics when
//! init exits; on a fatal error the agent logs and powers the VM off).

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use agent_protocol::AGENT_VSOCK_PORT;

use crate::server::Server;
use crate::service::{Agent, AgentConfig};
use crate::system;
use crate::vsock::VsockListener;
use crate::{MODULE_LIST_PATH, READY_LINE};

/// `MODULE_INIT_COMPRESSED_FILE` (include/uapi/linux/module.h): the kernel
/// decompresses the module itself (if built with module decompression).
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

/// Writes one line to the console (best effort: there is nowhere else).
pub fn log(line: &str) {
    if let Ok(mut console) = OpenOptions::new().write(true).open("/dev/console") {
        let _ = writeln!(console, "minivmm-linux-agent: {line}");
    }
}

fn mount(source: &str, target: &str, fstype: &str) -> io::Result<()> {
    let _ = std::fs::create_dir_all(target);
    let c = |s: &str| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (source, target_c, fstype) = (c(source)?, c(target)?, c(fstype)?);
    // SAFETY: NUL-terminated strings alive for the call, no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        // Already mounted (e.g. devtmpfs by CONFIG_DEVTMPFS_MOUNT) is fine.
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(e);
        }
    }
    Ok(())
}

/// Loads one module file with finit_module(2). Already loaded (or built
/// in) counts as loaded.
pub fn load_module(path: &Path) -> io::Result<()> {
    let file = std::fs::File::open(path)?;
    let name = path.to_string_lossy();
    let flags = if name.ends_with(".ko") {
        0
    } else {
        MODULE_INIT_COMPRESSED_FILE
    };
    // SAFETY: finit_module on an open fd with an empty parameter string.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            c"".as_ptr(),
            flags,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    Ok(())
}

/// Loads the modules listed in [`MODULE_LIST_PATH`] in order; a module that
/// fails is logged and skipped (a device that is absent must not stop the
/// agent). Returns how many loaded.
fn load_listed_modules() -> usize {
    let list = match std::fs::read_to_string(MODULE_LIST_PATH) {
        Ok(l) => l,
        Err(e) => {
            log(&format!("{MODULE_LIST_PATH}: {e}; loading no modules"));
            return 0;
        }
    };
    let mut loaded = 0;
    for path in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match load_module(Path::new(path)) {
            Ok(()) => loaded += 1,
            Err(e) => log(&format!("module {path}: {e}")),
        }
    }
    loaded
}

/// Ends the VM: sync and power off; if even that fails, sleep forever
/// (exiting would panic the kernel with less to read).
pub fn power_off(reason: &str) -> ! {
    log(&format!("fatal: {reason}; powering off"));
    // SAFETY: sync and reboot have no memory effects on this process.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        // SAFETY: pause just waits for a signal.
        unsafe { libc::pause() };
    }
}

/// Blocks SIGCHLD in this thread (and the threads it starts) so the main
/// loop can wait for it with sigwaitinfo.
fn block_sigchld() -> libc::sigset_t {
    // SAFETY: sigset operations on a local set; pthread_sigmask on this
    // thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Reaps every exited child, forever.
fn reap_forever(set: &libc::sigset_t) -> ! {
    loop {
        // SAFETY: a null siginfo is allowed; set holds SIGCHLD, blocked.
        unsafe { libc::sigwaitinfo(set, std::ptr::null_mut()) };
        loop {
            let mut status = 0;
            // SAFETY: waitpid with WNOHANG on any child.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
        }
    }
}

/// Runs as the guest's `/init`.
pub fn run() -> ! {
    let sigchld = block_sigchld();
    for (source, target, fstype) in [
        ("devtmpfs", "/dev", "devtmpfs"),
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
    ] {
        if let Err(e) = mount(source, target, fstype) {
            log(&format!("mount {fstype} on {target}: {e}"));
        }
    }
    std::panic::set_hook(Box::new(|info| log(&format!("panic: {info}"))));
    let loaded = load_listed_modules();
    log(&format!("{loaded} modules loaded"));

    // Bound before the ready line, so "ready" means "accepting".
    let first = match VsockListener::bind(AGENT_VSOCK_PORT) {
        Ok(l) => l,
        Err(e) => power_off(&format!("vsock port {AGENT_VSOCK_PORT}: {e}")),
    };
    let server = Server::new(Agent::new(AgentConfig::guest(), system::boottime_ns()));
    let mut next = Some(first);
    let spawned = std::thread::Builder::new()
        .name("agent-listener".into())
        .spawn(move || loop {
            let mut listener = match next.take() {
                Some(l) => l,
                None => match VsockListener::bind(AGENT_VSOCK_PORT) {
                    Ok(l) => l,
                    Err(e) => power_off(&format!("vsock port {AGENT_VSOCK_PORT}: {e}")),
                },
            };
            let e = server.serve(&mut listener);
            log(&format!(
                "accept on vsock port {}: {e}; listening anew",
                listener.port()
            ));
        });
    if let Err(e) = spawned {
        power_off(&format!("starting the listener thread: {e}"));
    }
    if let Ok(mut console) = OpenOptions::new().write(true).open("/dev/console") {
        let _ = writeln!(console, "{READY_LINE}");
    }
    reap_forever(&sigchld)
}
