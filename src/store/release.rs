//! The releaser: a background task that releases locks in Redis for code that cannot wait for Redis
//! itself. A connection's end is seen in `Drop` (the connection's departure), and a LOCK whose future is
//! dropped may have been granted in Redis a moment before; neither can await a round trip, so each
//! hands the (lock, owner token) pair to this task instead.
//!
//! The queue is bounded ([`RELEASE_QUEUE`]). A release that finds it full is logged and left to the
//! lock's lease in Redis, which ends it anyway: a full queue costs waiting time on other hosts, never
//! exclusion. A release that finds Redis unreachable is tried again once Redis is back, until the lease
//! it was taken with would have ended there anyway. Shutdown [drains](Releaser::drain) the queue before
//! the process exits, so a graceful stop leaves no lock of this daemon in Redis.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::redis::Link;
use crate::throttle::Throttle;
use crate::throttled_warn;

/// Most releases waiting for the task. Each is a few hundred bytes; Redis takes tens of thousands a
/// second, so the queue is empty but for bursts (a host closing many connections at once).
pub const RELEASE_QUEUE: usize = 65_536;

/// A full queue is logged at most once a second.
static FULL: Throttle = Throttle::new();

/// What the task is asked to do, in order.
enum Job {
    /// Release `lock` if `token` holds it in Redis; give up once `until` has passed (its lease in
    /// Redis has ended by then anyway).
    Release {
        lock: String,
        token: String,
        until: Instant,
    },
    /// Answer once every release queued before has been done (or given up).
    Drain(oneshot::Sender<()>),
}

/// The handle the store keeps; the task ends when the handle is dropped.
pub struct Releaser {
    /// To the task.
    tx: mpsc::Sender<Job>,
}

impl Releaser {
    /// Starts the task on `link`. Must be called inside a tokio runtime.
    pub fn start(link: Link) -> Releaser {
        let (tx, rx) = mpsc::channel(RELEASE_QUEUE);
        tokio::spawn(run(link, rx));
        Releaser { tx }
    }

    /// Queues the release of `lock` held by `token`, whose lease in Redis ends by `until` at the
    /// latest. Never waits.
    pub fn release(&self, lock: String, token: String, until: Instant) {
        let job = Job::Release { lock, token, until };
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(job) {
            throttled_warn!(
                FULL,
                "the release queue is full; a lock is left to its lease in Redis"
            );
        }
    }

    /// Releases queued and not yet taken by the task.
    pub fn pending(&self) -> usize {
        RELEASE_QUEUE - self.tx.capacity()
    }

    /// Waits until every release queued so far is done, at most `limit`; true if they all are.
    pub async fn drain(&self, limit: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        let queued = tokio::time::timeout(limit, self.tx.send(Job::Drain(tx)));
        let Ok(Ok(())) = queued.await else {
            return false;
        };
        tokio::time::timeout(limit, rx)
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Releases sent to Redis at once. One at a time, a burst of tens of thousands (LOCKs failing while
/// Redis was away, or a host closing many connections) would take seconds of round trips to clear;
/// releases of different owner tokens do not depend on each other, so they go out together.
pub const RELEASES_IN_FLIGHT: usize = 64;

/// Takes jobs until the handle is dropped: up to [`RELEASES_IN_FLIGHT`] releases at once, and a
/// drain answered once every release queued before it is done.
async fn run(link: Link, mut rx: mpsc::Receiver<Job>) {
    let mut in_flight = tokio::task::JoinSet::new();
    while let Some(job) = rx.recv().await {
        match job {
            Job::Drain(done) => {
                while in_flight.join_next().await.is_some() {}
                let _ = done.send(());
            }
            Job::Release { lock, token, until } => {
                while in_flight.len() >= RELEASES_IN_FLIGHT {
                    in_flight.join_next().await;
                }
                in_flight.spawn(release(link.clone(), lock, token, until));
            }
        }
    }
    while in_flight.join_next().await.is_some() {}
}

/// Releases `lock` held by `token` in Redis, waiting for Redis to be back if it is away, but never
/// past `until`, when the lease there has ended anyway.
async fn release(link: Link, lock: String, token: String, until: Instant) {
    loop {
        match link.release(&lock, &token).await {
            Ok(_) => return,
            Err(e) if e.is_unavailable() => {
                let left = until.saturating_duration_since(Instant::now());
                // Wait for Redis to come back, but never past the lease's end there.
                if left.is_zero() || !link.wait_up(left).await {
                    return;
                }
                // Up, yet unavailable (Redis still loading its data): do not spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => {
                tracing::warn!(lock, error = %e, "releasing a lock in Redis failed");
                return;
            }
        }
    }
}
