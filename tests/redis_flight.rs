//! Single flight: concurrent GETs of one key on one daemon share one Redis read, counted by Redis's
//! own `INFO commandstats`, against a real `redis-server` each test starts.
//!
//! Redis is held still (SIGSTOP) while the GETs arrive, so that every one of them is waiting while
//! the first read is still out; a PING after each connection's GETs, answered in order, proves the
//! daemon has taken them all before Redis is let go.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::daemon_group::DaemonGroup;
use common::redis_server::RedisServer;
use common::RawConn;
use scaled_client::frame::push_frame;
use scaled_client::proto::{Args, CommandName, Request};

/// How long a test waits for something that should happen soon before failing.
const LIMIT: Duration = Duration::from_secs(10);

/// Connections the GETs come on, and GETs on each.
const CONNECTIONS: usize = 5;
const PER_CONNECTION: usize = 10;

/// The command the read script runs as, as INFO commandstats names it.
const READ_COMMAND: &str = "evalsha";

/// Starts a daemon on `redis` whose Redis calls outlast the test's stop of Redis, and waits until it
/// reaches Redis.
async fn daemon(redis: &RedisServer) -> DaemonGroup {
    DaemonGroup::start_available(redis, 1, &["--redis-response-timeout", "60"]).await
}

/// GETs of `key(c, i)` for i in 0..PER_CONNECTION on each of CONNECTIONS connections, sent while
/// Redis is stopped; answers each GET's value, by connection and id.
async fn concurrent_gets(
    group: &DaemonGroup,
    redis: &RedisServer,
    key: impl Fn(usize, usize) -> String,
) -> Vec<HashMap<u64, Option<Vec<u8>>>> {
    let mut conns: Vec<RawConn> = Vec::new();
    for _ in 0..CONNECTIONS {
        conns.push(group.host(0).raw().await);
    }
    redis.reset_stats();
    redis.pause();
    for (c, conn) in conns.iter_mut().enumerate() {
        let mut bytes = Vec::new();
        for i in 0..PER_CONNECTION {
            let get = Request {
                args: Args {
                    key: Some(key(c, i)),
                    ..Args::default()
                },
                ..Request::new(i as u64 + 1, CommandName::Get)
            };
            push_frame(&mut bytes, &get.to_msgpack());
        }
        push_frame(
            &mut bytes,
            &Request::new(u64::MAX, CommandName::Ping).to_msgpack(),
        );
        conn.send_bytes(&bytes).await;
        // The PING is answered at once and in order, so its answer means every GET before it has
        // been taken and is waiting on the stopped Redis.
        let pong = conn.recv().await.expect("PING answered");
        assert_eq!(
            pong.id,
            u64::MAX,
            "a GET was answered while Redis was stopped"
        );
    }
    redis.resume();
    let mut answers = Vec::new();
    for conn in &mut conns {
        let mut got = HashMap::new();
        while got.len() < PER_CONNECTION {
            let r = tokio::time::timeout(LIMIT, conn.recv())
                .await
                .expect("GET answered in time")
                .expect("connection open");
            assert!(r.err.is_none(), "GET {}: {:?}", r.id, r.err);
            got.insert(r.id, r.ok.as_slice().map(<[u8]>::to_vec));
        }
        answers.push(got);
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_gets_of_one_present_key_make_one_redis_read() {
    let redis = RedisServer::start();
    let group = daemon(&redis).await;
    // Written into Redis directly, in the daemon's format: a SET through the daemon would cache it,
    // and the GETs would then make no read at all.
    redis.cmd(&[
        b"SET",
        b"scaled:v:hot",
        &scaled::redis::scripts::encode_value(b"value"),
    ]);
    let answers = concurrent_gets(&group, &redis, |_, _| "hot".into()).await;
    for got in &answers {
        assert!(got.values().all(|v| v.as_deref() == Some(&b"value"[..])));
    }
    let calls = redis.command_calls();
    assert_eq!(
        calls.get(READ_COMMAND).copied().unwrap_or(0),
        1,
        "{} GETs of one key: {calls:?}",
        CONNECTIONS * PER_CONNECTION
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_gets_of_one_missing_key_make_one_redis_read() {
    let redis = RedisServer::start();
    let group = daemon(&redis).await;
    let answers = concurrent_gets(&group, &redis, |_, _| "missing".into()).await;
    for got in &answers {
        assert!(got.values().all(Option::is_none));
    }
    let calls = redis.command_calls();
    assert_eq!(
        calls.get(READ_COMMAND).copied().unwrap_or(0),
        1,
        "{calls:?}"
    );
}

/// The count above can fail: the same GETs, each of its own key, make one read each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_gets_of_different_keys_each_read_redis() {
    let redis = RedisServer::start();
    let group = daemon(&redis).await;
    concurrent_gets(&group, &redis, |c, i| format!("k{c}:{i}")).await;
    let calls = redis.command_calls();
    assert_eq!(
        calls.get(READ_COMMAND).copied().unwrap_or(0),
        (CONNECTIONS * PER_CONNECTION) as u64,
        "{calls:?}"
    );
}
