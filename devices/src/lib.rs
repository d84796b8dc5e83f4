//! Device models of minivmm. Devices know nothing about KVM: they see bus
//! accesses and raise interrupts through event fds that the VMM wires to KVM.

pub mod acpi_pm;
pub mod bus;
pub mod i8042;
pub mod ratelimit;
pub mod serial;
pub mod virtio;

pub use bus::BusDevice;
