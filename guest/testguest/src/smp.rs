//! Bring-up of the other vCPUs. minivmm starts every vCPU at `e_entry` at
//! the same time (no INIT/SIPI); each AP waits for the BSP to publish the
//! shared state (event path, IDT, the BSP's APIC ID), sets up its own event
//! handling and LAPIC, reports in, wakes the BSP with an IPI and idles.

#![cfg_attr(test, allow(dead_code))]

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Set by the BSP once the APs may start their per-CPU setup.
static RELEASED: AtomicBool = AtomicBool::new(false);
/// vCPUs that finished their setup (the BSP counts itself).
static ONLINE: AtomicU32 = AtomicU32::new(0);
/// x2APIC ID of the BSP, the target of wake-up IPIs and device interrupts.
static BSP_APIC_ID: AtomicU32 = AtomicU32::new(0);

/// BSP: lets the APs go; everything written before is visible to them.
pub fn release_aps(bsp_apic_id: u32) {
    BSP_APIC_ID.store(bsp_apic_id, Ordering::Relaxed);
    RELEASED.store(true, Ordering::Release);
}

/// AP: waits until the BSP released the APs. The BSP does this a few
/// microseconds after it starts, so a PAUSE loop is cheaper than arranging a
/// wake-up for a CPU that cannot take interrupts yet.
pub fn wait_for_release() {
    while !RELEASED.load(Ordering::Acquire) {
        crate::cpu::relax();
    }
}

/// Counts this CPU as online.
pub fn report_in() {
    ONLINE.fetch_add(1, Ordering::AcqRel);
}

/// vCPUs online so far.
pub fn online() -> u32 {
    ONLINE.load(Ordering::Acquire)
}

/// x2APIC ID of the BSP.
pub fn bsp_apic_id() -> u32 {
    BSP_APIC_ID.load(Ordering::Relaxed)
}
