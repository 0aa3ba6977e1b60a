//! LOCK through the store: a grant in two phases when Redis is configured.
//!
//! The local lock table is this host's FIFO queue. Standalone, its grant is the answer. With Redis, a
//! local grant only makes the waiter this host's *candidate*: the candidate then runs the acquire
//! script with its own owner token, and while the lock is held on another host waits for a release
//! message (or, if one is lost, a jittered LOCK_RETRY_DELAY) and asks again, until the LOCK's wait
//! ends. The grant the client gets carries Redis's fencing token, recorded in the local table too.
//! Only the head of each host's queue asks Redis, so many local waiters cost one acquire at a time.
//!
//! While Redis is unreachable (the acquire fails with proof of it: refused, broken, timed out; a
//! lock held on another host is not that), LOCK follows LOCK_FALLBACK: `local` keeps the local
//! grant, with a fence above every token this daemon has seen, marked degraded and recorded for
//! adoption once Redis is back (see [`crate::store::degraded`]); `fail` answers `UNAVAILABLE`.
//!
//! A candidate that stops (its wait ended, its connection closed, its future dropped) gives the local
//! grant back, so the next local waiter gets its turn; if it had sent an acquire, whose answer it may
//! never read, the release in Redis goes to the releaser as well.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::LockFallback;
use crate::locks::{wall_clock_micros, Acquire, Grant, Limit, LockRequest, LockTable, Status};
use crate::redis::scripts::{Acquire as RedisAcquire, Compare};
use crate::redis::LinkError;
use crate::store::degraded::{LocalGrant, Marked};
use crate::store::remote::Remote;
use crate::store::{Step, StoreError};
use crate::tally::{RemoteCount, Tally, WaitCount};

/// What a LOCK asks of the store, beyond the table's request.
pub struct LockAsk<'a> {
    /// The lock key.
    pub key: String,
    /// The table's request (connection, owner, lease, auto-renew, try mode).
    pub request: LockRequest,
    /// How long to wait for the grant; `None` in try mode.
    pub wait: Option<Duration>,
    /// Cancelled at shutdown: a waiting LOCK is answered SHUTTING_DOWN. Borrowed, and shared only by
    /// a LOCK that waits: most are granted at once.
    pub shutdown: &'a Arc<CancellationToken>,
    /// The counts of the connection it came on, for a LOCK that waits on Redis (see
    /// [`crate::tally`]); `None` counts it as waiting on other clients throughout.
    pub tally: Option<&'a Tally>,
}

/// The answer to a LOCK a limit of the lock table refused.
fn refused(key: &str, limit: Limit) -> StoreError {
    StoreError::Overloaded(match limit {
        Limit::Records(max) => format!(
            "the lock table is full: all {max} lock records (SCALED_MAX_LOCKS) are held or waited \
             for; retry when some are released"
        ),
        Limit::Waiters(max) => {
            format!("lock `{key}` already has {max} waiters (SCALED_MAX_WAITERS); retry later")
        }
    })
}

/// Takes the lock standalone: the local table's answer, as it always was.
pub fn local(
    locks: &Arc<LockTable>,
    ask: LockAsk<'_>,
    now: Instant,
) -> Step<Result<Grant, StoreError>> {
    let LockAsk {
        key,
        request,
        wait,
        shutdown,
        tally: _,
    } = ask;
    match locks.acquire(&key, request, now) {
        Acquire::Granted(grant) => Step::Ready(Ok(grant)),
        Acquire::Busy => Step::Ready(Err(StoreError::Locked(key))),
        Acquire::Refused(limit) => Step::Ready(Err(refused(&key, limit))),
        Acquire::Queued(mut ticket) => {
            let wait = wait.unwrap_or_default();
            let shutdown = shutdown.clone();
            Step::Later(Box::pin(async move {
                // Dropping the ticket on any branch but the grant leaves the queue, and gives back a
                // grant that raced with the timeout.
                tokio::select! {
                    grant = ticket.granted() => grant.ok_or_else(|| StoreError::Internal("the wait was dropped".into())),
                    _ = tokio::time::sleep(wait) => {
                        ticket.time_out();
                        Err(StoreError::LockTimeout { key, wait })
                    }
                    _ = shutdown.cancelled() => Err(StoreError::ShuttingDown),
                }
            }))
        }
    }
}

/// Takes the lock in Redis, with the local table as this host's queue in front.
pub fn remote(
    locks: &Arc<LockTable>,
    remote: &Arc<Remote>,
    ask: LockAsk<'_>,
    now: Instant,
) -> Step<Result<Marked<Grant>, StoreError>> {
    let LockAsk {
        key,
        mut request,
        wait,
        shutdown,
        tally,
    } = ask;
    let lease = request.lease;
    // The local grant only makes this request the host's candidate; its lease proper starts when
    // Redis grants the lock, which may be after the holder on another host has used all of its own.
    // Until then the local record must outlast the whole wait, or it would end under the candidate
    // (and pass to the next local waiter) while Redis was still being asked.
    request.lease = lease.saturating_add(wait.unwrap_or_default());
    let alive = request.alive.clone();
    let try_only = request.try_only;
    let auto_renew = request.auto_renew;
    let local = locks.acquire(&key, request, now);
    // A LOCK whose lock is free on this daemon waits only on Redis, until Redis says another
    // daemon holds the lock and it is to wait for that holder (proto-spec.md, "Requests waiting on
    // Redis"). One queued here waits on other clients from the start, and the connection counts it.
    let mut phase = match (&local, tally) {
        (Acquire::Granted(_), Some(tally)) => Some(Phase {
            remote: Some(tally.count_remote()),
            tally: tally.clone(),
            waiting: None,
        }),
        _ => None,
    };
    let counted = phase.is_some();
    let locks = locks.clone();
    let remote = remote.clone();
    let shutdown = shutdown.clone();
    let lock = Box::pin(async move {
        let deadline = now + wait.unwrap_or_default();
        let grant = match local {
            Acquire::Granted(grant) => grant,
            Acquire::Busy => return Err(StoreError::Locked(key)),
            Acquire::Refused(limit) => return Err(refused(&key, limit)),
            Acquire::Queued(mut ticket) => {
                tokio::select! {
                    grant = ticket.granted() => grant.ok_or_else(|| StoreError::Internal("the wait was dropped".into()))?,
                    _ = tokio::time::sleep_until(deadline) => {
                        ticket.time_out();
                        return Err(StoreError::LockTimeout { key, wait: wait.unwrap_or_default() });
                    }
                    _ = shutdown.cancelled() => return Err(StoreError::ShuttingDown),
                }
            }
        };
        let mut candidate = Candidate {
            locks,
            remote,
            key,
            grant,
            lease,
            asked: false,
            confirmed: false,
        };
        let outcome = candidate
            .confirm(try_only, deadline, wait, &shutdown, &alive, &mut phase)
            .await;
        let degraded = match outcome {
            Ok(()) => {
                if auto_renew {
                    let (key, token) = (candidate.key.clone(), candidate.grant.token.clone());
                    tokio::spawn(renew(
                        candidate.locks.clone(),
                        candidate.remote.clone(),
                        key,
                        token,
                        lease,
                    ));
                }
                false
            }
            Err(StoreError::Unavailable(_)) if candidate.remote.fallback == LockFallback::Local => {
                candidate.grant_locally(auto_renew, wait)?;
                true
            }
            Err(e) => return Err(e),
        };
        candidate.confirmed = true;
        let mut grant = candidate.grant.clone();
        grant.waited_us = now.elapsed().as_micros() as u64;
        Ok(Marked {
            value: grant,
            degraded,
        })
    });
    if counted {
        Step::Counted(lock)
    } else {
        Step::Later(lock)
    }
}

/// Which of its connection's counts a LOCK that began with its lock free on this daemon holds.
struct Phase {
    tally: Tally,
    /// Held during the Redis step.
    remote: Option<RemoteCount>,
    /// Held once it waits for another daemon's holder.
    waiting: Option<WaitCount>,
}

impl Phase {
    /// The LOCK is to wait for another daemon's holder: it now waits on another client, so it needs
    /// room under SCALED_MAX_IN_FLIGHT and a daemon-wide slot, as a LOCK queued here would, and is
    /// refused `OVERLOADED` without them.
    fn wait_for_holder(&mut self) -> Result<(), StoreError> {
        if self.waiting.is_none() {
            self.waiting = Some(self.tally.admit().map_err(StoreError::Overloaded)?);
            self.remote = None;
        }
        Ok(())
    }
}

/// Keeps an auto-renew lock in Redis for as long as the local table says its holder holds it,
/// renewing every third of the lease. A renewal Redis refuses (the lease ended there, or another host
/// holds the lock) means the lock is lost: it is counted, logged and released here too, and its token
/// answers `LOCK_LOST`. A renewal that finds Redis unreachable is tried again at the next third.
pub(crate) async fn renew(
    locks: Arc<LockTable>,
    remote: Arc<Remote>,
    key: String,
    token: String,
    lease: Duration,
) {
    let every = (lease / 3).max(Duration::from_millis(1));
    loop {
        tokio::time::sleep(every).await;
        if !locks.holds(&key, &token) {
            return;
        }
        match remote
            .link
            .extend(&key, &token, Remote::redis_lease(lease))
            .await
        {
            Ok(Compare::Done) | Err(_) => {}
            Ok(lost) => {
                remote
                    .counters
                    .renewals_failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let why = format!("an auto-renewal failed in Redis ({lost:?})");
                remote.degraded.lose(&locks, &key, &token, &why);
                return;
            }
        }
    }
}

/// This host's candidate for a lock: granted locally, not yet (or just) in Redis.
struct Candidate {
    locks: Arc<LockTable>,
    remote: Arc<Remote>,
    key: String,
    /// The local grant; its fence becomes Redis's once confirmed.
    grant: Grant,
    /// The lease asked for.
    lease: Duration,
    /// Whether an acquire was sent to Redis, which may have succeeded there.
    asked: bool,
    /// Whether the client is getting the grant; until then, dropping gives it back.
    confirmed: bool,
}

impl Candidate {
    /// LOCK_FALLBACK=local with Redis unreachable: keeps the local grant, with a fence above every
    /// token this daemon has seen or issued and at least its clock in microseconds, noted so Redis's
    /// own tokens are raised above it when it is back; recorded for adoption then.
    fn grant_locally(
        &mut self,
        auto_renew: bool,
        wait: Option<Duration>,
    ) -> Result<(), StoreError> {
        let fence = self
            .remote
            .link
            .fence_floor()
            .saturating_add(1)
            .max(wall_clock_micros());
        if !self.start_lease(fence) {
            // The local record ended while Redis was asked.
            return Err(StoreError::LockTimeout {
                key: self.key.clone(),
                wait: wait.unwrap_or_default(),
            });
        }
        self.remote.link.note_fence(fence);
        self.remote.degraded.granted_locally(
            &self.key,
            &self.grant.token,
            LocalGrant {
                lease: self.lease,
                fence,
                auto_renew,
            },
        );
        Ok(())
    }

    /// The grant is confirmed with `fence`: the local record's lease proper starts now (it was
    /// stretched over the wait), and carries the fence. False when the record is no longer this
    /// candidate's.
    fn start_lease(&mut self, fence: u64) -> bool {
        let (status, granted) = self.locks.extend(
            &self.key,
            &self.grant.token,
            Some(self.lease),
            Instant::now(),
        );
        if status != Status::Ok || !self.locks.set_fence(&self.key, &self.grant.token, fence) {
            return false;
        }
        self.grant.fence = fence;
        self.grant.ttl_ms = u64::try_from(granted.as_millis()).unwrap_or(u64::MAX);
        true
    }

    /// Asks Redis until granted, refused (try mode), out of time, or stopped.
    async fn confirm(
        &mut self,
        try_only: bool,
        deadline: Instant,
        wait: Option<Duration>,
        shutdown: &CancellationToken,
        alive: &CancellationToken,
        phase: &mut Option<Phase>,
    ) -> Result<(), StoreError> {
        let redis_lease = Remote::redis_lease(self.lease);
        // The release watch starts after the first refusal, not before the first try: an
        // uncontended LOCK then costs no watch. The try after the watch starts sees any release
        // published before it, so none is missed from then on.
        let mut watch = None;
        let mut watching = false;
        loop {
            // Until the answer is read, the acquire may have landed in Redis: dropping this
            // candidate then releases it there too.
            self.asked = true;
            let asked =
                self.remote
                    .link
                    .acquire(&self.key, &self.grant.token, redis_lease, !try_only);
            // The LOCK's wait bounds the acquire too: a Redis that is slow to answer (or a link
            // with a backlog) must not hold the LOCK past the wait its client asked for.
            let answer = tokio::select! {
                answer = asked => answer,
                _ = tokio::time::sleep_until(deadline), if !try_only => {
                    return Err(StoreError::LockTimeout { key: self.key.clone(), wait: wait.unwrap_or_default() });
                }
                _ = shutdown.cancelled() => return Err(StoreError::ShuttingDown),
                _ = alive.cancelled() => return Err(StoreError::Internal("the connection closed".into())),
            };
            let answer = match answer {
                Ok(answer) => answer,
                Err(LinkError::NotConnected) => {
                    // Never sent: nothing to give back in Redis.
                    self.asked = false;
                    return Err(self.remote.store_error(LinkError::NotConnected));
                }
                Err(e) => return Err(self.remote.store_error(e)),
            };
            let lease_left = match answer {
                RedisAcquire::Granted { fence, seq } => {
                    // The read barrier, raised before the LOCK is answered: GETs under this grant
                    // answer from the cache only once it has applied every write up to `seq`.
                    self.remote.coherent.raise_barrier(seq);
                    if !self.start_lease(fence) {
                        // The local record ended while Redis was asked (its connection closed):
                        // give Redis's grant back.
                        return Err(StoreError::LockTimeout {
                            key: self.key.clone(),
                            wait: wait.unwrap_or_default(),
                        });
                    }
                    return Ok(());
                }
                RedisAcquire::Held { lease_left, .. } => lease_left,
            };
            if try_only {
                return Err(StoreError::Locked(self.key.clone()));
            }
            if let Some(phase) = phase.as_mut() {
                phase.wait_for_holder()?;
            }
            if !watching {
                // Held: watch for its release, then ask once more at once (it may have been
                // released, and published, before the watch began).
                watching = true;
                watch = self.remote.wakeups.watch(&self.key);
                if watch.is_some() {
                    continue;
                }
            }
            // No later than the holder's lease ends; jittered so hosts do not ask in step.
            let retry = self
                .remote
                .retry_delay
                .mul_f64(0.5 + fastrand::f64())
                .min(lease_left.unwrap_or(Duration::MAX));
            let released = async {
                match watch.as_mut() {
                    Some(w) => w.released().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = released => {}
                _ = tokio::time::sleep(retry) => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(StoreError::LockTimeout { key: self.key.clone(), wait: wait.unwrap_or_default() });
                }
                _ = shutdown.cancelled() => return Err(StoreError::ShuttingDown),
                _ = alive.cancelled() => return Err(StoreError::Internal("the connection closed".into())),
            }
        }
    }
}

impl Drop for Candidate {
    fn drop(&mut self) {
        if self.confirmed {
            return;
        }
        // Give the local turn to the next waiter, and the Redis grant, if any, back to everyone.
        self.locks
            .release(&self.key, &self.grant.token, Instant::now());
        if self.asked {
            self.remote
                .release_later(self.key.clone(), self.grant.token.clone(), self.lease);
        }
    }
}
