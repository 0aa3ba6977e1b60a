//! Running under systemd: the unit file passes `systemd-analyze verify`; the daemon tells the service
//! manager when it is ready (after its socket accepts, and with Redis after Redis is reached or
//! degraded mode entered), what it is doing, that it is alive, and that it is stopping, as read from
//! a datagram socket the test binds as `$NOTIFY_SOCKET`; SIGHUP keeps it serving, reopens its log
//! file and reloads the log filter; a second SIGTERM during a drain ends it at once.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::{scaled_command, TestDaemon, STARTUP_LIMIT};
use scaled_client::proto::{Args, CommandName, Request};

/// The notifications a daemon sends, read from the socket the test gave it as `$NOTIFY_SOCKET`.
struct Notifications {
    socket: UnixDatagram,
    /// What `$NOTIFY_SOCKET` is set to: a path, or `@name` in the abstract namespace.
    address: String,
    /// Every message received so far, in order.
    seen: Vec<String>,
}

impl Notifications {
    /// A socket at `<dir>/notify`.
    fn bind(dir: &Path) -> Notifications {
        let path = dir.join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        Notifications::on(socket, path.to_str().expect("utf-8 path").to_string())
    }

    /// A socket in the abstract namespace, as systemd itself may hand out.
    fn bind_abstract(name: &str) -> Notifications {
        use std::os::linux::net::SocketAddrExt;
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind abstract notify socket");
        Notifications::on(socket, format!("@{name}"))
    }

    fn on(socket: UnixDatagram, address: String) -> Notifications {
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        Notifications {
            socket,
            address,
            seen: Vec::new(),
        }
    }

    /// The next message, if one arrives within the read timeout.
    fn next(&mut self) -> Option<String> {
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(msg.clone());
                Some(msg)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("reading the notify socket: {e}"),
        }
    }

    /// Waits for a message with the assignment `line` (`READY=1`, or a prefix like `STATUS=serving`)
    /// and returns the whole message; fails the test after [`STARTUP_LIMIT`].
    fn wait_for(&mut self, line: &str) -> String {
        let deadline = Instant::now() + STARTUP_LIMIT;
        loop {
            if let Some(msg) = self.next() {
                if msg.lines().any(|l| l.starts_with(line)) {
                    return msg;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no `{line}` notification within {STARTUP_LIMIT:?}; got {:?}",
                self.seen
            );
        }
    }

    /// Every message already waiting, without blocking for more.
    fn drain(&mut self) -> Vec<String> {
        let mut got = Vec::new();
        while let Some(msg) = self.next() {
            got.push(msg);
        }
        got
    }
}

/// Starts the daemon on a socket in `dir` with `$NOTIFY_SOCKET` set to `notify` and `env` added;
/// returns at once (the caller decides what "started" means).
fn spawn_notifying(
    dir: tempfile::TempDir,
    notify: &str,
    env: &[(&str, &str)],
    args: &[&str],
) -> TestDaemon {
    let socket = dir.path().join("scaled.sock");
    let mut cmd = scaled_command();
    cmd.env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env("NOTIFY_SOCKET", notify)
        .envs(env.iter().copied())
        .arg("--socket")
        .arg(&socket)
        .args(args)
        .stdin(Stdio::null());
    let child = cmd.spawn().expect("spawn scaled");
    TestDaemon { child, socket, dir }
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/scaled.service"
    ))
    .expect("read systemd/scaled.service");
    // `verify` checks that ExecStart's binary exists: point it at the one this build made.
    let exec = "ExecStart=/usr/local/bin/scaled ";
    assert!(unit.contains(exec), "the unit's ExecStart changed: {exec}");
    let local = unit.replace(
        exec,
        &format!("ExecStart={} ", env!("CARGO_BIN_EXE_scaled")),
    );
    for line in ["Type=notify", "WatchdogSec=", "RuntimeDirectory=scaled"] {
        assert!(unit.contains(line), "the unit lost `{line}`");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("scaled.service");
    std::fs::write(&path, local).expect("write the unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze (Debian package `systemd`; scripts/test-all installs it)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ready_status_keep_alives_and_stopping_reach_the_notify_socket() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut notes = Notifications::bind(dir.path());
    let notify = notes.address.clone();
    let mut daemon = spawn_notifying(dir, &notify, &[("WATCHDOG_USEC", "200000")], &[]);

    notes.wait_for("STATUS=starting");
    let ready = notes.wait_for("READY=1");
    assert!(
        ready.contains("STATUS=serving 0 connections"),
        "READY came without the serving status: {ready:?}"
    );
    // READY means the socket accepts: no retry needed.
    let conn = std::os::unix::net::UnixStream::connect(&daemon.socket)
        .expect("READY=1 was sent before the socket accepted connections");
    notes.wait_for("STATUS=serving 1 connections");
    drop(conn);
    notes.wait_for("STATUS=serving 0 connections");
    // Keep-alives keep coming while it serves.
    notes.wait_for("WATCHDOG=1");
    notes.wait_for("WATCHDOG=1");

    daemon.signal("TERM");
    let stopping = notes.wait_for("STOPPING=1");
    assert!(
        stopping.contains("STATUS=draining"),
        "STOPPING=1 came without the draining status: {stopping:?}"
    );
    let status = daemon.wait_exit(STARTUP_LIMIT);
    assert!(status.success(), "scaled exited with {status}");
    notes.wait_for("STATUS=stopped");
}

#[test]
fn without_notify_socket_nothing_changes_and_a_watchdog_for_another_pid_is_ignored() {
    // NOTIFY_SOCKET unset: the daemon serves as before.
    let mut plain = TestDaemon::start(&[]);
    plain.signal("TERM");
    assert!(plain.wait_exit(STARTUP_LIMIT).success());

    // A WATCHDOG_PID naming another process: no keep-alives, while READY and STATUS still come.
    let dir = tempfile::tempdir().expect("temp dir");
    let mut notes = Notifications::bind(dir.path());
    let notify = notes.address.clone();
    let mut daemon = spawn_notifying(
        dir,
        &notify,
        &[("WATCHDOG_USEC", "100000"), ("WATCHDOG_PID", "1")],
        &[],
    );
    notes.wait_for("READY=1");
    let _conn = std::os::unix::net::UnixStream::connect(&daemon.socket).expect("connect");
    // Were the watchdog taken as ours, keep-alives would come every 50 ms, the first on the tick
    // that first reports the connection, and sent before that status line.
    notes.wait_for("STATUS=serving 1 connections");
    daemon.signal("TERM");
    notes.wait_for("STOPPING=1");
    assert!(daemon.wait_exit(STARTUP_LIMIT).success());
    assert!(
        !notes.seen.iter().any(|m| m.contains("WATCHDOG=1")),
        "keep-alives were sent for another process's watchdog: {:?}",
        notes.seen
    );
}

#[test]
fn with_redis_ready_waits_for_redis() {
    let redis = RedisServer::start();
    // A stopped Redis accepts the connection but never answers: the first attempt hangs until resumed.
    redis.pause();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut notes = Notifications::bind(dir.path());
    let notify = notes.address.clone();
    let mut daemon = spawn_notifying(
        dir,
        &notify,
        &[],
        &[
            "--redis-url",
            &redis.url(),
            "--redis-connect-timeout",
            "600",
            "--redis-response-timeout",
            "600",
        ],
    );
    notes.wait_for("STATUS=waiting for Redis");
    daemon.wait_until_serving();
    let before = notes.drain();
    assert!(
        !notes.seen.iter().any(|m| m.contains("READY=1")),
        "READY=1 was sent before Redis answered: {before:?}"
    );

    redis.resume();
    let ready = notes.wait_for("READY=1");
    assert!(
        ready.contains("Redis connected"),
        "READY after Redis answered should say it is connected: {ready:?}"
    );
    daemon.signal("TERM");
    assert!(daemon.wait_exit(STARTUP_LIMIT).success());
}

#[test]
fn with_redis_unreachable_ready_comes_in_degraded_mode() {
    // A port nobody listens on: connections are refused at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut notes = Notifications::bind_abstract(&format!("scaled-test-{}", std::process::id()));
    let notify = notes.address.clone();
    let mut daemon = spawn_notifying(
        dir,
        &notify,
        &[],
        &["--redis-url", &format!("redis://127.0.0.1:{port}")],
    );
    let ready = notes.wait_for("READY=1");
    assert!(
        ready.contains("degraded"),
        "READY without Redis should say degraded: {ready:?}"
    );
    daemon.wait_until_serving();
    daemon.signal("TERM");
    assert!(daemon.wait_exit(STARTUP_LIMIT).success());
}

/// Polls `path` until its text contains `needle`; fails the test after [`STARTUP_LIMIT`].
fn wait_for_text(path: &Path, needle: &str) -> String {
    let deadline = Instant::now() + STARTUP_LIMIT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{path:?} did not come to contain `{needle}` within {STARTUP_LIMIT:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn sighup_keeps_serving_reopens_the_log_file_and_reloads_the_log_filter() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("scaled.log");
    let env_file = dir.path().join("scaled.env");
    std::fs::write(&env_file, "SCALED_LOG=info\nCACHE_SIZE=100\n").expect("write env file");
    let (log_arg, env_arg) = (
        log.to_str().expect("utf-8").to_string(),
        env_file.to_str().expect("utf-8").to_string(),
    );
    let socket = dir.path().join("scaled.sock");
    let child = scaled_command()
        .env("SCALED_LOG", "info")
        .env("CACHE_SIZE", "100")
        .args(["--log-file", &log_arg, "--env-file", &env_arg, "--socket"])
        .arg(&socket)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn scaled");
    let mut daemon = TestDaemon { child, socket, dir };
    daemon.wait_until_serving();
    let client = daemon.client().await;
    client.set("k", b"v", None).await.expect("SET");
    wait_for_text(&log, "scaled serving");

    // As logrotate does: move the file away, then SIGHUP.
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).expect("rotate the log");
    std::fs::write(&env_file, "SCALED_LOG=debug\nCACHE_SIZE=200\n").expect("edit env file");
    daemon.signal("HUP");

    wait_for_text(&log, "log file reopened");
    wait_for_text(&log, "log filter changed");
    wait_for_text(&log, "CACHE_SIZE");
    let text = wait_for_text(&log, "takes effect at the next restart");
    assert!(
        text.lines()
            .any(|l| l.contains("CACHE_SIZE") && l.contains("next restart")),
        "the changed CACHE_SIZE was not reported as needing a restart:\n{text}"
    );
    assert!(
        std::fs::read_to_string(&rotated)
            .expect("read rotated log")
            .contains("scaled serving"),
        "the rotated file lost the lines written before SIGHUP"
    );

    // Still serving, on the same connection, with what it held; and at debug the request is logged.
    assert!(
        daemon.child.try_wait().expect("try_wait").is_none(),
        "SIGHUP ended the daemon"
    );
    assert_eq!(
        client.get("k").await.expect("GET after SIGHUP").as_deref(),
        Some(&b"v"[..])
    );
    wait_for_text(&log, "request finished");

    daemon.signal("TERM");
    assert!(daemon.wait_exit(STARTUP_LIMIT).success());
}

#[tokio::test]
async fn a_second_sigterm_during_a_held_drain_ends_the_daemon_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut notes = Notifications::bind(dir.path());
    let notify = notes.address.clone();
    // A drain that would last as long as the slow PING (60 s), far past the test's bound.
    let mut daemon = spawn_notifying(dir, &notify, &[], &["--shutdown-timeout", "600"]);
    notes.wait_for("READY=1");
    let mut conn = daemon.raw().await;
    let slow = Request {
        args: Args {
            delay_ms: Some(60_000),
            ..Args::default()
        },
        ..Request::new(1, CommandName::Ping)
    };
    conn.request(&slow).await;
    conn.request(&Request::new(2, CommandName::Ping)).await;
    assert_eq!(conn.recv().await.expect("the fast PING's answer").id, 2);

    daemon.signal("TERM");
    notes.wait_for("STOPPING=1");
    assert!(
        daemon.child.try_wait().expect("try_wait").is_none(),
        "the first SIGTERM ended the daemon without draining the slow PING"
    );
    daemon.signal("TERM");
    let status = daemon.wait_exit(STARTUP_LIMIT);
    assert_eq!(
        status.code(),
        Some(143),
        "a second SIGTERM should exit with 128 + 15, got {status}"
    );
    assert!(
        conn.recv().await.is_none(),
        "the slow PING was answered although the drain was cut short"
    );
    assert!(
        !daemon.socket.exists(),
        "the socket file was left behind by the forced exit"
    );
}
