//! SET: stores a value under a key, with a TTL (CACHE_TTL when none is given, none when 0).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use scaled_client::proto::{Args, ErrorCode, MAX_VALUE_LEN};

use super::{checked_fence, fenced, required_key, CommandError, CommandResult, Reply};
use crate::daemon::Daemon;

pub fn run(daemon: &Arc<Daemon>, mut args: Args, now: Instant) -> CommandResult {
    let key = required_key(&mut args)?;
    let value = args
        .value
        .take()
        .ok_or_else(|| CommandError::new(ErrorCode::BadArgument, "missing argument `value`"))?;
    if value.len() > MAX_VALUE_LEN {
        return Err(CommandError::new(
            ErrorCode::TooLarge,
            format!(
                "value of {} bytes is over the {MAX_VALUE_LEN} byte limit",
                value.len()
            ),
        ));
    }
    let ttl = match args.ttl_ms {
        None => daemon.config.default_cache_ttl(),
        Some(0) => None,
        Some(ms) => Some(Duration::from_millis(ms)),
    };
    // A TTL too long to add to the clock is as good as none.
    let expires_at = ttl.and_then(|t| now.checked_add(t));
    let fence = checked_fence(&mut args)?;
    let write = || daemon.cache.set(&key, Bytes::from(value), expires_at, now);
    let written = match fence {
        None => write(),
        Some(fence) => daemon
            .locks
            .fenced(&fence.lock, fence.token, write)
            .map_err(fenced)?,
    };
    written.map_err(|e| CommandError::new(ErrorCode::TooLarge, e.to_string()))?;
    Ok(Reply::Text("OK"))
}
