//! The C memory functions the compiler emits calls to (there is no libc).
//! The agent runs natively, where `rep movsb` / `rep stosb` are the fast
//! string forms on any CPU with ERMS; the bodies are inline assembly so LLVM
//! cannot turn them back into calls to themselves. The direction flag is
//! clear at every boundary (the ABI requires it).

use core::arch::asm;

/// C `memcpy`.
///
/// # Safety
/// `dest` and `src` must be valid for `n` bytes and must not overlap.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    asm!(
        "rep movsb",
        inout("rcx") n => _,
        inout("rdi") dest => _,
        inout("rsi") src => _,
        options(nostack, preserves_flags)
    );
    dest
}

/// C `memmove`: forward, or backward when `dest` overlaps the end of `src`.
///
/// # Safety
/// `dest` and `src` must be valid for `n` bytes.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        memcpy(dest, src, n);
    } else if n != 0 {
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dest.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack)
        );
    }
    dest
}

/// C `memset`.
///
/// # Safety
/// `dest` must be valid for `n` bytes.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    asm!(
        "rep stosb",
        inout("rcx") n => _,
        inout("rdi") dest => _,
        in("al") c as u8,
        options(nostack, preserves_flags)
    );
    dest
}

/// C `memcmp`: sign of the first differing byte pair (as unsigned bytes).
///
/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    if n == 0 {
        return 0;
    }
    let a_end: *const u8;
    let b_end: *const u8;
    let differ: u8;
    // `repe cmpsb` stops one byte past the first mismatch, or after n bytes
    // (assembly, so LLVM cannot recognise a loop as a memcmp call).
    asm!(
        "repe cmpsb",
        "setne {differ}",
        differ = out(reg_byte) differ,
        inout("rcx") n => _,
        inout("rsi") a => a_end,
        inout("rdi") b => b_end,
        options(nostack, readonly)
    );
    if differ == 0 {
        0
    } else {
        i32::from(*a_end.sub(1)) - i32::from(*b_end.sub(1))
    }
}

/// C `bcmp`: zero iff the two ranges are equal.
///
/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    memcmp(a, b, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_move_set_compare() {
        let src = *b"hello, world";
        let mut dst = [0u8; 12];
        unsafe {
            memcpy(dst.as_mut_ptr(), src.as_ptr(), 12);
            assert_eq!(memcmp(dst.as_ptr(), src.as_ptr(), 12), 0);
            dst[5] = b'!';
            assert!(memcmp(dst.as_ptr(), src.as_ptr(), 12) < 0);
            memset(dst.as_mut_ptr(), 0xab, 12);
            assert!(dst.iter().all(|&b| b == 0xab));
        }
        let mut buf = *b"0123456789";
        unsafe { memmove(buf.as_mut_ptr().add(2), buf.as_ptr(), 6) };
        assert_eq!(&buf, b"0101234589");
        let mut buf = *b"0123456789";
        unsafe { memmove(buf.as_mut_ptr(), buf.as_ptr().add(3), 7) };
        assert_eq!(&buf, b"3456789789");
    }
}
