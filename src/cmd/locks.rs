//! LOCKS: the locks held now, with owner, age, lease left and queue length: the first
//! [`MAX_LOCKS_PAGE`] by key, so that one answer stays small however many locks are held.

use std::sync::Arc;

use tokio::time::Instant;

use super::{CommandResult, Reply};
use crate::daemon::Daemon;
use crate::locks::MAX_LOCKS_PAGE;

pub fn run(daemon: &Arc<Daemon>, now: Instant) -> CommandResult {
    Reply::encode(&daemon.locks.page(None, MAX_LOCKS_PAGE, now).locks)
}
