//! The Redis link, its scripts and its two subscribers, against real `redis-server` processes started
//! by each test. Two `Link`s on one Redis stand for two daemons on two hosts.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::redis_server::RedisServer;
use scaled::redis::coherence::{Event, Invalidations};
use scaled::redis::scripts::{
    encode_value, Acquire, Adopt, Compare, FenceCheck, Write, RECORD_RETENTION,
};
use scaled::redis::wakeups::Wakeups;
use scaled::redis::{Health, Link, LinkError, RedisSettings};

/// How long a test waits for something that should happen at once before failing.
const LIMIT: Duration = Duration::from_secs(10);

const LEASE: Duration = Duration::from_secs(30);

/// A link to `redis`, waited for until it is up.
async fn link(redis: &RedisServer) -> Link {
    let link = Link::start(RedisSettings::new(redis.url())).expect("settings");
    assert!(link.wait_up(LIMIT).await, "the link never came up");
    link
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as u64
}

fn granted(a: Acquire) -> (u64, u64) {
    match a {
        Acquire::Granted { fence, seq } => (fence, seq),
        other => panic!("not granted: {other:?}"),
    }
}

/// The next coherence event, failing the test if none comes in time.
async fn next(stream: &mut Invalidations) -> Event {
    tokio::time::timeout(LIMIT, stream.recv())
        .await
        .expect("no coherence event in time")
        .expect("stream ended")
}

#[tokio::test]
async fn acquire_excludes_other_owners_and_fences_grow_across_links_and_keys() {
    let redis = RedisServer::start();
    let (a, b) = (link(&redis).await, link(&redis).await);
    let before = now_micros();

    let (f1, _) = granted(
        a.acquire("session:1", "token-a", LEASE, true)
            .await
            .unwrap(),
    );
    assert!(
        f1 >= before,
        "fences live on the clock's scale: {f1} < {before}"
    );
    match b
        .acquire("session:1", "token-b", LEASE, true)
        .await
        .unwrap()
    {
        Acquire::Held { lease_left, .. } => {
            let left = lease_left.expect("the holder has a lease");
            assert!(left <= LEASE && left > LEASE / 2, "lease left {left:?}");
        }
        other => panic!("a second owner was granted: {other:?}"),
    }
    assert_eq!(
        a.release("session:1", "token-a").await.unwrap(),
        Compare::Done
    );
    let (f2, _) = granted(
        b.acquire("session:1", "token-b", LEASE, true)
            .await
            .unwrap(),
    );
    assert!(f2 > f1, "{f2} <= {f1}");
    // One counter for every key, as a standalone daemon has.
    let (f3, _) = granted(
        a.acquire("session:2", "token-c", LEASE, true)
            .await
            .unwrap(),
    );
    assert!(f3 > f2, "{f3} <= {f2}");
    assert_eq!(
        redis.get_bytes("scaled:l:session:1").as_deref(),
        Some(&b"token-b"[..])
    );
}

#[tokio::test]
async fn only_the_owner_releases_or_extends() {
    let redis = RedisServer::start();
    let a = link(&redis).await;
    granted(
        a.acquire("l", "owner", Duration::from_secs(5), true)
            .await
            .unwrap(),
    );

    assert_eq!(
        a.release("l", "intruder").await.unwrap(),
        Compare::OtherHolder
    );
    assert_eq!(
        a.extend("l", "intruder", LEASE).await.unwrap(),
        Compare::OtherHolder
    );
    assert_eq!(
        a.extend("l", "owner", Duration::from_secs(600))
            .await
            .unwrap(),
        Compare::Done
    );
    let pttl: i64 = redis::cmd("PTTL")
        .arg("scaled:l:l")
        .query(&mut redis.connection())
        .unwrap();
    assert!(pttl > 5_000, "EXTEND did not lengthen the lease: {pttl} ms");
    assert_eq!(a.release("l", "owner").await.unwrap(), Compare::Done);
    assert_eq!(a.release("l", "owner").await.unwrap(), Compare::NotHeld);
    assert_eq!(
        a.extend("l", "owner", LEASE).await.unwrap(),
        Compare::NotHeld
    );
    // The newest grant outlives the release by the retention, so late fenced writes are judged.
    let fence_ttl: i64 = redis::cmd("PTTL")
        .arg("scaled:f:l")
        .query(&mut redis.connection())
        .unwrap();
    assert!(
        fence_ttl > 0 && fence_ttl <= RECORD_RETENTION.as_millis() as i64,
        "{fence_ttl}"
    );
    assert_eq!(RECORD_RETENTION, scaled::locks::FENCE_RETENTION);
}

#[tokio::test]
async fn fences_stay_above_the_callers_floor_and_across_restarts_of_caller_and_redis() {
    let mut redis = RedisServer::start();
    let a = link(&redis).await;
    let (f1, _) = granted(a.acquire("l", "t1", LEASE, true).await.unwrap());
    assert_eq!(a.fence_floor(), f1, "a granted fence is noted");
    a.close();

    // A restarted caller knows nothing, and still gets a greater fence.
    let b = link(&redis).await;
    assert_eq!(b.fence_floor(), 0);
    let (f2, _) = granted(b.acquire("other", "t2", LEASE, true).await.unwrap());
    assert!(f2 > f1);

    // A caller whose floor is far ahead (fences it issued while Redis was away) gets above it.
    let floor = f2 + 1_000_000_000;
    b.note_fence(floor);
    let (f3, _) = granted(b.acquire("third", "t3", LEASE, true).await.unwrap());
    assert_eq!(f3, floor + 1);

    // Redis loses everything: its clock still keeps the next fence above all earlier ones, and the
    // connector raises the floor into the new Redis before it reports up.
    redis.kill();
    assert!(b.wait_for(Health::Down, LIMIT).await, "death not noticed");
    redis.restart();
    assert!(b.wait_up(LIMIT).await, "no reconnect");
    let newest: String = redis::cmd("GET")
        .arg("scaled:fence")
        .query(&mut redis.connection())
        .unwrap();
    assert!(
        newest.parse::<u64>().unwrap() >= f3,
        "floor not raised: {newest}"
    );
    let c = link(&redis).await;
    let (f4, _) = granted(c.acquire("l", "t4", LEASE, true).await.unwrap());
    assert!(f4 > f3, "{f4} <= {f3}");
}

#[tokio::test]
async fn a_fenced_write_with_an_old_token_is_refused_and_changes_nothing() {
    let redis = RedisServer::start();
    let (a, b) = (link(&redis).await, link(&redis).await);
    let (fa, _) = granted(a.acquire("session:42", "ta", LEASE, true).await.unwrap());
    let fenced_by = |token| {
        Some(FenceCheck {
            lock: "session:42",
            token,
        })
    };
    let w1 = a.set("cart", b"from a", None, fenced_by(fa)).await.unwrap();
    assert!(matches!(w1, Write::Done { .. }), "{w1:?}");
    a.release("session:42", "ta").await.unwrap();

    let (fb, _) = granted(b.acquire("session:42", "tb", LEASE, true).await.unwrap());
    let seq_before = b.write_seq().await.unwrap();
    assert_eq!(
        a.set("cart", b"late from a", None, fenced_by(fa))
            .await
            .unwrap(),
        Write::Fenced { newest: Some(fb) }
    );
    assert_eq!(
        a.del("cart", fenced_by(fa)).await.unwrap(),
        Write::Fenced { newest: Some(fb) }
    );
    assert_eq!(
        b.write_seq().await.unwrap(),
        seq_before,
        "a refused write bumped the sequence"
    );
    let read = b.read("cart").await.unwrap();
    assert_eq!(read.value.expect("still there").bytes.as_ref(), b"from a");

    // Other tokens never pass either: a newer one, 0, and any token on a lock Redis never granted.
    for token in [fb + 1, 0] {
        assert!(matches!(
            b.set("cart", b"x", None, fenced_by(token)).await.unwrap(),
            Write::Fenced { .. }
        ));
    }
    assert_eq!(
        b.set(
            "cart",
            b"x",
            None,
            Some(FenceCheck {
                lock: "never-granted",
                token: fb
            })
        )
        .await
        .unwrap(),
        Write::Fenced { newest: None }
    );
    assert!(matches!(
        b.set("cart", b"from b", None, fenced_by(fb)).await.unwrap(),
        Write::Done { .. }
    ));
}

#[tokio::test]
async fn writes_bump_one_sequence_and_reads_return_it_with_the_value_and_its_ttl() {
    let redis = RedisServer::start();
    let a = link(&redis).await;
    assert_eq!(a.read("k").await.unwrap().value, None);
    let Write::Done { seq: s1, .. } = a
        .set("k", b"\x00v\xff", Some(Duration::from_secs(60)), None)
        .await
        .unwrap()
    else {
        panic!("unfenced write refused")
    };
    let read = a.read("k").await.unwrap();
    assert_eq!(read.seq, s1);
    let stored = read.value.expect("present");
    assert_eq!(stored.bytes.as_ref(), b"\x00v\xff");
    let ttl = stored.ttl.expect("a TTL");
    assert!(ttl <= Duration::from_secs(60) && ttl > Duration::from_secs(30));
    // The value in Redis is the daemon's format: header, checksum, value.
    assert_eq!(
        redis.get_bytes("scaled:v:k"),
        Some(encode_value(b"\x00v\xff"))
    );

    a.set("forever", b"v", None, None).await.unwrap();
    assert_eq!(a.read("forever").await.unwrap().value.unwrap().ttl, None);

    assert_eq!(
        a.del("k", None).await.unwrap(),
        Write::Done {
            seq: s1 + 2,
            existed: true
        }
    );
    assert_eq!(
        a.del("k", None).await.unwrap(),
        Write::Done {
            seq: s1 + 3,
            existed: false
        }
    );
    let read = a.read("k").await.unwrap();
    assert_eq!((read.seq, read.value), (s1 + 3, None));
}

#[tokio::test]
async fn a_value_whose_checksum_fails_is_never_returned() {
    let redis = RedisServer::start();
    let a = link(&redis).await;
    a.set("k", b"session state", None, None).await.unwrap();
    let mut stored = redis.get_bytes("scaled:v:k").expect("stored");
    let last = stored.len() - 1;
    stored[last] ^= 0x20;
    redis.cmd(&[b"SET", b"scaled:v:k", &stored]);
    match a.read("k").await {
        Err(LinkError::Corrupted { key, reason }) => {
            assert_eq!(key, "k");
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("a corrupted value was read: {other:?}"),
    }
    // Something else's data under the prefix is not in the daemon's format.
    redis.cmd(&[b"SET", b"scaled:v:plain", b"written by another program"]);
    assert!(matches!(
        a.read("plain").await,
        Err(LinkError::Corrupted { .. })
    ));
    // A corrupted value can still be replaced.
    a.set("k", b"fresh", None, None).await.unwrap();
    assert_eq!(
        a.read("k").await.unwrap().value.unwrap().bytes.as_ref(),
        b"fresh"
    );
}

#[tokio::test]
async fn adopting_a_lock_granted_while_redis_was_away() {
    let redis = RedisServer::start();
    let a = link(&redis).await;
    let (f1, _) = granted(a.acquire("l", "first", LEASE, true).await.unwrap());
    a.release("l", "first").await.unwrap();

    // A degraded grant with a fence above f1: adopted, and its fenced writes then pass.
    let degraded = f1 + 500;
    assert!(matches!(
        a.adopt("l", "local", LEASE, degraded).await.unwrap(),
        Adopt::Adopted { .. }
    ));
    assert!(matches!(
        a.set(
            "k",
            b"v",
            None,
            Some(FenceCheck {
                lock: "l",
                token: degraded
            })
        )
        .await
        .unwrap(),
        Write::Done { .. }
    ));
    // Redis's next fence is above the adopted one.
    a.release("l", "local").await.unwrap();
    let (f2, _) = granted(a.acquire("l", "next", LEASE, true).await.unwrap());
    assert!(f2 > degraded);
    // Held by another: lost. Granted a newer fence since: lost.
    assert_eq!(
        a.adopt("l", "stale", LEASE, f2 + 1).await.unwrap(),
        Adopt::OtherHolder
    );
    a.release("l", "next").await.unwrap();
    assert_eq!(
        a.adopt("l", "stale", LEASE, degraded).await.unwrap(),
        Adopt::Superseded { newest: f2 }
    );
}

#[tokio::test]
async fn the_link_goes_down_on_sigkill_and_reconnects_after_restart_keeping_acknowledged_writes() {
    let mut redis = RedisServer::start_persistent();
    let a = link(&redis).await;
    let mut health = a.watch_health();
    a.set("k", b"acknowledged", None, None).await.unwrap();

    redis.kill();
    tokio::time::timeout(LIMIT, health.wait_for(|h| *h == Health::Down))
        .await
        .expect("the link never noticed Redis died")
        .expect("watch");
    assert!(matches!(a.read("k").await, Err(e) if e.is_unavailable()));
    assert!(matches!(
        a.set("k", b"refused", None, None).await,
        Err(e) if e.is_unavailable()
    ));

    redis.restart();
    tokio::time::timeout(LIMIT, health.wait_for(|h| *h == Health::Up))
        .await
        .expect("the link never reconnected")
        .expect("watch");
    // Scripts run again on the new server, and the acknowledged write survived.
    assert_eq!(
        a.read("k").await.unwrap().value.unwrap().bytes.as_ref(),
        b"acknowledged"
    );
    assert!(a.stats().connects >= 2);
    assert!(a.stats().unavailable >= 2);
}

#[tokio::test]
async fn a_link_to_no_redis_is_down_and_fails_at_once() {
    let redis = RedisServer::start();
    let url = redis.url();
    drop(redis);
    let a = Link::start(RedisSettings::new(url)).expect("settings");
    assert!(!a.wait_up(Duration::from_millis(300)).await);
    assert_eq!(a.health(), Health::Down);
    // Down, so never sent: an acquire that needs no release.
    assert!(matches!(
        a.acquire("l", "t", LEASE, true).await,
        Err(LinkError::NotConnected)
    ));
    let too_few = RedisSettings {
        max_connections: 2,
        ..RedisSettings::new("redis://127.0.0.1:1/")
    };
    assert!(matches!(Link::start(too_few), Err(LinkError::Settings(_))));
    assert!(matches!(
        Link::start(RedisSettings::new("not a url")),
        Err(LinkError::Settings(_))
    ));
}

#[tokio::test]
async fn invalidations_arrive_in_order_and_a_flush_comes_first_when_redis_dies() {
    let mut redis = RedisServer::start();
    let (a, b) = (link(&redis).await, link(&redis).await);
    let mut stream = Invalidations::start(&a, 1024);
    assert_eq!(next(&mut stream).await, Event::Synced { seq: 0 });

    for i in 1..=100u64 {
        b.set(&format!("key {i}"), b"v", None, None).await.unwrap();
    }
    b.del("key 7", None).await.unwrap();
    for i in 1..=100u64 {
        assert_eq!(
            next(&mut stream).await,
            Event::Invalidate {
                seq: i,
                key: format!("key {i}")
            }
        );
    }
    assert_eq!(
        next(&mut stream).await,
        Event::Invalidate {
            seq: 101,
            key: "key 7".into()
        }
    );
    assert_eq!(stream.received(), 101);

    redis.kill();
    assert_eq!(
        next(&mut stream).await,
        Event::Flush,
        "no flush when Redis died"
    );
    assert!(b.wait_for(Health::Down, LIMIT).await, "death not noticed");
    redis.restart();
    // This Redis kept nothing, so its sequence starts again from 0.
    assert_eq!(next(&mut stream).await, Event::Synced { seq: 0 });
    assert!(b.wait_up(LIMIT).await);
    b.set("after", b"v", None, None).await.unwrap();
    assert_eq!(
        next(&mut stream).await,
        Event::Invalidate {
            seq: 1,
            key: "after".into()
        }
    );
    assert_eq!(stream.lost(), 1);
}

#[tokio::test]
async fn a_release_on_one_link_wakes_a_watcher_on_another() {
    let redis = RedisServer::start();
    let (a, b) = (link(&redis).await, link(&redis).await);
    let wakeups = Wakeups::start(&b, 16);
    let mut watch = wakeups.watch("session:9").expect("room");
    // The subscription may come up after the watch; its first act wakes every watch. Wait for that,
    // so what follows is woken by the release itself.
    tokio::time::timeout(LIMIT, watch.released())
        .await
        .expect("never subscribed");

    // Nobody waits: the release is not published.
    granted(a.acquire("session:9", "holder", LEASE, true).await.unwrap());
    assert!(matches!(
        b.acquire("session:9", "asker", LEASE, false).await.unwrap(),
        Acquire::Held { .. }
    ));
    a.release("session:9", "holder").await.unwrap();
    assert_eq!(redis.get_bytes("scaled:w:session:9"), None);

    // A refused acquire that will wait marks the lock, and its release is published.
    granted(a.acquire("session:9", "holder", LEASE, true).await.unwrap());
    assert!(matches!(
        b.acquire("session:9", "waiter", LEASE, true).await.unwrap(),
        Acquire::Held { .. }
    ));
    assert!(redis.get_bytes("scaled:w:session:9").is_some());
    a.release("session:9", "holder").await.unwrap();
    tokio::time::timeout(LIMIT, watch.released())
        .await
        .expect("the release never woke the watcher");
    assert_eq!(redis.get_bytes("scaled:w:session:9"), None);
    granted(b.acquire("session:9", "waiter", LEASE, true).await.unwrap());
    assert_eq!(wakeups.received(), 1, "the unwaited release was published");
}

#[tokio::test]
async fn both_subscriptions_outlive_their_heartbeats() {
    let redis = RedisServer::start();
    let (a, b) = (link(&redis).await, link(&redis).await);
    let mut stream = Invalidations::start(&b, 16);
    let wakeups = Wakeups::start(&b, 16);
    assert_eq!(next(&mut stream).await, Event::Synced { seq: 0 });
    // Past two heartbeat PINGs of each subscriber: neither may take its PONG for a lost stream.
    tokio::time::sleep(scaled::redis::HEALTH_CHECK_INTERVAL * 5 / 2).await;
    a.set("k", b"v", None, None).await.unwrap();
    assert_eq!(
        next(&mut stream).await,
        Event::Invalidate {
            seq: 1,
            key: "k".into()
        }
    );
    assert_eq!(stream.lost(), 0);
    assert_eq!(wakeups.lost(), 0);
}

#[tokio::test]
async fn a_redis_that_stops_answering_is_unavailable_after_the_response_timeout() {
    let redis = RedisServer::start();
    let settings = RedisSettings {
        response_timeout: Duration::from_millis(300),
        ..RedisSettings::new(redis.url())
    };
    let a = Link::start(settings).expect("settings");
    assert!(a.wait_up(LIMIT).await);
    let mut stream = Invalidations::start(&a, 16);
    assert_eq!(next(&mut stream).await, Event::Synced { seq: 0 });

    // Hung, not dead: no connection is closed, so only the timeouts can tell.
    redis.pause();
    let call = tokio::time::timeout(LIMIT, a.set("k", b"v", None, None))
        .await
        .expect("the call outlived its response timeout");
    assert!(matches!(call, Err(LinkError::Unavailable(_))), "{call:?}");
    assert_eq!(a.health(), Health::Down);
    // The stream's heartbeat goes unanswered too: the cache must be flushed.
    assert_eq!(next(&mut stream).await, Event::Flush);

    redis.resume();
    assert!(
        a.wait_up(LIMIT).await,
        "no recovery after Redis answered again"
    );
    // The stream is whole again from a known sequence. The call that timed out has an unknown
    // outcome: Redis may still run it once it reads it, and then it is invalidated like any write.
    let Event::Synced { seq } = next(&mut stream).await else {
        panic!("no Synced after recovery");
    };
    let Write::Done { seq: written, .. } = a.set("k2", b"v", None, None).await.unwrap() else {
        panic!("refused");
    };
    assert!(written > seq);
    loop {
        match next(&mut stream).await {
            Event::Invalidate { key, .. } if key == "k" => continue,
            event => {
                assert_eq!(
                    event,
                    Event::Invalidate {
                        seq: written,
                        key: "k2".into()
                    }
                );
                break;
            }
        }
    }
}
