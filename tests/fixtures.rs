//! The `redis-server` fixture itself: it really loses or keeps data across a SIGKILL as its persistence
//! says, and reports Redis's own command counts.

mod common;

use common::redis_server::RedisServer;

#[test]
fn a_redis_server_with_fsync_always_keeps_acknowledged_writes_across_sigkill() {
    let mut redis = RedisServer::start_persistent();
    redis.cmd(&[b"SET", b"k", b"\x00kept\xff"]);
    let pid = redis.pid().expect("running");
    redis.kill();
    assert!(redis.pid().is_none());
    redis.restart();
    assert_ne!(redis.pid(), Some(pid), "a new process");
    assert_eq!(redis.get_bytes("k").as_deref(), Some(&b"\x00kept\xff"[..]));
}

#[test]
fn a_redis_server_without_persistence_starts_empty_after_sigkill() {
    let mut redis = RedisServer::start();
    redis.cmd(&[b"SET", b"k", b"v"]);
    assert_eq!(redis.keys("*"), ["k"]);
    redis.kill();
    redis.restart();
    assert!(redis.keys("*").is_empty());
}

#[test]
fn command_calls_are_redis_own_counts() {
    let redis = RedisServer::start();
    redis.reset_stats();
    for _ in 0..3 {
        assert_eq!(redis.get_bytes("missing"), None);
    }
    assert_eq!(redis.command_calls().get("get"), Some(&3));
    assert_eq!(redis.command_calls().get("set"), None);
}
