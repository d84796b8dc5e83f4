//! The thread a VM's virtio devices do their work on: an event-manager loop
//! over every device's queue-notify and host-side fds, so that queue
//! processing never runs on a vCPU thread.
//!
//! The loop can be paused: a paused loop sits parked between two events, so
//! no queue moves and no guest memory changes until it is resumed or stopped
//! (a VM snapshot relies on that). Stopping and pausing are bounded waits: a
//! stuck device is reported, never waited on forever.

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// What the loop dispatches to: a device (or anything else) behind a mutex,
/// shared with whoever else drives it (e.g. its transport on a vCPU thread).
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Errors creating or starting the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// The event manager (its epoll fd) could not be created.
    #[error("creating the event manager: {0}")]
    Manager(#[source] event_manager::Error),
    /// The stop event fd could not be created or cloned.
    #[error("creating the stop event fd: {0}")]
    StopEvent(#[source] std::io::Error),
    /// The thread could not be spawned.
    #[error("spawning the event loop thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// The loop did not reach a quiet point in time (a device is stuck).
    #[error("the virtio event loop did not pause within {0:?}")]
    PauseTimeout(Duration),
    /// The loop is not running any more.
    #[error("the virtio event loop has stopped")]
    Stopped,
}

/// What the owner wants the loop thread to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Run,
    Pause,
    Stop,
}

struct ControlState {
    target: Target,
    /// The loop thread is parked by a pause.
    parked: bool,
    /// The loop thread has left its loop.
    finished: bool,
}

/// Shared between the handle and the loop thread.
struct Control {
    state: Mutex<ControlState>,
    changed: Condvar,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An event loop being assembled: add every subscriber, then [`start`](Self::start) it.
pub struct EventLoop {
    manager: EventManager<Subscriber>,
    stop: EventFd,
}

impl EventLoop {
    /// An empty loop.
    pub fn new() -> Result<Self, EventLoopError> {
        Ok(EventLoop {
            manager: EventManager::new().map_err(EventLoopError::Manager)?,
            stop: EventFd::new(libc::EFD_NONBLOCK).map_err(EventLoopError::StopEvent)?,
        })
    }

    /// Register `subscriber`; its `init` runs now and registers its fds.
    pub fn add_subscriber(&mut self, subscriber: Subscriber) {
        self.manager.add_subscriber(subscriber);
    }

    /// Spawn the loop thread (named after `name`, e.g. the VM id). The loop
    /// runs until the returned handle is stopped or dropped. `on_start` runs
    /// first on the new thread, before any device event (e.g. to install the
    /// thread's seccomp filter); if it fails the thread ends at once.
    pub fn start_with(
        mut self,
        name: &str,
        on_start: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> Result<EventLoopHandle, EventLoopError> {
        let control = Arc::new(Control {
            state: Mutex::new(ControlState {
                target: Target::Run,
                parked: false,
                finished: false,
            }),
            changed: Condvar::new(),
        });
        let subscriber = ControlSubscriber {
            evt: self.stop.try_clone().map_err(EventLoopError::StopEvent)?,
            control: control.clone(),
        };
        self.manager
            .add_subscriber(Arc::new(Mutex::new(subscriber)));
        let mut manager = self.manager;
        let loop_name = name.to_owned();
        let thread_control = control.clone();
        let (done_tx, done) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("virtio-{name}"))
            .spawn(move || {
                // Dropped when the thread ends: the handle's bounded join waits on it.
                let _done = done_tx;
                if let Err(e) = on_start() {
                    tracing::error!(vm = %loop_name, "virtio event loop not started: {e}");
                } else {
                    while thread_control.lock().target != Target::Stop {
                        // Ok(0) is an interrupted wait: just wait again.
                        if let Err(e) = manager.run() {
                            tracing::error!(vm = %loop_name, "virtio event loop stopped: {e}");
                            break;
                        }
                    }
                }
                thread_control.lock().finished = true;
                thread_control.changed.notify_all();
            })
            .map_err(EventLoopError::Spawn)?;
        Ok(EventLoopHandle {
            stop: self.stop,
            control,
            done,
            thread: Some(thread),
        })
    }

    /// [`start_with`](Self::start_with) with nothing to run first.
    pub fn start(self, name: &str) -> Result<EventLoopHandle, EventLoopError> {
        self.start_with(name, || Ok(()))
    }
}

/// How long stopping an event loop waits for its thread before reporting it stuck.
pub const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// A running event loop. Dropping it stops the thread and waits for it (with
/// a deadline).
pub struct EventLoopHandle {
    stop: EventFd,
    control: Arc<Control>,
    done: mpsc::Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoopHandle {
    /// Park the loop between two events and return once it is parked (or
    /// `timeout` passes): until [`resume`](Self::resume) or stop, no device
    /// runs, so no queue moves and guest memory is not written.
    pub fn pause(&self, timeout: Duration) -> Result<(), EventLoopError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.control.lock();
        if st.finished || st.target == Target::Stop {
            return Err(EventLoopError::Stopped);
        }
        st.target = Target::Pause;
        self.stop.write(1).map_err(EventLoopError::StopEvent)?;
        while !st.parked {
            if st.finished {
                return Err(EventLoopError::Stopped);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(EventLoopError::PauseTimeout(timeout));
            }
            st = self
                .control
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Whether the loop is parked by a pause (or has ended): no device runs.
    pub fn is_quiet(&self) -> bool {
        let st = self.control.lock();
        st.parked || st.finished
    }

    /// Let a paused loop run again.
    pub fn resume(&self) {
        let mut st = self.control.lock();
        if st.target == Target::Pause {
            st.target = Target::Run;
            self.control.changed.notify_all();
        }
    }

    /// Stop the loop and wait (up to [`STOP_DEADLINE`]) for its thread to
    /// finish its current event. Returns false (and logs) if it is stuck.
    pub fn stop(mut self) -> bool {
        self.shutdown()
    }

    fn shutdown(&mut self) -> bool {
        let Some(thread) = self.thread.take() else {
            return true;
        };
        {
            let mut st = self.control.lock();
            st.target = Target::Stop;
            self.control.changed.notify_all();
        }
        if let Err(e) = self.stop.write(1) {
            tracing::error!("stopping the virtio event loop: {e}");
        }
        match self.done.recv_timeout(STOP_DEADLINE) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::error!(
                    thread = ?thread.thread().name(),
                    "the virtio event loop did not stop within {STOP_DEADLINE:?}; leaving it behind"
                );
                false
            }
            _ => {
                if thread.join().is_err() {
                    tracing::error!("the virtio event loop thread panicked");
                }
                true
            }
        }
    }
}

impl Drop for EventLoopHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Parks the loop on a pause and ends it on a stop, when its event fd is written.
struct ControlSubscriber {
    evt: EventFd,
    control: Arc<Control>,
}

impl MutEventSubscriber for ControlSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        super::drain_event(&self.evt);
        let mut st = self.control.lock();
        // Parking here, inside the dispatch, holds every other subscriber:
        // events that arrive meanwhile stay in the epoll set until resume.
        while st.target == Target::Pause {
            if !st.parked {
                st.parked = true;
                self.control.changed.notify_all();
            }
            st = self
                .control
                .changed
                .wait(st)
                .unwrap_or_else(|p| p.into_inner());
        }
        st.parked = false;
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            tracing::error!("registering the event loop control fd: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::wait_readable;
    use std::time::Duration;

    struct Echo {
        input: EventFd,
        output: EventFd,
    }

    impl MutEventSubscriber for Echo {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let n = self.input.read().unwrap();
            self.output.write(n).unwrap();
        }

        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.input, EventSet::IN)).unwrap();
        }
    }

    #[test]
    fn subscribers_run_on_the_loop_thread_until_stopped() {
        let input = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let output = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut el = EventLoop::new().unwrap();
        el.add_subscriber(Arc::new(Mutex::new(Echo {
            input: input.try_clone().unwrap(),
            output: output.try_clone().unwrap(),
        })));
        let handle = el.start("test").unwrap();
        input.write(3).unwrap();
        assert!(wait_readable(&output, Duration::from_secs(5)));
        assert_eq!(output.read().unwrap(), 3);
        assert!(handle.stop());
        // After stop, nothing processes the input any more.
        input.write(1).unwrap();
        assert_eq!(input.read().unwrap(), 1);
    }

    #[test]
    fn a_paused_loop_runs_no_subscriber_until_resumed() {
        let input = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let output = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut el = EventLoop::new().unwrap();
        el.add_subscriber(Arc::new(Mutex::new(Echo {
            input: input.try_clone().unwrap(),
            output: output.try_clone().unwrap(),
        })));
        let handle = el.start("test").unwrap();
        handle.pause(Duration::from_secs(5)).unwrap();
        assert!(handle.is_quiet());
        input.write(7).unwrap();
        // Held: the event is still pending after a generous wait.
        assert!(!wait_readable(&output, Duration::from_millis(500)));
        handle.resume();
        assert!(wait_readable(&output, Duration::from_secs(5)));
        assert_eq!(output.read().unwrap(), 7);
        // Stop also ends a paused loop.
        handle.pause(Duration::from_secs(5)).unwrap();
        assert!(handle.stop());
    }
}
