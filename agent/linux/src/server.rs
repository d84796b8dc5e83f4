//! Serves the agent protocol: one thread per accepted connection, at most
//! [`MAX_CONNECTIONS`] at once, over any [`Listener`].
//!
//! QuiesceForSnapshot: after its reply is written, every open connection is
//! shut down (so a snapshot holds no connection), while the listener stays:
//! a restored clone accepts at once. The guest kernel's vsock transport
//! resets connected sockets on the transport-reset event after a restore;
//! listening sockets survive it.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use agent_protocol::Dispatcher;

use crate::service::{Agent, Session};

/// Most connections served at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 32;
/// Most bytes of an incomplete request a connection may hold.
pub const MAX_BUFFERED: usize = 64 * 1024;
const READ_CHUNK: usize = 16 * 1024;

/// Something that hands out connected streams.
pub trait Listener: Send + 'static {
    /// A connected stream.
    type Stream: Read + Write + AsRawFd + Send + 'static;
    /// Waits for the next connection.
    fn accept_stream(&mut self) -> io::Result<Self::Stream>;
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    fn accept_stream(&mut self) -> io::Result<UnixStream> {
        self.accept().map(|(s, _)| s)
    }
}

/// The server: the agent plus the set of open connections.
#[derive(Debug)]
pub struct Server {
    agent: Agent,
    /// Open connections by id; a connection removes itself (under this
    /// lock) before its fd is closed, so a shutdown never hits a reused fd.
    open: Mutex<BTreeMap<u64, RawFd>>,
    next_id: AtomicU64,
    active: AtomicUsize,
}

/// Ends the connection's registration when its thread leaves, however.
struct Registration<'a> {
    server: &'a Server,
    id: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.server
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        self.server.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Server {
    /// A server for `agent`.
    pub fn new(agent: Agent) -> Arc<Server> {
        Arc::new(Server {
            agent,
            open: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
            active: AtomicUsize::new(0),
        })
    }

    /// Connections being served now.
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Accepts connections forever, each on its own thread. Returns only
    /// when accepting fails with an error other than an interrupted or
    /// aborted connection (the caller may then make a new listener).
    pub fn serve<L: Listener>(self: &Arc<Self>, listener: &mut L) -> io::Error {
        loop {
            let stream = match listener.accept_stream() {
                Ok(s) => s,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(e) => return e,
            };
            if self.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                self.active.fetch_sub(1, Ordering::SeqCst);
                drop(stream);
                continue;
            }
            let id = self.next_id.fetch_add(1, Ordering::SeqCst);
            self.open
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, stream.as_raw_fd());
            let server = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name(format!("agent-conn-{id}"))
                .spawn(move || {
                    let registration = Registration {
                        server: &server,
                        id,
                    };
                    server.serve_connection(id, stream);
                    drop(registration);
                });
            if spawned.is_err() {
                // The closure (and with it the stream and the registration
                // cleanup) is gone: undo the bookkeeping here.
                self.open
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                self.active.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Serves requests on one stream until the peer closes it, the byte
    /// stream is unusable, or a QuiesceForSnapshot was answered.
    fn serve_connection<S: Read + Write>(&self, id: u64, mut stream: S) {
        let mut dispatcher = Dispatcher::new();
        let mut buf = vec![0u8; READ_CHUNK];
        let mut out = Vec::new();
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            out.clear();
            let mut session = Session::new(&self.agent);
            let usable = dispatcher.handle_bytes(&mut session, &buf[..n], &mut out);
            if session.quiesce_requested() {
                // The others first: once the host has the reply, no other
                // connection can still be served.
                self.shut_down_all_except(id);
                let _ = stream.write_all(&out);
                return;
            }
            if stream.write_all(&out).is_err() {
                return;
            }
            if usable.is_err() || dispatcher.buffered() > MAX_BUFFERED {
                return;
            }
        }
    }

    /// Shuts down every open connection but `keep` (their threads then end
    /// and close them); the listener is untouched.
    fn shut_down_all_except(&self, keep: u64) {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        for (_, &fd) in open.iter().filter(|(&id, _)| id != keep) {
            // SAFETY: fd is registered, so its stream is still open: the
            // owner deregisters under this lock before closing it.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }
}
