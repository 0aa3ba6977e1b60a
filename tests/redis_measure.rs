//! Measurements behind two choices in `src/redis/`, not tests: they assert nothing about time and are
//! ignored by default. Run them on a quiet machine with
//! `cargo test --release --test redis_measure -- --ignored --nocapture --test-threads 1`.
//!
//! - one multiplexed connection against several (a pool), with 1 and 64 concurrent callers;
//! - the invalidation window: from sending a write on one link to its invalidation arriving on
//!   another link's stream, p50 and p99;
//! - the invalidation window through two daemons: from a SET's acknowledgement on daemon A to the
//!   first GET on daemon B that reads it, p50 and p99, next to a plain GET's round trip on B.

mod common;

use std::time::{Duration, Instant};

use common::daemon_group::DaemonGroup;
use common::redis_server::RedisServer;
use scaled::redis::coherence::{Event, Invalidations};
use scaled::redis::{Link, RedisSettings};

/// How long each throughput run lasts.
const RUN: Duration = Duration::from_secs(2);

async fn up(redis: &RedisServer) -> Link {
    let link = Link::start(RedisSettings::new(redis.url())).expect("settings");
    assert!(link.wait_up(Duration::from_secs(10)).await, "link never up");
    link
}

/// Calls per second from `tasks` callers spread over `links`, each reading or writing its own key.
async fn rate(links: &[Link], tasks: usize, write: bool) -> f64 {
    let deadline = Instant::now() + RUN;
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let link = links[t % links.len()].clone();
            tokio::spawn(async move {
                let key = format!("k{t}");
                let mut calls = 0u64;
                while Instant::now() < deadline {
                    if write {
                        link.set(&key, &[7u8; 32], None, None).await.expect("set");
                    } else {
                        link.read(&key).await.expect("read");
                    }
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h.await.expect("task");
    }
    total as f64 / RUN.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
#[ignore = "a measurement; run by hand"]
async fn one_connection_against_a_pool() {
    let redis = RedisServer::start();
    for connections in [1usize, 2, 4, 8] {
        let mut links = Vec::new();
        for _ in 0..connections {
            links.push(up(&redis).await);
        }
        for write in [false, true] {
            for tasks in [1usize, 64] {
                let r = rate(&links, tasks, write).await;
                let op = if write { "SET " } else { "READ" };
                println!("{op} connections={connections} callers={tasks:>2}: {r:>8.0} calls/s");
            }
        }
        for link in &links {
            link.close();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
#[ignore = "a measurement; run by hand"]
async fn invalidation_window() {
    let redis = RedisServer::start();
    let (writer, reader) = (up(&redis).await, up(&redis).await);
    let mut stream = Invalidations::start(&reader, 4096);
    let limit = Duration::from_secs(10);
    loop {
        match tokio::time::timeout(limit, stream.recv()).await {
            Ok(Some(Event::Synced { .. })) => break,
            Ok(Some(_)) => continue,
            other => panic!("no Synced: {other:?}"),
        }
    }
    let mut window = Vec::new();
    let mut acked = Vec::new();
    for i in 0..2000u32 {
        let sent = Instant::now();
        writer
            .set("k", &i.to_be_bytes(), None, None)
            .await
            .expect("set");
        acked.push(sent.elapsed());
        match tokio::time::timeout(limit, stream.recv()).await {
            Ok(Some(Event::Invalidate { .. })) => window.push(sent.elapsed()),
            other => panic!("expected an invalidation: {other:?}"),
        }
    }
    for (name, mut v) in [
        ("write acknowledged", acked),
        ("invalidation applied", window),
    ] {
        v.sort();
        let p = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
        println!("{name}: p50 {:?}, p99 {:?}", p(0.50), p(0.99));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by hand"]
async fn invalidation_window_through_two_daemons() {
    const WRITES: u32 = 2000;
    let redis = RedisServer::start();
    let group = DaemonGroup::start_available(&redis, 2, &[]).await;
    let (a, b) = (group.host(0).client().await, group.host(1).client().await);
    a.set("k", b"start", None).await.expect("SET");
    let mut window = Vec::new();
    let mut round_trip = Vec::new();
    let mut gets = 0u64;
    for i in 0..WRITES {
        let value = i.to_be_bytes();
        // B holds the previous value in its cache, so only the invalidation lets it see the new one.
        let t = Instant::now();
        b.get("k").await.expect("GET on B");
        round_trip.push(t.elapsed());
        a.set("k", &value, None).await.expect("SET on A");
        let acked = Instant::now();
        loop {
            gets += 1;
            let got = b.get("k").await.expect("GET on B");
            if got.as_deref() == Some(&value[..]) {
                window.push(acked.elapsed());
                break;
            }
            assert!(
                acked.elapsed() < Duration::from_secs(10),
                "B never saw write {i}"
            );
        }
    }
    let hits = b.stats().await.expect("STATS").redis.cache_hits;
    println!(
        "{WRITES} writes on A; {gets} GETs on B until each was seen ({:.2} per write); B's cache hits {hits}",
        gets as f64 / f64::from(WRITES)
    );
    for (name, mut v) in [
        ("GET round trip on B (a hit)", round_trip),
        (
            "SET acknowledged on A -> first GET on B that reads it answered",
            window,
        ),
    ] {
        v.sort();
        let p = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
        println!("{name}: p50 {:?}, p99 {:?}", p(0.50), p(0.99));
    }
}
