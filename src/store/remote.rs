//! The remote tier: Redis behind the store, when REDIS_URL is set. It owns the link, the release
//! wake-ups and the releaser, and turns the link's answers into the store's.
//!
//! Writes go through (the write script checks the fence, bumps the write sequence and publishes the
//! invalidation in one step), and are answered only after Redis acknowledged them, with the write's
//! sequence so the store can cache what it wrote. The invalidation stream's subscriber feeds the
//! cache in front ([`Coherent`]), which decides what of it GET may answer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::cache::SessionCache;
use crate::config::{Config, LockFallback};
use crate::locks::Fenced;
use crate::redis::coherence::Invalidations;
use crate::redis::scripts::{FenceCheck, Write};
use crate::redis::wakeups::Wakeups;
use crate::redis::{Health, Link, LinkError, RedisSettings};
use crate::store::coherent::{self, Coherent, Watch};
use crate::store::degraded::Degraded;
use crate::store::release::Releaser;
use crate::store::{Store, StoreError};
use scaled_client::answers::RedisStats;

/// Most locks whose releases this daemon watches at once (one head waiter per contended lock); past
/// it a waiter relies on its retry timer alone.
const MAX_WATCHED_LOCKS: usize = 65_536;

/// Most invalidations waiting for the store. Applying one is a hash lookup, so the queue is empty but
/// for bursts; past it the cache is flushed and the stream resynced (docs/coherence.md).
const INVALIDATION_QUEUE: usize = 65_536;

/// The share of a lease the daemon takes off it as drift margin, as in Redis's distributed-lock
/// algorithm (1 %), plus [`DRIFT_FLOOR`].
const DRIFT_SHARE: f64 = 0.01;

/// The smallest drift margin: clocks and round trips differ by a few milliseconds even on one host.
const DRIFT_FLOOR: Duration = Duration::from_millis(2);

/// Counts for STATS.
#[derive(Default)]
pub struct RemoteCounters {
    /// Values read from Redis whose checksum failed.
    pub corrupted: AtomicU64,
    /// Auto-renewals Redis refused: locks lost without their holder letting go.
    pub renewals_failed: AtomicU64,
}

/// Redis behind the store.
pub struct Remote {
    /// The command connection and its health.
    pub link: Link,
    /// Release messages waking this daemon's head waiters.
    pub wakeups: Wakeups,
    /// Releases that happen where nobody can await Redis (a connection's end, a dropped LOCK).
    pub releaser: Releaser,
    /// LOCK_RETRY_DELAY: how often a waiter asks Redis again if no release message comes.
    pub retry_delay: Duration,
    /// For STATS.
    pub counters: RemoteCounters,
    /// LOCK_FALLBACK: what LOCK does while Redis is unreachable.
    pub fallback: LockFallback,
    /// Degraded mode's state: unavailable time, locks granted locally, lost locks.
    pub degraded: Degraded,
    /// The local cache in front of Redis, fed by the invalidation stream.
    pub coherent: Arc<Coherent>,
}

impl Remote {
    /// Starts the link and its helpers for `config`, with `cache` in front; `None` standalone. Must
    /// run inside a tokio runtime.
    pub fn start(config: &Config, cache: &Arc<SessionCache>) -> Result<Option<Remote>, LinkError> {
        let Some(settings) = RedisSettings::from_config(config) else {
            return Ok(None);
        };
        let link = Link::start(settings)?;
        let coherent = Arc::new(Coherent::new(cache.clone()));
        tokio::spawn(coherent::follow(
            coherent.clone(),
            Invalidations::start(&link, INVALIDATION_QUEUE),
        ));
        Ok(Some(Remote {
            coherent,
            wakeups: Wakeups::start(&link, MAX_WATCHED_LOCKS),
            releaser: Releaser::start(link.clone()),
            link,
            retry_delay: Duration::from_secs_f64(config.lock_retry_delay),
            counters: RemoteCounters::default(),
            fallback: config.lock_fallback,
            degraded: Degraded::new(Instant::now()),
        }))
    }

    /// Whether Redis is reachable now.
    pub fn available(&self) -> bool {
        self.link.health() == Health::Up
    }

    /// How long Redis keeps a lock granted for `lease`: the lease plus the drift margin, so that the
    /// daemon's own count of the lease (on its monotonic clock, started before Redis's) always ends
    /// first.
    pub fn redis_lease(lease: Duration) -> Duration {
        lease + lease.mul_f64(DRIFT_SHARE) + DRIFT_FLOOR
    }

    /// The value of `key` in Redis, landed in the cache in front unless an invalidation raced it.
    pub async fn get(&self, key: &str, watch: Watch) -> Result<Option<Bytes>, StoreError> {
        // Before the read is sent: Redis's own count of the TTL starts later, so the copy ends first.
        let sent = Instant::now();
        match self.link.read(key).await {
            Ok(read) => {
                let value = read.value.map(|v| (v.bytes, v.ttl));
                if let Some((bytes, ttl)) = &value {
                    let expires_at = ttl.and_then(|t| sent.checked_add(t));
                    self.coherent
                        .land(&watch, Some(bytes.clone()), expires_at, read.seq);
                }
                Ok(value.map(|(bytes, _)| bytes))
            }
            Err(e) => Err(self.store_error(e)),
        }
    }

    /// Writes `value` under `key` in Redis, checked against `fence`; answers the write's sequence.
    pub async fn set(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        fence: Option<(String, u64)>,
    ) -> Result<u64, StoreError> {
        let check = fence.as_ref().map(|(lock, token)| FenceCheck {
            lock,
            token: *token,
        });
        match self.link.set(key, &value, ttl, check).await {
            Ok(Write::Done { seq, .. }) => Ok(seq),
            Ok(Write::Fenced { newest }) => Err(fenced(fence, newest)),
            Err(e) => Err(self.store_error(e)),
        }
    }

    /// Deletes `key` in Redis, checked against `fence`; answers whether Redis held it, and the
    /// write's sequence.
    pub async fn del(
        &self,
        key: &str,
        fence: Option<(String, u64)>,
    ) -> Result<(bool, u64), StoreError> {
        let check = fence.as_ref().map(|(lock, token)| FenceCheck {
            lock,
            token: *token,
        });
        match self.link.del(key, check).await {
            Ok(Write::Done { existed, seq }) => Ok((existed, seq)),
            Ok(Write::Fenced { newest }) => Err(fenced(fence, newest)),
            Err(e) => Err(self.store_error(e)),
        }
    }

    /// The store's error for a link error, counting and logging corruption.
    pub fn store_error(&self, e: LinkError) -> StoreError {
        match e {
            LinkError::Unavailable(m) => StoreError::Unavailable(m),
            LinkError::NotConnected => StoreError::Unavailable("not connected".into()),
            LinkError::Corrupted { key, reason } => {
                self.counters.corrupted.fetch_add(1, Ordering::Relaxed);
                tracing::error!(key, reason, "corrupted value in Redis; not served");
                StoreError::Corrupted(format!(
                    "the value of `{key}` in Redis is corrupted ({reason}); it was not served"
                ))
            }
            other => StoreError::Internal(other.to_string()),
        }
    }

    /// Queues the release in Redis of `lock` held by `token` with `lease`, for code that cannot wait.
    pub fn release_later(&self, lock: String, token: String, lease: Duration) {
        let until = Instant::now() + Remote::redis_lease(lease);
        self.releaser.release(lock, token, until);
    }
}

/// The refusal of a fenced write, in the store's terms.
fn fenced(fence: Option<(String, u64)>, newest: Option<u64>) -> StoreError {
    let (lock, token) = fence.unwrap_or_default();
    StoreError::Fenced(Fenced {
        lock,
        token,
        newest: newest.unwrap_or(0),
    })
}

impl Store {
    /// STATS `redis`, as of `now`.
    pub fn redis_stats(&self, now: Instant) -> RedisStats {
        let Some(remote) = &self.remote else {
            return RedisStats::default();
        };
        let link = remote.link.stats();
        let coherent = &remote.coherent.counters;
        let flights = &self.chains.flights;
        let hits = coherent.hits.load(Ordering::Relaxed);
        let shared = flights.joined.load(Ordering::Relaxed);
        RedisStats {
            configured: true,
            available: remote.available(),
            degraded_seconds: remote.degraded.unavailable_for(now).as_secs_f64(),
            round_trips: link.round_trips,
            unavailable: link.unavailable,
            connects: link.connects,
            corruptions: remote.counters.corrupted.load(Ordering::Relaxed),
            renewals_failed: remote.counters.renewals_failed.load(Ordering::Relaxed),
            locks_lost: remote.degraded.locks_lost(),
            releases_pending: remote.releaser.pending() as u64,
            cache_hits: hits,
            degraded_hits: coherent.degraded_hits.load(Ordering::Relaxed),
            reads: flights.started.load(Ordering::Relaxed),
            reads_shared: shared,
            reads_saved: hits + shared,
            fills_dropped: coherent.fills_dropped.load(Ordering::Relaxed),
            invalidations: coherent.invalidations.load(Ordering::Relaxed),
            flushes: coherent.flushes.load(Ordering::Relaxed),
        }
    }
}
