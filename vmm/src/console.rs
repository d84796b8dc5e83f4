//! Console sinks: where serial output goes, and a tap that lets the host wait
//! for a line from the guest (with a deadline, never a sleep).

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Lines seen so far, shared between the tap (writer) and waiters.
#[derive(Default)]
struct Seen {
    lines: Vec<String>,
    partial: Vec<u8>,
}

/// Receives complete console lines; cheap to clone.
#[derive(Clone, Default)]
pub struct ConsoleLines {
    inner: Arc<(Mutex<Seen>, Condvar)>,
}

impl ConsoleLines {
    /// A new, empty line log.
    pub fn new() -> Self {
        Self::default()
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
            while checked < seen.lines.len() {
                if pred(&seen.lines[checked]) {
                    return Some((checked, seen.lines[checked].clone()));
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

    /// All complete lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.inner
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lines
            .clone()
    }

    /// Number of complete lines so far.
    pub fn len(&self) -> usize {
        self.inner
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lines
            .len()
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
                seen.lines.push(line);
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
}
