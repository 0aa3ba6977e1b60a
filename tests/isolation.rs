//! No response is ever delivered to the wrong caller: many concurrent callers sharing a few connections
//! each get back exactly what they wrote, and every pipelined raw request is answered under its own id.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::TestDaemon;
use scaled_client::proto::{Args, CommandName, Request, Response};

/// Shared connections the tasks are spread over.
const CONNECTIONS: usize = 4;
/// Concurrent tasks.
const TASKS: usize = 1000;
/// SET+GET pairs each task makes.
const ROUNDS: usize = 30;

/// A value only `task` writes in `round`, of a length that varies so answers cannot line up by size.
fn value_for(task: usize, round: usize) -> Vec<u8> {
    let mut v = format!("task={task};round={round};").into_bytes();
    v.extend(std::iter::repeat_n(
        (task % 251) as u8,
        (task * 7 + round * 13) % 97,
    ));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tasks_on_shared_connections_each_read_their_own_writes() {
    let daemon = TestDaemon::start(&[]);
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(daemon.client().await);
    }

    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        // Each task has its own session context on a shared connection, as app workers would.
        let session = format!("session-{task}");
        let client = clients[task % CONNECTIONS].with_context(Some(&session), Some("isolation"));
        tasks.spawn(async move {
            let key = format!("iso:{task}");
            for round in 0..ROUNDS {
                let value = value_for(task, round);
                client
                    .set(&key, &value, Some(Duration::ZERO))
                    .await
                    .expect("SET");
                let got = client.get(&key).await.expect("GET");
                assert_eq!(
                    got.as_deref(),
                    Some(&value[..]),
                    "task {task} round {round} read back something it did not write"
                );
                // A key no task writes must read as missing, not as somebody else's value.
                let missing = client
                    .get(&format!("iso:never:{task}:{round}"))
                    .await
                    .expect("GET");
                assert_eq!(
                    missing, None,
                    "task {task} round {round} got a value for an unwritten key"
                );
            }
            task
        });
    }

    let mut finished = HashSet::new();
    while let Some(joined) = tasks.join_next().await {
        let task = joined.expect("task panicked");
        assert!(finished.insert(task), "task {task} finished twice");
    }
    assert_eq!(finished.len(), TASKS);

    // Every task's last write is still there, under its own key only.
    let reader = daemon.client().await;
    for task in 0..TASKS {
        let got = reader.get(&format!("iso:{task}")).await.expect("GET");
        assert_eq!(
            got,
            Some(value_for(task, ROUNDS - 1)),
            "final value of task {task}"
        );
    }
}

fn assert_request_id_shape(response: &Response) {
    let rid = &response.request_id;
    assert_eq!(
        rid.len(),
        36,
        "request_id {rid:?} is not a 36-character UUID"
    );
    for (i, c) in rid.chars().enumerate() {
        if [8, 13, 18, 23].contains(&i) {
            assert_eq!(c, '-', "request_id {rid:?} has no hyphen at {i}");
        } else {
            assert!(c.is_ascii_hexdigit(), "request_id {rid:?} has {c:?} at {i}");
        }
    }
}

#[tokio::test]
async fn pipelined_raw_requests_are_answered_under_their_own_ids() {
    const N: u64 = 500;
    let daemon = TestDaemon::start(&[]);
    let mut conn = daemon.raw().await;

    // One write carrying N SETs, each followed by a GET of the same key, all with distinct ids.
    let mut batch = Vec::new();
    let mut expected: HashMap<u64, rmpv::Value> = HashMap::new();
    for i in 1..=N {
        let key = format!("pipe:{i}");
        let value = format!("value-{i}-{}", "x".repeat((i % 31) as usize)).into_bytes();
        let set = Request {
            args: Args {
                key: Some(key.clone()),
                value: Some(value.clone()),
                ttl_ms: Some(0),
                ..Args::default()
            },
            ..Request::new(2 * i, CommandName::Set)
        };
        let get = Request {
            args: Args {
                key: Some(key),
                ..Args::default()
            },
            ..Request::new(2 * i + 1, CommandName::Get)
        };
        scaled_client::frame::push_frame(&mut batch, &set.to_msgpack());
        scaled_client::frame::push_frame(&mut batch, &get.to_msgpack());
        expected.insert(2 * i, rmpv::Value::from("OK"));
        expected.insert(2 * i + 1, rmpv::Value::Binary(value));
    }
    // A GET of a key nobody set, in the middle of nothing in particular: must be nil under its own id.
    let stray = Request {
        args: Args {
            key: Some("pipe:nobody".into()),
            ..Args::default()
        },
        ..Request::new(1, CommandName::Get)
    };
    scaled_client::frame::push_frame(&mut batch, &stray.to_msgpack());
    expected.insert(1, rmpv::Value::Nil);
    conn.send_bytes(&batch).await;

    let mut request_ids = HashSet::new();
    for _ in 0..expected.len() {
        let response = conn
            .recv()
            .await
            .expect("daemon closed the connection mid-pipeline");
        assert!(
            response.err.is_none(),
            "request {} failed: {:?}",
            response.id,
            response.err
        );
        let want = expected
            .remove(&response.id)
            .unwrap_or_else(|| panic!("answer for unknown or repeated id {}", response.id));
        assert_eq!(
            response.ok, want,
            "answer for id {} carries another request's value",
            response.id
        );
        assert_request_id_shape(&response);
        assert!(
            request_ids.insert(response.request_id.clone()),
            "request_id {} given to two requests",
            response.request_id
        );
    }
    assert!(
        expected.is_empty(),
        "ids never answered: {:?}",
        expected.keys().collect::<Vec<_>>()
    );
    assert_eq!(request_ids.len() as u64, 2 * N + 1);
}
