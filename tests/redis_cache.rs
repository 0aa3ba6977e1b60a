//! The local cache in front of Redis (docs/coherence.md): what it saves, and that it never serves
//! what it must not. Several `scaled` daemons on one real `redis-server` each test starts; Redis's own
//! `INFO commandstats` counts the reads.

mod common;

use std::time::Duration;

use common::daemon_group::DaemonGroup;
use common::redis_server::RedisServer;
use scaled_client::answers::RedisStats;
use scaled_client::proto::{Args, CommandName, Request, Response};
use scaled_client::Client;

/// How long a test waits for something that should happen soon before failing.
const LIMIT: Duration = Duration::from_secs(10);

/// The command the read script runs as, as INFO commandstats names it.
const READ_COMMAND: &str = "evalsha";

/// Reads of values (and writes) Redis has run since its stats were last reset.
fn scripts_run(redis: &RedisServer) -> u64 {
    redis
        .command_calls()
        .get(READ_COMMAND)
        .copied()
        .unwrap_or(0)
}

async fn redis_stats(client: &Client) -> RedisStats {
    client.stats().await.expect("STATS").redis
}

/// A GET on a raw connection, answered with its envelope (for the `degraded` member).
async fn raw_get(conn: &mut common::RawConn, id: u64, key: &str) -> Response {
    conn.request(&Request {
        args: Args {
            key: Some(key.into()),
            ..Args::default()
        },
        ..Request::new(id, CommandName::Get)
    })
    .await;
    tokio::time::timeout(LIMIT, conn.recv())
        .await
        .expect("GET answered in time")
        .expect("connection open")
}

/// Polls `until` on `client`'s STATS `redis` every 10 ms, failing after [`LIMIT`] with `what`.
async fn wait_stats(client: &Client, what: &str, until: impl Fn(&RedisStats) -> bool) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let stats = redis_stats(client).await;
        if until(&stats) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} within {LIMIT:?}: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_get_on_one_daemon_makes_no_new_redis_read() {
    let redis = RedisServer::start();
    let group = DaemonGroup::start_available(&redis, 2, &[]).await;
    let (a, b) = (group.host(0).client().await, group.host(1).client().await);
    a.set("k", b"v1", None).await.expect("SET on A");
    redis.reset_stats();
    assert_eq!(b.get("k").await.expect("GET").as_deref(), Some(&b"v1"[..]));
    assert_eq!(scripts_run(&redis), 1, "the first GET on B reads Redis");
    for _ in 0..5 {
        assert_eq!(b.get("k").await.expect("GET").as_deref(), Some(&b"v1"[..]));
    }
    assert_eq!(scripts_run(&redis), 1, "a later GET on B read Redis again");
    // The writer cached its own write: its GETs read nothing either.
    assert_eq!(a.get("k").await.expect("GET").as_deref(), Some(&b"v1"[..]));
    assert_eq!(scripts_run(&redis), 1, "A read back its own write");
    let stats = redis_stats(&b).await;
    assert!(stats.cache_hits >= 5, "{stats:?}");
    assert!(stats.reads_saved >= stats.cache_hits, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_daemon_evicts_the_copy_cached_on_another_and_reads_never_go_back() {
    const WRITES: u64 = 30;
    let redis = RedisServer::start();
    let group = DaemonGroup::start_available(&redis, 2, &[]).await;
    let (a, b) = (group.host(0).client().await, group.host(1).client().await);
    let read = |v: Option<Vec<u8>>| -> u64 {
        v.map_or(0, |v| {
            std::str::from_utf8(&v)
                .expect("utf-8")
                .parse()
                .expect("decimal")
        })
    };
    a.set("k", b"0", None).await.expect("SET");
    assert_eq!(read(b.get("k").await.expect("GET")), 0);
    let before = redis_stats(&b).await;
    let mut newest_seen = 0;
    for i in 1..=WRITES {
        a.set("k", i.to_string().as_bytes(), None)
            .await
            .expect("SET on A");
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            let got = read(b.get("k").await.expect("GET on B"));
            assert!(
                got >= newest_seen,
                "B read {got} after it had read {newest_seen}"
            );
            newest_seen = got;
            if got == i {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "B still reads {got} {LIMIT:?} after A wrote {i}"
            );
            tokio::task::yield_now().await;
        }
        // Cached again: the next GETs on B are hits until the next write's invalidation.
        assert_eq!(read(b.get("k").await.expect("GET on B")), i);
    }
    let after = redis_stats(&b).await;
    assert!(
        after.invalidations >= before.invalidations + WRITES,
        "{after:?}"
    );
    assert!(after.cache_hits >= before.cache_hits + WRITES, "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_invalidation_stream_flushes_the_cache() {
    let redis = RedisServer::start();
    let group = DaemonGroup::start_available(&redis, 1, &[]).await;
    let b = group.host(0).client().await;
    b.set("k", b"old", None).await.expect("SET");
    // Changed in Redis behind every daemon's back: no sequence bump, no invalidation. This is what a
    // write whose invalidation is lost with the stream looks like to the cache.
    let changed = scaled::redis::scripts::encode_value(b"new");
    redis.cmd(&[b"SET", b"scaled:v:k", &changed]);
    assert_eq!(
        b.get("k").await.expect("GET").as_deref(),
        Some(&b"old"[..]),
        "the cache did not answer (the check below would prove nothing)"
    );
    let flushes = redis_stats(&b).await.flushes;
    redis.cmd(&[b"CLIENT", b"KILL", b"TYPE", b"pubsub"]);
    wait_stats(&b, "no flush", |s| s.flushes > flushes).await;
    // From the flush on, no normal answer comes from the old cache; until the stream is back GETs
    // read Redis, and after it the value read is the one cached.
    let mut conn = group.host(0).raw().await;
    for id in 1..=50 {
        let got = raw_get(&mut conn, id, "k").await;
        assert!(got.err.is_none(), "{:?}", got.err);
        assert!(
            !got.degraded,
            "Redis is up: the answer must not be degraded"
        );
        assert_eq!(
            got.ok.as_slice(),
            Some(&b"new"[..]),
            "GET {id} answered the cache's old value after the stream was lost"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_gone_a_cached_value_is_answered_marked_degraded() {
    let mut redis = RedisServer::start();
    let group = DaemonGroup::start_available(&redis, 1, &[]).await;
    let client = group.host(0).client().await;
    client.set("kept", b"v", None).await.expect("SET");
    redis.kill();
    wait_stats(&client, "Redis still available", |s| !s.available).await;
    let mut conn = group.host(0).raw().await;
    let got = raw_get(&mut conn, 1, "kept").await;
    assert_eq!(got.ok.as_slice(), Some(&b"v"[..]), "{:?}", got.err);
    assert!(got.degraded, "an answer made without Redis was not marked");
    let missing = raw_get(&mut conn, 2, "never-cached").await;
    assert!(missing.err.is_some(), "a key never cached: {missing:?}");
    assert!(missing.degraded);
    assert!(redis_stats(&client).await.degraded_hits >= 1);
}

/// A daemon whose GETs miss while another daemon keeps writing the key: some fills read a value that
/// a write replaced before the fill could land, and those must be dropped (counted), never cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_that_raced_an_invalidation_is_not_cached() {
    let redis = RedisServer::start();
    let group = DaemonGroup::start_available(&redis, 2, &[]).await;
    let (a, b) = (group.host(0).client().await, group.host(1).client().await);
    a.set("k", b"0", None).await.expect("SET");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (a, stop) = (a.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                a.set("k", i.to_string().as_bytes(), None)
                    .await
                    .expect("SET on A");
            }
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        // Several concurrent GETs, so some of them miss while a write is in flight.
        let gets: Vec<_> = (0..8).map(|_| b.get("k")).collect();
        for got in futures_util::future::join_all(gets).await {
            got.expect("GET on B");
        }
        if redis_stats(&b).await.fills_dropped > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no fill raced an invalidation in 30 s: {:?}",
            redis_stats(&b).await
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.expect("writer");
    // Once the writes have stopped, B answers the last one (cached or read), never an older value.
    let last = a.get("k").await.expect("GET on A");
    let deadline = tokio::time::Instant::now() + LIMIT;
    while b.get("k").await.expect("GET on B") != last {
        assert!(
            tokio::time::Instant::now() < deadline,
            "B never caught up with the last write"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for _ in 0..20 {
        assert_eq!(b.get("k").await.expect("GET on B"), last);
    }
}
