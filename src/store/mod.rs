//! The store: the one place that knows where session state and locks live. Commands call it instead
//! of the cache and the lock table, so they never need to know whether a Redis backend is configured.
//!
//! Standalone, the store is the local tier alone: the sharded cache and the lock table, and every
//! step is [`Step::Ready`]: answered at once, in arrival order, exactly as the commands did before
//! the store existed. A remote tier (Redis) turns some steps into [`Step::Remote`] (waiting on Redis
//! alone) or [`Step::Later`] (a LOCK that may wait for a holder): a future the
//! connection runs beside its other requests.
//!
//! Fenced writes are composed here, not in the commands and not in the lock table: the fence check
//! and the write must be one atomic step, and where that step runs (under the lock table's mutex, or
//! in a Redis script) depends on the tier.
//!
//! - [`chain`]: per-key order of the requests that wait on Redis.
//! - [`coherent`]: the local cache in front of Redis, and what of it GET may answer.
//! - [`degraded`]: degraded mode (Redis configured but unreachable): its state, local grants, lost locks.
//! - [`flight`]: single flight, concurrent GETs of a key sharing one Redis read.
//! - [`lock`]: LOCK, standalone and in two phases with Redis.
//! - [`remote`]: the Redis tier (write-through, reads, the link's helpers).
//! - [`recovery`]: coming back when Redis does: the health watch, and adoption of local grants.
//! - [`release`]: the background releaser for releases seen where nobody can await Redis.

pub mod chain;
pub mod coherent;
pub mod degraded;
pub mod flight;
pub mod lock;
pub mod recovery;
pub mod release;
pub mod remote;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use scaled_client::proto::Fence;

use crate::cache::{CacheError, SessionCache};
use crate::locks::{Fenced, Grant, LockTable, Status};
use crate::redis::scripts::Compare;
use crate::store::chain::Chains;
use crate::store::degraded::Marked;
use crate::store::lock::LockAsk;
use crate::store::remote::Remote;

/// A result that is ready now, or a future that gives it later.
pub enum Step<T> {
    /// Ready: answered in arrival order with the requests around it.
    Ready(T),
    /// Finishes later, waiting on other clients or on time (a LOCK in a queue, or held on another
    /// host); the connection runs it beside its other requests, under SCALED_MAX_IN_FLIGHT.
    Later(Pin<Box<dyn Future<Output = T> + Send + 'static>>),
    /// Finishes later, waiting only on Redis round trips (each bounded by REDIS_RESPONSE_TIMEOUT):
    /// counted apart, under REDIS_MAX_PENDING (proto-spec.md, "Requests waiting on Redis").
    Remote(Pin<Box<dyn Future<Output = T> + Send + 'static>>),
    /// Finishes later, and holds its own counts of the connection's [`crate::tally::Tally`]: a LOCK
    /// whose lock is free on this daemon waits on Redis, and goes on to wait for another daemon's
    /// holder only if it gets room under SCALED_MAX_IN_FLIGHT.
    Counted(Pin<Box<dyn Future<Output = T> + Send + 'static>>),
}

impl<T: Send + 'static> Step<T> {
    /// Transforms the result, now or when it comes.
    pub fn map<U>(self, f: impl FnOnce(T) -> U + Send + 'static) -> Step<U> {
        match self {
            Step::Ready(t) => Step::Ready(f(t)),
            Step::Later(fut) => Step::Later(Box::pin(async move { f(fut.await) })),
            Step::Remote(fut) => Step::Remote(Box::pin(async move { f(fut.await) })),
            Step::Counted(fut) => Step::Counted(Box::pin(async move { f(fut.await) })),
        }
    }
}

/// Why the store could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A fenced write whose token is not the newest grant on its lock.
    #[error(transparent)]
    Fenced(#[from] Fenced),
    /// An entry too large for the cache.
    #[error("{0}")]
    TooLarge(String),
    /// LOCK in try mode found the lock held.
    #[error("lock `{0}` is held")]
    Locked(String),
    /// LOCK waited its whole wait without a grant.
    #[error("lock `{key}` not granted within {} ms", wait.as_millis())]
    LockTimeout {
        /// The lock key.
        key: String,
        /// The wait it was given.
        wait: Duration,
    },
    /// Shutdown began while the LOCK waited.
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// A limit of the lock table (SCALED_MAX_LOCKS, SCALED_MAX_WAITERS) refused the LOCK; it had no
    /// effect.
    #[error("{0}")]
    Overloaded(String),
    /// Redis, which the step needs, cannot be reached or did not answer in time.
    #[error("{0}")]
    Unavailable(String),
    /// A value in Redis failed its checksum; it is not served.
    #[error("{0}")]
    Corrupted(String),
    /// UNLOCK or EXTEND with the owner token of a lock that was lost without its holder letting go.
    #[error("{0}")]
    LockLost(String),
    /// Something that should not happen (an unexpected answer from Redis, a dropped wait).
    #[error("{0}")]
    Internal(String),
}

impl From<CacheError> for StoreError {
    fn from(e: CacheError) -> StoreError {
        StoreError::TooLarge(e.to_string())
    }
}

/// Session state and locks, behind one interface for both tiers.
pub struct Store {
    /// The local tier of session state: always in front, whatever the backend.
    pub cache: Arc<SessionCache>,
    /// The local lock table: the whole lock state standalone; with Redis, this host's queue in front
    /// of the shared lock.
    pub locks: Arc<LockTable>,
    /// Redis, when REDIS_URL is set; `None` standalone, where every step is ready at once.
    pub remote: Option<Arc<Remote>>,
    /// Writes of each key in flight to Redis, so later requests on the key wait for them.
    pub(crate) chains: Arc<Chains>,
}

impl Store {
    /// A store over this cache and lock table, with Redis behind them when `remote` is given.
    /// With Redis, starts the task that follows its health (must run inside a tokio runtime).
    pub fn new(cache: Arc<SessionCache>, locks: Arc<LockTable>, remote: Option<Remote>) -> Store {
        let remote = remote.map(Arc::new);
        if let Some(remote) = &remote {
            tokio::spawn(recovery::watch(remote.clone(), locks.clone()));
        }
        Store {
            cache,
            locks,
            remote,
            chains: Arc::default(),
        }
    }

    /// Whether Redis is configured and unreachable now: an answer made now without Redis is
    /// degraded.
    pub fn degraded(&self) -> bool {
        self.remote.as_ref().is_some_and(|r| !r.available())
    }

    /// The value under `key`, if any. With Redis: from the local cache when it may answer
    /// (docs/coherence.md), otherwise read from Redis and cached; while Redis is unreachable, from
    /// the local cache marked degraded, or `UNAVAILABLE`.
    pub fn get(&self, key: &str, now: Instant) -> Step<Result<Marked<Option<Bytes>>, StoreError>> {
        let Some(remote) = &self.remote else {
            return Step::Ready(Ok(Marked::plain(self.cache.get(key, now))));
        };
        // It reads after the writes of the key sent before it have finished.
        let after = self.chains.read(key);
        // Looked up now when nothing is to wait for; after the wait otherwise.
        let looked_up = after.is_none() && remote.available();
        if looked_up {
            if let Some(value) = remote.coherent.serve(key, now) {
                return Step::Ready(Ok(Marked::plain(Some(value))));
            }
        }
        let (remote, flights, key) = (remote.clone(), self.chains.flights.clone(), key.to_string());
        Step::Remote(Box::pin(async move {
            after.wait().await;
            if !remote.available() {
                return degraded_get(&remote, &key, "Redis is unreachable".into());
            }
            if !looked_up {
                if let Some(value) = remote.coherent.serve(&key, Instant::now()) {
                    return Ok(Marked::plain(Some(value)));
                }
            }
            // Concurrent misses of the key share one read (single flight); the watch is taken
            // before the read is sent, so an invalidation that comes before the fill lands is seen.
            let read = flights.read(&key, || {
                let (remote, key) = (remote.clone(), key.clone());
                let watch = remote.coherent.watch(&key);
                async move { remote.get(&key, watch).await }
            });
            match read.await {
                Ok(value) => Ok(Marked::plain(value)),
                Err(StoreError::Unavailable(why)) => degraded_get(&remote, &key, why),
                Err(e) => Err(e),
            }
        }))
    }

    /// Stores `value` under `key` for `ttl` (`None`: never expires); with a fence, only if the fence's
    /// token is the newest grant on its lock.
    pub fn set(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        fence: Option<Fence>,
        now: Instant,
    ) -> Step<Result<(), StoreError>> {
        if let Some(remote) = &self.remote {
            let (remote, key) = (remote.clone(), key.to_string());
            let fence = fence.map(|f| (f.lock, f.token));
            let (after, link) = self.chains.write(&key);
            return Step::Remote(Box::pin(async move {
                after.wait().await;
                let watch = remote.coherent.watch(&key);
                // Before the write is sent: Redis counts the TTL from later, so the copy ends first.
                let sent = Instant::now();
                let written = remote.set(&key, value.clone(), ttl, fence).await;
                if let Ok(seq) = written {
                    // Cached at its own sequence: its own invalidation will not evict it.
                    remote.coherent.wrote(&key, seq);
                    let expires_at = ttl.and_then(|t| sent.checked_add(t));
                    remote.coherent.land(&watch, Some(value), expires_at, seq);
                }
                drop(link);
                written.map(drop)
            }));
        }
        // A TTL too long to add to the clock is as good as none.
        let expires_at = ttl.and_then(|t| now.checked_add(t));
        let write = || self.cache.set(key, value, expires_at, now);
        let written = match fence {
            None => write().map_err(StoreError::from),
            Some(fence) => self
                .locks
                .fenced(&fence.lock, fence.token, write)
                .map_err(StoreError::from)
                .and_then(|r| r.map_err(StoreError::from)),
        };
        Step::Ready(written)
    }

    /// Removes `key`, answering whether it was there; with a fence, only if the fence's token is the
    /// newest grant on its lock.
    pub fn del(
        &self,
        key: &str,
        fence: Option<Fence>,
        now: Instant,
    ) -> Step<Result<bool, StoreError>> {
        if let Some(remote) = &self.remote {
            let (remote, key) = (remote.clone(), key.to_string());
            let fence = fence.map(|f| (f.lock, f.token));
            let (after, link) = self.chains.write(&key);
            return Step::Remote(Box::pin(async move {
                after.wait().await;
                let removed = remote.del(&key, fence).await;
                if let Ok((_, seq)) = removed {
                    remote.coherent.wrote(&key, seq);
                }
                drop(link);
                removed.map(|(existed, _)| existed)
            }));
        }
        let remove = || self.cache.remove(key, now);
        Step::Ready(match fence {
            None => Ok(remove()),
            Some(fence) => self
                .locks
                .fenced(&fence.lock, fence.token, remove)
                .map_err(StoreError::from),
        })
    }

    /// Takes a lock, waits for it in FIFO order, or refuses at once in try mode.
    pub fn lock(&self, ask: LockAsk<'_>, now: Instant) -> Step<Result<Marked<Grant>, StoreError>> {
        match &self.remote {
            None => lock::local(&self.locks, ask, now).map(|r| r.map(Marked::plain)),
            Some(remote) => {
                // The read barrier: GETs under this grant do not share a read begun before it.
                let flights = self.chains.flights.clone();
                lock::remote(&self.locks, remote, ask, now).map(move |granted| {
                    if granted.is_ok() {
                        flights.advance();
                    }
                    granted
                })
            }
        }
    }

    /// Releases `key` if `token` holds it, handing it to the next waiter.
    pub fn unlock(
        &self,
        key: &str,
        token: &str,
        now: Instant,
    ) -> Step<Result<Marked<Status>, StoreError>> {
        let Some(remote) = &self.remote else {
            return Step::Ready(Ok(Marked::plain(self.locks.release(key, token, now))));
        };
        if remote.degraded.is_lost(key, token) {
            return Step::Ready(Err(lost(key)));
        }
        if remote.degraded.forget_local(key, token) {
            // Granted here while Redis was away and not adopted yet: Redis has no part in it. (An
            // acquire that timed out just before may still have landed there: let that go too.)
            let status = self.locks.release(key, token, now);
            remote.release_later(key.to_string(), token.to_string(), MAX_LEASE);
            return Step::Ready(Ok(Marked::degraded(status)));
        }
        let (remote, locks) = (remote.clone(), self.locks.clone());
        let (key, token) = (key.to_string(), token.to_string());
        Step::Remote(Box::pin(async move {
            // Redis first: once released there, another host may be granted it; then the local
            // table hands it to this host's next waiter, who asks Redis in turn.
            let released = match remote.link.release(&key, &token).await {
                Ok(released) => released,
                Err(e) if e.is_unavailable() => {
                    // Degraded: act on this daemon's record; the release in Redis waits for it.
                    let status = locks.release(&key, &token, Instant::now());
                    if status == Status::Ok {
                        remote.release_later(key, token, MAX_LEASE);
                    }
                    return Ok(Marked::degraded(status));
                }
                Err(e) => return Err(remote.store_error(e)),
            };
            if remote.degraded.is_lost(&key, &token) {
                return Err(lost(&key));
            }
            let local = locks.release(&key, &token, Instant::now());
            Ok(Marked::plain(match (released, local) {
                (Compare::Done, _) => Status::Ok,
                // Held here but not in Redis: its lease ended there.
                (_, Status::Ok) => Status::Expired,
                (_, local) => local,
            }))
        }))
    }

    /// Renews the lease of `token` on `key` (`None`: the lease it has); answers the status and the
    /// lease now in force.
    pub fn extend(
        &self,
        key: &str,
        token: &str,
        lease: Option<Duration>,
        now: Instant,
    ) -> Step<Result<Marked<(Status, Duration)>, StoreError>> {
        if let Some(remote) = &self.remote {
            if remote.degraded.is_lost(key, token) {
                return Step::Ready(Err(lost(key)));
            }
        }
        let local = self.locks.extend(key, token, lease, now);
        let Some(remote) = &self.remote else {
            return Step::Ready(Ok(Marked::plain(local)));
        };
        if local.0 != Status::Ok {
            return Step::Ready(Ok(Marked::plain(local)));
        }
        if remote.degraded.is_local(key, token) {
            // Granted here while Redis was away: adopted later with the lease it has then.
            remote.degraded.extended_locally(key, token, local.1);
            return Step::Ready(Ok(Marked::degraded(local)));
        }
        let (remote, locks) = (remote.clone(), self.locks.clone());
        let (key, token) = (key.to_string(), token.to_string());
        Step::Remote(Box::pin(async move {
            let extended = match remote
                .link
                .extend(&key, &token, Remote::redis_lease(local.1))
                .await
            {
                Ok(extended) => extended,
                // Degraded: the lease is renewed on this daemon's record only.
                Err(e) if e.is_unavailable() => return Ok(Marked::degraded(local)),
                Err(e) => return Err(remote.store_error(e)),
            };
            if extended == Compare::Done {
                return Ok(Marked::plain(local));
            }
            if remote.degraded.is_lost(&key, &token) {
                return Err(lost(&key));
            }
            // Redis let it go (its lease ended there, or another host holds it): so does this host.
            locks.release(&key, &token, Instant::now());
            Ok(Marked::plain((Status::Expired, Duration::ZERO)))
        }))
    }

    /// Releases every lock connection `conn` holds, here and (in the background) in Redis. Cancel
    /// the connection's `alive` token first.
    pub fn release_connection(&self, conn: u64, now: Instant) {
        let sink = self.remote.as_ref().map(|remote| {
            let remote = remote.clone();
            let sink: crate::locks::ReleaseSink = Arc::new(move |key: &str, token: &str| {
                remote.release_later(key.to_string(), token.to_string(), MAX_LEASE);
            });
            sink
        });
        self.locks.release_connection_to(conn, now, sink);
    }

    /// At shutdown: waits until the releases queued for Redis are done, at most `limit`, and closes
    /// the link.
    pub async fn finish(&self, limit: Duration) {
        if let Some(remote) = &self.remote {
            if !remote.releaser.drain(limit).await {
                tracing::warn!("some locks could not be released in Redis before exit");
            }
            remote.link.close();
        }
    }

    /// Whether Redis is configured, and whether it is reachable now.
    pub fn redis_health(&self) -> (bool, bool) {
        match &self.remote {
            None => (false, false),
            Some(remote) => (true, remote.available()),
        }
    }
}

/// A GET that could not reach Redis: the local cache's entry of any epoch, marked degraded, or
/// `UNAVAILABLE` when it has none.
fn degraded_get(
    remote: &Remote,
    key: &str,
    why: String,
) -> Result<Marked<Option<Bytes>>, StoreError> {
    match remote.coherent.serve_degraded(key, Instant::now()) {
        Some(value) => Ok(Marked::degraded(Some(value))),
        None => Err(StoreError::Unavailable(why)),
    }
}

/// The refusal of UNLOCK or EXTEND with the token of a lock that was lost.
fn lost(key: &str) -> StoreError {
    StoreError::LockLost(format!(
        "the lock `{key}` was lost: its lease could not be kept in Redis, and another holder may have it"
    ))
}

/// The longest lease a LOCK may ask for (a day): how long a release in Redis is worth retrying when
/// the lease it was taken with is not known.
const MAX_LEASE: Duration = Duration::from_secs(86_400);
