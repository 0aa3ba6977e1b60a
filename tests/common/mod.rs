//! Shared helpers for the integration tests: start the real `scaled` binary on a socket in a fresh
//! temporary directory, connect to it as a client would, and clean up. [`redis_server`] starts real
//! `redis-server` processes, and [`daemon_group`] several daemons sharing one of them.
#![allow(dead_code)]

pub mod bench_run;
pub mod daemon_group;
pub mod probe;
pub mod redis_server;

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use scaled_client::frame::{push_frame, take_frame};
use scaled_client::proto::{Args, CommandName, Request, Response, MAX_FRAME_LEN, PROTOCOL_VERSION};
use scaled_client::{Client, Endpoint};

/// How long a test waits for the daemon to come up or go down before failing.
pub const STARTUP_LIMIT: Duration = Duration::from_secs(20);

/// Prefixes of the environment variables the daemon and scalectl read. Every variable under them is
/// cleared from a spawned process, so neither the caller's environment nor a setting added later can
/// change what a test sees; a list of names would go stale as settings are added.
const SETTING_PREFIXES: &[&str] = &["SCALED_", "REDIS_", "CACHE_", "LOCK_"];

/// Removes from `cmd`'s environment every variable whose name starts with one of
/// [`SETTING_PREFIXES`], as found in this process's environment now.
pub fn clear_settings(cmd: &mut Command) -> &mut Command {
    for (name, _) in std::env::vars_os() {
        let is_setting = name
            .to_str()
            .is_some_and(|n| SETTING_PREFIXES.iter().any(|p| n.starts_with(p)));
        if is_setting {
            cmd.env_remove(&name);
        }
    }
    cmd
}

/// The `scaled` binary, not yet started, with every setting variable cleared: the one way tests
/// spawn the daemon.
pub fn scaled_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_scaled"));
    clear_settings(&mut cmd);
    cmd
}

/// The `scalectl` binary, not yet started, with every setting variable cleared.
pub fn scalectl_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_scalectl"));
    clear_settings(&mut cmd);
    cmd
}

/// A running daemon, killed when dropped.
pub struct TestDaemon {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
}

impl TestDaemon {
    /// Starts `scaled --socket <tmp>/scaled.sock <extra>` and waits until it accepts connections.
    pub fn start(extra: &[&str]) -> TestDaemon {
        TestDaemon::start_logging_to(extra, Stdio::inherit())
    }

    /// Like [`TestDaemon::start`], with the daemon's stderr (its log) going to `stderr`.
    pub fn start_logging_to(extra: &[&str], stderr: impl Into<Stdio>) -> TestDaemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("scaled.sock");
        TestDaemon::spawn(scaled_command(), socket, dir, extra, stderr.into())
    }

    /// Starts the daemon on `socket` (its directory need not exist yet).
    pub fn start_at(socket: &std::path::Path, extra: &[&str]) -> TestDaemon {
        let dir = tempfile::tempdir().expect("temp dir");
        TestDaemon::spawn(
            scaled_command(),
            socket.to_path_buf(),
            dir,
            extra,
            Stdio::inherit(),
        )
    }

    /// Starts the daemon through `sh -c SCRIPT`, where the script ends with `exec "$0" "$@"` (for
    /// example to set a ulimit first).
    pub fn start_wrapped(script: &str, extra: &[&str]) -> TestDaemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("scaled.sock");
        let mut command = Command::new("sh");
        clear_settings(&mut command);
        command
            .arg("-c")
            .arg(script)
            .arg(env!("CARGO_BIN_EXE_scaled"));
        TestDaemon::spawn(command, socket, dir, extra, Stdio::inherit())
    }

    fn spawn(
        mut cmd: Command,
        socket: PathBuf,
        dir: tempfile::TempDir,
        extra: &[&str],
        stderr: Stdio,
    ) -> TestDaemon {
        let child = cmd
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn scaled");
        let mut daemon = TestDaemon { child, socket, dir };
        daemon.wait_until_serving();
        daemon
    }

    /// Waits until the daemon accepts connections on its socket; fails the test, with the exit
    /// status, if it exits first, or after [`STARTUP_LIMIT`].
    pub fn wait_until_serving(&mut self) {
        let deadline = Instant::now() + STARTUP_LIMIT;
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "scaled exited with {status} before serving {:?}",
                    self.socket
                );
            }
            assert!(
                Instant::now() < deadline,
                "scaled did not start serving {:?}",
                self.socket
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A client on the daemon's socket.
    pub async fn client(&self) -> Client {
        Client::connect(Endpoint::Unix(self.socket.clone()), "test")
            .await
            .expect("connect")
    }

    /// A raw connection that has already said HELLO.
    pub async fn raw(&self) -> RawConn {
        let mut conn = self.raw_without_hello().await;
        let hello = Request {
            args: Args {
                version: Some(PROTOCOL_VERSION),
                client: Some("raw".into()),
                ..Args::default()
            },
            ..Request::new(0, CommandName::Hello)
        };
        conn.send(&hello.to_msgpack()).await;
        let answer = conn.recv().await.expect("HELLO answer");
        assert!(answer.err.is_none(), "HELLO failed: {:?}", answer.err);
        conn
    }

    /// A raw connection, nothing sent yet.
    pub async fn raw_without_hello(&self) -> RawConn {
        let stream = UnixStream::connect(&self.socket).await.expect("connect");
        RawConn {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the daemon to exit, failing the test after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "scaled did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A token file for `--auth-token-file` (and a client's `--token-file`) holding `contents`, with the
/// mode 600 the daemon requires, in a fresh directory that lives as long as the returned guard.
pub fn token_file(contents: &str) -> (tempfile::TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("tokens");
    std::fs::write(&path, contents).expect("write the token file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
    (dir, path)
}

/// A connection that speaks frames directly, for tests of the protocol itself.
pub struct RawConn {
    pub stream: UnixStream,
    buf: BytesMut,
}

impl RawConn {
    /// Sends one frame with this body.
    pub async fn send(&mut self, body: &[u8]) {
        let mut frame = Vec::new();
        push_frame(&mut frame, body);
        self.send_bytes(&frame).await;
    }

    /// Sends bytes as they are.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Sends a request.
    pub async fn request(&mut self, request: &Request) {
        self.send(&request.to_msgpack()).await;
    }

    /// The next response, or `None` when the daemon closed the connection (a reset included: a
    /// daemon that closes with bytes of ours unread resets). Fails the test after 20 s.
    pub async fn recv(&mut self) -> Option<Response> {
        tokio::time::timeout(STARTUP_LIMIT, async {
            loop {
                if let Some(body) = take_frame(&mut self.buf, MAX_FRAME_LEN).expect("frame size") {
                    return Some(Response::decode(&body).expect("decodable response"));
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) => return None,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                    Err(e) => panic!("read: {e}"),
                }
            }
        })
        .await
        .expect("no answer from scaled within 20 s")
    }
}
