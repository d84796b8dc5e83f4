//! The Linux system calls and sysfs files the agent's RPCs use.

use std::ffi::CStr;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `RNDADDENTROPY`, `_IOW('R', 0x03, int[2])` (include/uapi/linux/random.h).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`, `_IO('R', 0x07)` (include/uapi/linux/random.h).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// Page size of `TouchMemory` (the protocol's unit).
pub const PAGE_SIZE: u64 = 4096;

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write; the clocks used exist on
    // every Linux this runs on, so the call cannot fail.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `CLOCK_MONOTONIC` in nanoseconds.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// `CLOCK_BOOTTIME` in nanoseconds: time since the kernel started.
pub fn boottime_ns() -> u64 {
    clock_ns(libc::CLOCK_BOOTTIME)
}

/// `CLOCK_REALTIME` as (seconds, microseconds).
pub fn realtime() -> (i64, i64) {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    (ts.tv_sec, ts.tv_nsec / 1000)
}

/// Sets `CLOCK_REALTIME` (needs CAP_SYS_TIME).
pub fn set_realtime(sec: i64, usec: i64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: sec,
        tv_nsec: usec * 1000,
    };
    // SAFETY: ts is a valid, initialised timespec read by the kernel.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mixes `data` into the kernel RNG through `device` (`/dev/urandom`),
/// crediting it as entropy (RNDADDENTROPY), then forces the CRNG to reseed
/// (RNDRESEEDCRNG) so the next read already depends on it. Needs
/// CAP_SYS_ADMIN.
pub fn add_entropy_and_reseed(device: &Path, data: &[u8]) -> io::Result<()> {
    let file = OpenOptions::new().write(true).open(device)?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + data.len().next_multiple_of(4));
    info.extend_from_slice(&((data.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(data.len() as i32).to_ne_bytes());
    info.extend_from_slice(data);
    info.resize(8 + data.len().next_multiple_of(4), 0);
    // SAFETY: info is a rand_pool_info header followed by buf_size bytes,
    // alive for the call; the fd is open.
    if unsafe { libc::ioctl(file.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(file.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Fills `buf` from the kernel RNG (getrandom(2), blocking until the CRNG
/// is initialised).
pub fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: rest is a valid writable buffer of rest.len() bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

/// Online CPUs (`sysconf(_SC_NPROCESSORS_ONLN)`).
pub fn online_cpu_count() -> u32 {
    // SAFETY: sysconf has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    n.max(1) as u32
}

/// (total, available) RAM in bytes from sysinfo(2).
pub fn memory() -> (u64, u64) {
    // SAFETY: an all-zero sysinfo is a valid value to be overwritten.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: info is a valid sysinfo to write.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return (0, 0);
    }
    let unit = u64::from(info.mem_unit.max(1));
    (
        info.totalram as u64 * unit,
        (info.freeram as u64 + info.bufferram as u64) * unit,
    )
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    // SAFETY: an all-zero utsname is valid; uname fills it with NUL-ended
    // strings.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uts is a valid utsname to write.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return "linux".into();
    }
    // SAFETY: uname NUL-terminates release within the array.
    unsafe { CStr::from_ptr(uts.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// The 8-byte word `TouchMemory` writes for `pattern`: a byte-sized pattern
/// fills every byte, a wider one repeats as a 32-bit little-endian value
/// (the same meaning as in the test guest).
pub fn pattern_word(pattern: u32) -> u64 {
    match u8::try_from(pattern) {
        Ok(byte) => u64::from_ne_bytes([byte; 8]),
        Err(_) => (u64::from(pattern) << 32) | u64::from(pattern),
    }
}

/// FNV-1a, 64-bit, one 8-byte word per step.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Fresh anonymous memory of `pages` pages, filled with `word`, read back
/// and checksummed (FNV-1a over the 8-byte words), then released. The
/// writes make the guest dirty that much RAM, which is what the host wants
/// to observe (copy-on-write in clones).
pub fn touch_anonymous(pages: u64, word: u64) -> io::Result<u64> {
    if pages == 0 {
        return Ok(FNV_OFFSET);
    }
    let len = usize::try_from(pages * PAGE_SIZE)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a fresh private anonymous mapping; no existing memory is
    // affected.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let words = ptr.cast::<u64>();
    let count = len / 8;
    let mut hash = FNV_OFFSET;
    // SAFETY: [ptr, ptr+len) is our own mapping, u64-aligned (page aligned).
    unsafe {
        for i in 0..count {
            words.add(i).write_volatile(word);
        }
        for i in 0..count {
            hash = (hash ^ words.add(i).read_volatile()).wrapping_mul(FNV_PRIME);
        }
        libc::munmap(ptr, len);
    }
    Ok(hash)
}

/// Brings CPUs online through `<sysfs>/devices/system/cpu/cpuN/online`
/// until `wanted` are online. Returns how many are online afterwards.
pub fn online_cpus_sysfs(sysfs: &Path, wanted: u32) -> io::Result<u32> {
    let dir = sysfs.join("devices/system/cpu");
    let mut online = 0u32;
    let mut offline = Vec::new();
    for e in std::fs::read_dir(&dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(index) = name.strip_prefix("cpu").and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // cpu0 usually has no `online` file: it cannot go offline.
        match std::fs::read_to_string(e.path().join("online")) {
            Ok(s) if s.trim() == "0" => offline.push(index),
            _ => online += 1,
        }
    }
    offline.sort_unstable();
    for index in offline {
        if online >= wanted {
            break;
        }
        std::fs::write(dir.join(format!("cpu{index}/online")), b"1")?;
        online += 1;
    }
    Ok(online)
}

/// Brings memory blocks online through `<sysfs>/devices/system/memory/
/// memoryN/state` until `wanted` bytes are online. Returns the online bytes.
pub fn online_memory_sysfs(sysfs: &Path, wanted: u64) -> io::Result<u64> {
    let dir = sysfs.join("devices/system/memory");
    let block_hex = std::fs::read_to_string(dir.join("block_size_bytes"))?;
    let block =
        u64::from_str_radix(block_hex.trim().trim_start_matches("0x"), 16).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("block_size_bytes: {e}"))
        })?;
    let mut online = 0u64;
    let mut offline = Vec::new();
    for e in std::fs::read_dir(&dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(index) = name
            .strip_prefix("memory")
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        match std::fs::read_to_string(e.path().join("state")) {
            Ok(s) if s.trim() == "offline" => offline.push(index),
            Ok(_) => online = online.saturating_add(block),
            Err(_) => {}
        }
    }
    offline.sort_unstable();
    for index in offline {
        if online >= wanted {
            break;
        }
        std::fs::write(dir.join(format!("memory{index}/state")), b"online")?;
        online = online.saturating_add(block);
    }
    Ok(online)
}
