//! Daemon-wide budgets that per-connection limits alone cannot give: the bytes of connection buffers
//! beyond each connection's small base allowance, the requests waiting across all connections, and
//! the bytes of SET values waiting on Redis ([`Reservoir`]).
//!
//! Per-connection limits times the connection limit would allow far more memory than a host can
//! spare (10 000 connections each holding a 2 MiB frame is 20 GiB), so anything a connection holds
//! beyond its base allowance is charged here first. A charge that does not fit is refused, and the
//! connection answers with a documented error instead of growing; nothing already acknowledged is
//! touched. Charges are plain atomics: no lock, no allocation, on any path.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A pool of units (bytes, or waiting requests) that charges take from and return to.
pub struct Budget {
    /// What may be charged at once.
    limit: usize,
    /// What is charged now.
    used: AtomicUsize,
}

impl Budget {
    /// A budget of `limit` units, none charged.
    pub fn new(limit: usize) -> Budget {
        Budget {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    /// Charges `n` units if they fit under the limit; false (and nothing charged) if not.
    pub fn try_charge(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    /// Returns `n` units charged earlier.
    pub fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// Units charged now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// What one connection has charged to a byte budget, kept equal to the capacity its buffers hold
/// beyond their base allowance.
#[derive(Default)]
pub struct Charge {
    /// Bytes charged now.
    charged: usize,
}

impl Charge {
    /// Brings the charge to `needed` bytes: returns the surplus, or charges the shortfall. False when
    /// the shortfall does not fit; the charge is then unchanged and the caller must not keep the
    /// memory.
    pub fn settle(&mut self, budget: &Budget, needed: usize) -> bool {
        if needed <= self.charged {
            budget.release(self.charged - needed);
            self.charged = needed;
            return true;
        }
        if budget.try_charge(needed - self.charged) {
            self.charged = needed;
            return true;
        }
        false
    }

    /// Returns everything charged.
    pub fn clear(&mut self, budget: &Budget) {
        budget.release(std::mem::take(&mut self.charged));
    }
}

/// One unit held from a budget of waiting requests, given back when dropped (also when the waiting
/// request is cancelled).
pub struct Slot(Arc<Budget>);

impl Slot {
    /// Takes one unit, if one is free.
    pub fn take(budget: &Arc<Budget>) -> Option<Slot> {
        budget.try_charge(1).then(|| Slot(budget.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.release(1);
    }
}

/// A byte budget that requests wait for instead of being refused: the values of SETs waiting on Redis
/// (REDIS_MAX_PENDING_BYTES). A connection whose next SET does not fit stops taking requests until
/// enough of the charges held elsewhere are dropped; each drop wakes those connections.
pub struct Reservoir {
    /// The bytes charged and the limit.
    budget: Budget,
    /// Woken whenever bytes are given back.
    freed: tokio::sync::Notify,
}

impl Reservoir {
    /// A reservoir of `limit` bytes, none charged.
    pub fn new(limit: usize) -> Reservoir {
        Reservoir {
            budget: Budget::new(limit),
            freed: tokio::sync::Notify::new(),
        }
    }

    /// Charges `n` bytes (at most the whole limit, so that any charge fits once alone) if they fit
    /// now.
    pub fn try_charge(self: &Arc<Self>, n: usize) -> Option<Held> {
        let n = n.min(self.budget.limit());
        self.budget.try_charge(n).then(|| Held(self.clone(), n))
    }

    /// Charges `n` bytes, waiting until they fit. Cancel-safe: nothing is charged until it returns.
    pub async fn charge(self: &Arc<Self>, n: usize) -> Held {
        loop {
            // Registered before the check, so bytes given back between the two are not missed.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(held) = self.try_charge(n) {
                return held;
            }
            freed.await;
        }
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.budget.used()
    }
}

/// Bytes held from a [`Reservoir`], given back (and the waiters woken) when dropped, also when the
/// request holding them is cancelled.
pub struct Held(Arc<Reservoir>, usize);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.budget.release(self.1);
        self.0.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_never_pass_the_limit_and_settle_both_ways() {
        let budget = Budget::new(100);
        let (mut a, mut b) = (Charge::default(), Charge::default());
        assert!(a.settle(&budget, 60));
        assert!(!b.settle(&budget, 50), "60 + 50 is over 100");
        assert_eq!(budget.used(), 60);
        assert!(b.settle(&budget, 40));
        assert!(a.settle(&budget, 10), "shrinking always fits");
        assert_eq!(budget.used(), 50);
        a.clear(&budget);
        b.clear(&budget);
        assert_eq!(budget.used(), 0);
        let one = Arc::new(Budget::new(1));
        let slot = Slot::take(&one).expect("one free");
        assert!(Slot::take(&one).is_none());
        drop(slot);
        assert!(Slot::take(&one).is_some());
    }

    #[tokio::test]
    async fn a_reservoir_charge_waits_until_bytes_are_given_back() {
        let pool = Arc::new(Reservoir::new(100));
        let first = pool.try_charge(70).expect("fits");
        assert!(pool.try_charge(50).is_none());
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { pool.charge(50).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "charged past the limit");
        drop(first);
        let second = waiter.await.expect("charged once freed");
        assert_eq!(pool.used(), 50);
        drop(second);
        let all = pool.try_charge(1000).expect("clamped to the limit");
        assert_eq!(pool.used(), 100);
        drop(all);
    }
}
