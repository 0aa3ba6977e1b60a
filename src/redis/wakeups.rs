//! Wake-ups: the release script publishes the lock's name on one channel, and this module's
//! subscriber, on its own pub/sub connection, wakes whoever on this daemon is waiting to ask Redis
//! for that lock (the head of the lock's local queue), so a lock passes between daemons as soon as it
//! is released instead of at the next poll.
//!
//! A waiter calls [`Wakeups::watch`] for its lock *before* it tries Redis, then awaits
//! [`Watch::released`] between tries: a release published after the watch began is never missed,
//! even one that comes while the waiter is busy trying. Messages can still be lost (pub/sub delivers
//! at most once, and not at all while the subscription is down), so a waiter also retries on a timer
//! (`LOCK_RETRY_DELAY`, and no later than the holder's lease ends); when the subscription is lost or
//! comes back, every watch is woken, since a release may have been missed.
//!
//! Bounded: at most `max_locks` locks are watched at once (a daemon has one head waiter per lock, so
//! this bounds nothing a daemon needs short of that many contended locks). Past it, `watch` answers
//! `None` and the waiter relies on its timer alone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{backoff, Link, HEALTH_CHECK_INTERVAL};

/// The shared registry of watched locks.
#[derive(Default)]
struct Registry {
    /// Per lock: a counter bumped by each release message, and how many [`Watch`]es hold it.
    locks: Mutex<HashMap<String, (watch::Sender<u64>, usize)>>,
    /// Release messages received since start.
    received: AtomicU64,
    /// Times the subscription was lost since start.
    lost: AtomicU64,
}

impl Registry {
    /// Wakes the watchers of `lock`, if any.
    fn wake(&self, lock: &str) {
        if let Some((tx, _)) = self.locks.lock().get(lock) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Wakes every watcher: a release may have been missed.
    fn wake_all(&self) {
        for (tx, _) in self.locks.lock().values() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// The release subscriber and its registry. Dropping it stops the subscriber.
pub struct Wakeups {
    /// Shared with the subscriber task and every [`Watch`].
    registry: Arc<Registry>,
    /// Most locks watched at once.
    max_locks: usize,
    /// The subscriber task; aborted on drop.
    task: JoinHandle<()>,
}

impl Wakeups {
    /// Starts the subscriber on its own connection; at most `max_locks` locks may be watched at once.
    pub fn start(link: &Link, max_locks: usize) -> Wakeups {
        let registry = Arc::new(Registry::default());
        let task = tokio::spawn(subscriber(link.clone(), registry.clone()));
        Wakeups {
            registry,
            max_locks,
            task,
        }
    }

    /// Starts watching `lock` for releases; `None` when `max_locks` locks are watched already.
    pub fn watch(&self, lock: &str) -> Option<Watch> {
        let mut locks = self.registry.locks.lock();
        let full = locks.len() >= self.max_locks;
        let rx = match locks.get_mut(lock) {
            Some((tx, holders)) => {
                *holders += 1;
                tx.subscribe()
            }
            None if full => return None,
            None => {
                let (tx, rx) = watch::channel(0);
                locks.insert(lock.to_string(), (tx, 1));
                rx
            }
        };
        Some(Watch {
            lock: lock.to_string(),
            rx,
            registry: self.registry.clone(),
        })
    }

    /// Locks watched now.
    pub fn watched(&self) -> usize {
        self.registry.locks.lock().len()
    }

    /// Release messages received since start.
    pub fn received(&self) -> u64 {
        self.registry.received.load(Ordering::Relaxed)
    }

    /// Times the subscription was lost since start.
    pub fn lost(&self) -> u64 {
        self.registry.lost.load(Ordering::Relaxed)
    }
}

impl Drop for Wakeups {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Interest in one lock's releases. Dropping it ends the interest.
pub struct Watch {
    /// The lock watched.
    lock: String,
    /// Sees the lock's release counter.
    rx: watch::Receiver<u64>,
    /// To leave the registry on drop.
    registry: Arc<Registry>,
}

impl Watch {
    /// Waits for a release of the lock published since the watch began or since the last call
    /// returned. Pending forever if the subscriber is gone: always race it against a timer.
    pub async fn released(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// The lock watched.
    pub fn lock(&self) -> &str {
        &self.lock
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut locks = self.registry.locks.lock();
        if let Some((_, holders)) = locks.get_mut(&self.lock) {
            *holders -= 1;
            if *holders == 0 {
                locks.remove(&self.lock);
            }
        }
    }
}

/// Subscribes to the release channel and wakes watchers; on loss wakes everyone and starts again.
async fn subscriber(link: Link, registry: Arc<Registry>) {
    let mut attempt = 0u32;
    loop {
        let outcome = tokio::select! {
            _ = link.closed().cancelled() => return,
            outcome = follow(&link, &registry, &mut attempt) => outcome,
        };
        registry.lost.fetch_add(1, Ordering::Relaxed);
        registry.wake_all();
        tracing::debug!(reason = %outcome, "release subscription lost; retrying");
        let delay = backoff(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = link.closed().cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// One subscription, until it is lost; returns why.
async fn follow(link: &Link, registry: &Registry, attempt: &mut u32) -> String {
    let settings = link.settings();
    let pubsub = match tokio::time::timeout(
        settings.connect_timeout,
        link.pubsub_client().get_async_pubsub(),
    )
    .await
    {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return e.to_string(),
        Err(_) => return "connect timed out".into(),
    };
    let (mut sink, mut stream) = pubsub.split();
    match tokio::time::timeout(
        settings.response_timeout,
        sink.subscribe(link.keys().releases()),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return e.to_string(),
        Err(_) => return "SUBSCRIBE timed out".into(),
    }
    *attempt = 0;
    // Releases made before this subscription existed were not seen.
    registry.wake_all();
    let mut heartbeat = tokio::time::interval(HEALTH_CHECK_INTERVAL);
    heartbeat.reset();
    loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(msg) = msg else {
                    return "subscription closed".into();
                };
                registry.received.fetch_add(1, Ordering::Relaxed);
                if let Ok(lock) = std::str::from_utf8(msg.get_payload_bytes()) {
                    registry.wake(lock);
                }
            }
            _ = heartbeat.tick() => {
                let ping = tokio::time::timeout(settings.response_timeout, sink.ping::<redis::Value>()).await;
                if !matches!(ping, Ok(Ok(_))) {
                    return "heartbeat PING unanswered".into();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wakeups(max_locks: usize) -> Wakeups {
        Wakeups {
            registry: Arc::new(Registry::default()),
            max_locks,
            task: tokio::spawn(async {}),
        }
    }

    #[tokio::test]
    async fn a_release_after_the_watch_began_is_never_missed() {
        let w = wakeups(8);
        let mut watch = w.watch("l").expect("room");
        w.registry.wake("l"); // released before anyone awaited
        tokio::time::timeout(std::time::Duration::from_secs(5), watch.released())
            .await
            .expect("woken");
        w.registry.wake("other");
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), watch.released())
                .await
                .is_err(),
            "woken by another lock's release"
        );
    }

    #[tokio::test]
    async fn watches_are_bounded_and_leave_when_dropped() {
        let w = wakeups(2);
        let a1 = w.watch("a").expect("room");
        let a2 = w.watch("a").expect("same lock shares an entry");
        let b = w.watch("b").expect("room");
        assert!(w.watch("c").is_none(), "a third lock is past the bound");
        assert_eq!(w.watched(), 2);
        drop(a1);
        assert_eq!(w.watched(), 2);
        drop(a2);
        assert_eq!(w.watched(), 1);
        assert!(w.watch("c").is_some());
        drop(b);
    }
}
