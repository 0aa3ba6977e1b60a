//! Redis failures, with real `redis-server` processes the tests start, kill, pause and restart: the
//! daemons keep answering while Redis is gone, with every answer marked `degraded`, and recover by
//! themselves; no acknowledged write is lost, no lock is granted twice once Redis is back,
//! `--lock-fallback fail` refuses locks, and a lock lost behind its holder's back answers `LOCK_LOST`.
//! proto-spec.md, "Degraded answers", "Fencing tokens with Redis" and "Lost locks", says what is
//! expected.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::daemon_group::DaemonGroup;
use common::redis_server::RedisServer;
use scaled_client::proto::{Args, CommandName, Response};
use scaled_client::{Client, Error, LockOptions};
use tokio::sync::Mutex;
use tokio::time::Instant;

/// How long a test waits for something that should happen soon before failing.
const LIMIT: Duration = Duration::from_secs(15);

/// Polls `check` every 10 ms until it holds, failing with `what` after [`LIMIT`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + LIMIT;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within {LIMIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the daemon says Redis is available.
async fn wait_available(client: &Client) {
    eventually("the daemon reaches Redis", || async {
        client.stats().await.expect("STATS").redis.available
    })
    .await;
}

/// One request, answered with its whole envelope (so `degraded` can be seen).
async fn exchange(client: &Client, cmd: CommandName, args: Args) -> Response {
    client.exchange(cmd, args).await.expect("an answer")
}

fn key_args(key: &str) -> Args {
    Args {
        key: Some(key.into()),
        ..Args::default()
    }
}

fn set_args(key: &str, value: &[u8]) -> Args {
    Args {
        value: Some(value.to_vec()),
        ttl_ms: Some(0),
        ..key_args(key)
    }
}

fn lock_args(key: &str, ttl_ms: u64, wait_ms: u64, auto_renew: bool) -> Args {
    Args {
        ttl_ms: Some(ttl_ms),
        wait_ms: Some(wait_ms),
        auto_renew: Some(auto_renew),
        ..key_args(key)
    }
}

fn token_args(key: &str, token: &str) -> Args {
    Args {
        token: Some(token.into()),
        ..key_args(key)
    }
}

/// A member of a map answer.
fn member<'a>(ok: &'a rmpv::Value, name: &str) -> &'a rmpv::Value {
    ok.as_map()
        .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some(name)))
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no `{name}` in {ok:?}"))
}

/// A LOCK grant's (owner token, fence).
fn grant(response: &Response) -> (String, u64) {
    assert!(response.err.is_none(), "LOCK failed: {:?}", response.err);
    let token = member(&response.ok, "token")
        .as_str()
        .expect("token")
        .to_string();
    let fence = member(&response.ok, "fence").as_u64().expect("fence");
    (token, fence)
}

fn code(response: &Response) -> Option<&str> {
    response.err.as_ref().map(|e| e.code.as_str())
}

/// What one daemon's load saw.
#[derive(Default)]
struct Seen {
    /// Keys (and their values) whose SET was answered OK.
    acked: Vec<(String, Vec<u8>)>,
    /// Answers marked degraded.
    degraded: usize,
    /// SETs answered OK after the first degraded answer.
    acked_after_outage: usize,
}

/// SETs of fresh keys and LOCK/UNLOCK pairs on `client` until `stop`, recording what was answered.
async fn load(client: Client, host: usize, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) {
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let key = format!("k:{host}:{i}");
        let value = format!("v{i}").into_bytes();
        let set = exchange(&client, CommandName::Set, set_args(&key, &value)).await;
        {
            let mut s = seen.lock().await;
            s.degraded += usize::from(set.degraded);
            match code(&set) {
                None => {
                    assert!(!set.degraded, "an acknowledged SET was made without Redis");
                    if s.degraded > 0 {
                        s.acked_after_outage += 1;
                    }
                    s.acked.push((key, value));
                }
                Some("UNAVAILABLE") => assert!(set.degraded, "UNAVAILABLE not marked degraded"),
                Some(other) => panic!("SET answered {other}: {:?}", set.err),
            }
        }
        let lock_key = format!("lk:{host}");
        let lock = exchange(
            &client,
            CommandName::Lock,
            lock_args(&lock_key, 5_000, 3_000, false),
        )
        .await;
        seen.lock().await.degraded += usize::from(lock.degraded);
        match code(&lock) {
            None => {
                let (token, _) = grant(&lock);
                let unlock =
                    exchange(&client, CommandName::Unlock, token_args(&lock_key, &token)).await;
                seen.lock().await.degraded += usize::from(unlock.degraded);
                assert!(
                    matches!(code(&unlock), None | Some("UNAVAILABLE")),
                    "UNLOCK answered {:?}",
                    unlock.err
                );
            }
            // A LOCK whose acquire was cut off by the kill.
            Some("UNAVAILABLE") => assert!(lock.degraded),
            Some(other) => panic!("LOCK answered {other}: {:?}", lock.err),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_load_degrades_recovers_and_loses_no_acknowledged_write() {
    let mut redis = RedisServer::start_persistent();
    let group = DaemonGroup::start(&redis, 2, &[]);
    let mut clients = Vec::new();
    for d in &group.daemons {
        let c = d.client().await;
        wait_available(&c).await;
        clients.push(c);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Vec<_> = (0..2)
        .map(|_| Arc::new(Mutex::new(Seen::default())))
        .collect();
    let tasks: Vec<_> = (0..2)
        .map(|h| tokio::spawn(load(clients[h].clone(), h, stop.clone(), seen[h].clone())))
        .collect();

    eventually(
        "both daemons acknowledge writes before the kill",
        || async {
            seen[0].lock().await.acked.len() >= 20 && seen[1].lock().await.acked.len() >= 20
        },
    )
    .await;
    redis.kill();
    eventually(
        "both daemons answer degraded while Redis is gone",
        || async { seen[0].lock().await.degraded > 0 && seen[1].lock().await.degraded > 0 },
    )
    .await;
    for c in &clients {
        let stats = exchange(c, CommandName::Stats, Args::default()).await;
        assert!(
            stats.degraded,
            "STATS while Redis is gone is marked degraded"
        );
        assert!(!c.stats().await.expect("STATS").redis.available);
    }
    redis.restart();
    for c in &clients {
        wait_available(c).await;
    }
    eventually(
        "both daemons acknowledge writes again after the restart",
        || async {
            seen[0].lock().await.acked_after_outage >= 20
                && seen[1].lock().await.acked_after_outage >= 20
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("load task");
    }

    // No acknowledged write is lost: each is readable, with its value, from both daemons.
    for s in &seen {
        for (key, value) in &s.lock().await.acked {
            for c in &clients {
                let got = exchange(c, CommandName::Get, key_args(key)).await;
                assert!(
                    got.err.is_none() && !got.degraded,
                    "GET {key}: {:?}",
                    got.err
                );
                assert_eq!(
                    got.ok.as_slice(),
                    Some(value.as_slice()),
                    "the acknowledged write of {key} is lost"
                );
            }
        }
    }
    for c in &clients {
        let r = c.stats().await.expect("STATS").redis;
        assert!(r.connects >= 2, "the daemon reconnected: {r:?}");
        assert!(r.unavailable >= 1, "failed calls are counted: {r:?}");
        assert!(r.degraded_seconds > 0.0, "the outage is counted: {r:?}");
    }

    // Once Redis is back no lock is granted twice: two daemons contend, one holder at a time,
    // fences strictly increasing in grant order.
    let inside = Arc::new(AtomicUsize::new(0));
    let fences = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for c in &clients {
        for _ in 0..2 {
            let (c, inside, fences) = (c.clone(), inside.clone(), fences.clone());
            workers.push(tokio::spawn(async move {
                for _ in 0..15 {
                    let lock = exchange(
                        &c,
                        CommandName::Lock,
                        lock_args("contended", 10_000, 10_000, false),
                    )
                    .await;
                    assert!(!lock.degraded, "a grant with Redis back is not degraded");
                    let (token, fence) = grant(&lock);
                    assert_eq!(
                        inside.fetch_add(1, Ordering::SeqCst),
                        0,
                        "two holders at once"
                    );
                    fences.lock().await.push(fence);
                    tokio::task::yield_now().await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                    let unlock =
                        exchange(&c, CommandName::Unlock, token_args("contended", &token)).await;
                    assert!(unlock.err.is_none(), "UNLOCK: {:?}", unlock.err);
                }
            }));
        }
    }
    for w in workers {
        w.await.expect("contending worker");
    }
    let fences = fences.lock().await;
    assert_eq!(fences.len(), 60);
    assert!(
        fences.windows(2).all(|w| w[0] < w[1]),
        "fences do not strictly increase: {fences:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_fallback_fail_refuses_locks_while_redis_is_gone() {
    let mut redis = RedisServer::start();
    let group = DaemonGroup::start(&redis, 1, &["--lock-fallback", "fail"]);
    let c = group.host(0).client().await;
    wait_available(&c).await;
    let before = exchange(&c, CommandName::Lock, lock_args("l", 5_000, 1_000, false)).await;
    assert!(!before.degraded);
    grant(&before);
    redis.kill();
    eventually("the daemon notices Redis is gone", || async {
        !c.stats().await.expect("STATS").redis.available
    })
    .await;

    let lock = exchange(
        &c,
        CommandName::Lock,
        lock_args("other", 5_000, 1_000, false),
    )
    .await;
    assert_eq!(code(&lock), Some("UNAVAILABLE"), "LOCK: {lock:?}");
    assert!(lock.degraded);
    let set = exchange(&c, CommandName::Set, set_args("k", b"v")).await;
    assert_eq!(code(&set), Some("UNAVAILABLE"));
    assert!(set.degraded);
    let get = exchange(&c, CommandName::Get, key_args("k")).await;
    assert_eq!(code(&get), Some("UNAVAILABLE"));
    assert!(get.degraded);
    let ping = exchange(&c, CommandName::Ping, Args::default()).await;
    assert!(ping.err.is_none() && ping.degraded, "PING: {ping:?}");
    assert!(matches!(
        c.try_lock("third", LockOptions::default()).await,
        Err(Error::Unavailable(_))
    ));

    redis.restart();
    wait_available(&c).await;
    let after = exchange(
        &c,
        CommandName::Lock,
        lock_args("other", 5_000, 1_000, false),
    )
    .await;
    assert!(!after.degraded);
    grant(&after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_fallback_grants_degraded_locks_and_adopts_them_when_redis_is_back() {
    let mut redis = RedisServer::start();
    let group = DaemonGroup::start(&redis, 1, &[]);
    let c = group.host(0).client().await;
    wait_available(&c).await;
    let (token, redis_fence) =
        grant(&exchange(&c, CommandName::Lock, lock_args("a", 5_000, 1_000, false)).await);
    assert!(exchange(&c, CommandName::Unlock, token_args("a", &token))
        .await
        .err
        .is_none());
    redis.kill();
    eventually("the daemon notices Redis is gone", || async {
        !c.stats().await.expect("STATS").redis.available
    })
    .await;

    // Granted from the local table, marked degraded, with a fence above Redis's.
    let first = exchange(&c, CommandName::Lock, lock_args("a", 60_000, 1_000, false)).await;
    assert!(first.degraded);
    let (t1, f1) = grant(&first);
    assert!(f1 > redis_fence, "{f1} is not above Redis's {redis_fence}");
    // Exclusion holds among this daemon's clients.
    let busy = exchange(&c, CommandName::Lock, lock_args("a", 60_000, 100, false)).await;
    assert_eq!(code(&busy), Some("LOCK_TIMEOUT"));
    assert!(busy.degraded);
    // UNLOCK and EXTEND act locally.
    let extend = exchange(&c, CommandName::Extend, token_args("a", &t1)).await;
    assert!(
        extend.err.is_none() && extend.degraded,
        "EXTEND: {extend:?}"
    );
    let unlock = exchange(&c, CommandName::Unlock, token_args("a", &t1)).await;
    assert!(
        unlock.err.is_none() && unlock.degraded,
        "UNLOCK: {unlock:?}"
    );
    assert_eq!(member(&unlock.ok, "status").as_str(), Some("OK"));
    let held = exchange(&c, CommandName::Lock, lock_args("a", 60_000, 1_000, false)).await;
    let (t2, f2) = grant(&held);
    assert!(f2 > f1);

    // Back: the lock held through the outage is adopted with its own token and fence, and Redis's
    // next fences are above it.
    redis.restart();
    wait_available(&c).await;
    eventually("the degraded grant is adopted into Redis", || async {
        redis.get_bytes("scaled:l:a").as_deref() == Some(t2.as_bytes())
    })
    .await;
    assert_eq!(
        redis.get_bytes("scaled:f:a"),
        Some(f2.to_string().into_bytes())
    );
    let unlock = exchange(&c, CommandName::Unlock, token_args("a", &t2)).await;
    assert!(
        unlock.err.is_none() && !unlock.degraded,
        "UNLOCK after adoption: {unlock:?}"
    );
    assert_eq!(member(&unlock.ok, "status").as_str(), Some("OK"));
    let (_, f3) =
        grant(&exchange(&c, CommandName::Lock, lock_args("b", 5_000, 1_000, false)).await);
    assert!(f3 > f2, "Redis's fence {f3} is not above the degraded {f2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_lost_behind_its_holders_back_answers_lock_lost() {
    let redis = RedisServer::start();
    let group = DaemonGroup::start(&redis, 1, &[]);
    let c = group.host(0).client().await;
    wait_available(&c).await;
    let (token, _) =
        grant(&exchange(&c, CommandName::Lock, lock_args("s", 300, 1_000, true)).await);
    // Someone takes the lock in Redis behind the daemon's back: the next renewal is refused.
    redis.cmd(&[b"SET", b"scaled:l:s", b"someone-else"]);
    eventually("the refused renewal is counted", || async {
        c.stats().await.expect("STATS").redis.renewals_failed >= 1
    })
    .await;
    let unlock = exchange(&c, CommandName::Unlock, token_args("s", &token)).await;
    assert_eq!(code(&unlock), Some("LOCK_LOST"), "UNLOCK: {unlock:?}");
    let extend = exchange(&c, CommandName::Extend, token_args("s", &token)).await;
    assert_eq!(code(&extend), Some("LOCK_LOST"), "EXTEND: {extend:?}");
    let r = c.stats().await.expect("STATS").redis;
    assert_eq!(r.locks_lost, 1, "{r:?}");
    assert_eq!(r.renewals_failed, 1, "{r:?}");
}
