//! AF_VSOCK stream listener (std has none).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::server::Listener;

/// A listening AF_VSOCK stream socket bound to any CID.
#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
    port: u32,
}

impl VsockListener {
    /// Binds `VMADDR_CID_ANY:port` and listens. Needs the vsock module
    /// loaded (else EAFNOSUPPORT); the virtio transport may come later.
    pub fn bind(port: u32) -> io::Result<VsockListener> {
        // SAFETY: plain socket(2); the result is checked.
        let raw =
            unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an all-zero sockaddr_vm is valid; fields are set below.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        // SAFETY: addr is a sockaddr_vm of the length passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: listen on our own bound socket.
        if unsafe { libc::listen(fd.as_raw_fd(), 64) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(VsockListener { fd, port })
    }

    /// The port listened on.
    pub fn port(&self) -> u32 {
        self.port
    }
}

impl Listener for VsockListener {
    /// A socket read and written with read(2)/write(2), which is what
    /// `File`'s Read and Write do.
    type Stream = File;

    fn accept_stream(&mut self) -> io::Result<File> {
        // SAFETY: accept4 on our listening socket without a peer address.
        let raw = unsafe {
            libc::accept4(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a freshly accepted fd that nothing else owns.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(raw) }))
    }
}
