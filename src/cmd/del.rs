//! DEL: removes a key; answers whether it was there.

use std::sync::Arc;

use tokio::time::Instant;

use scaled_client::proto::Args;

use super::{required_key, CommandResult, Reply};
use crate::daemon::Daemon;

pub fn run(daemon: &Arc<Daemon>, mut args: Args, now: Instant) -> CommandResult {
    let key = required_key(&mut args)?;
    Ok(Reply::Bool(daemon.cache.remove(&key, now)))
}
