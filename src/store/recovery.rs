//! Coming back from degraded mode (proto-spec.md, "Degraded answers" and "Lost locks";
//! docs/coherence.md, "Across degraded mode"): [`watch`] is a task that follows the link's health.
//! Each change updates the clock of [`crate::store::degraded::Degraded`]; each return of Redis adopts
//! the local grants made while it was away, with the adopt script (same owner token, same fence). The
//! link has already raised Redis's fence floor to this daemon's highest token before it reports up,
//! so every token Redis issues afterwards is above every token issued while degraded.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::locks::LockTable;
use crate::redis::scripts::Adopt;
use crate::redis::Health;
use crate::store::lock::renew;
use crate::store::remote::Remote;

/// How long adoption waits for the releases queued while Redis was away.
const ADOPT_AFTER_RELEASES: Duration = Duration::from_secs(5);

/// Follows the link's health until it is closed: keeps the clock, and adopts the local grants each
/// time Redis is back.
pub async fn watch(remote: Arc<Remote>, locks: Arc<LockTable>) {
    let mut health = remote.link.watch_health();
    let closed = remote.link.closed().clone();
    loop {
        let now = *health.borrow_and_update();
        remote.degraded.health_changed(now, Instant::now());
        if now == Health::Up {
            adopt_all(&remote, &locks).await;
        }
        tokio::select! {
            changed = health.changed() => if changed.is_err() { return },
            _ = closed.cancelled() => return,
        }
    }
}

/// Takes every local grant into Redis with its own owner token and fence. One that Redis granted
/// to someone since, or that someone holds there now, is lost. Stops at the first sign that Redis is
/// gone again; the next return tries the rest.
async fn adopt_all(remote: &Arc<Remote>, locks: &Arc<LockTable>) {
    if remote.degraded.local_grants() == 0 {
        return;
    }
    // Releases made while Redis was away go first: a lock held in Redis before the outage and
    // released locally during it is still held there by its old token until its release lands, and
    // adopting before that would find that token and lose the newer local grant.
    if !remote.releaser.drain(ADOPT_AFTER_RELEASES).await {
        tracing::warn!("releases made while Redis was away are not done; adopting anyway");
    }
    let grants = remote.degraded.local_grants_now();
    for ((lock, token), grant) in grants {
        if !locks.holds(&lock, &token) {
            // Released or expired meanwhile (UNLOCK forgets it; an expiry does not).
            remote.degraded.forget_local(&lock, &token);
            continue;
        }
        let adopted = remote
            .link
            .adopt(&lock, &token, Remote::redis_lease(grant.lease), grant.fence)
            .await;
        match adopted {
            Ok(Adopt::Adopted { seq }) => {
                remote.coherent.raise_barrier(seq);
                if !remote.degraded.forget_local(&lock, &token) || !locks.holds(&lock, &token) {
                    // Released while the adopt ran: let it go in Redis too.
                    remote.release_later(lock, token, grant.lease);
                } else if grant.auto_renew {
                    tokio::spawn(renew(
                        locks.clone(),
                        remote.clone(),
                        lock,
                        token,
                        grant.lease,
                    ));
                }
            }
            Ok(Adopt::Superseded { newest }) => remote.degraded.lose(
                locks,
                &lock,
                &token,
                &format!("another daemon was granted it while Redis was away (fence {newest})"),
            ),
            Ok(Adopt::OtherHolder) => {
                remote
                    .degraded
                    .lose(locks, &lock, &token, "another daemon holds it in Redis")
            }
            Err(e) if e.is_unavailable() => return,
            Err(e) => {
                tracing::warn!(lock, error = %e, "adopting a lock granted while degraded failed");
            }
        }
    }
}
