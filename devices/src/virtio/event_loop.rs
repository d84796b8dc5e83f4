//! The thread a VM's virtio devices do their work on: an event-manager loop
//! over every device's queue-notify and host-side fds, so that queue
//! processing never runs on a vCPU thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

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
    /// runs until the returned handle is stopped or dropped.
    pub fn start(mut self, name: &str) -> Result<EventLoopHandle, EventLoopError> {
        let stopped = Arc::new(AtomicBool::new(false));
        let stopper = StopSubscriber {
            evt: self.stop.try_clone().map_err(EventLoopError::StopEvent)?,
            stopped: stopped.clone(),
        };
        self.manager.add_subscriber(Arc::new(Mutex::new(stopper)));
        let mut manager = self.manager;
        let loop_name = name.to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("virtio-{name}"))
            .spawn(move || {
                while !stopped.load(Ordering::Acquire) {
                    // Ok(0) is an interrupted wait: just wait again.
                    if let Err(e) = manager.run() {
                        tracing::error!(vm = %loop_name, "virtio event loop stopped: {e}");
                        break;
                    }
                }
            })
            .map_err(EventLoopError::Spawn)?;
        Ok(EventLoopHandle {
            stop: self.stop,
            thread: Some(thread),
        })
    }
}

/// A running event loop. Dropping it stops the thread and waits for it.
pub struct EventLoopHandle {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl EventLoopHandle {
    /// Stop the loop and wait for its thread to finish its current event.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(e) = self.stop.write(1) {
                tracing::error!("stopping the virtio event loop: {e}");
                return;
            }
            if thread.join().is_err() {
                tracing::error!("the virtio event loop thread panicked");
            }
        }
    }
}

impl Drop for EventLoopHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Ends the loop when its event fd is written.
struct StopSubscriber {
    evt: EventFd,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        super::drain_event(&self.evt);
        self.stopped.store(true, Ordering::Release);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            tracing::error!("registering the event loop stop fd: {e}");
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
        handle.stop();
        // After stop, nothing processes the input any more.
        input.write(1).unwrap();
        assert_eq!(input.read().unwrap(), 1);
    }
}
