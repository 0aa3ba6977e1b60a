//! EXTEND: renews the lease of a lock held with this owner token, to `ttl_ms` (or the lease it has)
//! from now.

use std::sync::Arc;

use tokio::time::Instant;

use scaled_client::proto::Args;

use super::{answered, lock_millis, required_key, required_token, Answer, CommandError, Reply};
use crate::daemon::Daemon;
use crate::store::Step;

pub fn run(
    daemon: &Arc<Daemon>,
    mut args: Args,
    now: Instant,
) -> Result<Step<Answer>, CommandError> {
    let key = required_key(&mut args)?;
    let token = required_token(&mut args)?;
    // Without ttl_ms the lease is renewed for the length it was granted with.
    let lease = lock_millis(args.ttl_ms, "ttl_ms")?;
    let step = daemon.store.extend(&key, &token, lease, now);
    Ok(answered(daemon, step, |(status, lease)| {
        Reply::Status(status, Some(lease.as_millis() as u64))
    }))
}
