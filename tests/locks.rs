//! Session locks through the real daemon: mutual exclusion, FIFO grants, try and wait timeouts, every
//! UNLOCK and EXTEND status, fencing tokens and fenced writes, release on disconnect (holder and
//! waiter), lease expiry and auto-renew. Each test starts its own daemon, so STATS counters are exact.
//! Tests wait for events (a grant, a STATS counter, a LOCKS row) with a bound, never for a fixed time,
//! except where time passing is itself what is shown (a lease outliving its first deadline).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{RawConn, TestDaemon};
use scaled_client::answers::LockStats;
use scaled_client::proto::{Args, CommandName, Fence, Request};
use scaled_client::{Client, Endpoint, Error, Grant, LockGuard, LockInfo, LockOptions, LockStatus};

/// How long a test waits for an event (a grant, a counter, a listing) before failing.
const EVENT_LIMIT: Duration = Duration::from_secs(10);

/// A wait in the queue far longer than any test, so only the event under test ends it.
const LONG_WAIT: Duration = Duration::from_secs(60);

/// A lease far longer than any test, so only the event under test ends it.
const LONG_LEASE: Duration = Duration::from_secs(60);

/// A lease short enough to run out during a test.
const SHORT_LEASE: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------------------------------
// Helpers

/// STATS `locks`.
async fn lock_stats(client: &Client) -> LockStats {
    client.stats().await.expect("STATS").locks
}

/// Polls STATS until the `locks` figure `pick` chooses equals `want`, failing after [`EVENT_LIMIT`].
async fn wait_for_stat(client: &Client, pick: fn(&LockStats) -> u64, want: u64) {
    let deadline = Instant::now() + EVENT_LIMIT;
    loop {
        let stats = lock_stats(client).await;
        if pick(&stats) == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "STATS locks was still {stats:?}, not {want} where awaited, after {EVENT_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The LOCKS row for `key`, if it is held.
async fn lock_row(client: &Client, key: &str) -> Option<LockInfo> {
    let listing = client.locks().await.expect("LOCKS");
    listing.into_iter().find(|r| r.key == key)
}

/// Polls LOCKS until `key` is no longer listed, failing after [`EVENT_LIMIT`].
async fn wait_until_free(client: &Client, key: &str, what: &str) {
    let deadline = Instant::now() + EVENT_LIMIT;
    while let Some(row) = lock_row(client, key).await {
        assert!(
            Instant::now() < deadline,
            "{what}: `{key}` still held after {EVENT_LIMIT:?}: {row:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A client on its own connection, whose locks show in LOCKS as owned by `name#<conn>`.
async fn named_client(daemon: &TestDaemon, name: &str) -> Client {
    Client::connect(Endpoint::Unix(daemon.socket.clone()), name)
        .await
        .expect("connect")
}

fn opts(ttl: Duration, wait: Duration) -> LockOptions {
    LockOptions {
        ttl: Some(ttl),
        wait: Some(wait),
        auto_renew: false,
    }
}

/// Awaits a spawned lock attempt, failing if it does not finish within [`EVENT_LIMIT`].
async fn granted_within(
    handle: tokio::task::JoinHandle<scaled_client::Result<LockGuard>>,
    what: &str,
) -> LockGuard {
    tokio::time::timeout(EVENT_LIMIT, handle)
        .await
        .unwrap_or_else(|_| panic!("{what}: not granted within {EVENT_LIMIT:?}"))
        .expect("lock task panicked")
        .unwrap_or_else(|e| panic!("{what}: LOCK failed: {e}"))
}

fn lock_request(id: u64, key: &str, ttl: Duration, wait: Duration, auto_renew: bool) -> Request {
    Request {
        args: Args {
            key: Some(key.into()),
            ttl_ms: Some(ttl.as_millis() as u64),
            wait_ms: Some(wait.as_millis() as u64),
            auto_renew: auto_renew.then_some(true),
            ..Args::default()
        },
        ..Request::new(id, CommandName::Lock)
    }
}

fn unlock_request(id: u64, key: &str, token: &str) -> Request {
    Request {
        args: Args {
            key: Some(key.into()),
            token: Some(token.into()),
            ..Args::default()
        },
        ..Request::new(id, CommandName::Unlock)
    }
}

/// A grant read off a raw connection: (owner token, fencing token).
fn grant_of(response: &scaled_client::proto::Response) -> (String, u64) {
    assert!(
        response.err.is_none(),
        "request {} failed: {:?}",
        response.id,
        response.err
    );
    let grant: Grant = rmpv::ext::from_value(response.ok.clone()).expect("a grant");
    (grant.token, grant.fence)
}

/// Takes `key` on a raw connection (granted at once, or the test fails) and returns the grant.
async fn raw_lock(conn: &mut RawConn, key: &str, ttl: Duration, auto_renew: bool) -> (String, u64) {
    conn.request(&lock_request(1, key, ttl, LONG_WAIT, auto_renew))
        .await;
    let response = conn.recv().await.expect("daemon closed the connection");
    assert_eq!(response.id, 1);
    grant_of(&response)
}

// ---------------------------------------------------------------------------------------------------
// 1. Mutual exclusion

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_makes_read_modify_write_exclusive() {
    const CONNECTIONS: usize = 5;
    const TASKS: usize = 200;
    const INCREMENTS: usize = 10_000;
    const KEY: &str = "excl:lock";
    const COUNTER: &str = "excl:counter";

    let daemon = TestDaemon::start(&[]);
    let mut clients = Vec::new();
    for i in 0..CONNECTIONS {
        clients.push(named_client(&daemon, &format!("inc{i}")).await);
    }
    clients[0]
        .set(COUNTER, b"0", Some(Duration::ZERO))
        .await
        .expect("SET");

    // Seen from the tasks themselves: how many hold the lock now, and whether two ever did at once.
    let inside = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(AtomicUsize::new(0));
    // (counter value read under the lock, fencing token of that grant)
    let seen = Arc::new(Mutex::new(Vec::with_capacity(INCREMENTS)));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let client = clients[t % CONNECTIONS].clone();
        let (inside, overlaps, seen) = (inside.clone(), overlaps.clone(), seen.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..INCREMENTS / TASKS {
                let guard = client
                    .lock(KEY, opts(Duration::from_secs(30), LONG_WAIT))
                    .await
                    .expect("LOCK");
                if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                    overlaps.fetch_add(1, Ordering::SeqCst);
                }
                let value = client.get(COUNTER).await.expect("GET").expect("counter");
                let n: u64 = std::str::from_utf8(&value)
                    .expect("utf-8")
                    .parse()
                    .expect("a number");
                client
                    .set(
                        COUNTER,
                        (n + 1).to_string().as_bytes(),
                        Some(Duration::ZERO),
                    )
                    .await
                    .expect("SET");
                seen.lock().unwrap().push((n, guard.fence()));
                inside.fetch_sub(1, Ordering::SeqCst);
                assert_eq!(guard.unlock().await.expect("UNLOCK"), LockStatus::Ok);
            }
        }));
    }
    for task in tasks {
        task.await.expect("an incrementing task failed");
    }

    let value = clients[0]
        .get(COUNTER)
        .await
        .expect("GET")
        .expect("counter");
    assert_eq!(
        std::str::from_utf8(&value).unwrap(),
        INCREMENTS.to_string(),
        "lost updates"
    );
    assert_eq!(overlaps.load(Ordering::SeqCst), 0, "two holders at once");

    // Every value 0..INCREMENTS was read exactly once, and later reads held later grants.
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_unstable();
    for (i, pair) in seen.iter().enumerate() {
        assert_eq!(pair.0, i as u64, "counter values read: {:?}", &seen[..=i]);
    }
    assert!(
        seen.windows(2).all(|w| w[0].1 < w[1].1),
        "fencing tokens do not increase with the counter"
    );

    let stats = clients[0].stats().await.expect("STATS");
    let locks = &stats.locks;
    assert_eq!(locks.grants, INCREMENTS as u64);
    assert_eq!(locks.requests, INCREMENTS as u64);
    assert_eq!(locks.timeouts, 0);
    assert_eq!(locks.expiries, 0);
    assert_eq!(locks.held, 0);
    assert_eq!(locks.waiters, 0);
}

// ---------------------------------------------------------------------------------------------------
// 2. FIFO grants

/// Waiters on separate connections, each confirmed queued (STATS locks.waiters) before the next is
/// sent, are granted in exactly the order they queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_on_separate_connections_are_granted_in_arrival_order() {
    const WAITERS: usize = 8;
    const KEY: &str = "fifo:conns";
    let daemon = TestDaemon::start(&[]);
    let holder = named_client(&daemon, "holder").await;
    let held = holder
        .lock(KEY, opts(LONG_LEASE, LONG_WAIT))
        .await
        .expect("LOCK");

    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..WAITERS {
        let client = named_client(&daemon, &format!("waiter{i}")).await;
        let order = order.clone();
        tasks.push(tokio::spawn(async move {
            let guard = client
                .lock(KEY, opts(LONG_LEASE, LONG_WAIT))
                .await
                .expect("LOCK");
            // Recorded before the release, so the next grant can only come after this entry.
            order.lock().unwrap().push((i, guard.fence()));
            assert_eq!(guard.unlock().await.expect("UNLOCK"), LockStatus::Ok);
        }));
        wait_for_stat(&holder, |l| l.waiters, i as u64 + 1).await;
    }
    let row = lock_row(&holder, KEY).await.expect("held");
    assert_eq!(row.waiters, WAITERS as u64);
    assert!(row.owner.starts_with("holder#"), "{row:?}");

    assert_eq!(held.unlock().await.expect("UNLOCK"), LockStatus::Ok);
    for task in tasks {
        tokio::time::timeout(EVENT_LIMIT, task)
            .await
            .expect("waiters not all granted in time")
            .expect("waiter task failed");
    }
    let order = order.lock().unwrap().clone();
    let indices: Vec<usize> = order.iter().map(|(i, _)| *i).collect();
    assert_eq!(indices, (0..WAITERS).collect::<Vec<_>>(), "grant order");
    assert!(
        order.windows(2).all(|w| w[0].1 < w[1].1),
        "fences not increasing in grant order: {order:?}"
    );
    let stats = holder.stats().await.expect("STATS");
    let locks = &stats.locks;
    assert_eq!(locks.grants, WAITERS as u64 + 1);
    assert_eq!(locks.waiters, 0);
}

/// LOCKs pipelined on one connection queue in the order of their frames and are granted in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_pipelined_on_one_connection_are_granted_in_frame_order() {
    const WAITERS: u64 = 10;
    const KEY: &str = "fifo:pipelined";
    let daemon = TestDaemon::start(&[]);
    let holder = daemon.client().await;
    let held = holder
        .lock(KEY, opts(LONG_LEASE, LONG_WAIT))
        .await
        .expect("LOCK");

    let mut conn = daemon.raw().await;
    // All LOCKs in one write; ids 1..=WAITERS in frame order.
    let mut bytes = Vec::new();
    for id in 1..=WAITERS {
        let body = lock_request(id, KEY, LONG_LEASE, LONG_WAIT, false).to_msgpack();
        scaled_client::frame::push_frame(&mut bytes, &body);
    }
    conn.send_bytes(&bytes).await;
    wait_for_stat(&holder, |l| l.waiters, WAITERS).await;

    assert_eq!(held.unlock().await.expect("UNLOCK"), LockStatus::Ok);
    let mut grants = Vec::new();
    let mut unlocked = 0;
    while unlocked < WAITERS {
        let response = conn.recv().await.expect("daemon closed the connection");
        if response.id > 1000 {
            assert_eq!(
                response.ok["status"].as_str(),
                Some("OK"),
                "UNLOCK {}",
                response.id
            );
            unlocked += 1;
            continue;
        }
        let (token, fence) = grant_of(&response);
        grants.push((response.id, fence));
        // The next grant can only follow this UNLOCK, so grants arrive in the order they were made.
        conn.request(&unlock_request(1000 + response.id, KEY, &token))
            .await;
    }
    let ids: Vec<u64> = grants.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, (1..=WAITERS).collect::<Vec<_>>(), "grant order");
    assert!(
        grants.windows(2).all(|w| w[0].1 < w[1].1),
        "fences: {grants:?}"
    );
}

// ---------------------------------------------------------------------------------------------------
// 3. Try-lock and wait timeout

#[tokio::test]
async fn try_lock_is_refused_and_a_wait_times_out() {
    const KEY: &str = "busy";
    let daemon = TestDaemon::start(&[]);
    let holder = named_client(&daemon, "holder").await;
    let other = named_client(&daemon, "other").await;
    let held = holder
        .lock(KEY, opts(LONG_LEASE, LONG_WAIT))
        .await
        .expect("LOCK");
    assert_eq!(lock_stats(&other).await.refused, 0);
    assert_eq!(lock_stats(&other).await.timeouts, 0);

    match other.try_lock(KEY, LockOptions::default()).await {
        Err(Error::Locked(_)) => {}
        Err(e) => panic!("try_lock on a held lock: {e}"),
        Ok(_) => panic!("try_lock on a held lock was granted"),
    }
    assert_eq!(lock_stats(&other).await.refused, 1);

    // wait_ms 0 on the wire is try mode too.
    let refused = other
        .call(
            CommandName::Lock,
            Args {
                key: Some(KEY.into()),
                wait_ms: Some(0),
                ..Args::default()
            },
        )
        .await;
    assert!(matches!(refused, Err(Error::Locked(_))), "{refused:?}");
    assert_eq!(lock_stats(&other).await.refused, 2);

    match other
        .lock(KEY, opts(LONG_LEASE, Duration::from_millis(200)))
        .await
    {
        Err(Error::LockTimeout(_)) => {}
        Err(e) => panic!("lock with a short wait on a held lock: {e}"),
        Ok(_) => panic!("lock with a short wait on a held lock was granted"),
    }
    let stats = other.stats().await.expect("STATS");
    let locks = &stats.locks;
    assert_eq!(locks.timeouts, 1);
    assert_eq!(locks.refused, 2);
    assert_eq!(locks.waiters, 0, "the timed-out wait left");
    assert_eq!(locks.grants, 1);

    // The holder was never disturbed, and a free lock is granted to a try.
    assert_eq!(held.unlock().await.expect("UNLOCK"), LockStatus::Ok);
    let got = other
        .try_lock(KEY, LockOptions::default())
        .await
        .expect("try_lock on a free lock");
    assert_eq!(got.unlock().await.expect("UNLOCK"), LockStatus::Ok);
}

// ---------------------------------------------------------------------------------------------------
// 4. UNLOCK and EXTEND statuses

#[tokio::test]
async fn unlock_answers_each_status() {
    let daemon = TestDaemon::start(&[]);
    let a = named_client(&daemon, "a").await;
    let b = named_client(&daemon, "b").await;
    let garbage = "not-a-token";
    let stranger = "6f1c7a52-0b9e-4a5e-9d1c-2f4f9a0e8b11";

    // NOT_LOCKED: a key never locked, with any token.
    assert_eq!(
        a.unlock("never", garbage).await.unwrap(),
        LockStatus::NotLocked
    );
    assert_eq!(
        a.unlock("never", stranger).await.unwrap(),
        LockStatus::NotLocked
    );

    // OK, then NOT_LOCKED for the same token once released.
    let first = a
        .lock("u", opts(LONG_LEASE, LONG_WAIT))
        .await
        .expect("LOCK");
    let first_token = first.token().to_string();
    assert_eq!(first.unlock().await.unwrap(), LockStatus::Ok);
    assert_eq!(
        a.unlock("u", &first_token).await.unwrap(),
        LockStatus::NotLocked
    );

    // NOT_OWNER: someone else holds it; an old token, a stranger's, or garbage do not release it.
    let second = b
        .lock("u", opts(LONG_LEASE, LONG_WAIT))
        .await
        .expect("LOCK");
    for token in [first_token.as_str(), stranger, garbage, ""] {
        assert_eq!(
            a.unlock("u", token).await.unwrap(),
            LockStatus::NotOwner,
            "token {token:?}"
        );
    }
    let row = lock_row(&a, "u").await.expect("still held by b");
    assert_eq!(row.fence, second.fence());
    assert!(row.owner.starts_with("b#"), "{row:?}");
    assert_eq!(second.unlock().await.unwrap(), LockStatus::Ok);

    // EXPIRED: the lease ran out (seen in LOCKS) before UNLOCK.
    let short = a
        .lock("u", opts(SHORT_LEASE, LONG_WAIT))
        .await
        .expect("LOCK");
    wait_until_free(&a, "u", "a 200 ms lease").await;
    assert_eq!(lock_stats(&a).await.expiries, 1);
    assert_eq!(short.unlock().await.unwrap(), LockStatus::Expired);

    // EXPIRED, not NOT_OWNER, even when the lease ran out and a waiter already has the lock.
    let short = a
        .lock("u", opts(SHORT_LEASE, LONG_WAIT))
        .await
        .expect("LOCK");
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.lock("u", opts(LONG_LEASE, LONG_WAIT)).await })
    };
    let next = granted_within(waiter, "waiter after the lease ran out").await;
    assert!(next.fence() > short.fence());
    assert_eq!(short.unlock().await.unwrap(), LockStatus::Expired);
    assert_eq!(
        lock_row(&a, "u").await.map(|r| r.fence),
        Some(next.fence()),
        "the late UNLOCK released the new holder's lock"
    );
    assert_eq!(next.unlock().await.unwrap(), LockStatus::Ok);
    assert_eq!(lock_stats(&a).await.expiries, 2);
}

#[tokio::test]
async fn extend_answers_each_status_and_really_extends() {
    let daemon = TestDaemon::start(&[]);
    let a = named_client(&daemon, "a").await;
    let b = named_client(&daemon, "b").await;

    // NOT_LOCKED: unknown key.
    assert_eq!(
        a.extend("never", "6f1c7a52-0b9e-4a5e-9d1c-2f4f9a0e8b11", LONG_LEASE)
            .await
            .unwrap(),
        LockStatus::NotLocked
    );

    // OK on a live lease, and the lease really is longer: past the first deadline it is still held.
    let held = a
        .lock("e", opts(SHORT_LEASE, LONG_WAIT))
        .await
        .expect("LOCK");
    let extended_to = Duration::from_secs(10);
    assert_eq!(held.extend(extended_to).await.unwrap(), LockStatus::Ok);
    let row = lock_row(&a, "e").await.expect("held");
    assert!(
        row.ttl_ms > SHORT_LEASE.as_millis() as u64 * 5,
        "lease left after EXTEND: {row:?}"
    );
    // Time passing is the point here: well past the original 200 ms deadline.
    tokio::time::sleep(SHORT_LEASE * 3).await;
    assert!(
        matches!(
            b.try_lock("e", LockOptions::default()).await,
            Err(Error::Locked(_))
        ),
        "the lock was free after its original lease, though extended"
    );
    assert_eq!(lock_stats(&a).await.expiries, 0);

    // NOT_OWNER: a foreign lease (a token of the same lock's previous grant, and one of another lock).
    let other = b
        .lock("e2", opts(LONG_LEASE, LONG_WAIT))
        .await
        .expect("LOCK");
    assert_eq!(
        b.extend("e", other.token(), LONG_LEASE).await.unwrap(),
        LockStatus::NotOwner
    );
    let old_token = held.token().to_string();
    assert_eq!(held.unlock().await.unwrap(), LockStatus::Ok);
    let newer = b
        .lock("e", opts(LONG_LEASE, LONG_WAIT))
        .await
        .expect("LOCK");
    assert_eq!(
        a.extend("e", &old_token, LONG_LEASE).await.unwrap(),
        LockStatus::NotOwner
    );
    assert_eq!(newer.unlock().await.unwrap(), LockStatus::Ok);
    assert_eq!(other.unlock().await.unwrap(), LockStatus::Ok);

    // EXPIRED: the lease ran out first; EXTEND does not bring it back.
    let short = a
        .lock("e", opts(SHORT_LEASE, LONG_WAIT))
        .await
        .expect("LOCK");
    wait_until_free(&a, "e", "a 200 ms lease").await;
    assert_eq!(short.extend(LONG_LEASE).await.unwrap(), LockStatus::Expired);
    assert!(lock_row(&a, "e").await.is_none(), "EXTEND revived a lease");
    assert_eq!(lock_stats(&a).await.expiries, 1);
}

// ---------------------------------------------------------------------------------------------------
// 5. Fencing tokens

#[tokio::test]
async fn fencing_tokens_increase_and_stale_fenced_writes_are_refused() {
    const LOCK: &str = "fence:lock";
    const DATA: &str = "fence:data";
    let daemon = TestDaemon::start(&[]);
    let a = named_client(&daemon, "a").await;
    let b = named_client(&daemon, "b").await;

    // Successive grants of a key, by release.
    let mut fences = Vec::new();
    for i in 0..5 {
        let client = if i % 2 == 0 { &a } else { &b };
        let guard = client
            .lock(LOCK, opts(LONG_LEASE, LONG_WAIT))
            .await
            .expect("LOCK");
        fences.push(guard.fence());
        assert_eq!(guard.unlock().await.unwrap(), LockStatus::Ok);
    }
    assert!(fences[0] > 0);
    assert!(fences.windows(2).all(|w| w[0] < w[1]), "{fences:?}");

    // And across a lease expiry: the old holder is paused past its lease while the next one writes.
    let old = a
        .lock(LOCK, opts(SHORT_LEASE, LONG_WAIT))
        .await
        .expect("LOCK");
    assert!(old.fence() > *fences.last().unwrap());
    a.set_fenced(DATA, b"old holder, in time", None, &old.write_fence())
        .await
        .expect("fenced SET with the current token");
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.lock(LOCK, opts(LONG_LEASE, LONG_WAIT)).await })
    };
    let new = granted_within(waiter, "waiter after the lease ran out").await;
    assert!(new.fence() > old.fence());
    b.set_fenced(DATA, b"new holder", None, &new.write_fence())
        .await
        .expect("fenced SET with the current token");

    // The old holder wakes up and writes: refused, and nothing changes.
    let late = a
        .set_fenced(DATA, b"old holder, late", None, &old.write_fence())
        .await;
    assert!(matches!(late, Err(Error::Fenced(_))), "{late:?}");
    assert_eq!(
        a.get(DATA).await.unwrap().as_deref(),
        Some(&b"new holder"[..])
    );
    let late = a.del_fenced(DATA, &old.write_fence()).await;
    assert!(matches!(late, Err(Error::Fenced(_))), "{late:?}");
    assert_eq!(
        a.get(DATA).await.unwrap().as_deref(),
        Some(&b"new holder"[..])
    );

    // Tokens that were never granted are refused too: 0, one from the future, an unknown lock.
    for fence in [
        Fence {
            lock: LOCK.into(),
            token: 0,
        },
        Fence {
            lock: LOCK.into(),
            token: new.fence() + 1,
        },
        Fence {
            lock: "fence:never-locked".into(),
            token: new.fence(),
        },
    ] {
        let refused = a.set_fenced(DATA, b"forged", None, &fence).await;
        assert!(matches!(refused, Err(Error::Fenced(_))), "{fence:?}");
    }
    assert_eq!(
        a.get(DATA).await.unwrap().as_deref(),
        Some(&b"new holder"[..])
    );

    // The current holder's fenced DEL goes through.
    assert!(b.del_fenced(DATA, &new.write_fence()).await.unwrap());
    assert_eq!(a.get(DATA).await.unwrap(), None);
    let (new_fence, new_write_fence) = (new.fence(), new.write_fence());
    assert_eq!(old.unlock().await.unwrap(), LockStatus::Expired);
    assert_eq!(new.unlock().await.unwrap(), LockStatus::Ok);

    // A holder that released is fenced out by the next grant.
    let next = a
        .lock(LOCK, opts(LONG_LEASE, LONG_WAIT))
        .await
        .expect("LOCK");
    assert!(next.fence() > new_fence);
    let stale = b.set_fenced(DATA, b"stale", None, &new_write_fence).await;
    assert!(matches!(stale, Err(Error::Fenced(_))), "{stale:?}");
    assert_eq!(a.get(DATA).await.unwrap(), None);
    assert_eq!(next.unlock().await.unwrap(), LockStatus::Ok);
}

// ---------------------------------------------------------------------------------------------------
// 6 and 7. Connections that close

/// A holder whose connection closes frees the lock at once: the waiter is granted long before the
/// holder's 60 s lease would have run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_holder_connection_frees_its_lock_for_the_next_waiter() {
    const KEY: &str = "drop:holder";
    let daemon = TestDaemon::start(&[]);
    let observer = daemon.client().await;

    let mut holder = daemon.raw().await;
    let (_, holder_fence) = raw_lock(&mut holder, KEY, LONG_LEASE, false).await;

    let waiter_client = named_client(&daemon, "waiter").await;
    let waiter =
        tokio::spawn(async move { waiter_client.lock(KEY, opts(LONG_LEASE, LONG_WAIT)).await });
    wait_for_stat(&observer, |l| l.waiters, 1).await;

    drop(holder);
    let guard = granted_within(waiter, "waiter after the holder's connection closed").await;
    assert!(guard.fence() > holder_fence);
    let row = lock_row(&observer, KEY).await.expect("held by the waiter");
    assert!(row.owner.starts_with("waiter#"), "{row:?}");
    let stats = observer.stats().await.expect("STATS");
    let locks = &stats.locks;
    assert_eq!(locks.released_on_disconnect, 1);
    assert_eq!(locks.expiries, 0);
    assert_eq!(locks.grants, 2);
    assert_eq!(guard.unlock().await.unwrap(), LockStatus::Ok);
}

/// A waiter whose connection closes leaves the queue and is never granted: the lock passes over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_waiter_connection_is_never_granted() {
    const KEY: &str = "drop:waiter";
    let daemon = TestDaemon::start(&[]);
    let holder = named_client(&daemon, "holder").await;
    let held = holder
        .lock(KEY, opts(LONG_LEASE, LONG_WAIT))
        .await
        .expect("LOCK");

    // W1 queues on a raw connection (owner "raw#<conn>"), then W2 on another.
    let mut w1 = daemon.raw().await;
    w1.request(&lock_request(1, KEY, LONG_LEASE, LONG_WAIT, false))
        .await;
    wait_for_stat(&holder, |l| l.waiters, 1).await;
    let w2_client = named_client(&daemon, "w2").await;
    let w2 = tokio::spawn(async move { w2_client.lock(KEY, opts(LONG_LEASE, LONG_WAIT)).await });
    wait_for_stat(&holder, |l| l.waiters, 2).await;

    // W1 goes away; the daemon takes it out of the queue.
    drop(w1);
    wait_for_stat(&holder, |l| l.waiters, 1).await;

    let held_fence = held.fence();
    assert_eq!(held.unlock().await.unwrap(), LockStatus::Ok);
    let guard = granted_within(w2, "W2 after the holder released").await;
    let row = lock_row(&holder, KEY).await.expect("held by W2");
    assert!(row.owner.starts_with("w2#"), "{row:?}");
    assert_eq!(row.fence, guard.fence());
    assert_eq!(row.waiters, 0);
    let stats = holder.stats().await.expect("STATS");
    let locks = &stats.locks;
    // The holder's grant and W2's: none ever went to W1.
    assert_eq!(locks.grants, 2);
    assert_eq!(locks.released_on_disconnect, 0);
    assert_eq!(locks.waiters, 0);
    // Fences come one per grant from one counter: W2's is the very next after the holder's.
    assert_eq!(
        guard.fence(),
        held_fence + 1,
        "a grant was made between the holder's and W2's"
    );
    assert_eq!(guard.unlock().await.unwrap(), LockStatus::Ok);
}

/// A caller that gives up on `lock()` while its LOCK is still queued (its future dropped, its
/// connection open) does not end up holding the lock: the client gives the late grant back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_lock_call_gives_its_late_grant_back() {
    const KEY: &str = "cancelled";
    let daemon = TestDaemon::start(&[]);
    let holder = named_client(&daemon, "holder").await;
    let held = holder
        .lock(KEY, opts(LONG_LEASE, LONG_WAIT))
        .await
        .expect("LOCK");

    let waiter = named_client(&daemon, "waiter").await;
    let attempt = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.lock(KEY, opts(LONG_LEASE, LONG_WAIT)).await })
    };
    wait_for_stat(&holder, |l| l.waiters, 1).await;
    attempt.abort();
    assert!(
        matches!(attempt.await, Err(e) if e.is_cancelled()),
        "the lock() call was not cancelled"
    );
    // The daemon cannot know: the LOCK stays queued on the open connection.
    assert_eq!(lock_stats(&holder).await.waiters, 1);

    assert_eq!(held.unlock().await.unwrap(), LockStatus::Ok);
    // The daemon grants the queued LOCK; the waiter's client answers it with an UNLOCK.
    wait_for_stat(&holder, |l| l.grants, 2).await;
    wait_until_free(&holder, KEY, "a grant nobody was waiting for").await;
    let stats = holder.stats().await.expect("STATS");
    let locks = &stats.locks;
    assert_eq!(locks.released_on_disconnect, 0);
    assert_eq!(locks.expiries, 0);
    let again = waiter
        .try_lock(KEY, LockOptions::default())
        .await
        .expect("try_lock after the grant was given back");
    assert_eq!(again.unlock().await.unwrap(), LockStatus::Ok);
}

// ---------------------------------------------------------------------------------------------------
// 8. Lease expiry

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_passes_the_lock_to_the_next_waiter() {
    const KEY: &str = "expiry";
    let daemon = TestDaemon::start(&[]);
    let a = named_client(&daemon, "a").await;
    let b_client = named_client(&daemon, "b").await;
    assert_eq!(lock_stats(&a).await.expiries, 0);

    let first = a
        .lock(KEY, opts(SHORT_LEASE, LONG_WAIT))
        .await
        .expect("LOCK");
    let waiter = tokio::spawn(async move { b_client.lock(KEY, opts(LONG_LEASE, LONG_WAIT)).await });
    let second = granted_within(waiter, "waiter after a 200 ms lease").await;
    assert!(second.fence() > first.fence());

    let stats = a.stats().await.expect("STATS");
    let locks = &stats.locks;
    assert_eq!(locks.expiries, 1);
    assert_eq!(locks.grants, 2);
    assert_eq!(locks.released_on_disconnect, 0);
    let row = lock_row(&a, KEY).await.expect("held by b");
    assert!(row.owner.starts_with("b#"), "{row:?}");
    assert_eq!(first.unlock().await.unwrap(), LockStatus::Expired);
    assert_eq!(second.unlock().await.unwrap(), LockStatus::Ok);
}

// ---------------------------------------------------------------------------------------------------
// 9. Auto-renew

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_renew_keeps_the_lock_while_the_holder_lives() {
    const KEY: &str = "renew";
    let lease = Duration::from_millis(300);
    let observe_for = Duration::from_millis(1500);
    let daemon = TestDaemon::start(&[]);
    let other = named_client(&daemon, "other").await;

    let mut holder = daemon.raw().await;
    let (_, fence) = raw_lock(&mut holder, KEY, lease, true).await;
    let granted = Instant::now();

    // For five leases' time, the lock stays held by the same grant and nobody else can take it.
    let mut checks = 0;
    while granted.elapsed() < observe_for {
        let row = lock_row(&other, KEY)
            .await
            .unwrap_or_else(|| panic!("auto-renew lock free after {:?}", granted.elapsed()));
        assert_eq!(row.fence, fence, "{row:?}");
        assert!(row.auto_renew, "{row:?}");
        match other.try_lock(KEY, LockOptions::default()).await {
            Err(Error::Locked(_)) => {}
            Err(e) => panic!("try_lock after {:?}: {e}", granted.elapsed()),
            Ok(_) => panic!("try_lock granted after {:?}", granted.elapsed()),
        }
        checks += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(checks > 1);
    let row = lock_row(&other, KEY).await.expect("still held");
    assert_eq!(row.fence, fence);
    assert!(
        row.age_ms >= observe_for.as_millis() as u64,
        "held for less than the observation: {row:?}"
    );
    let stats = other.stats().await.expect("STATS");
    let locks = &stats.locks;
    assert!(locks.renewals >= 1, "{locks:?}");
    assert_eq!(locks.expiries, 0);

    // The holder's connection closes: the lock is released at once, not renewed on.
    drop(holder);
    wait_until_free(&other, KEY, "auto-renew lock after its connection closed").await;
    let stats = other.stats().await.expect("STATS");
    let locks = &stats.locks;
    assert_eq!(locks.released_on_disconnect, 1);
    assert_eq!(locks.expiries, 0);
    let next = other
        .try_lock(KEY, LockOptions::default())
        .await
        .expect("try_lock after the holder left");
    assert!(next.fence() > fence);
    assert_eq!(next.unlock().await.unwrap(), LockStatus::Ok);
}
