//! GET: the value under a key, or nil.

use std::sync::Arc;

use tokio::time::Instant;

use scaled_client::proto::Args;

use super::{required_key, CommandResult, Reply};
use crate::daemon::Daemon;

pub fn run(daemon: &Arc<Daemon>, mut args: Args, now: Instant) -> CommandResult {
    let key = required_key(&mut args)?;
    Ok(daemon.cache.get(&key, now).map_or(Reply::Nil, Reply::Value))
}
