//! Per-key order on one daemon: a write of a key that waits on Redis holds back the later GET, SET
//! and DEL of that key until it has finished (proto-spec.md, "Per-key order").
//!
//! The order is fixed when a request is dispatched, which happens in arrival order on a connection:
//! [`Chains::write`] and [`Chains::read`] are plain calls made before the request's future exists.
//! Each key with a write in flight has one entry, the newest write's [`Link`]; a later request takes a
//! receiver on it and waits until that write's sender is dropped (finished or cancelled). Writes
//! chain one after another, so they also reach Redis in the order they were sent.
//!
//! A write that finishes also retires the key's read in flight ([`Flights::retire`]) before it lets
//! the requests after it run, so a GET after a write never shares a read that began before it.
//!
//! Bounded by what it follows: one entry per key with a write in flight, and writes in flight are
//! bounded per connection and per daemon.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hashbrown::HashMap;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::store::flight::Flights;

/// The newest write in flight of each key.
#[derive(Default)]
pub struct Chains {
    /// Key → (the write's number, a receiver that closes when it finishes).
    tails: Mutex<HashMap<String, (u64, watch::Receiver<()>)>>,
    /// Numbers writes, so a finished write removes its entry only if no later write replaced it.
    next: AtomicU64,
    /// The GETs' shared reads, which each finished write of their key retires.
    pub flights: Arc<Flights>,
}

/// What a request waits for before it runs: the write before it on its key, if any.
pub struct After(Option<watch::Receiver<()>>);

impl After {
    /// Whether there is nothing to wait for.
    pub fn is_none(&self) -> bool {
        self.0.is_none()
    }

    /// Waits until the write before has finished (or was cancelled).
    pub async fn wait(self) {
        if let Some(mut rx) = self.0 {
            // Nothing is ever sent: the channel closing is the signal.
            let _ = rx.changed().await;
        }
    }
}

/// A write's place in its key's chain; dropping it (the write finished or was cancelled) lets the
/// requests after it run.
pub struct Link {
    chains: Arc<Chains>,
    key: String,
    number: u64,
    /// Dropped with the link: closes the channel the later requests wait on.
    _done: watch::Sender<()>,
}

impl Chains {
    /// A write of `key` arriving now: what it must wait for, and its own link for those after it.
    pub fn write(self: &Arc<Self>, key: &str) -> (After, Link) {
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(());
        let before = self
            .tails
            .lock()
            .insert(key.to_string(), (number, rx))
            .map(|(_, rx)| rx);
        let link = Link {
            chains: self.clone(),
            key: key.to_string(),
            number,
            _done: tx,
        };
        (After(before), link)
    }

    /// A read of `key` arriving now: the write it must wait for, if any.
    pub fn read(&self, key: &str) -> After {
        After(self.tails.lock().get(key).map(|(_, rx)| rx.clone()))
    }

    /// Keys with a write in flight.
    pub fn len(&self) -> usize {
        self.tails.lock().len()
    }

    /// Whether no write is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Before `_done` closes (fields drop after this body): the GETs it releases must not find
        // a read that began before this write finished.
        self.chains.flights.retire(&self.key);
        let mut tails = self.chains.tails.lock();
        if tails.get(&self.key).is_some_and(|(n, _)| *n == self.number) {
            tails.remove(&self.key);
        }
    }
}
