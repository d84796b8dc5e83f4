//! The C memory functions the compiler emits calls to, for both guest
//! programs (kernel and agent). There is no libc, and compiler_builtins does
//! not provide them for this target. The bodies are
//! string instructions in inline assembly, so LLVM cannot recognise them as
//! memcpy/memset idioms and turn them into calls to themselves.
//!
//! Bulk work uses the quadword forms (`rep movsq`/`rep stosq`): when the
//! kernel runs in the PVM KVM's instruction emulator a `rep` string
//! instruction costs about the same per iteration whatever its width, so this
//! is 8 times faster than the byte forms there, and as fast natively.
//!
//! The direction flag is clear at every boundary: the ABI requires it, event
//! delivery clears it (PVM) or the handlers do (`cld` in the stubs), and
//! `memmove` restores it after a backward copy.

use core::arch::asm;

/// C `memcpy`.
///
/// # Safety
/// `dest` and `src` must be valid for `n` bytes and must not overlap.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    copy_forward(dest, src, n);
    dest
}

/// `n / 8` quadwords, then the remaining bytes, lowest address first.
#[inline(always)]
unsafe fn copy_forward(dest: *mut u8, src: *const u8, n: usize) {
    asm!(
        "rep movsq",
        "mov rcx, {tail}",
        "rep movsb",
        tail = in(reg) n & 7,
        inout("rcx") n >> 3 => _,
        inout("rdi") dest => _,
        inout("rsi") src => _,
        options(nostack, preserves_flags)
    );
}

/// C `memmove`: copies forward, or backward when `dest` overlaps the end of `src`.
///
/// # Safety
/// `dest` and `src` must be valid for `n` bytes.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // dest before src, or no overlap: a forward copy never reads a byte
        // it has already overwritten (quadword steps read ahead of the writes).
        copy_forward(dest, src, n);
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
    fill(dest, c as u8, n);
    dest
}

/// Fills `n` bytes with `byte`: quadwords, then the remaining bytes. Opaque to
/// the optimiser (unlike `write_bytes`, which LLVM may expand into SSE stores
/// the PVM KVM's instruction emulator cannot run).
///
/// # Safety
/// `dest` must be valid for `n` bytes.
pub unsafe fn fill(dest: *mut u8, byte: u8, n: usize) {
    asm!(
        "rep stosq",
        "mov rcx, {tail}",
        "rep stosb",
        tail = in(reg) n & 7,
        inout("rcx") n >> 3 => _,
        inout("rdi") dest => _,
        in("rax") u64::from(byte) * 0x0101_0101_0101_0101,
        options(nostack, preserves_flags)
    );
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
    // `repe cmpsb` stops one byte past the first mismatch, or after n bytes.
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
    fn copies_and_compares() {
        let src = *b"hello, world";
        let mut dst = [0u8; 12];
        unsafe {
            memcpy(dst.as_mut_ptr(), src.as_ptr(), 12);
            assert_eq!(memcmp(dst.as_ptr(), src.as_ptr(), 12), 0);
            dst[5] = b'!';
            assert!(memcmp(dst.as_ptr(), src.as_ptr(), 12) < 0);
            assert!(memcmp(src.as_ptr(), dst.as_ptr(), 12) > 0);
            assert_eq!(bcmp(src.as_ptr(), dst.as_ptr(), 5), 0);
            assert_eq!(memcmp(src.as_ptr(), dst.as_ptr(), 0), 0);
            memset(dst.as_mut_ptr(), 0xab, 12);
            assert!(dst.iter().all(|&b| b == 0xab));
        }
    }

    #[test]
    fn odd_lengths_and_offsets() {
        let src: [u8; 37] = core::array::from_fn(|i| i as u8);
        for n in 0..=29 {
            let mut dst = [0xffu8; 37];
            unsafe { memcpy(dst.as_mut_ptr().add(3), src.as_ptr().add(1), n) };
            assert_eq!(&dst[3..3 + n], &src[1..1 + n]);
            assert!(dst[..3].iter().chain(&dst[3 + n..]).all(|&b| b == 0xff));
            unsafe { fill(dst.as_mut_ptr().add(1), 7, n) };
            assert!(dst[1..1 + n].iter().all(|&b| b == 7));
            assert_eq!(dst[0], 0xff);
        }
    }

    #[test]
    fn memmove_handles_both_overlaps() {
        let mut buf = *b"0123456789";
        unsafe {
            memmove(buf.as_mut_ptr().add(2), buf.as_ptr(), 6);
        }
        assert_eq!(&buf, b"0101234589");
        let mut buf = *b"0123456789";
        unsafe {
            memmove(buf.as_mut_ptr(), buf.as_ptr().add(3), 7);
        }
        assert_eq!(&buf, b"3456789789");
    }
}
