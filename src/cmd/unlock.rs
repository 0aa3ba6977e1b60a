//! UNLOCK: releases a lock held with this owner token and hands it to the next waiter.

use std::sync::Arc;

use tokio::time::Instant;

use scaled_client::proto::Args;

use super::{required_key, required_token, CommandError, CommandResult, Reply};
use crate::daemon::Daemon;
use crate::store::Step;

pub fn run(
    daemon: &Arc<Daemon>,
    mut args: Args,
    now: Instant,
) -> Result<Step<CommandResult>, CommandError> {
    let key = required_key(&mut args)?;
    let token = required_token(&mut args)?;
    Ok(daemon
        .store
        .unlock(&key, &token, now)
        .map(|status| Ok(Reply::Status(status.map_err(CommandError::from)?, None))))
}
