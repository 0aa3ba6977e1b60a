//! What the service manager is told while the daemon runs: when it is ready, what it is doing, and
//! that it is still alive (systemd's `Type=notify` and `WatchdogSec=`; [`crate::notify`] sends).
//!
//! [`supervise`] runs beside the accept loops and the drain, in the same future
//! ([`crate::server::Server::run_beside`]), so a serving loop that stops being polled stops it too.
//! Each tick it:
//! - reports `READY=1` once: the listeners are bound before it starts, and with Redis configured it
//!   first waits for the first connection attempt to finish, so the daemon is ready either connected
//!   or knowingly degraded;
//! - sends `STATUS=` when the line changes (serving N connections, degraded, draining);
//! - with a watchdog, sends `WATCHDOG=1` only if the probe it spawned on the previous tick has run:
//!   the probe is a task on the runtime the connections run on that takes every cache shard's lock
//!   and the lock table's. A worker thread that is stuck, or a lock that is never released, leaves
//!   the probe unfinished, the keep-alives stop, and systemd restarts the daemon. One probe at a time,
//!   so a wedged runtime does not pile them up.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::daemon::Daemon;
use crate::notify::Notifier;

/// How often the status line is refreshed when no watchdog asks for more.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// A missed keep-alive is logged at most once per interval.
static PROBE_LATE: crate::throttle::Throttle = crate::throttle::Throttle::new();

/// Reports readiness, status and liveness to the service manager until dropped. Never returns; run
/// it beside the server.
pub async fn supervise(daemon: Arc<Daemon>, notifier: Arc<Notifier>) {
    if !notifier.enabled() {
        return std::future::pending().await;
    }
    // Keep-alives at half the timeout, as sd_watchdog_enabled(3) advises; the status at least every second.
    let watchdog = notifier.watchdog();
    let every = watchdog.map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);

    let ready = wait_ready(&daemon, &notifier);
    tokio::pin!(ready);
    let mut is_ready = false;
    let mut last_status = String::new();
    let mut probe: Option<JoinHandle<()>> = None;
    loop {
        tokio::select! {
            _ = &mut ready, if !is_ready => {
                is_ready = true;
                last_status = status_line(&daemon);
                notifier.send(&format!("READY=1\nSTATUS={last_status}"));
                tracing::info!(status = %last_status, "ready");
            }
            _ = tick.tick() => {
                if watchdog.is_some() {
                    probe = keep_alive(&daemon, &notifier, probe);
                }
                if is_ready {
                    let status = status_line(&daemon);
                    if status != last_status {
                        notifier.status(&status);
                        last_status = status;
                    }
                }
            }
        }
    }
}

/// Sends `WATCHDOG=1` if the last probe finished, and starts the next one; returns the probe now
/// outstanding.
fn keep_alive(
    daemon: &Arc<Daemon>,
    notifier: &Notifier,
    last: Option<JoinHandle<()>>,
) -> Option<JoinHandle<()>> {
    match last {
        Some(probe) if !probe.is_finished() => {
            crate::throttled_warn!(
                PROBE_LATE,
                "the serving threads did not run the watchdog probe in time; keep-alive withheld"
            );
            return Some(probe);
        }
        Some(_) => notifier.send("WATCHDOG=1"),
        // The first tick: nothing proven yet.
        None => {}
    }
    let daemon = daemon.clone();
    Some(tokio::spawn(async move {
        // Each takes its locks and lets go: a lock held forever would block here.
        let _ = daemon.cache.stats();
        let _ = daemon.locks.holds_any(0);
    }))
}

/// Waits until the daemon can answer as configured: at once standalone; with Redis, until the first
/// connection attempt has ended, connected or not (then degraded).
async fn wait_ready(daemon: &Daemon, notifier: &Notifier) {
    let Some(remote) = &daemon.store.remote else {
        return;
    };
    notifier.status("waiting for Redis");
    // The attempt is bounded by the connect and response timeouts (connect, load the scripts, raise
    // the fencing floor); the cap only guards against a bug leaving the daemon never ready.
    let config = &daemon.config;
    let cap = Duration::from_secs_f64(
        config.redis_connect_timeout + 10.0 * config.redis_response_timeout,
    );
    let started = Instant::now();
    if !remote.link.first_attempt(cap).await {
        tracing::warn!(waited = ?started.elapsed(), "no answer from the first Redis connection attempt; ready without it");
    }
}

/// What the daemon is doing, in one line for `systemctl status`.
pub fn status_line(daemon: &Daemon) -> String {
    let open = daemon.connections.stats().current;
    if daemon.shutdown.is_cancelled() {
        return format!("draining: {open} connections open");
    }
    match daemon.store.redis_health() {
        (true, true) => format!("serving {open} connections; Redis connected"),
        (true, false) => format!("serving {open} connections; degraded: Redis unreachable"),
        _ => format!("serving {open} connections"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::os::unix::net::UnixDatagram;

    /// The keep-alive is withheld while the probe has not run, and sent once it has.
    #[tokio::test(flavor = "current_thread")]
    async fn no_keep_alive_until_the_serving_threads_run_the_probe() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).expect("bind");
        manager.set_nonblocking(true).expect("nonblocking");
        let notifier = Notifier::to(
            path.as_os_str().as_encoded_bytes(),
            Some(Duration::from_secs(1)),
        )
        .expect("notifier");
        let config = crate::config::Config::try_parse_from(["scaled"]).expect("config");
        let daemon = Arc::new(Daemon::new(config).expect("daemon"));
        let mut buf = [0u8; 64];

        // On a current-thread runtime the probe cannot run until this test yields: a runtime whose
        // threads are all busy, as far as the probe can tell.
        let probe = keep_alive(&daemon, &notifier, None);
        let probe = keep_alive(&daemon, &notifier, probe);
        assert!(
            manager.recv(&mut buf).is_err(),
            "a keep-alive was sent before the probe ran"
        );

        while !probe.as_ref().is_some_and(|p| p.is_finished()) {
            tokio::task::yield_now().await;
        }
        let _next = keep_alive(&daemon, &notifier, probe);
        let n = manager
            .recv(&mut buf)
            .expect("a keep-alive once the probe ran");
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }
}
