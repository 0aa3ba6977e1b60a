//! DEL: removes a key; answers whether it was there.

use std::sync::Arc;

use tokio::time::Instant;

use scaled_client::proto::Args;

use super::{checked_fence, fenced, required_key, CommandResult, Reply};
use crate::daemon::Daemon;

pub fn run(daemon: &Arc<Daemon>, mut args: Args, now: Instant) -> CommandResult {
    let key = required_key(&mut args)?;
    let fence = checked_fence(&mut args)?;
    let remove = || daemon.cache.remove(&key, now);
    let existed = match fence {
        None => remove(),
        Some(fence) => daemon
            .locks
            .fenced(&fence.lock, fence.token, remove)
            .map_err(fenced)?,
    };
    Ok(Reply::Bool(existed))
}
