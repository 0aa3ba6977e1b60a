//! LOCK: takes a session lock, waits for it in FIFO order, or fails at once in try mode.

use std::sync::Arc;

use tokio::time::Instant;

use scaled_client::proto::{Args, ErrorCode};

use super::{lock_millis, required_key, CommandError, Outcome, Peer, Reply};
use crate::daemon::Daemon;
use crate::locks::{Acquire, Limit, LockRequest};

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
        Err(e) => return Outcome::Done(Err(e)),
    };
    let request = LockRequest {
        conn: peer.conn_id,
        alive: peer.alive.clone(),
        owner: peer.owner.clone(),
        lease,
        auto_renew: args.auto_renew.unwrap_or(false),
        try_only: args.try_only.unwrap_or(false) || wait.is_none(),
    };
    match daemon.locks.acquire(&key, request, now) {
        Acquire::Granted(grant) => Outcome::Done(Ok(Reply::Grant(grant))),
        Acquire::Busy => Outcome::Done(Err(CommandError::new(
            ErrorCode::Locked,
            format!("lock `{key}` is held"),
        ))),
        Acquire::Refused(Limit::Records(max)) => Outcome::Done(Err(CommandError::new(
            ErrorCode::Overloaded,
            format!(
                "the lock table is full: all {max} lock records (SCALED_MAX_LOCKS) are held or \
                 waited for; retry when some are released"
            ),
        ))),
        Acquire::Refused(Limit::Waiters(max)) => Outcome::Done(Err(CommandError::new(
            ErrorCode::Overloaded,
            format!("lock `{key}` already has {max} waiters (SCALED_MAX_WAITERS); retry later"),
        ))),
        Acquire::Queued(mut ticket) => {
            let wait = wait.unwrap_or_default();
            let shutdown = daemon.shutdown.clone();
            Outcome::Later(Box::pin(async move {
                // Dropping the ticket on any branch but the grant leaves the queue, and gives back a
                // grant that raced with the timeout.
                tokio::select! {
                    grant = ticket.granted() => match grant {
                        Some(grant) => Ok(Reply::Grant(grant)),
                        None => Err(CommandError::new(ErrorCode::Internal, "the wait was dropped")),
                    },
                    _ = tokio::time::sleep(wait) => {
                        ticket.time_out();
                        Err(CommandError::new(
                            ErrorCode::LockTimeout,
                            format!("lock `{key}` not granted within {} ms", wait.as_millis()),
                        ))
                    }
                    _ = shutdown.cancelled() => Err(CommandError::new(
                        ErrorCode::ShuttingDown,
                        "the daemon is shutting down",
                    )),
                }
            }))
        }
    }
}
