//! A slow request does not hold up the fast ones sent behind it on the same connection: answers come
//! back as they finish, not in the order they were asked. Only orders are asserted, never speeds.

mod common;

use std::time::Duration;

use common::TestDaemon;
use scaled_client::proto::{Args, CommandName, Request};

/// Long enough that every fast request behind it is certainly answered first.
const SLOW_MS: u64 = 2000;

fn ping(id: u64, delay_ms: Option<u64>) -> Request {
    Request {
        args: Args {
            delay_ms,
            ..Args::default()
        },
        ..Request::new(id, CommandName::Ping)
    }
}

fn set(id: u64, key: &str, value: &[u8]) -> Request {
    Request {
        args: Args {
            key: Some(key.into()),
            value: Some(value.to_vec()),
            ..Args::default()
        },
        ..Request::new(id, CommandName::Set)
    }
}

fn get(id: u64, key: &str) -> Request {
    Request {
        args: Args {
            key: Some(key.into()),
            ..Args::default()
        },
        ..Request::new(id, CommandName::Get)
    }
}

#[tokio::test]
async fn raw_fast_answers_overtake_a_slow_one_sent_first() {
    let daemon = TestDaemon::start(&[]);
    let mut conn = daemon.raw().await;

    // The slow request goes out alone, first.
    conn.request(&ping(1, Some(SLOW_MS))).await;
    let fast = [
        set(2, "pipe:a", b"alpha"),
        get(3, "pipe:a"),
        ping(4, None),
        get(5, "pipe:missing"),
        set(6, "pipe:b", b"beta"),
        get(7, "pipe:b"),
        ping(8, Some(0)),
    ];
    for request in &fast {
        conn.request(request).await;
    }

    let mut order = Vec::new();
    for _ in 0..=fast.len() {
        let response = conn.recv().await.expect("daemon closed the connection");
        assert!(
            response.err.is_none(),
            "request {} failed: {:?}",
            response.id,
            response.err
        );
        let want = match response.id {
            1 | 4 | 8 => rmpv::Value::from("PONG"),
            2 | 6 => rmpv::Value::from("OK"),
            3 => rmpv::Value::Binary(b"alpha".to_vec()),
            5 => rmpv::Value::Nil,
            7 => rmpv::Value::Binary(b"beta".to_vec()),
            other => panic!("answer for an id never sent: {other}"),
        };
        assert_eq!(response.ok, want, "wrong answer for id {}", response.id);
        order.push(response.id);
    }
    // The fast ones, which answer at once, come back in the order they were sent; the slow one last.
    assert_eq!(
        order,
        vec![2, 3, 4, 5, 6, 7, 8, 1],
        "answers arrived in this order: {order:?}"
    );
}

#[tokio::test]
async fn raw_delayed_answers_come_back_in_order_of_finishing() {
    let daemon = TestDaemon::start(&[]);
    let mut conn = daemon.raw().await;
    // Sent longest first; each finishes a second or more apart from the next.
    conn.request(&ping(10, Some(2500))).await;
    conn.request(&ping(11, Some(1200))).await;
    conn.request(&ping(12, Some(100))).await;
    conn.request(&ping(13, None)).await;

    let mut order = Vec::new();
    for _ in 0..4 {
        let response = conn.recv().await.expect("daemon closed the connection");
        assert_eq!(
            response.ok,
            rmpv::Value::from("PONG"),
            "answer to {}",
            response.id
        );
        order.push(response.id);
    }
    assert_eq!(
        order,
        vec![13, 12, 11, 10],
        "answers arrived in this order: {order:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_fast_calls_finish_while_a_slow_call_is_pending() {
    let daemon = TestDaemon::start(&[]);
    let client = daemon.client().await;
    let other = client.clone(); // same connection

    let slow = client.ping_after(Duration::from_millis(SLOW_MS));
    tokio::pin!(slow);

    let fast = async {
        other.set("pipe:c", b"gamma", None).await.expect("SET");
        assert_eq!(
            other.get("pipe:c").await.expect("GET").as_deref(),
            Some(&b"gamma"[..])
        );
        other.ping().await.expect("PING");
        // Several at once, on the same connection, still behind the slow one.
        let (a, b, c) = tokio::join!(other.get("pipe:c"), other.del("pipe:c"), other.ping());
        let a = a.expect("GET");
        assert_eq!(a.as_deref(), Some(&b"gamma"[..]));
        assert!(b.expect("DEL"), "DEL found nothing");
        c.expect("PING");
        assert_eq!(other.get("pipe:c").await.expect("GET"), None);
    };

    // `biased` polls the slow call first, which puts its request on the connection before any fast one.
    tokio::select! {
        biased;
        result = &mut slow => panic!("the slow PING finished before the fast calls behind it: {result:?}"),
        () = fast => {}
    }
    // The slow call was still pending all along, and still gets its answer.
    slow.await.expect("slow PING");
}
