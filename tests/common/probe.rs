//! Probes for the resource-bound tests: what the daemon process uses (memory and CPU, read from
//! `/proc`), a well-behaved client that keeps asking while an attack runs and must get every answer,
//! and a pipelining attacker that tallies the answers it gets.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use scaled_client::proto::Request;

use super::{RawConn, TestDaemon};

/// One `kB` figure of `/proc/<pid>/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The daemon's resident memory now, in KiB (`VmRSS`).
pub fn rss_kib(daemon: &TestDaemon) -> u64 {
    status_kib(daemon.child.id(), "VmRSS")
}

/// The daemon's peak resident memory since it started, in KiB (`VmHWM`).
pub fn peak_rss_kib(daemon: &TestDaemon) -> u64 {
    status_kib(daemon.child.id(), "VmHWM")
}

/// CPU time the daemon has used, in nanoseconds: the scheduler's account of every thread
/// (`/proc/<pid>/task/*/schedstat`, first field), far finer than the 10 ms ticks of `/proc/<pid>/stat`.
pub fn cpu_ns(daemon: &TestDaemon) -> u64 {
    let pid = daemon.child.id();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("listing /proc/{pid}/task: {e}"));
    tasks
        .filter_map(|task| {
            let path = task.ok()?.path().join("schedstat");
            let text = std::fs::read_to_string(path).ok()?;
            text.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

/// What a [`Prober`] saw.
#[derive(Debug)]
pub struct ProbeReport {
    /// GETs answered with the probe's value.
    pub answered: u64,
    /// Every GET that was not: an error, a wrong value, a lost connection.
    pub failures: Vec<String>,
    /// Round-trip times, in microseconds.
    pub latency_us: Histogram<u64>,
    /// The round trips over [`SLOW_US`]: when each began (since the probe started) and how long it
    /// took, so a tail can be matched to what the attack was doing then.
    pub slow: Vec<(Duration, Duration)>,
}

/// A round trip at least this long (µs) is kept in [`ProbeReport::slow`].
pub const SLOW_US: u64 = 10_000;

impl ProbeReport {
    /// Fails the test unless every GET was answered, and at least `min` were.
    pub fn assert_every_answer(&self, min: u64) {
        assert!(
            self.failures.is_empty(),
            "the well-behaved client was failed {} times during the attack, first: {}",
            self.failures.len(),
            self.failures[0]
        );
        assert!(
            self.answered >= min,
            "the well-behaved client got only {} answers (at least {min} expected)",
            self.answered
        );
    }

    /// "p50 … p99 … max …" in milliseconds, for a test's output.
    pub fn summary(&self) -> String {
        let ms = |q: f64| self.latency_us.value_at_quantile(q) as f64 / 1000.0;
        let slow: Vec<String> = self
            .slow
            .iter()
            .take(8)
            .map(|(at, took)| format!("{:.3}s:{:.1}ms", at.as_secs_f64(), took.as_secs_f64() * 1e3))
            .collect();
        format!(
            "{} GETs, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms, over 10 ms at [{}]",
            self.answered,
            ms(0.5),
            ms(0.99),
            self.latency_us.max() as f64 / 1000.0,
            slow.join(" ")
        )
    }
}

/// A well-behaved client on its own connection and its own thread: it stores one value, then GETs it
/// about every millisecond until stopped, recording each round trip and every failure.
pub struct Prober {
    /// Set to stop the loop.
    stop: Arc<AtomicBool>,
    /// The loop's thread; it returns what it saw.
    thread: std::thread::JoinHandle<ProbeReport>,
}

impl Prober {
    /// The key and value the probe reads.
    const KEY: &'static str = "probe:key";
    const VALUE: &'static [u8] = b"probe-value";

    /// Connects to `daemon` and starts probing. Its own thread and runtime, so that the attack's tasks
    /// in the test never delay it: what it measures is the daemon.
    pub fn start(daemon: &TestDaemon) -> Prober {
        let socket = daemon.socket.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("probe runtime");
            runtime.block_on(async move {
                let client =
                    scaled_client::Client::connect(scaled_client::Endpoint::Unix(socket), "probe")
                        .await
                        .expect("probe connects");
                client
                    .set(Self::KEY, Self::VALUE, Some(Duration::ZERO))
                    .await
                    .expect("probe SET");
                let _ = ready_tx.send(());
                let mut report = ProbeReport {
                    answered: 0,
                    failures: Vec::new(),
                    latency_us: Histogram::new_with_bounds(1, 600_000_000, 3)
                        .expect("histogram bounds"),
                    slow: Vec::new(),
                };
                let began = Instant::now();
                while !stopping.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let got =
                        tokio::time::timeout(super::STARTUP_LIMIT, client.get(Self::KEY)).await;
                    let took = sent.elapsed().as_micros() as u64;
                    report.latency_us.saturating_record(took.max(1));
                    if took >= SLOW_US {
                        report
                            .slow
                            .push((sent - began, Duration::from_micros(took)));
                    }
                    match got {
                        Ok(Ok(Some(v))) if v == Self::VALUE => report.answered += 1,
                        Ok(Ok(other)) => report.failures.push(format!("GET answered {other:?}")),
                        Ok(Err(e)) => report.failures.push(format!("GET failed: {e}")),
                        Err(_) => report.failures.push("GET unanswered for 20 s".into()),
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                report
            })
        });
        ready_rx
            .recv_timeout(super::STARTUP_LIMIT)
            .expect("the probe did not start");
        Prober { stop, thread }
    }

    /// Stops probing and returns what it saw.
    pub fn finish(self) -> ProbeReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("probe thread panicked")
    }
}

/// How many answers of each kind a pipelined batch got: `ok`, or the error code.
pub type Tally = BTreeMap<String, u64>;

/// Sends `requests` on `conn`, `window` at a time in one write each, reading every answer before the
/// next window, and tallies the answers by outcome. For requests that are all answered at once.
pub async fn pipeline(
    conn: &mut RawConn,
    requests: impl IntoIterator<Item = Request>,
    window: usize,
) -> Tally {
    let mut tally = Tally::new();
    let mut requests = requests.into_iter().peekable();
    while requests.peek().is_some() {
        let mut frames = Vec::new();
        let mut sent = 0;
        for request in requests.by_ref().take(window) {
            scaled_client::frame::push_frame(&mut frames, &request.to_msgpack());
            sent += 1;
        }
        conn.send_bytes(&frames).await;
        for _ in 0..sent {
            let answer = conn.recv().await.expect("the daemon closed the attacker");
            let outcome = answer.err.map_or_else(|| "ok".to_string(), |e| e.code);
            *tally.entry(outcome).or_default() += 1;
        }
    }
    tally
}
