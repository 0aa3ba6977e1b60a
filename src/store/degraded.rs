//! Degraded mode: what the store does while Redis is configured but unreachable, and how it comes
//! back (proto-spec.md, "Degraded answers" and "Lost locks"; docs/coherence.md, "Across degraded
//! mode").
//!
//! - [`Marked`]: a store result with whether it was made without Redis, so the `degraded` flag
//!   travels with each answer rather than being read from the link's health when it is written.
//! - [`Degraded`]: the state degraded mode needs. The time spent unavailable (for STATS); the locks
//!   this daemon granted from its own table while Redis was away ([`LocalGrant`]), which UNLOCK and
//!   EXTEND act on locally until they are adopted into Redis; and the owner tokens of locks that were
//!   lost without their holder letting go, which UNLOCK and EXTEND answer `LOCK_LOST`.
//!
//! How the daemon comes back when Redis does is [`crate::store::recovery`]'s: it adopts the local
//! grants kept here.
//!
//! Bounds: local grants are locks held in the local table (bounded by it, one per held lock); lost
//! tokens are kept [`LOST_PER_LOCK`] per lock for at most [`MAX_LOST_LOCKS`] locks, the oldest lock
//! forgotten first.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hashbrown::HashMap;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::locks::LockTable;
use crate::redis::Health;

/// Lost owner tokens remembered per lock, like the expired ones of the lock table.
pub const LOST_PER_LOCK: usize = 8;

/// Most locks whose lost tokens are remembered; past it the lock that lost one first is forgotten
/// (its tokens then answer as any unknown token does).
pub const MAX_LOST_LOCKS: usize = 65_536;

/// A store result, and whether it was made without Redis while Redis is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marked<T> {
    /// What the store answers.
    pub value: T,
    /// The answer's `degraded` flag.
    pub degraded: bool,
}

impl<T> Marked<T> {
    /// A result made with Redis, or standalone.
    pub fn plain(value: T) -> Marked<T> {
        Marked {
            value,
            degraded: false,
        }
    }

    /// A result made without Redis.
    pub fn degraded(value: T) -> Marked<T> {
        Marked {
            value,
            degraded: true,
        }
    }
}

/// A lock granted from the local table while Redis was unreachable, waiting to be adopted.
#[derive(Debug, Clone, Copy)]
pub struct LocalGrant {
    /// The lease it was granted (or last extended) with: the lease it is adopted with.
    pub lease: Duration,
    /// Its fencing token, issued here; adoption keeps it.
    pub fence: u64,
    /// Whether it is renewed in Redis once adopted.
    pub auto_renew: bool,
}

/// Time spent unavailable, for STATS `redis.degraded_seconds`.
struct Clock {
    /// When Redis last became unavailable; `None` while it is available.
    down_since: Option<Instant>,
    /// Unavailable time before `down_since`.
    total: Duration,
}

/// Owner tokens of lost locks, [`LOST_PER_LOCK`] per lock, for [`MAX_LOST_LOCKS`] locks.
#[derive(Default)]
struct Lost {
    /// Lock → its lost tokens, newest last.
    tokens: HashMap<String, VecDeque<String>>,
    /// Locks in the order they first lost a token: which to forget when full.
    order: VecDeque<String>,
}

/// The state of degraded mode, kept by the remote tier.
pub struct Degraded {
    /// Unavailable time.
    clock: Mutex<Clock>,
    /// (lock, owner token) → grant, for locks granted locally and not yet adopted into Redis.
    local: Mutex<HashMap<(String, String), LocalGrant>>,
    /// Tokens whose lock was lost.
    lost: Mutex<Lost>,
    /// Locks lost since start (refused renewals and superseded adoptions), for STATS.
    locks_lost: AtomicU64,
}

impl Degraded {
    /// The state at start: the link starts unavailable until its first connection.
    pub fn new(now: Instant) -> Degraded {
        Degraded {
            clock: Mutex::new(Clock {
                down_since: Some(now),
                total: Duration::ZERO,
            }),
            local: Mutex::default(),
            lost: Mutex::default(),
            locks_lost: AtomicU64::new(0),
        }
    }

    /// Total time Redis has been unavailable since start, up to `now`.
    pub fn unavailable_for(&self, now: Instant) -> Duration {
        let clock = self.clock.lock();
        clock.total
            + clock
                .down_since
                .map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }

    /// Follows a change of health.
    pub(super) fn health_changed(&self, health: Health, now: Instant) {
        let mut clock = self.clock.lock();
        match (health, clock.down_since) {
            (Health::Down, None) => clock.down_since = Some(now),
            (Health::Up, Some(since)) => {
                clock.total += now.saturating_duration_since(since);
                clock.down_since = None;
            }
            _ => {}
        }
    }

    /// Records a lock granted locally while Redis is unreachable.
    pub fn granted_locally(&self, lock: &str, token: &str, grant: LocalGrant) {
        self.local
            .lock()
            .insert((lock.to_string(), token.to_string()), grant);
    }

    /// Whether `token`'s grant of `lock` was made locally and is not adopted yet.
    pub fn is_local(&self, lock: &str, token: &str) -> bool {
        self.local
            .lock()
            .contains_key(&(lock.to_string(), token.to_string()))
    }

    /// Forgets a local grant (released); true if it was one.
    pub fn forget_local(&self, lock: &str, token: &str) -> bool {
        self.local
            .lock()
            .remove(&(lock.to_string(), token.to_string()))
            .is_some()
    }

    /// Records the new lease of a local grant extended before its adoption.
    pub fn extended_locally(&self, lock: &str, token: &str, lease: Duration) {
        if let Some(g) = self
            .local
            .lock()
            .get_mut(&(lock.to_string(), token.to_string()))
        {
            g.lease = lease;
        }
    }

    /// Locks granted locally and not adopted yet.
    pub fn local_grants(&self) -> usize {
        self.local.lock().len()
    }

    /// A copy of those grants, (lock, owner token) and grant, for adoption to go through.
    pub(super) fn local_grants_now(&self) -> Vec<((String, String), LocalGrant)> {
        self.local
            .lock()
            .iter()
            .map(|(k, g)| (k.clone(), *g))
            .collect()
    }

    /// Whether `token` held `lock` and lost it.
    pub fn is_lost(&self, lock: &str, token: &str) -> bool {
        self.lost
            .lock()
            .tokens
            .get(lock)
            .is_some_and(|t| t.iter().any(|t| t == token))
    }

    /// Locks lost since start.
    pub fn locks_lost(&self) -> u64 {
        self.locks_lost.load(Ordering::Relaxed)
    }

    /// Counts `token`'s grant of `lock` as lost, remembers the token, and lets the lock go locally
    /// (the next local waiter then asks Redis).
    pub fn lose(&self, locks: &LockTable, lock: &str, token: &str, why: &str) {
        self.local
            .lock()
            .remove(&(lock.to_string(), token.to_string()));
        {
            let mut lost = self.lost.lock();
            let Lost { tokens, order } = &mut *lost;
            let remembered = tokens.entry(lock.to_string()).or_insert_with(|| {
                order.push_back(lock.to_string());
                VecDeque::new()
            });
            if remembered.len() == LOST_PER_LOCK {
                remembered.pop_front();
            }
            remembered.push_back(token.to_string());
            while tokens.len() > MAX_LOST_LOCKS {
                match order.pop_front() {
                    Some(oldest) => {
                        tokens.remove(&oldest);
                    }
                    None => break,
                }
            }
        }
        self.locks_lost.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(lock, reason = why, "a lock was lost");
        locks.release(lock, token, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_tokens_are_bounded_per_lock() {
        let d = Degraded::new(Instant::now());
        let locks = LockTable::new();
        for i in 0..LOST_PER_LOCK + 2 {
            d.lose(&locks, "k", &format!("t{i}"), "test");
        }
        assert!(!d.is_lost("k", "t0"));
        assert!(!d.is_lost("k", "t1"));
        assert!(d.is_lost("k", &format!("t{}", LOST_PER_LOCK + 1)));
        assert!(!d.is_lost("other", "t5"));
        assert_eq!(d.locks_lost(), (LOST_PER_LOCK + 2) as u64);
    }

    #[test]
    fn the_clock_counts_only_unavailable_time() {
        let t0 = Instant::now();
        let d = Degraded::new(t0);
        d.health_changed(Health::Up, t0 + Duration::from_secs(2));
        assert_eq!(
            d.unavailable_for(t0 + Duration::from_secs(10)),
            Duration::from_secs(2)
        );
        d.health_changed(Health::Down, t0 + Duration::from_secs(10));
        assert_eq!(
            d.unavailable_for(t0 + Duration::from_secs(13)),
            Duration::from_secs(5)
        );
    }
}
