//! The request meter: requests per second and response-time percentiles over a sliding 60-second window,
//! per command and overall.
//!
//! The window is a ring of one-second slots. A request is recorded in the slot of the second it finished
//! in; a slot still holding an older second is cleared first. A snapshot merges the slots of the last 60
//! seconds, so the window slides a second at a time. Recording takes one slot's mutex for a few
//! nanoseconds; only the current slot is written, and snapshots are rare.

use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;

use scaled_client::proto::CommandName;

/// Length of the window, in one-second slots.
pub const WINDOW_SECS: u64 = 60;

/// Slots per command: one for each protocol command, and one for frames that named no known command.
const KINDS: usize = CommandName::ALL.len() + 1;

/// Longest response time a histogram tracks exactly, in microseconds (an hour); longer ones saturate.
const MAX_TRACKED_US: u64 = 3_600_000_000;

/// What STATS reports under `performance`, or under `performance.commands.NAME`. Times are in seconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct PerfStats {
    /// Requests finished in the window divided by the window's length.
    pub requests_per_second: f64,
    /// Mean response time in the window.
    pub avg_response_time: f64,
    /// Median response time in the window.
    pub p50_response_time: f64,
    /// 95th percentile response time in the window.
    pub p95_response_time: f64,
    /// 99th percentile response time in the window.
    pub p99_response_time: f64,
    /// Requests finished in the window (the seed's `total_requests`: requests in the last 60 seconds).
    pub total_requests: u64,
}

/// Everything the meter reports.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct MeterSnapshot {
    /// All commands together.
    #[serde(flatten)]
    pub overall: PerfStats,
    /// Requests since the daemon started.
    pub lifetime_requests: u64,
    /// Seconds the window covers now: 60, or the uptime while that is shorter (but at least 1).
    pub window_seconds: f64,
    /// The same figures per command, for the commands seen in the window.
    pub commands: std::collections::BTreeMap<&'static str, PerfStats>,
}

/// One second of measurements.
struct Slot {
    /// Which second since start this slot holds.
    second: u64,
    /// Response times in microseconds, per command kind; allocated the first time a kind is seen.
    histograms: [Option<Box<Histogram<u32>>>; KINDS],
    /// Exact sums of response times, per kind, for the mean.
    sums_us: [u64; KINDS],
}

impl Slot {
    fn clear(&mut self, second: u64) {
        self.second = second;
        for h in self.histograms.iter_mut().flatten() {
            h.reset();
        }
        self.sums_us = [0; KINDS];
    }
}

/// The meter.
pub struct RequestMeter {
    slots: Box<[Mutex<Slot>]>,
    /// Time zero for the slot numbering.
    started: Instant,
    lifetime: AtomicU64,
}

/// Index of a command in the per-kind arrays; `None` is a frame with no known command.
fn kind(cmd: Option<CommandName>) -> usize {
    cmd.and_then(|c| CommandName::ALL.iter().position(|&k| k == c))
        .unwrap_or(KINDS - 1)
}

fn kind_name(kind: usize) -> &'static str {
    CommandName::ALL.get(kind).map_or("OTHER", |c| c.as_str())
}

fn new_histogram() -> Box<Histogram<u32>> {
    // Two significant figures: 1% resolution, a few kilobytes per histogram.
    Box::new(
        Histogram::new_with_bounds(1, MAX_TRACKED_US, 2)
            .expect("constant histogram bounds are valid"),
    )
}

impl RequestMeter {
    /// A meter whose window starts at `started`.
    pub fn new(started: Instant) -> RequestMeter {
        let slots = (0..WINDOW_SECS)
            .map(|_| {
                Mutex::new(Slot {
                    second: u64::MAX,
                    histograms: Default::default(),
                    sums_us: [0; KINDS],
                })
            })
            .collect();
        RequestMeter {
            slots,
            started,
            lifetime: AtomicU64::new(0),
        }
    }

    /// Records one request of `cmd` (None: no known command) that took `elapsed_us` and finished at `now`.
    pub fn record(&self, cmd: Option<CommandName>, elapsed_us: u64, now: Instant) {
        self.lifetime.fetch_add(1, Ordering::Relaxed);
        let second = now.saturating_duration_since(self.started).as_secs();
        let k = kind(cmd);
        let mut slot = self.slots[(second % WINDOW_SECS) as usize].lock();
        if slot.second != second {
            slot.clear(second);
        }
        slot.histograms[k]
            .get_or_insert_with(new_histogram)
            .saturating_record(elapsed_us.max(1));
        slot.sums_us[k] += elapsed_us;
    }

    /// The window's figures as of `now`.
    pub fn snapshot(&self, now: Instant) -> MeterSnapshot {
        let uptime = now.saturating_duration_since(self.started);
        let current = uptime.as_secs();
        let window_seconds = uptime.as_secs_f64().clamp(1.0, WINDOW_SECS as f64);
        let mut merged: Vec<Option<Box<Histogram<u32>>>> = (0..KINDS).map(|_| None).collect();
        let mut sums = [0u64; KINDS];
        for slot in self.slots.iter() {
            let slot = slot.lock();
            if slot.second > current || current - slot.second >= WINDOW_SECS {
                continue;
            }
            for (k, h) in slot.histograms.iter().enumerate() {
                if let Some(h) = h.as_ref().filter(|h| !h.is_empty()) {
                    // Same bounds on both sides, so adding cannot fail.
                    let _ = merged[k].get_or_insert_with(new_histogram).add(&**h);
                }
            }
            for (k, s) in slot.sums_us.iter().enumerate() {
                sums[k] += s;
            }
        }
        let mut overall = new_histogram();
        let mut commands = std::collections::BTreeMap::new();
        for (k, h) in merged.iter().enumerate() {
            if let Some(h) = h {
                let _ = overall.add(&**h);
                commands.insert(kind_name(k), summarize(h, sums[k], window_seconds));
            }
        }
        MeterSnapshot {
            overall: summarize(&overall, sums.iter().sum(), window_seconds),
            lifetime_requests: self.lifetime.load(Ordering::Relaxed),
            window_seconds,
            commands,
        }
    }
}

fn summarize(h: &Histogram<u32>, sum_us: u64, window_seconds: f64) -> PerfStats {
    let count = h.len();
    if count == 0 {
        return PerfStats::default();
    }
    let secs = |us: u64| us as f64 / 1e6;
    PerfStats {
        requests_per_second: count as f64 / window_seconds,
        avg_response_time: sum_us as f64 / count as f64 / 1e6,
        p50_response_time: secs(h.value_at_quantile(0.50)),
        p95_response_time: secs(h.value_at_quantile(0.95)),
        p99_response_time: secs(h.value_at_quantile(0.99)),
        total_requests: count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn window_slides_and_percentiles_hold() {
        let t0 = Instant::now();
        let m = RequestMeter::new(t0);
        for us in 1..=100 {
            m.record(
                Some(CommandName::Get),
                us * 10,
                t0 + Duration::from_millis(500),
            );
        }
        m.record(
            Some(CommandName::Set),
            5000,
            t0 + Duration::from_millis(1500),
        );
        let s = m.snapshot(t0 + Duration::from_secs(2));
        assert_eq!(s.overall.total_requests, 101);
        assert_eq!(s.commands["GET"].total_requests, 100);
        let p99 = s.commands["GET"].p99_response_time;
        assert!((0.00098..=0.00100).contains(&p99), "p99 {p99}");
        assert!((s.commands["GET"].avg_response_time - 0.000505).abs() < 1e-9);
        // Sixty seconds later the first second has left the window; the lifetime count stays.
        let later = m.snapshot(t0 + Duration::from_millis(60_700));
        assert_eq!(later.overall.total_requests, 1);
        assert_eq!(later.lifetime_requests, 101);
        assert!(!later.commands.contains_key("GET"));
    }
}
