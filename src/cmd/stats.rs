//! STATS: the daemon's counters, in the original architecture's shape and more. [`Daemon::stats`] computes
//! them; this command only encodes them.

use std::sync::Arc;

use tokio::time::Instant;

use super::{CommandResult, Reply};
use crate::daemon::Daemon;

pub fn run(daemon: &Arc<Daemon>, now: Instant) -> CommandResult {
    Reply::encode(&daemon.stats(now))
}
