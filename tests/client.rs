//! The client crate against the real daemon: it reconnects after the daemon restarts, fails the calls
//! that were in flight when the connection broke, maps each error code to its own variant, and keeps
//! its connect and request timeouts without ever handing a late answer to another caller.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::TestDaemon;
use scaled_client::{Client, Endpoint, Error, ErrorCode, LockOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_daemon_restarts() {
    let mut daemon = TestDaemon::start(&[]);
    let client = daemon.client().await;
    client.set("k", b"v", None).await.expect("SET");

    // A request in flight when the daemon dies fails; it is not silently retried.
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { client.ping_after(Duration::from_secs(30)).await })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = client.stats().await.expect("STATS");
        if stats.performance.overall.total_requests >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slow PING never reached the daemon"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    daemon.child.kill().expect("kill scaled");
    daemon.child.wait().expect("reap scaled");
    let lost = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("the in-flight call hung after the daemon died")
        .expect("task");
    assert!(matches!(lost, Err(Error::ConnectionLost)), "got {lost:?}");

    // With the daemon gone, calls fail with an i/o error rather than hanging.
    assert!(matches!(client.ping().await, Err(Error::Io(_))));

    // A new daemon on the same socket (the dead one's socket file is stale and is replaced).
    let restarted = common::scaled_command()
        .arg("--socket")
        .arg(&daemon.socket)
        .stdin(Stdio::null())
        .spawn()
        .expect("restart scaled");
    daemon.child = restarted;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client.ping().await {
            Ok(()) => break,
            Err(Error::Io(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("the client did not reconnect: {e}"),
        }
    }
    // The cache lived in the old process; the same handle works against the new one.
    assert_eq!(client.get("k").await.expect("GET"), None);
    client
        .set("k", b"again", None)
        .await
        .expect("SET after reconnect");
    assert_eq!(
        client.get("k").await.expect("GET").as_deref(),
        Some(&b"again"[..])
    );
}

#[tokio::test]
async fn each_error_code_arrives_as_its_own_variant() {
    let daemon = TestDaemon::start(&[]);
    let client = daemon.client().await;
    let long_key = "k".repeat(2000);
    let err = client
        .get(&long_key)
        .await
        .expect_err("a key over the limit");
    assert!(matches!(err, Error::TooLarge(_)), "{err:?}");
    assert_eq!(err.code(), Some(ErrorCode::TooLarge));
    let err = client.get("").await.expect_err("an empty key");
    assert!(matches!(err, Error::BadArgument(_)), "{err:?}");
    let _held = client
        .lock("busy", LockOptions::default())
        .await
        .expect("LOCK");
    let err = client
        .try_lock("busy", LockOptions::default())
        .await
        .expect_err("held");
    assert!(matches!(err, Error::Locked(_)), "{err:?}");
    let err = client
        .lock(
            "busy",
            LockOptions {
                wait: Some(Duration::from_millis(50)),
                ..LockOptions::default()
            },
        )
        .await
        .expect_err("held");
    assert!(matches!(err, Error::LockTimeout(_)), "{err:?}");
    // A request too big for a frame is refused before it is sent; the connection stays usable.
    let huge = vec![0u8; scaled_client::MAX_FRAME_LEN + 1];
    let err = client
        .set("big", &huge, None)
        .await
        .expect_err("over the frame limit");
    assert!(matches!(err, Error::FrameTooLarge(_)), "{err:?}");
    client.ping().await.expect("the connection survived");
    // Every code the daemon can send maps to a variant that maps back to the code.
    for code in ErrorCode::ALL {
        assert_eq!(Error::from_code(code, String::new()).code(), Some(code));
    }
}

#[tokio::test]
async fn a_client_that_speaks_another_version_is_told_so() {
    let daemon = TestDaemon::start(&[]);
    let mut conn = daemon.raw_without_hello().await;
    let hello = scaled_client::proto::Request {
        args: scaled_client::proto::Args {
            version: Some(99),
            ..Default::default()
        },
        ..scaled_client::proto::Request::new(1, scaled_client::proto::CommandName::Hello)
    };
    conn.request(&hello).await;
    let answer = conn.recv().await.expect("an answer");
    let err = answer.err.expect("refused");
    assert_eq!(err.code, "UNSUPPORTED_VERSION");
    // And the typed client reports an unreachable daemon as an i/o error.
    let gone = daemon.dir.path().join("nobody.sock");
    let result = Client::connect(Endpoint::Unix(gone), "test").await;
    assert!(matches!(result, Err(Error::Io(_))));
}

/// Stops the daemon with SIGSTOP and waits until the kernel has stopped it: the signal is delivered
/// asynchronously, and a daemon still running for a moment would answer.
fn stop(daemon: &TestDaemon) {
    daemon.signal("STOP");
    let stat = format!("/proc/{}/stat", daemon.child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&stat).expect("read the daemon's /proc stat");
        // The state follows the parenthesised command name.
        let state = text.rsplit_once(')').map(|(_, rest)| rest.trim_start());
        if state.is_some_and(|s| s.starts_with('T')) {
            return;
        }
        assert!(Instant::now() < deadline, "the daemon did not stop: {text}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[tokio::test]
async fn a_request_past_its_timeout_fails_and_its_late_answer_goes_to_nobody() {
    let daemon = TestDaemon::start(&[]);
    let client = Client::builder(Endpoint::Unix(daemon.socket.clone()))
        .name("timeouts")
        .request_timeout(Duration::from_millis(200))
        .connect()
        .await
        .expect("connect");
    assert!(format!("{client:?}").contains("timeouts"), "{client:?}");
    assert_eq!(client.welcome().await.expect("HELLO").version, 1);
    client.set("a", b"A", None).await.expect("SET");
    client.set("b", b"B", None).await.expect("SET");

    // A stopped daemon reads nothing, so the GET cannot be answered in time.
    stop(&daemon);
    let err = client.get("a").await.expect_err("no answer while stopped");
    daemon.signal("CONT");
    assert!(matches!(err, Error::Timeout(_)), "{err:?}");
    assert!(err.to_string().contains("GET"), "{err}");

    // The late answer to the first GET arrives on the same connection; the next caller still gets
    // its own.
    assert_eq!(
        client.get("b").await.expect("GET").as_deref(),
        Some(&b"B"[..])
    );
    assert_eq!(
        client.get("a").await.expect("GET").as_deref(),
        Some(&b"A"[..])
    );
}

#[tokio::test]
async fn a_connect_past_its_timeout_fails() {
    let daemon = TestDaemon::start(&[]);
    // The kernel still accepts the connection of a stopped daemon, but HELLO is never answered.
    stop(&daemon);
    let attempt = Client::builder(Endpoint::Unix(daemon.socket.clone()))
        .connect_timeout(Duration::from_millis(200))
        .connect()
        .await;
    daemon.signal("CONT");
    assert!(matches!(attempt, Err(Error::Timeout(_))), "{attempt:?}");
}
