//! The minivmm virtual machine monitor core: KVM VM and vCPUs, guest RAM with
//! the backends templating needs, x86_64 boot and the vCPU run loop.

pub mod boot;
pub mod bus;
pub mod console;
pub mod kvm;
pub mod layout;
pub mod memory;
pub mod seccomp;
pub mod state;
pub mod vcpu;
pub mod virtio;
pub mod vm;

pub use kvm::{Flavour, KvmInfo};
pub use memory::{GuestRam, MemoryBackend};
pub use virtio::{FsShare, VirtioConfig};
pub use vm::{GuestExit, KernelImage, Vm, VmConfig, VmError};
