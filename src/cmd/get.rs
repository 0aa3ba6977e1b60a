//! GET: the value under a key, or nil.

use std::sync::Arc;

use tokio::time::Instant;

use scaled_client::proto::Args;

use super::{answered, required_key, Answer, CommandError, Reply};
use crate::daemon::Daemon;
use crate::store::Step;

pub fn run(
    daemon: &Arc<Daemon>,
    mut args: Args,
    now: Instant,
) -> Result<Step<Answer>, CommandError> {
    let key = required_key(&mut args)?;
    Ok(answered(daemon, daemon.store.get(&key, now), |value| {
        value.map_or(Reply::Nil, Reply::Value)
    }))
}
