//! Per-CPU areas, one per vCPU index, in .bss. GS base points at the area of
//! the running CPU, so event entry code finds its PVCS and stacks with
//! `%gs:offset`.

#![cfg_attr(test, allow(dead_code))]

use core::cell::UnsafeCell;

use crate::cmdline::MAX_CPUS;
use crate::pvm::Pvcs;

/// The stack normal code runs on.
pub const STACK_SIZE: usize = 16 * 1024;
/// Hardware path: IST stack for interrupts (vectors >= 32).
pub const IRQ_STACK_SIZE: usize = 8 * 1024;
/// Both paths: stack for faults and unexpected events.
pub const FAULT_STACK_SIZE: usize = 8 * 1024;

/// Per-CPU data other than stacks (one page).
#[repr(C, align(4096))]
pub struct CpuInfo {
    /// This CPU's index (RDI at entry).
    pub index: u64,
    /// Top of `fault_stack`, for entry code that cannot trust RSP.
    pub fault_stack_top: u64,
    /// Hardware path: this CPU's GDT (see `trap`: null, null, kernel code
    /// 0x10, kernel data 0x18, unused, user data 0x2b, user code 0x33, TSS 0x38).
    pub gdt: [u64; crate::trap::GDT_SLOTS],
    /// Hardware path: this CPU's 64-bit TSS (104 bytes, 4-byte aligned fields).
    pub tss: [u32; 26],
}

/// Everything one CPU owns. The PVCS comes first: it must be page aligned.
#[repr(C, align(4096))]
pub struct CpuArea {
    pub pvcs: Pvcs,
    pub info: CpuInfo,
    pub irq_stack: [u8; IRQ_STACK_SIZE],
    pub fault_stack: [u8; FAULT_STACK_SIZE],
    pub stack: [u8; STACK_SIZE],
}

/// Offset of the top of the normal stack in a `CpuArea` (used by `_start`).
pub const STACK_TOP_OFFSET: usize = core::mem::offset_of!(CpuArea, stack) + STACK_SIZE;
/// Offset of `info.fault_stack_top` in a `CpuArea` (used by event entry code).
pub const FAULT_STACK_TOP_OFFSET: usize =
    core::mem::offset_of!(CpuArea, info) + core::mem::offset_of!(CpuInfo, fault_stack_top);

/// All per-CPU areas. Each CPU touches only its own.
#[repr(transparent)]
pub struct CpuAreas(UnsafeCell<[CpuArea; MAX_CPUS as usize]>);

// SAFETY: CPU n only ever accesses area n (see `area`).
unsafe impl Sync for CpuAreas {}

/// The per-CPU areas (zero-filled .bss; the VMM zeroes p_memsz beyond p_filesz).
pub static CPU_AREAS: CpuAreas = CpuAreas(UnsafeCell::new(unsafe { core::mem::zeroed() }));

/// The area of CPU `index`.
///
/// # Safety
/// Only CPU `index` may use the result, and only one reference may be live.
pub unsafe fn area(index: u32) -> &'static mut CpuArea {
    &mut (*CPU_AREAS.0.get())[index as usize]
}

impl CpuArea {
    /// Fills in the fields that do not depend on the event path.
    pub fn init(&mut self, index: u32) {
        self.info.index = u64::from(index);
        self.info.fault_stack_top = self.fault_stack.as_ptr_range().end as u64;
    }

    /// Address of this area (GS base, and guest-physical: identity mapped).
    pub fn addr(&self) -> u64 {
        self as *const Self as u64
    }

    /// Top of the interrupt stack.
    pub fn irq_stack_top(&self) -> u64 {
        self.irq_stack.as_ptr_range().end as u64
    }

    /// Top of the normal stack (also RSP0: system calls from user mode).
    pub fn stack_top(&self) -> u64 {
        self.stack.as_ptr_range().end as u64
    }
}
