//! The cache factory: keeps N ready VMs, built in a background thread by a
//! source factory, and refills after every take. A failing build is retried
//! with backoff and its error reported in the status; a take from an empty
//! cache is served on the caller's thread by the fallback factory, so an
//! unusable template never makes a caller hang.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::ready::{grow_steps, Machine, ReadyVm, Step, VmSource};
use crate::request::check_config;
use crate::{Factory, FactoryError, VmRequest};

/// First wait after a failed build; doubles per failure up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between failed builds.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A snapshot of a cache factory's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheStatus {
    /// How many ready VMs it keeps.
    pub capacity: usize,
    /// Ready VMs now.
    pub ready: usize,
    /// VMs built so far.
    pub built: u64,
    /// VMs taken so far.
    pub taken: u64,
    /// Builds that failed so far.
    pub failures: u64,
    /// The last build's error, cleared by the next successful build.
    pub last_error: Option<String>,
    /// Closed: builds stopped, VMs stopped.
    pub closed: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

struct State {
    ready: VecDeque<ReadyVm>,
    status: CacheStatus,
}

/// Keeps `capacity` VMs of one base request ready.
pub struct CacheFactory {
    shared: Arc<Shared>,
    base: VmRequest,
    fallback: Arc<dyn Factory>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl CacheFactory {
    /// Start filling a cache of `capacity` VMs of `base`, built by `source`
    /// (e.g. a template factory with `no_fallback`, so a broken template is
    /// reported instead of hidden); requests the cache cannot serve go to
    /// `fallback`.
    pub fn new(
        source: Arc<dyn Factory>,
        fallback: Arc<dyn Factory>,
        base: VmRequest,
        capacity: usize,
    ) -> CacheFactory {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                ready: VecDeque::new(),
                status: CacheStatus {
                    capacity,
                    ..CacheStatus::default()
                },
            }),
            changed: Condvar::new(),
        });
        let worker = {
            let shared = shared.clone();
            let base = base.clone();
            std::thread::Builder::new()
                .name("vm-cache".into())
                .spawn(move || fill(&shared, source.as_ref(), &base))
                .ok()
        };
        if worker.is_none() {
            let mut s = lock(&shared);
            s.status.last_error = Some("cannot spawn the cache thread".into());
        }
        CacheFactory {
            shared,
            base,
            fallback,
            worker: Mutex::new(worker),
        }
    }

    /// The current state.
    pub fn status(&self) -> CacheStatus {
        lock(&self.shared).status.clone()
    }

    /// Wait until `pred` holds for the status (woken by every change), at
    /// most `deadline`; returns the last status seen and whether it held.
    pub fn wait_status(
        &self,
        deadline: Duration,
        pred: impl Fn(&CacheStatus) -> bool,
    ) -> (CacheStatus, bool) {
        let end = Instant::now() + deadline;
        let mut s = lock(&self.shared);
        loop {
            if pred(&s.status) {
                return (s.status.clone(), true);
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (s.status.clone(), false);
            }
            s = self
                .shared
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The background builder: keep the cache full until closed.
fn fill(shared: &Shared, source: &dyn Factory, base: &VmRequest) {
    let mut backoff = MIN_BACKOFF;
    loop {
        {
            let mut s = lock(shared);
            while !s.status.closed && s.ready.len() >= s.status.capacity {
                s = shared.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            if s.status.closed {
                return;
            }
        }
        let built = source.get_vm(base);
        let mut s = lock(shared);
        match built {
            Ok(vm) => {
                backoff = MIN_BACKOFF;
                s.status.built += 1;
                s.status.last_error = None;
                if s.status.closed {
                    // Dropped outside the lock below: stopping a VM takes time.
                    drop(s);
                    drop(vm);
                    return;
                }
                s.ready.push_back(vm);
                s.status.ready = s.ready.len();
                shared.changed.notify_all();
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cache: building a VM failed");
                s.status.failures += 1;
                s.status.last_error = Some(e.to_string());
                shared.changed.notify_all();
                // Back off, but wake at once on close.
                let end = Instant::now() + backoff;
                while !s.status.closed {
                    let left = end.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    s = shared
                        .changed
                        .wait_timeout(s, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

impl Factory for CacheFactory {
    /// A cached VM when the request is the cache's base, or a bigger one a
    /// cached clone grows into, and one is ready; otherwise the fallback
    /// factory on the caller's thread. Requests naming their own VM id or
    /// vsock path go to the fallback too: cached VMs already have theirs.
    fn get_vm(&self, request: &VmRequest) -> Result<ReadyVm, FactoryError> {
        let t0 = Instant::now();
        let growth = match check_config(self.base.config(), request.config()) {
            Ok(g) if request.id.is_none() && request.vsock.is_none() => Some(g),
            _ => None,
        };
        if let Some(growth) = growth {
            let mut s = lock(&self.shared);
            if s.status.closed {
                return Err(FactoryError::Closed);
            }
            // Only a clone can grow memory (its template has the virtio-mem region).
            let growable =
                |vm: &ReadyVm| growth.is_none() || matches!(vm.machine, Machine::Clone(_));
            if let Some(i) = s.ready.iter().position(growable) {
                let mut vm = s.ready.remove(i).expect("index from position");
                s.status.ready = s.ready.len();
                s.status.taken += 1;
                self.shared.changed.notify_all();
                drop(s);
                vm.source = VmSource::Cache;
                vm.steps = vec![Step {
                    name: "take",
                    took: t0.elapsed(),
                }];
                if let Machine::Clone(clone) = &mut vm.machine {
                    if !growth.is_none() {
                        let (vcpus, mem_mib) = (request.config().vcpus, request.config().mem_mib);
                        let g = clone.grow(vcpus, mem_mib).map_err(|e| FactoryError::Grow {
                            vcpus,
                            mem_mib,
                            source: Box::new(e),
                        })?;
                        vm.steps.extend(grow_steps(&g));
                    }
                }
                vm.total = t0.elapsed();
                return Ok(vm);
            }
        }
        self.fallback.get_vm(request)
    }

    /// Stop building, join the builder and stop every cached VM.
    fn close(&self) {
        let drained: Vec<ReadyVm> = {
            let mut s = lock(&self.shared);
            s.status.closed = true;
            s.status.ready = 0;
            self.shared.changed.notify_all();
            s.ready.drain(..).collect()
        };
        drop(drained);
        let worker = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = worker {
            let _ = w.join();
        }
    }
}

impl Drop for CacheFactory {
    fn drop(&mut self) {
        self.close();
    }
}
