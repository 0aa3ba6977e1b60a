//! Requests waiting on Redis (proto-spec.md, "Requests waiting on Redis"): they never count toward
//! SCALED_MAX_IN_FLIGHT (a LOCK only until it waits for another daemon's holder), a connection at
//! REDIS_MAX_PENDING of them pauses instead of refusing, and the values of SETs waiting on Redis stay
//! within REDIS_MAX_PENDING_BYTES. Against a real `redis-server` each test starts.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use common::daemon_group::DaemonGroup;
use common::redis_server::RedisServer;
use scaled_client::frame::{push_frame, take_frame};
use scaled_client::proto::{Args, CommandName, Request, Response, MAX_FRAME_LEN, PROTOCOL_VERSION};

/// How long a test waits for something that should happen soon before failing.
const LIMIT: Duration = Duration::from_secs(60);

/// Starts one daemon on `redis` with `extra` flags, and waits until it reaches Redis.
async fn daemon(redis: &RedisServer, extra: &[&str]) -> DaemonGroup {
    DaemonGroup::start_available(redis, 1, extra).await
}

/// `sets` SETs of `value_len`-byte values over `keys` keys, written in one go on one connection
/// (after HELLO) while its answers are read; answers every answer by id. The value of SET `i` starts
/// with `i` as 8 big-endian bytes.
async fn pipelined_sets(
    socket: std::path::PathBuf,
    sets: u64,
    keys: u64,
    value_len: usize,
) -> HashMap<u64, Response> {
    let mut bytes = Vec::new();
    let hello = Request {
        args: Args {
            version: Some(PROTOCOL_VERSION),
            ..Args::default()
        },
        ..Request::new(0, CommandName::Hello)
    };
    push_frame(&mut bytes, &hello.to_msgpack());
    for i in 1..=sets {
        let mut value = vec![0x5a; value_len.max(8)];
        value[..8].copy_from_slice(&i.to_be_bytes());
        let set = Request {
            args: Args {
                key: Some(format!("k{}", i % keys)),
                value: Some(value),
                ..Args::default()
            },
            ..Request::new(i, CommandName::Set)
        };
        push_frame(&mut bytes, &set.to_msgpack());
    }
    let stream = UnixStream::connect(&socket).await.expect("connect");
    let (mut rx, mut tx) = stream.into_split();
    // Written while the answers are read, as a pipelining client must.
    let writer = tokio::spawn(async move {
        tx.write_all(&bytes).await.expect("write the burst");
        tx
    });
    let mut answers = HashMap::new();
    let mut buf = BytesMut::new();
    let expected = sets as usize + 1;
    tokio::time::timeout(LIMIT, async {
        while answers.len() < expected {
            while let Some(body) = take_frame(&mut buf, MAX_FRAME_LEN).expect("frame size") {
                let r = Response::decode(&body).expect("decodable response");
                answers.insert(r.id, r);
            }
            if answers.len() < expected {
                let n = rx.read_buf(&mut buf).await.expect("read");
                assert!(n > 0, "closed after {} answers", answers.len());
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {} of {expected} answers", answers.len()));
    drop(writer.await.expect("writer"));
    answers
}

/// Every SET answered OK, and each key holds its last SET's value (none acknowledged was lost).
async fn assert_all_written(
    group: &DaemonGroup,
    answers: &HashMap<u64, Response>,
    sets: u64,
    keys: u64,
) {
    for i in 1..=sets {
        let r = &answers[&i];
        assert!(r.err.is_none(), "SET {i}: {:?}", r.err);
    }
    let client = group.host(0).client().await;
    for k in 0..keys {
        let last = (1..=sets)
            .rev()
            .find(|i| i % keys == k)
            .expect("a SET of k");
        let got = client
            .get(&format!("k{k}"))
            .await
            .expect("GET")
            .expect("a value");
        assert_eq!(got[..8], last.to_be_bytes(), "k{k} is not its last SET");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_sets_is_not_refused_by_the_in_flight_limit() {
    let redis = RedisServer::start();
    let group = daemon(&redis, &["--max-in-flight", "8"]).await;
    let (sets, keys) = (3000, 100);
    let answers = pipelined_sets(group.host(0).socket.clone(), sets, keys, 16).await;
    assert_all_written(&group, &answers, sets, keys).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_paused_at_redis_max_pending_still_gets_every_answer() {
    let redis = RedisServer::start();
    let group = daemon(&redis, &["--redis-max-pending", "4"]).await;
    let (sets, keys) = (3000, 100);
    let answers = pipelined_sets(group.host(0).socket.clone(), sets, keys, 16).await;
    assert_all_written(&group, &answers, sets, keys).await;
}

/// A process's peak resident memory in bytes (VmHWM).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_waiting_on_redis_stay_within_redis_max_pending_bytes() {
    const VALUE: usize = 60_000;
    const SETS: u64 = 3000;
    const KEYS: u64 = 50;
    let redis = RedisServer::start();
    // 1 MiB of values may wait on Redis: about 17 of these SETs. REDIS_MAX_PENDING alone (1024)
    // would let some 60 MB wait. Redis calls outlast the stop below.
    let group = daemon(
        &redis,
        &[
            "--redis-max-pending-bytes",
            "1048576",
            "--redis-response-timeout",
            "60",
        ],
    )
    .await;
    let pid = group.host(0).child.id();
    let before = peak_rss(pid);
    // With Redis stopped nothing finishes, so the daemon takes what its limits let it take and no
    // more. Watching its memory for a while is the point: nothing marks the moment it stops.
    redis.pause();
    let burst = tokio::spawn(pipelined_sets(
        group.host(0).socket.clone(),
        SETS,
        KEYS,
        VALUE,
    ));
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!burst.is_finished(), "answered while Redis was stopped");
    }
    let grown = peak_rss(pid).saturating_sub(before);
    redis.resume();
    let answers = burst.await.expect("burst");
    assert_all_written(&group, &answers, SETS, KEYS).await;
    assert!(
        grown < 24 << 20,
        "peak memory grew by {} MiB with Redis stopped and {} MB sent",
        grown >> 20,
        SETS as usize * VALUE / 1_000_000
    );
}

/// A LOCK on `key` with id `id`, waiting at most `wait_ms`, 60 s lease.
fn lock_request(id: u64, key: &str, wait_ms: u64) -> Request {
    Request {
        args: Args {
            key: Some(key.into()),
            ttl_ms: Some(60_000),
            wait_ms: Some(wait_ms),
            ..Args::default()
        },
        ..Request::new(id, CommandName::Lock)
    }
}

/// Whether a response is an error with this code.
fn is_error(r: &Response, code: &str) -> bool {
    r.err.as_ref().is_some_and(|e| e.code == code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_locks_on_free_locks_is_not_refused_by_the_in_flight_limit() {
    // A LOCK whose lock is free on its daemon waits only on Redis: like a SET, it does not count
    // toward SCALED_MAX_IN_FLIGHT, however many a connection sends at once.
    let redis = RedisServer::start();
    let group = daemon(&redis, &["--max-in-flight", "2"]).await;
    let mut conn = group.host(0).raw().await;
    const LOCKS: u64 = 500;
    let mut burst = Vec::new();
    for i in 1..=LOCKS {
        push_frame(
            &mut burst,
            &lock_request(i, &format!("free{i}"), 5_000).to_msgpack(),
        );
    }
    conn.send_bytes(&burst).await;
    let mut granted = 0;
    for _ in 0..LOCKS {
        let r = conn.recv().await.expect("an answer to every LOCK");
        assert!(r.err.is_none(), "LOCK {} refused: {:?}", r.id, r.err);
        granted += 1;
    }
    assert_eq!(granted, LOCKS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_waiting_for_another_daemons_holder_counts_toward_the_in_flight_limit() {
    // Past its Redis step, a LOCK that must wait for a holder on another daemon waits on another
    // client: it needs room under SCALED_MAX_IN_FLIGHT like a LOCK queued on its own daemon, and is
    // refused OVERLOADED without it, so the connection is never paused by waits on other clients.
    let redis = RedisServer::start();
    let group = DaemonGroup::start_available(&redis, 2, &["--max-in-flight", "2"]).await;
    let holder = group.host(0).client().await;
    let mut guards = Vec::new();
    for key in ["a", "b", "c"] {
        let options = scaled_client::LockOptions {
            ttl: Some(Duration::from_secs(60)),
            ..scaled_client::LockOptions::default()
        };
        guards.push(
            holder
                .lock(key, options)
                .await
                .expect("LOCK on the first daemon"),
        );
    }
    let mut conn = group.host(1).raw().await;
    let mut burst = Vec::new();
    for (id, key) in [(1, "a"), (2, "b"), (3, "c")] {
        push_frame(&mut burst, &lock_request(id, key, 30_000).to_msgpack());
    }
    conn.send_bytes(&burst).await;
    // Two wait for the holder; the third finds no room and is answered while they wait.
    let refused = conn.recv().await.expect("an answer while two LOCKs wait");
    assert!(
        is_error(&refused, "OVERLOADED"),
        "expected one LOCK refused OVERLOADED, got {refused:?}"
    );
    // The connection still reads while they wait: a PING is answered.
    conn.request(&Request::new(9, CommandName::Ping)).await;
    let pong = conn.recv().await.expect("PING answered");
    assert_eq!((pong.id, pong.err.is_none()), (9, true), "{pong:?}");
    for guard in guards {
        guard.unlock().await.expect("UNLOCK");
    }
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r = conn.recv().await.expect("a grant once the holder lets go");
        assert!(r.err.is_none(), "LOCK {}: {:?}", r.id, r.err);
        ids.push(r.id);
    }
    ids.push(refused.id);
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2, 3], "each LOCK answered once");
}
