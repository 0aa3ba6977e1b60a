//! The requests of one connection that finish later (LOCKs in a queue, timed PINGs, reads and writes
//! waiting on Redis): the set of their tasks, what they count against SCALED_MAX_IN_FLIGHT and
//! REDIS_MAX_PENDING, and their cancelling when the connection ends, a slice at a time
//! ([`crate::retire`]). The connection loop (`src/connection.rs`) owns one [`Waits`].

use std::sync::Arc;

use scaled_client::proto::Request;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use crate::cmd::Answer;
use crate::config::Config;
use crate::context::RequestContext;
use crate::daemon::Daemon;
use crate::tally::Tally;

/// What a request that waits is: its context and the answer it finishes with.
pub(crate) type Waiting = JoinSet<(RequestContext, Answer)>;

/// The requests of one connection that wait, and the limits on them.
pub(crate) struct Waits {
    /// Every request that finishes later, each answered when it does; dropping it cancels them.
    pub(crate) set: Waiting,
    /// An abort handle per task of `set` (and some of tasks already ended, swept now and then), so
    /// that a departing connection's waits can be cancelled a slice at a time (see [`crate::retire`]).
    pub(crate) handles: Vec<AbortHandle>,
    /// How many of them wait on other clients or on time, and how many only on Redis: each holds a
    /// guard of its count and drops it when it ends, finished or cancelled, so the counts stay right
    /// whatever ends them. Shared with the connection's [`crate::cmd::Peer`], for the LOCKs that move
    /// from one count to the other.
    pub(crate) tally: Tally,
    /// REDIS_MAX_PENDING: at this many requests waiting on Redis, no new request is taken.
    pub(crate) max_remote: usize,
    /// A SET taken off the connection whose value does not fit REDIS_MAX_PENDING_BYTES yet, and when
    /// its frame was taken. It runs once enough pending values finish; nothing after it is taken
    /// before, which keeps the connection's order.
    pub(crate) parked: Option<(Request, Instant)>,
}

impl Waits {
    pub(crate) fn new(daemon: &Arc<Daemon>) -> Waits {
        let config: &Config = &daemon.config;
        Waits {
            set: JoinSet::new(),
            handles: Vec::new(),
            tally: Tally::new(
                usize::try_from(config.max_in_flight).unwrap_or(usize::MAX),
                daemon.waiting.clone(),
            ),
            max_remote: usize::try_from(config.redis_max_pending).unwrap_or(usize::MAX),
            parked: None,
        }
    }

    /// Whether the connection must take no new request: REDIS_MAX_PENDING requests wait on Redis,
    /// or a SET waits for room in REDIS_MAX_PENDING_BYTES.
    pub(crate) fn paused(&self) -> bool {
        self.parked.is_some() || self.tally.remote() >= self.max_remote
    }

    /// The value bytes of the parked SET (0 without one).
    pub(crate) fn parked_bytes(&self) -> usize {
        self.parked
            .as_ref()
            .map_or(0, |(r, _)| r.args.value.as_ref().map_or(0, Vec::len))
    }

    /// Whether nothing waits, parked or running.
    pub(crate) fn is_empty(&self) -> bool {
        self.set.is_empty() && self.parked.is_none()
    }

    /// Keeps the abort handle of a task just spawned into `set`. Handles of ended tasks are swept once
    /// they are half the list, so the list stays within twice the tasks alive, at O(1) amortised.
    pub(crate) fn track(&mut self, handle: AbortHandle) {
        if self.handles.len() >= 2 * self.set.len() + 64 {
            self.handles.retain(|h| !h.is_finished());
        }
        self.handles.push(handle);
    }

    /// Cancels everything that waits: the connection is ending. The cancelling is handed to
    /// [`crate::retire`], which does it a slice at a time, so a connection leaving with a hundred
    /// thousand waits does not hold up the others' answers.
    pub(crate) fn abort_all(&mut self) {
        self.parked = None;
        let set = std::mem::take(&mut self.set);
        crate::retire::retire(set, std::mem::take(&mut self.handles));
    }
}

impl Drop for Waits {
    fn drop(&mut self) {
        self.abort_all();
    }
}
