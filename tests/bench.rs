//! `scaled-bench` against the real daemon, briefly: the session load test passes its own checks (no
//! lost update, no mixed answer), its checks catch the lost updates of unlocked read-modify-write,
//! and every other workload runs clean, over the Unix socket, over TCP and through `delay-proxy`.
//! Performance is never asserted here; BENCHMARKS.md has the figures.
//!
//! The bench runs in-process through `scaled_bench::run`, the same function its binary calls, so the
//! exit status and the JSON are exactly what a user of the binary would get.

mod common;

use common::bench_run::{bench, count};
use common::TestDaemon;
use serde_json::Value;

fn socket(daemon: &TestDaemon) -> String {
    daemon
        .socket
        .to_str()
        .expect("UTF-8 socket path")
        .to_string()
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe");
    probe.local_addr().expect("probe address").port()
}

#[test]
fn session_load_loses_nothing_and_mixes_nothing() {
    let daemon = TestDaemon::start(&[]);
    let (status, report) = bench(&[
        "session",
        "--socket",
        &socket(&daemon),
        "--users",
        "60",
        "--messages",
        "20",
        "--connections",
        "4",
    ]);
    assert_eq!(status, 0, "the run failed its checks: {report}");
    assert_eq!(count(&report, "lost_updates"), 0, "{report}");
    assert_eq!(count(&report, "mixed_responses"), 0, "{report}");
    assert_eq!(count(&report, "errors"), 0, "{report}");
    assert_eq!(count(&report, "successful_messages"), 60 * 20, "{report}");
    assert_eq!(count(&report, "total_requests"), 60 * 20 * 4, "{report}");
    assert_eq!(report["success_rate"].as_f64(), Some(1.0), "{report}");
    // Each session's first GET misses; every other one hits.
    assert_eq!(
        report["cache_hit_rate"].as_f64(),
        Some(19.0 / 20.0),
        "{report}"
    );
}

#[test]
fn contended_sessions_queue_on_their_locks_and_still_lose_nothing() {
    let daemon = TestDaemon::start(&[]);
    let (status, report) = bench(&[
        "session",
        "--socket",
        &socket(&daemon),
        "--users",
        "40",
        "--sessions",
        "4",
        "--messages",
        "25",
        "--connections",
        "3",
    ]);
    assert_eq!(status, 0, "the run failed its checks: {report}");
    assert_eq!(count(&report, "lost_updates"), 0, "{report}");
    assert_eq!(count(&report, "mixed_responses"), 0, "{report}");
    assert_eq!(count(&report, "stale_reads"), 0, "{report}");
    // Ten users per session start together, so LOCKs queue: the lock is what kept the counts right.
    assert!(count(&report, "lock_waits") > 0, "{report}");
    let contention = report["lock_contention"].as_f64().expect("lock_contention");
    assert!(contention > 0.0, "{report}");
}

#[test]
fn without_the_lock_contended_sessions_lose_updates_and_the_run_fails() {
    let daemon = TestDaemon::start(&[]);
    let (status, report) = bench(&[
        "session",
        "--socket",
        &socket(&daemon),
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
    // All ten users of a session send their first GET together and all read the same state, so
    // all but one of their writes are overwritten.
    assert!(count(&report, "lost_updates") > 0, "{report}");
    assert_eq!(report["passed"], Value::Bool(false), "{report}");
    assert_ne!(status, 0, "a run with lost updates must exit non-zero");
}

#[test]
fn open_loop_sessions_pass_over_tcp() {
    let port = free_port();
    let (_dir, tokens) = common::token_file("web-bench 0123456789abcdef0123\n");
    let tokens = tokens.to_str().expect("utf-8 path");
    let daemon = TestDaemon::start(&["--tcp", &port.to_string(), "--auth-token-file", tokens]);
    let (status, report) = bench(&[
        "session",
        "--token-file",
        tokens,
        "--tcp",
        &format!("127.0.0.1:{port}"),
        "--users",
        "20",
        "--messages",
        "5",
        "--rate",
        "2000",
    ]);
    assert_eq!(status, 0, "the run failed its checks: {report}");
    assert_eq!(count(&report, "successful_messages"), 100, "{report}");
    assert!(report["start_lag"]["p99_ms"].is_number(), "{report}");
    drop(daemon);
}

#[test]
fn the_closed_loop_workloads_run_clean() {
    let daemon = TestDaemon::start(&[]);
    let socket = socket(&daemon);
    for args in [
        &[
            "get",
            "--connections",
            "4",
            "--requests",
            "2000",
            "--keyspace",
            "100",
        ][..],
        &[
            "set",
            "--connections",
            "4",
            "--requests",
            "2000",
            "--pipeline",
            "8",
        ],
        &["ping", "--connections", "2", "--requests", "500"],
        &["lock", "--connections", "4", "--requests", "500"],
        &["handoff", "--connections", "3", "--requests", "300"],
        &[
            "handoff",
            "--connections",
            "2",
            "--requests",
            "50",
            "--wait-for-queue",
        ],
    ] {
        let mut argv = args.to_vec();
        argv.extend(["--socket", &socket]);
        let (status, report) = bench(&argv);
        assert_eq!(status, 0, "{args:?} failed: {report}");
        assert_eq!(count(&report, "errors"), 0, "{args:?}: {report}");
    }
}

#[test]
fn sessions_pass_through_the_delay_proxy() {
    let port = free_port();
    let (_dir, tokens) = common::token_file("0123456789abcdef0123\n");
    let tokens = tokens.to_str().expect("utf-8 path");
    let daemon = TestDaemon::start(&["--tcp", &port.to_string(), "--auth-token-file", tokens]);
    let proxy_port = free_port();
    let listen = format!("127.0.0.1:{proxy_port}");
    let args = [
        "scaled-bench",
        "delay-proxy",
        "--listen",
        &listen,
        "--to",
        &format!("127.0.0.1:{port}"),
        "--delay-us",
        "200",
    ]
    .map(String::from);
    // The proxy serves until the test process ends.
    std::thread::spawn(move || scaled_bench::run(args, &mut std::io::sink()));
    let deadline = std::time::Instant::now() + common::STARTUP_LIMIT;
    while std::net::TcpStream::connect(&listen).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "delay-proxy did not listen"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let (status, report) = bench(&[
        "session",
        "--token-file",
        tokens,
        "--tcp",
        &listen,
        "--users",
        "10",
        "--messages",
        "5",
        "--connections",
        "2",
    ]);
    assert_eq!(status, 0, "the run failed its checks: {report}");
    assert_eq!(count(&report, "successful_messages"), 50, "{report}");
    drop(daemon);
}

#[test]
fn a_closed_loop_session_cut_by_max_seconds_ends_and_checks() {
    let daemon = TestDaemon::start(&[]);
    // Far more messages than a second allows: the run stops starting messages after 1 s, finishes
    // those in flight, and checks what was acknowledged.
    let (status, report) = bench(&[
        "session",
        "--socket",
        &socket(&daemon),
        "--users",
        "20",
        "--messages",
        "1000000",
        "--max-seconds",
        "1",
    ]);
    assert_eq!(status, 0, "the run failed its checks: {report}");
    assert_eq!(count(&report, "lost_updates"), 0, "{report}");
    assert!(count(&report, "successful_messages") > 0, "{report}");
}
