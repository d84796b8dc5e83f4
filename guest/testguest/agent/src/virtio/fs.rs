//! virtio-fs (file system device, virtio 1.2 §5.11), the driver: FUSE
//! requests (Linux `include/uapi/linux/fuse.h`, protocol 7.31) on the first
//! request queue, one at a time. The agent serves one RPC at a time, so a
//! request is synchronous: it is posted, the device notified, and the agent
//! sleeps until the device's interrupt brings the reply (other devices'
//! interrupts that arrive meanwhile are handed back to the main loop).
//!
//! The FUSE session starts (INIT) at the first file access, not when the
//! device is found: a template VM has the device negotiated but nothing
//! mounted, and each clone's fresh virtiofsd sees the INIT of its clone.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use testguest_abi::BootInfo;

use super::queue::{Buffer, SplitQueue};
use super::{MmioDevice, SetupError};
use crate::clock::Clock;
use crate::sys;

/// Queue indexes (virtio 1.2 §5.11.2): high priority, then requests.
const HIPRIO_QUEUE: u16 = 0;
const REQUEST_QUEUE: u16 = 1;
/// Entries of each queue (one request in flight needs one chain).
const QUEUE_SIZE: u16 = 8;
/// `tag` in the configuration space (virtio 1.2 §5.11.4).
const TAG_LEN: usize = 36;
/// How long one FUSE request may take before the agent gives up on it.
const REQUEST_TIMEOUT_NS: u64 = 30_000_000_000;
/// Largest READ or WRITE payload of one FUSE request.
pub const MAX_IO: usize = 256 * 1024;

/// FUSE opcodes (fuse.h `enum fuse_opcode`).
mod op {
    pub const LOOKUP: u32 = 1;
    pub const GETATTR: u32 = 3;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const RELEASE: u32 = 18;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const CREATE: u32 = 35;
}

/// The FUSE version spoken (7.31: no extended INIT flags needed).
const FUSE_MAJOR: u32 = 7;
const FUSE_MINOR: u32 = 31;
/// The root directory's node id.
const ROOT_NODE: u64 = 1;
/// `struct fuse_in_header` and `struct fuse_out_header` sizes.
const IN_HEADER_LEN: usize = 40;
const OUT_HEADER_LEN: usize = 16;
/// `struct fuse_entry_out`, with the `fuse_attr` at offset 40.
const ENTRY_OUT_LEN: usize = 128;
/// `struct fuse_attr_out`: the `fuse_attr` at offset 16.
const ATTR_OUT_LEN: usize = 104;
/// `struct fuse_open_out`.
const OPEN_OUT_LEN: usize = 16;
/// `struct fuse_init_out` (7.23+ layout).
const INIT_OUT_LEN: usize = 64;
/// open(2) flags (x86_64).
const O_RDONLY: u32 = 0;
const O_WRONLY: u32 = 1;
const O_CREAT: u32 = 0o100;
const O_TRUNC: u32 = 0o1000;
/// File type bits of `st_mode`.
const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
/// errno values the driver reports itself.
pub const EIO: i32 = 5;
pub const EINVAL: i32 = 22;
pub const EISDIR: i32 = 21;
pub const ENOTDIR: i32 = 20;
pub const ETIMEDOUT: i32 = 110;

/// Why a file operation failed: an errno (from the server, or the driver's
/// own for a bad reply, a bad path or a timeout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

/// One virtio-fs device.
pub struct FsDevice {
    pub mmio: MmioDevice,
    tag: String,
    _hiprio: SplitQueue<()>,
    queue: SplitQueue<Request>,
    next_unique: u64,
    /// `max_write` from INIT, once the session is up.
    session: Option<u32>,
}

/// The buffers of one request, kept alive while the device holds them.
struct Request {
    unique: u64,
    _input: Vec<u8>,
    output: Vec<u8>,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, Errno> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(Errno(EIO))
}

fn u64_at(b: &[u8], off: usize) -> Result<u64, Errno> {
    Ok(u64::from(u32_at(b, off)?) | u64::from(u32_at(b, off + 4)?) << 32)
}

fn name_arg(name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(name.len() + 1);
    v.extend_from_slice(name.as_bytes());
    v.push(0);
    v
}

/// The components of a share-relative path; `..` and NUL are refused.
pub fn path_components(path: &str) -> Result<Vec<&str>, Errno> {
    let mut out = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(Errno(EINVAL)),
            c if c.contains('\0') || c.len() > 255 => return Err(Errno(EINVAL)),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Names in a READDIR reply (a run of `struct fuse_dirent`), and the offset
/// of the last one (where the next READDIR continues).
pub fn parse_dirents(mut buf: &[u8], names: &mut Vec<String>) -> Result<Option<u64>, Errno> {
    let mut last = None;
    while buf.len() >= 24 {
        let off = u64_at(buf, 8)?;
        let namelen = u32_at(buf, 16)? as usize;
        let name = buf.get(24..24 + namelen).ok_or(Errno(EIO))?;
        let name = core::str::from_utf8(name).map_err(|_| Errno(EIO))?;
        if name != "." && name != ".." {
            names.push(name.into());
        }
        last = Some(off);
        let rec = (24 + namelen + 7) & !7;
        buf = buf.get(rec..).unwrap_or(&[]);
    }
    Ok(last)
}

impl FsDevice {
    /// Initializes the device (virtio 1.2 §3.1.1) and reads its tag.
    pub fn new(mmio: MmioDevice) -> Result<FsDevice, SetupError> {
        mmio.begin_init(0)?;
        let hiprio = SplitQueue::new(QUEUE_SIZE);
        let queue = SplitQueue::new(QUEUE_SIZE);
        mmio.setup_queue(HIPRIO_QUEUE, &hiprio)?;
        mmio.setup_queue(REQUEST_QUEUE, &queue)?;
        mmio.finish_init();
        let mut raw = [0u8; TAG_LEN];
        for (i, word) in raw.chunks_mut(4).enumerate() {
            word.copy_from_slice(&mmio.config_u32(4 * i).to_le_bytes());
        }
        let end = raw.iter().position(|&b| b == 0).unwrap_or(TAG_LEN);
        let tag = String::from_utf8_lossy(&raw[..end]).into();
        Ok(FsDevice {
            mmio,
            tag,
            _hiprio: hiprio,
            queue,
            next_unique: 1,
            session: None,
        })
    }

    /// The share's tag (virtio 1.2 §5.11.4).
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Sends one FUSE request and waits for its reply body (at most
    /// `out_len` bytes).
    fn call(
        &mut self,
        info: &BootInfo,
        clock: &Clock,
        opcode: u32,
        nodeid: u64,
        args: &[&[u8]],
        out_len: usize,
    ) -> Result<Vec<u8>, Errno> {
        let unique = self.next_unique;
        self.next_unique += 1;
        let total = IN_HEADER_LEN + args.iter().map(|a| a.len()).sum::<usize>();
        let mut input = Vec::with_capacity(total);
        input.extend_from_slice(&(total as u32).to_le_bytes());
        input.extend_from_slice(&opcode.to_le_bytes());
        input.extend_from_slice(&unique.to_le_bytes());
        input.extend_from_slice(&nodeid.to_le_bytes());
        // uid, gid, pid (root, kernel), total_extlen, padding.
        input.extend_from_slice(&[0u8; 16]);
        for a in args {
            input.extend_from_slice(a);
        }
        let mut output = vec![0u8; OUT_HEADER_LEN + out_len];
        let chain = [
            Buffer {
                addr: input.as_ptr() as u64,
                len: input.len() as u32,
                device_writable: false,
            },
            Buffer {
                addr: output.as_mut_ptr() as u64,
                len: output.len() as u32,
                device_writable: true,
            },
        ];
        let request = Request {
            unique,
            _input: input,
            output,
        };
        if self.queue.push(&chain, request).is_err() {
            // Only requests that timed out can still hold the queue.
            return Err(Errno(ETIMEDOUT));
        }
        if self.queue.needs_notification() {
            self.mmio.notify(REQUEST_QUEUE);
        }
        let (output, len) = self.wait_reply(info, clock, unique)?;
        let len = (len as usize).min(output.len());
        if len < OUT_HEADER_LEN {
            return Err(Errno(EIO));
        }
        let error = u32_at(&output, 4)? as i32;
        if u64_at(&output, 8)? != unique {
            return Err(Errno(EIO));
        }
        if error != 0 {
            return Err(Errno(error.checked_neg().unwrap_or(EIO)));
        }
        Ok(output[OUT_HEADER_LEN..len].to_vec())
    }

    /// Sleeps until the reply to `unique` comes back (or the deadline).
    fn wait_reply(
        &mut self,
        info: &BootInfo,
        clock: &Clock,
        unique: u64,
    ) -> Result<(Vec<u8>, u32), Errno> {
        let deadline = clock.monotonic_ns().saturating_add(REQUEST_TIMEOUT_NS);
        let ours = 1u64 << (self.mmio.irq & 63);
        let mut others = 0u64;
        let result = loop {
            if let Some(used) = self.queue.pop_used() {
                if used.token.unique == unique {
                    break Ok((used.token.output, used.len));
                }
                // A late reply to a request that timed out: dropped.
                continue;
            }
            let pending = info.pending_irqs.swap(0, Ordering::AcqRel);
            others |= pending & !ours;
            if pending & ours != 0 {
                self.mmio.ack_interrupt();
                continue;
            }
            if clock.monotonic_ns() >= deadline {
                break Err(Errno(ETIMEDOUT));
            }
            if others == 0 {
                sys::wait();
            }
        };
        // The main loop serves the other devices' interrupts.
        info.pending_irqs.fetch_or(others, Ordering::AcqRel);
        result
    }

    /// Starts the FUSE session if it is not up yet; returns `max_write`.
    fn session(&mut self, info: &BootInfo, clock: &Clock) -> Result<u32, Errno> {
        if let Some(max_write) = self.session {
            return Ok(max_write);
        }
        let mut init_in = [0u8; 16];
        init_in[0..4].copy_from_slice(&FUSE_MAJOR.to_le_bytes());
        init_in[4..8].copy_from_slice(&FUSE_MINOR.to_le_bytes());
        let out = self.call(info, clock, op::INIT, 0, &[&init_in], INIT_OUT_LEN)?;
        if u32_at(&out, 0)? != FUSE_MAJOR {
            return Err(Errno(EIO));
        }
        let max_write = u32_at(&out, 20)?.clamp(4096, MAX_IO as u32);
        self.session = Some(max_write);
        Ok(max_write)
    }

    fn lookup(
        &mut self,
        info: &BootInfo,
        clock: &Clock,
        parent: u64,
        name: &str,
    ) -> Result<(u64, u32), Errno> {
        let out = self.call(
            info,
            clock,
            op::LOOKUP,
            parent,
            &[&name_arg(name)],
            ENTRY_OUT_LEN,
        )?;
        // fuse_entry_out.nodeid; fuse_attr.mode at 40 + 60.
        Ok((u64_at(&out, 0)?, u32_at(&out, 100)?))
    }

    /// Node id and mode of `components` under the root.
    fn walk(
        &mut self,
        info: &BootInfo,
        clock: &Clock,
        components: &[&str],
    ) -> Result<(u64, u32), Errno> {
        let mut node = (ROOT_NODE, S_IFDIR);
        for c in components {
            if node.1 & S_IFMT != S_IFDIR {
                return Err(Errno(ENOTDIR));
            }
            node = self.lookup(info, clock, node.0, c)?;
        }
        Ok(node)
    }

    /// File size from GETATTR.
    fn size(&mut self, info: &BootInfo, clock: &Clock, node: u64, fh: u64) -> Result<u64, Errno> {
        let mut getattr_in = [0u8; 16];
        // FUSE_GETATTR_FH: use the open file.
        getattr_in[0..4].copy_from_slice(&1u32.to_le_bytes());
        getattr_in[8..16].copy_from_slice(&fh.to_le_bytes());
        let out = self.call(info, clock, op::GETATTR, node, &[&getattr_in], ATTR_OUT_LEN)?;
        u64_at(&out, 16 + 8)
    }

    fn open(
        &mut self,
        info: &BootInfo,
        clock: &Clock,
        opcode: u32,
        node: u64,
        flags: u32,
    ) -> Result<u64, Errno> {
        let mut open_in = [0u8; 8];
        open_in[0..4].copy_from_slice(&flags.to_le_bytes());
        let out = self.call(info, clock, opcode, node, &[&open_in], OPEN_OUT_LEN)?;
        u64_at(&out, 0)
    }

    fn release(&mut self, info: &BootInfo, clock: &Clock, opcode: u32, node: u64, fh: u64) {
        let mut release_in = [0u8; 24];
        release_in[0..8].copy_from_slice(&fh.to_le_bytes());
        // A failed release leaves only a server-side handle behind.
        let _ = self.call(info, clock, opcode, node, &[&release_in], 0);
    }

    fn io_in(fh: u64, offset: u64, size: u32) -> [u8; 40] {
        let mut b = [0u8; 40];
        b[0..8].copy_from_slice(&fh.to_le_bytes());
        b[8..16].copy_from_slice(&offset.to_le_bytes());
        b[16..20].copy_from_slice(&size.to_le_bytes());
        b
    }

    /// Reads up to `len` bytes of the file at `path` from `offset`.
    pub fn read(
        &mut self,
        info: &BootInfo,
        clock: &Clock,
        path: &str,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, Errno> {
        let components = path_components(path)?;
        let max = self.session(info, clock)? as usize;
        let (node, mode) = self.walk(info, clock, &components)?;
        if mode & S_IFMT == S_IFDIR {
            return Err(Errno(EISDIR));
        }
        let fh = self.open(info, clock, op::OPEN, node, O_RDONLY)?;
        let result = (|| {
            let size = self.size(info, clock, node, fh)?;
            let want = (len as u64).min(size.saturating_sub(offset)) as usize;
            let mut data = Vec::with_capacity(want);
            while data.len() < want {
                let chunk = (want - data.len()).min(max);
                let at = offset + data.len() as u64;
                let read_in = Self::io_in(fh, at, chunk as u32);
                let out = self.call(info, clock, op::READ, node, &[&read_in], chunk)?;
                if out.is_empty() {
                    break;
                }
                data.extend_from_slice(&out[..out.len().min(chunk)]);
            }
            Ok(data)
        })();
        self.release(info, clock, op::RELEASE, node, fh);
        result
    }

    /// Writes `data` into the file at `path` at `offset`; offset 0 creates
    /// the file (mode 0644) or truncates it first. Returns bytes written.
    pub fn write(
        &mut self,
        info: &BootInfo,
        clock: &Clock,
        path: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<u32, Errno> {
        let components = path_components(path)?;
        let Some((name, parent)) = components.split_last() else {
            return Err(Errno(EISDIR));
        };
        let max = self.session(info, clock)? as usize;
        let (node, fh) = if offset == 0 {
            let (dir, mode) = self.walk(info, clock, parent)?;
            if mode & S_IFMT != S_IFDIR {
                return Err(Errno(ENOTDIR));
            }
            let mut create_in = [0u8; 16];
            create_in[0..4].copy_from_slice(&(O_WRONLY | O_CREAT | O_TRUNC).to_le_bytes());
            create_in[4..8].copy_from_slice(&(S_IFREG | 0o644).to_le_bytes());
            let out = self.call(
                info,
                clock,
                op::CREATE,
                dir,
                &[&create_in, &name_arg(name)],
                ENTRY_OUT_LEN + OPEN_OUT_LEN,
            )?;
            (u64_at(&out, 0)?, u64_at(&out, ENTRY_OUT_LEN)?)
        } else {
            let (node, mode) = self.walk(info, clock, &components)?;
            if mode & S_IFMT != S_IFREG {
                return Err(Errno(EISDIR));
            }
            (node, self.open(info, clock, op::OPEN, node, O_WRONLY)?)
        };
        let result = (|| {
            let mut done = 0usize;
            while done < data.len() {
                let chunk = &data[done..(done + max).min(data.len())];
                let write_in = Self::io_in(fh, offset + done as u64, chunk.len() as u32);
                let out = self.call(info, clock, op::WRITE, node, &[&write_in, chunk], 8)?;
                let n = (u32_at(&out, 0)? as usize).min(chunk.len());
                if n == 0 {
                    return Err(Errno(EIO));
                }
                done += n;
            }
            let mut flush_in = [0u8; 24];
            flush_in[0..8].copy_from_slice(&fh.to_le_bytes());
            self.call(info, clock, op::FLUSH, node, &[&flush_in], 0)?;
            Ok(done as u32)
        })();
        self.release(info, clock, op::RELEASE, node, fh);
        result
    }

    /// The parent directory's node and the last component of `path`.
    fn parent_of<'p>(
        &mut self,
        info: &BootInfo,
        clock: &Clock,
        components: &[&'p str],
    ) -> Result<(u64, &'p str), Errno> {
        let Some((name, parent)) = components.split_last() else {
            return Err(Errno(EINVAL));
        };
        let (dir, mode) = self.walk(info, clock, parent)?;
        if mode & S_IFMT != S_IFDIR {
            return Err(Errno(ENOTDIR));
        }
        Ok((dir, name))
    }

    /// Creates the directory `path` (mode 0755).
    pub fn mkdir(&mut self, info: &BootInfo, clock: &Clock, path: &str) -> Result<(), Errno> {
        let components = path_components(path)?;
        self.session(info, clock)?;
        let (dir, name) = self.parent_of(info, clock, &components)?;
        let mut mkdir_in = [0u8; 8];
        mkdir_in[0..4].copy_from_slice(&0o755u32.to_le_bytes());
        self.call(
            info,
            clock,
            op::MKDIR,
            dir,
            &[&mkdir_in, &name_arg(name)],
            ENTRY_OUT_LEN,
        )?;
        Ok(())
    }

    /// Removes the file `path`.
    pub fn unlink(&mut self, info: &BootInfo, clock: &Clock, path: &str) -> Result<(), Errno> {
        let components = path_components(path)?;
        self.session(info, clock)?;
        let (dir, name) = self.parent_of(info, clock, &components)?;
        self.call(info, clock, op::UNLINK, dir, &[&name_arg(name)], 0)?;
        Ok(())
    }

    /// The names in the directory at `path`.
    pub fn list(
        &mut self,
        info: &BootInfo,
        clock: &Clock,
        path: &str,
    ) -> Result<Vec<String>, Errno> {
        let components = path_components(path)?;
        self.session(info, clock)?;
        let (node, mode) = self.walk(info, clock, &components)?;
        if mode & S_IFMT != S_IFDIR {
            return Err(Errno(ENOTDIR));
        }
        let fh = self.open(info, clock, op::OPENDIR, node, O_RDONLY)?;
        let result = (|| {
            let mut names = Vec::new();
            let mut offset = 0;
            loop {
                let read_in = Self::io_in(fh, offset, 4096);
                let out = self.call(info, clock, op::READDIR, node, &[&read_in], 4096)?;
                match parse_dirents(&out, &mut names)? {
                    Some(next) => offset = next,
                    None => break,
                }
            }
            Ok(names)
        })();
        self.release(info, clock, op::RELEASEDIR, node, fh);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirent(ino: u64, off: u64, name: &str) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&ino.to_le_bytes());
        v.extend_from_slice(&off.to_le_bytes());
        v.extend_from_slice(&(name.len() as u32).to_le_bytes());
        v.extend_from_slice(&8u32.to_le_bytes());
        v.extend_from_slice(name.as_bytes());
        while v.len() % 8 != 0 {
            v.push(0);
        }
        v
    }

    #[test]
    fn dirents_are_parsed_and_dots_skipped() {
        let mut buf = dirent(1, 1, ".");
        buf.extend(dirent(1, 2, ".."));
        buf.extend(dirent(5, 3, "a-long-file-name"));
        buf.extend(dirent(6, 4, "b"));
        let mut names = Vec::new();
        assert_eq!(parse_dirents(&buf, &mut names), Ok(Some(4)));
        assert_eq!(names, ["a-long-file-name", "b"]);
        assert_eq!(parse_dirents(&[], &mut names), Ok(None));
        // A name running past the end is a bad reply, not a panic.
        let mut bad = dirent(7, 5, "xyz");
        bad[16] = 200;
        assert_eq!(parse_dirents(&bad, &mut names), Err(Errno(EIO)));
    }

    #[test]
    fn paths_are_relative_and_stay_inside() {
        assert_eq!(path_components("a//b/./c").unwrap(), ["a", "b", "c"]);
        assert!(path_components("").unwrap().is_empty());
        assert_eq!(path_components("a/../b"), Err(Errno(EINVAL)));
    }
}
