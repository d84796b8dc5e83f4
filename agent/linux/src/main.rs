//! `/init` of minivmm's Linux guest image: see the library's `init` module.

use std::process::ExitCode;

fn main() -> ExitCode {
    // SAFETY: getpid has no memory effects.
    if unsafe { libc::getpid() } == 1 {
        linux_agent::init::run()
    }
    eprintln!(
        "minivmm-linux-agent {}: runs only as PID 1 (/init of a minivmm Linux guest image)",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
