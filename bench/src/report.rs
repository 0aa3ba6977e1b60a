//! Measuring and reporting: latency histograms, the run's clock and CPU, the live progress line, and
//! what a workload hands back (a pass/fail verdict, one JSON object, and a table for people).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::task::JoinSet;

/// What a workload hands back to the command line.
pub struct Outcome {
    /// Whether the run passed its own checks; the exit status says so.
    pub passed: bool,
    /// Every figure, for `--json` and for scripts.
    pub json: serde_json::Value,
    /// The same figures as a table for people.
    pub text: String,
}

/// A latency histogram: 1 ns to 10 minutes, three significant figures.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("constant histogram bounds are valid")
}

/// Records a duration in nanoseconds (at least 1, the histogram's floor).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_nanos() as u64).max(1));
}

/// A latency distribution in milliseconds, as the JSON reports it.
#[derive(Serialize, Clone, Copy, Debug, Default)]
pub struct Latency {
    /// Mean.
    pub avg_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Worst.
    pub max_ms: f64,
}

impl Latency {
    /// The figures of a histogram of nanoseconds.
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |ns: u64| round3(ns as f64 / 1e6);
        Latency {
            avg_ms: round3(h.mean() / 1e6),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p95_ms: ms(h.value_at_quantile(0.95)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }
}

/// Rounds to three decimals (microseconds, for figures in milliseconds).
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// What one connection of a closed-loop workload measured.
pub struct Tally {
    /// Requests (or pairs, or grants) completed.
    pub done: u64,
    /// Failed requests.
    pub errors: u64,
    /// The first failure, to show.
    pub first_error: Option<String>,
    /// Write of a request to read of its answer, in nanoseconds.
    pub latency_ns: Histogram<u64>,
}

impl Tally {
    /// Nothing measured yet.
    pub fn new() -> Tally {
        Tally {
            done: 0,
            errors: 0,
            first_error: None,
            latency_ns: histogram(),
        }
    }

    /// Counts one failure.
    pub fn fail(&mut self, error: String) {
        self.errors += 1;
        self.first_error.get_or_insert(error);
    }

    /// Files one round trip.
    pub fn record(&mut self, d: Duration) {
        record(&mut self.latency_ns, d);
    }

    /// Adds up the connections' tallies.
    pub fn sum(tallies: Vec<Tally>) -> Tally {
        let mut total = Tally::new();
        for tally in tallies {
            total.done += tally.done;
            total.errors += tally.errors;
            total.first_error = total.first_error.or(tally.first_error);
            let _ = total.latency_ns.add(&tally.latency_ns);
        }
        total
    }
}

impl Default for Tally {
    fn default() -> Tally {
        Tally::new()
    }
}

/// The measured clock and CPU of one run.
pub struct Span {
    cpu_before: Option<f64>,
    started: Instant,
    /// After this, no new work is started.
    pub deadline: Instant,
}

impl Span {
    /// Starts the clock; work stops being started after `max_seconds`.
    pub fn start(max_seconds: u64) -> Span {
        let cpu_before = cpu_seconds();
        let started = Instant::now();
        Span {
            cpu_before,
            started,
            deadline: started + Duration::from_secs(max_seconds),
        }
    }

    /// When the run started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Seconds and client CPU seconds since the start.
    pub fn finish(&self) -> (f64, Option<f64>) {
        let secs = self.started.elapsed().as_secs_f64();
        let cpu = cpu_seconds()
            .zip(self.cpu_before)
            .map(|(after, before)| after - before);
        (secs, cpu)
    }
}

/// User plus system CPU time of this process so far, from /proc (in ticks of 1/100 s, Linux's USER_HZ).
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces: state is the
    // first, utime the 12th, stime the 13th.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// Waits for every connection's loop, giving up a little past the deadline so a server that stops
/// answering cannot hang the run.
pub async fn join_all<T: 'static>(
    mut set: JoinSet<T>,
    deadline: Instant,
) -> Result<Vec<T>, String> {
    let give_up = tokio::time::Instant::from_std(deadline + Duration::from_secs(10));
    let mut results = Vec::with_capacity(set.len());
    loop {
        match tokio::time::timeout_at(give_up, set.join_next()).await {
            Ok(Some(joined)) => {
                results.push(joined.map_err(|e| format!("connection task failed: {e}"))?)
            }
            Ok(None) => return Ok(results),
            Err(_) => {
                set.abort_all();
                return Err(format!(
                    "{} connections still waiting for answers; gave up",
                    set.len()
                ));
            }
        }
    }
}

/// How long a run goes before the progress line appears.
const PROGRESS_AFTER: Duration = Duration::from_secs(2);

/// A live progress line on stderr, shown only when stderr is a terminal and the run lasts more than
/// a couple of seconds; it goes away when dropped.
pub struct Progress {
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Counters a workload bumps as it goes, read by the progress line.
#[derive(Default)]
pub struct Counters {
    /// Units done (messages, requests, pairs, grants).
    pub done: AtomicU64,
    /// Failures so far.
    pub errors: AtomicU64,
}

impl Progress {
    /// Starts the line for `unit`s counted in `counters`, out of `total`.
    pub fn start(unit: &'static str, total: u64, counters: Arc<Counters>) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress { task: None };
        }
        let started = Instant::now();
        let task = tokio::spawn(async move {
            tokio::time::sleep(PROGRESS_AFTER).await;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut last = (started, 0u64);
            loop {
                tick.tick().await;
                let now = Instant::now();
                let done = counters.done.load(Ordering::Relaxed);
                let rate = (done - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
                last = (now, done);
                eprint!(
                    "\r  {:6.1} s  {done}/{total} {unit}  {rate:.0} {unit}/s  {} errors   ",
                    now.duration_since(started).as_secs_f64(),
                    counters.errors.load(Ordering::Relaxed),
                );
            }
        });
        Progress { task: Some(task) }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            // Clears whatever line was drawn.
            eprint!("\r\x1b[2K");
        }
    }
}

/// Formats a count with thousands separators, as the original's table does (`300,000`).
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_by_three() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(300_000), "300,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
