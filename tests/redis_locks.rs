//! Locks and writes shared across hosts: several `scaled` daemons on one real `redis-server`, each
//! test starting its own. A daemon here stands for one app host.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::daemon_group::DaemonGroup;
use common::redis_server::RedisServer;
use common::TestDaemon;
use scaled_client::proto::{Args, CommandName, Request};
use scaled_client::{Client, Error, LockOptions, LockStatus};
use tokio::sync::{Barrier, Mutex};

/// How long a test waits for something that should happen soon before failing.
const LIMIT: Duration = Duration::from_secs(10);

/// Waits until the daemon says Redis is available, failing the test after [`LIMIT`].
async fn wait_available(client: &Client) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let stats = client.stats().await.expect("STATS");
        if stats.redis.available {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the daemon did not reach Redis within {LIMIT:?}: {:?}",
            stats.redis
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A client of each daemon of `group`, each waited for until its daemon reaches Redis.
async fn clients(group: &DaemonGroup) -> Vec<Client> {
    let mut out = Vec::new();
    for d in &group.daemons {
        let c = d.client().await;
        wait_available(&c).await;
        out.push(c);
    }
    out
}

fn lock_options() -> LockOptions {
    LockOptions {
        ttl: Some(Duration::from_secs(10)),
        wait: Some(Duration::from_secs(20)),
        auto_renew: false,
    }
}

fn counter(value: Option<Vec<u8>>) -> u64 {
    value.map_or(0, |v| {
        std::str::from_utf8(&v)
            .expect("utf-8 counter")
            .parse()
            .expect("decimal counter")
    })
}

/// What a run of the increment workload saw: per counter, (value read under the lock, fence held).
type Seen = Vec<Vec<(u64, u64)>>;

/// GETs answered from the daemons' local caches so far, summed over `clients`' daemons.
async fn cache_hits(clients: &[Client]) -> u64 {
    let mut hits = 0;
    for c in clients {
        hits += c.stats().await.expect("STATS").redis.cache_hits;
    }
    hits
}

/// Each of `workers` clients per daemon adds 1 to each of `keys` counters `rounds` times: GET, +1,
/// SET. With `locked`, each increment runs under the counter's lock with a fenced SET; without, every
/// worker reads before any writes in each round (a barrier between), the interleaving a lock exists
/// to prevent. Answers the final counts, read from the first daemon, and what was seen under locks.
async fn increments(
    clients: &[Client],
    workers: usize,
    keys: usize,
    rounds: usize,
    locked: bool,
) -> (Vec<u64>, Seen) {
    let seen = Arc::new(Mutex::new(vec![Vec::new(); keys]));
    let barrier = Arc::new(Barrier::new(clients.len() * workers));
    let mut tasks = Vec::new();
    for client in clients {
        for _ in 0..workers {
            let (client, seen, barrier) = (client.clone(), seen.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..rounds {
                    for k in 0..keys {
                        let key = format!("counter:{k}");
                        if locked {
                            let guard = client
                                .lock(&format!("lock:{k}"), lock_options())
                                .await
                                .expect("LOCK");
                            let n = counter(client.get(&key).await.expect("GET"));
                            seen.lock().await[k].push((n, guard.fence()));
                            client
                                .set_fenced(
                                    &key,
                                    (n + 1).to_string().as_bytes(),
                                    None,
                                    &guard.write_fence(),
                                )
                                .await
                                .expect("fenced SET");
                            assert_eq!(guard.unlock().await.expect("UNLOCK"), LockStatus::Ok);
                        } else {
                            let n = counter(client.get(&key).await.expect("GET"));
                            barrier.wait().await;
                            client
                                .set(&key, (n + 1).to_string().as_bytes(), None)
                                .await
                                .expect("SET");
                            barrier.wait().await;
                        }
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("worker");
    }
    // Read under each counter's lock: outside it, the first daemon may still answer its own cached
    // copy until the last writer's invalidation reaches it (the invalidation window).
    let mut finals = Vec::new();
    for k in 0..keys {
        let guard = clients[0]
            .lock(&format!("lock:{k}"), lock_options())
            .await
            .expect("LOCK to read the final count");
        finals.push(counter(
            clients[0].get(&format!("counter:{k}")).await.expect("GET"),
        ));
        assert_eq!(guard.unlock().await.expect("UNLOCK"), LockStatus::Ok);
    }
    let seen = std::mem::take(&mut *seen.lock().await);
    (finals, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_under_lock_from_three_daemons_lose_no_update_and_fences_only_grow() {
    let redis = RedisServer::start();
    let group = DaemonGroup::start(&redis, 3, &[]);
    let clients = clients(&group).await;
    let (workers, keys, rounds) = (2, 2, 10);
    let (finals, seen) = increments(&clients, workers, keys, rounds, true).await;
    let each = (clients.len() * workers * rounds) as u64;
    assert_eq!(finals, vec![each; keys], "lost updates under the lock");
    // The local caches were on and answered some of the reads made under the locks (the final
    // reads, `keys` GETs on one daemon, account for at most `keys` hits).
    let hits = cache_hits(&clients).await;
    assert!(
        hits > keys as u64,
        "{hits} GETs answered from a cache: the reads under the locks did not use it"
    );
    for (k, mut grants) in seen.into_iter().enumerate() {
        // Each critical section read the count the one before it left: order them by it.
        grants.sort_unstable();
        let counts: Vec<u64> = grants.iter().map(|g| g.0).collect();
        assert_eq!(counts, (0..each).collect::<Vec<_>>(), "counter {k}");
        for pair in grants.windows(2) {
            assert!(
                pair[1].1 > pair[0].1,
                "counter {k}: fence {} after fence {}",
                pair[1].1,
                pair[0].1
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lost_update_check_fails_when_increments_skip_the_lock() {
    let redis = RedisServer::start();
    let group = DaemonGroup::start(&redis, 3, &[]);
    let clients = clients(&group).await;
    let (finals, _) = increments(&clients, 1, 1, 2, false).await;
    // Three readers read the same count each round, so two of every three updates are lost.
    assert!(finals[0] < 6, "expected lost updates, got {}", finals[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_daemon_is_read_on_another_and_a_grant_there_fences_the_old_holder() {
    let redis = RedisServer::start();
    let group = DaemonGroup::start(&redis, 2, &[]);
    let c = clients(&group).await;
    c[0].set("k", b"from a", None).await.expect("SET on A");
    assert_eq!(
        c[1].get("k").await.expect("GET on B").as_deref(),
        Some(&b"from a"[..])
    );
    let short = LockOptions {
        ttl: Some(Duration::from_millis(300)),
        ..lock_options()
    };
    let old = c[0].lock("s", short).await.expect("LOCK on A");
    // B waits for A's lease to end (in Redis too), and is granted with a newer fence.
    let new = c[1].lock("s", lock_options()).await.expect("LOCK on B");
    assert!(new.fence() > old.fence());
    let new_fence = new.fence();
    let stale = c[0]
        .set_fenced("k", b"stale", None, &old.write_fence())
        .await;
    assert!(
        matches!(stale, Err(Error::Fenced(_))),
        "stale write: {stale:?}"
    );
    c[1].set_fenced("k", b"fresh", None, &new.write_fence())
        .await
        .expect("the holder's write");
    // A has its own SET of `k` cached. Outside a lock it may answer that copy until B's
    // invalidation reaches it (the invalidation window, proto-spec.md); under a lock granted on A
    // after B let go, never: the grant's read barrier waits for B's write.
    assert_eq!(new.unlock().await.expect("UNLOCK on B"), LockStatus::Ok);
    let again = c[0]
        .lock("s", lock_options())
        .await
        .expect("LOCK on A again");
    assert!(again.fence() > new_fence);
    assert_eq!(
        c[0].get("k").await.expect("GET under the lock").as_deref(),
        Some(&b"fresh"[..])
    );
    assert_eq!(again.unlock().await.expect("UNLOCK"), LockStatus::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_connection_closes_on_one_daemon_passes_the_lock_to_another_at_once() {
    let redis = RedisServer::start();
    let group = DaemonGroup::start(&redis, 2, &[]);
    let c = clients(&group).await;
    let long = LockOptions {
        ttl: Some(Duration::from_secs(60)),
        wait: Some(Duration::from_secs(20)),
        auto_renew: false,
    };
    // The holder speaks raw frames, so closing its connection is all it does: no UNLOCK on drop.
    let mut holder = group.host(0).raw().await;
    holder
        .request(&Request {
            args: Args {
                key: Some("s".into()),
                ttl_ms: Some(long.ttl.unwrap_or_default().as_millis() as u64),
                ..Args::default()
            },
            ..Request::new(1, CommandName::Lock)
        })
        .await;
    let answer = holder.recv().await.expect("LOCK answered");
    assert!(answer.err.is_none(), "LOCK on A: {:?}", answer.err);
    assert!(
        matches!(
            c[1].try_lock("s", lock_options()).await,
            Err(Error::Locked(_))
        ),
        "B must see the lock held"
    );
    let waiter = {
        let b = c[1].clone();
        tokio::spawn(async move { b.lock("s", lock_options()).await })
    };
    drop(holder);
    // The wait (20 s) is a third of the lease (60 s): a grant at all is a grant long before the
    // lease would have ended.
    let granted = waiter
        .await
        .expect("task")
        .expect("B granted after A's client left");
    assert_eq!(granted.unlock().await.expect("UNLOCK"), LockStatus::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_stopped_gracefully_leaves_none_of_its_locks_in_redis() {
    let redis = RedisServer::start();
    let mut group = DaemonGroup::start(&redis, 2, &[]);
    let c = clients(&group).await;
    let long = LockOptions {
        ttl: Some(Duration::from_secs(60)),
        ..lock_options()
    };
    let _x = c[0].lock("x", long.clone()).await.expect("LOCK x on A");
    let _y = c[0].lock("y", long.clone()).await.expect("LOCK y on A");
    let _z = c[1].lock("z", long).await.expect("LOCK z on B");
    assert_eq!(
        redis.keys("scaled:l:*"),
        ["scaled:l:x", "scaled:l:y", "scaled:l:z"]
    );
    let a: &mut TestDaemon = &mut group.daemons[0];
    a.signal("TERM");
    assert!(a.wait_exit(LIMIT).success(), "A exits cleanly");
    assert_eq!(redis.keys("scaled:l:*"), ["scaled:l:z"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_value_in_redis_is_refused_not_served() {
    let redis = RedisServer::start();
    let group = DaemonGroup::start(&redis, 1, &[]);
    let c = clients(&group).await;
    c[0].set("good", b"value", None).await.expect("SET");
    redis.cmd(&[b"SET", b"scaled:v:bad", b"written by something else"]);
    // A value the daemon wrote, with one byte changed behind its back.
    let mut flipped = redis.get_bytes("scaled:v:good").expect("stored");
    let last = flipped.len() - 1;
    flipped[last] ^= 0x01;
    redis.cmd(&[b"SET", b"scaled:v:flipped", &flipped]);
    for key in ["bad", "flipped"] {
        let got = c[0].get(key).await;
        assert!(matches!(got, Err(Error::Corrupted(_))), "{key}: {got:?}");
    }
    assert_eq!(
        c[0].get("good").await.expect("GET").as_deref(),
        Some(&b"value"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_renew_lock_stays_held_in_redis_past_its_lease() {
    let redis = RedisServer::start();
    let group = DaemonGroup::start(&redis, 2, &[]);
    let c = clients(&group).await;
    let lease = Duration::from_millis(300);
    let held = c[0]
        .lock(
            "s",
            LockOptions {
                ttl: Some(lease),
                wait: Some(LIMIT),
                auto_renew: true,
            },
        )
        .await
        .expect("LOCK on A");
    // Waiting past the lease is the point of the test: several leases, each renewed in Redis.
    tokio::time::sleep(lease * 4).await;
    assert_eq!(
        redis.keys("scaled:l:*"),
        ["scaled:l:s"],
        "still held in Redis"
    );
    let other = c[1].try_lock("s", lock_options()).await;
    assert!(matches!(other, Err(Error::Locked(_))), "B: {other:?}");
    assert_eq!(held.unlock().await.expect("UNLOCK"), LockStatus::Ok);
    assert!(redis.keys("scaled:l:*").is_empty());
}
