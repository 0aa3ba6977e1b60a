//! Resource bounds at the connection: whatever a local client sends, or fails to read, the daemon's
//! memory stays under a bound that follows from its settings, and a well-behaved client on another
//! connection still gets every answer. Each test makes one class of attack against the real daemon.
//! Bounds are asserted; speeds never are (BENCHMARKS.md has the probe's latencies during each).

mod common;

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use common::probe::{cpu_ns, peak_rss_kib, rss_kib, Prober};
use common::{RawConn, TestDaemon};
use scaled_client::proto::{Args, CommandName, Request};

/// KiB as MiB, for the bounds below.
fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Stops the probe and fails the test unless it got every answer; prints its round trips (what
/// BENCHMARKS.md quotes, from a release build).
fn served(probe: Prober, what: &str) {
    let report = probe.finish();
    eprintln!("{what}: probe {}", report.summary());
    report.assert_every_answer(1);
}

/// A map of `members` distinct short str keys with nil values, as one request body (an envelope whose
/// unknown members the decoder must step over).
fn wide_map(members: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(members * 9 + 16);
    body.push(0xdf);
    body.extend_from_slice(&((members + 2) as u32).to_be_bytes());
    body.extend_from_slice(&[0xa2, b'i', b'd', 0x07, 0xa3, b'c', b'm', b'd', 0xa4]);
    body.extend_from_slice(b"PING");
    for i in 0..members {
        let key = format!("k{i:06x}");
        body.push(0xa0 | key.len() as u8);
        body.extend_from_slice(key.as_bytes());
        body.push(0xc0);
    }
    body
}

fn request(id: u64, cmd: CommandName, key: Option<&str>, value: Option<Vec<u8>>) -> Request {
    Request {
        args: Args {
            key: key.map(str::to_string),
            value,
            ..Args::default()
        },
        ..Request::new(id, cmd)
    }
}

/// Sends `frames` bodies on one fresh connection and reads the answers, returning the daemon's CPU
/// time for the lot.
async fn cpu_to_decode(daemon: &TestDaemon, body: &[u8], frames: usize) -> Duration {
    let mut conn = daemon.raw().await;
    let before = cpu_ns(daemon);
    for _ in 0..frames {
        conn.send(body).await;
        let answer = conn.recv().await.expect("an answer to the wide map");
        assert_eq!(answer.id, 7);
    }
    Duration::from_nanos(cpu_ns(daemon) - before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoding_is_linear_in_the_frame_whatever_its_shape() {
    let daemon = TestDaemon::start(&[]);
    let probe = Prober::start(&daemon);
    // The same bytes in total: 40 maps of n members, then 5 maps of 8n. Linear decoding costs about
    // the same for both (a larger map's hash set misses the CPU cache more, hence the factor of 5);
    // the quadratic decoder this replaces cost 8 times more for the second, and minutes rather than
    // milliseconds at this size.
    let n = 25_000;
    let small = cpu_to_decode(&daemon, &wide_map(n), 40).await;
    let large = cpu_to_decode(&daemon, &wide_map(8 * n), 5).await;
    eprintln!(
        "cpu for 40 × {n} members: {small:?}; for 5 × {} members: {large:?}",
        8 * n
    );
    assert!(
        large < small * 5 + Duration::from_millis(300),
        "decoding 8n members cost {large:?} against {small:?} for the same bytes in maps of n"
    );
    served(probe, "wide maps");
    assert!(
        mib(peak_rss_kib(&daemon)) < 96.0,
        "peak RSS {} MiB",
        mib(peak_rss_kib(&daemon))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_answers_holds_a_bounded_buffer() {
    let daemon = TestDaemon::start(&["--write-timeout", "2"]);
    let client = daemon.client().await;
    client
        .set("big", &vec![7u8; 1 << 20], None)
        .await
        .expect("SET 1 MiB");
    let probe = Prober::start(&daemon);
    let before = mib(rss_kib(&daemon));
    // Four connections each pipeline 1000 GETs of the 1 MiB value (66 KB of requests) and read
    // nothing: 4 GB of answers if the daemon buffered them all.
    let mut hogs = Vec::new();
    for c in 0..4u64 {
        let mut conn = daemon.raw().await;
        let mut batch = Vec::new();
        for i in 0..1000 {
            let body =
                request(c * 10_000 + i + 1, CommandName::Get, Some("big"), None).to_msgpack();
            scaled_client::frame::push_frame(&mut batch, &body);
        }
        conn.send_bytes(&batch).await;
        hogs.push(conn);
    }
    // Let the daemon do all it will do with them, then look at its memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let peak = mib(peak_rss_kib(&daemon));
    eprintln!(
        "{}: RSS before {before:.1} MiB, peak {peak:.1} MiB",
        module_path!()
    );
    // Per connection: 64 KiB of unread answers plus one answer of 1 MiB, and the 1 MiB value.
    assert!(
        peak < before + 32.0,
        "peak RSS {peak:.1} MiB from {before:.1} MiB"
    );
    // The write timeout closes them: the daemon's count of open connections falls back to the two
    // clients above.
    let stats_client = daemon.client().await;
    let mut open = u64::MAX;
    for _ in 0..1000 {
        let stats = stats_client.stats().await.expect("STATS");
        open = stats.connections.current;
        if open <= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        open <= 3,
        "connections that read nothing were never closed ({open} open)"
    );
    served(probe, "unread answers");
    drop(hogs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_shuts_down_its_write_side_releases_its_locks_at_once() {
    let daemon = TestDaemon::start(&[]);
    let client = daemon.client().await;
    client
        .set("big", &vec![1u8; 1 << 20], None)
        .await
        .expect("SET");
    let mut holder = daemon.raw().await;
    let lock = Request {
        args: Args {
            key: Some("session:half".into()),
            ttl_ms: Some(600_000),
            ..Args::default()
        },
        ..Request::new(1, CommandName::Lock)
    };
    holder.request(&lock).await;
    let granted = holder.recv().await.expect("LOCK answer");
    assert!(granted.err.is_none(), "{:?}", granted.err);
    // A large answer is left unread, then the holder shuts down its write side.
    let mut batch = Vec::new();
    for i in 0..50 {
        let body = request(100 + i, CommandName::Get, Some("big"), None).to_msgpack();
        scaled_client::frame::push_frame(&mut batch, &body);
    }
    holder.send_bytes(&batch).await;
    holder.stream.shutdown().await.expect("shutdown write side");
    // A waiter on another connection is granted long before the lease (10 min) or the write
    // timeout (30 s) could have freed it.
    let waiter = daemon.client().await;
    let options = scaled_client::LockOptions {
        wait: Some(Duration::from_secs(10)),
        ..Default::default()
    };
    let guard = waiter
        .lock("session:half", options)
        .await
        .expect("granted after the shutdown");
    guard.unlock().await.expect("UNLOCK");
    drop(holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_frames_are_bounded_by_the_buffer_budget_and_timed_out() {
    let daemon = TestDaemon::start(&["--max-buffer-bytes", "33554432", "--frame-timeout", "3"]);
    let probe = Prober::start(&daemon);
    let before = mib(rss_kib(&daemon));
    // Forty connections each send a 2 MiB frame but its last byte: 80 MiB held if the daemon kept
    // them all, against a budget of 32 MiB.
    let len = 2 * 1024 * 1024;
    let mut partial = Vec::with_capacity(len + 3);
    partial.extend_from_slice(&(len as u32).to_be_bytes());
    partial.resize(len + 3, 0x90);
    let mut conns: Vec<RawConn> = Vec::new();
    for _ in 0..40 {
        let mut conn = daemon.raw().await;
        // The daemon may refuse and close mid-frame; a failed write is that refusal.
        let _ = conn.stream.write_all(&partial).await;
        conns.push(conn);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let peak = mib(peak_rss_kib(&daemon));
    eprintln!(
        "{}: RSS before {before:.1} MiB, peak {peak:.1} MiB",
        module_path!()
    );
    assert!(
        peak < before + 32.0 + 24.0,
        "peak RSS {peak:.1} MiB from {before:.1} MiB"
    );
    // Each gets an answer with id 0 and is closed: OVERLOADED for those over the budget, TIMEOUT for
    // the others once their frame has gone unfinished for 3 s.
    let (mut overloaded, mut timed_out) = (0, 0);
    for conn in &mut conns {
        match conn.recv().await {
            Some(answer) => {
                assert_eq!(answer.id, 0);
                match answer.err.as_ref().map(|e| e.code.as_str()) {
                    Some("OVERLOADED") => overloaded += 1,
                    Some("TIMEOUT") => timed_out += 1,
                    other => panic!("unexpected answer {other:?}"),
                }
                assert!(conn.recv().await.is_none(), "the connection stays open");
            }
            None => panic!("closed without an answer"),
        }
    }
    assert!(
        overloaded > 0 && timed_out > 0,
        "{overloaded} refused, {timed_out} timed out"
    );
    // The budget is back: a large frame fits again.
    let client = daemon.client().await;
    client
        .set("after", &vec![3u8; 1 << 20], None)
        .await
        .expect("1 MiB SET after the attack");
    served(probe, "half-sent frames");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_connections_are_timed_out_but_a_lock_holder_is_not() {
    let daemon = TestDaemon::start(&["--hello-timeout", "1", "--idle-timeout", "2"]);
    let mut silent = daemon.raw_without_hello().await;
    let mut idle = daemon.raw().await;
    let mut holder = daemon.raw().await;
    holder
        .request(&request(1, CommandName::Lock, Some("session:idle"), None))
        .await;
    assert!(holder.recv().await.expect("LOCK").err.is_none());
    for (conn, what) in [(&mut silent, "HELLO"), (&mut idle, "idle")] {
        let answer = conn.recv().await.expect("a TIMEOUT answer");
        assert_eq!(answer.id, 0);
        let err = answer.err.expect("an error");
        assert_eq!(err.code, "TIMEOUT", "{what}");
        assert!(err.message.contains(what), "{}", err.message);
        assert!(
            conn.recv().await.is_none(),
            "{what}: still open after TIMEOUT"
        );
    }
    // The holder sat idle as long as the idle connection, and keeps its connection and its lock.
    holder
        .request(&request(2, CommandName::Ping, None, None))
        .await;
    let pong = holder.recv().await.expect("the holder is still served");
    assert_eq!(pong.id, 2);
    let client = daemon.client().await;
    let locks = client.locks().await.expect("LOCKS");
    assert!(format!("{locks:?}").contains("session:idle"), "{locks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_frame_without_an_id_answers_id_0_and_no_elapsed_time() {
    let daemon = TestDaemon::start(&[]);
    let mut conn = daemon.raw().await;
    conn.send(&[0xc1, 0x00]).await;
    let answer = conn.recv().await.expect("MALFORMED");
    assert_eq!((answer.id, answer.elapsed_us), (0, 0));
    assert_eq!(answer.err.expect("an error").code, "MALFORMED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_is_bounded_in_bytes_by_default() {
    let daemon = TestDaemon::start(&[]);
    let client = daemon.client().await;
    let stats = client.stats().await.expect("STATS");
    let budget = stats.cache.max_bytes;
    assert_eq!(budget, 256 << 20, "the default CACHE_MAX_BYTES");
    let probe = Prober::start(&daemon);
    // 10 000 entries of 1 MiB would be 10 GiB; 400 of them already pass the budget.
    let value = vec![5u8; 1 << 20];
    for i in 0..400 {
        client
            .set(&format!("huge:{i}"), &value, None)
            .await
            .expect("SET");
    }
    served(probe, "1 MiB values past the cache budget");
    let stats = client.stats().await.expect("STATS");
    let bytes = stats.cache.bytes;
    assert!(bytes <= budget, "the cache holds {bytes} bytes");
    let peak = mib(peak_rss_kib(&daemon));
    eprintln!("cache budget: peak RSS {peak:.1} MiB with a 256 MiB cache budget");
    assert!(
        peak < 256.0 + 96.0,
        "peak RSS {peak:.1} MiB with a 256 MiB cache budget"
    );
}

#[tokio::test]
async fn the_lock_file_is_private_and_a_new_socket_directory_is_not_world_readable() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("run/scaled/scaled.sock");
    let daemon = TestDaemon::start_at(&socket, &[]);
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    let mut lock = socket.as_os_str().to_owned();
    lock.push(".lock");
    assert_eq!(mode(std::path::Path::new(&lock)), 0o600);
    let parent = socket.parent().expect("parent");
    assert_eq!(
        mode(parent) & 0o007,
        0,
        "the socket's directory is {:o}",
        mode(parent)
    );
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_open_file_limit_still_answers_overloaded_at_the_limit() {
    // A hard limit of 100 open files: the daemon cannot raise it, so it serves 100 - 64 = 36
    // connections and answers the rest OVERLOADED instead of leaving them in the listen backlog.
    let daemon = TestDaemon::start_wrapped("ulimit -n 100; exec \"$0\" \"$@\"", &[]);
    let mut served = Vec::new();
    let mut refused = 0;
    for _ in 0..60 {
        let mut conn = daemon.raw_without_hello().await;
        let hello = Request {
            args: Args {
                version: Some(1),
                ..Args::default()
            },
            ..Request::new(1, CommandName::Hello)
        };
        // A refused connection may be closed before the HELLO is written; its answer is still there.
        let mut frame = Vec::new();
        scaled_client::frame::push_frame(&mut frame, &hello.to_msgpack());
        let _ = conn.stream.write_all(&frame).await;
        match conn.recv().await {
            Some(answer) if answer.id == 0 => {
                assert_eq!(answer.err.expect("an error").code, "OVERLOADED");
                refused += 1;
            }
            Some(answer) => {
                assert!(answer.err.is_none());
                served.push(conn);
            }
            None => panic!("closed without an answer"),
        }
    }
    assert_eq!((served.len(), refused), (36, 24));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_soft_open_file_limit_is_raised() {
    let daemon = TestDaemon::start_wrapped("ulimit -S -n 80; exec \"$0\" \"$@\"", &[]);
    let mut conns = Vec::new();
    for _ in 0..100 {
        let mut conn = daemon.raw().await;
        conn.request(&request(2, CommandName::Ping, None, None))
            .await;
        assert_eq!(conn.recv().await.expect("PONG").id, 2);
        conns.push(conn);
    }
}
