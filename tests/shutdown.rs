//! Starting and stopping: SIGTERM and SIGINT drain what is in flight and exit 0, removing the socket; the
//! socket path is claimed carefully (a live daemon's is left alone, a stale one replaced, a file that is
//! not a socket never touched).

mod common;

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use common::{scaled_command, TestDaemon, STARTUP_LIMIT};
use scaled_client::proto::{Args, CommandName, Request};
use scaled_client::{Client, Endpoint};

/// `scaled --socket <socket>`, not yet started, with its output captured.
fn scaled_at(socket: &Path) -> Command {
    let mut cmd = scaled_command();
    cmd.arg("--socket")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Kills the child if the test ends early, so no daemon outlives its test.
struct Reaper(Option<Child>);

impl Reaper {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child already reaped")
    }

    /// Waits for the child to exit on its own, failing the test after `limit`, and returns its output.
    fn wait(&mut self, limit: Duration) -> Output {
        let deadline = Instant::now() + limit;
        while self.child().try_wait().expect("try_wait").is_none() {
            assert!(
                Instant::now() < deadline,
                "scaled did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.0
            .take()
            .expect("child")
            .wait_with_output()
            .expect("collect output")
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls until a connection to `socket` succeeds, failing after [`STARTUP_LIMIT`] or if `child` exits.
fn wait_until_serving(child: &mut Child, socket: &Path) {
    let deadline = Instant::now() + STARTUP_LIMIT;
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("scaled exited with {status} instead of serving {socket:?}");
        }
        assert!(
            Instant::now() < deadline,
            "scaled did not start serving {socket:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls until a new connection to `socket` is refused, failing after [`STARTUP_LIMIT`].
fn wait_until_refused(socket: &Path) {
    let deadline = Instant::now() + STARTUP_LIMIT;
    while std::os::unix::net::UnixStream::connect(socket).is_ok() {
        assert!(
            Instant::now() < deadline,
            "new connections still accepted {STARTUP_LIMIT:?} after shutdown began"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn assert_clean_exit(status: ExitStatus, socket: &Path) {
    assert!(status.success(), "scaled exited with {status}, not 0");
    assert!(
        !socket.exists(),
        "the socket file {socket:?} was left behind"
    );
}

#[tokio::test]
async fn sigterm_finishes_requests_in_flight_refuses_new_ones_and_exits_zero() {
    let mut daemon = TestDaemon::start(&[]);
    let mut conn = daemon.raw().await;

    // A slow PING, and a fast one behind it: the fast answer proves the daemon has read the slow one.
    let slow = Request {
        args: Args {
            delay_ms: Some(2500),
            ..Args::default()
        },
        ..Request::new(1, CommandName::Ping)
    };
    conn.request(&slow).await;
    conn.request(&Request::new(2, CommandName::Ping)).await;
    let fast = conn.recv().await.expect("answer to the fast PING");
    assert_eq!(fast.id, 2, "the fast PING should be answered first");

    daemon.signal("TERM");
    wait_until_refused(&daemon.socket);
    // Refusing new connections while it drains, not because it is gone.
    assert!(
        daemon.child.try_wait().expect("try_wait").is_none(),
        "scaled exited before the PING in flight was answered"
    );

    let answer = conn
        .recv()
        .await
        .expect("the PING in flight was dropped at shutdown");
    assert_eq!(answer.id, 1);
    assert!(
        answer.err.is_none(),
        "the PING in flight failed: {:?}",
        answer.err
    );
    assert_eq!(answer.ok, rmpv::Value::from("PONG"));
    assert!(
        conn.recv().await.is_none(),
        "the connection stayed open after draining"
    );

    let status = daemon.wait_exit(STARTUP_LIMIT);
    assert_clean_exit(status, &daemon.socket);
}

#[tokio::test]
async fn sigterm_closes_idle_connections_and_fails_their_callers_cleanly() {
    // A grace period far longer than the wait below: the daemon exits in time only if the idle
    // connection is closed when the drain begins, not when the grace period ends.
    let mut daemon = TestDaemon::start(&["--shutdown-timeout", "600"]);
    let client = daemon.client().await;
    client.set("k", b"v", None).await.expect("SET");

    daemon.signal("TERM");
    let status = daemon.wait_exit(STARTUP_LIMIT);
    assert_clean_exit(status, &daemon.socket);

    // The client's connection is gone and the daemon with it: an error, not a hang.
    let err = tokio::time::timeout(STARTUP_LIMIT, client.get("k"))
        .await
        .expect("a call after shutdown hung")
        .expect_err("a call after shutdown succeeded");
    assert!(
        matches!(
            err,
            scaled_client::Error::Io(_) | scaled_client::Error::ConnectionLost
        ),
        "unexpected error after shutdown: {err:?}"
    );
}

#[tokio::test]
async fn a_request_outlasting_the_grace_period_is_dropped_and_the_daemon_still_exits_zero() {
    let mut daemon = TestDaemon::start(&["--shutdown-timeout", "0.3"]);
    let mut conn = daemon.raw().await;
    let stuck = Request {
        args: Args {
            delay_ms: Some(60_000),
            ..Args::default()
        },
        ..Request::new(1, CommandName::Ping)
    };
    conn.request(&stuck).await;
    conn.request(&Request::new(2, CommandName::Ping)).await;
    assert_eq!(conn.recv().await.expect("answer to the fast PING").id, 2);

    daemon.signal("TERM");
    let status = daemon.wait_exit(STARTUP_LIMIT);
    assert_clean_exit(status, &daemon.socket);
    assert!(
        conn.recv().await.is_none(),
        "the PING that outlasted the grace period was answered"
    );
}

#[tokio::test]
async fn sigint_exits_zero_and_removes_the_socket() {
    let mut daemon = TestDaemon::start(&[]);
    daemon.client().await.ping().await.expect("PING");
    daemon.signal("INT");
    let status = daemon.wait_exit(STARTUP_LIMIT);
    assert_clean_exit(status, &daemon.socket);
}

#[tokio::test]
async fn a_second_daemon_on_a_live_socket_fails_and_the_first_keeps_serving() {
    let mut first = TestDaemon::start(&[]);
    let client = first.client().await;
    client.set("first", b"still here", None).await.expect("SET");

    let mut second = Reaper(Some(
        scaled_at(&first.socket)
            .spawn()
            .expect("spawn the second scaled"),
    ));
    let output = second.wait(STARTUP_LIMIT);
    assert!(
        !output.status.success(),
        "a second daemon started on a live socket"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("already"),
        "the second daemon did not say why: {stderr}"
    );

    // The first is untouched: same socket, same connection, same data, new connections too.
    assert!(
        first.child.try_wait().expect("try_wait").is_none(),
        "the first daemon exited"
    );
    assert_eq!(
        client.get("first").await.expect("GET").as_deref(),
        Some(&b"still here"[..])
    );
    let fresh = first.client().await;
    assert_eq!(
        fresh.get("first").await.expect("GET").as_deref(),
        Some(&b"still here"[..])
    );

    first.signal("TERM");
    let status = first.wait_exit(STARTUP_LIMIT);
    assert_clean_exit(status, &first.socket);
}

#[tokio::test]
async fn a_stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("scaled.sock");
    // A listener that is dropped leaves its socket file behind, as a daemon that was killed would.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind a listener"));
    assert!(socket.exists(), "the stale socket file was not left behind");
    assert!(
        std::os::unix::net::UnixStream::connect(&socket).is_err(),
        "the stale socket answers"
    );

    let mut daemon = Reaper(Some(scaled_at(&socket).spawn().expect("spawn scaled")));
    wait_until_serving(daemon.child(), &socket);
    let client = Client::connect(Endpoint::Unix(socket.clone()), "stale")
        .await
        .expect("connect");
    client.set("k", b"v", None).await.expect("SET");
    assert_eq!(
        client.get("k").await.expect("GET").as_deref(),
        Some(&b"v"[..])
    );

    let pid = daemon.child().id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(killed.success(), "kill -TERM failed");
    let output = daemon.wait(STARTUP_LIMIT);
    assert_clean_exit(output.status, &socket);
}

#[tokio::test]
async fn a_regular_file_at_the_socket_path_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("scaled.sock");
    let contents = b"not a socket: somebody's data\n";
    std::fs::write(&socket, contents).expect("write the file");

    let mut daemon = Reaper(Some(scaled_at(&socket).spawn().expect("spawn scaled")));
    let output = daemon.wait(STARTUP_LIMIT);
    assert!(
        !output.status.success(),
        "scaled started over a regular file"
    );
    let meta = std::fs::symlink_metadata(&socket).expect("the file is gone");
    assert!(
        meta.file_type().is_file(),
        "the file was replaced by something else"
    );
    assert_eq!(
        std::fs::read(&socket).expect("read the file"),
        contents,
        "the file was changed"
    );
}
