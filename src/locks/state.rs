//! The lock table's state, all under the table's one mutex: the records, their holders and FIFO
//! queues, lease deadlines, the records kept after their lock became free, and the counters.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use hashbrown::{HashMap, HashSet};
use hdrhistogram::Histogram;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Grant, Status, FENCE_RETENTION};

/// How many expired owner tokens a lock remembers, so their UNLOCK answers EXPIRED, not NOT_OWNER.
const EXPIRED_MEMORY: usize = 8;

pub(super) struct Holder {
    pub(super) token: Uuid,
    pub(super) fence: u64,
    pub(super) conn: u64,
    pub(super) owner: Arc<str>,
    pub(super) lease: Duration,
    pub(super) auto_renew: bool,
    pub(super) granted_at: Instant,
    pub(super) expires_at: Instant,
}

pub(super) struct Waiter {
    pub(super) ticket: u64,
    pub(super) conn: u64,
    pub(super) alive: CancellationToken,
    pub(super) owner: Arc<str>,
    pub(super) lease: Duration,
    pub(super) auto_renew: bool,
    pub(super) enqueued_at: Instant,
    pub(super) tx: oneshot::Sender<Grant>,
}

#[derive(Default)]
pub(super) struct Entry {
    pub(super) holder: Option<Holder>,
    pub(super) queue: VecDeque<Waiter>,
    /// The newest fencing token granted on this key.
    pub(super) last_fence: u64,
    /// Owner tokens whose lease ran out, newest last.
    pub(super) expired: VecDeque<Uuid>,
    /// When the lock last became free; the record is pruned [`FENCE_RETENTION`] after.
    pub(super) free_since: Option<Instant>,
    /// Whether the key is in [`State::idle`], so each key is queued there at most once.
    pub(super) in_idle: bool,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) requests: u64,
    pub(super) contended: u64,
    pub(super) grants: u64,
    pub(super) timeouts: u64,
    pub(super) refused: u64,
    pub(super) expiries: u64,
    pub(super) released_on_disconnect: u64,
    pub(super) renewals: u64,
}

pub(super) struct State {
    pub(super) entries: HashMap<Arc<str>, Entry>,
    /// Lease deadlines of current holders, by (deadline, fence); the fence makes each key unique.
    pub(super) deadlines: BTreeMap<(Instant, u64), Arc<str>>,
    /// Keys held, by connection, so a closing connection releases its locks without a scan.
    pub(super) held_by: HashMap<u64, HashSet<Arc<str>>>,
    /// Keys that became free, roughly oldest first, for pruning after [`FENCE_RETENTION`].
    pub(super) idle: VecDeque<Arc<str>>,
    /// Requests waiting in all queues, including those of closed connections not yet dropped.
    pub(super) waiting: u64,
    /// When the expiry task next wakes on its own; a deadline before it must wake it.
    pub(super) wake_at: Option<Instant>,
    /// Set when a deadline before `wake_at` was scheduled; the public method that set it notifies.
    pub(super) wake_needed: bool,
    /// The last fencing token handed out.
    pub(super) fence: u64,
    /// At least the newest token of every pruned entry.
    pub(super) fence_floor: u64,
    pub(super) next_ticket: u64,
    pub(super) counters: Counters,
    /// Wait times of LOCKs that queued, in microseconds.
    pub(super) waits: Histogram<u32>,
}

impl State {
    /// The table's own `Arc` for `key`, or a new one.
    pub(super) fn key_arc(&self, key: &str) -> Arc<str> {
        self.entries
            .get_key_value(key)
            .map_or_else(|| Arc::from(key), |(k, _)| k.clone())
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
        if let Some(keys) = self.held_by.get_mut(&holder.conn) {
            keys.remove(key);
            if keys.is_empty() {
                self.held_by.remove(&holder.conn);
            }
        }
        Some(holder)
    }

    /// Grants the free lock `key` to the first waiter still alive and listening, or marks it idle.
    pub(super) fn hand_on(&mut self, key: &Arc<str>, now: Instant) {
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
                entry.expired.push_back(holder.token);
                if entry.expired.len() > EXPIRED_MEMORY {
                    entry.expired.pop_front();
                }
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
    pub(super) fn schedule(&mut self, at: Instant, fence: u64, key: &Arc<str>) {
        self.deadlines.insert((at, fence), key.clone());
        if self.wake_at.is_none_or(|w| at < w) {
            self.wake_needed = true;
        }
    }

    /// Drops the records of locks free for longer than [`FENCE_RETENTION`], raising the fence floor.
    pub(super) fn prune_idle(&mut self, now: Instant) {
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
