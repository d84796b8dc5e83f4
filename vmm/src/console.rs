//! Console sinks: where serial output goes, a tap that lets the host wait
//! for a line from the guest (with a deadline, never a sleep), and a writer
//! that moves output off the vCPU thread.
//!
//! Everything here is fed by an untrusted guest, so every buffer is capped:
//! the tap keeps the last N lines (and counts the ones it dropped), and the
//! off-thread writer drops bytes rather than grow or block when its sink stalls.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Lines a [`ConsoleLines`] keeps by default (older ones are dropped).
pub const DEFAULT_MAX_LINES: usize = 1024;

/// Lines seen so far, shared between the tap (writer) and waiters.
struct Seen {
    /// The retained lines; `lines[0]` has absolute index `dropped`.
    lines: VecDeque<String>,
    /// Lines dropped from the front of the ring (also the absolute index of `lines[0]`).
    dropped: usize,
    /// Most lines kept.
    max_lines: usize,
    partial: Vec<u8>,
}

impl Seen {
    fn push(&mut self, line: String) {
        if self.lines.len() >= self.max_lines {
            self.lines.pop_front();
            self.dropped += 1;
        }
        self.lines.push_back(line);
    }

    fn total(&self) -> usize {
        self.dropped + self.lines.len()
    }
}

/// Receives complete console lines into a capped ring; cheap to clone.
///
/// Line indices are absolute (counted from the first line the guest ever
/// printed), so a waiter's position survives lines leaving the ring.
#[derive(Clone)]
pub struct ConsoleLines {
    inner: Arc<(Mutex<Seen>, Condvar)>,
}

impl Default for ConsoleLines {
    fn default() -> Self {
        Self::with_max_lines(DEFAULT_MAX_LINES)
    }
}

impl ConsoleLines {
    /// A new, empty line log keeping the last [`DEFAULT_MAX_LINES`] lines.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new, empty line log keeping the last `max_lines` lines (at least 1).
    pub fn with_max_lines(max_lines: usize) -> Self {
        ConsoleLines {
            inner: Arc::new((
                Mutex::new(Seen {
                    lines: VecDeque::new(),
                    dropped: 0,
                    max_lines: max_lines.max(1),
                    partial: Vec::new(),
                }),
                Condvar::new(),
            )),
        }
    }

    /// A writer that records lines here and forwards every byte to `forward`.
    pub fn tap(&self, forward: Box<dyn Write + Send>) -> ConsoleTap {
        ConsoleTap {
            lines: self.clone(),
            forward,
        }
    }

    /// Wait until a line containing `needle` has been seen (at or after line
    /// index `from`), or `timeout` passes. Returns the line's index and text.
    pub fn wait_for(
        &self,
        needle: &str,
        from: usize,
        timeout: Duration,
    ) -> Option<(usize, String)> {
        self.wait_until(from, timeout, |l| l.contains(needle))
    }

    /// Wait for the first line at or after `from` matching `pred`.
    pub fn wait_until(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<(usize, String)> {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.inner;
        let mut seen = lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut checked = from;
        loop {
            checked = checked.max(seen.dropped);
            while checked < seen.total() {
                let line = &seen.lines[checked - seen.dropped];
                if pred(line) {
                    return Some((checked, line.clone()));
                }
                checked += 1;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            seen = cond
                .wait_timeout(seen, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.inner.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The complete lines still in the ring (the last ones the guest printed).
    pub fn lines(&self) -> Vec<String> {
        self.seen().lines.iter().cloned().collect()
    }

    /// Number of complete lines seen so far, dropped ones included.
    pub fn len(&self) -> usize {
        self.seen().total()
    }

    /// Number of lines dropped from the ring to keep it within its cap.
    pub fn dropped(&self) -> usize {
        self.seen().dropped
    }

    /// Bytes of line text the ring holds now (bounded by the cap times the
    /// longest line).
    pub fn retained_bytes(&self) -> usize {
        let seen = self.seen();
        seen.lines.iter().map(String::len).sum::<usize>() + seen.partial.len()
    }

    /// Whether no complete line has been seen.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The writer half: give it to the serial device.
pub struct ConsoleTap {
    lines: ConsoleLines,
    forward: Box<dyn Write + Send>,
}

/// Longest line we keep; longer guest output is split (the guest is untrusted).
const MAX_LINE: usize = 4096;

impl Write for ConsoleTap {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (lock, cond) = &*self.lines.inner;
        let mut seen = lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut new_line = false;
        for &b in buf {
            if b == b'\n' || seen.partial.len() >= MAX_LINE {
                let line = String::from_utf8_lossy(&seen.partial)
                    .trim_end_matches('\r')
                    .to_string();
                seen.partial.clear();
                seen.push(line);
                new_line = true;
                if b == b'\n' {
                    continue;
                }
            }
            seen.partial.push(b);
        }
        drop(seen);
        if new_line {
            cond.notify_all();
        }
        self.forward.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.forward.flush()
    }
}

/// Bytes an [`OffThreadWriter`] holds for a slow sink before it drops output.
pub const OFF_THREAD_BUFFER: usize = 1 << 20;
/// How long dropping an [`OffThreadWriter`] waits for its sink to take the
/// remaining bytes before it gives up on them.
pub const OFF_THREAD_DRAIN_DEADLINE: Duration = Duration::from_secs(2);

struct Pending {
    buf: Vec<u8>,
    closed: bool,
}

/// A writer for the serial device that never blocks its caller (a vCPU
/// thread): bytes go into a capped buffer that a thread of its own writes
/// to the real sink (stdout, a file). When the sink stalls and the buffer is
/// full, new output is dropped and counted instead of stopping the guest.
pub struct OffThreadWriter {
    shared: Arc<(Mutex<Pending>, Condvar)>,
    capacity: usize,
    dropped: Arc<AtomicU64>,
    done: mpsc::Receiver<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OffThreadWriter {
    /// Start a writer thread (named `console-<name>`) feeding `sink`, with
    /// room for `capacity` pending bytes.
    pub fn new(name: &str, mut sink: Box<dyn Write + Send>, capacity: usize) -> io::Result<Self> {
        let shared = Arc::new((
            Mutex::new(Pending {
                buf: Vec::new(),
                closed: false,
            }),
            Condvar::new(),
        ));
        let (done_tx, done) = mpsc::channel::<()>();
        let thread_shared = shared.clone();
        let thread_name = name.to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("console-{name}"))
            .spawn(move || {
                // Dropped when the thread ends: tells `drop` we are done.
                let _done = done_tx;
                // Guest output flows through here: confine it like a device thread.
                if let Err(e) =
                    crate::seccomp::install_if_enabled(crate::seccomp::ThreadKind::DeviceLoop)
                {
                    tracing::error!(vm = %thread_name, "console output thread: {e}");
                    return;
                }
                let (lock, cond) = &*thread_shared;
                let mut failed = false;
                loop {
                    let chunk = {
                        let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
                        while p.buf.is_empty() && !p.closed {
                            p = cond.wait(p).unwrap_or_else(|e| e.into_inner());
                        }
                        if p.buf.is_empty() {
                            break;
                        }
                        std::mem::take(&mut p.buf)
                    };
                    if failed {
                        continue;
                    }
                    if let Err(e) = sink.write_all(&chunk).and_then(|()| sink.flush()) {
                        // Keep draining so the guest side never blocks; say it once.
                        tracing::warn!(vm = %thread_name, "console output lost: {e}");
                        failed = true;
                    }
                }
            })?;
        Ok(OffThreadWriter {
            shared,
            capacity,
            dropped: Arc::new(AtomicU64::new(0)),
            done,
            thread: Some(thread),
        })
    }

    /// A counter of the bytes dropped because the sink did not keep up.
    pub fn dropped_bytes(&self) -> Arc<AtomicU64> {
        self.dropped.clone()
    }
}

impl Write for OffThreadWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (lock, cond) = &*self.shared;
        let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
        let room = self.capacity.saturating_sub(p.buf.len());
        let take = room.min(buf.len());
        p.buf.extend_from_slice(&buf[..take]);
        drop(p);
        if take < buf.len() {
            self.dropped
                .fetch_add((buf.len() - take) as u64, Ordering::Relaxed);
        }
        if take > 0 {
            cond.notify_one();
        }
        Ok(buf.len())
    }

    /// Does not wait for the sink (that would block the vCPU).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for OffThreadWriter {
    fn drop(&mut self) {
        let (lock, cond) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        cond.notify_one();
        match self.done.recv_timeout(OFF_THREAD_DRAIN_DEADLINE) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(
                    "console sink did not take the last output within {OFF_THREAD_DRAIN_DEADLINE:?}; leaving its thread behind"
                );
            }
            _ => {
                if let Some(t) = self.thread.take() {
                    let _ = t.join();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_and_waitable() {
        let lines = ConsoleLines::new();
        let mut tap = lines.tap(Box::new(io::sink()));
        let waiter = lines.clone();
        let t = std::thread::spawn(move || waiter.wait_for("ready", 0, Duration::from_secs(10)));
        tap.write_all(b"boot\r\nguest re").unwrap();
        tap.write_all(b"ady now\npartial").unwrap();
        assert_eq!(t.join().unwrap(), Some((1, "guest ready now".to_string())));
        assert_eq!(lines.lines(), vec!["boot", "guest ready now"]);
        assert_eq!(lines.wait_for("partial", 0, Duration::from_millis(1)), None);
        tap.write_all(&vec![b'x'; MAX_LINE + 1]).unwrap();
        assert_eq!(lines.len(), 3);
    }

    #[test]
    fn the_ring_keeps_the_last_lines_and_counts_the_dropped_ones() {
        let lines = ConsoleLines::with_max_lines(3);
        let mut tap = lines.tap(Box::new(io::sink()));
        for i in 0..10 {
            writeln!(tap, "line {i}").unwrap();
        }
        assert_eq!(lines.len(), 10);
        assert_eq!(lines.dropped(), 7);
        assert_eq!(lines.lines(), vec!["line 7", "line 8", "line 9"]);
        // Absolute indices survive the drops; dropped lines are not found.
        assert_eq!(
            lines.wait_for("line 8", 0, Duration::ZERO),
            Some((8, "line 8".to_string()))
        );
        assert_eq!(lines.wait_for("line 2", 0, Duration::ZERO), None);
        assert_eq!(lines.retained_bytes(), 18);
    }

    /// A sink that blocks every write until the test lets it go.
    struct Stalled(Arc<(Mutex<bool>, Condvar)>, Arc<Mutex<Vec<u8>>>);

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (lock, cond) = &*self.0;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cond.wait(open).unwrap();
            }
            self.1.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_sink_never_blocks_the_writer_and_bounds_its_buffer() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let mut w =
            OffThreadWriter::new("test", Box::new(Stalled(gate.clone(), got.clone())), 1000)
                .unwrap();
        let dropped = w.dropped_bytes();
        // The guest side writes far more than the buffer holds while the sink
        // is stuck: every write returns (on another thread, checked with a
        // deadline, so a blocking writer fails instead of hanging the test).
        let (tx, rx) = mpsc::channel();
        let writer = std::thread::spawn(move || {
            for _ in 0..100 {
                w.write_all(&[b'x'; 100]).unwrap();
            }
            tx.send(()).unwrap();
            w
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a stalled console blocked the writer");
        let w = writer.join().unwrap();
        // At most the buffer plus the one chunk the sink is stuck on were kept.
        assert!(dropped.load(Ordering::Relaxed) >= 10_000 - 2 * 1000);
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        drop(w);
        let kept = got.lock().unwrap().len() as u64;
        assert_eq!(kept + dropped.load(Ordering::Relaxed), 10_000);
    }
}
