//! Random and mutated frames sent to a live daemon: whatever a client sends, the daemon answers it as
//! proto-spec.md says, or closes cleanly, and never panics, hangs, or lets one connection's garbage
//! disturb another's work.
//!
//! Each case is one byte stream on a fresh connection: a valid request mutated (a bit flipped, cut
//! short, a member of another type, members missing or added, bytes inserted, a length prefix that is
//! huge or lies), or plain random bytes, followed by a PING that shows the connection still works. The
//! expected answers come from simulating the stream with the client crate's framing and decoder, which
//! the daemon shares, so the property is exact: every frame that is not a request gets `MALFORMED`
//! under the id the spec says, every request gets an answer under its id, a prefix over the limit gets
//! `FRAME_TOO_LARGE` and a close, and a stream ending inside a frame gets `MALFORMED` id 0 and a close.
//! Between cases another connection's SET and GET must still be answered correctly, and at the end the
//! daemon must be alive with no panic in its log.
//!
//! The cases are drawn from a fixed seed, so a failure replays the same way; proptest then shrinks it
//! to a small stream, printed in the failure.

mod common;

use std::fs::File;
use std::time::Duration;

use bytes::BytesMut;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use tokio::io::AsyncWriteExt;

use common::{RawConn, TestDaemon};
use scaled_client::decode_request;
use scaled_client::frame::{push_frame, take_frame};
use scaled_client::proto::{
    CommandName, Request, Response, MAX_CLIENT_NAME_LEN, MAX_FRAME_LEN, PROTOCOL_VERSION,
};

/// How many streams one run sends: enough to reach every mutation many times, few enough that the
/// suite stays quick on a small machine.
const CASES: u32 = 512;

/// How long one case may take to be answered and closed before it counts as a hang.
const ANSWER_LIMIT: Duration = Duration::from_secs(10);

/// The id of the PING that follows each mutated frame (unless the frame's own id is this one).
const PROBE_ID: u64 = 0x5eed_0000_0000_0001;

/// A member name the daemon knows, or a few it does not.
const NAMES: &[&str] = &[
    "id",
    "cmd",
    "args",
    "session_id",
    "user_id",
    "version",
    "client",
    "key",
    "value",
    "ttl_ms",
    "wait_ms",
    "try",
    "auto_renew",
    "token",
    "fence",
    "delay_ms",
    "limit",
    "after",
    "lock",
    "x",
];

fn s(text: &str) -> rmpv::Value {
    rmpv::Value::from(text)
}

fn map(members: Vec<(&str, rmpv::Value)>) -> rmpv::Value {
    rmpv::Value::Map(members.into_iter().map(|(k, v)| (s(k), v)).collect())
}

/// One valid request of each command (a HELLO first of all), as MessagePack values to mutate.
fn valid_requests() -> Vec<rmpv::Value> {
    let key = || ("key", s("prop:k"));
    let envelope = |id: u64, cmd: &str, args: Vec<(&str, rmpv::Value)>| {
        let mut members = vec![("id", rmpv::Value::from(id)), ("cmd", s(cmd))];
        if !args.is_empty() {
            members.push(("args", map(args)));
        }
        members.push(("session_id", s("sess")));
        map(members)
    };
    vec![
        envelope(
            1,
            "HELLO",
            vec![("version", PROTOCOL_VERSION.into()), ("client", s("prop"))],
        ),
        envelope(2, "PING", vec![]),
        envelope(3, "GET", vec![key()]),
        envelope(
            4,
            "SET",
            vec![
                key(),
                ("value", rmpv::Value::Binary(vec![0, 1, 0xff])),
                ("ttl_ms", 60_000.into()),
            ],
        ),
        envelope(5, "DEL", vec![key()]),
        envelope(
            6,
            "LOCK",
            vec![key(), ("ttl_ms", 5_000.into()), ("wait_ms", 0.into())],
        ),
        envelope(
            7,
            "UNLOCK",
            vec![key(), ("token", s("5f0c8a1e-2b7d-4c39-a6e4-1d9b3f7c2e80"))],
        ),
        envelope(
            8,
            "EXTEND",
            vec![
                key(),
                ("token", s("5f0c8a1e-2b7d-4c39-a6e4-1d9b3f7c2e80")),
                ("ttl_ms", 1_000.into()),
            ],
        ),
        envelope(9, "LOCKS", vec![("limit", 10.into())]),
        envelope(10, "STATS", vec![]),
        envelope(
            11,
            "SET",
            vec![
                key(),
                ("value", rmpv::Value::Binary(vec![7])),
                (
                    "fence",
                    map(vec![("lock", s("prop:k")), ("token", 1.into())]),
                ),
            ],
        ),
    ]
}

/// A value of some type, to put where another type belongs.
fn any_value() -> impl Strategy<Value = rmpv::Value> {
    prop_oneof![
        Just(rmpv::Value::Nil),
        any::<bool>().prop_map(rmpv::Value::from),
        any::<i64>().prop_map(rmpv::Value::from),
        Just(rmpv::Value::from(u64::MAX)),
        Just(rmpv::Value::from(0u64)),
        any::<f64>().prop_map(rmpv::Value::F64),
        "[a-zA-Z:]{0,8}".prop_map(rmpv::Value::from),
        Just(rmpv::Value::from("")),
        Just(rmpv::Value::from("k".repeat(1025))),
        proptest::collection::vec(any::<u8>(), 0..8).prop_map(rmpv::Value::Binary),
        Just(rmpv::Value::Array(vec![1.into(), "PING".into()])),
        Just(map(vec![("key", s("k"))])),
        Just(rmpv::Value::Ext(1, vec![0])),
    ]
}

/// What is done to a valid request before it is sent.
#[derive(Debug, Clone)]
enum Mutation {
    /// Sent as it is.
    None,
    /// The value of the `n`th member (envelope first, then `args`) replaced by another value.
    Swap(usize, rmpv::Value),
    /// The `n`th member removed.
    Remove(usize),
    /// A member added to the envelope (`false`) or to `args` (`true`).
    Add(bool, String, rmpv::Value),
    /// One bit of the encoded body flipped.
    Flip(usize, u8),
    /// The body cut to its first `n` bytes (modulo its length).
    Truncate(usize),
    /// Random bytes inserted into the body.
    Insert(usize, Vec<u8>),
}

/// What is done to the frame around the body.
#[derive(Debug, Clone)]
enum Framing {
    /// A correct length prefix.
    Exact,
    /// A prefix over the frame limit, anywhere up to 4 GiB.
    Huge(u32),
    /// A prefix announcing more bytes than are sent: the stream ends inside the frame.
    Long(u16),
    /// A prefix announcing fewer bytes than the body: the rest starts a frame of its own.
    Short(u16),
}

/// One case: the bytes of one bad (or accidentally good) frame.
#[derive(Debug, Clone)]
struct Case {
    /// Whether the connection says HELLO before the frame.
    greeted: bool,
    /// The frame's bytes, length prefix included.
    stream: Vec<u8>,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => Just(Mutation::None),
        3 => (0..12usize, any_value()).prop_map(|(n, v)| Mutation::Swap(n, v)),
        2 => (0..12usize).prop_map(Mutation::Remove),
        2 => (any::<bool>(), proptest::sample::select(NAMES), any_value())
            .prop_map(|(in_args, name, v)| Mutation::Add(in_args, name.to_string(), v)),
        3 => (any::<usize>(), 0..8u8).prop_map(|(at, bit)| Mutation::Flip(at, bit)),
        2 => any::<usize>().prop_map(Mutation::Truncate),
        2 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..6))
            .prop_map(|(at, bytes)| Mutation::Insert(at, bytes)),
    ]
}

fn framing() -> impl Strategy<Value = Framing> {
    prop_oneof![
        12 => Just(Framing::Exact),
        1 => ((MAX_FRAME_LEN as u32 + 1)..=u32::MAX).prop_map(Framing::Huge),
        1 => (1..64u16).prop_map(Framing::Long),
        1 => (1..64u16).prop_map(Framing::Short),
    ]
}

/// The members of a request map, envelope first then `args`, as (is it in `args`, index) pairs.
fn member_slots(request: &rmpv::Value) -> Vec<(bool, usize)> {
    let rmpv::Value::Map(members) = request else {
        return Vec::new();
    };
    let mut slots: Vec<(bool, usize)> = (0..members.len()).map(|i| (false, i)).collect();
    if let Some((_, rmpv::Value::Map(args))) =
        members.iter().find(|(k, _)| k.as_str() == Some("args"))
    {
        slots.extend((0..args.len()).map(|i| (true, i)));
    }
    slots
}

/// The member list the slot points into.
fn members_of(
    request: &mut rmpv::Value,
    in_args: bool,
) -> Option<&mut Vec<(rmpv::Value, rmpv::Value)>> {
    let rmpv::Value::Map(members) = request else {
        return None;
    };
    if !in_args {
        return Some(members);
    }
    match members.iter_mut().find(|(k, _)| k.as_str() == Some("args")) {
        Some((_, rmpv::Value::Map(args))) => Some(args),
        _ => None,
    }
}

fn mutate(mut request: rmpv::Value, mutation: &Mutation) -> Vec<u8> {
    let slots = member_slots(&request);
    match mutation {
        Mutation::Swap(n, value) if !slots.is_empty() => {
            let (in_args, i) = slots[n % slots.len()];
            if let Some(members) = members_of(&mut request, in_args) {
                members[i].1 = value.clone();
            }
        }
        Mutation::Remove(n) if !slots.is_empty() => {
            let (in_args, i) = slots[n % slots.len()];
            if let Some(members) = members_of(&mut request, in_args) {
                members.remove(i);
            }
        }
        Mutation::Add(in_args, name, value) => {
            if let Some(members) = members_of(&mut request, *in_args) {
                members.push((s(name), value.clone()));
            }
        }
        _ => {}
    }
    let mut body = Vec::new();
    rmpv::encode::write_value(&mut body, &request).expect("encode into a Vec");
    match mutation {
        Mutation::Flip(at, bit) => {
            let at = at % body.len();
            body[at] ^= 1 << bit;
        }
        Mutation::Truncate(n) => body.truncate(n % body.len()),
        Mutation::Insert(at, bytes) => {
            let at = at % (body.len() + 1);
            body.splice(at..at, bytes.iter().copied());
        }
        _ => {}
    }
    body
}

fn frame_with(body: &[u8], framing: &Framing) -> Vec<u8> {
    let len = body.len() as u32;
    let prefix = match framing {
        Framing::Exact => len,
        Framing::Huge(n) => *n,
        Framing::Long(extra) => len + u32::from(*extra),
        Framing::Short(less) => len.saturating_sub(u32::from(*less)),
    };
    let mut stream = prefix.to_be_bytes().to_vec();
    stream.extend_from_slice(body);
    stream
}

fn case() -> impl Strategy<Value = Case> {
    let requests = valid_requests();
    let mutated = (
        proptest::sample::select(requests),
        mutation(),
        framing(),
        prop::bool::weighted(0.9),
    )
        .prop_map(|(request, mutation, framing, greeted)| Case {
            greeted,
            stream: frame_with(&mutate(request, &mutation), &framing),
        });
    let random_body = (
        proptest::collection::vec(any::<u8>(), 0..64),
        framing(),
        any::<bool>(),
    )
        .prop_map(|(body, framing, greeted)| Case {
            greeted,
            stream: frame_with(&body, &framing),
        });
    let random_stream = (proptest::collection::vec(any::<u8>(), 0..64), any::<bool>())
        .prop_map(|(stream, greeted)| Case { greeted, stream });
    prop_oneof![8 => mutated, 1 => random_body, 1 => random_stream]
}

/// What the daemon must answer to a stream: simulated with the framing and decoder it shares.
#[derive(Debug, Default)]
struct Expected {
    /// Ids that must each get one answer, with the code each must carry when it is an error the
    /// decoder decides (`MALFORMED`), or `None` for a request the commands answer.
    answers: Vec<(u64, Option<&'static str>)>,
    /// Ids of requests that may wait (a delayed PING), so get no answer when the stream ends first.
    may_wait: Vec<u64>,
    /// The stream breaks: a prefix over the limit (`FRAME_TOO_LARGE`), or it ends inside a frame
    /// (`MALFORMED`); an id-0 answer with this code, then a close.
    breaks: Option<&'static str>,
    /// When the probe PING after the frame is a frame of its own: what it must be answered, `PONG`,
    /// or `HELLO_REQUIRED` on a connection that has not said HELLO.
    probe: Option<&'static str>,
}

fn simulate(stream: &[u8], probe: &[u8], mut greeted: bool) -> Expected {
    let mut buf = BytesMut::from(stream);
    buf.extend_from_slice(probe);
    let probe_at = stream.len();
    let mut consumed = 0;
    let mut expected = Expected::default();
    loop {
        let before = buf.len();
        match take_frame(&mut buf, MAX_FRAME_LEN) {
            Err(_) => {
                expected.breaks = Some("FRAME_TOO_LARGE");
                return expected;
            }
            Ok(None) => {
                if !buf.is_empty() {
                    expected.breaks = Some("MALFORMED");
                }
                return expected;
            }
            Ok(Some(body)) => {
                let start = consumed;
                consumed += before - buf.len();
                if start == probe_at && consumed == probe_at + probe.len() {
                    expected.probe = Some(if greeted { "PONG" } else { "HELLO_REQUIRED" });
                    continue;
                }
                match decode_request(&body) {
                    Err((id, _)) => expected.answers.push((id, Some("MALFORMED"))),
                    Ok(request) => {
                        let args = &request.args;
                        let delayed = request.cmd == CommandName::Ping
                            && args.delay_ms.is_some_and(|d| d > 0);
                        if delayed && greeted {
                            expected.may_wait.push(request.id);
                        } else {
                            expected.answers.push((request.id, None));
                        }
                        // A successful HELLO opens the connection for what follows it.
                        greeted |= request.cmd == CommandName::Hello
                            && args.version == Some(PROTOCOL_VERSION)
                            && args
                                .client
                                .as_ref()
                                .is_none_or(|c| c.len() <= MAX_CLIENT_NAME_LEN);
                    }
                }
            }
        }
    }
}

/// Reads every answer until the daemon closes the connection; fails on a hang.
async fn read_to_close(conn: &mut RawConn, until_probe: bool) -> Result<Vec<Response>, String> {
    let mut answers = Vec::new();
    let read = tokio::time::timeout(ANSWER_LIMIT, async {
        while let Some(answer) = conn.recv().await {
            let probe = answer.id == PROBE_ID;
            answers.push(answer);
            if until_probe && probe {
                return;
            }
        }
    })
    .await;
    read.map(|()| answers)
        .map_err(|_| format!("no answer or close within {ANSWER_LIMIT:?}"))
}

/// Sends one case on a fresh connection and checks every answer against the simulation.
async fn run_case(daemon: &TestDaemon, case: &Case) -> Result<(), String> {
    let mut conn = if case.greeted {
        daemon.raw().await
    } else {
        daemon.raw_without_hello().await
    };
    let probe_request = Request::new(PROBE_ID, CommandName::Ping);
    let mut probe = Vec::new();
    push_frame(&mut probe, &probe_request.to_msgpack());
    let expected = simulate(&case.stream, &probe, case.greeted);
    // A write may fail once the daemon has closed on a broken stream; what it answered before
    // closing is still read below.
    let _ = conn.stream.write_all(&case.stream).await;
    let _ = conn.stream.write_all(&probe).await;
    // With the probe answered, every frame before it has run: then shut down the write side, which
    // ends the connection cleanly (or cancels a delayed PING).
    let mut answers = if expected.probe.is_some() && expected.breaks.is_none() {
        read_to_close(&mut conn, true).await?
    } else {
        Vec::new()
    };
    let _ = conn.stream.shutdown().await;
    answers.extend(read_to_close(&mut conn, false).await?);

    if let Some(err) = answers
        .iter()
        .filter_map(|a| a.err.as_ref())
        .find(|e| e.code == "INTERNAL")
    {
        return Err(format!("INTERNAL answer: {}", err.message));
    }
    // Each expected answer takes one matching answer off the list; nothing may be left over.
    let mut rest: Vec<&Response> = answers.iter().collect();
    let mut take = |id: u64, is: &dyn Fn(&Response) -> bool, what: &str| -> Result<(), String> {
        match rest.iter().position(|a| a.id == id && is(a)) {
            Some(at) => {
                rest.remove(at);
                Ok(())
            }
            None => Err(format!(
                "no {what} answer with id {id} among {answers:?}; expected {expected:?}"
            )),
        }
    };
    let code_is =
        |code: &'static str| move |a: &Response| a.err.as_ref().is_some_and(|e| e.code == code);
    for (id, code) in &expected.answers {
        match code {
            Some(code) => take(*id, &code_is(code), code)?,
            None => take(*id, &|_| true, "any")?,
        }
    }
    match expected.probe {
        Some("PONG") => take(PROBE_ID, &|a| a.ok == rmpv::Value::from("PONG"), "PONG")?,
        Some(code) => take(PROBE_ID, &code_is(code), code)?,
        None => {}
    }
    if let Some(code) = expected.breaks {
        take(0, &code_is(code), code)?;
    }
    rest.retain(|a| !expected.may_wait.contains(&a.id));
    if !rest.is_empty() {
        return Err(format!(
            "unexpected answers {rest:?}; expected {expected:?}"
        ));
    }
    Ok(())
}

/// Another connection's work is untouched: a SET and GET of its own key round-trip exactly.
async fn bystander_works(bystander: &scaled_client::Client, n: u64) -> Result<(), String> {
    let key = format!("bystander:{n}");
    let value = n.to_be_bytes();
    let work = async {
        bystander.set(&key, &value, None).await?;
        bystander.get(&key).await
    };
    match tokio::time::timeout(ANSWER_LIMIT, work).await {
        Ok(Ok(Some(got))) if got[..] == value => Ok(()),
        other => Err(format!("the bystander's SET/GET of {key}: {other:?}")),
    }
}

#[test]
fn random_and_mutated_frames_get_their_answers_and_harm_nobody() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log_path = dir.path().join("scaled.log");
    let log = File::create(&log_path).expect("create the log file");
    let mut daemon = TestDaemon::start_logging_to(&[], log);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let bystander = runtime.block_on(daemon.client());

    let config = Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    let n = std::sync::atomic::AtomicU64::new(0);
    let result = runner.run(&case(), |case| {
        let n = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        runtime
            .block_on(async {
                run_case(&daemon, &case).await?;
                bystander_works(&bystander, n).await
            })
            .map_err(TestCaseError::fail)
    });
    drop(bystander);
    let alive = daemon.child.try_wait().expect("try_wait").is_none();
    let log = std::fs::read_to_string(&log_path).expect("read the daemon's log");
    if let Err(e) = result {
        panic!("{e}\n--- daemon log ---\n{log}");
    }
    assert!(alive, "the daemon exited; its log:\n{log}");
    assert!(
        !log.contains("panicked"),
        "the daemon's log shows a panic:\n{log}"
    );
}

/// A quick self-check of the simulation the property rests on, so a wrong oracle cannot pass
/// silently: a valid PING is answered, a lying prefix breaks the stream, garbage is `MALFORMED`.
#[test]
fn the_simulation_predicts_the_spec() {
    let mut probe = Vec::new();
    push_frame(
        &mut probe,
        &Request::new(PROBE_ID, CommandName::Ping).to_msgpack(),
    );
    let mut ping = Vec::new();
    push_frame(&mut ping, &Request::new(4, CommandName::Ping).to_msgpack());
    let e = simulate(&ping, &probe, true);
    assert_eq!(e.answers, vec![(4, None)]);
    assert_eq!((e.probe, e.breaks), (Some("PONG"), None));

    let e = simulate(&u32::MAX.to_be_bytes(), &probe, true);
    assert_eq!(e.breaks, Some("FRAME_TOO_LARGE"));
    assert_eq!(e.probe, None);

    let long = frame_with(
        &Request::new(5, CommandName::Ping).to_msgpack(),
        &Framing::Long(1000),
    );
    let e = simulate(&long, &probe, true);
    assert_eq!(e.breaks, Some("MALFORMED"));

    let mut garbage = Vec::new();
    push_frame(&mut garbage, &[0xc1, 0x00]);
    let e = simulate(&garbage, &probe, true);
    assert_eq!(e.answers, vec![(0, Some("MALFORMED"))]);
    assert_eq!(e.probe, Some("PONG"));
    assert_eq!(
        simulate(&garbage, &probe, false).probe,
        Some("HELLO_REQUIRED")
    );
}
