//! Watching a daemon under attack: its memory as the kernel counts it, and a well-behaved client on
//! another connection that must keep getting every answer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use scaled_client::Client;

/// One figure of `/proc/<pid>/status`, in KiB (VmRSS: resident now; VmHWM: the peak so far).
pub fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Resident memory now, in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    proc_kib(pid, "VmRSS") as f64 / 1024.0
}

/// Peak resident memory since the process started, in MiB.
pub fn peak_mib(pid: u32) -> f64 {
    proc_kib(pid, "VmHWM") as f64 / 1024.0
}

/// CPU time the process has used (user plus system), from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf only reads a constant of the running system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// What the well-behaved client saw.
#[derive(Debug, Default)]
pub struct Probed {
    /// Answers received, all correct.
    pub answers: u64,
    /// Calls that failed or answered wrongly, with what went wrong.
    pub failures: Vec<String>,
    /// Round trips, sorted.
    pub latencies: Vec<Duration>,
}

impl Probed {
    /// The `q` quantile of the round trips.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let at = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        self.latencies[at]
    }

    /// Fails the test unless every call succeeded and there were some.
    pub fn assert_served(&self, what: &str) {
        assert!(
            self.failures.is_empty(),
            "{what}: the well-behaved client failed: {:?}",
            &self.failures[..self.failures.len().min(5)]
        );
        assert!(
            self.answers > 0,
            "{what}: the well-behaved client got no answer"
        );
        eprintln!(
            "{what}: probe {} answers, p50 {:?}, p99 {:?}, max {:?}",
            self.answers,
            self.quantile(0.5),
            self.quantile(0.99),
            self.quantile(1.0)
        );
    }
}

/// A client on its own connection that GETs a known key every 5 ms until stopped, checking each
/// answer, as an app server would while another client misbehaves.
pub struct Prober {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Probed>,
}

impl Prober {
    /// Starts probing through `client`.
    pub async fn start(client: Client) -> Prober {
        client
            .set("probe:key", b"probe-value", None)
            .await
            .expect("probe SET");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut seen = Probed::default();
            while !flag.load(Ordering::Relaxed) {
                let start = Instant::now();
                match tokio::time::timeout(Duration::from_secs(10), client.get("probe:key")).await {
                    Ok(Ok(Some(v))) if v == b"probe-value" => {
                        seen.answers += 1;
                        seen.latencies.push(start.elapsed());
                    }
                    Ok(other) => seen.failures.push(format!("{other:?}")),
                    Err(_) => seen.failures.push("no answer within 10 s".into()),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seen.latencies.sort();
            seen
        });
        Prober { stop, task }
    }

    /// Stops probing and returns what it saw.
    pub async fn finish(self) -> Probed {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("probe task")
    }
}

/// Polls `check` every 10 ms until it holds, failing the test with `what` after `limit`.
pub async fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
