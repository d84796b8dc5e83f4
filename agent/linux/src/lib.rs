//! minivmm's Linux guest agent. Built as a static binary and put into the
//! Linux guest image as `/init` by `minivmm image linux`.
//!
//! - [`init`]: PID 1 duties (mounts, module loading, reaping, never exiting);
//! - [`service`]: the agent RPCs (`agent_protocol::AgentService`) on Linux;
//! - [`server`]: one thread per connection, bounded, over any listener
//!   (AF_VSOCK port 1024 in the guest, a unix socket in the host tests);
//! - [`vsock`]: the AF_VSOCK listener;
//! - [`system`]: the Linux calls the service makes, in one place.

#![warn(missing_docs)]

pub mod init;
pub mod server;
pub mod service;
pub mod system;
pub mod vsock;

/// The line the agent writes to the console once it listens on vsock.
pub const READY_LINE: &str = "minivmm-linux-agent ready";

/// Where the image lists the modules `/init` loads, one absolute path a
/// line, in load order (dependencies first).
pub const MODULE_LIST_PATH: &str = "/etc/minivmm/modules";
