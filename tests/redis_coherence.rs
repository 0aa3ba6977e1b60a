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
