//! What one connection's waiting requests count against (proto-spec.md, "Requests waiting on Redis"):
//!
//! - requests waiting on other clients or on time (a LOCK in a queue or waiting for another daemon's
//!   holder, a delayed PING) count toward SCALED_MAX_IN_FLIGHT, and each takes one of the daemon's
//!   SCALED_MAX_WAITING slots; past either the request is refused `OVERLOADED`;
//! - requests waiting only on Redis count toward REDIS_MAX_PENDING, at which the connection takes no
//!   new request until one finishes; they are never refused for their number.
//!
//! Each count is held by a guard the request owns for as long as it waits that way, so the counts stay
//! right however the request ends (answered, cancelled with its connection). A LOCK whose lock is free
//! on this daemon begins in the second kind, its Redis step, and moves to the first if Redis says
//! another daemon holds the lock and it is to wait ([`Tally::admit`] then).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::budget::{Budget, Slot};
use crate::throttle::Throttle;
use crate::throttled_warn;

/// Refusals for the daemon's waiting limit: a client can cause them at will.
static REFUSED: Throttle = Throttle::new();

/// One connection's counts, shared by its connection loop and the requests that wait.
#[derive(Clone)]
pub struct Tally {
    /// Requests waiting on other clients or on time.
    in_flight: Arc<AtomicUsize>,
    /// Requests waiting only on Redis.
    remote: Arc<AtomicUsize>,
    /// SCALED_MAX_IN_FLIGHT.
    max_in_flight: usize,
    /// SCALED_MAX_WAITING, daemon-wide.
    waiting: Arc<Budget>,
}

impl Tally {
    /// Counts for a new connection, held to `max_in_flight` and to the daemon's `waiting` slots.
    pub fn new(max_in_flight: usize, waiting: Arc<Budget>) -> Tally {
        Tally {
            in_flight: Arc::default(),
            remote: Arc::default(),
            max_in_flight,
            waiting,
        }
    }

    /// Requests waiting on other clients or on time now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Requests waiting only on Redis now.
    pub fn remote(&self) -> usize {
        self.remote.load(Ordering::Acquire)
    }

    /// Counts one request waiting only on Redis, until the guard is dropped. Never refused.
    pub fn count_remote(&self) -> RemoteCount {
        self.remote.fetch_add(1, Ordering::AcqRel);
        RemoteCount(self.remote.clone())
    }

    /// Admits one request that waits on other clients or on time, counted until the guard is
    /// dropped; or says why not (the message of its `OVERLOADED`).
    pub fn admit(&self) -> Result<WaitCount, String> {
        let max = self.max_in_flight;
        let counted = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        if counted.is_err() {
            return Err(format!(
                "{max} requests of this connection are already waiting; \
                 retry when some finish, or use another connection"
            ));
        }
        let count = InFlightCount(self.in_flight.clone());
        match Slot::take(&self.waiting) {
            Some(slot) => Ok(WaitCount {
                _count: count,
                _slot: slot,
            }),
            None => {
                throttled_warn!(
                    REFUSED,
                    "waiting limit (SCALED_MAX_WAITING) reached; refusing a wait"
                );
                Err(
                    "the daemon's limit of waiting requests (SCALED_MAX_WAITING) is reached; \
                     retry later"
                        .to_string(),
                )
            }
        }
    }
}

/// One request waiting only on Redis, counted while it lives.
pub struct RemoteCount(Arc<AtomicUsize>);

impl Drop for RemoteCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One request waiting on other clients or on time: its place under SCALED_MAX_IN_FLIGHT and its
/// daemon-wide slot, both given back when it is dropped.
pub struct WaitCount {
    _count: InFlightCount,
    _slot: Slot,
}

struct InFlightCount(Arc<AtomicUsize>);

impl Drop for InFlightCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(admitted: Result<WaitCount, String>) -> String {
        match admitted {
            Ok(_) => panic!("admitted past a limit"),
            Err(message) => message,
        }
    }

    #[test]
    fn counts_follow_their_guards_and_limits_refuse_past_them() {
        let waiting = Arc::new(Budget::new(3));
        let a = Tally::new(2, waiting.clone());
        let b = Tally::new(2, waiting);
        let first = a.admit().expect("room");
        let second = a.admit().expect("room");
        let refused = refusal(a.admit());
        assert!(
            refused.contains("2 requests of this connection"),
            "{refused}"
        );
        assert_eq!(a.in_flight(), 2);
        // The daemon has one slot left: the other connection gets it, then is refused.
        let third = b.admit().expect("the last daemon-wide slot");
        let refused = refusal(b.admit());
        assert!(refused.contains("SCALED_MAX_WAITING"), "{refused}");
        assert_eq!(b.in_flight(), 1, "a refusal gives its count back");
        drop((first, third));
        assert_eq!((a.in_flight(), b.in_flight()), (1, 0));
        let again = b.admit().expect("a slot was given back");
        let remote: Vec<_> = (0..5).map(|_| a.count_remote()).collect();
        assert_eq!(a.remote(), 5, "never refused for their number");
        drop((remote, second, again));
        assert_eq!((a.in_flight(), a.remote(), b.in_flight()), (0, 0, 0));
    }
}
