//! The lock table: session locks with FIFO waits, fencing tokens, leases and liveness.
//!
//! A lock is a key with at most one holder and a FIFO queue of waiters. Invariants, all kept under the
//! table's one mutex:
//!
//! - a key with no holder has no waiters: a release hands the lock straight to the first live waiter,
//!   so nobody polls and nobody can barge in front of the queue;
//! - every grant takes a fencing token from one counter that only grows, so tokens strictly increase
//!   for every key; an entry remembers its newest token while it is kept, and the table's fence floor
//!   covers entries that were pruned;
//! - a holder's lease deadline is in `deadlines` exactly while it holds, and its key is in `held_by`
//!   under its connection exactly while it holds;
//! - a grant only goes to a waiter whose connection is alive and who still listens: the connection's
//!   `alive` token is cancelled before its locks are released, and a waiter that stops listening after
//!   its grant was sent releases it on drop (see [`WaitTicket`]).
//!
//! Time is the tokio clock (monotonic, and pausable in tests). The table knows nothing of sockets: a
//! connection is a number and a cancellation token.

mod state;
mod ticket;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use hashbrown::HashMap;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use state::{Counters, State, Waiter};
pub use ticket::WaitTicket;

/// How long an unused lock's record (its newest fencing token) is kept after its last release.
pub const FENCE_RETENTION: Duration = Duration::from_secs(3600);

/// The longest the expiry task sleeps when nothing is due, so pruning still happens.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// A request to take a lock.
pub struct LockRequest {
    /// The connection asking; its locks are released when it closes.
    pub conn: u64,
    /// Cancelled when the connection closes: a waiter whose connection is gone is never granted.
    pub alive: CancellationToken,
    /// Shown in LOCKS as the owner, e.g. the client's name and connection number.
    pub owner: Arc<str>,
    /// Lease length.
    pub lease: Duration,
    /// Renew the lease for as long as the connection lives.
    pub auto_renew: bool,
    /// Fail at once rather than queue.
    pub try_only: bool,
}

/// A lock granted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    /// The owner token, needed to UNLOCK and EXTEND.
    pub token: String,
    /// The fencing token: greater than that of every earlier grant of this key.
    pub fence: u64,
    /// The lease, in milliseconds.
    pub ttl_ms: u64,
    /// How long the request waited in the queue, in microseconds.
    pub waited_us: u64,
}

/// The answer to a LOCK.
pub enum Acquire {
    /// Granted at once.
    Granted(Grant),
    /// Held by someone else, and the request was try-only.
    Busy,
    /// Queued; await the ticket.
    Queued(WaitTicket),
}

/// The status UNLOCK and EXTEND answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// Done.
    Ok,
    /// Nobody holds the lock.
    NotLocked,
    /// Someone else holds it.
    NotOwner,
    /// The caller's lease ran out; the lock may already be someone else's.
    Expired,
}

/// A fenced write the table refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fencing token {token} on lock `{lock}` is not the newest grant ({newest})")]
pub struct Fenced {
    /// The lock named by the fence.
    pub lock: String,
    /// The token the write carried.
    pub token: u64,
    /// The newest token granted on that lock.
    pub newest: u64,
}

/// STATS `locks`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LockStats {
    /// Locks held now.
    pub held: u64,
    /// Requests waiting in queues now.
    pub waiters: u64,
    /// LOCK requests since start.
    pub requests: u64,
    /// Grants since start.
    pub grants: u64,
    /// LOCKs that gave up at their wait timeout.
    pub timeouts: u64,
    /// Try-mode LOCKs refused with LOCKED.
    pub refused: u64,
    /// Leases that ran out before UNLOCK.
    pub expiries: u64,
    /// Locks released because their holder's connection closed.
    pub released_on_disconnect: u64,
    /// Leases renewed for auto-renew holders.
    pub renewals: u64,
    /// Share of LOCKs that found the lock held (queued or refused), in percent.
    pub contention: f64,
    /// Wait before the grant, for LOCKs that queued: median, in seconds.
    pub wait_p50: f64,
    /// 95th percentile of the same.
    pub wait_p95: f64,
    /// 99th percentile of the same.
    pub wait_p99: f64,
}

/// One row of LOCKS.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LockInfo {
    /// The lock key.
    pub key: String,
    /// Who holds it (client name and connection).
    pub owner: String,
    /// The fencing token of the current grant.
    pub fence: u64,
    /// Milliseconds since it was granted.
    pub age_ms: u64,
    /// Milliseconds of lease left.
    pub ttl_ms: u64,
    /// Whether the lease renews while the holder's connection lives.
    pub auto_renew: bool,
    /// Requests queued behind the holder.
    pub waiters: u64,
}

/// The lock table.
pub struct LockTable {
    state: Mutex<State>,
    /// Wakes the expiry task when a new earliest deadline appears.
    deadline_moved: Notify,
}

impl Default for LockTable {
    fn default() -> Self {
        LockTable::new()
    }
}

impl LockTable {
    /// An empty table whose first fencing token is 1.
    pub fn new() -> LockTable {
        LockTable::with_fences_after(0)
    }

    /// An empty table whose fencing tokens start after `last`. The daemon passes the wall-clock time
    /// in microseconds, so a restarted daemon's tokens are greater than its predecessor's: the counter
    /// grows by one per grant, far slower than the clock, so it never catches up with the next start.
    pub fn with_fences_after(last: u64) -> LockTable {
        LockTable {
            state: Mutex::new(State {
                entries: HashMap::new(),
                deadlines: BTreeMap::new(),
                held_by: HashMap::new(),
                idle: VecDeque::new(),
                waiting: 0,
                wake_at: None,
                wake_needed: false,
                fence: last,
                fence_floor: last,
                next_ticket: 0,
                counters: Counters::default(),
                waits: Histogram::new_with_bounds(1, 86_400_000_000, 2)
                    .expect("constant histogram bounds are valid"),
            }),
            deadline_moved: Notify::new(),
        }
    }

    /// Takes `key` for the requester, queues it, or refuses (try mode).
    pub fn acquire(self: &Arc<Self>, key: &str, req: LockRequest, now: Instant) -> Acquire {
        let mut st = self.state.lock();
        st.counters.requests += 1;
        let key = st.key_arc(key);
        st.expire_if_due(&key, now);
        if st.entries.entry(key.clone()).or_default().holder.is_none() {
            let grant = st.install(
                &key,
                &req.owner,
                req.conn,
                req.lease,
                req.auto_renew,
                now,
                0,
            );
            self.unlock_and_wake(st);
            return Acquire::Granted(grant);
        }
        st.counters.contended += 1;
        if req.try_only {
            st.counters.refused += 1;
            // Expiring the old holder above may have granted a waiter, with a deadline to watch.
            self.unlock_and_wake(st);
            return Acquire::Busy;
        }
        st.next_ticket += 1;
        let ticket = st.next_ticket;
        let (tx, rx) = oneshot::channel();
        let waiter = Waiter {
            ticket,
            conn: req.conn,
            alive: req.alive,
            owner: req.owner,
            lease: req.lease,
            auto_renew: req.auto_renew,
            enqueued_at: now,
            tx,
        };
        if let Some(entry) = st.entries.get_mut(&key) {
            entry.queue.push_back(waiter);
            st.waiting += 1;
        }
        self.unlock_and_wake(st);
        Acquire::Queued(WaitTicket {
            table: self.clone(),
            key,
            ticket,
            rx: Some(rx),
        })
    }

    /// Releases `key` if `token` holds it, handing it to the next waiter.
    pub fn release(&self, key: &str, token: &str, now: Instant) -> Status {
        let mut st = self.state.lock();
        let Some(key) = st.entries.get_key_value(key).map(|(k, _)| k.clone()) else {
            return Status::NotLocked;
        };
        st.expire_if_due(&key, now);
        let status = st.status_of(&key, token);
        if status == Status::Ok {
            st.vacate(&key);
            st.hand_on(&key, now);
        }
        self.unlock_and_wake(st);
        status
    }

    /// Renews the lease of `token` on `key` to `lease` from now; `None` keeps the lease length it has.
    /// Answers the status and the lease now in force.
    pub fn extend(
        &self,
        key: &str,
        token: &str,
        lease: Option<Duration>,
        now: Instant,
    ) -> (Status, Duration) {
        let mut st = self.state.lock();
        let Some(key) = st.entries.get_key_value(key).map(|(k, _)| k.clone()) else {
            return (Status::NotLocked, Duration::ZERO);
        };
        st.expire_if_due(&key, now);
        let status = st.status_of(&key, token);
        let mut granted = Duration::ZERO;
        if status == Status::Ok {
            let current = st
                .entries
                .get(&key)
                .and_then(|e| e.holder.as_ref())
                .map(|h| h.lease);
            granted = lease.or(current).unwrap_or_default();
            st.renew(&key, granted, now);
        }
        self.unlock_and_wake(st);
        (status, granted)
    }

    /// Releases every lock connection `conn` holds. Cancel its `alive` token first, so none of its
    /// queued waits can be granted afterwards.
    pub fn release_connection(&self, conn: u64, now: Instant) {
        let mut st = self.state.lock();
        let Some(keys) = st.held_by.remove(&conn) else {
            return;
        };
        for key in keys {
            if st
                .entries
                .get(&key)
                .and_then(|e| e.holder.as_ref())
                .is_some_and(|h| h.conn == conn)
            {
                st.counters.released_on_disconnect += 1;
                st.vacate(&key);
                st.hand_on(&key, now);
            }
        }
        self.unlock_and_wake(st);
    }

    /// Runs `write` only if `token` is the newest grant on `lock`, with no grant able to happen in
    /// between: a holder paused past its lease can never overwrite the next holder's write.
    pub fn fenced<T>(
        &self,
        lock: &str,
        token: u64,
        write: impl FnOnce() -> T,
    ) -> Result<T, Fenced> {
        let st = self.state.lock();
        let newest = st
            .entries
            .get(lock)
            .map_or(st.fence_floor, |e| e.last_fence);
        // No grant is ever 0, so a fence of 0 is refused even on a lock never taken.
        if token == 0 || token != newest {
            return Err(Fenced {
                lock: lock.to_string(),
                token,
                newest,
            });
        }
        Ok(write())
    }

    /// Expires every lease due by `now`, renews auto-renew leases, prunes old idle records, and returns
    /// when to look again: the next deadline, or `IDLE_TICK` from now if that is sooner.
    pub fn expire_due(&self, now: Instant) -> Instant {
        let mut st = self.state.lock();
        while st
            .deadlines
            .first_key_value()
            .is_some_and(|((at, _), _)| *at <= now)
        {
            // The first deadline is its holder's (an invariant), so this expires or renews it.
            if let Some((_, key)) = st.deadlines.pop_first() {
                st.expire_if_due(&key, now);
            }
        }
        st.prune_idle(now);
        let next = st.deadlines.first_key_value().map(|((at, _), _)| *at);
        let wake_at = next.map_or(now + IDLE_TICK, |at| at.min(now + IDLE_TICK));
        st.wake_at = Some(wake_at);
        st.wake_needed = false;
        wake_at
    }

    /// Keeps leases expiring on time until `shutdown` is cancelled.
    pub async fn run_expiry(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let next = self.expire_due(Instant::now());
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
                _ = self.deadline_moved.notified() => {}
            }
        }
    }

    /// Counters for STATS.
    pub fn stats(&self) -> LockStats {
        let st = self.state.lock();
        let c = &st.counters;
        let secs = |q: f64| st.waits.value_at_quantile(q) as f64 / 1e6;
        LockStats {
            held: st.deadlines.len() as u64,
            waiters: st.waiting,
            requests: c.requests,
            grants: c.grants,
            timeouts: c.timeouts,
            refused: c.refused,
            expiries: c.expiries,
            released_on_disconnect: c.released_on_disconnect,
            renewals: c.renewals,
            contention: if c.requests == 0 {
                0.0
            } else {
                (c.contended as f64 * 10_000.0 / c.requests as f64).round() / 100.0
            },
            wait_p50: secs(0.50),
            wait_p95: secs(0.95),
            wait_p99: secs(0.99),
        }
    }

    /// The locks held now, by key.
    pub fn list(&self, now: Instant) -> Vec<LockInfo> {
        let st = self.state.lock();
        let mut rows: Vec<LockInfo> = st
            .entries
            .iter()
            .filter_map(|(key, e)| {
                let h = e.holder.as_ref()?;
                Some(LockInfo {
                    key: key.to_string(),
                    owner: h.owner.to_string(),
                    fence: h.fence,
                    age_ms: now.saturating_duration_since(h.granted_at).as_millis() as u64,
                    ttl_ms: h.expires_at.saturating_duration_since(now).as_millis() as u64,
                    auto_renew: h.auto_renew,
                    waiters: e.queue.len() as u64,
                })
            })
            .collect();
        rows.sort_by(|a, b| a.key.cmp(&b.key));
        rows
    }

    /// Releases the state and wakes the expiry task if a deadline now falls before its next wake-up.
    fn unlock_and_wake(&self, mut st: parking_lot::MutexGuard<'_, State>) {
        let wake = std::mem::take(&mut st.wake_needed);
        drop(st);
        if wake {
            self.deadline_moved.notify_one();
        }
    }

    /// Counts a LOCK that gave up waiting.
    fn count_timeout(&self) {
        self.state.lock().counters.timeouts += 1;
    }

    /// Takes a waiter out of its queue, or, if it was already granted and the grant sits unread in
    /// `rx`, releases that grant so it passes to the next waiter.
    fn withdraw(&self, key: &Arc<str>, ticket: u64, rx: &mut oneshot::Receiver<Grant>) {
        let mut st = self.state.lock();
        if let Some(entry) = st.entries.get_mut(key) {
            if let Some(pos) = entry.queue.iter().position(|w| w.ticket == ticket) {
                entry.queue.remove(pos);
                st.waiting -= 1;
                return;
            }
        }
        if let Ok(grant) = rx.try_recv() {
            if st.status_of(key, &grant.token) == Status::Ok {
                st.vacate(key);
                st.hand_on(key, Instant::now());
            }
        }
        self.unlock_and_wake(st);
    }
}
