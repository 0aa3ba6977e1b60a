//! LOCKS: the locks held now, with owner, age, lease left and queue length.

use std::sync::Arc;

use tokio::time::Instant;

use super::{CommandResult, Reply};
use crate::daemon::Daemon;

pub fn run(daemon: &Arc<Daemon>, now: Instant) -> CommandResult {
    Reply::encode(&daemon.locks.list(now))
}
