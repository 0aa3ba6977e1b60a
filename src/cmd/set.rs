//! SET: stores a value under a key, with a TTL (CACHE_TTL when none is given, none when 0).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use scaled_client::proto::{Args, ErrorCode, MAX_VALUE_LEN};

use super::{checked_fence, required_key, CommandError, CommandResult, Reply};
use crate::daemon::Daemon;
use crate::store::Step;

/// The longest `ttl_ms` kept as a TTL, 2⁶² ms (about 146 million years); a longer one is taken as 0,
/// no expiry. Redis refuses an expiry past 2⁶³ ms after its clock's epoch, so passing a larger TTL on
/// would fail the write for no reason a client could see, and no entry can tell the difference.
pub const MAX_TTL_MS: u64 = 1 << 62;

pub fn run(
    daemon: &Arc<Daemon>,
    mut args: Args,
    now: Instant,
) -> Result<Step<CommandResult>, CommandError> {
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
        Some(ms) if ms > MAX_TTL_MS => None,
        Some(ms) => Some(Duration::from_millis(ms)),
    };
    let fence = checked_fence(&mut args)?;
    Ok(daemon
        .store
        .set(&key, Bytes::from(value), ttl, fence, now)
        .map(|written| {
            written.map_err(CommandError::from)?;
            Ok(Reply::Text("OK"))
        }))
}
