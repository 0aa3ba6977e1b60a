//! The lock table's state, all under the table's one mutex: the records, their holders and FIFO
//! queues, lease deadlines, the order in which free records are pruned, and the counters.
//!
//! Every structure here is bounded by the record limit (`SCALED_MAX_LOCKS`) or by the waiter limit
//! per lock (`SCALED_MAX_WAITERS`), and every operation on one lock is O(log n) in the size of the
//! table or the queue, so no request can make another wait on a long scan:
//!
//! - a queue is a `BTreeMap` keyed by ticket: tickets only grow, so the first entry is the oldest
//!   waiter, and a waiter that leaves is removed wherever it is without a scan;
//! - held keys are kept in byte order, so a page of LOCKS costs its rows, not the table;
//! - free records are kept in the order they became free, so the oldest is pruned first, whether
//!   because [`FENCE_RETENTION`] has passed or because a new record needs room under the limit.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;
use std::time::Duration;

use hashbrown::{HashMap, HashSet};
use hdrhistogram::Histogram;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::free::FreeList;
use super::{Grant, LockLimits, Status, AUTO_RENEW_MIN_LEASE, FENCE_RETENTION};

/// How many expired owner tokens a lock remembers, so their UNLOCK answers EXPIRED, not NOT_OWNER.
const EXPIRED_MEMORY: usize = 8;

/// The most overdue leases a LOCK needing a new record ends to find one free, so that step stays short.
const ROOM_EXPIRIES: usize = 64;

/// Maps and sets smaller than this are never shrunk: the churn would cost more than the memory.
const SHRINK_FLOOR: usize = 64;

/// The current holder of a lock.
pub(super) struct Holder {
    /// The owner token; UNLOCK and EXTEND must present it.
    pub(super) token: Uuid,
    /// The fencing token of this grant; with the deadline it names the holder in `deadlines`.
    pub(super) fence: u64,
    /// The connection that took the lock; its end releases the lock.
    pub(super) conn: u64,
    /// Who holds it, for LOCKS: shared with the connection, never copied per lock.
    pub(super) owner: Arc<str>,
    /// The lease length, renewed by EXTEND without `ttl_ms` and by auto-renew.
    pub(super) lease: Duration,
    /// Whether the lease renews itself while the connection lives.
    pub(super) auto_renew: bool,
    /// When this holder was granted the lock, for LOCKS `age_ms`.
    pub(super) granted_at: Instant,
    /// When the lease runs out.
    pub(super) expires_at: Instant,
}

/// A LOCK waiting its turn in a lock's queue.
pub(super) struct Waiter {
    /// The connection waiting; a grant makes it the holder's connection.
    pub(super) conn: u64,
    /// Cancelled when the connection closes: such a waiter is skipped, never granted.
    pub(super) alive: Arc<CancellationToken>,
    /// Who waits, for LOCKS once granted.
    pub(super) owner: Arc<str>,
    /// The lease it asked for.
    pub(super) lease: Duration,
    /// Whether its lease will renew itself.
    pub(super) auto_renew: bool,
    /// When it joined the queue, for `waited_us` and the wait percentiles.
    pub(super) enqueued_at: Instant,
    /// Where the grant goes; closed when the LOCK stopped waiting.
    pub(super) tx: oneshot::Sender<Grant>,
}

/// Where a free record stands in the pruning order.
#[derive(Clone, Copy)]
pub(super) struct FreeMark {
    /// Its slot in [`State::free`]: free records in the order they became free.
    slot: usize,
}

/// One lock's record: kept while the lock is held (and so while it has waiters), and for a while
/// after it became free, so its newest fencing token and expired owner tokens are remembered.
#[derive(Default)]
pub(super) struct Entry {
    /// Who holds the lock; `None` while it is free.
    pub(super) holder: Option<Holder>,
    /// Waiters by ticket. Tickets only grow, so the first is the oldest (FIFO), and a waiter that
    /// leaves is removed in O(log n) wherever it stands.
    pub(super) queue: BTreeMap<u64, Waiter>,
    /// The newest fencing token granted on this key.
    pub(super) last_fence: u64,
    /// Owner tokens whose lease ran out, newest last, at most [`EXPIRED_MEMORY`].
    pub(super) expired: VecDeque<Uuid>,
    /// Set while the lock is free: its place in the pruning order.
    pub(super) free: Option<FreeMark>,
}

/// Counts since start, for STATS.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) requests: u64,
    pub(super) contended: u64,
    pub(super) grants: u64,
    pub(super) timeouts: u64,
    pub(super) refused: u64,
    pub(super) overloaded: u64,
    pub(super) expiries: u64,
    pub(super) released_on_disconnect: u64,
    pub(super) renewals: u64,
}

/// Everything the table's mutex guards.
pub(super) struct State {
    /// Every lock record, by key. Boxed so that a map slot is two pointers, not a whole record: under
    /// churn the map holds up to about twice as many slots as records (tombstones make it grow
    /// before they are swept), and a slot holding the record inline would cost 200 bytes each.
    pub(super) entries: HashMap<Arc<str>, Box<Entry>>,
    /// Keys held now, in byte order: LOCKS pages through it from a cursor.
    pub(super) held: BTreeSet<Arc<str>>,
    /// Lease deadlines of current holders, by (deadline, fence); the fence makes each key unique.
    pub(super) deadlines: BTreeMap<(Instant, u64), Arc<str>>,
    /// Keys held, by connection, so a closing connection releases its locks without a scan.
    pub(super) held_by: HashMap<u64, HashSet<Arc<str>>>,
    /// Free records in the order they became free, oldest first; a record's [`FreeMark::slot`] says
    /// where it stands, so taking it again unlinks it in O(1).
    pub(super) free: FreeList,
    /// Requests waiting in all queues, including those of closed connections not yet dropped.
    pub(super) waiting: u64,
    /// When the expiry task next wakes on its own; a deadline before it must wake it.
    pub(super) wake_at: Option<Instant>,
    /// Set when a deadline before `wake_at` was scheduled; the public method that set it notifies.
    pub(super) wake_needed: bool,
    /// The last fencing token handed out.
    fence: u64,
    /// At least the newest token of every pruned record: what a fenced write naming a lock without a
    /// record must carry.
    pub(super) fence_floor: u64,
    /// The last ticket handed to a waiter.
    pub(super) next_ticket: u64,
    /// The record and queue limits.
    pub(super) limits: LockLimits,
    /// Counts since start, for STATS.
    pub(super) counters: Counters,
    /// Wait times of LOCKs that queued, in microseconds.
    pub(super) waits: Histogram<u32>,
}

impl State {
    /// An empty table whose fencing tokens start after `last`.
    pub(super) fn new(last: u64, limits: LockLimits) -> State {
        State {
            entries: HashMap::new(),
            held: BTreeSet::new(),
            deadlines: BTreeMap::new(),
            held_by: HashMap::new(),
            free: FreeList::new(),
            waiting: 0,
            wake_at: None,
            wake_needed: false,
            fence: last,
            fence_floor: last,
            next_ticket: 0,
            limits,
            counters: Counters::default(),
            waits: Histogram::new_with_bounds(1, 86_400_000_000, 2)
                .expect("constant histogram bounds are valid"),
        }
    }

    /// The next fencing token. The one place tokens are made: one counter for every key, so tokens
    /// strictly increase per key and no two grants share one.
    fn mint_fence(&mut self) -> u64 {
        self.fence += 1;
        self.fence
    }

    /// Raises the counter to at least `fence`, a token issued elsewhere (a shared backend), so the
    /// tokens minted here afterwards stay above it.
    pub(super) fn raise_fence(&mut self, fence: u64) {
        self.fence = self.fence.max(fence);
    }

    /// The lease a holder gets: an auto-renew lease is at least [`AUTO_RENEW_MIN_LEASE`], so that
    /// renewing every auto-renew lock costs at most one step per lock per that period.
    pub(super) fn effective_lease(lease: Duration, auto_renew: bool) -> Duration {
        if auto_renew {
            lease.max(AUTO_RENEW_MIN_LEASE)
        } else {
            lease
        }
    }

    /// Makes sure a new record fits under the limit, pruning the oldest free record if need be. With
    /// none free, leases already past their deadline are ended first (at most [`ROOM_EXPIRIES`]), as the
    /// expiry task would, so a lease that has just run out never costs a refusal. False when every
    /// record is held (or waited for), so there is nothing to give up.
    pub(super) fn make_room(&mut self, now: Instant) -> bool {
        let mut expiries = 0;
        while self.entries.len() >= self.limits.max_records {
            if let Some(key) = self.free.pop_front() {
                self.prune(&key);
                continue;
            }
            let due = self
                .deadlines
                .first_key_value()
                .filter(|((at, _), _)| *at <= now)
                .map(|(_, key)| key.clone());
            match due {
                Some(key) if expiries < ROOM_EXPIRIES => {
                    expiries += 1;
                    // Expires it (freeing the record unless a waiter takes it) or renews an auto-renew
                    // lease past `now`: either way this deadline is not due again.
                    self.expire_if_due(&key, now);
                }
                _ => return false,
            }
        }
        true
    }

    /// Prunes free records that have been free for [`FENCE_RETENTION`], oldest first, at most `budget`
    /// of them, so one pass never holds the table for long. True if the budget ran out first.
    pub(super) fn prune_retained(&mut self, now: Instant, budget: usize) -> bool {
        for _ in 0..budget {
            if !self.oldest_free_is_due(now) {
                return false;
            }
            if let Some(key) = self.free.pop_front() {
                self.prune(&key);
            }
        }
        true
    }

    /// Whether the oldest free record has been free for [`FENCE_RETENTION`].
    fn oldest_free_is_due(&self, now: Instant) -> bool {
        self.free
            .front()
            .is_some_and(|(_, since)| now.saturating_duration_since(since) >= FENCE_RETENTION)
    }

    /// Drops a free record (already out of `free`), raising the fence floor to its newest token so
    /// that tokens on the key never go backwards for a fenced write.
    fn prune(&mut self, key: &Arc<str>) {
        if let Some(entry) = self.entries.remove(key) {
            debug_assert!(entry.holder.is_none() && entry.queue.is_empty());
            self.fence_floor = self.fence_floor.max(entry.last_fence);
        }
        shrink_map(&mut self.entries);
    }

    /// Records that the free lock `key` is free from `now`, at the back of the pruning order.
    fn mark_free(&mut self, key: &Arc<str>, now: Instant) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        if entry.free.is_some() {
            return;
        }
        let slot = self.free.push_back(key.clone(), now);
        entry.free = Some(FreeMark { slot });
    }

    /// Makes a new holder of the (free) lock `key` and returns its grant.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn install(
        &mut self,
        key: &Arc<str>,
        owner: &Arc<str>,
        conn: u64,
        lease: Duration,
        auto_renew: bool,
        now: Instant,
        waited_us: u64,
    ) -> Grant {
        let lease = State::effective_lease(lease, auto_renew);
        let fence = self.mint_fence();
        let token = Uuid::new_v4();
        let expires_at = now + lease;
        self.schedule(expires_at, fence, key);
        self.held_by.entry(conn).or_default().insert(key.clone());
        self.held.insert(key.clone());
        self.counters.grants += 1;
        let entry = self.entries.entry(key.clone()).or_default();
        if let Some(mark) = entry.free.take() {
            self.free.remove(mark.slot);
        }
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
    pub(super) fn status_of(&self, key: &str, token: &str) -> Status {
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
    pub(super) fn vacate(&mut self, key: &Arc<str>) -> Option<Holder> {
        let holder = self.entries.get_mut(key)?.holder.take()?;
        self.deadlines.remove(&(holder.expires_at, holder.fence));
        self.held.remove(key);
        if let Some(keys) = self.held_by.get_mut(&holder.conn) {
            keys.remove(key);
            if keys.is_empty() {
                self.held_by.remove(&holder.conn);
                shrink_map(&mut self.held_by);
            } else {
                shrink_set(keys);
            }
        }
        Some(holder)
    }

    /// Grants the free lock `key` to the first waiter still alive and listening, or marks it free.
    pub(super) fn hand_on(&mut self, key: &Arc<str>, now: Instant) {
        loop {
            let Some(entry) = self.entries.get_mut(key) else {
                return;
            };
            let Some((_, waiter)) = entry.queue.pop_first() else {
                self.mark_free(key, now);
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
    pub(super) fn expire_if_due(&mut self, key: &Arc<str>, now: Instant) {
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
                if entry.expired.len() == EXPIRED_MEMORY {
                    entry.expired.pop_front();
                }
                entry.expired.push_back(holder.token);
            }
            self.hand_on(key, now);
        }
    }

    /// Moves the holder's deadline to `now + lease`.
    pub(super) fn renew(&mut self, key: &Arc<str>, lease: Duration, now: Instant) {
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
}

/// Gives a map's memory back once it is mostly empty: under an eighth full, it shrinks to twice its
/// length. A shrink costs O(capacity) and at least ~40% of the entries must go before the next, so
/// the cost is amortised O(1) per removal, never quadratic.
fn shrink_map<K: Eq + Hash, V, S: BuildHasher>(map: &mut HashMap<K, V, S>) {
    if map.capacity() > SHRINK_FLOOR && map.len() < map.capacity() / 8 {
        map.shrink_to(map.len() * 2);
    }
}

/// [`shrink_map`] for a set.
fn shrink_set<K: Eq + Hash, S: BuildHasher>(set: &mut HashSet<K, S>) {
    if set.capacity() > SHRINK_FLOOR && set.len() < set.capacity() / 8 {
        set.shrink_to(set.len() * 2);
    }
}
