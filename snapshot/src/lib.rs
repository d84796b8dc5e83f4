//! On-disk formats of minivmm: the versioned, checksummed state file and the
//! template directory (memory, state, manifest) with its atomic commit.
//!
//! This crate stores what it is given: it knows nothing of KVM or of device
//! internals, only how to write their serializable state safely and how to
//! refuse anything missing, partial, corrupt or mismatched.

mod durable;
pub mod fsfile;
pub mod state;
pub mod template;

pub use durable::sha256_hex;
pub use state::{StateError, StateHeader};
pub use template::{
    ConfigMismatch, GuestConfig, KernelRef, Manifest, MemoryFileEntry, StateFileEntry, Template,
    TemplateError, TemplateWriter,
};

/// Version of minivmm recorded in every state file and manifest.
pub const MINIVMM_VERSION: &str = env!("CARGO_PKG_VERSION");
