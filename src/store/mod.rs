//! The store: the one place that knows where session state and locks live. Commands call it instead
//! of the cache and the lock table, so they never need to know whether a Redis backend is configured.
//!
//! Standalone, the store is the local tier alone: the sharded cache and the lock table, and every
//! step is [`Step::Ready`]: answered at once, in arrival order, exactly as the commands did before
//! the store existed. A remote tier (Redis) turns some steps into [`Step::Later`]: a future the
//! connection runs beside its other requests.
//!
//! Fenced writes are composed here, not in the commands and not in the lock table: the fence check
//! and the write must be one atomic step, and where that step runs (under the lock table's mutex, or
//! in a Redis script) depends on the tier.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use scaled_client::proto::Fence;

use crate::cache::{CacheError, SessionCache};
use crate::locks::{Fenced, LockTable, Status};

/// A result that is ready now, or a future that gives it later.
pub enum Step<T> {
    /// Ready: answered in arrival order with the requests around it.
    Ready(T),
    /// Finishes later; the connection runs it beside its other requests.
    Later(Pin<Box<dyn Future<Output = T> + Send + 'static>>),
}

impl<T: Send + 'static> Step<T> {
    /// Transforms the result, now or when it comes.
    pub fn map<U>(self, f: impl FnOnce(T) -> U + Send + 'static) -> Step<U> {
        match self {
            Step::Ready(t) => Step::Ready(f(t)),
            Step::Later(fut) => Step::Later(Box::pin(async move { f(fut.await) })),
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
}

impl Store {
    /// A standalone store over this cache and lock table.
    pub fn new(cache: Arc<SessionCache>, locks: Arc<LockTable>) -> Store {
        Store { cache, locks }
    }

    /// The value under `key`, if any.
    pub fn get(&self, key: &str, now: Instant) -> Step<Result<Option<Bytes>, StoreError>> {
        Step::Ready(Ok(self.cache.get(key, now)))
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
        let remove = || self.cache.remove(key, now);
        Step::Ready(match fence {
            None => Ok(remove()),
            Some(fence) => self
                .locks
                .fenced(&fence.lock, fence.token, remove)
                .map_err(StoreError::from),
        })
    }

    /// Releases `key` if `token` holds it, handing it to the next waiter.
    pub fn unlock(&self, key: &str, token: &str, now: Instant) -> Step<Status> {
        Step::Ready(self.locks.release(key, token, now))
    }

    /// Renews the lease of `token` on `key` (`None`: the lease it has); answers the status and the
    /// lease now in force.
    pub fn extend(
        &self,
        key: &str,
        token: &str,
        lease: Option<Duration>,
        now: Instant,
    ) -> Step<(Status, Duration)> {
        Step::Ready(self.locks.extend(key, token, lease, now))
    }
}
