//! Cancelling the requests a departing connection left waiting, a slice at a time.
//!
//! A connection may leave with up to SCALED_MAX_IN_FLIGHT requests waiting (LOCKs in a queue, timed
//! PINGs, reads on Redis), each a task of its own. Aborting them all at once puts every one of them on
//! the runtime's run queue together, and another connection's answer, woken a moment later, waits
//! behind all of their cancellations: with a hundred thousand waits that was a stall of tens of
//! milliseconds. Here a task of its own aborts them [`SLICE`] at a time and yields between slices, so
//! at most one slice of cancellations ever stands in front of another connection's work.
//!
//! Nothing a client was promised depends on how soon this ends: the connection's locks were released
//! before (and its waits can no longer be granted, their connection's `alive` token being cancelled);
//! what is left is taking the dead waits out of their queues and giving back their memory.

use tokio::task::{AbortHandle, JoinSet};

/// Most waiting requests cancelled before the task lets the others run. One cancellation (a LOCK
/// leaving its queue) is a few microseconds, so a slice costs another connection well under a
/// millisecond. Measured with 100 000 queued LOCKs withdrawn (`tests/bounds_locks_bench.rs`): at
/// 64 a slice, another client still saw one stall of 60 to 110 ms early in the withdrawal; at 16
/// its slowest round trip was 4 to 5.5 ms, for about a fifth more CPU in all.
pub const SLICE: usize = 16;

/// Cancels every task of `set`, whose abort handles are `handles` (finished tasks' handles may be
/// among them). A set no larger than a slice is cancelled at once; a larger one by a task that starts
/// now and yields between slices.
pub fn retire<T: Send + 'static>(set: JoinSet<T>, handles: Vec<AbortHandle>) {
    if set.len() <= SLICE {
        // Dropping the set aborts its tasks.
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(cancel_in_slices(set, handles));
        }
        // Outside a runtime nothing else can be held up: the set's drop aborts the tasks.
        Err(_) => drop(set),
    }
}

/// Aborts the tasks [`SLICE`] at a time, reaping the ones that ended as it goes, then waits for the
/// last of them. A slice's abort handles are dropped once its tasks have been reaped: a task's memory
/// goes only when both its handles have, so keeping every handle to the end would free all the tasks
/// at once, in one long stretch of the serving thread.
async fn cancel_in_slices<T: 'static>(mut set: JoinSet<T>, handles: Vec<AbortHandle>) {
    let mut handles = handles.into_iter();
    loop {
        let slice: Vec<AbortHandle> = handles.by_ref().take(SLICE).collect();
        if slice.is_empty() {
            break;
        }
        for handle in &slice {
            handle.abort();
        }
        tokio::task::yield_now().await;
        // The slice's cancellations have run by now (or will soon): take them out of the set so it
        // shrinks as the work is done.
        while set.try_join_next().is_some() {}
        drop(slice);
    }
    // Tasks whose handles were not kept (none, but the set is the authority) go with the set.
    set.abort_all();
    while set.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    /// Counts the tasks whose future was dropped (cancelled or finished).
    struct Gone(Arc<AtomicUsize>);

    impl Drop for Gone {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn every_task_is_cancelled_slice_by_slice() {
        let gone = Arc::new(AtomicUsize::new(0));
        let mut set = JoinSet::new();
        let mut handles = Vec::new();
        let n = SLICE * 10 + 3;
        for _ in 0..n {
            let guard = Gone(gone.clone());
            handles.push(set.spawn(async move {
                let _guard = guard;
                std::future::pending::<()>().await;
            }));
        }
        // Let every task start, so cancelling is what ends them.
        tokio::task::yield_now().await;
        retire(set, handles);
        for _ in 0..100_000 {
            if gone.load(Ordering::SeqCst) == n {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!(
            "only {} of {n} waiting tasks were cancelled",
            gone.load(Ordering::SeqCst)
        );
    }

    #[tokio::test]
    async fn a_small_set_is_cancelled_at_once() {
        let gone = Arc::new(AtomicUsize::new(0));
        let mut set = JoinSet::new();
        let mut handles = Vec::new();
        for _ in 0..SLICE {
            let guard = Gone(gone.clone());
            handles.push(set.spawn(async move {
                let _guard = guard;
                std::future::pending::<()>().await;
            }));
        }
        tokio::task::yield_now().await;
        retire(set, handles);
        for _ in 0..1000 {
            if gone.load(Ordering::SeqCst) == SLICE {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("a set of one slice was not cancelled");
    }
}
