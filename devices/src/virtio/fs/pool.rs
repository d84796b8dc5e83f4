//! Pre-started virtiofsd daemons: starting one costs 15-30 ms on the
//! project's hosts, several times a clone's whole restore-to-ready, so a
//! runtime keeps a few running on empty per-sandbox directories and hands one
//! to each new clone. The new owner fills the directory (copies, or
//! bind-mounts a container's rootfs into it through
//! [`PooledDaemon::shared_dir`]) before its guest mounts the share, which the
//! guest does after the clone is ready. Each slot directory is prepared as a
//! [`SharedDir`] before its daemon starts, since a daemon in its own mount
//! namespace sees a later bind mount only through propagation.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::mpsc;

use super::daemon::{DaemonError, Virtiofsd, VirtiofsdConfig};
use super::subshare::SharedDir;

/// A daemon from the pool, serving its own directory.
pub struct PooledDaemon {
    /// The running daemon (dropping it stops it).
    pub daemon: Virtiofsd,
    /// The directory it shares (empty when handed out).
    pub dir: PathBuf,
    /// Its unexpected exit, if it happens.
    pub exits: mpsc::Receiver<ExitStatus>,
    /// `dir`, ready for extra directories; `None` only while dropping.
    shared: Option<SharedDir>,
}

impl PooledDaemon {
    /// The daemon's directory, to bind-mount host directories into while
    /// the daemon runs ([`SharedDir::add_dir`]); they are unmounted when
    /// this is dropped.
    pub fn shared_dir(&mut self) -> &mut SharedDir {
        self.shared
            .as_mut()
            .expect("the shared directory lives until the drop")
    }
}

impl Drop for PooledDaemon {
    fn drop(&mut self) {
        // Unmount what the owner added (and the slot's own bind mount)
        // first; then only an empty directory is removed, so nothing is
        // ever deleted through a mount.
        drop(self.shared.take());
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Daemons started ahead, each on its own directory under `root`.
pub struct VirtiofsdPool {
    name: String,
    root: PathBuf,
    base: VirtiofsdConfig,
    ready: Vec<PooledDaemon>,
    next_slot: u64,
}

impl VirtiofsdPool {
    /// An empty pool whose daemons run like `base` (its `shared_dir` and
    /// `socket_path` are replaced per slot), with slots under `root`.
    pub fn new(name: &str, root: &Path, base: VirtiofsdConfig) -> VirtiofsdPool {
        VirtiofsdPool {
            name: name.to_owned(),
            root: root.to_path_buf(),
            base,
            ready: Vec::new(),
            next_slot: 0,
        }
    }

    /// Daemons ready to hand out.
    pub fn len(&self) -> usize {
        self.ready.len()
    }

    /// Whether none is ready.
    pub fn is_empty(&self) -> bool {
        self.ready.is_empty()
    }

    /// Start daemons until `n` are ready (dead ones are dropped first).
    pub fn fill(&mut self, n: usize) -> Result<(), DaemonError> {
        self.ready.retain(|d| d.exits.try_recv().is_err());
        while self.ready.len() < n {
            let slot = self.next_slot;
            self.next_slot += 1;
            let dir = self.root.join(format!("slot-{slot}"));
            std::fs::create_dir_all(&dir).map_err(|source| DaemonError::Io {
                what: "creating a pool directory",
                source,
            })?;
            let shared = match SharedDir::new(&format!("{}-{slot}", self.name), &dir) {
                Ok(s) => s,
                Err(e) => {
                    let _ = std::fs::remove_dir(&dir);
                    return Err(e.into());
                }
            };
            let mut config = self.base.clone();
            config.shared_dir = dir.clone();
            config.socket_path = self.root.join(format!("slot-{slot}.sock"));
            let (tx, exits) = mpsc::channel();
            let started = Virtiofsd::start(
                &format!("{}-{slot}", self.name),
                &config,
                Box::new(move |s| {
                    let _ = tx.send(s);
                }),
            );
            match started {
                Ok(daemon) => self.ready.push(PooledDaemon {
                    daemon,
                    dir,
                    exits,
                    shared: Some(shared),
                }),
                Err(e) => {
                    drop(shared);
                    let _ = std::fs::remove_dir(&dir);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// A ready daemon, if there is a live one.
    pub fn take(&mut self) -> Option<PooledDaemon> {
        while let Some(d) = self.ready.pop() {
            if d.exits.try_recv().is_err() {
                return Some(d);
            }
        }
        None
    }
}
