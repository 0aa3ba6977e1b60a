//! The session cache: a sharded LRU with a TTL per entry.
//!
//! There is no global lock. A key's hash picks its shard, and each shard is an LRU of its own behind a
//! mutex held only for the few pointer moves of one operation. Capacity (in entries and, optionally, in
//! bytes) is split evenly across the shards, so eviction is least-recently-used within a shard: an
//! approximation of a global LRU that is exact when there is one shard (capacities under
//! [`ENTRIES_PER_SHARD`] entries use one).
//!
//! Expired entries are removed lazily, when a read finds them, and in the background by [`SessionCache::sweep`],
//! which walks a bounded number of slots per shard per call so no sweep holds a shard for long.
//!
//! The cache knows nothing of sockets or commands; time is passed in, so tests control it.
//!
//! Each entry carries a [`Tag`]: nothing standalone (every entry has the default), and in Redis mode
//! the write sequence the value is current at and the epoch it was cached in, which the store's
//! coherence rules read and compare under the shard's mutex (docs/coherence.md).

use std::hash::BuildHasher;

use bytes::Bytes;
use hashbrown::{DefaultHashBuilder, HashTable};
use parking_lot::Mutex;
use tokio::time::Instant;

/// Below this many entries per shard the cache uses fewer shards, so small caches stay exact LRUs.
pub const ENTRIES_PER_SHARD: usize = 256;

/// Most shards the cache splits into; enough that two threads rarely meet on one.
const MAX_SHARDS: usize = 64;

/// "No slot" in the intrusive LRU list.
const NIL: u32 = u32::MAX;

/// How big the cache may grow.
#[derive(Clone, Copy, Debug)]
pub struct CacheLimits {
    /// Most entries held (CACHE_SIZE).
    pub max_entries: usize,
    /// Most bytes of keys plus values held, if bounded (CACHE_MAX_BYTES).
    pub max_bytes: Option<usize>,
    /// Number of shards; 0 picks one from `max_entries`.
    pub shards: usize,
}

/// A write the cache refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    /// The entry alone is bigger than a shard's byte budget, so storing it would empty the shard and
    /// still not fit.
    #[error("entry of {size} bytes is over the cache's per-shard byte budget of {budget}")]
    EntryTooBig {
        /// Key plus value length.
        size: usize,
        /// Bytes one shard may hold.
        budget: usize,
    },
}

/// Counters and sizes, as STATS reports them under `cache`: the client crate's type, so the daemon and
/// its clients share one schema.
pub use scaled_client::answers::CacheStats;

/// What an entry is current at, for a cache in front of Redis (docs/coherence.md, "Cache entries
/// carry the sequence they are current at"). Standalone, every entry has the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tag {
    /// The value is the newest write of its key up to this write sequence.
    pub seq: u64,
    /// The cache epoch it was cached in; a lost invalidation stream starts a new one.
    pub epoch: u64,
}

/// The sharded cache.
pub struct SessionCache {
    shards: Box<[Mutex<Shard>]>,
    /// Hashes keys once per operation; the hash picks the shard and is reused inside it.
    hasher: DefaultHashBuilder,
    limits: CacheLimits,
}

impl SessionCache {
    /// An empty cache with these limits.
    pub fn new(limits: CacheLimits) -> SessionCache {
        let count = if limits.shards > 0 {
            limits.shards
        } else {
            (limits.max_entries / ENTRIES_PER_SHARD).clamp(1, MAX_SHARDS)
        };
        let share = |total: usize, i: usize| total / count + usize::from(i < total % count);
        let shards = (0..count)
            .map(|i| {
                Mutex::new(Shard::new(
                    share(limits.max_entries, i),
                    limits.max_bytes.map_or(usize::MAX, |b| share(b, i)),
                ))
            })
            .collect();
        SessionCache {
            shards,
            hasher: DefaultHashBuilder::default(),
            limits,
        }
    }

    fn locate(&self, key: &str) -> (u64, &Mutex<Shard>) {
        let hash = self.hasher.hash_one(key);
        // Bits 32.. choose the shard; the table inside uses the low bits and the top seven.
        let index = ((hash >> 32) & 0xffff) as usize % self.shards.len();
        (hash, &self.shards[index])
    }

    /// The value under `key` if it is there and not expired; counts a hit or a miss.
    pub fn get(&self, key: &str, now: Instant) -> Option<Bytes> {
        let (hash, shard) = self.locate(key);
        shard.lock().get(hash, key, now)
    }

    /// Stores `value` under `key`, replacing what was there, evicting least recently used entries of the
    /// shard until it fits. `expires_at` of `None` never expires.
    pub fn set(
        &self,
        key: &str,
        value: Bytes,
        expires_at: Option<Instant>,
        now: Instant,
    ) -> Result<(), CacheError> {
        let (hash, shard) = self.locate(key);
        shard.lock().set(hash, key, value, expires_at, now)
    }

    /// Removes `key`; true when a live entry was there.
    pub fn remove(&self, key: &str, now: Instant) -> bool {
        let (hash, shard) = self.locate(key);
        shard.lock().remove(hash, key, now)
    }

    /// The live value under `key` with its tag, if `serve` accepts the tag: counted a hit (and
    /// marked recently used) when it does, a miss when it does not or there is none.
    pub fn get_tagged(
        &self,
        key: &str,
        now: Instant,
        serve: impl FnOnce(Tag) -> bool,
    ) -> Option<(Bytes, Tag)> {
        let (hash, shard) = self.locate(key);
        shard.lock().get_tagged(hash, key, now, serve)
    }

    /// Stores `value` under `key` with `tag`, unless the entry there is of the same epoch and current
    /// at a later sequence (a value never goes back in time). True when stored.
    pub fn set_tagged(
        &self,
        key: &str,
        value: Bytes,
        expires_at: Option<Instant>,
        tag: Tag,
        now: Instant,
    ) -> Result<bool, CacheError> {
        let (hash, shard) = self.locate(key);
        let mut shard = shard.lock();
        if let Some(i) = shard.find(hash, key) {
            let old = shard.node(i).tag;
            if old.epoch == tag.epoch && old.seq > tag.seq {
                return Ok(false);
            }
        }
        shard.set(hash, key, value, expires_at, now)?;
        if let Some(i) = shard.find(hash, key) {
            shard.node_mut(i).tag = tag;
        }
        Ok(true)
    }

    /// Removes `key` if its entry is older than write `seq` of `epoch`: current at a lower sequence,
    /// or cached in another epoch. True when an entry was removed.
    pub fn remove_older(&self, key: &str, seq: u64, epoch: u64, now: Instant) -> bool {
        let (hash, shard) = self.locate(key);
        let mut shard = shard.lock();
        match shard.find(hash, key) {
            Some(i) if shard.node(i).tag.epoch != epoch || shard.node(i).tag.seq < seq => {
                shard.remove(hash, key, now);
                true
            }
            _ => false,
        }
    }

    /// Drops expired entries, looking at no more than `budget` slots of each shard, and returns how many
    /// it dropped. Called from the background; successive calls walk on round each shard.
    pub fn sweep(&self, now: Instant, budget: usize) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().sweep(now, budget))
            .sum()
    }

    /// Sizes and counters, summed over the shards.
    pub fn stats(&self) -> CacheStats {
        let mut out = CacheStats {
            max_size: self.limits.max_entries as u64,
            max_bytes: self.limits.max_bytes.unwrap_or(0) as u64,
            ..CacheStats::default()
        };
        for shard in self.shards.iter() {
            let s = shard.lock();
            out.size += s.len as u64;
            out.bytes += s.bytes as u64;
            out.hits += s.hits;
            out.misses += s.misses;
            out.evictions += s.evictions;
            out.expirations += s.expirations;
        }
        let lookups = out.hits + out.misses;
        if lookups > 0 {
            out.hit_rate = (out.hits as f64 * 10_000.0 / lookups as f64).round() / 100.0;
        }
        out
    }

    /// How many shards the cache uses.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }
}

/// One entry, linked into its shard's recency list.
struct Node {
    key: Box<str>,
    value: Bytes,
    hash: u64,
    expires_at: Option<Instant>,
    /// What the value is current at (Redis mode); the default standalone.
    tag: Tag,
    /// Towards the most recently used end.
    prev: u32,
    /// Towards the least recently used end.
    next: u32,
}

impl Node {
    fn size(&self) -> usize {
        self.key.len() + self.value.len()
    }

    fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// One LRU: a hash table of slot numbers over a slab of nodes that form a doubly linked recency list.
/// Invariants: every occupied slot is in `table` exactly once and in the list exactly once; `len` and
/// `bytes` are the count and summed size of occupied slots.
struct Shard {
    table: HashTable<u32>,
    slots: Vec<Option<Node>>,
    free: Vec<u32>,
    /// Most recently used.
    head: u32,
    /// Least recently used: the next to evict.
    tail: u32,
    len: usize,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
    /// Where the next background sweep resumes.
    sweep_cursor: usize,
    hits: u64,
    misses: u64,
    evictions: u64,
    expirations: u64,
}

impl Shard {
    fn new(max_entries: usize, max_bytes: usize) -> Shard {
        Shard {
            table: HashTable::new(),
            slots: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            len: 0,
            bytes: 0,
            max_entries,
            max_bytes,
            sweep_cursor: 0,
            hits: 0,
            misses: 0,
            evictions: 0,
            expirations: 0,
        }
    }

    fn node(&self, i: u32) -> &Node {
        // Only slot numbers taken from the table or the list reach here, and those are occupied.
        self.slots[i as usize]
            .as_ref()
            .expect("linked slot is occupied")
    }

    fn node_mut(&mut self, i: u32) -> &mut Node {
        self.slots[i as usize]
            .as_mut()
            .expect("linked slot is occupied")
    }

    fn find(&self, hash: u64, key: &str) -> Option<u32> {
        let slots = &self.slots;
        self.table
            .find(hash, |&i| {
                slots[i as usize].as_ref().is_some_and(|n| &*n.key == key)
            })
            .copied()
    }

    fn get(&mut self, hash: u64, key: &str, now: Instant) -> Option<Bytes> {
        let Some(i) = self.find(hash, key) else {
            self.misses += 1;
            return None;
        };
        if self.node(i).expired(now) {
            self.drop_slot(i);
            self.expirations += 1;
            self.misses += 1;
            return None;
        }
        self.hits += 1;
        self.touch(i);
        Some(self.node(i).value.clone())
    }

    fn get_tagged(
        &mut self,
        hash: u64,
        key: &str,
        now: Instant,
        serve: impl FnOnce(Tag) -> bool,
    ) -> Option<(Bytes, Tag)> {
        let Some(i) = self.find(hash, key) else {
            self.misses += 1;
            return None;
        };
        if self.node(i).expired(now) {
            self.drop_slot(i);
            self.expirations += 1;
            self.misses += 1;
            return None;
        }
        let tag = self.node(i).tag;
        if !serve(tag) {
            self.misses += 1;
            return None;
        }
        self.hits += 1;
        self.touch(i);
        Some((self.node(i).value.clone(), tag))
    }

    fn set(
        &mut self,
        hash: u64,
        key: &str,
        value: Bytes,
        expires_at: Option<Instant>,
        now: Instant,
    ) -> Result<(), CacheError> {
        let size = key.len() + value.len();
        if size > self.max_bytes {
            return Err(CacheError::EntryTooBig {
                size,
                budget: self.max_bytes,
            });
        }
        if let Some(i) = self.find(hash, key) {
            let node = self.node_mut(i);
            let old = node.value.len();
            node.value = value;
            node.expires_at = expires_at;
            node.tag = Tag::default();
            self.bytes = self.bytes - old + size - key.len();
            self.touch(i);
        } else {
            let node = Node {
                key: key.into(),
                value,
                hash,
                expires_at,
                tag: Tag::default(),
                prev: NIL,
                next: NIL,
            };
            let i = match self.free.pop() {
                Some(i) => {
                    self.slots[i as usize] = Some(node);
                    i
                }
                None => {
                    self.slots.push(Some(node));
                    (self.slots.len() - 1) as u32
                }
            };
            let slots = &self.slots;
            self.table.insert_unique(hash, i, |&j| {
                slots[j as usize].as_ref().map_or(0, |n| n.hash)
            });
            self.link_front(i);
            self.len += 1;
            self.bytes += size;
        }
        // Make room, oldest first; the entry just written is at the head and fits on its own.
        while self.len > self.max_entries || self.bytes > self.max_bytes {
            let victim = self.tail;
            if self.node(victim).expired(now) {
                self.expirations += 1;
            } else {
                self.evictions += 1;
            }
            self.drop_slot(victim);
        }
        Ok(())
    }

    fn remove(&mut self, hash: u64, key: &str, now: Instant) -> bool {
        let Some(i) = self.find(hash, key) else {
            return false;
        };
        let live = !self.node(i).expired(now);
        if !live {
            self.expirations += 1;
        }
        self.drop_slot(i);
        live
    }

    fn sweep(&mut self, now: Instant, budget: usize) -> usize {
        let mut dropped = 0;
        for _ in 0..budget.min(self.slots.len()) {
            if self.sweep_cursor >= self.slots.len() {
                self.sweep_cursor = 0;
            }
            let i = self.sweep_cursor as u32;
            self.sweep_cursor += 1;
            if self.slots[i as usize]
                .as_ref()
                .is_some_and(|n| n.expired(now))
            {
                self.drop_slot(i);
                self.expirations += 1;
                dropped += 1;
            }
        }
        dropped
    }

    /// Unlinks slot `i`, removes it from the table and frees it.
    fn drop_slot(&mut self, i: u32) {
        self.unlink(i);
        let hash = self.node(i).hash;
        if let Ok(entry) = self.table.find_entry(hash, |&j| j == i) {
            entry.remove();
        }
        if let Some(node) = self.slots[i as usize].take() {
            self.len -= 1;
            self.bytes -= node.size();
        }
        self.free.push(i);
    }

    /// Marks slot `i` most recently used.
    fn touch(&mut self, i: u32) {
        if self.head != i {
            self.unlink(i);
            self.link_front(i);
        }
    }

    fn link_front(&mut self, i: u32) {
        let old_head = self.head;
        {
            let node = self.node_mut(i);
            node.prev = NIL;
            node.next = old_head;
        }
        if old_head != NIL {
            self.node_mut(old_head).prev = i;
        } else {
            self.tail = i;
        }
        self.head = i;
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let node = self.node(i);
            (node.prev, node.next)
        };
        if prev != NIL {
            self.node_mut(prev).next = next;
        } else {
            self.head = next;
        }
        if next != NIL {
            self.node_mut(next).prev = prev;
        } else {
            self.tail = prev;
        }
        let node = self.node_mut(i);
        node.prev = NIL;
        node.next = NIL;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cache(entries: usize) -> SessionCache {
        SessionCache::new(CacheLimits {
            max_entries: entries,
            max_bytes: None,
            shards: 0,
        })
    }

    #[test]
    fn evicts_least_recently_used() {
        let c = cache(3);
        let now = Instant::now();
        for k in ["a", "b", "c"] {
            c.set(k, Bytes::from_static(b"v"), None, now).unwrap();
        }
        assert!(c.get("a", now).is_some()); // a is now most recent; b is oldest
        c.set("d", Bytes::from_static(b"v"), None, now).unwrap();
        assert!(c.get("b", now).is_none());
        for k in ["a", "c", "d"] {
            assert!(c.get(k, now).is_some(), "{k} should have survived");
        }
        let s = c.stats();
        assert_eq!((s.size, s.evictions), (3, 1));
    }

    #[test]
    fn expires_lazily_and_by_sweep() {
        let c = cache(100);
        let now = Instant::now();
        let soon = Some(now + Duration::from_secs(1));
        c.set("lazy", Bytes::from_static(b"v"), soon, now).unwrap();
        c.set("swept", Bytes::from_static(b"v"), soon, now).unwrap();
        c.set("kept", Bytes::from_static(b"v"), None, now).unwrap();
        let later = now + Duration::from_secs(2);
        assert!(c.get("lazy", later).is_none());
        assert_eq!(c.sweep(later, 1000), 1);
        let s = c.stats();
        assert_eq!((s.size, s.expirations), (1, 2));
        assert!(c.get("kept", later).is_some());
    }

    #[test]
    fn byte_budget_evicts_and_refuses_what_cannot_fit() {
        let c = SessionCache::new(CacheLimits {
            max_entries: 100,
            max_bytes: Some(30),
            shards: 1,
        });
        let now = Instant::now();
        c.set("k1", Bytes::from(vec![0; 10]), None, now).unwrap();
        c.set("k2", Bytes::from(vec![0; 10]), None, now).unwrap();
        c.set("k3", Bytes::from(vec![0; 10]), None, now).unwrap();
        assert!(c.get("k1", now).is_none());
        assert!(c.stats().bytes <= 30);
        assert!(matches!(
            c.set("big", Bytes::from(vec![0; 40]), None, now),
            Err(CacheError::EntryTooBig { .. })
        ));
    }

    #[test]
    fn overwrite_keeps_counts_right() {
        let c = cache(10);
        let now = Instant::now();
        c.set("k", Bytes::from(vec![0; 5]), None, now).unwrap();
        c.set("k", Bytes::from(vec![0; 7]), None, now).unwrap();
        let s = c.stats();
        assert_eq!((s.size, s.bytes), (1, 8));
        assert!(c.remove("k", now));
        assert!(!c.remove("k", now));
        assert_eq!(c.stats().bytes, 0);
    }

    #[test]
    fn tags_never_go_back_in_time_and_gate_reads_and_removals() {
        let c = cache(10);
        let now = Instant::now();
        let tag = |seq, epoch| Tag { seq, epoch };
        assert!(c
            .set_tagged("k", Bytes::from_static(b"new"), None, tag(5, 2), now)
            .unwrap());
        assert!(!c
            .set_tagged("k", Bytes::from_static(b"old"), None, tag(4, 2), now)
            .unwrap());
        assert_eq!(
            c.get_tagged("k", now, |_| true).map(|(v, _)| v),
            Some(Bytes::from_static(b"new"))
        );
        // Another epoch replaces whatever its sequence.
        assert!(c
            .set_tagged("k", Bytes::from_static(b"e4"), None, tag(1, 4), now)
            .unwrap());
        assert!(c.get_tagged("k", now, |t| t.epoch == 2).is_none());
        assert!(
            !c.remove_older("k", 1, 4, now),
            "removed by its own write's invalidation"
        );
        assert!(c.remove_older("k", 2, 4, now));
        c.set_tagged("k", Bytes::from_static(b"v"), None, tag(9, 4), now)
            .unwrap();
        assert!(
            c.remove_older("k", 1, 6, now),
            "an older epoch's entry survived"
        );
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.size), (1, 1, 0));
    }

    #[test]
    fn many_shards_never_exceed_capacity() {
        let c = cache(10_000);
        assert!(c.shard_count() > 1);
        let now = Instant::now();
        for i in 0..50_000 {
            c.set(&format!("key{i}"), Bytes::from_static(b"v"), None, now)
                .unwrap();
        }
        let s = c.stats();
        assert_eq!(s.size, 10_000);
        assert_eq!(s.evictions, 40_000);
    }
}
