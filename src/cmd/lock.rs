//! LOCK: takes a session lock, waits for it in FIFO order, or fails at once in try mode.

use std::sync::Arc;

use tokio::time::Instant;

use scaled_client::proto::Args;

use super::{answered, lock_millis, required_key, CommandError, Outcome, Peer, Reply};
use crate::daemon::Daemon;
use crate::locks::LockRequest;
use crate::store::lock::LockAsk;

pub fn run(daemon: &Arc<Daemon>, peer: &Peer, mut args: Args, now: Instant) -> Outcome {
    let parsed = (|| {
        let key = required_key(&mut args)?;
        let lease =
            lock_millis(args.ttl_ms, "ttl_ms")?.unwrap_or_else(|| daemon.config.default_lease());
        // A wait of 0, asked for or configured, means "do not wait", which is try mode.
        let wait = match args.wait_ms {
            Some(0) => None,
            Some(ms) => lock_millis(Some(ms), "wait_ms")?,
            None => Some(daemon.config.default_lock_wait()),
        }
        .filter(|w| !w.is_zero());
        Ok::<_, CommandError>((key, lease, wait))
    })();
    let (key, lease, wait) = match parsed {
        Ok(p) => p,
        Err(e) => return Outcome::failed(e),
    };
    let request = LockRequest {
        conn: peer.conn_id,
        alive: peer.alive.clone(),
        owner: peer.owner.clone(),
        lease,
        auto_renew: args.auto_renew.unwrap_or(false),
        try_only: args.try_only.unwrap_or(false) || wait.is_none(),
    };
    let ask = LockAsk {
        key,
        request,
        wait,
        shutdown: &daemon.shutdown,
        tally: peer.tally.as_ref(),
    };
    answered(daemon, daemon.store.lock(ask, now), Reply::Grant).into()
}
