//! A minimal no_std agent: serves `Check` from bytes handed over by C.

#![no_std]

extern crate alloc;

use alloc::vec::Vec;
use core::alloc::{GlobalAlloc, Layout};

use agent_protocol::{AgentService, CheckRequest, CheckResponse, Dispatcher, Status};

struct Agent;

impl AgentService for Agent {
    fn check(&mut self, _: CheckRequest) -> Result<CheckResponse, Status> {
        Ok(CheckResponse {
            status: 1,
            protocol_version: agent_protocol::PROTOCOL_VERSION,
        })
    }
}

/// Serves `len` bytes at `input`; returns how many reply bytes were produced.
///
/// # Safety
/// `input` must point to `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn agent_serve(input: *const u8, len: usize) -> usize {
    let input = unsafe { core::slice::from_raw_parts(input, len) };
    let mut out = Vec::new();
    let _ = Dispatcher::new().handle_bytes(&mut Agent, input, &mut out);
    out.len()
}

/// Never hands out memory: this crate is compiled, not run.
struct NoAlloc;

unsafe impl GlobalAlloc for NoAlloc {
    unsafe fn alloc(&self, _: Layout) -> *mut u8 {
        core::ptr::null_mut()
    }
    unsafe fn dealloc(&self, _: *mut u8, _: Layout) {}
}

#[global_allocator]
static ALLOCATOR: NoAlloc = NoAlloc;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
