//! GET: the value under a key, or nil.

use std::sync::Arc;

use tokio::time::Instant;

use scaled_client::proto::Args;

use super::{required_key, CommandError, CommandResult, Reply};
use crate::daemon::Daemon;
use crate::store::Step;

pub fn run(
    daemon: &Arc<Daemon>,
    mut args: Args,
    now: Instant,
) -> Result<Step<CommandResult>, CommandError> {
    let key = required_key(&mut args)?;
    Ok(daemon.store.get(&key, now).map(|found| {
        let value = found.map_err(CommandError::from)?;
        Ok(value.map_or(Reply::Nil, Reply::Value))
    }))
}
