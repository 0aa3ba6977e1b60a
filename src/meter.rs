//! The request meter: requests per second and response-time percentiles over a sliding 60-second window,
//! per command and overall, for STATS; and since-start totals (requests by command and outcome, and
//! response times in fixed buckets) for /metrics, where Prometheus computes rates and quantiles itself
//! and needs counters that only grow.
//!
//! The window is a ring of one-second slots. A request is recorded in the slot of the second it finished
//! in; a slot still holding an older second is cleared first. A snapshot merges the slots of the last 60
//! seconds, so the window slides a second at a time. Recording takes one slot's mutex for a few
//! nanoseconds; only the current slot is written, and snapshots are rare. The totals are relaxed atomic
//! counters beside the ring: three adds per request.

use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio::time::Instant;

use scaled_client::proto::{CommandName, ErrorCode};

/// STATS `performance` and its per-command figures: the client crate's types, so the daemon and its
/// clients share one schema.
pub use scaled_client::answers::{PerfStats, Performance};

/// Length of the window, in one-second slots.
pub const WINDOW_SECS: u64 = 60;

/// Slots per command: one for each protocol command, and one for frames that named no known command.
const KINDS: usize = CommandName::ALL.len() + 1;

/// Longest response time a histogram tracks exactly, in microseconds (an hour); longer ones saturate.
const MAX_TRACKED_US: u64 = 3_600_000_000;

/// Upper bounds, in microseconds, of the since-start response-time buckets: 50 µs to a minute, so a
/// GET served from memory and a LOCK that waited in a queue both land in a bucket that tells them apart.
pub const BUCKETS_US: [u64; 19] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
];

/// Outcomes a request is counted under: success, then each error code in [`ErrorCode::ALL`] order.
const OUTCOMES: usize = ErrorCode::ALL.len() + 1;

/// A histogram since start, in the fixed [`BUCKETS_US`] buckets.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Buckets {
    /// Observations per bucket, not cumulative: `counts[i]` fell in `(BUCKETS_US[i-1], BUCKETS_US[i]]`;
    /// the last entry counts those over the largest bound.
    pub counts: Vec<u64>,
    /// Sum of the observations, in seconds.
    pub sum_seconds: f64,
}

impl Buckets {
    /// Observations in all buckets.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The buckets of an hdrhistogram of microseconds. Values are placed by the histogram's own
    /// resolution (about 1 %), so one within 1 % of a bound may land on either side of it.
    pub fn from_histogram(h: &Histogram<u32>) -> Buckets {
        let mut out = Buckets {
            counts: vec![0; BUCKETS_US.len() + 1],
            sum_seconds: 0.0,
        };
        for v in h.iter_recorded() {
            let us = h.highest_equivalent(v.value_iterated_to());
            out.counts[bucket_of(us)] += u64::from(v.count_at_value());
            out.sum_seconds += h.median_equivalent(us) as f64 * f64::from(v.count_at_value()) / 1e6;
        }
        out
    }
}

/// Index of the bucket whose bound is the first at or above `us`.
fn bucket_of(us: u64) -> usize {
    BUCKETS_US.partition_point(|&bound| bound < us)
}

/// The since-start figures of one command, as /metrics reports them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CommandTotals {
    /// The command's wire name, or `OTHER` for frames that named no known command.
    pub command: &'static str,
    /// Requests answered, by outcome: `OK` or the error code. Outcomes never seen are left out.
    pub outcomes: Vec<(&'static str, u64)>,
    /// Response times.
    pub times: Buckets,
}

/// Since-start counters of one command kind. Relaxed atomics: each is a count on its own, and a
/// scrape that sees one a request ahead of another is still a true picture a moment apart.
struct KindTotals {
    /// Requests by outcome, indexed like [`outcome_index`].
    outcomes: [AtomicU64; OUTCOMES],
    /// Requests per response-time bucket (not cumulative), indexed like [`bucket_of`].
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    /// Sum of response times, in microseconds.
    sum_us: AtomicU64,
}

impl KindTotals {
    fn new() -> KindTotals {
        KindTotals {
            outcomes: std::array::from_fn(|_| AtomicU64::new(0)),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
        }
    }
}

/// Index of an outcome in the per-outcome counters: 0 for success, then the error codes.
fn outcome_index(code: Option<ErrorCode>) -> usize {
    code.and_then(|c| ErrorCode::ALL.iter().position(|&k| k == c))
        .map_or(0, |i| i + 1)
}

fn outcome_name(index: usize) -> &'static str {
    index
        .checked_sub(1)
        .and_then(|i| ErrorCode::ALL.get(i))
        .map_or("OK", |c| c.as_str())
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
    /// The window: one slot per second, reused as the window slides.
    slots: Box<[Mutex<Slot>]>,
    /// Time zero for the slot numbering.
    started: Instant,
    /// Requests since start, for STATS `lifetime_requests`.
    lifetime: AtomicU64,
    /// Since-start counters per command kind, for /metrics.
    totals: Box<[KindTotals]>,
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
            totals: (0..KINDS).map(|_| KindTotals::new()).collect(),
        }
    }

    /// Records one request of `cmd` (None: no known command) that was answered with error `code`
    /// (None: success), took `elapsed_us` and finished at `now`.
    pub fn record(
        &self,
        cmd: Option<CommandName>,
        code: Option<ErrorCode>,
        elapsed_us: u64,
        now: Instant,
    ) {
        self.lifetime.fetch_add(1, Ordering::Relaxed);
        let k = kind(cmd);
        let totals = &self.totals[k];
        totals.outcomes[outcome_index(code)].fetch_add(1, Ordering::Relaxed);
        totals.buckets[bucket_of(elapsed_us)].fetch_add(1, Ordering::Relaxed);
        totals.sum_us.fetch_add(elapsed_us, Ordering::Relaxed);
        let second = now.saturating_duration_since(self.started).as_secs();
        let mut slot = self.slots[(second % WINDOW_SECS) as usize].lock();
        if slot.second != second {
            slot.clear(second);
        }
        slot.histograms[k]
            .get_or_insert_with(new_histogram)
            .saturating_record(elapsed_us.max(1));
        slot.sums_us[k] += elapsed_us;
    }

    /// Since-start figures of every command kind that has answered a request.
    pub fn totals(&self) -> Vec<CommandTotals> {
        self.totals
            .iter()
            .enumerate()
            .filter_map(|(k, t)| {
                let outcomes: Vec<(&'static str, u64)> = t
                    .outcomes
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (outcome_name(i), n.load(Ordering::Relaxed)))
                    .filter(|&(_, n)| n > 0)
                    .collect();
                if outcomes.is_empty() {
                    return None;
                }
                let times = Buckets {
                    counts: t
                        .buckets
                        .iter()
                        .map(|b| b.load(Ordering::Relaxed))
                        .collect(),
                    sum_seconds: t.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
                };
                Some(CommandTotals {
                    command: kind_name(k),
                    outcomes,
                    times,
                })
            })
            .collect()
    }

    /// The window's figures as of `now`.
    pub fn snapshot(&self, now: Instant) -> Performance {
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
                commands.insert(
                    kind_name(k).to_string(),
                    summarize(h, sums[k], window_seconds),
                );
            }
        }
        Performance {
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
                None,
                us * 10,
                t0 + Duration::from_millis(500),
            );
        }
        m.record(
            Some(CommandName::Set),
            Some(ErrorCode::Fenced),
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

    #[test]
    fn totals_count_outcomes_and_bucket_times_since_start() {
        let t0 = Instant::now();
        let m = RequestMeter::new(t0);
        for (us, code) in [(50, None), (51, None), (2_000, Some(ErrorCode::Locked))] {
            m.record(Some(CommandName::Lock), code, us, t0);
        }
        m.record(None, Some(ErrorCode::Malformed), 10, t0);
        // Long after the window has moved on, the totals still count everything.
        let _ = m.snapshot(t0 + Duration::from_secs(600));
        let totals = m.totals();
        assert_eq!(
            totals.iter().map(|t| t.command).collect::<Vec<_>>(),
            ["LOCK", "OTHER"]
        );
        let lock = &totals[0];
        assert_eq!(lock.outcomes, [("OK", 2), ("LOCKED", 1)]);
        assert_eq!(lock.times.count(), 3);
        // 50 µs is in the first bucket (bounds are inclusive), 51 µs in the second, 2 ms in (1, 2.5] ms.
        assert_eq!(&lock.times.counts[..6], &[1, 1, 0, 0, 0, 1]);
        assert!((lock.times.sum_seconds - 0.002101).abs() < 1e-12);
        assert_eq!(totals[1].outcomes, [("MALFORMED", 1)]);
    }

    #[test]
    fn buckets_from_an_hdrhistogram_keep_every_count() {
        let mut h = Histogram::<u32>::new_with_bounds(1, 86_400_000_000, 2).expect("bounds");
        for us in [10, 40_000, 40_000, 90_000_000] {
            h.record(us).expect("in range");
        }
        let b = Buckets::from_histogram(&h);
        assert_eq!(b.count(), 4);
        assert_eq!(b.counts[0], 1);
        assert_eq!(b.counts[bucket_of(40_000)], 2);
        assert_eq!(*b.counts.last().expect("overflow bucket"), 1);
        assert!(
            (b.sum_seconds - 90.08).abs() / 90.08 < 0.01,
            "{}",
            b.sum_seconds
        );
    }
}
