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

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use hashbrown::{HashMap, HashSet};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How long an unused lock's record (its newest fencing token) is kept after its last release.
pub const FENCE_RETENTION: Duration = Duration::from_secs(3600);

/// How many expired owner tokens a lock remembers, so their UNLOCK answers EXPIRED, not NOT_OWNER.
const EXPIRED_MEMORY: usize = 8;

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

struct Holder {
    token: Uuid,
    fence: u64,
    conn: u64,
    owner: Arc<str>,
    lease: Duration,
    auto_renew: bool,
    granted_at: Instant,
    expires_at: Instant,
}

struct Waiter {
    ticket: u64,
    conn: u64,
    alive: CancellationToken,
    owner: Arc<str>,
    lease: Duration,
    auto_renew: bool,
    enqueued_at: Instant,
    tx: oneshot::Sender<Grant>,
}

#[derive(Default)]
struct Entry {
    holder: Option<Holder>,
    queue: VecDeque<Waiter>,
    /// The newest fencing token granted on this key.
    last_fence: u64,
    /// Owner tokens whose lease ran out, newest last.
    expired: VecDeque<Uuid>,
    /// When the lock last became free; the record is pruned [`FENCE_RETENTION`] after.
    free_since: Option<Instant>,
    /// Whether the key is in [`State::idle`], so each key is queued there at most once.
    in_idle: bool,
}

#[derive(Default)]
struct Counters {
    requests: u64,
    contended: u64,
    grants: u64,
    timeouts: u64,
    refused: u64,
    expiries: u64,
    released_on_disconnect: u64,
    renewals: u64,
}

struct State {
    entries: HashMap<Arc<str>, Entry>,
    /// Lease deadlines of current holders, by (deadline, fence); the fence makes each key unique.
    deadlines: BTreeMap<(Instant, u64), Arc<str>>,
    /// Keys held, by connection, so a closing connection releases its locks without a scan.
    held_by: HashMap<u64, HashSet<Arc<str>>>,
    /// Keys that became free, roughly oldest first, for pruning after [`FENCE_RETENTION`].
    idle: VecDeque<Arc<str>>,
    /// Requests waiting in all queues, including those of closed connections not yet dropped.
    waiting: u64,
    /// When the expiry task next wakes on its own; a deadline before it must wake it.
    wake_at: Option<Instant>,
    /// Set when a deadline before `wake_at` was scheduled; the public method that set it notifies.
    wake_needed: bool,
    /// The last fencing token handed out.
    fence: u64,
    /// At least the newest token of every pruned entry.
    fence_floor: u64,
    next_ticket: u64,
    counters: Counters,
    /// Wait times of LOCKs that queued, in microseconds.
    waits: Histogram<u32>,
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
    /// queued waits can be granted afterwards. Answers the (key, owner token) pairs released, so a
    /// shared backend can release them too.
    pub fn release_connection(&self, conn: u64, now: Instant) -> Vec<(String, String)> {
        let mut st = self.state.lock();
        let Some(keys) = st.held_by.remove(&conn) else {
            return Vec::new();
        };
        let mut released = Vec::with_capacity(keys.len());
        for key in keys {
            if st
                .entries
                .get(&key)
                .and_then(|e| e.holder.as_ref())
                .is_some_and(|h| h.conn == conn)
            {
                st.counters.released_on_disconnect += 1;
                if let Some(holder) = st.vacate(&key) {
                    released.push((key.to_string(), holder.token.to_string()));
                }
                st.hand_on(&key, now);
            }
        }
        self.unlock_and_wake(st);
        released
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
        st.fence = st.fence.max(fence);
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

    /// Runs `read` on the wait times (µs) of the LOCKs that queued and were granted, since start: the
    /// histogram behind `wait_p50`..`wait_p99`, which /metrics exposes in full.
    pub fn read_waits<T>(&self, read: impl FnOnce(&Histogram<u32>) -> T) -> T {
        read(&self.state.lock().waits)
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

impl State {
    /// The table's own `Arc` for `key`, or a new one.
    fn key_arc(&self, key: &str) -> Arc<str> {
        self.entries
            .get_key_value(key)
            .map_or_else(|| Arc::from(key), |(k, _)| k.clone())
    }

    /// Makes a new holder of the (free) lock `key` and returns its grant.
    #[allow(clippy::too_many_arguments)]
    fn install(
        &mut self,
        key: &Arc<str>,
        owner: &Arc<str>,
        conn: u64,
        lease: Duration,
        auto_renew: bool,
        now: Instant,
        waited_us: u64,
    ) -> Grant {
        self.fence += 1;
        let fence = self.fence;
        let token = Uuid::new_v4();
        let expires_at = now + lease;
        self.schedule(expires_at, fence, key);
        self.held_by.entry(conn).or_default().insert(key.clone());
        self.counters.grants += 1;
        let entry = self.entries.entry(key.clone()).or_default();
        entry.last_fence = fence;
        entry.holder = Some(Holder {
            token,
            fence,
            conn,
            owner: owner.clone(),
            lease,
            auto_renew,
            granted_at: now,
            expires_at,
        });
        Grant {
            token: token.to_string(),
            fence,
            ttl_ms: lease.as_millis() as u64,
            waited_us,
        }
    }

    /// What UNLOCK or EXTEND with `token` would find on `key`.
    fn status_of(&self, key: &str, token: &str) -> Status {
        let Some(entry) = self.entries.get(key) else {
            return Status::NotLocked;
        };
        let token = Uuid::try_parse(token).ok();
        match &entry.holder {
            Some(h) if Some(h.token) == token => Status::Ok,
            _ if token.is_some_and(|t| entry.expired.contains(&t)) => Status::Expired,
            Some(_) => Status::NotOwner,
            None => Status::NotLocked,
        }
    }

    /// Removes the holder of `key` and its bookkeeping; the caller hands the lock on.
    fn vacate(&mut self, key: &Arc<str>) -> Option<Holder> {
        let holder = self.entries.get_mut(key)?.holder.take()?;
        self.deadlines.remove(&(holder.expires_at, holder.fence));
        if let Some(keys) = self.held_by.get_mut(&holder.conn) {
            keys.remove(key);
            if keys.is_empty() {
                self.held_by.remove(&holder.conn);
            }
        }
        Some(holder)
    }

    /// Grants the free lock `key` to the first waiter still alive and listening, or marks it idle.
    fn hand_on(&mut self, key: &Arc<str>, now: Instant) {
        loop {
            let Some(entry) = self.entries.get_mut(key) else {
                return;
            };
            let Some(waiter) = entry.queue.pop_front() else {
                entry.free_since = Some(now);
                if !entry.in_idle {
                    entry.in_idle = true;
                    self.idle.push_back(key.clone());
                }
                return;
            };
            self.waiting -= 1;
            if waiter.alive.is_cancelled() || waiter.tx.is_closed() {
                continue;
            }
            let waited_us = now
                .saturating_duration_since(waiter.enqueued_at)
                .as_micros() as u64;
            let grant = self.install(
                key,
                &waiter.owner,
                waiter.conn,
                waiter.lease,
                waiter.auto_renew,
                now,
                waited_us,
            );
            if waiter.tx.send(grant).is_ok() {
                self.waits.saturating_record(waited_us.max(1));
                return;
            }
            // The waiter stopped listening after all: undo and try the next.
            self.counters.grants -= 1;
            self.vacate(key);
        }
    }

    /// If the holder of `key` is past its deadline: renews it when it auto-renews, otherwise expires
    /// it and hands the lock on.
    fn expire_if_due(&mut self, key: &Arc<str>, now: Instant) {
        let Some(h) = self.entries.get(key).and_then(|e| e.holder.as_ref()) else {
            return;
        };
        if h.expires_at > now {
            return;
        }
        if h.auto_renew {
            let lease = h.lease;
            self.counters.renewals += 1;
            self.renew(key, lease, now);
            return;
        }
        if let Some(holder) = self.vacate(key) {
            self.counters.expiries += 1;
            if let Some(entry) = self.entries.get_mut(key) {
                entry.expired.push_back(holder.token);
                if entry.expired.len() > EXPIRED_MEMORY {
                    entry.expired.pop_front();
                }
            }
            self.hand_on(key, now);
        }
    }

    /// Moves the holder's deadline to `now + lease`.
    fn renew(&mut self, key: &Arc<str>, lease: Duration, now: Instant) {
        let Some(h) = self.entries.get_mut(key).and_then(|e| e.holder.as_mut()) else {
            return;
        };
        let old = (h.expires_at, h.fence);
        h.expires_at = now + lease;
        h.lease = lease;
        let (at, fence) = (h.expires_at, h.fence);
        self.deadlines.remove(&old);
        self.schedule(at, fence, key);
    }

    /// Records a holder's deadline, and whether the expiry task must wake earlier than planned.
    fn schedule(&mut self, at: Instant, fence: u64, key: &Arc<str>) {
        self.deadlines.insert((at, fence), key.clone());
        if self.wake_at.is_none_or(|w| at < w) {
            self.wake_needed = true;
        }
    }

    /// Drops the records of locks free for longer than [`FENCE_RETENTION`], raising the fence floor.
    fn prune_idle(&mut self, now: Instant) {
        while let Some(key) = self.idle.front().cloned() {
            let Some(entry) = self.entries.get_mut(&key) else {
                self.idle.pop_front();
                continue;
            };
            if entry.holder.is_some() {
                // Taken again; it is queued anew when it next becomes free.
                entry.in_idle = false;
                self.idle.pop_front();
                continue;
            }
            let due = entry
                .free_since
                .is_none_or(|t| now.saturating_duration_since(t) >= FENCE_RETENTION);
            if !due {
                break;
            }
            self.idle.pop_front();
            if let Some(entry) = self.entries.remove(&key) {
                self.fence_floor = self.fence_floor.max(entry.last_fence);
            }
        }
    }
}

/// A place in a lock's queue. Await [`WaitTicket::granted`]; dropping the ticket leaves the queue, and
/// if the grant had already been sent, releases it to the next waiter, so a grant never goes to
/// someone who stopped waiting.
pub struct WaitTicket {
    table: Arc<LockTable>,
    key: Arc<str>,
    ticket: u64,
    /// `None` once the grant has been taken out.
    rx: Option<oneshot::Receiver<Grant>>,
}

impl WaitTicket {
    /// Waits for the grant. `None` if the table dropped the wait (its connection closed).
    pub async fn granted(&mut self) -> Option<Grant> {
        let rx = self.rx.as_mut()?;
        let grant = rx.await.ok();
        self.rx = None;
        grant
    }

    /// Gives up waiting because the wait timeout passed.
    pub fn time_out(self) {
        self.table.count_timeout();
    }
}

impl Drop for WaitTicket {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            self.table.withdraw(&self.key, self.ticket, &mut rx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(conn: u64, lease_ms: u64) -> LockRequest {
        LockRequest {
            conn,
            alive: CancellationToken::new(),
            owner: Arc::from(format!("test#{conn}")),
            lease: Duration::from_millis(lease_ms),
            auto_renew: false,
            try_only: false,
        }
    }

    fn granted(a: Acquire) -> Grant {
        match a {
            Acquire::Granted(g) => g,
            _ => panic!("expected an immediate grant"),
        }
    }

    fn queued(a: Acquire) -> WaitTicket {
        match a {
            Acquire::Queued(t) => t,
            _ => panic!("expected to queue"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lease_expiry_hands_the_lock_on() {
        let table = Arc::new(LockTable::new());
        tokio::spawn(table.clone().run_expiry(CancellationToken::new()));
        let first = granted(table.acquire("k", req(1, 1000), Instant::now()));
        let mut ticket = queued(table.acquire("k", req(2, 1000), Instant::now()));
        // Paused time jumps to the lease deadline; the expiry task grants the waiter.
        let second = ticket.granted().await.expect("granted after expiry");
        assert!(second.fence > first.fence);
        assert!(second.waited_us >= 1_000_000);
        assert_eq!(
            table.release("k", &first.token, Instant::now()),
            Status::Expired
        );
        assert_eq!(table.stats().expiries, 1);
        assert_eq!(
            table.release("k", &second.token, Instant::now()),
            Status::Ok
        );
    }

    #[tokio::test(start_paused = true)]
    async fn auto_renew_outlives_its_lease() {
        let table = Arc::new(LockTable::new());
        tokio::spawn(table.clone().run_expiry(CancellationToken::new()));
        let held = granted(table.acquire(
            "k",
            LockRequest {
                auto_renew: true,
                ..req(1, 100)
            },
            Instant::now(),
        ));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(matches!(
            table.acquire(
                "k",
                LockRequest {
                    try_only: true,
                    ..req(2, 100)
                },
                Instant::now()
            ),
            Acquire::Busy
        ));
        assert!(table.stats().renewals >= 40);
        assert_eq!(table.release("k", &held.token, Instant::now()), Status::Ok);
    }

    #[tokio::test]
    async fn dropped_ticket_with_unread_grant_passes_it_on() {
        let table = Arc::new(LockTable::new());
        let now = Instant::now();
        let first = granted(table.acquire("k", req(1, 10_000), now));
        let gone = queued(table.acquire("k", req(2, 10_000), now));
        let mut third = queued(table.acquire("k", req(3, 10_000), now));
        assert_eq!(table.release("k", &first.token, now), Status::Ok);
        // The second waiter was granted but never read it; dropping it must pass the lock on.
        drop(gone);
        let g = third.granted().await.expect("third granted");
        assert_eq!(table.list(Instant::now())[0].owner, "test#3");
        assert_eq!(table.release("k", &g.token, Instant::now()), Status::Ok);
    }

    #[test]
    fn closed_connection_is_never_granted() {
        let table = Arc::new(LockTable::new());
        let now = Instant::now();
        let first = granted(table.acquire("k", req(1, 10_000), now));
        let dead = req(2, 10_000);
        let alive = dead.alive.clone();
        let _ticket = queued(table.acquire("k", dead, now));
        alive.cancel();
        table.release_connection(2, now);
        assert_eq!(table.release("k", &first.token, now), Status::Ok);
        assert!(table.list(now).is_empty(), "the dead waiter was granted");
    }

    #[test]
    fn fenced_writes_need_the_newest_token() {
        let table = Arc::new(LockTable::new());
        let now = Instant::now();
        let a = granted(table.acquire("k", req(1, 10_000), now));
        assert!(table.fenced("k", a.fence, || ()).is_ok());
        table.release("k", &a.token, now);
        let b = granted(table.acquire("k", req(1, 10_000), now));
        assert!(b.fence > a.fence);
        assert!(table.fenced("k", a.fence, || ()).is_err());
        assert!(table.fenced("k", b.fence + 1, || ()).is_err());
        assert!(table.fenced("k", b.fence, || ()).is_ok());
        assert!(table.fenced("never-locked", 1, || ()).is_err());
    }
}
