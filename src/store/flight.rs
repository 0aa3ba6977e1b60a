//! Single flight: concurrent GETs of one key on one daemon share one Redis read (proto-spec.md,
//! "With Redis"), so a hot key read by many app workers at once costs Redis one round trip.
//!
//! Each key with a read in flight has one record: the shared read, and the generation it began in.
//! The record holds the read weakly, so a read lives only as long as some GET still waits for it: a
//! GET cancelled with its connection never keeps a read going, and the last one to leave drops it.
//!
//! A GET joins a record only where joining cannot give it an older value than a read of its own:
//!
//! - **Per-key order.** A write of the key on this daemon retires the key's record when it finishes
//!   (see [`crate::store::chain`]), before the GETs held back behind that write run. So a GET sent
//!   after a SET never joins a read that may have run in Redis before that SET.
//! - **Under a lock.** A lock granted on this daemon advances the generation before it is answered;
//!   records of an older generation are not joined. So a GET made under a lock just granted reads
//!   Redis after the grant, hence after every write of the holder before (docs/coherence.md, "The
//!   lock grant carries a read barrier": a read begun after the grant is current at a sequence at
//!   least the grant's).
//!
//! There is at most one record per key, and a new one replaces a record that may not be joined, so a
//! GET never joins a read older than one another GET already started: reads of one key on one daemon
//! never go back in time.
//!
//! Bounded: one record per key with a read in flight, removed when that read ends (finished or
//! dropped) or is retired; reads in flight are bounded by the requests waiting on Redis.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::{FutureExt, Shared, WeakShared};
use hashbrown::HashMap;
use parking_lot::Mutex;

use crate::store::StoreError;

/// What a read of one key gives every GET that shares it.
pub type ReadResult = Result<Option<Bytes>, StoreError>;

/// One read of Redis, shareable among the GETs that wait for it.
pub type SharedRead = Shared<Pin<Box<dyn Future<Output = ReadResult> + Send + 'static>>>;

/// The reads in flight, one per key.
#[derive(Default)]
pub struct Flights {
    /// Key → its read in flight.
    records: Mutex<HashMap<String, Record>>,
    /// Advanced by every lock grant on this daemon; reads begun in an older generation are not
    /// joined (the read barrier).
    generation: AtomicU64,
    /// Numbers records, so a read that ends removes its record only if no newer one replaced it.
    next: AtomicU64,
    /// Reads sent to Redis for GETs.
    pub started: AtomicU64,
    /// GETs that shared a read another GET started: Redis reads saved.
    pub joined: AtomicU64,
}

/// A key's read in flight.
struct Record {
    /// This record's number, for [`Landing`].
    number: u64,
    /// The generation when the read began.
    generation: u64,
    /// The read; weak, so that the GETs waiting for it, not the map, keep it alive.
    read: WeakShared<Pin<Box<dyn Future<Output = ReadResult> + Send + 'static>>>,
}

impl Flights {
    /// The read of `key` for a GET that may run now: the one in flight, if it may be joined, or a new
    /// one that `read` makes. Call it only once the writes before the GET have finished.
    pub fn read<F>(self: &Arc<Self>, key: &str, read: impl FnOnce() -> F) -> SharedRead
    where
        F: Future<Output = ReadResult> + Send + 'static,
    {
        let generation = self.generation.load(Ordering::Acquire);
        let mut records = self.records.lock();
        if let Some(record) = records.get(key) {
            // Upgrading only a record that may be joined: a strong handle dropped under the lock
            // could be the read's last, and its landing takes this lock.
            if record.generation == generation {
                if let Some(shared) = record.read.upgrade() {
                    drop(records);
                    self.joined.fetch_add(1, Ordering::Relaxed);
                    return shared;
                }
            }
        }
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        // Moved into the read, so it is dropped when the read finishes or the last GET leaves.
        let landing = Landing {
            flights: self.clone(),
            key: key.to_string(),
            number,
        };
        let inner = read();
        let future: Pin<Box<dyn Future<Output = ReadResult> + Send + 'static>> =
            Box::pin(async move {
                let _landing = landing;
                inner.await
            });
        let shared = future.shared();
        if let Some(weak) = shared.downgrade() {
            records.insert(
                key.to_string(),
                Record {
                    number,
                    generation,
                    read: weak,
                },
            );
        }
        drop(records);
        self.started.fetch_add(1, Ordering::Relaxed);
        shared
    }

    /// A write of `key` on this daemon finished (or was cancelled): the read in flight, which may
    /// have run before it, is no longer joined.
    pub fn retire(&self, key: &str) {
        // The removed record's weak handle is dropped here; that never drops the read itself.
        self.records.lock().remove(key);
    }

    /// A lock was granted on this daemon: no read begun before now is joined.
    pub fn advance(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Keys with a read in flight.
    pub fn len(&self) -> usize {
        self.records.lock().len()
    }

    /// Whether no read is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes its read's record when the read ends, finished or dropped.
struct Landing {
    flights: Arc<Flights>,
    key: String,
    number: u64,
}

impl Drop for Landing {
    fn drop(&mut self) {
        let mut records = self.flights.records.lock();
        if records
            .get(&self.key)
            .is_some_and(|r| r.number == self.number)
        {
            records.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A read that counts itself and gives `value` once `gate` opens.
    fn gated(
        reads: &Arc<AtomicUsize>,
        gate: &Arc<tokio::sync::Notify>,
        value: &'static [u8],
    ) -> impl FnOnce() -> Pin<Box<dyn Future<Output = ReadResult> + Send>> {
        let (reads, gate) = (reads.clone(), gate.clone());
        move || {
            Box::pin(async move {
                reads.fetch_add(1, Ordering::SeqCst);
                gate.notified().await;
                Ok(Some(Bytes::from_static(value)))
            })
        }
    }

    #[tokio::test]
    async fn concurrent_reads_share_one_and_the_record_goes_when_it_ends() {
        let flights = Arc::new(Flights::default());
        let (reads, gate) = (Arc::new(AtomicUsize::new(0)), Arc::default());
        let all: Vec<_> = (0..10)
            .map(|_| flights.read("k", gated(&reads, &gate, b"v")))
            .collect();
        assert_eq!(flights.len(), 1);
        let waiting = tokio::spawn(futures_util::future::join_all(all));
        while reads.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        gate.notify_waiters();
        let got = waiting.await.expect("joined");
        assert!(got
            .iter()
            .all(|r| r.as_ref().ok() == Some(&Some(Bytes::from_static(b"v")))));
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        assert_eq!(flights.joined.load(Ordering::Relaxed), 9);
        assert!(flights.is_empty(), "the record outlived its read");
    }

    #[tokio::test]
    async fn a_retired_or_older_generation_read_is_not_joined() {
        let flights = Arc::new(Flights::default());
        let (reads, gate) = (Arc::new(AtomicUsize::new(0)), Arc::default());
        let first = flights.read("k", gated(&reads, &gate, b"old"));
        flights.retire("k");
        let second = flights.read("k", gated(&reads, &gate, b"new"));
        assert!(!first.ptr_eq(&second), "joined a retired read");
        flights.advance();
        let third = flights.read("k", gated(&reads, &gate, b"newer"));
        assert!(
            !second.ptr_eq(&third),
            "joined a read of an older generation"
        );
        let fourth = flights.read("k", gated(&reads, &gate, b"other"));
        assert!(third.ptr_eq(&fourth), "did not join the current read");
        // The replaced reads end without removing the current record.
        drop((first, second));
        assert_eq!(flights.len(), 1);
        drop((third, fourth));
        assert!(flights.is_empty(), "a dropped read left its record");
    }
}
