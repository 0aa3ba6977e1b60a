//! A real `redis-server` for the tests: started on a free loopback port in a temporary directory, with
//! every setting on the command line (no configuration file, so nothing on the machine can change it),
//! killed with SIGKILL and restarted on the same port and directory when a test asks, and stopped when
//! dropped. Tests inspect it through [`RedisServer::cmd`] with the `redis` crate's plain connection,
//! which carries binary values as they are (so a test can corrupt a value byte by byte).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a test waits for `redis-server` to answer PING after starting it.
const READY_LIMIT: Duration = Duration::from_secs(20);

/// How many fresh ports to try when the one picked is taken before `redis-server` binds it.
const PORT_ATTEMPTS: usize = 5;

/// Whether the server writes every acknowledged write to disk before answering it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persistence {
    /// No RDB, no AOF: a restart starts empty, as a Redis that lost its data would.
    None,
    /// AOF with `appendfsync always`: every write is on disk before Redis acknowledges it, so a
    /// SIGKILL and a restart keep every acknowledged write.
    AlwaysFsync,
}

/// A `redis-server` child process. Killed (SIGKILL) and reaped when dropped; its directory goes with it.
pub struct RedisServer {
    /// The running process; `None` between [`RedisServer::kill`] and [`RedisServer::restart`].
    child: Option<Child>,
    /// The loopback port, kept across restarts so the daemons' REDIS_URL stays right.
    port: u16,
    /// Working directory (AOF files, log), kept across restarts so persisted data survives them.
    dir: tempfile::TempDir,
    /// How it was started, so a restart starts it the same way.
    persistence: Persistence,
}

impl RedisServer {
    /// Starts a server without persistence and waits until it answers PING.
    pub fn start() -> RedisServer {
        RedisServer::start_with(Persistence::None)
    }

    /// Starts a server with AOF `appendfsync always`: acknowledged writes survive SIGKILL.
    pub fn start_persistent() -> RedisServer {
        RedisServer::start_with(Persistence::AlwaysFsync)
    }

    /// Starts a server on a free port and waits until it answers PING. A port taken by someone else
    /// between picking it and binding it is retried with another one.
    pub fn start_with(persistence: Persistence) -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir for redis-server");
        let mut last_failure = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let mut child = spawn(dir.path(), port, persistence);
            match wait_ready(&mut child, port) {
                Ok(()) => {
                    return RedisServer {
                        child: Some(child),
                        port,
                        dir,
                        persistence,
                    }
                }
                Err(failure) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_failure = format!("{failure}; log: {}", log_tail(dir.path()));
                }
            }
        }
        panic!("redis-server did not start after {PORT_ATTEMPTS} ports: {last_failure}");
    }

    /// The URL a daemon or client connects with.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server with SIGKILL, as a crash would, and reaps it. Nothing is flushed: only what
    /// `appendfsync always` already wrote survives.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL redis-server");
            child.wait().expect("reap redis-server");
        }
    }

    /// Stops the server with SIGSTOP: its sockets stay open but nothing is answered, as with a hung
    /// Redis or a network that drops packets. [`RedisServer::resume`] undoes it.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.pid().expect("redis-server is running");
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid} failed");
    }

    /// Starts the server again on the same port and directory (after [`RedisServer::kill`]), and waits
    /// until it answers PING, which with AOF is after it has loaded its data.
    pub fn restart(&mut self) {
        self.kill();
        let mut child = spawn(self.dir.path(), self.port, self.persistence);
        if let Err(failure) = wait_ready(&mut child, self.port) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "redis-server did not restart on port {}: {failure}; log: {}",
                self.port,
                log_tail(self.dir.path())
            );
        }
        self.child = Some(child);
    }

    /// A plain (blocking) connection for a test to inspect or change the data with.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(READY_LIMIT))
            .expect("connect to the test redis-server")
    }

    /// Runs one command, e.g. `cmd(&["GET", "scaled:c:k"])`, and returns Redis's answer.
    pub fn cmd(&self, args: &[&[u8]]) -> redis::Value {
        let mut command = redis::cmd(std::str::from_utf8(args[0]).expect("command name"));
        for arg in &args[1..] {
            command.arg(*arg);
        }
        command
            .query(&mut self.connection())
            .unwrap_or_else(|e| panic!("redis {:?}: {e}", String::from_utf8_lossy(args[0])))
    }

    /// Runs one command whose answer is a bulk string (or nil), e.g. GET.
    pub fn get_bytes(&self, key: &str) -> Option<Vec<u8>> {
        redis::cmd("GET")
            .arg(key)
            .query(&mut self.connection())
            .expect("redis GET")
    }

    /// Every key matching `pattern` (KEYS; fine for the handful of keys a test makes), sorted.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query(&mut self.connection())
            .expect("redis KEYS");
        keys.sort();
        keys
    }

    /// How many times each command has been called since start (or the last CONFIG RESETSTAT), from
    /// `INFO commandstats`: Redis's own count, so a test can prove how many round trips were made.
    /// Names are lower case, as INFO gives them (`get`, `evalsha`, `publish`, ...).
    pub fn command_calls(&self) -> HashMap<String, u64> {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut self.connection())
            .expect("redis INFO commandstats");
        parse_commandstats(&info)
    }

    /// Zeroes Redis's command statistics.
    pub fn reset_stats(&self) {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query(&mut self.connection())
            .expect("redis CONFIG RESETSTAT");
    }

    /// The server's working directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `cmdstat_get:calls=3,usec=...` lines → `{"get": 3}`.
fn parse_commandstats(info: &str) -> HashMap<String, u64> {
    info.lines()
        .filter_map(|line| line.strip_prefix("cmdstat_"))
        .filter_map(|rest| {
            let (name, fields) = rest.split_once(':')?;
            let calls = fields
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

/// A port that was free a moment ago: bind port 0 on loopback, read it, let it go.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind a free loopback port")
        .port()
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("redis.log")
}

/// The end of the server's log, for a failure message.
fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(log_path(dir)).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// `redis-server` with every setting on the command line: loopback only, no RDB snapshots, AOF only
/// when asked for, its files and log in `dir`.
fn spawn(dir: &Path, port: u16, persistence: Persistence) -> Child {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--protected-mode", "yes"])
        .args(["--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(log_path(dir))
        .args(["--save", ""]);
    match persistence {
        Persistence::None => cmd.args(["--appendonly", "no"]),
        Persistence::AlwaysFsync => cmd.args(["--appendonly", "yes", "--appendfsync", "always"]),
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn redis-server (scripts/test-all installs it)")
}

/// Polls PING over a raw socket until `+PONG` (not `-LOADING`), the process exits, or the limit.
fn wait_ready(child: &mut Child, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + READY_LIMIT;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("redis-server exited with {status}"));
        }
        if ping(port) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("no PONG on port {port} within {READY_LIMIT:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One PING; true on `+PONG`.
fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut answer = [0u8; 7];
    stream.read_exact(&mut answer).is_ok() && &answer == b"+PONG\r\n"
}
