//! DEL: removes a key; answers whether it was there.

use std::sync::Arc;

use tokio::time::Instant;

use scaled_client::proto::Args;

use super::{checked_fence, required_key, CommandError, CommandResult, Reply};
use crate::daemon::Daemon;
use crate::store::Step;

pub fn run(
    daemon: &Arc<Daemon>,
    mut args: Args,
    now: Instant,
) -> Result<Step<CommandResult>, CommandError> {
    let key = required_key(&mut args)?;
    let fence = checked_fence(&mut args)?;
    Ok(daemon
        .store
        .del(&key, fence, now)
        .map(|existed| Ok(Reply::Bool(existed.map_err(CommandError::from)?))))
}
