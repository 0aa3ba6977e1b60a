mod common;

// proto-spec.md, checked against the code and against a running daemon.
//
// The spec's hex test vectors are fenced blocks with the info string `hex name=<name>`; each line is an
// offset, up to 16 hex bytes and an ASCII column between `|` bars. This file reads them straight out of
// the document, so the spec cannot drift from the code without a test failing:
//
// - request vectors decode with `decode_request` to the expected requests, and `to_msgpack` re-encodes
//   them to the same bytes;
// - response vectors decode with `Response::decode` to the expected responses, and the daemon's own
//   encoders (`write_response_head`, `write_ok_key` + `Reply::write`, `write_err`) produce the same bytes;
// - the request vectors, sent as they are to a real daemon, get answers whose `ok`/`err` part is byte
//   for byte the one in the matching response vector; the lock vectors are replayed the same way, with
//   the owner token and fencing tokens the daemon really granted put in place of the vector's (the
//   fencing tokens start after the wall clock at the daemon's start, so they differ in every run);
// - what the spec says of fencing tokens (above the wall clock at start, one more per grant, the start
//   value fencing a lock never taken), of EXTEND without `ttl_ms` and of a default wait of 0 holds for
//   a running daemon;
// - the error table lists every `ErrorCode`, in order, and every command has a heading;
// - the answer tables of LOCK, LOCKS, UNLOCK and the STATS `locks` rows list exactly the members the
//   daemon's types serialize, in order, and every `#anchor` link names a heading.

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use scaled::cmd::Reply;
use scaled::locks::{
    Fenced, Grant, LockInfo, LockPage, LockStats, Status, AUTO_RENEW_MIN_LEASE, DEFAULT_MAX_LOCKS,
    DEFAULT_MAX_WAITERS, FENCE_RETENTION,
};
use scaled_client::answers::Welcome;
use scaled_client::decode_request;
use scaled_client::frame::{begin_frame, finish_frame, push_frame, take_frame, LEN_PREFIX};
use scaled_client::proto::{
    write_degraded_response_head, write_err, write_ok_key, write_response_head, Args, CommandName,
    ErrorCode, Fence, Request, Response, WireError, MAX_CLIENT_NAME_LEN, MAX_FRAME_LEN,
    MAX_KEY_LEN, MAX_PING_DELAY_MS, MAX_VALUE_LEN, PROTOCOL_VERSION,
};

use common::{RawConn, TestDaemon, STARTUP_LIMIT};

const SPEC: &str = include_str!("../proto-spec.md");

/// The binary value of the SET and GET vectors.
const VALUE: &[u8] = &[0x00, 0x01, 0x02, 0xfe, 0xff];

/// The key of the SET, GET and DEL vectors.
const KEY: &str = "session:abc";

/// The lock key of the lock vectors.
const LOCK_KEY: &str = "session:42";

/// The owner token the lock vectors show where a live daemon answers a random one.
const OWNER_TOKEN: &str = "5f0c8a1e-2b7d-4c39-a6e4-1d9b3f7c2e80";

/// The fencing token of the first grant in the lock vectors: one above the start value of a daemon
/// started at midnight UTC on 27 November 2025, 1764201600000000 µs after the Unix epoch. The second
/// grant has the next one.
const FIRST_FENCE: u64 = 1_764_201_600_000_001;

/// The value of the fenced SET vector.
const FENCED_VALUE: &[u8] = b"cart:3";

/// The longest lease or wait a LOCK may ask for, in milliseconds: one day.
const MAX_LOCK_MS: u64 = 86_400_000;

/// The fixed request_id of response vector `n`.
fn fixed_request_id(n: u64) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

// ---------------------------------------------------------------------------------------------------
// Reading the document

/// Every `hex name=...` block of the spec, in document order. Panics, naming the line, on anything that
/// does not follow the format, so a typo in the spec is a clear failure rather than a missing vector.
fn parse_vectors(spec: &str) -> Vec<(String, Vec<u8>)> {
    let mut vectors: Vec<(String, Vec<u8>)> = Vec::new();
    let mut lines = spec.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let Some(info) = line.trim_end().strip_prefix("```hex") else {
            continue;
        };
        let name = info
            .trim()
            .strip_prefix("name=")
            .unwrap_or_else(|| panic!("line {}: a hex block needs `name=<name>`", n + 1))
            .to_string();
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "line {}: vector name `{name}` must be lower-case letters, digits and hyphens",
            n + 1
        );
        assert!(
            !vectors.iter().any(|(other, _)| *other == name),
            "line {}: vector `{name}` appears twice",
            n + 1
        );
        let mut bytes = Vec::new();
        loop {
            let (m, line) = lines
                .next()
                .unwrap_or_else(|| panic!("vector `{name}`: block is never closed"));
            let at = m + 1;
            if line.trim() == "```" {
                break;
            }
            let (hex, ascii) = match line.split_once('|') {
                Some((hex, rest)) => (hex, Some(rest.strip_suffix('|').unwrap_or(rest))),
                None => (line, None),
            };
            let mut tokens = hex.split_whitespace();
            let Some(offset) = tokens.next() else {
                continue;
            };
            let offset = usize::from_str_radix(offset, 16)
                .unwrap_or_else(|_| panic!("line {at}: `{offset}` is not a hex offset"));
            assert_eq!(
                offset,
                bytes.len(),
                "line {at}: offset does not follow the bytes before it"
            );
            let start = bytes.len();
            for token in tokens {
                assert_eq!(
                    token.len(),
                    2,
                    "line {at}: `{token}` is not a two-digit hex byte"
                );
                let byte = u8::from_str_radix(token, 16)
                    .unwrap_or_else(|_| panic!("line {at}: `{token}` is not a hex byte"));
                bytes.push(byte);
            }
            let row = &bytes[start..];
            assert!(
                (1..=16).contains(&row.len()),
                "line {at}: a line holds 1 to 16 bytes"
            );
            if let Some(ascii) = ascii {
                let shown: String = row
                    .iter()
                    .map(|&b| {
                        if (0x20..0x7f).contains(&b) {
                            b as char
                        } else {
                            '.'
                        }
                    })
                    .collect();
                assert_eq!(
                    ascii, shown,
                    "line {at}: the ASCII column does not match the bytes"
                );
            }
        }
        assert!(!bytes.is_empty(), "vector `{name}` is empty");
        vectors.push((name, bytes));
    }
    vectors
}

fn vectors() -> Vec<(String, Vec<u8>)> {
    parse_vectors(SPEC)
}

/// The complete frame of a named vector.
fn frame(name: &str) -> Vec<u8> {
    vectors()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, bytes)| bytes)
        .unwrap_or_else(|| panic!("proto-spec.md has no vector `{name}`"))
}

/// The body of a frame, checked with the real framing code: the prefix must announce exactly the rest.
fn body_of(name: &str, frame: &[u8]) -> Vec<u8> {
    assert!(
        frame.len() >= LEN_PREFIX,
        "vector `{name}` is shorter than a length prefix"
    );
    let announced = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    assert_eq!(
        announced,
        frame.len() - LEN_PREFIX,
        "vector `{name}`: length prefix is wrong"
    );
    let mut buf = BytesMut::from(frame);
    let body = take_frame(&mut buf, MAX_FRAME_LEN)
        .expect("within the frame limit")
        .unwrap_or_else(|| panic!("vector `{name}` is not a whole frame"));
    assert!(buf.is_empty(), "vector `{name}` holds more than one frame");
    body.to_vec()
}

fn body(name: &str) -> Vec<u8> {
    body_of(name, &frame(name))
}

/// The text of the `## <title>` section, up to the next `## ` heading.
fn section(title: &str) -> &'static str {
    let heading = format!("\n## {title}\n");
    let start = SPEC
        .find(&heading)
        .unwrap_or_else(|| panic!("proto-spec.md has no `## {title}` section"))
        + heading.len();
    let rest = &SPEC[start..];
    &rest[..rest.find("\n## ").unwrap_or(rest.len())]
}

/// The text under the heading line `heading` (such as `### LOCK`), up to the next heading.
fn subsection(heading: &str) -> &'static str {
    let marker = format!("\n{heading}\n");
    let start = SPEC
        .find(&marker)
        .unwrap_or_else(|| panic!("proto-spec.md has no `{heading}` heading"))
        + marker.len();
    let rest = &SPEC[start..];
    &rest[..rest.find("\n#").unwrap_or(rest.len())]
}

/// The names in the first column of the table whose header row starts `| <header> |`, in order.
fn table_names(text: &str, header: &str) -> Vec<String> {
    let head = format!("| {header} |");
    let mut lines = text.lines().skip_while(|line| !line.starts_with(&head));
    assert!(lines.next().is_some(), "no table headed `{head}`");
    lines
        .skip(1)
        .take_while(|line| line.starts_with('|'))
        .map(|line| {
            let cell = line.trim_start_matches('|').trim_start();
            let name = cell.strip_prefix('`').and_then(|c| c.split_once('`'));
            name.unwrap_or_else(|| panic!("table row without a `name`: {line}"))
                .0
                .to_string()
        })
        .collect()
}

/// The member names of a value as the daemon encodes it, in order.
fn member_names<T: Serialize>(value: &T) -> Vec<String> {
    let bytes = rmp_serde::to_vec_named(value).expect("encodes");
    let decoded = rmpv::decode::read_value(&mut &bytes[..]).expect("MessagePack");
    decoded
        .as_map()
        .expect("a map")
        .iter()
        .map(|(k, _)| k.as_str().expect("str keys").to_string())
        .collect()
}

fn is_request_id(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_digit() || ('a'..='f').contains(&c),
        })
}

// ---------------------------------------------------------------------------------------------------
// What the vectors must hold

fn expected_requests() -> Vec<(&'static str, Request)> {
    let key_args = || Args {
        key: Some(KEY.into()),
        ..Args::default()
    };
    vec![
        (
            "hello-request",
            Request {
                args: Args {
                    version: Some(PROTOCOL_VERSION),
                    client: Some("example".into()),
                    ..Args::default()
                },
                ..Request::new(1, CommandName::Hello)
            },
        ),
        ("ping-request", Request::new(2, CommandName::Ping)),
        (
            "hello-token-request",
            Request {
                args: Args {
                    version: Some(PROTOCOL_VERSION),
                    client: Some("example".into()),
                    token: Some("web-0123456789abcdef".into()),
                    ..Args::default()
                },
                ..Request::new(1, CommandName::Hello)
            },
        ),
        (
            "set-request",
            Request {
                args: Args {
                    key: Some(KEY.into()),
                    value: Some(VALUE.to_vec()),
                    ttl_ms: Some(60_000),
                    ..Args::default()
                },
                ..Request::new(3, CommandName::Set)
            },
        ),
        (
            "get-request",
            Request {
                args: key_args(),
                session_id: Some("sess-7f3a".into()),
                user_id: Some("user-42".into()),
                ..Request::new(4, CommandName::Get)
            },
        ),
        (
            "del-request",
            Request {
                args: key_args(),
                ..Request::new(5, CommandName::Del)
            },
        ),
        ("get-without-key-request", Request::new(7, CommandName::Get)),
        (
            "lock-request",
            Request {
                args: Args {
                    key: Some(LOCK_KEY.into()),
                    ttl_ms: Some(30_000),
                    wait_ms: Some(5_000),
                    ..Args::default()
                },
                ..Request::new(8, CommandName::Lock)
            },
        ),
        (
            "lock-try-request",
            Request {
                args: Args {
                    key: Some(LOCK_KEY.into()),
                    try_only: Some(true),
                    ..Args::default()
                },
                ..Request::new(9, CommandName::Lock)
            },
        ),
        (
            "extend-request",
            Request {
                args: Args {
                    key: Some(LOCK_KEY.into()),
                    ttl_ms: Some(60_000),
                    token: Some(OWNER_TOKEN.into()),
                    ..Args::default()
                },
                ..Request::new(10, CommandName::Extend)
            },
        ),
        (
            "unlock-request",
            Request {
                args: Args {
                    key: Some(LOCK_KEY.into()),
                    token: Some(OWNER_TOKEN.into()),
                    ..Args::default()
                },
                ..Request::new(11, CommandName::Unlock)
            },
        ),
        (
            "set-fenced-request",
            Request {
                args: Args {
                    key: Some(LOCK_KEY.into()),
                    value: Some(FENCED_VALUE.to_vec()),
                    fence: Some(Fence {
                        lock: LOCK_KEY.into(),
                        token: FIRST_FENCE,
                    }),
                    ..Args::default()
                },
                ..Request::new(13, CommandName::Set)
            },
        ),
        (
            "locks-page-request",
            Request {
                args: Args {
                    limit: Some(1),
                    ..Args::default()
                },
                ..Request::new(14, CommandName::Locks)
            },
        ),
    ]
}

/// The page of the LOCKS vector: one row of two, B holding the lock after the hand-off.
fn locks_page() -> LockPage {
    LockPage {
        locks: vec![LockInfo {
            key: LOCK_KEY.into(),
            owner: "example#2".into(),
            fence: FIRST_FENCE + 1,
            age_ms: 1500,
            ttl_ms: 28_500,
            auto_renew: false,
            waiters: 0,
        }],
        total: 2,
        next: Some(LOCK_KEY.into()),
    }
}

/// UNLOCK's answer, declared and encoded the way the daemon does it.
#[derive(Serialize)]
struct UnlockAnswer {
    status: Status,
}

/// EXTEND's answer, declared and encoded the way the daemon does it.
#[derive(Serialize)]
struct ExtendAnswer {
    status: Status,
    ttl_ms: u64,
}

/// The `ok` or `err` part of an expected response.
enum Answer {
    /// The daemon's reply, and the value a client decodes from it.
    Ok(Reply, rmpv::Value),
    Err(ErrorCode, String),
}

struct ExpectedResponse {
    name: &'static str,
    id: u64,
    /// The n of the fixed request_id `00000000-0000-4000-8000-00000000000n`.
    request_n: u64,
    elapsed_us: u64,
    /// Whether the envelope carries `degraded: true` (an answer made without Redis).
    degraded: bool,
    answer: Answer,
}

fn expected_responses() -> Vec<ExpectedResponse> {
    // HELLO's answer, encoded from the client's type as the daemon encodes it.
    let hello = Reply::encode(&Welcome {
        version: PROTOCOL_VERSION,
        server: "scaled 0.1.0".into(),
        max_frame: MAX_FRAME_LEN as u64,
        max_key: MAX_KEY_LEN as u64,
        max_value: MAX_VALUE_LEN as u64,
    })
    .expect("HELLO's answer encodes");
    let hello_value = rmpv::Value::Map(vec![
        ("version".into(), PROTOCOL_VERSION.into()),
        ("server".into(), "scaled 0.1.0".into()),
        ("max_frame".into(), (MAX_FRAME_LEN as u64).into()),
        ("max_key".into(), (MAX_KEY_LEN as u64).into()),
        ("max_value".into(), (MAX_VALUE_LEN as u64).into()),
    ]);
    let text = |s: &'static str| Answer::Ok(Reply::Text(s), s.into());
    let err = |code, message: &str| Answer::Err(code, message.to_string());
    let map = |members: Vec<(&str, rmpv::Value)>| {
        rmpv::Value::Map(members.into_iter().map(|(k, v)| (k.into(), v)).collect())
    };
    let grant = Reply::encode(&Grant {
        token: OWNER_TOKEN.into(),
        fence: FIRST_FENCE,
        ttl_ms: 30_000,
        waited_us: 0,
    })
    .expect("a grant encodes");
    let grant_value = map(vec![
        ("token", OWNER_TOKEN.into()),
        ("fence", FIRST_FENCE.into()),
        ("ttl_ms", 30_000u64.into()),
        ("waited_us", 0u64.into()),
    ]);
    let unlocked =
        |status| Reply::encode(&UnlockAnswer { status }).expect("UNLOCK's answer encodes");
    let extended = Reply::encode(&ExtendAnswer {
        status: Status::Ok,
        ttl_ms: 60_000,
    })
    .expect("EXTEND's answer encodes");
    let fenced = Fenced {
        lock: LOCK_KEY.into(),
        token: FIRST_FENCE,
        newest: FIRST_FENCE + 1,
    }
    .to_string();
    let response = |name, id, request_n, elapsed_us, answer| ExpectedResponse {
        name,
        id,
        request_n,
        elapsed_us,
        degraded: false,
        answer,
    };
    vec![
        response("hello-response", 1, 1, 42, Answer::Ok(hello, hello_value)),
        response("ping-response", 2, 2, 7, text("PONG")),
        response(
            "denied-response",
            1,
            16,
            40,
            err(
                ErrorCode::Denied,
                "the token in HELLO is not valid; closing",
            ),
        ),
        response("set-response", 3, 3, 15, text("OK")),
        response(
            "get-hit-response",
            4,
            4,
            9,
            Answer::Ok(
                Reply::Value(Bytes::from_static(VALUE)),
                rmpv::Value::Binary(VALUE.to_vec()),
            ),
        ),
        response(
            "del-response",
            5,
            5,
            11,
            Answer::Ok(Reply::Bool(true), true.into()),
        ),
        response(
            "get-miss-response",
            6,
            6,
            8,
            Answer::Ok(Reply::Nil, rmpv::Value::Nil),
        ),
        response(
            "bad-argument-response",
            7,
            7,
            5,
            err(ErrorCode::BadArgument, "missing argument `key`"),
        ),
        response(
            "malformed-response",
            0,
            8,
            0,
            err(ErrorCode::Malformed, "stream ended 3 bytes into a frame"),
        ),
        response("lock-response", 8, 9, 23, Answer::Ok(grant, grant_value)),
        response(
            "locked-response",
            9,
            10,
            6,
            err(ErrorCode::Locked, "lock `session:42` is held"),
        ),
        response(
            "extend-response",
            10,
            11,
            12,
            Answer::Ok(
                extended,
                map(vec![("status", "OK".into()), ("ttl_ms", 60_000u64.into())]),
            ),
        ),
        response(
            "unlock-response",
            11,
            12,
            14,
            Answer::Ok(unlocked(Status::Ok), map(vec![("status", "OK".into())])),
        ),
        response(
            "unlock-not-owner-response",
            12,
            13,
            8,
            Answer::Ok(
                unlocked(Status::NotOwner),
                map(vec![("status", "NOT_OWNER".into())]),
            ),
        ),
        response(
            "fenced-response",
            13,
            14,
            10,
            err(ErrorCode::Fenced, &fenced),
        ),
        response(
            "locks-page-response",
            14,
            15,
            31,
            Answer::Ok(
                Reply::encode(&locks_page()).expect("a page encodes"),
                map(vec![
                    (
                        "locks",
                        rmpv::Value::Array(vec![map(vec![
                            ("key", LOCK_KEY.into()),
                            ("owner", "example#2".into()),
                            ("fence", (FIRST_FENCE + 1).into()),
                            ("age_ms", 1500u64.into()),
                            ("ttl_ms", 28_500u64.into()),
                            ("auto_renew", false.into()),
                            ("waiters", 0u64.into()),
                        ])]),
                    ),
                    ("total", 2u64.into()),
                    ("next", LOCK_KEY.into()),
                ]),
            ),
        ),
        ExpectedResponse {
            degraded: true,
            ..response(
                "get-degraded-response",
                14,
                15,
                9,
                Answer::Ok(
                    Reply::Value(Bytes::from_static(FENCED_VALUE)),
                    rmpv::Value::Binary(FENCED_VALUE.to_vec()),
                ),
            )
        },
    ]
}

/// The envelope head the daemon writes for a response, alone.
fn head(id: u64, request_id: &str, elapsed_us: u64, degraded: bool) -> Vec<u8> {
    let mut out = Vec::new();
    if degraded {
        write_degraded_response_head(&mut out, id, request_id, elapsed_us);
    } else {
        write_response_head(&mut out, id, request_id, elapsed_us);
    }
    out
}

/// Splits a response body into its head (`id`, `request_id`, `elapsed_us`, and `degraded` when
/// present) and the rest (`ok` or `err` and its value), checking the head is exactly what the
/// daemon's encoder writes for it.
fn split_response(body: &[u8]) -> (Response, Vec<u8>) {
    let response = Response::decode(body).expect("a response envelope");
    let head = head(
        response.id,
        &response.request_id,
        response.elapsed_us,
        response.degraded,
    );
    assert!(
        body.starts_with(&head),
        "the response does not start with the daemon's envelope head"
    );
    (response, body[head.len()..].to_vec())
}

// ---------------------------------------------------------------------------------------------------
// The document against the code

#[test]
fn the_spec_holds_every_expected_vector_and_each_is_one_whole_frame() {
    let vectors = vectors();
    let names: Vec<&str> = vectors.iter().map(|(n, _)| n.as_str()).collect();
    for name in expected_requests()
        .iter()
        .map(|(n, _)| *n)
        .chain(expected_responses().iter().map(|r| r.name))
    {
        assert!(
            names.contains(&name),
            "proto-spec.md has no vector `{name}`; it has {names:?}"
        );
    }
    for (name, frame) in &vectors {
        assert!(
            name.ends_with("-request") || name.ends_with("-response"),
            "vector `{name}`: names end in -request or -response"
        );
        let body = body_of(name, frame);
        assert!(body.len() <= MAX_FRAME_LEN);
    }
}

#[test]
fn request_vectors_decode_to_the_expected_requests_and_reencode_exactly() {
    for (name, expected) in expected_requests() {
        let frame = frame(name);
        let body = body_of(name, &frame);
        assert_eq!(
            decode_request(&body),
            Ok(expected.clone()),
            "vector `{name}` decodes wrongly"
        );
        assert_eq!(
            expected.to_msgpack(),
            body,
            "vector `{name}`: to_msgpack writes other bytes"
        );
        let mut framed = Vec::new();
        push_frame(&mut framed, &expected.to_msgpack());
        assert_eq!(
            framed, frame,
            "vector `{name}`: push_frame writes other bytes"
        );
    }
    // Any request vector, including ones added later, must round-trip.
    for (name, frame) in vectors().iter().filter(|(n, _)| n.ends_with("-request")) {
        let body = body_of(name, frame);
        let request = decode_request(&body)
            .unwrap_or_else(|(id, e)| panic!("vector `{name}` (id {id}) does not decode: {e}"));
        assert_eq!(
            request.to_msgpack(),
            body,
            "vector `{name}` does not re-encode to itself"
        );
    }
}

#[test]
fn response_vectors_decode_to_the_expected_responses_and_the_daemon_encoders_write_them() {
    for expected in expected_responses() {
        let name = expected.name;
        let request_id = fixed_request_id(expected.request_n);
        let frame = frame(name);

        let mut written = Vec::new();
        let start = begin_frame(&mut written);
        written.extend_from_slice(&head(
            expected.id,
            &request_id,
            expected.elapsed_us,
            expected.degraded,
        ));
        match &expected.answer {
            Answer::Ok(reply, _) => {
                write_ok_key(&mut written);
                reply.write(&mut written);
            }
            Answer::Err(code, message) => write_err(&mut written, *code, message),
        }
        finish_frame(&mut written, start);
        assert_eq!(
            written, frame,
            "vector `{name}`: the daemon's encoders write other bytes"
        );

        let decoded = Response::decode(&body_of(name, &frame))
            .unwrap_or_else(|e| panic!("vector `{name}` does not decode: {e}"));
        let (ok, err) = match expected.answer {
            Answer::Ok(_, value) => (value, None),
            Answer::Err(code, message) => (
                rmpv::Value::Nil,
                Some(WireError {
                    code: code.as_str().into(),
                    message,
                }),
            ),
        };
        let want = Response {
            id: expected.id,
            request_id,
            elapsed_us: expected.elapsed_us,
            degraded: expected.degraded,
            ok,
            err,
        };
        assert_eq!(decoded, want, "vector `{name}` decodes wrongly");
    }
}

#[test]
fn every_response_vector_is_the_envelope_in_order() {
    for (name, frame) in vectors().iter().filter(|(n, _)| n.ends_with("-response")) {
        let body = body_of(name, frame);
        let value = rmpv::decode::read_value(&mut &body[..])
            .unwrap_or_else(|e| panic!("vector `{name}` is not MessagePack: {e}"));
        let rmpv::Value::Map(members) = value else {
            panic!("vector `{name}` is not a map");
        };
        let keys: Vec<&str> = members
            .iter()
            .map(|(k, _)| k.as_str().expect("str keys"))
            .collect();
        // Four members, or five with the optional `degraded: true` fourth.
        let degraded = keys.len() == 5 && keys[3] == "degraded";
        assert_eq!(
            keys.len(),
            if degraded { 5 } else { 4 },
            "vector `{name}`: {keys:?}"
        );
        if degraded {
            assert_eq!(members[3].1, rmpv::Value::Boolean(true), "vector `{name}`");
        }
        assert_eq!(
            keys[..3],
            ["id", "request_id", "elapsed_us"],
            "vector `{name}`"
        );
        let last = keys[keys.len() - 1];
        assert!(last == "ok" || last == "err", "vector `{name}`: {keys:?}");

        // Re-encoding what was decoded, in the smallest forms, gives the same bytes.
        let (response, rest) = split_response(&body);
        assert!(
            is_request_id(&response.request_id),
            "vector `{name}`: {}",
            response.request_id
        );
        let mut tail = Vec::new();
        match &response.err {
            Some(err) => {
                let code = ErrorCode::parse(&err.code)
                    .unwrap_or_else(|| panic!("vector `{name}`: unknown code {}", err.code));
                write_err(&mut tail, code, &err.message);
            }
            None => {
                write_ok_key(&mut tail);
                rmpv::encode::write_value(&mut tail, &response.ok).expect("write to a Vec");
            }
        }
        assert_eq!(
            tail, rest,
            "vector `{name}` is not in the smallest encoding"
        );
    }
}

#[test]
fn the_error_table_lists_every_error_code_in_order() {
    let listed: Vec<&str> = section("Error codes")
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once('`').map(|(code, _)| code))
        .collect();
    let all: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        listed, all,
        "the error table of proto-spec.md and ErrorCode::ALL differ"
    );
}

#[test]
fn every_command_has_a_heading() {
    let headings: Vec<Vec<&str>> = SPEC
        .lines()
        .filter(|line| line.starts_with('#'))
        .map(|line| {
            line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .collect()
        })
        .collect();
    for cmd in CommandName::ALL {
        let name = cmd.as_str();
        assert!(
            headings.iter().any(|words| words.contains(&name)),
            "proto-spec.md has no heading naming {name}"
        );
        assert!(
            SPEC.contains(&format!("`{name}`")),
            "proto-spec.md never writes `{name}`"
        );
    }
    assert!(
        SPEC.contains("\n## Session locks\n"),
        "proto-spec.md lost its `## Session locks` section"
    );
}

#[test]
fn the_limits_table_states_the_limits_of_the_code() {
    let limits = section("Limits");
    for (what, value) in [
        ("frame body", MAX_FRAME_LEN as u64),
        ("key", MAX_KEY_LEN as u64),
        ("value", MAX_VALUE_LEN as u64),
        ("PING delay", MAX_PING_DELAY_MS),
        ("lock lease and wait", MAX_LOCK_MS),
        ("lock record retention", FENCE_RETENTION.as_secs()),
        ("HELLO client name", MAX_CLIENT_NAME_LEN as u64),
        ("lock records", DEFAULT_MAX_LOCKS as u64),
        ("waiters per lock", DEFAULT_MAX_WAITERS as u64),
        ("auto-renew lease", AUTO_RENEW_MIN_LEASE.as_millis() as u64),
    ] {
        assert!(
            limits.contains(&value.to_string()),
            "the limits table does not give the {what} limit {value}"
        );
    }
}

#[test]
fn the_answer_tables_list_the_members_the_daemon_writes() {
    let grant = Grant {
        token: OWNER_TOKEN.into(),
        fence: 1,
        ttl_ms: 1,
        waited_us: 0,
    };
    assert_eq!(
        table_names(subsection("### LOCK"), "Member"),
        member_names(&grant),
        "LOCK's answer table and Grant differ"
    );
    let row = LockInfo {
        key: LOCK_KEY.into(),
        owner: "example#1".into(),
        fence: 1,
        age_ms: 0,
        ttl_ms: 1,
        auto_renew: false,
        waiters: 0,
    };
    assert_eq!(
        table_names(subsection("### LOCKS"), "Member"),
        member_names(&row),
        "LOCKS's answer table and LockInfo differ"
    );
    assert_eq!(
        table_names(subsection("### LOCKS"), "Page member"),
        member_names(&locks_page()),
        "LOCKS's page table and LockPage differ"
    );
    let statuses: Vec<String> = [
        Status::Ok,
        Status::NotLocked,
        Status::NotOwner,
        Status::Expired,
    ]
    .iter()
    .map(|status| {
        let bytes = rmp_serde::to_vec(status).expect("encodes");
        rmpv::decode::read_value(&mut &bytes[..])
            .expect("MessagePack")
            .as_str()
            .expect("a status is a str")
            .to_string()
    })
    .collect();
    assert_eq!(
        table_names(subsection("### UNLOCK"), "`status`"),
        statuses,
        "UNLOCK's status table and Status differ"
    );
    assert_eq!(
        member_names(&UnlockAnswer { status: Status::Ok }),
        ["status"]
    );
    assert_eq!(
        member_names(&ExtendAnswer {
            status: Status::Ok,
            ttl_ms: 1
        }),
        ["status", "ttl_ms"]
    );
    assert!(subsection("### EXTEND").contains("`{status: str, ttl_ms: uint}`"));
    let stats_locks: Vec<String> = table_names(subsection("### STATS"), "Member")
        .into_iter()
        .filter_map(|name| name.strip_prefix("locks.").map(str::to_string))
        .collect();
    assert_eq!(
        stats_locks,
        member_names(&LockStats::default()),
        "the STATS `locks` rows and LockStats differ"
    );
}

/// The anchor a heading gets: lower case, spaces to hyphens, other punctuation dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_link_to_an_anchor_names_a_heading() {
    let mut anchors: Vec<String> = Vec::new();
    let mut in_code = false;
    for line in SPEC.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        if in_code || !line.starts_with('#') {
            continue;
        }
        let base = slug(line.trim_start_matches('#'));
        let taken = anchors
            .iter()
            .filter(|a| {
                **a == base
                    || a.strip_prefix(&format!("{base}-"))
                        .is_some_and(|n| n.parse::<u32>().is_ok())
            })
            .count();
        anchors.push(if taken == 0 {
            base
        } else {
            format!("{base}-{taken}")
        });
    }
    for (at, _) in SPEC.match_indices("](#") {
        let target = &SPEC[at + 3..];
        let target = &target[..target.find(')').expect("a closed link")];
        assert!(
            anchors.iter().any(|a| a == target),
            "link to `#{target}`, which no heading has; headings: {anchors:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------------
// The vectors against a running daemon

/// The next frame body from the daemon, or `None` when it closed the connection.
async fn next_frame(conn: &mut RawConn, buf: &mut BytesMut) -> Option<Vec<u8>> {
    tokio::time::timeout(STARTUP_LIMIT, async {
        loop {
            if let Some(body) = take_frame(buf, MAX_FRAME_LEN).expect("a frame within the limit") {
                return Some(body.to_vec());
            }
            if conn.stream.read_buf(buf).await.expect("read") == 0 {
                assert!(buf.is_empty(), "the daemon's stream ended inside a frame");
                return None;
            }
        }
    })
    .await
    .expect("no answer from scaled within 20 s")
}

/// Checks a live answer against a response vector: same id as the request, a well-formed request_id,
/// and the same `ok`/`err` bytes. HELLO's `server` names the daemon's version, so it is compared by
/// meaning, with `server` left out.
fn assert_answers_like(live: &[u8], request_id: u64, vector: &str) {
    let (live, live_rest) = split_response(live);
    let (want, want_rest) = split_response(&body(vector));
    assert_eq!(
        live.id, request_id,
        "answer for `{vector}` carries another id"
    );
    assert!(
        is_request_id(&live.request_id),
        "request_id `{}` is not a UUID",
        live.request_id
    );
    if vector == "hello-response" {
        let without_server = |v: &rmpv::Value| -> Vec<(rmpv::Value, rmpv::Value)> {
            let map = v.as_map().expect("HELLO answers a map");
            map.iter()
                .filter(|(k, _)| k.as_str() != Some("server"))
                .cloned()
                .collect()
        };
        assert!(live.err.is_none(), "HELLO failed: {:?}", live.err);
        assert_eq!(without_server(&live.ok), without_server(&want.ok));
        let server = live
            .ok
            .as_map()
            .unwrap()
            .iter()
            .find(|(k, _)| k.as_str() == Some("server"));
        assert!(
            server
                .and_then(|(_, v)| v.as_str())
                .is_some_and(|s| s.starts_with("scaled ")),
            "HELLO's server: {server:?}"
        );
    } else {
        assert_eq!(
            live_rest, want_rest,
            "the daemon's answer differs from `{vector}`: {:?} {:?}",
            live.ok, live.err
        );
    }
}

fn request_id_of(vector: &str) -> u64 {
    decode_request(&body(vector)).expect("a request vector").id
}

#[tokio::test]
async fn request_vectors_sent_to_a_daemon_get_the_answers_of_the_response_vectors() {
    let daemon = TestDaemon::start(&[]);
    let mut conn = daemon.raw_without_hello().await;
    let mut buf = BytesMut::new();

    // Before HELLO, anything else is refused, and the connection stays usable.
    conn.send_bytes(&frame("ping-request")).await;
    let refused = Response::decode(&next_frame(&mut conn, &mut buf).await.expect("an answer"))
        .expect("a response");
    assert_eq!(refused.id, 2);
    assert_eq!(
        refused.err.map(|e| e.code),
        Some("HELLO_REQUIRED".to_string())
    );

    // The story of the vectors, pipelined in one write. Every answer is ready at once, so they come
    // back in request order.
    let story = [
        ("hello-request", "hello-response"),
        ("ping-request", "ping-response"),
        ("set-request", "set-response"),
        ("get-request", "get-hit-response"),
        ("del-request", "del-response"),
        ("get-request", "get-miss-response"),
        ("get-without-key-request", "bad-argument-response"),
    ];
    let mut all = Vec::new();
    for (request, _) in story {
        all.extend_from_slice(&frame(request));
    }
    conn.send_bytes(&all).await;
    for (request, response) in story {
        let live = next_frame(&mut conn, &mut buf).await.expect("an answer");
        assert_answers_like(&live, request_id_of(request), response);
    }
}

#[tokio::test]
async fn a_stream_ending_inside_a_frame_gets_the_malformed_vector_then_closes() {
    let daemon = TestDaemon::start(&[]);
    let mut conn = daemon.raw_without_hello().await;
    let mut buf = BytesMut::new();
    conn.send_bytes(&frame("hello-request")[..3]).await;
    conn.stream
        .shutdown()
        .await
        .expect("shut down the write side");
    let live = next_frame(&mut conn, &mut buf).await.expect("an answer");
    let (response, _) = split_response(&live);
    assert_eq!(response.elapsed_us, 0);
    assert_answers_like(&live, 0, "malformed-response");
    assert!(
        next_frame(&mut conn, &mut buf).await.is_none(),
        "the connection stays open"
    );
}

#[tokio::test]
async fn framing_limits_behave_as_specified() {
    let daemon = TestDaemon::start(&[]);
    let mut conn = daemon.raw_without_hello().await;
    let mut buf = BytesMut::new();
    let code_of = |body: &[u8]| {
        let response = Response::decode(body).expect("a response");
        (response.id, response.err.map(|e| e.code))
    };

    // A zero-length frame is MALFORMED with id 0, and the connection stays open.
    conn.send_bytes(&[0, 0, 0, 0]).await;
    let answer = next_frame(&mut conn, &mut buf).await.expect("an answer");
    assert_eq!(code_of(&answer), (0, Some("MALFORMED".to_string())));

    // A body of exactly the limit is read (it is not a request, so MALFORMED), and the connection stays
    // open.
    let mut largest = Vec::new();
    push_frame(&mut largest, &vec![0u8; MAX_FRAME_LEN]);
    conn.send_bytes(&largest).await;
    let answer = next_frame(&mut conn, &mut buf).await.expect("an answer");
    assert_eq!(code_of(&answer), (0, Some("MALFORMED".to_string())));

    conn.send_bytes(&frame("hello-request")).await;
    let answer = next_frame(&mut conn, &mut buf).await.expect("an answer");
    assert_answers_like(&answer, 1, "hello-response");

    // One byte over the limit: FRAME_TOO_LARGE with id 0, then the daemon closes.
    conn.send_bytes(&(MAX_FRAME_LEN as u32 + 1).to_be_bytes())
        .await;
    let answer = next_frame(&mut conn, &mut buf).await.expect("an answer");
    assert_eq!(code_of(&answer), (0, Some("FRAME_TOO_LARGE".to_string())));
    assert!(
        next_frame(&mut conn, &mut buf).await.is_none(),
        "the connection stays open"
    );
}

/// A request vector with the owner token the daemon really granted (and, if given, another id), framed.
fn with_token(vector: &str, id: Option<u64>, token: &str) -> Vec<u8> {
    let mut request = decode_request(&body(vector)).expect("a request vector");
    request.args.token = Some(token.to_string());
    if let Some(id) = id {
        request.id = id;
    }
    framed(&request)
}

/// The EXTEND vector with another id, the real owner token and no `ttl_ms`, framed.
fn extend_keeping_the_lease(id: u64, token: &str) -> Vec<u8> {
    let mut request = decode_request(&body("extend-request")).expect("a request vector");
    request.id = id;
    request.args.token = Some(token.to_string());
    request.args.ttl_ms = None;
    framed(&request)
}

fn framed(request: &Request) -> Vec<u8> {
    let mut out = Vec::new();
    push_frame(&mut out, &request.to_msgpack());
    out
}

/// Sends a frame and waits for the next answer on the connection.
async fn call(conn: &mut RawConn, buf: &mut BytesMut, frame: &[u8]) -> Vec<u8> {
    conn.send_bytes(frame).await;
    next_frame(conn, buf).await.expect("an answer")
}

/// `bytes` with the first occurrence of `from` replaced by `to`.
fn replace_once(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .unwrap_or_else(|| panic!("the bytes do not hold {from:02x?}"));
    [&bytes[..at], to, &bytes[at + from.len()..]].concat()
}

/// A uint in the smallest MessagePack form, as the daemon and a minimal client write it.
fn msgpack_uint(n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    rmp::encode::write_uint(&mut out, n).expect("write to a Vec");
    out
}

/// A `fence` member: its key and its uint, as they follow each other in a grant or a fence map.
fn fence_member(fence: u64) -> Vec<u8> {
    let mut out = Vec::new();
    rmp::encode::write_str(&mut out, "fence").expect("write to a Vec");
    out.extend_from_slice(&msgpack_uint(fence));
    out
}

/// A `token` member holding a fencing token, as in a fence map.
fn fence_token_member(token: u64) -> Vec<u8> {
    let mut out = Vec::new();
    rmp::encode::write_str(&mut out, "token").expect("write to a Vec");
    out.extend_from_slice(&msgpack_uint(token));
    out
}

/// Microseconds since the Unix epoch on the system clock, as the daemon reads it to start its fences.
fn wall_clock_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the system clock reads after 1970")
        .as_micros() as u64
}

/// Checks a live grant: a fresh lower-case version 4 UUID as owner token, and then, with the vector's
/// owner token and fencing token put in place of the live ones, byte for byte the `ok` part of
/// `lock-response`. Returns the live owner token and fencing token.
fn assert_grant_like_the_vector(live: &[u8], request_id: u64) -> (String, u64) {
    let (response, rest) = split_response(live);
    assert_eq!(response.id, request_id, "the grant carries another id");
    assert!(response.err.is_none(), "LOCK failed: {:?}", response.err);
    let token = response.ok["token"]
        .as_str()
        .expect("a str owner token")
        .to_string();
    let b = token.as_bytes();
    assert!(
        is_request_id(&token) && b[14] == b'4' && b"89ab".contains(&b[19]),
        "owner token `{token}` is not a lower-case version 4 UUID"
    );
    assert_ne!(token, OWNER_TOKEN);
    let fence = response.ok["fence"].as_u64().expect("a uint fencing token");
    let (_, want) = split_response(&body("lock-response"));
    let as_in_the_vector = replace_once(
        &replace_once(&rest, token.as_bytes(), OWNER_TOKEN.as_bytes()),
        &fence_member(fence),
        &fence_member(FIRST_FENCE),
    );
    assert_eq!(
        as_in_the_vector, want,
        "the grant differs from `lock-response`: {}",
        response.ok
    );
    (token, fence)
}

/// The fenced SET vector with the fence `{lock, token}` in place of the vector's, framed. With the
/// vector's lock it differs from the vector in the fencing token alone.
fn fenced_set(lock: &str, token: u64) -> Vec<u8> {
    let vector = body("set-fenced-request");
    let mut request = decode_request(&vector).expect("a request vector");
    request.args.fence = Some(Fence {
        lock: lock.to_string(),
        token,
    });
    let rebuilt = request.to_msgpack();
    if lock == LOCK_KEY {
        assert_eq!(
            replace_once(
                &rebuilt,
                &fence_token_member(token),
                &fence_token_member(FIRST_FENCE)
            ),
            vector,
            "the fenced SET differs from `set-fenced-request` in more than its token"
        );
    }
    framed(&request)
}

/// Checks a live FENCED answer against `fenced-response`: the same code, and the vector's message with
/// the real lock and numbers in place of the vector's, byte for byte as the daemon encodes it.
fn assert_fenced_like_the_vector(
    live: &[u8],
    request_id: u64,
    lock: &str,
    token: u64,
    newest: u64,
) {
    let (response, rest) = split_response(live);
    assert_eq!(response.id, request_id, "the answer carries another id");
    let (vector, _) = split_response(&body("fenced-response"));
    let want = vector.err.expect("`fenced-response` is an error");
    let got = response
        .err
        .unwrap_or_else(|| panic!("the fenced write was made: {}", response.ok));
    assert_eq!(got.code, want.code);
    // The vector's message is `<before><token><middle><newest><after>`.
    let (before, tail) = want
        .message
        .split_once(&FIRST_FENCE.to_string())
        .expect("the vector's message names its token");
    let (middle, after) = tail
        .split_once(&(FIRST_FENCE + 1).to_string())
        .expect("the vector's message names the newest grant");
    let middle = middle.replacen(&format!("`{LOCK_KEY}`"), &format!("`{lock}`"), 1);
    let message = format!("{before}{token}{middle}{newest}{after}");
    assert_eq!(got.message, message);
    let mut tail = Vec::new();
    write_err(&mut tail, ErrorCode::Fenced, &message);
    assert_eq!(
        rest, tail,
        "the FENCED answer is not encoded as the vector's"
    );
}

/// The daemon's STATS `locks` map.
async fn lock_stats(conn: &mut RawConn, buf: &mut BytesMut, id: u64) -> rmpv::Value {
    let answer = call(conn, buf, &framed(&Request::new(id, CommandName::Stats))).await;
    let response = Response::decode(&answer).expect("a response");
    response.ok["locks"].clone()
}

/// Asks LOCKS until `done` holds for the listing, failing after STARTUP_LIMIT.
async fn locks_until(
    conn: &mut RawConn,
    buf: &mut BytesMut,
    what: &str,
    done: impl Fn(&[rmpv::Value]) -> bool,
) -> Vec<rmpv::Value> {
    let deadline = tokio::time::Instant::now() + STARTUP_LIMIT;
    for id in 1000.. {
        let answer = call(conn, buf, &framed(&Request::new(id, CommandName::Locks))).await;
        let response = Response::decode(&answer).expect("a response");
        let rows = response
            .ok
            .as_array()
            .expect("LOCKS answers an array")
            .clone();
        if done(&rows) {
            return rows;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "LOCKS never showed {what}: {rows:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    unreachable!()
}

#[tokio::test]
async fn the_lock_vectors_replayed_against_a_daemon_get_the_answers_of_the_response_vectors() {
    let before_start = wall_clock_micros();
    let daemon = TestDaemon::start(&[]);
    let (mut a, mut a_buf) = (daemon.raw_without_hello().await, BytesMut::new());
    let (mut b, mut b_buf) = (daemon.raw_without_hello().await, BytesMut::new());
    for (conn, buf) in [(&mut a, &mut a_buf), (&mut b, &mut b_buf)] {
        let hello = call(conn, buf, &frame("hello-request")).await;
        assert_answers_like(&hello, 1, "hello-response");
    }

    // A takes the lock at once, without waiting: the daemon's first grant. Its fencing token is one
    // above the wall clock in microseconds when the daemon started.
    let live = call(&mut a, &mut a_buf, &frame("lock-request")).await;
    let (token, first) = assert_grant_like_the_vector(&live, request_id_of("lock-request"));
    let after_grant = wall_clock_micros();
    assert!(
        first > before_start,
        "the first fencing token {first} is not above the clock before the start, {before_start}"
    );
    assert!(
        first <= after_grant + 1,
        "the first fencing token {first} is ahead of the clock, {after_grant}"
    );

    // B, in try mode, is refused with exactly the vector's error.
    let live = call(&mut b, &mut b_buf, &frame("lock-try-request")).await;
    assert_answers_like(&live, 9, "locked-response");

    // EXTEND without `ttl_ms` renews the lease granted, 30 s, not LOCK_TIMEOUT.
    let live = call(&mut a, &mut a_buf, &extend_keeping_the_lease(40, &token)).await;
    let response = Response::decode(&live).expect("a response");
    assert!(response.err.is_none(), "EXTEND failed: {:?}", response.err);
    assert_eq!(response.ok["status"].as_str(), Some("OK"));
    assert_eq!(response.ok["ttl_ms"].as_u64(), Some(30_000));

    // A extends its lease, with its real token.
    let live = call(
        &mut a,
        &mut a_buf,
        &with_token("extend-request", None, &token),
    )
    .await;
    assert_answers_like(&live, 10, "extend-response");

    // Without `ttl_ms` again, EXTEND keeps the 60 s the last EXTEND set: the vector's answer.
    let live = call(&mut a, &mut a_buf, &extend_keeping_the_lease(41, &token)).await;
    assert_answers_like(&live, 41, "extend-response");

    // A's fenced SET carries the newest grant, its own, so it is written.
    let live = call(&mut a, &mut a_buf, &fenced_set(LOCK_KEY, first)).await;
    assert_answers_like(&live, 13, "set-response");

    // B queues for the lock; LOCKS shows A holding it with B waiting behind.
    b.send_bytes(&frame("lock-request")).await;
    let rows = locks_until(&mut a, &mut a_buf, "one waiter", |rows| {
        rows.len() == 1 && rows[0]["waiters"].as_u64() == Some(1)
    })
    .await;
    let row = &rows[0];
    let names: Vec<&str> = row
        .as_map()
        .expect("a LOCKS row is a map")
        .iter()
        .map(|(k, _)| k.as_str().expect("str keys"))
        .collect();
    assert_eq!(names, table_names(subsection("### LOCKS"), "Member"));
    assert_eq!(row["key"].as_str(), Some(LOCK_KEY));
    assert!(row["owner"]
        .as_str()
        .is_some_and(|o| o.starts_with("example#")));
    assert_eq!(row["fence"].as_u64(), Some(first));
    assert_eq!(row["auto_renew"].as_bool(), Some(false));
    assert!(row["ttl_ms"].as_u64().is_some_and(|ms| ms <= 60_000));

    // A unlocks; the lock goes straight to B, with the next fencing token.
    let live = call(
        &mut a,
        &mut a_buf,
        &with_token("unlock-request", None, &token),
    )
    .await;
    assert_answers_like(&live, 11, "unlock-response");
    let handed = Response::decode(&next_frame(&mut b, &mut b_buf).await.expect("B's grant"))
        .expect("a response");
    assert_eq!(handed.id, request_id_of("lock-request"));
    assert!(handed.err.is_none(), "B's LOCK failed: {:?}", handed.err);
    assert_eq!(handed.ok["fence"].as_u64(), Some(first + 1));
    assert_eq!(handed.ok["ttl_ms"].as_u64(), Some(30_000));
    assert!(handed.ok["waited_us"].as_u64().is_some_and(|us| us > 0));
    assert_ne!(handed.ok["token"].as_str(), Some(token.as_str()));

    // A's token no longer holds the lock, and its fencing token is stale.
    let live = call(
        &mut a,
        &mut a_buf,
        &with_token("unlock-request", Some(12), &token),
    )
    .await;
    assert_answers_like(&live, 12, "unlock-not-owner-response");
    let live = call(&mut a, &mut a_buf, &fenced_set(LOCK_KEY, first)).await;
    assert_fenced_like_the_vector(&live, 13, LOCK_KEY, first, first + 1);

    // LOCKS with `limit` answers a page; B's lock is the only one held, so it is the last page.
    let live = call(&mut a, &mut a_buf, &frame("locks-page-request")).await;
    let page = Response::decode(&live).expect("a response").ok;
    let names: Vec<&str> = page
        .as_map()
        .expect("a LOCKS page is a map")
        .iter()
        .map(|(k, _)| k.as_str().expect("str keys"))
        .collect();
    assert_eq!(names, table_names(subsection("### LOCKS"), "Page member"));
    assert_eq!(page["total"].as_u64(), Some(1));
    assert_eq!(page["next"], rmpv::Value::Nil);
    let rows = page["locks"].as_array().expect("a LOCKS page has rows");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["key"].as_str(), Some(LOCK_KEY));
    assert_eq!(rows[0]["fence"].as_u64(), Some(first + 1));

    // A lock never taken is fenced by the counter's start value, one below the first grant: only that
    // token is accepted on it, and 0 never is.
    let never = "session:never-locked";
    let live = call(&mut a, &mut a_buf, &fenced_set(never, first)).await;
    assert_fenced_like_the_vector(&live, 13, never, first, first - 1);
    let live = call(&mut a, &mut a_buf, &fenced_set(never, 0)).await;
    assert_fenced_like_the_vector(&live, 13, never, 0, first - 1);
    let live = call(&mut a, &mut a_buf, &fenced_set(never, first - 1)).await;
    assert_answers_like(&live, 13, "set-response");

    // STATS `locks` has the members the spec lists, and counts the story.
    let stats = lock_stats(&mut a, &mut a_buf, 20).await;
    let names: Vec<String> = stats
        .as_map()
        .expect("STATS `locks` is a map")
        .iter()
        .map(|(k, _)| k.as_str().expect("str keys").to_string())
        .collect();
    assert_eq!(names, member_names(&LockStats::default()));
    for (name, want) in [
        ("held", 1),
        ("waiters", 0),
        ("requests", 3),
        ("grants", 2),
        ("timeouts", 0),
        ("refused", 1),
        ("released_on_disconnect", 0),
    ] {
        assert_eq!(stats[name].as_u64(), Some(want), "locks.{name}");
    }
    assert_eq!(stats["contention"].as_f64(), Some(66.67));
    assert!(stats["wait_p50"].as_f64().is_some_and(|s| s > 0.0));

    // B's connection ends: its lock is released at once, without waiting for the lease.
    drop(b);
    locks_until(&mut a, &mut a_buf, "no lock", |rows| rows.is_empty()).await;
    let stats = lock_stats(&mut a, &mut a_buf, 21).await;
    assert_eq!(stats["released_on_disconnect"].as_u64(), Some(1));

    // The limits of `ttl_ms` and `wait_ms`.
    let lock = |id, ttl_ms, wait_ms| {
        framed(&Request {
            args: Args {
                key: Some("limits".into()),
                ttl_ms,
                wait_ms,
                ..Args::default()
            },
            ..Request::new(id, CommandName::Lock)
        })
    };
    for (id, ttl_ms, wait_ms) in [
        (30, Some(0), None),
        (31, Some(MAX_LOCK_MS + 1), None),
        (32, None, Some(MAX_LOCK_MS + 1)),
    ] {
        let live = call(&mut a, &mut a_buf, &lock(id, ttl_ms, wait_ms)).await;
        let response = Response::decode(&live).expect("a response");
        assert_eq!(
            response.err.map(|e| e.code).as_deref(),
            Some("BAD_ARGUMENT"),
            "LOCK with ttl_ms {ttl_ms:?}, wait_ms {wait_ms:?}"
        );
    }
    let live = call(
        &mut a,
        &mut a_buf,
        &lock(33, Some(MAX_LOCK_MS), Some(MAX_LOCK_MS)),
    )
    .await;
    let response = Response::decode(&live).expect("a response");
    assert!(response.err.is_none(), "{:?}", response.err);
    assert_eq!(response.ok["ttl_ms"].as_u64(), Some(MAX_LOCK_MS));
}

#[tokio::test]
async fn a_lock_whose_default_wait_is_zero_is_in_try_mode() {
    // LOCK_RETRY_DELAY × LOCK_MAX_RETRIES = 0: a LOCK without `wait_ms` does not wait.
    let daemon = TestDaemon::start(&["--lock-max-retries", "0"]);
    let (mut a, mut a_buf) = (daemon.raw_without_hello().await, BytesMut::new());
    let (mut b, mut b_buf) = (daemon.raw_without_hello().await, BytesMut::new());
    for (conn, buf) in [(&mut a, &mut a_buf), (&mut b, &mut b_buf)] {
        let hello = call(conn, buf, &frame("hello-request")).await;
        assert_answers_like(&hello, 1, "hello-response");
    }
    let live = call(&mut a, &mut a_buf, &frame("lock-request")).await;
    assert_grant_like_the_vector(&live, request_id_of("lock-request"));

    // B asks without `wait_ms` and without `try`, and is refused at once as the try-mode vector is.
    let mut request = decode_request(&body("lock-try-request")).expect("a request vector");
    request.args.try_only = None;
    let live = call(&mut b, &mut b_buf, &framed(&request)).await;
    assert_answers_like(&live, 9, "locked-response");
    let stats = lock_stats(&mut a, &mut a_buf, 20).await;
    assert_eq!(stats["refused"].as_u64(), Some(1), "locks.refused");
    assert_eq!(stats["timeouts"].as_u64(), Some(0), "locks.timeouts");
    assert_eq!(stats["waiters"].as_u64(), Some(0), "locks.waiters");
}

// ---------------------------------------------------------------------------------------------------
// The fuzzers' seed corpus (client/fuzz/seeds/), made from the request vectors so it follows the spec

/// Where the fuzz targets' seeds live: one directory per target.
const SEEDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/client/fuzz/seeds");

/// The seed files each target should have, by file name: for `request`, the body of every request
/// vector; for `frames`, the HELLO frame followed by each request vector's frame (a connection must
/// greet first), and one seed that is the whole conversation of the lock vectors in order.
fn expected_seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let requests: Vec<(String, Vec<u8>)> = vectors()
        .into_iter()
        .filter(|(name, _)| name.ends_with("-request"))
        .collect();
    let hello = frame("hello-request");
    let mut seeds = Vec::new();
    for (name, frame) in &requests {
        seeds.push(("request", name.clone(), body_of(name, frame)));
        let mut stream = hello.clone();
        if name != "hello-request" {
            stream.extend_from_slice(frame);
        }
        seeds.push(("frames", name.clone(), stream));
    }
    let mut conversation = hello.clone();
    for (name, frame) in &requests {
        if name != "hello-request" {
            conversation.extend_from_slice(frame);
        }
    }
    seeds.push(("frames", "every-request".to_string(), conversation));
    seeds
}

/// The seeds on disk must be exactly the ones the spec's vectors make. After changing a vector, run
/// this test with SCALED_WRITE_FUZZ_SEEDS=1 to rewrite them.
#[test]
fn the_fuzz_seeds_are_the_spec_request_vectors() {
    let expected = expected_seeds();
    if std::env::var_os("SCALED_WRITE_FUZZ_SEEDS").is_some() {
        for target in ["request", "frames"] {
            let dir = std::path::Path::new(SEEDS).join(target);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create the seed directory");
        }
        for (target, name, bytes) in &expected {
            let path = std::path::Path::new(SEEDS).join(target).join(name);
            std::fs::write(&path, bytes).expect("write a seed");
        }
    }
    for target in ["request", "frames"] {
        let dir = std::path::Path::new(SEEDS).join(target);
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| {
                entry
                    .expect("a directory entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        on_disk.sort();
        let mut wanted: Vec<String> = expected
            .iter()
            .filter(|(t, _, _)| *t == target)
            .map(|(_, name, _)| name.clone())
            .collect();
        wanted.sort();
        assert_eq!(
            on_disk, wanted,
            "{}: the seeds differ from the spec's request vectors; rerun with SCALED_WRITE_FUZZ_SEEDS=1",
            dir.display()
        );
    }
    for (target, name, bytes) in &expected {
        let path = std::path::Path::new(SEEDS).join(target).join(name);
        let on_disk = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            &on_disk,
            bytes,
            "{} differs from proto-spec.md; rerun with SCALED_WRITE_FUZZ_SEEDS=1",
            path.display()
        );
    }
}
