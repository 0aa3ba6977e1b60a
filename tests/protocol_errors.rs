//! Broken and hostile input gets its documented error code, and never takes the daemon down: after each
//! case a separate connection still answers PING and GET.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use common::{RawConn, TestDaemon};
use scaled_client::frame::push_frame;
use scaled_client::proto::{
    Args, CommandName, Request, Response, MAX_FRAME_LEN, MAX_KEY_LEN, MAX_VALUE_LEN,
    PROTOCOL_VERSION,
};

/// Builds a MessagePack map body from string keys and values.
fn map(members: Vec<(&str, rmpv::Value)>) -> Vec<u8> {
    let value = rmpv::Value::Map(
        members
            .into_iter()
            .map(|(k, v)| (rmpv::Value::from(k), v))
            .collect(),
    );
    encode(&value)
}

fn encode(value: &rmpv::Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, value).expect("encode");
    out
}

fn args(members: Vec<(&str, rmpv::Value)>) -> rmpv::Value {
    rmpv::Value::Map(
        members
            .into_iter()
            .map(|(k, v)| (rmpv::Value::from(k), v))
            .collect(),
    )
}

/// Asserts `response` is the error `code` answering request `id`.
fn assert_err(response: Option<Response>, id: u64, code: &str) {
    let response =
        response.unwrap_or_else(|| panic!("connection closed instead of answering {code}"));
    let err = response
        .err
        .as_ref()
        .unwrap_or_else(|| panic!("expected {code}, got ok {}", response.ok));
    assert_eq!(err.code, code, "wrong code (message: {})", err.message);
    assert_eq!(response.id, id, "{code} answered under the wrong id");
    assert!(!err.message.is_empty(), "{code} came without a message");
    assert_eq!(
        response.request_id.len(),
        36,
        "request_id {:?}",
        response.request_id
    );
}

fn assert_pong(response: Option<Response>, id: u64) {
    let response = response.expect("connection closed instead of answering PING");
    assert!(response.err.is_none(), "PING failed: {:?}", response.err);
    assert_eq!((response.id, response.ok), (id, rmpv::Value::from("PONG")));
}

/// A fresh connection answers PING, SET and GET: the daemon is still serving.
async fn assert_still_serving(daemon: &mut TestDaemon) {
    static N: AtomicU64 = AtomicU64::new(0);
    assert!(
        daemon.child.try_wait().expect("try_wait").is_none(),
        "scaled exited: {:?}",
        daemon.child.try_wait()
    );
    let client = daemon.client().await;
    client.ping().await.expect("PING on a fresh connection");
    let key = format!("alive:{}", N.fetch_add(1, Ordering::Relaxed));
    client
        .set(&key, key.as_bytes(), None)
        .await
        .expect("SET on a fresh connection");
    assert_eq!(
        client.get(&key).await.expect("GET").as_deref(),
        Some(key.as_bytes())
    );
}

#[tokio::test]
async fn undecodable_bodies_are_malformed_and_the_connection_goes_on() {
    let mut daemon = TestDaemon::start(&[]);
    let mut conn = daemon.raw().await;

    // Not MessagePack at all (0xc1 is the one byte MessagePack never uses).
    conn.send(&[0xc1, 0xc1, 0xc1]).await;
    assert_err(conn.recv().await, 0, "MALFORMED");
    // MessagePack, but not a map.
    conn.send(&encode(&rmpv::Value::from("PING"))).await;
    assert_err(conn.recv().await, 0, "MALFORMED");
    // A map with an id but no cmd: the id is still read, so the caller can be told.
    conn.send(&map(vec![("id", 7.into())])).await;
    assert_err(conn.recv().await, 7, "MALFORMED");
    // A cmd that is not a str is no command, not even by position in some list (3 once ran SET).
    for (id, cmd) in [
        (80u64, rmpv::Value::from(1)),
        (81, rmpv::Value::from(3)),
        (
            82,
            rmpv::Value::Map(vec![("PING".into(), rmpv::Value::Nil)]),
        ),
        (83, rmpv::Value::Array(vec!["PING".into()])),
        (84, rmpv::Value::Binary(b"PING".to_vec())),
        (85, rmpv::Value::Nil),
    ] {
        let args = args(vec![
            ("key", "k".into()),
            ("value", rmpv::Value::Binary(b"v".to_vec())),
        ]);
        conn.send(&map(vec![("id", id.into()), ("cmd", cmd), ("args", args)]))
            .await;
        assert_err(conn.recv().await, id, "MALFORMED");
    }
    // An array in place of the envelope map is not an envelope, even with the members in order.
    conn.send(&encode(&rmpv::Value::Array(vec![90.into(), "PING".into()])))
        .await;
    assert_err(conn.recv().await, 0, "MALFORMED");
    // `args` must be a map too: not an array, not nil.
    conn.send(&map(vec![
        ("id", 91.into()),
        ("cmd", "PING".into()),
        ("args", rmpv::Value::Array(vec![])),
    ]))
    .await;
    assert_err(conn.recv().await, 91, "MALFORMED");
    conn.send(&map(vec![
        ("id", 92.into()),
        ("cmd", "PING".into()),
        ("args", rmpv::Value::Nil),
    ]))
    .await;
    assert_err(conn.recv().await, 92, "MALFORMED");
    // Wrongly typed members: a negative id (so no id), a float, a negative TTL, a str that is not UTF-8.
    conn.send(&map(vec![("id", (-1).into()), ("cmd", "PING".into())]))
        .await;
    assert_err(conn.recv().await, 0, "MALFORMED");
    conn.send(&map(vec![
        ("id", rmpv::Value::F64(93.0)),
        ("cmd", "PING".into()),
    ]))
    .await;
    assert_err(conn.recv().await, 0, "MALFORMED");
    let negative_ttl = args(vec![
        ("key", "k".into()),
        ("value", rmpv::Value::Binary(vec![1])),
        ("ttl_ms", (-5).into()),
    ]);
    conn.send(&map(vec![
        ("id", 94.into()),
        ("cmd", "SET".into()),
        ("args", negative_ttl),
    ]))
    .await;
    assert_err(conn.recv().await, 94, "MALFORMED");
    // {"id": 95, "cmd": "GET", "args": {"key": <str ff fe>}}
    let mut bad_utf8 = vec![
        0x83, 0xa2, b'i', b'd', 95, 0xa3, b'c', b'm', b'd', 0xa3, b'G', b'E', b'T',
    ];
    bad_utf8.extend_from_slice(&[
        0xa4, b'a', b'r', b'g', b's', 0x81, 0xa3, b'k', b'e', b'y', 0xa2, 0xff, 0xfe,
    ]);
    conn.send(&bad_utf8).await;
    assert_err(conn.recv().await, 95, "MALFORMED");
    // A repeated key.
    let twice = rmpv::Value::Map(vec![
        ("id".into(), 96.into()),
        ("cmd".into(), "PING".into()),
        ("cmd".into(), "GET".into()),
    ]);
    conn.send(&encode(&twice)).await;
    assert_err(conn.recv().await, 96, "MALFORMED");

    // A whole valid request with bytes after the map.
    let mut trailing = map(vec![("id", 9.into()), ("cmd", "PING".into())]);
    trailing.extend_from_slice(&[0x01, 0x02]);
    conn.send(&trailing).await;
    assert_err(conn.recv().await, 9, "MALFORMED");
    // Two valid maps in one frame are one map too many.
    let mut two = map(vec![("id", 10.into()), ("cmd", "PING".into())]);
    two.extend(map(vec![("id", 11.into()), ("cmd", "PING".into())]));
    conn.send(&two).await;
    assert_err(conn.recv().await, 10, "MALFORMED");
    // An empty frame.
    conn.send(&[]).await;
    assert_err(conn.recv().await, 0, "MALFORMED");
    // A map cut short inside the frame: its id was readable, so the answer carries it.
    let whole = map(vec![("id", 12.into()), ("cmd", "PING".into())]);
    conn.send(&whole[..whole.len() - 2]).await;
    assert_err(conn.recv().await, 12, "MALFORMED");
    // Cut short before the id was complete: id 0.
    conn.send(&whole[..4]).await;
    assert_err(conn.recv().await, 0, "MALFORMED");

    // None of that broke the connection. Unknown members are ignored, and any integer width is read,
    // even a signed one: {"id": d0 0d, "cmd": "PING", "later": 1}.
    let mut wide = vec![
        0x83, 0xa2, b'i', b'd', 0xd0, 13, 0xa3, b'c', b'm', b'd', 0xa4, b'P', b'I', b'N', b'G',
    ];
    wide.extend_from_slice(&[0xa5, b'l', b'a', b't', b'e', b'r', 0x01]);
    conn.send(&wide).await;
    assert_pong(conn.recv().await, 13);
    assert_still_serving(&mut daemon).await;
}

#[tokio::test]
async fn bad_commands_and_arguments_get_their_codes() {
    let mut daemon = TestDaemon::start(&[]);
    let mut conn = daemon.raw().await;

    conn.send(&map(vec![("id", 1.into()), ("cmd", "FROBNICATE".into())]))
        .await;
    assert_err(conn.recv().await, 1, "UNKNOWN_COMMAND");
    conn.send(&map(vec![
        ("id", 2.into()),
        ("cmd", "get".into()),
        ("args", args(vec![("key", "k".into())])),
    ]))
    .await;
    assert_err(conn.recv().await, 2, "UNKNOWN_COMMAND");

    conn.send(&map(vec![("id", 3.into()), ("cmd", "GET".into())]))
        .await;
    assert_err(conn.recv().await, 3, "BAD_ARGUMENT");
    conn.send(&map(vec![
        ("id", 4.into()),
        ("cmd", "SET".into()),
        ("args", args(vec![("key", "k".into())])),
    ]))
    .await;
    assert_err(conn.recv().await, 4, "BAD_ARGUMENT");
    conn.send(&map(vec![
        ("id", 5.into()),
        ("cmd", "DEL".into()),
        ("args", args(vec![("key", "".into())])),
    ]))
    .await;
    assert_err(conn.recv().await, 5, "BAD_ARGUMENT");
    let too_slow = args(vec![("delay_ms", 3_600_000.into())]);
    conn.send(&map(vec![
        ("id", 6.into()),
        ("cmd", "PING".into()),
        ("args", too_slow),
    ]))
    .await;
    assert_err(conn.recv().await, 6, "BAD_ARGUMENT");

    let long_key = "k".repeat(MAX_KEY_LEN + 1);
    conn.send(&map(vec![
        ("id", 7.into()),
        ("cmd", "GET".into()),
        ("args", args(vec![("key", long_key.as_str().into())])),
    ]))
    .await;
    assert_err(conn.recv().await, 7, "TOO_LARGE");
    conn.send(&map(vec![
        ("id", 8.into()),
        ("cmd", "SET".into()),
        (
            "args",
            args(vec![
                ("key", long_key.as_str().into()),
                ("value", rmpv::Value::Binary(vec![1])),
            ]),
        ),
    ]))
    .await;
    assert_err(conn.recv().await, 8, "TOO_LARGE");

    // A value one byte over its limit, in a frame well under the frame limit.
    let big = map(vec![
        ("id", 9.into()),
        ("cmd", "SET".into()),
        (
            "args",
            args(vec![
                ("key", "big".into()),
                ("value", rmpv::Value::Binary(vec![7; MAX_VALUE_LEN + 1])),
            ]),
        ),
    ]);
    assert!(big.len() < MAX_FRAME_LEN);
    conn.send(&big).await;
    assert_err(conn.recv().await, 9, "TOO_LARGE");

    // A frame of exactly the frame limit is read and judged on its content (the value is too large), and
    // the connection stays open.
    let exact = exact_limit_set(10);
    assert_eq!(exact.len(), MAX_FRAME_LEN);
    conn.send(&exact).await;
    assert_err(conn.recv().await, 10, "TOO_LARGE");

    // The refused values were not stored, and the connection still answers.
    conn.send(&map(vec![
        ("id", 11.into()),
        ("cmd", "GET".into()),
        ("args", args(vec![("key", "big".into())])),
    ]))
    .await;
    let answer = conn.recv().await.expect("GET answer");
    assert!(answer.err.is_none(), "{:?}", answer.err);
    assert_eq!((answer.id, answer.ok), (11, rmpv::Value::Nil));
    assert_still_serving(&mut daemon).await;
}

/// A SET whose frame body is exactly [`MAX_FRAME_LEN`] bytes.
fn exact_limit_set(id: u64) -> Vec<u8> {
    let body = |len: usize| {
        map(vec![
            ("id", id.into()),
            ("cmd", "SET".into()),
            (
                "args",
                args(vec![
                    ("key", "exact".into()),
                    ("value", rmpv::Value::Binary(vec![3; len])),
                ]),
            ),
        ])
    };
    let overhead = body(MAX_VALUE_LEN).len() - MAX_VALUE_LEN; // bin32 header from here on: constant
    body(MAX_FRAME_LEN - overhead)
}

#[tokio::test]
async fn hello_is_required_first_and_its_version_checked() {
    let mut daemon = TestDaemon::start(&[]);
    let mut conn = daemon.raw_without_hello().await;

    for (id, cmd) in [(1u64, "PING"), (2, "GET"), (3, "STATS"), (4, "NOSUCH")] {
        conn.send(&map(vec![
            ("id", id.into()),
            ("cmd", cmd.into()),
            ("args", args(vec![("key", "k".into())])),
        ]))
        .await;
        assert_err(conn.recv().await, id, "HELLO_REQUIRED");
    }
    let hello = |id: u64, version: u32| Request {
        args: Args {
            version: Some(version),
            client: Some("errors".into()),
            ..Args::default()
        },
        ..Request::new(id, CommandName::Hello)
    };
    conn.request(&hello(5, 99)).await;
    assert_err(conn.recv().await, 5, "UNSUPPORTED_VERSION");
    // A refused HELLO does not count as one.
    conn.request(&Request::new(6, CommandName::Ping)).await;
    assert_err(conn.recv().await, 6, "HELLO_REQUIRED");
    // HELLO without a version is an argument error.
    conn.send(&map(vec![("id", 7.into()), ("cmd", "HELLO".into())]))
        .await;
    assert_err(conn.recv().await, 7, "BAD_ARGUMENT");

    // The right version opens the connection for everything else.
    conn.request(&hello(8, PROTOCOL_VERSION)).await;
    let welcome = conn.recv().await.expect("HELLO answer");
    assert!(welcome.err.is_none(), "HELLO failed: {:?}", welcome.err);
    assert_eq!(welcome.id, 8);
    conn.request(&Request::new(9, CommandName::Ping)).await;
    assert_pong(conn.recv().await, 9);
    assert_still_serving(&mut daemon).await;
}

#[tokio::test]
async fn an_oversized_length_prefix_is_refused_and_closes_only_that_connection() {
    let mut daemon = TestDaemon::start(&[]);
    let mut bystander = daemon.raw().await;

    for prefix in [u32::MAX, (MAX_FRAME_LEN + 1) as u32] {
        let mut conn = daemon.raw().await;
        conn.send_bytes(&prefix.to_be_bytes()).await;
        assert_err(conn.recv().await, 0, "FRAME_TOO_LARGE");
        assert!(
            conn.recv().await.is_none(),
            "connection stayed open after a {prefix}-byte prefix"
        );

        // A connection opened before keeps working.
        bystander
            .request(&Request::new(u64::from(prefix), CommandName::Ping))
            .await;
        assert_pong(bystander.recv().await, u64::from(prefix));
        assert_still_serving(&mut daemon).await;
    }

    // The same before HELLO.
    let mut conn = daemon.raw_without_hello().await;
    conn.send_bytes(&u32::MAX.to_be_bytes()).await;
    assert_err(conn.recv().await, 0, "FRAME_TOO_LARGE");
    assert!(conn.recv().await.is_none(), "connection stayed open");
    assert_still_serving(&mut daemon).await;
}

#[tokio::test]
async fn a_stream_ending_inside_a_frame_is_malformed_then_closed() {
    let mut daemon = TestDaemon::start(&[]);

    // Ending inside the body.
    let mut conn = daemon.raw().await;
    let mut partial = 100u32.to_be_bytes().to_vec();
    partial.extend_from_slice(&[0x85; 10]);
    conn.send_bytes(&partial).await;
    conn.stream
        .shutdown()
        .await
        .expect("shut down the write half");
    assert_err(conn.recv().await, 0, "MALFORMED");
    assert!(conn.recv().await.is_none(), "connection stayed open");
    assert_still_serving(&mut daemon).await;

    // Ending inside the length prefix, after a complete request that is still answered.
    let mut conn = daemon.raw().await;
    let mut bytes = Vec::new();
    push_frame(&mut bytes, &Request::new(1, CommandName::Ping).to_msgpack());
    bytes.extend_from_slice(&[0, 0]);
    conn.send_bytes(&bytes).await;
    conn.stream
        .shutdown()
        .await
        .expect("shut down the write half");
    assert_pong(conn.recv().await, 1);
    assert_err(conn.recv().await, 0, "MALFORMED");
    assert!(conn.recv().await.is_none(), "connection stayed open");

    // Ending cleanly, between frames, is no error at all.
    let mut conn = daemon.raw().await;
    conn.request(&Request::new(2, CommandName::Ping)).await;
    conn.stream
        .shutdown()
        .await
        .expect("shut down the write half");
    assert_pong(conn.recv().await, 2);
    assert!(
        conn.recv().await.is_none(),
        "expected a clean close after the last answer"
    );
    assert_still_serving(&mut daemon).await;
}

/// xorshift64*: deterministic, so a failure here replays the same bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Reads until the daemon closes the connection (or resets it), returning what came; fails the test if
/// the daemon neither answers nor closes in time.
async fn drain(stream: &mut UnixStream) -> Vec<u8> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(common::STARTUP_LIMIT, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the daemon neither answered nor closed within {:?}",
        common::STARTUP_LIMIT
    );
    got
}

/// Splits a byte stream into decoded responses.
fn responses(bytes: &[u8]) -> Vec<Response> {
    let mut buf = bytes::BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(body) =
        scaled_client::frame::take_frame(&mut buf, MAX_FRAME_LEN).expect("frame size")
    {
        out.push(Response::decode(&body).expect("decodable response"));
    }
    assert!(
        buf.is_empty(),
        "{} bytes of a partial response frame",
        buf.len()
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_garbage_never_takes_the_daemon_down() {
    let mut daemon = TestDaemon::start(&[]);
    let mut rng = Rng(0x5ca1_ed00_dead_beef);

    // Whole streams of noise, some after a proper HELLO: the first four bytes are almost always a length
    // over the limit, so most of these end in FRAME_TOO_LARGE and a close.
    for round in 0..8 {
        let mut conn = if round % 2 == 0 {
            daemon.raw().await
        } else {
            daemon.raw_without_hello().await
        };
        let len = 1 + rng.below(64 * 1024) as usize;
        let noise = rng.bytes(len);
        // The daemon may close before taking it all; a failed write is part of the game.
        let _ = conn.stream.write_all(&noise).await;
        let _ = conn.stream.shutdown().await;
        let answers = responses(&drain(&mut conn.stream).await);
        assert!(
            !answers.is_empty(),
            "round {round}: noise got no answer at all"
        );
        for answer in &answers {
            assert!(
                answer.err.is_some(),
                "round {round}: noise was accepted: {answer:?}"
            );
        }
        assert_still_serving(&mut daemon).await;
    }

    // Well-framed noise: every frame is read, answered with an error under id 0, and the connection
    // carries on to the end.
    for round in 0..6 {
        let mut conn: RawConn = if round % 2 == 0 {
            daemon.raw().await
        } else {
            daemon.raw_without_hello().await
        };
        let frames = 20 + rng.below(40) as usize;
        let mut bytes = Vec::new();
        for _ in 0..frames {
            let len = rng.below(2048) as usize;
            let mut body = rng.bytes(len);
            // Sometimes a map header in front, so the decoder gets further before it gives up.
            if len > 0 && rng.below(3) == 0 {
                body[0] = 0x80 | (rng.below(16) as u8);
            }
            push_frame(&mut bytes, &body);
        }
        conn.send_bytes(&bytes).await;
        conn.stream
            .shutdown()
            .await
            .expect("shut down the write half");
        let answers = responses(&drain(&mut conn.stream).await);
        assert_eq!(answers.len(), frames, "round {round}: one answer per frame");
        for answer in &answers {
            let err = answer
                .err
                .as_ref()
                .unwrap_or_else(|| panic!("round {round}: noise accepted: {answer:?}"));
            assert_eq!(err.code, "MALFORMED", "round {round}: {}", err.message);
        }
        assert_still_serving(&mut daemon).await;
    }

    // Many noisy connections at once, while a well-behaved client keeps working alongside.
    let client = daemon.client().await;
    let mut noisy = tokio::task::JoinSet::new();
    for i in 0..16u64 {
        let socket = daemon.socket.clone();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (i + 1));
        noisy.spawn(async move {
            let mut stream = UnixStream::connect(&socket).await.expect("connect");
            for _ in 0..4 {
                let len = 1 + rng.below(4096) as usize;
                let chunk = rng.bytes(len);
                if stream.write_all(&chunk).await.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            let _ = stream.shutdown().await;
            drain(&mut stream).await;
        });
    }
    for n in 0..50 {
        let key = format!("beside:{n}");
        client
            .set(&key, key.as_bytes(), None)
            .await
            .expect("SET beside the noise");
        assert_eq!(
            client.get(&key).await.expect("GET").as_deref(),
            Some(key.as_bytes())
        );
    }
    while let Some(joined) = noisy.join_next().await {
        joined.expect("noisy connection task");
    }
    assert_still_serving(&mut daemon).await;
}
