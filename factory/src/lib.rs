//! The template factory: build a VM template on tmpfs once (guest RAM is a
//! MAP_SHARED file, so the snapshot of memory costs nothing), then hand out
//! clones that map it MAP_PRIVATE, restore the saved state, and are made
//! distinct machines (fresh entropy, host wall clock) before anyone uses them.

pub mod cache;
pub mod clone;
pub mod config;
pub mod direct;
pub mod error;
pub mod ready;
pub mod request;
pub mod spec;
pub mod template;
pub mod template_factory;
pub mod tmpfs;

pub use cache::{CacheFactory, CacheStatus};
pub use clone::{CloneOptions, CloneTimings, ClonedVm, GrowTimings, TemplateHandle};
pub use config::{ConfigError, FactoryConfig};
pub use direct::DirectFactory;
pub use error::FactoryError;
pub use ready::{FallbackReason, Machine, ReadyVm, Step, VmSource};
pub use request::{check_config, Growth, VmRequest};
pub use spec::GuestSpec;
pub use template::{create_template, wait_for_agent, CreateOptions};
pub use template_factory::TemplateFactory;

use std::time::Duration;

/// Deadline for one agent call on the hot path (a bound, not an expectation).
pub const AGENT_CALL_DEADLINE: Duration = Duration::from_secs(10);
/// Default deadline for a cold-booted guest's agent to answer: generous,
/// because a Linux guest nested under software emulation takes 30-90 s to
/// boot (the built-in guest needs milliseconds, so only failures wait it out).
pub const BOOT_DEADLINE: Duration = Duration::from_secs(180);

/// Hands out ready VMs (Kata's `FactoryBase`): running, agent answering,
/// RNG reseeded and clock set when cloned.
pub trait Factory: Send + Sync {
    /// A VM ready for `request`.
    fn get_vm(&self, request: &VmRequest) -> Result<ReadyVm, FactoryError>;
    /// Release what the factory holds (background builds, cached VMs).
    fn close(&self);
}
