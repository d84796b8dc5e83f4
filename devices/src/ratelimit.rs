//! Rate-limited warnings: what a guest can trigger at will (bad rings,
//! connection floods) must not flood the host's log. Each call site of
//! [`warn_limited!`](crate::warn_limited) logs at most [`BURST`] lines per
//! [`PERIOD`], then says how many it suppressed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines one call site may log per period.
pub const BURST: u32 = 10;
/// The period.
pub const PERIOD: Duration = Duration::from_secs(1);

struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

/// The state of one call site.
pub struct LogLimiter {
    window: Mutex<Option<Window>>,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl LogLimiter {
    /// A limiter that has logged nothing yet.
    pub const fn new() -> Self {
        LogLimiter {
            window: Mutex::new(None),
        }
    }

    /// Whether to log now: Some(lines suppressed since the last logged one), or None.
    pub fn admit(&self) -> Option<u64> {
        let now = Instant::now();
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        match w.as_mut() {
            Some(win) if now.saturating_duration_since(win.start) < PERIOD => {
                if win.logged < BURST {
                    win.logged += 1;
                    Some(0)
                } else {
                    win.suppressed += 1;
                    None
                }
            }
            _ => {
                let suppressed = w.as_ref().map_or(0, |win| win.suppressed);
                *w = Some(Window {
                    start: now,
                    logged: 1,
                    suppressed: 0,
                });
                Some(suppressed)
            }
        }
    }
}

/// `tracing::warn!` limited per call site (see the module doc); the first
/// line after a suppression carries a `suppressed` count.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMITER: $crate::ratelimit::LogLimiter = $crate::ratelimit::LogLimiter::new();
        if let Some(suppressed) = LIMITER.admit() {
            if suppressed > 0 {
                tracing::warn!(suppressed, $($arg)+);
            } else {
                tracing::warn!($($arg)+);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_the_burst_per_period() {
        let l = LogLimiter::new();
        let start = Instant::now();
        let admitted = (0..1000).filter(|_| l.admit().is_some()).count() as u64;
        // A slow machine may roll into further periods; never more than the
        // burst per period begun.
        let periods = start.elapsed().as_secs() / PERIOD.as_secs() + 1;
        assert!(admitted >= 1);
        assert!(admitted <= u64::from(BURST) * periods, "{admitted} lines");
    }
}
