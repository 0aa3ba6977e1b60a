//! UNLOCK: releases a lock held with this owner token and hands it to the next waiter.

use std::sync::Arc;

use tokio::time::Instant;

use scaled_client::proto::Args;

use super::{required_key, required_token, CommandResult, Reply};
use crate::daemon::Daemon;

pub fn run(daemon: &Arc<Daemon>, mut args: Args, now: Instant) -> CommandResult {
    let key = required_key(&mut args)?;
    let token = required_token(&mut args)?;
    Ok(Reply::Status(daemon.locks.release(&key, &token, now), None))
}
