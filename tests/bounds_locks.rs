//! The lock table's resource bounds, attacked through the real daemon. One test per class of attack:
//!
//! 1. short leases on ever-new keys (lock records, `SCALED_MAX_LOCKS`);
//! 2. many LOCKs queued on one lock (`SCALED_MAX_WAITERS`);
//! 3. a connection leaving with a great many waits queued, or a great many locks held;
//! 4. `auto_renew` with a 1 ms lease on many locks;
//! 5. LOCKS with many locks held, long keys and a long client name.
//!
//! Each shows two things while the attack runs: the daemon's memory (VmHWM, its peak resident set)
//! stays under a bound that follows from its settings, and a well-behaved client on another
//! connection gets every answer. Bounds are asserted, never timings; each test prints the probe's
//! latencies and the daemon's peak memory, which BENCHMARKS.md quotes from a release build.

mod common;

use std::time::{Duration, Instant};

use common::probe::{self, pipeline, Prober};
use common::{RawConn, TestDaemon};
use scaled_client::proto::{Args, CommandName, Fence, Request, Response, MAX_FRAME_LEN};

/// Memory the daemon may grow by beyond what its settings account for: the allocator's slack, the
/// buffers of the few connections a test opens, and the runtime's own growth.
const SLACK_KIB: u64 = 8 * 1024;

/// What one waiting request may cost, in bytes: its place in the queue, its task and its frame.
const WAITER_BUDGET: u64 = 4096;

/// The most an answer costs the daemon while it is built and written: the frame limit, twice (the
/// encoded reply, then the frame in the connection's output buffer).
const ANSWER_BUDGET_KIB: u64 = 2 * (MAX_FRAME_LEN as u64) / 1024;

/// The most bytes one lock record costs beyond its key, as README.md documents for SCALED_MAX_LOCKS:
/// the record, its map slot, its place in the pruning order and up to 8 expired owner tokens.
const RECORD_OVERHEAD: u64 = 768;

/// How long a wait for an event (a STATS figure reaching a value) may take before the test fails.
const EVENT_LIMIT: Duration = Duration::from_secs(20);

fn request(id: u64, cmd: CommandName, args: Args) -> Request {
    Request {
        args,
        ..Request::new(id, cmd)
    }
}

/// A LOCK with the given lease and wait (0: try mode).
fn lock(id: u64, key: &str, ttl_ms: u64, wait_ms: u64, auto_renew: bool) -> Request {
    request(
        id,
        CommandName::Lock,
        Args {
            key: Some(key.into()),
            ttl_ms: Some(ttl_ms),
            wait_ms: Some(wait_ms),
            auto_renew: auto_renew.then_some(true),
            ..Args::default()
        },
    )
}

/// The member `name` of a map.
fn member<'a>(value: &'a rmpv::Value, name: &str) -> &'a rmpv::Value {
    value
        .as_map()
        .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some(name)))
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no `{name}` in {value}"))
}

/// STATS `locks`, asked on `conn`.
async fn lock_stats(conn: &mut RawConn) -> rmpv::Value {
    conn.request(&Request::new(u64::MAX, CommandName::Stats))
        .await;
    let answer = conn.recv().await.expect("STATS answer");
    member(&answer.ok, "locks").clone()
}

/// STATS `locks.<name>`.
async fn lock_stat(conn: &mut RawConn, name: &str) -> u64 {
    let stats = lock_stats(conn).await;
    member(&stats, name)
        .as_u64()
        .unwrap_or_else(|| panic!("locks.{name} is not a count: {stats}"))
}

/// Polls STATS until `locks.<name>` is `want`, failing after [`EVENT_LIMIT`].
async fn wait_for_stat(conn: &mut RawConn, name: &str, want: u64) {
    let deadline = Instant::now() + EVENT_LIMIT;
    loop {
        let got = lock_stat(conn, name).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "STATS locks.{name} was still {got}, not {want}, after {EVENT_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The error code and message of an answer that must be an error.
fn error_of(answer: &Response) -> (&str, &str) {
    let err = answer
        .err
        .as_ref()
        .unwrap_or_else(|| panic!("expected an error, got {}", answer.ok));
    (err.code.as_str(), err.message.as_str())
}

/// Asserts the daemon's peak memory grew by less than `allowed_kib` over `baseline_kib`, and prints
/// the figures.
fn assert_peak_within(daemon: &TestDaemon, what: &str, baseline_kib: u64, allowed_kib: u64) {
    let peak = probe::peak_rss_kib(daemon);
    eprintln!(
        "{what}: peak RSS {peak} KiB (baseline {baseline_kib} KiB, bound {} KiB)",
        baseline_kib + allowed_kib
    );
    assert!(
        peak < baseline_kib + allowed_kib,
        "{what}: the daemon's peak RSS reached {peak} KiB, over the bound of {baseline_kib} + \
         {allowed_kib} KiB"
    );
}

// ---------------------------------------------------------------------------------------------------
// 1. Lock records

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_leases_on_ever_new_keys_keep_the_records_under_the_limit() {
    const MAX_LOCKS: u64 = 2_000;
    const ATTACK: u64 = 20_000;
    const KEY_LEN: usize = 1000;
    let daemon = TestDaemon::start(&["--max-locks", &MAX_LOCKS.to_string()]);
    let prober = Prober::start(&daemon);
    let baseline = probe::rss_kib(&daemon);

    // Ever-new 1000-byte keys, each locked with a 1 ms lease and never unlocked: ten times as many
    // as the table may keep. Without a limit every one would leave a record behind.
    let key = |i: u64| format!("{i:0>KEY_LEN$}");
    let mut attacker = daemon.raw().await;
    let first = pipeline(&mut attacker, [lock(1, &key(0), 1, 0, false)], 1).await;
    assert_eq!(first.get("ok"), Some(&1), "{first:?}");
    let tally = pipeline(
        &mut attacker,
        (1..ATTACK).map(|i| lock(i + 1, &key(i), 1, 0, false)),
        256,
    )
    .await;
    eprintln!("records attack: {tally:?}");
    // Leases run out, so records come free and the oldest give way: the attack is served, not refused.
    assert!(
        tally.get("ok").copied().unwrap_or(0) >= ATTACK / 2,
        "most ever-new keys should be granted: {tally:?}"
    );
    assert_eq!(
        tally.values().sum::<u64>(),
        ATTACK - 1,
        "every LOCK answered"
    );
    assert!(
        tally.keys().all(|k| k == "ok" || k == "OVERLOADED"),
        "{tally:?}"
    );

    drop(attacker);
    let report = prober.finish();
    eprintln!("records attack, probe: {}", report.summary());
    report.assert_every_answer(1);
    let allowed = MAX_LOCKS * (KEY_LEN as u64 + RECORD_OVERHEAD) / 1024 + SLACK_KIB;
    assert_peak_within(&daemon, "records attack", baseline, allowed);
    let mut observer = daemon.raw().await;
    let stats = lock_stats(&mut observer).await;
    let records = member(&stats, "records").as_u64().expect("records");
    assert!(records <= MAX_LOCKS, "{records} records kept: {stats}");
    assert_eq!(member(&stats, "max_records").as_u64(), Some(MAX_LOCKS));

    // The first key's record was pruned long ago; taking it again gets a token above every earlier
    // grant, and a write fenced with a token from before the pruning is refused, with a short message.
    let mut late = daemon.raw().await;
    late.request(&lock(1, &key(0), 60_000, 0, false)).await;
    let regrant = late.recv().await.expect("LOCK answer");
    let fence = member(&regrant.ok, "fence").as_u64().expect("fence");
    late.request(&lock(2, "newest", 60_000, 0, false)).await;
    let newest = late.recv().await.expect("LOCK answer");
    assert!(member(&newest.ok, "fence").as_u64().expect("fence") > fence);
    late.request(&request(
        3,
        CommandName::Set,
        Args {
            key: Some("data".into()),
            value: Some(b"late".to_vec()),
            fence: Some(Fence {
                lock: key(1),
                token: fence - 1,
            }),
            ..Args::default()
        },
    ))
    .await;
    let refused = late.recv().await.expect("SET answer");
    let (code, message) = error_of(&refused);
    assert_eq!(code, "FENCED");
    assert!(message.len() < KEY_LEN + 200, "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_record_held_a_lock_of_a_new_key_is_overloaded_and_nothing_else_changes() {
    const MAX_LOCKS: u64 = 100;
    let daemon = TestDaemon::start(&["--max-locks", &MAX_LOCKS.to_string()]);
    let mut holder = daemon.raw().await;
    let tally = pipeline(
        &mut holder,
        (0..MAX_LOCKS).map(|i| lock(i + 1, &format!("held:{i}"), 60_000, 0, false)),
        64,
    )
    .await;
    assert_eq!(tally.get("ok"), Some(&MAX_LOCKS), "{tally:?}");

    let mut other = daemon.raw().await;
    other
        .request(&lock(1, "one-too-many", 60_000, 0, false))
        .await;
    let answer = other.recv().await.expect("LOCK answer");
    let (code, message) = error_of(&answer);
    assert_eq!(code, "OVERLOADED");
    assert!(message.contains("SCALED_MAX_LOCKS"), "{message}");
    // A lock that exists is answered as always: held, so LOCKED in try mode.
    other.request(&lock(2, "held:7", 60_000, 0, false)).await;
    assert_eq!(
        error_of(&other.recv().await.expect("LOCK answer")).0,
        "LOCKED"
    );
    let stats = lock_stats(&mut other).await;
    assert_eq!(member(&stats, "overloaded").as_u64(), Some(1), "{stats}");
    assert_eq!(member(&stats, "held").as_u64(), Some(MAX_LOCKS), "{stats}");

    // The holder leaves: its locks are released, their records come free, and new keys fit again.
    drop(holder);
    wait_for_stat(&mut other, "held", 0).await;
    other
        .request(&lock(3, "one-too-many", 60_000, 0, false))
        .await;
    let answer = other.recv().await.expect("LOCK answer");
    assert!(answer.err.is_none(), "{:?}", answer.err);
}

// ---------------------------------------------------------------------------------------------------
// 2. Waiters per lock

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_takes_at_most_max_waiters_and_refuses_the_rest_at_once() {
    const MAX_WAITERS: u64 = 1024;
    const CONNECTIONS: u64 = 4;
    const PER_CONNECTION: u64 = 1000;
    let daemon = TestDaemon::start(&[]);
    let prober = Prober::start(&daemon);
    let baseline = probe::rss_kib(&daemon);
    let mut holder = daemon.raw().await;
    holder.request(&lock(1, "hot", 60_000, 0, false)).await;
    assert!(holder.recv().await.expect("grant").err.is_none());

    // 4 000 LOCKs for one lock, each with a minute's wait, from four connections in turn. The first
    // 1 024 queue; every LOCK past the limit is answered OVERLOADED at once, and has no effect.
    let mut observer = daemon.raw().await;
    let mut attackers = Vec::new();
    let mut queued = 0;
    for _ in 0..CONNECTIONS {
        let mut conn = daemon.raw().await;
        let mut frames = Vec::new();
        for i in 0..PER_CONNECTION {
            let body = lock(i + 1, "hot", 60_000, 60_000, false).to_msgpack();
            scaled_client::frame::push_frame(&mut frames, &body);
        }
        conn.send_bytes(&frames).await;
        let fits = PER_CONNECTION.min(MAX_WAITERS - queued);
        queued += fits;
        for _ in fits..PER_CONNECTION {
            let answer = conn
                .recv()
                .await
                .expect("an answer to a LOCK past the limit");
            let (code, message) = error_of(&answer);
            assert_eq!(code, "OVERLOADED", "{message}");
            assert!(message.contains("SCALED_MAX_WAITERS"), "{message}");
        }
        wait_for_stat(&mut observer, "waiters", queued).await;
        attackers.push(conn);
    }
    assert_eq!(queued, MAX_WAITERS);
    let stats = lock_stats(&mut observer).await;
    assert_eq!(
        member(&stats, "overloaded").as_u64(),
        Some(CONNECTIONS * PER_CONNECTION - MAX_WAITERS),
        "{stats}"
    );

    // The attackers leave: their waits are withdrawn, and the holder still holds the lock.
    drop(attackers);
    wait_for_stat(&mut observer, "waiters", 0).await;
    assert_eq!(lock_stat(&mut observer, "held").await, 1);

    let report = prober.finish();
    eprintln!("waiters attack, probe: {}", report.summary());
    report.assert_every_answer(1);
    let allowed = MAX_WAITERS * WAITER_BUDGET / 1024 + SLACK_KIB;
    assert_peak_within(&daemon, "waiters attack", baseline, allowed);
}

// ---------------------------------------------------------------------------------------------------
// 3. Leaving with many waits or many locks

/// Queues `n` LOCKs on one held lock from a fresh connection, then closes it, and returns the
/// daemon's CPU time (ns) from the close until every wait was withdrawn.
async fn cpu_to_withdraw(daemon: &TestDaemon, observer: &mut RawConn, key: &str, n: u64) -> u64 {
    let mut holder = daemon.raw().await;
    holder.request(&lock(1, key, 600_000, 0, false)).await;
    assert!(holder.recv().await.expect("grant").err.is_none());
    let mut waiter = daemon.raw().await;
    let mut frames = Vec::new();
    for i in 0..n {
        let body = lock(i + 1, key, 600_000, 600_000, false).to_msgpack();
        scaled_client::frame::push_frame(&mut frames, &body);
    }
    waiter.send_bytes(&frames).await;
    wait_for_stat(observer, "waiters", n).await;
    let before = probe::cpu_ns(daemon);
    drop(waiter);
    wait_for_stat(observer, "waiters", 0).await;
    let cpu = probe::cpu_ns(daemon) - before;
    drop(holder);
    wait_for_stat(observer, "held", 0).await;
    cpu
}

/// Takes `n` locks on a fresh connection, then closes it, and returns the daemon's CPU time (ns)
/// from the close until every lock was released.
async fn cpu_to_release(daemon: &TestDaemon, observer: &mut RawConn, prefix: &str, n: u64) -> u64 {
    let mut holder = daemon.raw().await;
    let tally = pipeline(
        &mut holder,
        (0..n).map(|i| lock(i + 1, &format!("{prefix}:{i}"), 600_000, 0, false)),
        256,
    )
    .await;
    assert_eq!(tally.get("ok"), Some(&n), "{tally:?}");
    let before = probe::cpu_ns(daemon);
    drop(holder);
    wait_for_stat(observer, "held", 0).await;
    probe::cpu_ns(daemon) - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_with_many_waits_or_locks_costs_linear_work_and_stalls_nobody() {
    const N: u64 = 1_000;
    let daemon = TestDaemon::start(&["--max-in-flight", "100000", "--max-waiters", "100000"]);
    let prober = Prober::start(&daemon);
    let baseline = probe::rss_kib(&daemon);
    let mut observer = daemon.raw().await;

    // Eight departures of N waits each, against one of 8N: linear work costs the same for both.
    cpu_to_withdraw(&daemon, &mut observer, "warm", N).await;
    let mut small = 0;
    for round in 0..8 {
        small += cpu_to_withdraw(&daemon, &mut observer, &format!("w{round}"), N).await;
    }
    let large = cpu_to_withdraw(&daemon, &mut observer, "w-large", 8 * N).await;
    eprintln!(
        "withdrawal: 8 x {N} waits took {small} ns of daemon CPU, 1 x {} took {large} ns",
        8 * N
    );
    assert!(
        large < 3 * small,
        "withdrawing {} waits took {large} ns of CPU, eight times {N} took {small} ns",
        8 * N
    );

    // The same for a connection that leaves holding many locks.
    let mut small = 0;
    for round in 0..8 {
        small += cpu_to_release(&daemon, &mut observer, &format!("r{round}"), N).await;
    }
    let large = cpu_to_release(&daemon, &mut observer, "r-large", 8 * N).await;
    eprintln!(
        "release: 8 x {N} locks took {small} ns of daemon CPU, 1 x {} took {large} ns",
        8 * N
    );
    assert!(
        large < 3 * small,
        "releasing {} locks took {large} ns of CPU, eight times {N} took {small} ns",
        8 * N
    );

    let report = prober.finish();
    eprintln!("departures, probe: {}", report.summary());
    report.assert_every_answer(1);
    let allowed = 8 * N * WAITER_BUDGET / 1024 + SLACK_KIB;
    assert_peak_within(&daemon, "departures", baseline, allowed);
}

// ---------------------------------------------------------------------------------------------------
// 4. auto_renew

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_renew_with_a_one_millisecond_lease_renews_at_most_once_a_second() {
    const LOCKS: u64 = 10_000;
    let daemon = TestDaemon::start(&[]);
    let prober = Prober::start(&daemon);
    let baseline = probe::rss_kib(&daemon);

    // 10 000 locks, each asking to auto-renew a 1 ms lease: each is granted the one-second floor.
    let mut holder = daemon.raw().await;
    holder.request(&lock(1, "renew:first", 1, 0, true)).await;
    let grant = holder.recv().await.expect("grant");
    assert_eq!(
        member(&grant.ok, "ttl_ms").as_u64(),
        Some(1000),
        "{}",
        grant.ok
    );
    let tally = pipeline(
        &mut holder,
        (1..LOCKS).map(|i| lock(i + 1, &format!("renew:{i}"), 1, 0, true)),
        256,
    )
    .await;
    assert_eq!(tally.get("ok"), Some(&(LOCKS - 1)), "{tally:?}");
    let mut observer = daemon.raw().await;
    let start = Instant::now();
    let renewals_before = lock_stat(&mut observer, "renewals").await;

    // Let a few seconds of renewals happen while the probe runs.
    let watch_until = start + Duration::from_millis(2500);
    while Instant::now() < watch_until {
        assert_eq!(lock_stat(&mut observer, "held").await, LOCKS);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let renewals = lock_stat(&mut observer, "renewals").await - renewals_before;
    let elapsed = start.elapsed().as_secs_f64();
    // At most one renewal per lock per second, and one more per lock for a renewal at either edge.
    let bound = (LOCKS as f64 * (elapsed + 1.0)) as u64;
    eprintln!("auto-renew: {renewals} renewals of {LOCKS} locks in {elapsed:.2} s (bound {bound})");
    assert!(
        renewals <= bound,
        "{renewals} renewals of {LOCKS} locks in {elapsed:.2} s: more than one a second each"
    );

    // The connection ends: every lock goes at once, none renewed on.
    drop(holder);
    wait_for_stat(&mut observer, "held", 0).await;
    let report = prober.finish();
    eprintln!("auto-renew, probe: {}", report.summary());
    report.assert_every_answer(1);
    let allowed = LOCKS * (64 + RECORD_OVERHEAD) / 1024 + SLACK_KIB;
    assert_peak_within(&daemon, "auto-renew", baseline, allowed);
}

// ---------------------------------------------------------------------------------------------------
// 5. LOCKS pages, and names that end up in answers

/// A HELLO with this client name.
fn hello(id: u64, name: String) -> Request {
    request(
        id,
        CommandName::Hello,
        Args {
            version: Some(scaled_client::PROTOCOL_VERSION),
            client: Some(name),
            ..Args::default()
        },
    )
}

/// A LOCKS request, paged when `limit` or `after` is given.
fn locks(id: u64, limit: Option<u64>, after: Option<String>) -> Request {
    request(
        id,
        CommandName::Locks,
        Args {
            limit,
            after,
            ..Args::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_answers_pages_under_the_frame_limit_whatever_the_names() {
    const HELD: u64 = 2_500;
    let daemon = TestDaemon::start(&[]);
    let prober = Prober::start(&daemon);
    let baseline = probe::rss_kib(&daemon);

    // A client name over 256 bytes is refused; the longest allowed one is the owner of every lock.
    let mut holder = daemon.raw_without_hello().await;
    holder.request(&hello(1, "n".repeat(1 << 20))).await;
    let answer = holder.recv().await.expect("HELLO answer");
    let (code, message) = error_of(&answer);
    assert_eq!(code, "TOO_LARGE");
    assert!(message.len() < 200, "{message}");
    holder.request(&hello(2, "n".repeat(256))).await;
    assert!(holder.recv().await.expect("HELLO answer").err.is_none());

    // 2 500 locks with 1024-byte keys: the largest rows there can be.
    let key = |i: u64| format!("{i:0>1024}");
    let tally = pipeline(
        &mut holder,
        (0..HELD).map(|i| lock(i + 10, &key(i), 600_000, 0, false)),
        256,
    )
    .await;
    assert_eq!(tally.get("ok"), Some(&HELD), "{tally:?}");

    // An old client's LOCKS, without paging arguments, gets the first page, as an array. RawConn
    // fails the test on any frame over the limit.
    let mut reader = daemon.raw().await;
    reader.request(&locks(1, None, None)).await;
    let first = reader.recv().await.expect("LOCKS answer");
    let rows = first.ok.as_array().expect("an array");
    assert_eq!(rows.len(), 1000);
    assert_eq!(member(&rows[0], "key").as_str(), Some(key(0).as_str()));

    // Paging walks every lock once, in key order, each page under the frame limit.
    let mut after = None;
    let mut seen = 0;
    let mut calls = 0;
    for _ in 0..50 {
        reader.request(&locks(2, Some(5_000), after.clone())).await;
        let page = reader.recv().await.expect("LOCKS page").ok;
        calls += 1;
        let rows = member(&page, "locks").as_array().expect("locks");
        assert!(rows.len() <= 1000);
        assert_eq!(member(&page, "total").as_u64(), Some(HELD));
        for row in rows {
            assert_eq!(member(row, "key").as_str(), Some(key(seen).as_str()));
            assert_eq!(
                member(row, "owner").as_str().map(str::len),
                Some(256 + 1 + 1)
            );
            seen += 1;
        }
        match member(&page, "next") {
            rmpv::Value::Nil => break,
            next => after = Some(next.as_str().expect("next is a key").to_string()),
        }
    }
    assert_eq!((seen, calls), (HELD, 3));

    // The client crate and scalectl page under the hood and list them all.
    let client = daemon.client().await;
    let all = client.locks().await.expect("LOCKS");
    assert_eq!(all.len(), HELD as usize);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_scalectl"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["locks", "--json"])
        .output()
        .expect("run scalectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(listed.as_array().map(Vec::len), Some(HELD as usize));

    // Many full pages in a row: each is built and dropped in turn, so memory stays flat.
    for id in 0..40 {
        reader.request(&locks(100 + id, Some(1000), None)).await;
        let answer = reader.recv().await.expect("LOCKS page");
        assert!(answer.err.is_none());
    }

    // A fence naming a lock longer than a key is refused like a key, before anything is looked up.
    reader
        .request(&request(
            3,
            CommandName::Set,
            Args {
                key: Some("k".into()),
                value: Some(b"v".to_vec()),
                fence: Some(Fence {
                    lock: "f".repeat(MAX_FRAME_LEN / 2),
                    token: 1,
                }),
                ..Args::default()
            },
        ))
        .await;
    let answer = reader.recv().await.expect("SET answer");
    let (code, message) = error_of(&answer);
    assert_eq!(code, "TOO_LARGE");
    assert!(message.len() < 200, "{message}");

    let report = prober.finish();
    eprintln!("LOCKS pages, probe: {}", report.summary());
    report.assert_every_answer(1);
    // The records (2 500 keys of 1 KiB), the 1 MiB HELLO read in, and an answer's worth for each of
    // the four connections that read pages (the test's, the client crate's, scalectl's, the probe's).
    let allowed = HELD * (1024 + RECORD_OVERHEAD) / 1024 + 1024 + 4 * ANSWER_BUDGET_KIB + SLACK_KIB;
    assert_peak_within(&daemon, "LOCKS pages", baseline, allowed);
}
