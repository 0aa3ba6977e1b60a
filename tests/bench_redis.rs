//! `scaled-bench` against two daemons sharing one real `redis-server`, briefly: the session load test
//! with every session's users spread over both daemons loses nothing and mixes nothing, its checks
//! still catch the lost updates of unlocked read-modify-write across daemons, and the hand-off
//! workload sees hand-offs from one daemon to the other with mutual exclusion and rising fences.
//! Performance is never asserted here; BENCHMARKS.md has the figures.

mod common;

use common::bench_run::{bench, count};
use common::daemon_group::DaemonGroup;
use common::redis_server::RedisServer;
use serde_json::Value;

/// Two daemons on one fresh Redis, each serving and connected to it.
fn two_daemons(redis: &RedisServer) -> (DaemonGroup, String, String) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let group = runtime.block_on(DaemonGroup::start_available(redis, 2, &[]));
    let path = |i: usize| {
        group
            .host(i)
            .socket
            .to_str()
            .expect("UTF-8 socket path")
            .to_string()
    };
    let (a, b) = (path(0), path(1));
    (group, a, b)
}

#[test]
fn sessions_spread_over_two_daemons_lose_nothing_and_mix_nothing() {
    let redis = RedisServer::start();
    let (_group, a, b) = two_daemons(&redis);
    // Four users per session, on alternating daemons: every session is written from both.
    let (status, report) = bench(&[
        "session",
        "--socket",
        &a,
        "--also-socket",
        &b,
        "--users",
        "80",
        "--sessions",
        "20",
        "--messages",
        "10",
        "--connections",
        "4",
    ]);
    assert_eq!(status, 0, "the run failed its checks: {report}");
    assert_eq!(count(&report, "daemons"), 2, "{report}");
    assert_eq!(count(&report, "lost_updates"), 0, "{report}");
    assert_eq!(count(&report, "mixed_responses"), 0, "{report}");
    assert_eq!(count(&report, "stale_reads"), 0, "{report}");
    assert_eq!(count(&report, "errors"), 0, "{report}");
    assert_eq!(count(&report, "successful_messages"), 80 * 10, "{report}");
}

#[test]
fn without_the_lock_two_daemons_lose_updates_and_the_run_fails() {
    let redis = RedisServer::start();
    let (_group, a, b) = two_daemons(&redis);
    let (status, report) = bench(&[
        "session",
        "--socket",
        &a,
        "--also-socket",
        &b,
        "--users",
        "20",
        "--sessions",
        "2",
        "--messages",
        "20",
        "--connections",
        "2",
        "--no-lock",
    ]);
    // Ten users per session, on both daemons, read-modify-write without the lock: their first
    // GETs all read the empty state, so all but one of their first writes are overwritten.
    assert!(count(&report, "lost_updates") > 0, "{report}");
    assert_eq!(report["passed"], Value::Bool(false), "{report}");
    assert_ne!(status, 0, "a run with lost updates must exit non-zero");
}

#[test]
fn locks_hand_off_from_one_daemon_to_the_other() {
    let redis = RedisServer::start();
    let (_group, a, b) = two_daemons(&redis);
    let (status, report) = bench(&[
        "handoff",
        "--socket",
        &a,
        "--also-socket",
        &b,
        "--connections",
        "4",
        "--requests",
        "300",
    ]);
    // The bench fails the run itself on two grants outstanding at once or a fence not above the
    // last one.
    assert_eq!(status, 0, "{report}");
    assert_eq!(count(&report, "errors"), 0, "{report}");
    assert!(
        count(&report, "across_daemons") > 0,
        "no grant followed a release on the other daemon: {report}"
    );
}
