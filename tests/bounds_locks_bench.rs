//! Figures for BENCHMARKS.md: each lock-table attack of tests/bounds_locks.rs, at default settings and
//! at the size the attacks were first reported, run for a few seconds while a well-behaved client
//! GETs about every millisecond on its own connection. Prints that client's latencies, the daemon's
//! peak RSS and its CPU time. Ignored in the normal suite (it takes about a minute); run it on a
//! release build:
//!
//! ```text
//! cargo test --release --test bounds_locks_bench -- --ignored --nocapture --test-threads 1
//! ```

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::probe::{self, pipeline, Prober};
use common::{RawConn, TestDaemon};
use scaled_client::frame::push_frame;
use scaled_client::proto::{Args, CommandName, Request};

fn lock(id: u64, key: &str, ttl_ms: u64, wait_ms: u64, auto_renew: bool) -> Request {
    Request {
        args: Args {
            key: Some(key.into()),
            ttl_ms: Some(ttl_ms),
            wait_ms: Some(wait_ms),
            auto_renew: auto_renew.then_some(true),
            ..Args::default()
        },
        ..Request::new(id, CommandName::Lock)
    }
}

/// STATS `locks.<name>`.
async fn lock_stat(conn: &mut RawConn, name: &str) -> u64 {
    conn.request(&Request::new(u64::MAX, CommandName::Stats))
        .await;
    let answer = conn.recv().await.expect("STATS");
    let locks = answer
        .ok
        .as_map()
        .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some("locks")))
        .map(|(_, v)| v.clone())
        .expect("locks");
    locks
        .as_map()
        .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some(name)))
        .and_then(|(_, v)| v.as_u64())
        .expect("a count")
}

async fn wait_for_stat(conn: &mut RawConn, name: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while lock_stat(conn, name).await != want {
        assert!(
            Instant::now() < deadline,
            "locks.{name} never reached {want}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs `attack` against a fresh daemon started with `args`, with a probe throughout, and prints one
/// line of figures.
async fn measure<F, Fut>(what: &str, args: &[&str], attack: F)
where
    F: FnOnce(Arc<TestDaemon>) -> Fut,
    Fut: std::future::Future<Output = String>,
{
    // One daemon per scenario, killed when the last reference goes.
    let daemon = Arc::new(TestDaemon::start(args));
    let prober = Prober::start(&daemon);
    let cpu_before = probe::cpu_ns(&daemon);
    let started = Instant::now();
    let note = attack(daemon.clone()).await;
    let wall = started.elapsed().as_secs_f64();
    let cpu = (probe::cpu_ns(&daemon) - cpu_before) as f64 / 1e9;
    let report = prober.finish();
    println!(
        "{what}: probe {}; daemon peak RSS {:.1} MiB, CPU {:.2} s in {:.1} s; {note}",
        report.summary(),
        probe::peak_rss_kib(&daemon) as f64 / 1024.0,
        cpu,
        wall
    );
    report.assert_every_answer(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run on a release build with --ignored --nocapture"]
async fn attacks_on_the_lock_table() {
    // 1. Short leases on ever-new keys: one million LOCKs of 64-byte keys with a 1 ms lease.
    measure(
        "records: 1 000 000 ever-new keys, 1 ms leases",
        &[],
        |d| async move {
            let mut conn = d.raw().await;
            let tally = pipeline(
                &mut conn,
                (0..1_000_000u64).map(|i| lock(i + 1, &format!("{i:0>64}"), 1, 0, false)),
                256,
            )
            .await;
            let records = lock_stat(&mut conn, "records").await;
            format!("{tally:?}, {records} records kept")
        },
    )
    .await;

    // 2. 100 000 LOCKs on one lock from 100 connections: 1 024 queue, the rest are refused.
    measure("waiters: 100 000 LOCKs on one lock", &[], |d| async move {
        let mut holder = d.raw().await;
        holder.request(&lock(1, "hot", 600_000, 0, false)).await;
        holder.recv().await.expect("grant");
        let mut conns = Vec::new();
        for _ in 0..100 {
            let mut conn = d.raw().await;
            let mut frames = Vec::new();
            for i in 0..1000u64 {
                push_frame(
                    &mut frames,
                    &lock(i + 1, "hot", 600_000, 600_000, false).to_msgpack(),
                );
            }
            conn.send_bytes(&frames).await;
            conns.push(conn);
        }
        let mut observer = d.raw().await;
        wait_for_stat(&mut observer, "overloaded", 100_000 - 1024).await;
        let waiters = lock_stat(&mut observer, "waiters").await;
        drop(conns);
        wait_for_stat(&mut observer, "waiters", 0).await;
        format!("{waiters} queued, the rest OVERLOADED, then withdrawn")
    })
    .await;

    // 3. One connection with 100 000 waits queued on one lock leaves (limits raised to allow it).
    measure(
        "withdrawal: a connection with 100 000 queued waits leaves",
        &[
            "--max-in-flight",
            "200000",
            "--max-waiters",
            "200000",
            "--max-waiting",
            "200000",
        ],
        |d| async move {
            let began = std::time::Instant::now();
            let mut holder = d.raw().await;
            holder.request(&lock(1, "hot", 600_000, 0, false)).await;
            holder.recv().await.expect("grant");
            let mut waiter = d.raw().await;
            let mut frames = Vec::new();
            for i in 0..100_000u64 {
                push_frame(
                    &mut frames,
                    &lock(i + 1, "hot", 600_000, 600_000, false).to_msgpack(),
                );
            }
            waiter.send_bytes(&frames).await;
            let mut observer = d.raw().await;
            wait_for_stat(&mut observer, "waiters", 100_000).await;
            let cpu = probe::cpu_ns(&d);
            let left = began.elapsed();
            drop(waiter);
            wait_for_stat(&mut observer, "waiters", 0).await;
            let withdraw = (probe::cpu_ns(&d) - cpu) as f64 / 1e6;
            format!(
                "all queued by {:.3}s; withdrawal from {:.3}s to {:.3}s took {withdraw:.0} ms of \
                 daemon CPU",
                left.as_secs_f64(),
                left.as_secs_f64(),
                began.elapsed().as_secs_f64()
            )
        },
    )
    .await;

    // 3b. A connection holding 100 000 locks leaves.
    measure(
        "release: a connection holding 100 000 locks leaves",
        &[],
        |d| async move {
            let mut holder = d.raw().await;
            pipeline(
                &mut holder,
                (0..100_000u64).map(|i| lock(i + 1, &format!("held:{i}"), 600_000, 0, false)),
                256,
            )
            .await;
            let mut observer = d.raw().await;
            let cpu = probe::cpu_ns(&d);
            drop(holder);
            wait_for_stat(&mut observer, "held", 0).await;
            let release = (probe::cpu_ns(&d) - cpu) as f64 / 1e6;
            format!("releasing them took {release:.0} ms of daemon CPU")
        },
    )
    .await;

    // 4. auto_renew asking a 1 ms lease on 10 000 locks, watched for 5 s.
    measure(
        "auto-renew: 10 000 locks asking 1 ms leases, 5 s",
        &[],
        |d| async move {
            let mut holder = d.raw().await;
            pipeline(
                &mut holder,
                (0..10_000u64).map(|i| lock(i + 1, &format!("renew:{i}"), 1, 0, true)),
                256,
            )
            .await;
            let mut observer = d.raw().await;
            let before = lock_stat(&mut observer, "renewals").await;
            let cpu = probe::cpu_ns(&d);
            tokio::time::sleep(Duration::from_secs(5)).await;
            let renewals = lock_stat(&mut observer, "renewals").await - before;
            let busy = (probe::cpu_ns(&d) - cpu) as f64 / 5e9 * 100.0;
            format!("{renewals} renewals in 5 s, daemon CPU {busy:.1}% of a core")
        },
    )
    .await;

    // 5. LOCKS in a loop with 100 000 locks held (1 KiB keys, a 256-byte client name).
    measure(
        "LOCKS: 100 000 locks of 1 KiB keys, 200 full pages",
        &[],
        |d| async move {
            let mut holder = d.raw_without_hello().await;
            holder
                .request(&Request {
                    args: Args {
                        version: Some(scaled_client::PROTOCOL_VERSION),
                        client: Some("n".repeat(256)),
                        ..Args::default()
                    },
                    ..Request::new(0, CommandName::Hello)
                })
                .await;
            holder.recv().await.expect("HELLO");
            pipeline(
                &mut holder,
                (0..100_000u64).map(|i| lock(i + 1, &format!("{i:0>1024}"), 600_000, 0, false)),
                256,
            )
            .await;
            let mut reader = d.raw().await;
            let mut after = None;
            for id in 0..200u64 {
                reader
                    .request(&Request {
                        args: Args {
                            limit: Some(1000),
                            after: after.clone(),
                            ..Args::default()
                        },
                        ..Request::new(id, CommandName::Locks)
                    })
                    .await;
                let page = reader.recv().await.expect("LOCKS").ok;
                after = page
                    .as_map()
                    .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some("next")))
                    .and_then(|(_, v)| v.as_str().map(str::to_string));
            }
            "every page under the frame limit".to_string()
        },
    )
    .await;
}
