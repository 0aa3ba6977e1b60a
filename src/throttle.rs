//! Rate-limited warnings: a condition a hostile or broken client can cause at will (timeouts, budget
//! refusals, accept failures) must show in the log, but must not let that client flood it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// How often one kind of line may be written.
const EVERY_MS: u64 = 1000;

/// Lets one line through per second and counts the ones it held back.
pub struct Throttle {
    /// When the last line was let through, in ms since the epoch.
    last_ms: AtomicU64,
    /// Lines held back since.
    held_back: AtomicU64,
}

impl Throttle {
    /// A throttle that lets the first line through.
    pub const fn new() -> Throttle {
        Throttle {
            last_ms: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be written now, `n` being how many were held back before it.
    pub fn allow(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= EVERY_MS
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.held_back.swap(0, Ordering::Relaxed));
        }
        self.held_back.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new()
    }
}

/// Writes a `warn!` line through `throttle`, adding how many similar lines were held back.
#[macro_export]
macro_rules! throttled_warn {
    ($throttle:expr, $($arg:tt)+) => {
        if let Some(held_back) = $throttle.allow() {
            tracing::warn!(held_back, $($arg)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_second_and_a_count_of_the_rest() {
        let t = Throttle::new();
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        t.last_ms.store(0, Ordering::Relaxed);
        assert_eq!(t.allow(), Some(2));
    }
}
