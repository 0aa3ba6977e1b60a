//! A connection at its in-flight limit: one more request that would wait is answered OVERLOADED, while
//! requests answered at once (an UNLOCK among them) still run, and closing it releases its locks at once.

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
async fn a_wait_past_the_limit_is_overloaded_and_quick_requests_still_run() {
    let daemon = TestDaemon::start(&["--max-in-flight", "1"]);
    let mut conn = daemon.raw().await;
    conn.request(&delayed_ping(10, 300)).await;
    conn.request(&delayed_ping(11, 300)).await;
    conn.request(&Request::new(12, CommandName::Ping)).await;
    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.push(conn.recv().await.expect("an answer"));
    }
    // The second wait is refused at once; the quick PING is answered; the first wait finishes last.
    assert_eq!(answers[0].id, 11);
    let refused = answers[0].err.as_ref().expect("the second wait is refused");
    assert_eq!(refused.code, "OVERLOADED");
    assert_eq!((answers[1].id, answers[2].id), (12, 10));
    assert!(answers[1].err.is_none() && answers[2].err.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_can_unlock_while_its_connection_has_locks_waiting() {
    let daemon = TestDaemon::start(&["--max-in-flight", "2"]);
    let client = daemon.client().await;
    let held = client
        .lock("session:9", LockOptions::default())
        .await
        .expect("LOCK");
    let options = LockOptions {
        wait: Some(Duration::from_secs(20)),
        ..LockOptions::default()
    };
    let (a, b) = (client.clone(), client.clone());
    let (oa, ob) = (options.clone(), options.clone());
    let first = tokio::spawn(async move { a.lock("session:9", oa).await.map(|g| g.fence()) });
    let second = tokio::spawn(async move { b.lock("session:9", ob).await.map(|g| g.fence()) });
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.stats().await.expect("STATS").locks.waiters != 2 {
        assert!(Instant::now() < deadline, "the two LOCKs never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The connection is at its limit of two waiting requests; the UNLOCK must still be read.
    let status = tokio::time::timeout(Duration::from_secs(10), held.unlock())
        .await
        .expect("UNLOCK was stuck behind the connection's own waiting LOCKs")
        .expect("UNLOCK");
    assert_eq!(status, scaled_client::LockStatus::Ok);
    let fence = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("the first waiter was not granted")
        .expect("task")
        .expect("LOCK");
    assert!(fence > 0);
    drop(second);
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
    // Fill the holder's allowance with slow requests (the ones past it are refused OVERLOADED).
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
        let waiters = stats.locks.waiters;
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
    assert_eq!(stats.locks.released_on_disconnect, 1);
    assert_eq!(stats.locks.expiries, 0);
    guard.unlock().await.expect("UNLOCK");
}
