//! The invalidation stream: every write script publishes `(seq, key)` on one channel, and this
//! module's subscriber, on its own pub/sub connection, hands them to the store in order.
//!
//! What the store receives, in order ([`Event`]):
//! - [`Event::Synced`] once subscribed: every write up to `seq` is in Redis, and every later write's
//!   invalidation will follow on this subscription. Before the first `Synced` nothing may be cached.
//! - [`Event::Invalidate`] for each write after that, in write-sequence order, with no gaps.
//! - [`Event::Flush`] first of all whenever the stream is lost (the connection drops, a heartbeat
//!   PING goes unanswered, a gap in the sequence shows lost messages, or the queue to the store
//!   overflowed): the store must stop serving what it cached before, at once. A `Synced` follows
//!   when the stream is whole again.
//!
//! The subscriber resubscribes with the link's jittered backoff. The queue to the store is bounded;
//! when it is full the subscriber drops messages and, as soon as there is room, sends `Flush` and
//! `Synced` at the last sequence it dropped, so a slow store costs its cache, never correctness.
//!
//! [`AppliedSeq`] is where the store records the highest sequence it has applied, and where readers
//! holding a read barrier can wait for it. docs/coherence.md argues the whole design.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{backoff, Link, HEALTH_CHECK_INTERVAL};

/// What the subscriber tells the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The stream was lost: stop serving anything cached before, now. Nothing may be cached until
    /// the next [`Event::Synced`].
    Flush,
    /// Subscribed: every write up to `seq` is already in Redis, and the invalidation of every later
    /// write will follow. The store's applied sequence becomes `seq`.
    Synced {
        /// The write sequence when the subscription was confirmed.
        seq: u64,
    },
    /// `key` was written (SET or DEL) with write sequence `seq`.
    Invalidate {
        /// The write's sequence number; one more than the previous event's.
        seq: u64,
        /// The protocol key written.
        key: String,
    },
}

/// Counts for STATS.
#[derive(Debug, Default)]
struct Counters {
    /// Invalidations handed to the store.
    received: AtomicU64,
    /// Times the stream was lost (each one a Flush).
    lost: AtomicU64,
}

/// The invalidation stream. Dropping it stops the subscriber.
pub struct Invalidations {
    /// Events, in order.
    rx: mpsc::Receiver<Event>,
    /// The subscriber task; aborted on drop.
    task: JoinHandle<()>,
    /// Shared with the task.
    counters: Arc<Counters>,
}

impl Invalidations {
    /// Starts the subscriber on its own connection; at most `capacity` events wait for the store.
    pub fn start(link: &Link, capacity: usize) -> Invalidations {
        let (tx, rx) = mpsc::channel(capacity.max(2));
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(subscriber(link.clone(), tx, counters.clone()));
        Invalidations { rx, task, counters }
    }

    /// The next event; `None` once the link is closed.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// Invalidations received since start.
    pub fn received(&self) -> u64 {
        self.counters.received.load(Ordering::Relaxed)
    }

    /// Times the stream was lost since start.
    pub fn lost(&self) -> u64 {
        self.counters.lost.load(Ordering::Relaxed)
    }
}

impl Drop for Invalidations {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Delivers events to the store. Flush and Synced must arrive, so they wait for room; an
/// invalidation never waits (blocking the subscriber would let Redis's pub/sub buffer for it grow until
/// Redis cut it off), so a full queue leaves the outbox *behind*: it owes the store a Flush and a
/// Synced at the newest sequence it dropped, delivered as soon as there is room for both.
struct Outbox {
    /// To the store.
    tx: mpsc::Sender<Event>,
    /// Some(seq): invalidations up to `seq` were dropped for lack of room.
    behind: Option<u64>,
}

impl Outbox {
    /// Sends a Flush or a Synced, waiting for room; false when the store is gone.
    async fn must_send(&mut self, event: Event) -> bool {
        match &event {
            // A Flush settles what was owed; the next Synced will come from a new subscription.
            Event::Flush => self.behind = None,
            // A Synced is read after every dropped message, so it covers them; the Flush comes first.
            Event::Synced { .. } | Event::Invalidate { .. } => {
                if self.behind.take().is_some() && self.tx.send(Event::Flush).await.is_err() {
                    return false;
                }
            }
        }
        self.tx.send(event).await.is_ok()
    }

    /// Offers an invalidation without waiting; false when the store is gone.
    fn offer(&mut self, seq: u64, key: String) -> bool {
        if let Some(behind) = &mut self.behind {
            *behind = seq;
            return !self.tx.is_closed();
        }
        match self.tx.try_send(Event::Invalidate { seq, key }) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(seq, "invalidation queue full; the cache will be flushed");
                self.behind = Some(seq);
                true
            }
        }
    }

    /// Pays what is owed with two permits taken together: Flush, then Synced at the newest dropped.
    fn catch_up(&mut self, mut permits: mpsc::PermitIterator<'_, Event>) {
        if let Some(seq) = self.behind.take() {
            if let Some(p) = permits.next() {
                p.send(Event::Flush);
            }
            if let Some(p) = permits.next() {
                p.send(Event::Synced { seq });
            }
        }
    }
}

/// Subscribes, delivers, and on any loss sends Flush and starts again.
async fn subscriber(link: Link, tx: mpsc::Sender<Event>, counters: Arc<Counters>) {
    let mut outbox = Outbox { tx, behind: None };
    let mut attempt = 0u32;
    loop {
        let outcome = tokio::select! {
            _ = link.closed().cancelled() => return,
            outcome = follow(&link, &mut outbox, &counters, &mut attempt) => outcome,
        };
        match outcome {
            Ok(Stop::StoreGone) => return,
            Ok(Stop::Lost(why)) => {
                tracing::warn!(reason = %why, "invalidation stream lost; flushing the cache");
                counters.lost.fetch_add(1, Ordering::Relaxed);
                if !outbox.must_send(Event::Flush).await {
                    return;
                }
            }
            Err(why) => {
                // It failed before sending Synced: the store is already flushed (or never filled).
                tracing::debug!(reason = %why, "invalidation subscription failed; retrying");
            }
        }
        let delay = backoff(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = link.closed().cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Why [`follow`] stopped after it had synced.
enum Stop {
    /// The stream was lost, for this reason.
    Lost(String),
    /// The store dropped its end.
    StoreGone,
}

/// One subscription: connect, subscribe, read the sequence, send Synced, then deliver until lost.
/// `Err` when it failed before Synced (nothing to flush); `Ok` once it had synced.
async fn follow(
    link: &Link,
    outbox: &mut Outbox,
    counters: &Counters,
    attempt: &mut u32,
) -> Result<Stop, String> {
    let settings = link.settings();
    let pubsub = tokio::time::timeout(
        settings.connect_timeout,
        link.pubsub_client().get_async_pubsub(),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let (mut sink, mut stream) = pubsub.split();
    let channel = link.keys().invalidations();
    tokio::time::timeout(settings.response_timeout, sink.subscribe(&channel))
        .await
        .map_err(|_| "SUBSCRIBE timed out".to_string())?
        .map_err(|e| e.to_string())?;
    // Subscribed: every write from here on is delivered. The sequence read now covers the rest.
    let mut last = wait_for_seq(link).await?;
    *attempt = 0;
    if !outbox.must_send(Event::Synced { seq: last }).await {
        return Ok(Stop::StoreGone);
    }
    tracing::info!(seq = last, "invalidation stream following");
    let tx = outbox.tx.clone();
    let mut heartbeat = tokio::time::interval(HEALTH_CHECK_INTERVAL);
    heartbeat.reset();
    loop {
        let behind = outbox.behind.is_some();
        tokio::select! {
            biased;
            permits = tx.reserve_many(2), if behind => {
                let Ok(permits) = permits else {
                    return Ok(Stop::StoreGone);
                };
                outbox.catch_up(permits);
            }
            msg = stream.next() => {
                let Some(msg) = msg else {
                    return Ok(Stop::Lost("subscription closed".into()));
                };
                let Some((seq, key)) = parse(msg.get_payload_bytes()) else {
                    return Ok(Stop::Lost(format!(
                        "unreadable invalidation {:?}",
                        String::from_utf8_lossy(msg.get_payload_bytes())
                    )));
                };
                if seq <= last {
                    continue; // Covered by the Synced sequence.
                }
                if seq != last + 1 {
                    return Ok(Stop::Lost(format!("sequence jumped from {last} to {seq}")));
                }
                last = seq;
                counters.received.fetch_add(1, Ordering::Relaxed);
                if !outbox.offer(seq, key) {
                    return Ok(Stop::StoreGone);
                }
            }
            _ = heartbeat.tick() => {
                let ping = tokio::time::timeout(settings.response_timeout, sink.ping::<redis::Value>()).await;
                if !matches!(ping, Ok(Ok(_))) {
                    return Ok(Stop::Lost("heartbeat PING unanswered".into()));
                }
            }
        }
    }
}

/// The write sequence, read on the command link; waits (bounded) for the link to come up first,
/// since the subscriber may connect before it.
async fn wait_for_seq(link: &Link) -> Result<u64, String> {
    let limit = link.settings().connect_timeout + link.settings().response_timeout;
    if !link.wait_up(limit).await {
        return Err("the command link is down".into());
    }
    link.write_seq().await.map_err(|e| e.to_string())
}

/// `<seq> <key>` → (seq, key); the key is everything after the first space.
pub fn parse(payload: &[u8]) -> Option<(u64, String)> {
    let text = std::str::from_utf8(payload).ok()?;
    let (seq, key) = text.split_once(' ')?;
    Some((seq.parse().ok()?, key.to_string()))
}

/// The highest write sequence the store has applied, and a way to wait for it. `None` while the
/// stream is lost (between a Flush and the next Synced).
#[derive(Debug)]
pub struct AppliedSeq {
    tx: watch::Sender<Option<u64>>,
}

impl Default for AppliedSeq {
    fn default() -> Self {
        AppliedSeq {
            tx: watch::channel(None).0,
        }
    }
}

impl AppliedSeq {
    /// Records `seq` as applied (after a Synced, or after an invalidation's eviction).
    pub fn set(&self, seq: u64) {
        self.tx.send_replace(Some(seq));
    }

    /// Records that the stream is lost (on Flush).
    pub fn lost(&self) {
        self.tx.send_replace(None);
    }

    /// The highest sequence applied, or `None` while the stream is lost.
    pub fn get(&self) -> Option<u64> {
        *self.tx.borrow()
    }

    /// Waits until at least `seq` has been applied, at most `limit`; true if it has.
    pub async fn wait_at_least(&self, seq: u64, limit: Duration) -> bool {
        let mut rx = self.tx.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|a| a.is_some_and(|a| a >= seq)))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidations_parse_with_spaces_in_keys() {
        assert_eq!(parse(b"7 session:42"), Some((7, "session:42".into())));
        assert_eq!(
            parse(b"8 a key with spaces"),
            Some((8, "a key with spaces".into()))
        );
        assert_eq!(parse(b"9 "), Some((9, String::new())));
        assert_eq!(parse(b"x key"), None);
        assert_eq!(parse(b"12"), None);
        assert_eq!(parse(b"1 \xff"), None);
    }

    #[tokio::test]
    async fn a_full_queue_becomes_a_flush_and_a_resync() {
        let (tx, mut rx) = mpsc::channel(2);
        let mut out = Outbox {
            tx: tx.clone(),
            behind: None,
        };
        let inv = |seq: u64| Event::Invalidate {
            seq,
            key: format!("k{seq}"),
        };
        assert!(out.offer(1, "k1".into()));
        assert!(out.offer(2, "k2".into()));
        assert!(out.offer(3, "k3".into())); // dropped: full
        assert!(out.offer(4, "k4".into())); // dropped too
        assert_eq!(out.behind, Some(4));
        assert_eq!(rx.recv().await, Some(inv(1)));
        assert_eq!(rx.recv().await, Some(inv(2)));
        let permits = tx.reserve_many(2).await.expect("room");
        out.catch_up(permits);
        assert_eq!(rx.recv().await, Some(Event::Flush));
        assert_eq!(rx.recv().await, Some(Event::Synced { seq: 4 }));
        assert!(out.offer(5, "k5".into()));
        assert_eq!(rx.recv().await, Some(inv(5)));

        // Lost while behind: the Flush settles the debt, and no Synced is invented.
        assert!(out.offer(6, "k6".into()));
        assert!(out.offer(7, "k7".into()));
        assert!(out.offer(8, "k8".into())); // dropped
        assert_eq!(rx.recv().await, Some(inv(6)));
        assert_eq!(rx.recv().await, Some(inv(7)));
        assert!(out.must_send(Event::Flush).await);
        assert_eq!(out.behind, None);
        assert_eq!(rx.recv().await, Some(Event::Flush));
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn waiting_for_an_applied_sequence() {
        let applied = Arc::new(AppliedSeq::default());
        assert!(!applied.wait_at_least(1, Duration::from_millis(1)).await);
        applied.set(3);
        assert!(applied.wait_at_least(3, Duration::from_millis(1)).await);
        let waiter = tokio::spawn({
            let applied = applied.clone();
            async move { applied.wait_at_least(5, Duration::from_secs(10)).await }
        });
        applied.set(5);
        assert!(waiter.await.expect("task"));
        applied.lost();
        assert_eq!(applied.get(), None);
    }
}
