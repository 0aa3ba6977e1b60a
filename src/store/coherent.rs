//! The local cache in front of Redis: when a GET may be answered from it, when a value read from
//! Redis or written by this daemon may land in it, and how the invalidation stream empties it
//! (docs/coherence.md, "The mechanism").
//!
//! - Every entry carries the write sequence it is current at and the epoch it was cached in
//!   ([`Tag`]). A GET is answered from the cache only while the stream is whole, from an entry of
//!   the current epoch, and only when the applied sequence `A` has reached the read barrier `B` that
//!   lock grants raise.
//! - A fill (a miss's read) or an own write lands through a [`Watch`] taken before it was sent: it
//!   lands only if its epoch is still the current one and no invalidation of its key above its own
//!   sequence was applied meanwhile. The watch and the invalidations meet under one mutex, so no
//!   invalidation can slip between the check and the landing.
//! - Invalidations remove an entry only if they are newer than it; Flush starts a new epoch, in
//!   which nothing is cached until the stream is Synced again.
//!
//! Entries of an older epoch stay in the cache (the LRU evicts them) only so that a GET made while
//! Redis is unreachable can answer from them, marked degraded.
//!
//! Bounds: the entries are the session cache's (CACHE_SIZE, CACHE_MAX_BYTES); one watch record per
//! key with a read or write in flight, and those are bounded by the requests waiting on Redis.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use hashbrown::HashMap;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::cache::{SessionCache, Tag};
use crate::redis::coherence::{Event, Invalidations};

/// Counts for STATS `redis`.
#[derive(Default)]
pub struct CoherentCounters {
    /// GETs answered from the local cache with Redis available: Redis reads saved.
    pub hits: AtomicU64,
    /// GETs answered from the local cache while Redis was unreachable, marked degraded.
    pub degraded_hits: AtomicU64,
    /// Values read or written that did not land because an invalidation of their key, or a lost
    /// stream, came between their Redis step and their landing.
    pub fills_dropped: AtomicU64,
    /// Times the invalidation stream was lost and the cache flushed.
    pub flushes: AtomicU64,
    /// Invalidations applied.
    pub invalidations: AtomicU64,
}

/// A key with a fill or own write in flight.
struct Watched {
    /// Watches taken on the key and not yet dropped.
    count: usize,
    /// The highest sequence of an invalidation of the key applied while it was watched.
    newest: u64,
}

/// The cache in front of Redis and the state that says what of it may be served.
pub struct Coherent {
    /// The session cache, shared with the standalone path.
    cache: Arc<SessionCache>,
    /// The cache epoch: even while the stream is whole, odd between a Flush and the next Synced
    /// (nothing is served or cached then). Starts odd: nothing is cached before the first Synced.
    epoch: AtomicU64,
    /// `A`: the highest write sequence whose invalidation has been applied.
    applied: AtomicU64,
    /// `B`: the read barrier, raised by each lock grant to the sequence it was granted at.
    barrier: AtomicU64,
    /// Key → its watch record. Also the mutex under which landings, invalidations and epoch changes
    /// happen, one at a time.
    watches: Mutex<HashMap<String, Watched>>,
    /// For STATS.
    pub counters: CoherentCounters,
}

/// A fill's or an own write's claim, taken before its Redis step: dropped, it stops watching.
pub struct Watch {
    coherent: Arc<Coherent>,
    key: String,
    /// The epoch when it was taken; it lands only in the same one.
    epoch: u64,
}

impl Coherent {
    /// A cache in front of Redis over `cache`, empty of servable entries until the first Synced.
    pub fn new(cache: Arc<SessionCache>) -> Coherent {
        Coherent {
            cache,
            epoch: AtomicU64::new(1),
            applied: AtomicU64::new(0),
            barrier: AtomicU64::new(0),
            watches: Mutex::default(),
            counters: CoherentCounters::default(),
        }
    }

    /// The value under `key` if it may be answered from the cache now, in a normal answer.
    pub fn serve(&self, key: &str, now: Instant) -> Option<Bytes> {
        let epoch = self.epoch.load(Ordering::Acquire);
        // The barrier first: a LOCK answered before this GET was sent raised it already.
        let barrier = self.barrier.load(Ordering::Acquire);
        let caught_up = synced(epoch) && self.applied.load(Ordering::Acquire) >= barrier;
        let (value, _) = self
            .cache
            .get_tagged(key, now, |tag| caught_up && tag.epoch == epoch)?;
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        Some(value)
    }

    /// The value under `key`, of any epoch, for an answer made without Redis (marked degraded).
    pub fn serve_degraded(&self, key: &str, now: Instant) -> Option<Bytes> {
        let (value, _) = self.cache.get_tagged(key, now, |_| true)?;
        self.counters.degraded_hits.fetch_add(1, Ordering::Relaxed);
        Some(value)
    }

    /// Watches `key` for invalidations from now on: take it before the read or write is sent.
    pub fn watch(self: &Arc<Self>, key: &str) -> Watch {
        let mut watches = self.watches.lock();
        // Read under the mutex, so no epoch change falls between it and the record.
        let epoch = self.epoch.load(Ordering::Acquire);
        watches
            .entry(key.to_string())
            .or_insert(Watched {
                count: 0,
                newest: 0,
            })
            .count += 1;
        Watch {
            coherent: self.clone(),
            key: key.to_string(),
            epoch,
        }
    }

    /// Lands `value` read or written at sequence `seq` under `watch`'s key, unless an invalidation of
    /// the key above `seq` was applied since the watch began or the epoch changed. `None` lands the
    /// key's absence: it only removes an older entry. True when it landed.
    pub fn land(
        &self,
        watch: &Watch,
        value: Option<Bytes>,
        expires_at: Option<Instant>,
        seq: u64,
    ) -> bool {
        let now = Instant::now();
        let watches = self.watches.lock();
        let epoch = self.epoch.load(Ordering::Acquire);
        let newest = watches.get(&watch.key).map_or(0, |w| w.newest);
        if epoch != watch.epoch || !synced(epoch) || newest > seq {
            self.counters.fills_dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let Some(value) = value else {
            self.cache.remove_older(&watch.key, seq, epoch, now);
            return true;
        };
        let tag = Tag { seq, epoch };
        match self
            .cache
            .set_tagged(&watch.key, value, expires_at, tag, now)
        {
            Ok(landed) => landed,
            Err(_) => {
                // Too large to cache: whatever older value is there must not be served either.
                self.cache.remove(&watch.key, now);
                false
            }
        }
    }

    /// This daemon's own write of `key` was acknowledged with sequence `seq`: applied like its
    /// invalidation, at once, so a read begun before it never lands after it.
    pub fn wrote(&self, key: &str, seq: u64) {
        let watches = &mut *self.watches.lock();
        self.invalidate_locked(watches, key, seq);
    }

    /// Raises the read barrier to `seq`, the write sequence a lock was granted at.
    pub fn raise_barrier(&self, seq: u64) {
        self.barrier.fetch_max(seq, Ordering::AcqRel);
    }

    /// Applies one event of the invalidation stream.
    pub fn apply(&self, event: Event) {
        let mut watches = self.watches.lock();
        match event {
            Event::Invalidate { seq, key } => {
                self.invalidate_locked(&mut watches, &key, seq);
                self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
                self.applied.fetch_max(seq, Ordering::AcqRel);
            }
            Event::Flush => {
                if synced(self.epoch.load(Ordering::Acquire)) {
                    self.epoch.fetch_add(1, Ordering::AcqRel);
                    self.counters.flushes.fetch_add(1, Ordering::Relaxed);
                }
            }
            Event::Synced { seq } => {
                // A Redis that lost its data restarts its sequence: A and B follow it down.
                self.applied.store(seq, Ordering::Release);
                self.barrier.fetch_min(seq, Ordering::AcqRel);
                // Always a new even epoch: from odd (after a Flush) the next, from even the one after.
                let step = if synced(self.epoch.load(Ordering::Acquire)) {
                    2
                } else {
                    1
                };
                self.epoch.fetch_add(step, Ordering::AcqRel);
            }
        }
    }

    /// Removes `key`'s entry if older than `seq`, and records `seq` on its watch, under the mutex.
    fn invalidate_locked(&self, watches: &mut HashMap<String, Watched>, key: &str, seq: u64) {
        if let Some(w) = watches.get_mut(key) {
            w.newest = w.newest.max(seq);
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        self.cache.remove_older(key, seq, epoch, Instant::now());
    }

    /// Keys watched now.
    pub fn watched(&self) -> usize {
        self.watches.lock().len()
    }
}

/// Whether `epoch` is one in which the stream is whole: even.
fn synced(epoch: u64) -> bool {
    epoch.is_multiple_of(2)
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut watches = self.coherent.watches.lock();
        if let Some(w) = watches.get_mut(&self.key) {
            w.count -= 1;
            if w.count == 0 {
                watches.remove(&self.key);
            }
        }
    }
}

/// Applies the stream's events to the cache until the link closes.
pub async fn follow(coherent: Arc<Coherent>, mut stream: Invalidations) {
    while let Some(event) = stream.recv().await {
        coherent.apply(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheLimits;

    fn coherent() -> Arc<Coherent> {
        let cache = SessionCache::new(CacheLimits {
            max_entries: 100,
            max_bytes: None,
            shards: 1,
        });
        Arc::new(Coherent::new(Arc::new(cache)))
    }

    fn v(s: &'static str) -> Option<Bytes> {
        Some(Bytes::from_static(s.as_bytes()))
    }

    #[test]
    fn nothing_is_cached_before_synced_or_served_below_the_barrier() {
        let c = coherent();
        let now = Instant::now();
        let w = c.watch("k");
        assert!(
            !c.land(&w, v("a"), None, 3),
            "landed before the first Synced"
        );
        drop(w);
        c.apply(Event::Synced { seq: 3 });
        let w = c.watch("k");
        assert!(c.land(&w, v("a"), None, 3));
        assert_eq!(c.serve("k", now), v("a"));
        c.raise_barrier(5);
        assert_eq!(c.serve("k", now), None, "served below the barrier");
        c.apply(Event::Invalidate {
            seq: 4,
            key: "other".into(),
        });
        c.apply(Event::Invalidate {
            seq: 5,
            key: "other".into(),
        });
        assert_eq!(c.serve("k", now), v("a"));
    }

    #[test]
    fn a_fill_that_raced_an_invalidation_does_not_land() {
        let c = coherent();
        let now = Instant::now();
        c.apply(Event::Synced { seq: 10 });
        let fill = c.watch("k");
        // The read ran at 10; the write at 11 is applied before the fill lands.
        c.apply(Event::Invalidate {
            seq: 11,
            key: "k".into(),
        });
        assert!(!c.land(&fill, v("old"), None, 10));
        assert_eq!(c.serve("k", now), None);
        assert_eq!(c.counters.fills_dropped.load(Ordering::Relaxed), 1);
        // Its own write's invalidation (seq = the write's) does not evict the write.
        let own = c.watch("k");
        c.wrote("k", 12);
        assert!(c.land(&own, v("mine"), None, 12));
        c.apply(Event::Invalidate {
            seq: 12,
            key: "k".into(),
        });
        assert_eq!(c.serve("k", now), v("mine"));
        drop((fill, own));
        assert_eq!(c.watched(), 0, "a watch outlived its fill");
    }

    #[test]
    fn a_flush_forgets_for_normal_answers_but_not_for_degraded_ones() {
        let c = coherent();
        let now = Instant::now();
        c.apply(Event::Synced { seq: 1 });
        let w = c.watch("k");
        assert!(c.land(&w, v("a"), None, 1));
        let in_flight = c.watch("j");
        c.apply(Event::Flush);
        assert_eq!(c.serve("k", now), None);
        assert_eq!(c.serve_degraded("k", now), v("a"));
        c.apply(Event::Synced { seq: 7 });
        assert!(
            !c.land(&in_flight, v("b"), None, 7),
            "a fill of the old epoch landed"
        );
        assert_eq!(c.serve("k", now), None, "an old epoch's entry was served");
    }
}
