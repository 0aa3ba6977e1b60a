//! Session locks from the client's side: a guard that releases on drop and carries the fencing token.

use std::time::Duration;

use serde::Deserialize;

use crate::answers::{decode, Grant, LockInfo, StatusAnswer};
use crate::client::Client;
use crate::error::Result;
use crate::proto::{Args, CommandName, Fence};

/// How to take a lock. The defaults are the daemon's: LOCK_TIMEOUT for the lease, and
/// LOCK_RETRY_DELAY × LOCK_MAX_RETRIES for the wait.
#[derive(Clone, Debug, Default)]
pub struct LockOptions {
    /// The lease; the lock is released when it runs out, unless renewed.
    pub ttl: Option<Duration>,
    /// How long to wait in the queue before failing with [`crate::Error::LockTimeout`].
    pub wait: Option<Duration>,
    /// Keep the lease alive for as long as this client's connection is open.
    pub auto_renew: bool,
}

/// What UNLOCK and EXTEND report.
// Decoded through its wire name: rmpv's decoder reads enums in its own encoding, not as a plain str.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum LockStatus {
    /// Done.
    Ok,
    /// Nobody holds the lock.
    NotLocked,
    /// Another owner holds it.
    NotOwner,
    /// The lease ran out; the lock may already be someone else's.
    Expired,
}

impl TryFrom<String> for LockStatus {
    type Error = String;

    fn try_from(name: String) -> Result<LockStatus, String> {
        Ok(match name.as_str() {
            "OK" => LockStatus::Ok,
            "NOT_LOCKED" => LockStatus::NotLocked,
            "NOT_OWNER" => LockStatus::NotOwner,
            "EXPIRED" => LockStatus::Expired,
            _ => return Err(format!("unknown lock status `{name}`")),
        })
    }
}

/// A held lock. Dropping it releases the lock in the background (inside a tokio runtime); call
/// [`LockGuard::unlock`] to release it and see the status.
pub struct LockGuard {
    client: Client,
    key: String,
    token: String,
    fence: u64,
    ttl: Duration,
    /// Set once released, so drop does not release twice.
    released: bool,
}

impl LockGuard {
    /// The lock's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The owner token the daemon issued.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The fencing token: greater than every earlier grant's on this key. Pass it to the storage you
    /// write under this lock, so a write from a holder whose lease ran out is refused.
    pub fn fence(&self) -> u64 {
        self.fence
    }

    /// The fence to attach to SET and DEL on the daemon's own cache.
    pub fn write_fence(&self) -> Fence {
        Fence {
            lock: self.key.clone(),
            token: self.fence,
        }
    }

    /// The lease granted.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Renews the lease to `ttl` from now.
    pub async fn extend(&self, ttl: Duration) -> Result<LockStatus> {
        self.client.extend(&self.key, &self.token, ttl).await
    }

    /// Releases the lock and reports what the daemon found.
    pub async fn unlock(mut self) -> Result<LockStatus> {
        self.released = true;
        self.client.unlock(&self.key, &self.token).await
    }
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", &self.key)
            .field("fence", &self.fence)
            .field("ttl", &self.ttl)
            .field("released", &self.released)
            .finish_non_exhaustive()
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        // Without a runtime the lock is freed when the connection closes or the lease ends.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            let (key, token) = (
                std::mem::take(&mut self.key),
                std::mem::take(&mut self.token),
            );
            runtime.spawn(async move {
                let _ = client.unlock(&key, &token).await;
            });
        }
    }
}

impl Client {
    /// Takes `key`, waiting in FIFO order up to the wait timeout ([`crate::Error::LockTimeout`]).
    pub async fn lock(&self, key: &str, options: LockOptions) -> Result<LockGuard> {
        self.acquire(key, options, false).await
    }

    /// Takes `key` only if it is free now; otherwise fails with [`crate::Error::Locked`].
    pub async fn try_lock(&self, key: &str, options: LockOptions) -> Result<LockGuard> {
        self.acquire(key, options, true).await
    }

    /// Runs `work` holding `key`, giving it the write fence, and releases the lock after.
    pub async fn with_lock<F, Fut, T>(&self, key: &str, options: LockOptions, work: F) -> Result<T>
    where
        F: FnOnce(Fence) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let guard = self.lock(key, options).await?;
        let out = work(guard.write_fence()).await;
        guard.unlock().await?;
        Ok(out)
    }

    /// Releases `key` held with owner `token`.
    pub async fn unlock(&self, key: &str, token: &str) -> Result<LockStatus> {
        let args = Args {
            key: Some(key.into()),
            token: Some(token.into()),
            ..Args::default()
        };
        let answer: StatusAnswer = decode("UNLOCK", self.call(CommandName::Unlock, args).await?)?;
        Ok(answer.status)
    }

    /// Renews the lease of `key` held with owner `token` to `ttl` from now.
    pub async fn extend(&self, key: &str, token: &str, ttl: Duration) -> Result<LockStatus> {
        let args = Args {
            key: Some(key.into()),
            token: Some(token.into()),
            ttl_ms: Some(ttl.as_millis() as u64),
            ..Args::default()
        };
        let answer: StatusAnswer = decode("EXTEND", self.call(CommandName::Extend, args).await?)?;
        Ok(answer.status)
    }

    /// SET, refused with [`crate::Error::Fenced`] unless `fence` is still the newest grant on its lock.
    pub async fn set_fenced(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
        fence: &Fence,
    ) -> Result<()> {
        self.set_with(key, value, ttl, Some(fence)).await
    }

    /// DEL, refused with [`crate::Error::Fenced`] unless `fence` is still the newest grant on its lock.
    pub async fn del_fenced(&self, key: &str, fence: &Fence) -> Result<bool> {
        self.del_with(key, Some(fence)).await
    }

    /// The LOCKS listing: one row per held lock, by key.
    pub async fn locks(&self) -> Result<Vec<LockInfo>> {
        decode(
            "LOCKS",
            self.call(CommandName::Locks, Args::default()).await?,
        )
    }

    async fn acquire(&self, key: &str, options: LockOptions, try_only: bool) -> Result<LockGuard> {
        let args = Args {
            key: Some(key.to_string()),
            ttl_ms: options.ttl.map(|t| t.as_millis() as u64),
            wait_ms: options.wait.map(|t| t.as_millis() as u64),
            try_only: try_only.then_some(true),
            auto_renew: options.auto_renew.then_some(true),
            ..Args::default()
        };
        let grant: Grant = decode("LOCK", self.call(CommandName::Lock, args).await?)?;
        Ok(LockGuard {
            client: self.clone(),
            key: key.to_string(),
            token: grant.token,
            fence: grant.fence,
            ttl: Duration::from_millis(grant.ttl_ms),
            released: false,
        })
    }
}
