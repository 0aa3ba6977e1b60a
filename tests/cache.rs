//! The cache as a client sees it through the real daemon: TTLs (given, defaulted and disabled), LRU
//! eviction at CACHE_SIZE, DEL, binary values, and the counters and shape STATS reports.

mod common;

use std::time::{Duration, Instant};

use common::TestDaemon;
use scaled_client::proto::{Args, CommandName};
use scaled_client::{Client, Error, Stats, MAX_KEY_LEN, MAX_VALUE_LEN};

/// How long a test waits for an entry to expire before failing.
const EXPIRY_LIMIT: Duration = Duration::from_secs(10);

async fn stats(client: &Client) -> Stats {
    client.stats().await.expect("STATS")
}

/// Polls GET until `key` reads as missing, failing after [`EXPIRY_LIMIT`].
async fn wait_until_gone(client: &Client, key: &str, what: &str) {
    let deadline = Instant::now() + EXPIRY_LIMIT;
    while client.get(key).await.expect("GET").is_some() {
        assert!(
            Instant::now() < deadline,
            "{what}: {key} was still there after {EXPIRY_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn entries_expire_after_their_ttl() {
    let daemon = TestDaemon::start(&[]);
    let client = daemon.client().await;
    assert_eq!(stats(&client).await.cache.expirations, 0);

    client
        .set("ttl:short", b"soon gone", Some(Duration::from_millis(150)))
        .await
        .expect("SET");
    client
        .set("ttl:long", b"stays", Some(Duration::from_secs(3600)))
        .await
        .expect("SET");
    wait_until_gone(&client, "ttl:short", "a 150 ms TTL").await;

    assert_eq!(
        client.get("ttl:long").await.expect("GET").as_deref(),
        Some(&b"stays"[..])
    );
    let s = stats(&client).await;
    assert!(s.cache.expirations >= 1, "no expiration counted: {s:?}");
    assert_eq!(s.cache.size, 1, "only ttl:long should remain: {s:?}");
    // An expired entry is gone for DEL too.
    assert!(!client.del("ttl:short").await.expect("DEL"));
}

#[tokio::test]
async fn cache_ttl_applies_to_a_set_without_ttl_and_ttl_zero_never_expires() {
    let daemon = TestDaemon::start(&["--cache-ttl", "0.2"]);
    let client = daemon.client().await;

    client.set("ttl:default", b"v", None).await.expect("SET");
    client
        .set("ttl:never", b"forever", Some(Duration::ZERO))
        .await
        .expect("SET");
    client
        .set("ttl:explicit", b"an hour", Some(Duration::from_secs(3600)))
        .await
        .expect("SET");
    wait_until_gone(&client, "ttl:default", "CACHE_TTL of 0.2 s").await;

    // It was stored and then expired, not refused.
    let s = stats(&client).await;
    assert!(s.cache.expirations >= 1, "no expiration counted: {s:?}");
    // Both outlived the default TTL.
    assert_eq!(
        client.get("ttl:never").await.expect("GET").as_deref(),
        Some(&b"forever"[..])
    );
    assert_eq!(
        client.get("ttl:explicit").await.expect("GET").as_deref(),
        Some(&b"an hour"[..])
    );
}

#[tokio::test]
async fn ttl_zero_never_expires_under_the_default_ttl_either() {
    let daemon = TestDaemon::start(&[]);
    let client = daemon.client().await;
    client
        .set("ttl:zero", b"kept", Some(Duration::ZERO))
        .await
        .expect("SET");
    // Outlive a short-TTL sibling, so time has certainly passed.
    client
        .set("ttl:blip", b"x", Some(Duration::from_millis(50)))
        .await
        .expect("SET");
    wait_until_gone(&client, "ttl:blip", "a 50 ms TTL").await;
    assert_eq!(
        client.get("ttl:zero").await.expect("GET").as_deref(),
        Some(&b"kept"[..])
    );
}

#[tokio::test]
async fn least_recently_used_entry_is_evicted_at_capacity() {
    let daemon = TestDaemon::start(&["--cache-size", "3"]);
    let client = daemon.client().await;
    for key in ["a", "b", "c"] {
        client.set(key, key.as_bytes(), None).await.expect("SET");
    }
    assert_eq!(
        client.get("a").await.expect("GET").as_deref(),
        Some(&b"a"[..])
    ); // b is now oldest
    client.set("d", b"d", None).await.expect("SET");

    let s = stats(&client).await;
    assert_eq!(s.cache.evictions, 1, "{s:?}");
    assert_eq!(s.cache.size, 3, "{s:?}");
    assert_eq!(s.cache.max_size, 3, "{s:?}");

    assert_eq!(
        client.get("b").await.expect("GET"),
        None,
        "b was least recently used"
    );
    for key in ["a", "c", "d"] {
        assert_eq!(
            client.get(key).await.expect("GET").as_deref(),
            Some(key.as_bytes()),
            "{key} should have survived"
        );
    }
    // Overwriting a present key makes no room and evicts nothing.
    client.set("c", b"c2", None).await.expect("SET");
    let s = stats(&client).await;
    assert_eq!(s.cache.evictions, 1, "{s:?}");
    assert_eq!(s.cache.size, 3, "{s:?}");
}

#[tokio::test]
async fn hits_misses_and_hit_rate_are_counted() {
    let daemon = TestDaemon::start(&[]);
    let client = daemon.client().await;
    let s = stats(&client).await;
    assert_eq!(s.cache.hits, 0);
    assert_eq!(s.cache.misses, 0);
    assert_eq!(s.cache.hit_rate, 0.0, "hit_rate before any GET: {s:?}");

    client.set("k", b"v", None).await.expect("SET");
    client.get("k").await.expect("GET");
    client.get("k").await.expect("GET");
    client.get("nope").await.expect("GET");

    let s = stats(&client).await;
    assert_eq!(s.cache.hits, 2, "{s:?}");
    assert_eq!(s.cache.misses, 1, "{s:?}");
    let rate = s.cache.hit_rate;
    assert!(
        (rate - 66.67).abs() < 0.01,
        "hit_rate is {rate}, not 66.67 (percent of 2 in 3)"
    );
}

#[tokio::test]
async fn del_answers_whether_the_key_was_there() {
    let daemon = TestDaemon::start(&[]);
    let client = daemon.client().await;
    assert!(
        !client.del("del:k").await.expect("DEL"),
        "DEL of a key never set"
    );
    client.set("del:k", b"v", None).await.expect("SET");
    assert!(
        client.del("del:k").await.expect("DEL"),
        "DEL of a present key"
    );
    assert_eq!(client.get("del:k").await.expect("GET"), None);
    assert!(!client.del("del:k").await.expect("DEL"), "second DEL");
}

#[tokio::test]
async fn values_round_trip_byte_for_byte() {
    let daemon = TestDaemon::start(&[]);
    let client = daemon.client().await;

    let every_byte: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    let zeros = vec![0u8; 4096];
    let mut mixed = b"\0head\0\xff\xfe".to_vec();
    mixed.extend_from_slice(&every_byte);
    mixed.extend_from_slice(b"\0\0tail\0");
    for (key, value) in [
        ("bin:every", &every_byte),
        ("bin:zeros", &zeros),
        ("bin:mixed", &mixed),
    ] {
        client.set(key, value, None).await.expect("SET");
        assert_eq!(
            client.get(key).await.expect("GET").as_ref(),
            Some(value),
            "{key}"
        );
    }

    // An empty value is a value, not a missing key.
    client.set("bin:empty", b"", None).await.expect("SET");
    assert_eq!(
        client.get("bin:empty").await.expect("GET"),
        Some(Vec::new())
    );

    // The limits themselves are allowed: a key of MAX_KEY_LEN bytes, a value of MAX_VALUE_LEN bytes.
    let long_key = "k".repeat(MAX_KEY_LEN);
    let big: Vec<u8> = (0..MAX_VALUE_LEN).map(|i| (i % 253) as u8).collect();
    client
        .set(&long_key, &big, None)
        .await
        .expect("SET at the limits");
    assert_eq!(
        client.get(&long_key).await.expect("GET").as_ref(),
        Some(&big)
    );

    // Unicode keys are keys like any other.
    client
        .set("clé:ü:日本", b"unicode", None)
        .await
        .expect("SET");
    assert_eq!(
        client.get("clé:ü:日本").await.expect("GET").as_deref(),
        Some(&b"unicode"[..])
    );
    assert_eq!(client.get("cle:u:日本").await.expect("GET"), None);
}

#[tokio::test]
async fn over_limit_keys_and_values_are_refused_through_the_client() {
    let daemon = TestDaemon::start(&[]);
    let client = daemon.client().await;
    let err = client
        .set(&"k".repeat(MAX_KEY_LEN + 1), b"v", None)
        .await
        .expect_err("long key");
    assert!(matches!(err, Error::TooLarge(_)), "long key: {err:?}");
    let err = client
        .set("big", &vec![1; MAX_VALUE_LEN + 1], None)
        .await
        .expect_err("big value");
    assert!(matches!(err, Error::TooLarge(_)), "big value: {err:?}");
    let err = client.get("").await.expect_err("empty key");
    assert!(matches!(err, Error::BadArgument(_)), "empty key: {err:?}");
    // Nothing was stored, and the connection still works.
    assert_eq!(client.get("big").await.expect("GET"), None);
    assert_eq!(stats(&client).await.cache.size, 0);
}

#[tokio::test]
async fn stats_has_the_seed_shape() {
    let daemon = TestDaemon::start(&["--cache-size", "123"]);
    let client = daemon.client().await;
    client.set("s", b"v", None).await.expect("SET");
    client.get("s").await.expect("GET");
    // The wire document, untyped: the typed decoding would fill a missing member with 0.
    let raw = client
        .call(CommandName::Stats, Args::default())
        .await
        .expect("STATS");
    for name in ["size", "max_size", "hits", "misses"] {
        assert!(raw["cache"][name].is_u64(), "cache.{name} in {raw}");
    }
    assert!(raw["cache"]["hit_rate"].is_f64(), "cache.hit_rate in {raw}");
    for name in [
        "requests_per_second",
        "avg_response_time",
        "p95_response_time",
        "p99_response_time",
    ] {
        let v = raw["performance"][name].as_f64();
        assert!(
            v.is_some_and(|v| v.is_finite() && v >= 0.0),
            "performance.{name} in {raw}"
        );
    }
    assert!(raw["performance"]["total_requests"].is_u64(), "{raw}");
    assert!(
        raw["redis"]["available"].is_bool(),
        "redis.available in {raw}"
    );
    for name in ["current", "total", "refused"] {
        assert!(
            raw["connections"][name].is_u64(),
            "connections.{name} in {raw}"
        );
    }
    assert!(raw["locks"].is_map(), "locks is not a map: {raw}");

    let s = stats(&client).await;
    assert_eq!(s.cache.max_size, 123);
    assert_eq!(s.cache.size, 1);
    // SET and GET at least (HELLO and STATS itself may count too).
    assert!(s.performance.overall.total_requests >= 2, "{s:?}");
    assert!(s.connections.current >= 1, "{s:?}");
}

#[tokio::test]
async fn the_byte_budget_evicts_oldest_first_and_refuses_what_cannot_fit() {
    let daemon = TestDaemon::start(&["--cache-size", "10", "--cache-max-bytes", "100"]);
    let client = daemon.client().await;
    for key in ["k1", "k2", "k3"] {
        client.set(key, &[b'v'; 40], None).await.expect("SET"); // 42 bytes each
    }
    let s = stats(&client).await;
    assert_eq!(s.cache.evictions, 1, "{s:?}");
    assert_eq!(s.cache.bytes, 84, "{s:?}");
    assert_eq!(s.cache.max_bytes, 100, "{s:?}");
    assert_eq!(
        client.get("k1").await.expect("GET"),
        None,
        "k1 was the oldest"
    );
    assert!(client.get("k2").await.expect("GET").is_some());
    assert!(client.get("k3").await.expect("GET").is_some());

    let err = client
        .set("huge", &[0; 100], None)
        .await
        .expect_err("an entry over the whole budget");
    assert!(matches!(err, Error::TooLarge(_)), "{err:?}");
    // Refusing it evicted nothing.
    let s = stats(&client).await;
    assert_eq!(s.cache.size, 2, "{s:?}");
}
