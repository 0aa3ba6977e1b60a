//! The requests of one connection that finish later (LOCKs in a queue, timed PINGs, reads and writes
//! waiting on Redis): the set of their tasks, what they count against SCALED_MAX_IN_FLIGHT and
//! REDIS_MAX_PENDING, and their cancelling when the connection ends, a slice at a time
//! ([`crate::retire`]). The connection loop (`src/connection.rs`) owns one [`Waits`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use scaled_client::proto::Request;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use crate::cmd::Answer;
use crate::config::Config;
use crate::context::RequestContext;

/// What a request that waits is: its context and the answer it finishes with.
pub(crate) type Waiting = JoinSet<(RequestContext, Answer)>;

/// The requests of one connection that wait, and the limits on them.
pub(crate) struct Waits {
    /// Every request that finishes later, each answered when it does; dropping it cancels them.
    pub(crate) set: Waiting,
    /// An abort handle per task of `set` (and some of tasks already ended, swept now and then), so
    /// that a departing connection's waits can be cancelled a slice at a time (see [`crate::retire`]).
    pub(crate) handles: Vec<AbortHandle>,
    /// How many of them wait only on Redis. Each such request holds a [`RemoteCount`] and drops it
    /// when it ends, finished or cancelled, so the count stays right whatever ends them.
    pub(crate) remote: Arc<AtomicUsize>,
    /// SCALED_MAX_IN_FLIGHT: most requests waiting on other clients or on time.
    pub(crate) max_in_flight: usize,
    /// REDIS_MAX_PENDING: at this many requests waiting on Redis, no new request is taken.
    pub(crate) max_remote: usize,
    /// A SET taken off the connection whose value does not fit REDIS_MAX_PENDING_BYTES yet, and when
    /// its frame was taken. It runs once enough pending values finish; nothing after it is taken
    /// before, which keeps the connection's order.
    pub(crate) parked: Option<(Request, Instant)>,
}

impl Waits {
    pub(crate) fn new(config: &Config) -> Waits {
        Waits {
            set: JoinSet::new(),
            handles: Vec::new(),
            remote: Arc::default(),
            max_in_flight: usize::try_from(config.max_in_flight).unwrap_or(usize::MAX),
            max_remote: usize::try_from(config.redis_max_pending).unwrap_or(usize::MAX),
            parked: None,
        }
    }

    /// Whether the connection must take no new request: REDIS_MAX_PENDING requests wait on Redis,
    /// or a SET waits for room in REDIS_MAX_PENDING_BYTES.
    pub(crate) fn paused(&self) -> bool {
        self.parked.is_some() || self.remote.load(Ordering::Acquire) >= self.max_remote
    }

    /// Requests waiting on other clients or on time: what SCALED_MAX_IN_FLIGHT bounds.
    pub(crate) fn in_flight(&self) -> usize {
        self.set
            .len()
            .saturating_sub(self.remote.load(Ordering::Acquire))
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

/// One request waiting on Redis, counted in its connection's [`Waits::remote`] while it lives.
pub(crate) struct RemoteCount(Arc<AtomicUsize>);

impl RemoteCount {
    pub(crate) fn new(count: &Arc<AtomicUsize>) -> RemoteCount {
        count.fetch_add(1, Ordering::AcqRel);
        RemoteCount(count.clone())
    }
}

impl Drop for RemoteCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
