//! The lock table: session locks with FIFO waits, fencing tokens, leases and liveness.
//!
//! A lock is a key with at most one holder and a FIFO queue of waiters. Invariants, all kept under the
//! table's one mutex:
//!
//! - a key with no holder has no waiters: a release hands the lock straight to the first live waiter,
//!   so nobody polls and nobody can barge in front of the queue;
//! - every grant takes a fencing token from one counter that only grows, so tokens strictly increase
//!   for every key; a record remembers its newest token while it is kept, and the table's fence floor
//!   covers records that were pruned;
//! - a holder's lease deadline is in `deadlines`, its key in `held`, and its key in `held_by` under its
//!   connection, exactly while it holds;
//! - a free record is in `free` exactly while it is free, in the order records became free;
//! - a grant only goes to a waiter whose connection is alive and who still listens: the connection's
//!   `alive` token is cancelled before its locks are released, and a waiter that stops listening after
//!   its grant was sent releases it on drop (see [`WaitTicket`]).
//!
//! Bounds: at most [`LockLimits::max_records`] records (held, waited for, or kept free for their
//! fencing token), at most [`LockLimits::max_waiters`] waiters per lock, and no step that holds the
//! mutex does more than a bounded batch of work: expiries, prunes and the release of a closing
//! connection's locks go in batches, and LOCKS answers a page of at most [`MAX_LOCKS_PAGE`] rows.
//!
//! Time is the tokio clock (monotonic, and pausable in tests). The table knows nothing of sockets: a
//! connection is a number and a cancellation token.

mod free;
mod state;
mod ticket;

#[cfg(test)]
mod tests;

use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use state::{State, Waiter};
pub use ticket::WaitTicket;

/// How long an unused lock's record (its newest fencing token) is kept after its last release, unless
/// the table needs the room sooner (see [`LockLimits::max_records`]).
pub const FENCE_RETENTION: Duration = Duration::from_secs(3600);

/// The shortest lease an auto-renew lock gets. Its lease only sets how often it is renewed (the
/// connection's end releases it at once whatever the lease), so a longer one costs the holder nothing,
/// and it caps the renewal work at one step per lock per second.
pub const AUTO_RENEW_MIN_LEASE: Duration = Duration::from_secs(1);

/// The most rows one LOCKS answer holds. A row is at most about 1.4 KB (a 1024-byte key, a 256-byte
/// client name), so a full page stays well under the 2 MiB frame limit.
pub const MAX_LOCKS_PAGE: usize = scaled_client::proto::MAX_LOCKS_PAGE as usize;

/// Default of `SCALED_MAX_LOCKS`: lock records kept at once.
pub const DEFAULT_MAX_LOCKS: usize = 100_000;

/// Default of `SCALED_MAX_WAITERS`: LOCKs waiting on one lock at once.
pub const DEFAULT_MAX_WAITERS: usize = 1024;

/// The longest the expiry task sleeps when nothing is due, so pruning still happens.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// The most deadlines or prunes one pass of the expiry task handles while holding the mutex; it yields
/// between passes, so a mass expiry never stalls the other requests for long.
const UPKEEP_BATCH: usize = 64;

/// The most locks of a closing connection released per hold of the mutex.
const RELEASE_BATCH: usize = 64;

/// What bounds the table's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockLimits {
    /// Most lock records kept at once: held (with their queues) plus free ones kept for their fencing
    /// token. At the limit the oldest free record is pruned to make room; when none is free, a LOCK
    /// that needs a new record is refused.
    pub max_records: usize,
    /// Most LOCKs waiting on one lock; one more is refused rather than queued.
    pub max_waiters: usize,
}

impl Default for LockLimits {
    fn default() -> Self {
        LockLimits {
            max_records: DEFAULT_MAX_LOCKS,
            max_waiters: DEFAULT_MAX_WAITERS,
        }
    }
}

/// Told the key and owner token of each lock a closing connection released.
pub type ReleaseSink = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// Microseconds since the Unix epoch; where fencing tokens start, so they keep growing across restarts.
pub(crate) fn wall_clock_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A request to take a lock.
pub struct LockRequest {
    /// The connection asking; its locks are released when it closes.
    pub conn: u64,
    /// Cancelled when the connection closes: a waiter whose connection is gone is never granted.
    pub alive: Arc<CancellationToken>,
    /// Shown in LOCKS as the owner, e.g. the client's name and connection number.
    pub owner: Arc<str>,
    /// Lease length (raised to [`AUTO_RENEW_MIN_LEASE`] for auto-renew).
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
    /// The lease in force, in milliseconds.
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
    /// Refused at a limit of the table, with no effect.
    Refused(Limit),
}

/// The limit a refused LOCK met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The table holds its most records and every one is held or waited for.
    Records(usize),
    /// The lock's queue holds its most waiters.
    Waiters(usize),
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
    /// Lock records kept now: held, plus free ones kept for their fencing token.
    pub records: u64,
    /// `SCALED_MAX_LOCKS`, the most records kept.
    pub max_records: u64,
    /// LOCK requests since start.
    pub requests: u64,
    /// Grants since start.
    pub grants: u64,
    /// LOCKs that gave up at their wait timeout.
    pub timeouts: u64,
    /// Try-mode LOCKs refused with LOCKED.
    pub refused: u64,
    /// LOCKs refused with OVERLOADED at the record or waiter limit.
    pub overloaded: u64,
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

/// One page of LOCKS: held locks in key order from a cursor.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LockPage {
    /// The rows, by key (byte order), at most the page's limit.
    pub locks: Vec<LockInfo>,
    /// Locks held now, on every page.
    pub total: u64,
    /// The key to pass as `after` for the next page; `None` when this page reached the last key.
    pub next: Option<String>,
}

/// The lock table.
pub struct LockTable {
    /// Everything, under one mutex: a grant, a release and a fenced write never interleave.
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
    /// An empty table whose first fencing token is 1, with the default limits.
    pub fn new() -> LockTable {
        LockTable::with_fences_after(0, LockLimits::default())
    }

    /// An empty table whose fencing tokens start after `last`. The daemon passes the wall-clock time
    /// in microseconds, so a restarted daemon's tokens are greater than its predecessor's: the counter
    /// grows by one per grant, far slower than the clock, so it never catches up with the next start.
    pub fn with_fences_after(last: u64, limits: LockLimits) -> LockTable {
        LockTable {
            state: Mutex::new(State::new(last, limits)),
            deadline_moved: Notify::new(),
        }
    }

    /// Takes `key` for the requester, queues it, or refuses (try mode, or a limit).
    pub fn acquire(self: &Arc<Self>, key: &str, req: LockRequest, now: Instant) -> Acquire {
        let mut st = self.state.lock();
        st.counters.requests += 1;
        let key = match st.entries.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => {
                // A new record: make room under the limit by pruning the oldest free ones, if any.
                if !st.make_room(now) {
                    st.counters.overloaded += 1;
                    let max = st.limits.max_records;
                    // Ending overdue leases may have granted a waiter, with a deadline to watch.
                    self.unlock_and_wake(st);
                    return Acquire::Refused(Limit::Records(max));
                }
                let k: Arc<str> = Arc::from(key);
                st.entries.insert(k.clone(), Default::default());
                k
            }
        };
        st.expire_if_due(&key, now);
        let Some(queued) = st
            .entries
            .get(&key)
            .filter(|e| e.holder.is_some())
            .map(|e| e.queue.len())
        else {
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
        };
        st.counters.contended += 1;
        if req.try_only {
            st.counters.refused += 1;
            // Expiring the old holder above may have granted a waiter, with a deadline to watch.
            self.unlock_and_wake(st);
            return Acquire::Busy;
        }
        if queued >= st.limits.max_waiters {
            st.counters.overloaded += 1;
            let max = st.limits.max_waiters;
            self.unlock_and_wake(st);
            return Acquire::Refused(Limit::Waiters(max));
        }
        st.next_ticket += 1;
        let ticket = st.next_ticket;
        let (tx, rx) = oneshot::channel();
        let waiter = Waiter {
            conn: req.conn,
            alive: req.alive,
            owner: req.owner,
            lease: req.lease,
            auto_renew: req.auto_renew,
            enqueued_at: now,
            tx,
        };
        if let Some(entry) = st.entries.get_mut(&key) {
            entry.queue.insert(ticket, waiter);
            st.waiting += 1;
        }
        self.unlock_and_wake(st);
        Acquire::Queued(WaitTicket::new(self.clone(), key, ticket, rx))
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
    /// An auto-renew lease is never set below [`AUTO_RENEW_MIN_LEASE`]. Answers the status and the lease
    /// now in force.
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
            if let Some(h) = st.entries.get(&key).and_then(|e| e.holder.as_ref()) {
                granted = State::effective_lease(lease.unwrap_or(h.lease), h.auto_renew);
            }
            st.renew(&key, granted, now);
        }
        self.unlock_and_wake(st);
        (status, granted)
    }

    /// Releases every lock connection `conn` holds. Cancel its `alive` token first, so none of its
    /// queued waits can be granted afterwards.
    ///
    /// The first [`RELEASE_BATCH`] locks are released before this returns; a connection that held more
    /// has the rest released by a task that yields between batches, so a connection holding a hundred
    /// thousand locks never stalls the others while they are handed on.
    pub fn release_connection(self: &Arc<Self>, conn: u64, now: Instant) {
        self.release_connection_to(conn, now, None);
    }

    /// Like [`LockTable::release_connection`], and tells `sink` the key and owner token of each lock
    /// released, so a shared backend can release it too.
    pub fn release_connection_to(
        self: &Arc<Self>,
        conn: u64,
        now: Instant,
        sink: Option<ReleaseSink>,
    ) {
        let mut keys: Vec<Arc<str>> = {
            let mut st = self.state.lock();
            let Some(keys) = st.held_by.remove(&conn) else {
                return;
            };
            keys.into_iter().collect()
        };
        self.release_batch(conn, &mut keys, now, sink.as_ref());
        if keys.is_empty() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let table = self.clone();
                runtime.spawn(async move {
                    while !keys.is_empty() {
                        tokio::task::yield_now().await;
                        table.release_batch(conn, &mut keys, Instant::now(), sink.as_ref());
                    }
                });
            }
            Err(_) => {
                while !keys.is_empty() {
                    self.release_batch(conn, &mut keys, now, sink.as_ref());
                }
            }
        }
    }

    /// Releases up to [`RELEASE_BATCH`] of `keys` that `conn` still holds, taking them off `keys`.
    fn release_batch(
        &self,
        conn: u64,
        keys: &mut Vec<Arc<str>>,
        now: Instant,
        sink: Option<&ReleaseSink>,
    ) {
        let mut st = self.state.lock();
        let from = keys.len().saturating_sub(RELEASE_BATCH);
        for key in keys.drain(from..) {
            // Only if still this connection's: its lease may have run out and passed the lock on.
            if st
                .entries
                .get(&key)
                .and_then(|e| e.holder.as_ref())
                .is_some_and(|h| h.conn == conn)
            {
                st.counters.released_on_disconnect += 1;
                if let (Some(holder), Some(sink)) = (st.vacate(&key), sink) {
                    sink(&key, &holder.token.to_string());
                }
                st.hand_on(&key, now);
            }
        }
        self.unlock_and_wake(st);
    }

    /// Replaces the fencing token of `token`'s grant on `key` with `fence`, a token issued by a shared
    /// backend for the same grant, so LOCKS shows the token the holder was given. The table's counter
    /// is raised to it, so tokens issued here later (a backend away) stay above it. False when
    /// `token` no longer holds `key`.
    pub fn set_fence(&self, key: &str, token: &str, fence: u64) -> bool {
        let mut st = self.state.lock();
        let Some(key) = st.entries.get_key_value(key).map(|(k, _)| k.clone()) else {
            return false;
        };
        if st.status_of(&key, token) != Status::Ok {
            return false;
        }
        st.raise_fence(fence);
        let Some(entry) = st.entries.get_mut(&key) else {
            return false;
        };
        entry.last_fence = entry.last_fence.max(fence);
        let Some(h) = entry.holder.as_mut() else {
            return false;
        };
        let old = (h.expires_at, h.fence);
        h.fence = fence;
        let at = h.expires_at;
        st.deadlines.remove(&old);
        st.deadlines.insert((at, fence), key);
        true
    }

    /// Whether `token` is the holder of `key` (an auto-renew holder stays one past each deadline).
    pub fn holds(&self, key: &str, token: &str) -> bool {
        let st = self.state.lock();
        st.entries
            .get(key)
            .and_then(|e| e.holder.as_ref())
            .is_some_and(|h| Uuid::try_parse(token).is_ok_and(|t| t == h.token))
    }

    /// Whether connection `conn` holds any lock now.
    pub fn holds_any(&self, conn: u64) -> bool {
        self.state.lock().held_by.contains_key(&conn)
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

    /// Expires leases due by `now`, renews auto-renew leases, prunes records kept past
    /// [`FENCE_RETENTION`], at most [`UPKEEP_BATCH`] of each, and returns when to look again: `now` if
    /// a batch was cut short, else the next deadline, or `IDLE_TICK` from now if that is sooner.
    pub fn expire_due(&self, now: Instant) -> Instant {
        let mut st = self.state.lock();
        let mut more = false;
        for _ in 0..UPKEEP_BATCH {
            let due = st
                .deadlines
                .first_key_value()
                .is_some_and(|((at, _), _)| *at <= now);
            if !due {
                break;
            }
            // The first deadline is its holder's (an invariant), so this expires or renews it.
            if let Some((_, key)) = st.deadlines.pop_first() {
                st.expire_if_due(&key, now);
            }
        }
        if st
            .deadlines
            .first_key_value()
            .is_some_and(|((at, _), _)| *at <= now)
        {
            more = true;
        }
        more |= st.prune_retained(now, UPKEEP_BATCH);
        let next = st.deadlines.first_key_value().map(|((at, _), _)| *at);
        let wake_at = if more {
            now
        } else {
            next.map_or(now + IDLE_TICK, |at| at.min(now + IDLE_TICK))
        };
        st.wake_at = Some(wake_at);
        st.wake_needed = false;
        wake_at
    }

    /// Keeps leases expiring on time until `shutdown` is cancelled.
    pub async fn run_expiry(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let now = Instant::now();
            let next = self.expire_due(now);
            if next <= now {
                // A batch was cut short: let the other tasks in before the next one.
                tokio::task::yield_now().await;
                if shutdown.is_cancelled() {
                    return;
                }
                continue;
            }
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
            held: st.held.len() as u64,
            waiters: st.waiting,
            records: st.entries.len() as u64,
            max_records: st.limits.max_records as u64,
            requests: c.requests,
            grants: c.grants,
            timeouts: c.timeouts,
            refused: c.refused,
            overloaded: c.overloaded,
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

    /// Runs `read` on the wait times (µs) of the LOCKs that queued and were granted, since start: the
    /// histogram behind `wait_p50`..`wait_p99`, which /metrics exposes in full.
    pub fn read_waits<T>(&self, read: impl FnOnce(&Histogram<u32>) -> T) -> T {
        read(&self.state.lock().waits)
    }

    /// The locks held now whose keys come after `after` (from the first without it), in key order, at
    /// most `limit` of them (and never more than [`MAX_LOCKS_PAGE`]). The work is O(log n + page).
    pub fn page(&self, after: Option<&str>, limit: usize, now: Instant) -> LockPage {
        self.page_within("", after, limit, now)
    }

    /// A page of the held locks whose keys start with `prefix` (a key namespace), after `after` (a
    /// whole key, prefix included). Keys with one prefix are contiguous in byte order, so the walk
    /// still costs only its own rows; `total` counts the namespace's held locks, which costs one step
    /// per lock of that namespace.
    pub fn page_within(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        now: Instant,
    ) -> LockPage {
        let limit = limit.clamp(1, MAX_LOCKS_PAGE);
        let st = self.state.lock();
        let start = match after {
            Some(after) => Bound::Excluded(after),
            None if prefix.is_empty() => Bound::Unbounded,
            None => Bound::Included(prefix),
        };
        let mut keys = st
            .held
            .range::<str, _>((start, Bound::Unbounded))
            .take_while(|k| k.starts_with(prefix));
        let mut locks = Vec::with_capacity(limit.min(st.held.len()));
        for key in keys.by_ref().take(limit) {
            let Some(entry) = st.entries.get(key) else {
                continue;
            };
            let Some(h) = entry.holder.as_ref() else {
                continue;
            };
            locks.push(LockInfo {
                key: key.to_string(),
                owner: h.owner.to_string(),
                fence: h.fence,
                age_ms: now.saturating_duration_since(h.granted_at).as_millis() as u64,
                ttl_ms: h.expires_at.saturating_duration_since(now).as_millis() as u64,
                auto_renew: h.auto_renew,
                waiters: entry.queue.len() as u64,
            });
        }
        let more = keys.next().is_some();
        let next = more
            .then(|| locks.last().map(|row| row.key.clone()))
            .flatten();
        let total = if prefix.is_empty() {
            st.held.len()
        } else {
            st.held
                .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
                .take_while(|k| k.starts_with(prefix))
                .count()
        };
        LockPage {
            locks,
            total: total as u64,
            next,
        }
    }

    /// The locks held now, by key: every page, for tests and tools that want the whole list.
    pub fn list(&self, now: Instant) -> Vec<LockInfo> {
        let mut rows = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.page(after.as_deref(), MAX_LOCKS_PAGE, now);
            rows.extend(page.locks);
            match page.next {
                Some(next) => after = Some(next),
                None => return rows,
            }
        }
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

    /// Takes a waiter out of its queue in O(log n), or, if it was already granted and the grant sits
    /// unread in `rx`, releases that grant so it passes to the next waiter.
    fn withdraw(&self, key: &Arc<str>, ticket: u64, rx: &mut oneshot::Receiver<Grant>) {
        let mut st = self.state.lock();
        if let Some(entry) = st.entries.get_mut(key) {
            if entry.queue.remove(&ticket).is_some() {
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
