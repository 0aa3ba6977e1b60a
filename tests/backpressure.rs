//! A connection at its in-flight limit: further requests wait their turn (backpressure, not an error),
//! and closing it still releases its locks at once.

mod common;

use std::time::{Duration, Instant};

use common::TestDaemon;
use scaled_client::proto::{Args, CommandName, Request};
use scaled_client::LockOptions;

fn delayed_ping(id: u64, ms: u64) -> Request {
    Request {
        args: Args {
            delay_ms: Some(ms),
            ..Args::default()
        },
        ..Request::new(id, CommandName::Ping)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_limit_wait_for_a_free_place() {
    let daemon = TestDaemon::start(&["--max-in-flight", "1"]);
    let mut conn = daemon.raw().await;
    conn.request(&delayed_ping(10, 300)).await;
    conn.request(&Request::new(11, CommandName::Ping)).await;
    // With one place in flight, the fast PING is not even read until the slow one is answered.
    let first = conn.recv().await.expect("first answer");
    let second = conn.recv().await.expect("second answer");
    assert_eq!((first.id, second.id), (10, 11));
    assert!(first.err.is_none() && second.err.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_closing_at_its_limit_still_releases_its_locks() {
    let daemon = TestDaemon::start(&["--max-in-flight", "2"]);
    let mut holder = daemon.raw().await;
    let lock = Request {
        args: Args {
            key: Some("session:7".into()),
            ttl_ms: Some(60_000),
            auto_renew: Some(true),
            ..Args::default()
        },
        ..Request::new(1, CommandName::Lock)
    };
    holder.request(&lock).await;
    let grant = holder.recv().await.expect("grant");
    assert!(grant.err.is_none(), "LOCK failed: {:?}", grant.err);
    // Fill the holder's allowance with slow requests, and queue more behind them.
    for id in 2..6 {
        holder.request(&delayed_ping(id, 30_000)).await;
    }

    let waiter = daemon.client().await;
    let wait = tokio::spawn(async move {
        let options = LockOptions {
            wait: Some(Duration::from_secs(20)),
            ..LockOptions::default()
        };
        let guard = waiter.lock("session:7", options).await;
        (waiter, guard)
    });
    let observer = daemon.client().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = observer.stats().await.expect("STATS");
        let waiters = stats["locks"]["waiters"].as_u64().expect("locks.waiters");
        if waiters == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the second LOCK never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    drop(holder);
    let (waiter, guard) = tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("the waiter was not granted after the holder closed")
        .expect("lock task");
    let guard = guard.expect("LOCK after the holder closed");
    let stats = waiter.stats().await.expect("STATS");
    assert_eq!(stats["locks"]["released_on_disconnect"].as_u64(), Some(1));
    assert_eq!(stats["locks"]["expiries"].as_u64(), Some(0));
    guard.unlock().await.expect("UNLOCK");
}
