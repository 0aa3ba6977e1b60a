//! The classes of bad input of the README's bad-input table that no other test shows: a request
//! without an `id`, missing arguments and empty keys for every command that takes them, TTLs of 0,
//! negative and absurdly large for every command that takes a duration, a stranger's or a garbage
//! UNLOCK token, the daemon-wide waiting limit, and an answer over the buffer budget. Each answer is
//! checked for its code, its id and whether the connection stays open (a PING on the same connection
//! answers after it).

mod common;

use common::{RawConn, TestDaemon};
use scaled_client::proto::Response;

fn s(text: &str) -> rmpv::Value {
    rmpv::Value::from(text)
}

/// A request body from its envelope members.
fn body(members: Vec<(&str, rmpv::Value)>) -> Vec<u8> {
    let map = rmpv::Value::Map(members.into_iter().map(|(k, v)| (s(k), v)).collect());
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &map).expect("encode into a Vec");
    out
}

/// A request `{id, cmd, args}`.
fn request(id: u64, cmd: &str, args: Vec<(&str, rmpv::Value)>) -> Vec<u8> {
    let args = rmpv::Value::Map(args.into_iter().map(|(k, v)| (s(k), v)).collect());
    body(vec![("id", id.into()), ("cmd", s(cmd)), ("args", args)])
}

/// Sends `body` and returns the answer, failing the test if the connection closes instead.
async fn call(conn: &mut RawConn, body: &[u8]) -> Response {
    conn.send(body).await;
    conn.recv()
        .await
        .expect("the connection closed instead of answering")
}

/// Asserts the answer is error `code` under `id`.
fn assert_err(answer: &Response, id: u64, code: &str) {
    let err = answer
        .err
        .as_ref()
        .unwrap_or_else(|| panic!("expected {code} for id {id}, got ok {}", answer.ok));
    assert_eq!(
        (answer.id, err.code.as_str()),
        (id, code),
        "message: {}",
        err.message
    );
}

/// Asserts the connection is still open and serving: a PING on it is answered.
async fn assert_open(conn: &mut RawConn, id: u64) {
    let pong = call(conn, &request(id, "PING", vec![])).await;
    assert!(pong.err.is_none(), "PING after a bad input: {:?}", pong.err);
    assert_eq!((pong.id, pong.ok), (id, s("PONG")));
}

#[tokio::test]
async fn missing_members_get_malformed_or_bad_argument_and_the_connection_stays_open() {
    let daemon = TestDaemon::start(&[]);
    let mut conn = daemon.raw().await;

    // No `id`: the answer can belong to no request, so it carries id 0.
    let answer = call(&mut conn, &body(vec![("cmd", s("PING"))])).await;
    assert_err(&answer, 0, "MALFORMED");
    assert_eq!(
        answer.elapsed_us, 0,
        "an answer to no request takes no time"
    );
    // No `cmd`: the id was readable, so the answer carries it.
    let answer = call(&mut conn, &body(vec![("id", 2.into())])).await;
    assert_err(&answer, 2, "MALFORMED");
    assert_open(&mut conn, 3).await;

    // A missing required argument is the command's to answer: BAD_ARGUMENT under the request's id.
    let key = || ("key", s("k"));
    let token = || ("token", s("5f0c8a1e-2b7d-4c39-a6e4-1d9b3f7c2e80"));
    let cases: Vec<(&str, Vec<(&str, rmpv::Value)>)> = vec![
        ("GET", vec![]),
        ("SET", vec![key()]),
        ("SET", vec![("value", rmpv::Value::Binary(vec![1]))]),
        ("DEL", vec![]),
        ("LOCK", vec![]),
        ("UNLOCK", vec![key()]),
        ("UNLOCK", vec![token()]),
        ("EXTEND", vec![key()]),
        ("EXTEND", vec![token()]),
        ("HELLO", vec![("client", s("no version"))]),
    ];
    for (n, (cmd, args)) in cases.into_iter().enumerate() {
        let id = 10 + n as u64;
        let answer = call(&mut conn, &request(id, cmd, args)).await;
        assert_err(&answer, id, "BAD_ARGUMENT");
    }
    // A fence needs both of its members: without one it is not a fence, so the request is MALFORMED.
    let half_fence = rmpv::Value::Map(vec![(s("lock"), s("k"))]);
    let answer = call(
        &mut conn,
        &request(
            30,
            "SET",
            vec![
                key(),
                ("value", rmpv::Value::Binary(vec![1])),
                ("fence", half_fence),
            ],
        ),
    )
    .await;
    assert_err(&answer, 30, "MALFORMED");
    assert_open(&mut conn, 31).await;
}

#[tokio::test]
async fn an_empty_key_is_a_bad_argument_for_every_command_that_takes_one() {
    let daemon = TestDaemon::start(&[]);
    let mut conn = daemon.raw().await;
    let empty = || ("key", s(""));
    let value = || ("value", rmpv::Value::Binary(vec![1]));
    let token = || ("token", s("5f0c8a1e-2b7d-4c39-a6e4-1d9b3f7c2e80"));
    let empty_fence = rmpv::Value::Map(vec![(s("lock"), s("")), (s("token"), 1.into())]);
    let cases: Vec<(&str, Vec<(&str, rmpv::Value)>)> = vec![
        ("GET", vec![empty()]),
        ("SET", vec![empty(), value()]),
        ("DEL", vec![empty()]),
        ("LOCK", vec![empty()]),
        ("UNLOCK", vec![empty(), token()]),
        ("EXTEND", vec![empty(), token()]),
        (
            "SET",
            vec![("key", s("k")), value(), ("fence", empty_fence.clone())],
        ),
        ("DEL", vec![("key", s("k")), ("fence", empty_fence)]),
    ];
    for (n, (cmd, args)) in cases.into_iter().enumerate() {
        let id = 1 + n as u64;
        let answer = call(&mut conn, &request(id, cmd, args)).await;
        assert_err(&answer, id, "BAD_ARGUMENT");
    }
    assert_open(&mut conn, 100).await;
    // Nothing was stored under the empty key, or locked.
    let locks = call(&mut conn, &request(101, "LOCKS", vec![])).await;
    assert_eq!(locks.ok.as_array().map(Vec::len), Some(0), "{:?}", locks.ok);
}

#[tokio::test]
async fn ttls_of_zero_negative_and_absurd_size_get_their_answers() {
    let daemon = TestDaemon::start(&[]);
    let mut conn = daemon.raw().await;
    let value = |v: &[u8]| ("value", rmpv::Value::Binary(v.to_vec()));

    // SET: 0 is "never expires", the largest uint is accepted too (it will not expire either), and
    // a negative one is not a uint at all.
    for (id, key, ttl) in [(1u64, "ttl:zero", 0u64), (2, "ttl:max", u64::MAX)] {
        let answer = call(
            &mut conn,
            &request(
                id,
                "SET",
                vec![
                    ("key", s(key)),
                    value(key.as_bytes()),
                    ("ttl_ms", ttl.into()),
                ],
            ),
        )
        .await;
        assert!(answer.err.is_none(), "SET ttl_ms {ttl}: {:?}", answer.err);
        let got = call(&mut conn, &request(id + 10, "GET", vec![("key", s(key))])).await;
        assert_eq!(
            got.ok,
            rmpv::Value::Binary(key.as_bytes().to_vec()),
            "SET with ttl_ms {ttl} did not store"
        );
    }
    let answer = call(
        &mut conn,
        &request(
            3,
            "SET",
            vec![("key", s("ttl:neg")), value(b"x"), ("ttl_ms", (-1).into())],
        ),
    )
    .await;
    assert_err(&answer, 3, "MALFORMED");

    // LOCK and EXTEND: a lease (and LOCK's wait) must be 1 to 86400000 ms; PING's delay at most 60000.
    let grant = call(
        &mut conn,
        &request(
            4,
            "LOCK",
            vec![("key", s("ttl:lock")), ("ttl_ms", 60_000.into())],
        ),
    )
    .await;
    assert!(grant.err.is_none(), "LOCK: {:?}", grant.err);
    let token = grant.ok["token"].as_str().expect("a token").to_string();
    let over = 86_400_001u64;
    for (n, (cmd, member, ms)) in [
        ("LOCK", "ttl_ms", 0u64),
        ("LOCK", "ttl_ms", over),
        ("LOCK", "ttl_ms", u64::MAX),
        ("LOCK", "wait_ms", over),
        ("LOCK", "wait_ms", u64::MAX),
        ("EXTEND", "ttl_ms", 0),
        ("EXTEND", "ttl_ms", over),
        ("EXTEND", "ttl_ms", u64::MAX),
        ("PING", "delay_ms", 60_001),
        ("PING", "delay_ms", u64::MAX),
    ]
    .into_iter()
    .enumerate()
    {
        let id = 20 + n as u64;
        let mut args = vec![(member, rmpv::Value::from(ms))];
        if cmd != "PING" {
            args.push(("key", s("ttl:other")));
        }
        if cmd == "EXTEND" {
            args[1] = ("key", s("ttl:lock"));
            args.push(("token", s(&token)));
        }
        let answer = call(&mut conn, &request(id, cmd, args)).await;
        assert_err(&answer, id, "BAD_ARGUMENT");
    }
    for (id, cmd) in [(40u64, "LOCK"), (41, "EXTEND")] {
        let args = vec![
            ("key", s("ttl:lock")),
            ("token", s(&token)),
            ("ttl_ms", (-1).into()),
        ];
        let answer = call(&mut conn, &request(id, cmd, args)).await;
        assert_err(&answer, id, "MALFORMED");
    }
    // None of the refused EXTENDs touched the lease.
    let locks = call(&mut conn, &request(50, "LOCKS", vec![])).await;
    let row = &locks.ok[0];
    assert_eq!(row["key"].as_str(), Some("ttl:lock"));
    let left = row["ttl_ms"].as_u64().expect("a lease left");
    assert!(
        left > 0 && left <= 60_000,
        "the lease is {left} ms after refused EXTENDs"
    );
    assert_open(&mut conn, 51).await;
}

#[tokio::test]
async fn an_unlock_with_a_wrong_token_changes_nothing() {
    let daemon = TestDaemon::start(&[]);
    let mut holder = daemon.raw().await;
    let mut stranger = daemon.raw().await;
    let grant = call(
        &mut holder,
        &request(1, "LOCK", vec![("key", s("wrong:token"))]),
    )
    .await;
    let token = grant.ok["token"].as_str().expect("a token").to_string();

    // A well-formed stranger's token, garbage, a token of the right shape but one character off, and
    // the right token for another key: all answered with a status, none releases the lock.
    let mut off = token.clone().into_bytes();
    off[0] = if off[0] == b'a' { b'b' } else { b'a' };
    let off = String::from_utf8(off).expect("ASCII");
    for (n, (key, token)) in [
        ("wrong:token", "5f0c8a1e-2b7d-4c39-a6e4-1d9b3f7c2e80"),
        ("wrong:token", "not a token at all"),
        ("wrong:token", off.as_str()),
        ("wrong:other", token.as_str()),
    ]
    .into_iter()
    .enumerate()
    {
        let id = 10 + n as u64;
        let answer = call(
            &mut stranger,
            &request(id, "UNLOCK", vec![("key", s(key)), ("token", s(token))]),
        )
        .await;
        assert!(
            answer.err.is_none(),
            "UNLOCK is answered with a status: {:?}",
            answer.err
        );
        let expected = if key == "wrong:token" {
            "NOT_OWNER"
        } else {
            "NOT_LOCKED"
        };
        assert_eq!(
            answer.ok["status"].as_str(),
            Some(expected),
            "token {token:?} on {key}"
        );
    }
    // The holder still holds it.
    let tried = call(
        &mut stranger,
        &request(
            20,
            "LOCK",
            vec![("key", s("wrong:token")), ("try", true.into())],
        ),
    )
    .await;
    assert_err(&tried, 20, "LOCKED");
    let answer = call(
        &mut holder,
        &request(
            2,
            "UNLOCK",
            vec![("key", s("wrong:token")), ("token", s(&token))],
        ),
    )
    .await;
    assert_eq!(answer.ok["status"].as_str(), Some("OK"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_wide_waiting_limit_refuses_one_more_wait_with_its_id() {
    let daemon = TestDaemon::start(&["--max-waiting", "2"]);
    let mut first = daemon.raw().await;
    let mut second = daemon.raw().await;
    let delayed = |id: u64| request(id, "PING", vec![("delay_ms", 60_000.into())]);
    // Two long waits, one per connection, fill the daemon's two places. A PING answered at once on
    // the first connection shows its wait has been taken (frames run in order).
    first.send(&delayed(1)).await;
    assert_open(&mut first, 2).await;
    second.send(&delayed(3)).await;
    assert_open(&mut second, 4).await;
    // A third connection's wait is refused under its own id, at once, and its connection goes on.
    let mut third = daemon.raw().await;
    let refused = call(&mut third, &delayed(5)).await;
    assert_err(&refused, 5, "OVERLOADED");
    assert!(
        refused
            .err
            .as_ref()
            .is_some_and(|e| e.message.contains("SCALED_MAX_WAITING")),
        "the message names the limit: {:?}",
        refused.err
    );
    assert_open(&mut third, 6).await;
    // When a waiting connection goes, its place is free again: a new wait is taken (the PING after
    // it is answered first, with no OVERLOADED before it).
    drop(first);
    let deadline = std::time::Instant::now() + common::STARTUP_LIMIT;
    for round in 0u64.. {
        let (wait_id, ping_id) = (100 + 2 * round, 101 + 2 * round);
        third.send(&delayed(wait_id)).await;
        third.send(&request(ping_id, "PING", vec![])).await;
        let answer = third.recv().await.expect("an answer");
        if answer.id == ping_id {
            assert!(answer.err.is_none(), "{:?}", answer.err);
            break;
        }
        assert_err(&answer, wait_id, "OVERLOADED");
        let pong = third.recv().await.expect("the PING's answer");
        assert_eq!(pong.id, ping_id);
        assert!(
            std::time::Instant::now() < deadline,
            "the closed connection's place never came back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_ttl_with_redis_is_stored_and_does_not_degrade_the_daemon() {
    let redis = common::redis_server::RedisServer::start();
    let daemon = TestDaemon::start(&["--redis-url", &redis.url()]);
    let mut conn = daemon.raw().await;
    // Wait until the daemon has reached Redis: a SET answered without `degraded`.
    let deadline = std::time::Instant::now() + common::STARTUP_LIMIT;
    for id in 1u64.. {
        let answer = call(
            &mut conn,
            &request(id, "SET", vec![("key", s("up")), ("value", s("1"))]),
        )
        .await;
        if answer.err.is_none() && !answer.degraded {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon never reached Redis: {answer:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The largest uint as a SET's TTL is more than Redis can represent, so it is stored without
    // expiry rather than passed on for Redis to refuse (which once answered INTERNAL); the longest
    // TTL kept as one, 2^62 ms, is one Redis takes.
    for (n, ttl) in [u64::MAX, (1 << 62) + 1, 1 << 62].into_iter().enumerate() {
        let (id, key) = (100_000 + 2 * n as u64, format!("ttl:{ttl}"));
        let set = vec![("key", s(&key)), ("value", s("v")), ("ttl_ms", ttl.into())];
        let answer = call(&mut conn, &request(id, "SET", set)).await;
        assert!(
            answer.err.is_none() && !answer.degraded,
            "SET with ttl_ms {ttl}: {answer:?}"
        );
        let got = call(&mut conn, &request(id + 1, "GET", vec![("key", s(&key))])).await;
        assert_eq!(got.ok, rmpv::Value::Binary(b"v".to_vec()), "{got:?}");
        assert!(!got.degraded, "{got:?}");
    }
}

#[tokio::test]
async fn an_answer_over_the_buffer_budget_is_overloaded_and_the_connection_goes_on() {
    // A 256 KiB budget, and 300 locks with 1000-byte keys held: the LOCKS page listing them all is
    // about 350 KiB, more than the budget, though every request that made it was small.
    let daemon = TestDaemon::start(&["--max-buffer-bytes", "262144"]);
    let mut conn = daemon.raw().await;
    let locks = 300u64;
    for n in 0..locks {
        let key = format!("{n:04}:{}", "k".repeat(995));
        conn.send(&request(n + 1, "LOCK", vec![("key", s(&key))]))
            .await;
    }
    for _ in 0..locks {
        let grant = conn.recv().await.expect("a LOCK answer");
        assert!(grant.err.is_none(), "LOCK: {:?}", grant.err);
    }
    let id = 1_000;
    let answer = call(
        &mut conn,
        &request(id, "LOCKS", vec![("limit", 1000.into())]),
    )
    .await;
    assert_err(&answer, id, "OVERLOADED");
    assert!(
        answer
            .err
            .as_ref()
            .is_some_and(|e| e.message.contains("SCALED_MAX_BUFFER_BYTES")),
        "the message names the budget: {:?}",
        answer.err
    );
    // The connection goes on, and a page that fits is answered.
    let page = call(
        &mut conn,
        &request(id + 1, "LOCKS", vec![("limit", 10.into())]),
    )
    .await;
    assert!(page.err.is_none(), "{:?}", page.err);
    assert_eq!(page.ok["locks"].as_array().map(Vec::len), Some(10));
    assert_eq!(page.ok["total"].as_u64(), Some(locks));
    assert_open(&mut conn, id + 2).await;
}
