//! The agent's runtime: the entry point the kernel starts (user mode, RDI =
//! the boot information page), its stack, and the panic handler.

#[cfg(not(test))]
mod imp {
    use core::panic::PanicInfo;

    use crate::console;
    use crate::sys;

    /// The agent's stack.
    const STACK_SIZE: usize = 256 * 1024;

    #[repr(C, align(16))]
    struct Stack([u8; STACK_SIZE]);

    static mut STACK: Stack = Stack([0; STACK_SIZE]);

    core::arch::global_asm!(
        r#"
        .pushsection .text.entry, "ax"
        .globl _start
    _start:
        lea {stack}+{size}(%rip), %rsp
        xor %ebp, %ebp
        cld
        /* agent_main(boot_info = rdi) */
        call {main}
        ud2
        .popsection
        "#,
        stack = sym STACK,
        size = const STACK_SIZE,
        main = sym crate::agent_main,
        options(att_syntax)
    );

    #[panic_handler]
    fn panic(info: &PanicInfo) -> ! {
        match info.location() {
            Some(loc) => console::print_line(format_args!(
                "testguest agent panic: {} ({}:{})",
                info.message(),
                loc.file(),
                loc.line()
            )),
            None => console::print_line(format_args!("testguest agent panic: {}", info.message())),
        }
        sys::exit()
    }

    /// Never called (panic = "abort"), but the precompiled alloc/core
    /// reference it and a build without LTO does not drop the reference.
    #[no_mangle]
    extern "C" fn rust_eh_personality() {}

    /// Never called either (nothing unwinds with panic = "abort"), but the
    /// precompiled `alloc::fmt::format` keeps a cleanup path that names it.
    #[no_mangle]
    extern "C" fn _Unwind_Resume() -> ! {
        sys::exit()
    }
}
