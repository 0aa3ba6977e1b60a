//! What a reader sees when daemons share one Redis (docs/coherence.md), against a real
//! `redis-server` each test starts.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::daemon_group::DaemonGroup;
use common::redis_server::RedisServer;
use scaled_client::frame::push_frame;
use scaled_client::proto::{Args, CommandName, Request};

/// How long a test waits for something that should happen soon before failing.
const LIMIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_get_reads_the_set_sent_before_it_on_its_connection_or_a_later_one() {
    const ROUNDS: u64 = 50;
    let redis = RedisServer::start();
    let group = DaemonGroup::start(&redis, 1, &[]);
    let observer = group.host(0).client().await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !observer.stats().await.expect("STATS").redis.available {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Redis never available"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut conn = group.host(0).raw().await;
    // Every SET and the GET after it in one write, so they arrive together and wait on Redis
    // together: SET of round i is id 2i+1, its GET id 2i+2.
    let mut bytes = Vec::new();
    for i in 0..ROUNDS {
        let set = Request {
            args: Args {
                key: Some("k".into()),
                value: Some(format!("v{i}").into_bytes()),
                ..Args::default()
            },
            ..Request::new(2 * i + 1, CommandName::Set)
        };
        let get = Request {
            args: Args {
                key: Some("k".into()),
                ..Args::default()
            },
            ..Request::new(2 * i + 2, CommandName::Get)
        };
        push_frame(&mut bytes, &set.to_msgpack());
        push_frame(&mut bytes, &get.to_msgpack());
    }
    conn.send_bytes(&bytes).await;
    let mut answers = HashMap::new();
    while answers.len() < 2 * ROUNDS as usize {
        let r = tokio::time::timeout(LIMIT, conn.recv())
            .await
            .expect("answers in time")
            .expect("connection open");
        answers.insert(r.id, r);
    }
    for i in 0..ROUNDS {
        let get = &answers[&(2 * i + 2)];
        assert!(get.err.is_none(), "GET {i}: {:?}", get.err);
        // Its own SET's value, or that of a SET sent after it (the spec allows a later value).
        let read = get
            .ok
            .as_slice()
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.strip_prefix('v'))
            .and_then(|n| n.parse::<u64>().ok());
        assert!(
            read.is_some_and(|n| n >= i),
            "round {i}: the GET read {read:?}, older than the SET before it"
        );
    }
}

/// What a run of the session workload saw.
#[derive(Debug, Default)]
struct Touches {
    /// Reads that were not the last value written to their session, when read or when the write
    /// based on them landed (under its lock, when locked).
    stale_reads: u64,
    /// Per session, touches made minus the count left in Redis.
    lost_updates: u64,
    /// Touches made.
    made: u64,
}

/// Each of `workers` clients of every daemon touches each of `sessions` sessions `rounds` times: LOCK
/// the session, GET its state, check it is the last value written (recorded by the test, shared by
/// all workers), SET state+1 fenced, record it, UNLOCK. Without `locked`, the LOCK is skipped, the
/// SET is plain, and every worker reads before any writes in each touch (a barrier between), the
/// interleaving the lock exists to prevent.
async fn session_touches(
    group: &DaemonGroup,
    workers: usize,
    sessions: usize,
    rounds: usize,
    locked: bool,
) -> Touches {
    use scaled_client::{LockOptions, LockStatus};
    use std::sync::Arc;
    use tokio::sync::{Barrier, Mutex};

    let count = |v: Option<Vec<u8>>| -> u64 {
        v.map_or(0, |v| {
            std::str::from_utf8(&v)
                .expect("utf-8 state")
                .parse()
                .expect("decimal state")
        })
    };
    let last = Arc::new(Mutex::new(vec![0u64; sessions]));
    let stale = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(group.len() * workers));
    let options = LockOptions {
        ttl: Some(Duration::from_secs(10)),
        wait: Some(Duration::from_secs(30)),
        auto_renew: false,
    };
    let mut tasks = Vec::new();
    for (h, daemon) in group.daemons.iter().enumerate() {
        for w in 0..workers {
            let client = daemon.client().await;
            let (last, stale, barrier, options) = (
                last.clone(),
                stale.clone(),
                barrier.clone(),
                options.clone(),
            );
            tasks.push(tokio::spawn(async move {
                for _ in 0..rounds {
                    for i in 0..sessions {
                        // Each worker starts at a different session, so all of them meet on all.
                        let s = (i + h * workers + w) % sessions;
                        let key = format!("state:{s}");
                        let guard = if locked {
                            Some(
                                client
                                    .lock(&format!("session:{s}"), options.clone())
                                    .await
                                    .expect("LOCK"),
                            )
                        } else {
                            None
                        };
                        let read = count(client.get(&key).await.expect("GET"));
                        if read != last.lock().await[s] {
                            stale.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        if guard.is_none() {
                            barrier.wait().await;
                        }
                        let next = (read + 1).to_string();
                        match &guard {
                            Some(g) => client
                                .set_fenced(&key, next.as_bytes(), None, &g.write_fence())
                                .await
                                .expect("fenced SET"),
                            None => client.set(&key, next.as_bytes(), None).await.expect("SET"),
                        }
                        // Still the last value written when the write lands: under the lock
                        // nobody can have written in between.
                        let mut written = last.lock().await;
                        if written[s] != read {
                            stale.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        written[s] = read + 1;
                        drop(written);
                        match guard {
                            Some(g) => {
                                assert_eq!(g.unlock().await.expect("UNLOCK"), LockStatus::Ok)
                            }
                            None => {
                                barrier.wait().await;
                            }
                        }
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("worker");
    }
    let reader = group.host(0).client().await;
    let each = (group.len() * workers * rounds) as u64;
    let mut touches = Touches {
        stale_reads: stale.load(std::sync::atomic::Ordering::Relaxed),
        made: each * sessions as u64,
        ..Touches::default()
    };
    for s in 0..sessions {
        // Read under the session's lock: outside it, this daemon may still answer its own cached
        // copy until the last writer's invalidation reaches it (the invalidation window), which
        // would count as lost updates that are not.
        let guard = reader
            .lock(&format!("session:{s}"), options.clone())
            .await
            .expect("LOCK to read the final state");
        let left = count(reader.get(&format!("state:{s}")).await.expect("GET"));
        assert_eq!(guard.unlock().await.expect("UNLOCK"), LockStatus::Ok);
        touches.lost_updates += each.saturating_sub(left);
    }
    touches
}

/// Starts three daemons on `redis` and waits until each reaches it.
async fn three_daemons(redis: &RedisServer) -> DaemonGroup {
    let group = DaemonGroup::start(redis, 3, &[]);
    for d in &group.daemons {
        let c = d.client().await;
        let deadline = tokio::time::Instant::now() + LIMIT;
        while !c.stats().await.expect("STATS").redis.available {
            assert!(
                tokio::time::Instant::now() < deadline,
                "Redis never available"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    group
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_touched_from_every_daemon_under_their_locks_lose_nothing_and_read_nothing_stale()
{
    let redis = RedisServer::start();
    let group = three_daemons(&redis).await;
    let touches = session_touches(&group, 2, 20, 5, true).await;
    assert_eq!(touches.made, 3 * 2 * 20 * 5);
    assert_eq!(touches.lost_updates, 0, "{touches:?}");
    assert_eq!(touches.stale_reads, 0, "{touches:?}");
    // With the local caches on, and used: some of those reads under a lock were answered from one
    // (the final reads, one GET per session, account for at most 20 hits).
    let hits = cache_hits(&group).await;
    assert!(
        hits > 20,
        "{hits} GETs answered from a cache: the reads under the locks did not use it"
    );
}

/// GETs answered from the daemons' local caches, summed over the group.
async fn cache_hits(group: &DaemonGroup) -> u64 {
    let mut hits = 0;
    for d in &group.daemons {
        hits += d
            .client()
            .await
            .stats()
            .await
            .expect("STATS")
            .redis
            .cache_hits;
    }
    hits
}

/// The checks above can fail: the same workload without the lock loses updates and reads stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_touches_without_the_lock_lose_updates_and_read_stale() {
    let redis = RedisServer::start();
    let group = three_daemons(&redis).await;
    let touches = session_touches(&group, 1, 2, 2, false).await;
    assert!(touches.lost_updates > 0, "{touches:?}");
    assert!(touches.stale_reads > 0, "{touches:?}");
}
