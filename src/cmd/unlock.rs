//! UNLOCK: releases a lock held with this owner token and hands it to the next waiter.

use std::sync::Arc;

use tokio::time::Instant;

use scaled_client::proto::Args;

use super::{answered, required_key, required_token, Answer, CommandError, Reply};
use crate::daemon::Daemon;
use crate::store::Step;

pub fn run(
    daemon: &Arc<Daemon>,
    mut args: Args,
    now: Instant,
) -> Result<Step<Answer>, CommandError> {
    let key = required_key(&mut args)?;
    let token = required_token(&mut args)?;
    let step = daemon.store.unlock(&key, &token, now);
    Ok(answered(daemon, step, |s| Reply::Status(s, None)))
}
