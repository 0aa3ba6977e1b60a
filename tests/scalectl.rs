//! `scalectl` as a shell script uses it, against the real daemon: `lock` excludes a second holder
//! (exit 75) until the first command finishes, waits in line, passes the grant to its command and exits
//! with the command's status; `locks`, `set`/`get`/`del`, `stats --json`, and an unreachable socket.
//! Holders signal readiness through marker files, never by sleeping; every wait is bounded.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use common::TestDaemon;
use scaled_client::answers::LockStats;
use scaled_client::{LockInfo, Stats};

/// How long a test waits for a process or a file before failing.
const EVENT_LIMIT: Duration = Duration::from_secs(20);

/// Exit status of `scalectl lock` when the lock could not be had.
const EXIT_NOT_LOCKED: i32 = 75;

/// A holder's COMMAND: writes the grant's fence to `$1` (atomically, by rename), then waits for the
/// file `$2` to appear, for at most about 30 s (exit 99 if it never does).
const HOLD_UNTIL_GO: &str = r#"printf '%s' "$SCALED_LOCK_FENCE" > "$1.tmp" && mv "$1.tmp" "$1" || exit 98
i=0
while [ ! -e "$2" ]; do
  i=$((i + 1))
  if [ "$i" -gt 3000 ]; then exit 99; fi
  sleep 0.01
done
exit 0"#;

/// `scalectl --socket <socket> <args>`, with the caller's settings (SCALED_SOCKET, ...) out of the way.
fn scalectl(socket: &Path) -> Command {
    let mut cmd = common::scalectl_command();
    cmd.arg("--socket").arg(socket);
    cmd
}

/// Runs scalectl to completion with `args`, failing the test if it does not finish in time.
fn run(socket: &Path, args: &[&str]) -> Output {
    run_with_stdin(socket, args, b"")
}

fn run_with_stdin(socket: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = scalectl(socket)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn scalectl");
    {
        use std::io::Write;
        let mut input = child.stdin.take().expect("stdin");
        input.write_all(stdin).expect("write stdin");
    }
    wait_exit(&mut child, &format!("scalectl {args:?}"));
    child.wait_with_output().expect("scalectl output")
}

/// Waits for a child to exit, killing it and failing the test after [`EVENT_LIMIT`].
fn wait_exit(child: &mut Child, what: &str) -> ExitStatus {
    let deadline = Instant::now() + EVENT_LIMIT;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {EVENT_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for `path` to exist, failing the test after [`EVENT_LIMIT`] or if `holder` exits first.
fn wait_for_file(path: &Path, holder: &mut Child) {
    let deadline = Instant::now() + EVENT_LIMIT;
    while !path.exists() {
        if let Some(status) = holder.try_wait().expect("try_wait") {
            panic!("the holder exited ({status}) before creating {path:?}");
        }
        assert!(
            Instant::now() < deadline,
            "{path:?} did not appear within {EVENT_LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("utf-8 stdout")
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).expect("utf-8 stderr")
}

fn code(output: &Output) -> i32 {
    output
        .status
        .code()
        .unwrap_or_else(|| panic!("scalectl killed by a signal: {output:?}"))
}

/// `stats --json`, decoded as the client's typed STATS document.
fn stats_json(socket: &Path) -> Stats {
    let out = run(socket, &["stats", "--json"]);
    assert_eq!(code(&out), 0, "stats --json: {}", stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("stats --json is the STATS document")
}

/// Polls `stats --json` until the `locks` figure `pick` chooses equals `want`.
fn wait_for_stat(socket: &Path, pick: fn(&LockStats) -> u64, want: u64) {
    let deadline = Instant::now() + EVENT_LIMIT;
    loop {
        let locks = stats_json(socket).locks;
        if pick(&locks) == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "locks still {locks:?}, not {want} where awaited, after {EVENT_LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `locks --json`, decoded: one row per held lock.
fn locks_json(socket: &Path) -> Vec<LockInfo> {
    let out = run(socket, &["locks", "--json"]);
    assert_eq!(code(&out), 0, "locks --json: {}", stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("locks --json is the LOCKS listing")
}

/// A `scalectl lock KEY -- sh -c HOLD_UNTIL_GO` running in the background, and its marker files.
struct Holder {
    child: Child,
    ready: PathBuf,
    go: PathBuf,
}

impl Holder {
    /// Starts the holder and waits until its command runs, holding the lock; returns its fence too.
    fn start(socket: &Path, dir: &Path, key: &str, name: &str) -> (Holder, u64) {
        let ready = dir.join(format!("{name}.ready"));
        let go = dir.join(format!("{name}.go"));
        let mut child = scalectl(socket)
            .args(["lock", key, "--", "sh", "-c", HOLD_UNTIL_GO, "holder"])
            .arg(&ready)
            .arg(&go)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn scalectl lock");
        wait_for_file(&ready, &mut child);
        let fence: u64 = std::fs::read_to_string(&ready)
            .expect("read the ready marker")
            .parse()
            .expect("SCALED_LOCK_FENCE is a number");
        (Holder { child, ready, go }, fence)
    }

    /// Lets the holder's command finish and returns scalectl's exit status.
    fn finish(mut self) -> ExitStatus {
        std::fs::write(&self.go, b"").expect("create the go marker");
        wait_exit(&mut self.child, "the holding scalectl")
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // On a failed assertion, do not leave the shell loop running.
        let _ = std::fs::write(&self.go, b"");
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.ready);
    }
}

#[test]
fn lock_excludes_a_second_holder_until_the_first_finishes() {
    let daemon = TestDaemon::start(&[]);
    let socket = daemon.socket.as_path();
    let (holder, fence) = Holder::start(socket, daemon.dir.path(), "deploy", "first");
    assert!(fence > 0);

    // The lock is listed while the first command runs.
    let listing = locks_json(socket);
    assert_eq!(listing.len(), 1, "{listing:?}");
    assert_eq!(listing[0].key, "deploy");
    assert_eq!(listing[0].fence, fence);
    assert!(listing[0].auto_renew);
    assert!(listing[0].owner.starts_with("scalectl#"), "{listing:?}");
    let table = run(socket, &["locks"]);
    assert_eq!(code(&table), 0, "locks: {}", stderr(&table));
    let table = stdout(&table);
    assert!(table.starts_with("KEY"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("deploy ") && l.contains("scalectl#")),
        "{table}"
    );

    // A second holder cannot have it: at once (--wait 0) or after a short wait.
    let second = run(socket, &["lock", "deploy", "--wait", "0", "--", "true"]);
    assert_eq!(code(&second), EXIT_NOT_LOCKED, "{}", stderr(&second));
    assert!(stderr(&second).contains("LOCKED"), "{}", stderr(&second));
    let second = run(socket, &["lock", "deploy", "--wait", "0.2", "--", "true"]);
    assert_eq!(code(&second), EXIT_NOT_LOCKED, "{}", stderr(&second));
    assert!(
        stderr(&second).contains("LOCK_TIMEOUT"),
        "{}",
        stderr(&second)
    );

    // The first command finishes; scalectl exits with its status, 0, and releases the lock.
    let status = holder.finish();
    assert_eq!(status.code(), Some(0));
    assert!(locks_json(socket).is_empty());
    let second = run(socket, &["lock", "deploy", "--wait", "0", "--", "true"]);
    assert_eq!(code(&second), 0, "{}", stderr(&second));

    let stats = stats_json(socket);
    assert_eq!(stats.locks.grants, 2, "{stats:?}");
    assert_eq!(stats.locks.refused, 1, "{stats:?}");
    assert_eq!(stats.locks.timeouts, 1, "{stats:?}");
    assert_eq!(stats.locks.held, 0, "{stats:?}");
}

#[test]
fn lock_waits_in_line_for_the_holder() {
    let daemon = TestDaemon::start(&[]);
    let socket = daemon.socket.as_path();
    let (holder, first_fence) = Holder::start(socket, daemon.dir.path(), "queue", "first");

    let mut second = scalectl(socket)
        .args([
            "lock",
            "queue",
            "--wait",
            "30",
            "--",
            "sh",
            "-c",
            r#"printf '%s' "$SCALED_LOCK_FENCE""#,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the second scalectl lock");
    wait_for_stat(socket, |l| l.waiters, 1);
    assert!(
        second.try_wait().expect("try_wait").is_none(),
        "the waiting scalectl exited while the lock was held"
    );

    assert_eq!(holder.finish().code(), Some(0));
    assert_eq!(
        wait_exit(&mut second, "the waiting scalectl").code(),
        Some(0)
    );
    let out = second.wait_with_output().expect("output");
    let second_fence: u64 = stdout(&out).parse().expect("a fence");
    assert!(second_fence > first_fence);
}

#[test]
fn lock_exits_with_the_command_status_and_passes_the_grant() {
    let daemon = TestDaemon::start(&[]);
    let socket = daemon.socket.as_path();

    let out = run(socket, &["lock", "status", "--", "sh", "-c", "exit 7"]);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    let out = run(socket, &["lock", "status", "--", "sh", "-c", "exit 0"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // Killed by a signal: 128 + the signal, as a shell reports it.
    let out = run(
        socket,
        &["lock", "status", "--", "sh", "-c", "kill -TERM $$"],
    );
    assert_eq!(code(&out), 128 + 15, "{}", stderr(&out));
    // The lock was released each time, whatever the status.
    assert!(locks_json(socket).is_empty());

    let show = r#"printf '%s %s %s' "$SCALED_LOCK_KEY" "$SCALED_LOCK_FENCE" "$SCALED_LOCK_TOKEN""#;
    let mut fences = Vec::new();
    for _ in 0..3 {
        let out = run(socket, &["lock", "grant", "--", "sh", "-c", show]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let text = stdout(&out);
        let parts: Vec<&str> = text.split(' ').collect();
        assert_eq!(parts.len(), 3, "{text:?}");
        assert_eq!(parts[0], "grant");
        fences.push(
            parts[1]
                .parse::<u64>()
                .expect("SCALED_LOCK_FENCE is a number"),
        );
        assert_eq!(parts[2].len(), 36, "SCALED_LOCK_TOKEN: {text:?}");
    }
    assert!(fences.windows(2).all(|w| w[0] < w[1]), "{fences:?}");

    // A command that cannot be run is an error, and leaves the lock free.
    let out = run(socket, &["lock", "grant", "--", "/nonexistent/command"]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("cannot run"), "{}", stderr(&out));
    assert!(locks_json(socket).is_empty());
}

/// A `scalectl lock` killed while its command runs frees the lock at once (its connection closes),
/// though the lease would renew for as long as the connection lived.
#[test]
fn a_killed_scalectl_frees_its_lock() {
    let daemon = TestDaemon::start(&[]);
    let socket = daemon.socket.as_path();
    let (mut holder, _) = Holder::start(socket, daemon.dir.path(), "crash", "first");
    holder.child.kill().expect("kill scalectl");
    holder.child.wait().expect("reap scalectl");

    let next = run(socket, &["lock", "crash", "--wait", "15", "--", "true"]);
    assert_eq!(code(&next), 0, "{}", stderr(&next));
    let stats = stats_json(socket);
    assert_eq!(stats.locks.released_on_disconnect, 1, "{stats:?}");
    assert_eq!(stats.locks.expiries, 0, "{stats:?}");
    // Dropping the holder creates the go marker, which ends the orphaned shell loop.
}

#[test]
fn set_get_del_round_trip() {
    let daemon = TestDaemon::start(&[]);
    let socket = daemon.socket.as_path();

    let out = run(socket, &["ping"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).starts_with("PONG"), "{}", stdout(&out));

    let out = run(socket, &["set", "greeting", "hello world"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "OK\n");
    let out = run(socket, &["get", "greeting"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello world", "get prints the raw value");

    // "-" reads the value from stdin, bytes as they are.
    let value = b"line one\nline two\n\x00\xff";
    let out = run_with_stdin(socket, &["set", "raw", "-", "--ttl", "0"], value);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = run(socket, &["get", "raw"]);
    assert_eq!(code(&out), 0);
    assert_eq!(out.stdout, value);

    let out = run(socket, &["get", "missing"]);
    assert_eq!(code(&out), 1, "get of a missing key");
    assert!(out.stdout.is_empty());

    let out = run(socket, &["del", "greeting"]);
    assert_eq!((code(&out), stdout(&out).as_str()), (0, "1\n"));
    let out = run(socket, &["del", "greeting"]);
    assert_eq!((code(&out), stdout(&out).as_str()), (0, "0\n"));
    assert_eq!(code(&run(socket, &["get", "greeting"])), 1);
}

#[test]
fn stats_json_has_every_section() {
    let daemon = TestDaemon::start(&[]);
    let socket = daemon.socket.as_path();
    // The JSON itself, untyped: the typed decoding would fill a missing member with 0.
    let out = run(socket, &["stats", "--json"]);
    assert_eq!(code(&out), 0, "stats --json: {}", stderr(&out));
    let stats: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    let doc = stats.as_object().expect("stats --json is an object");
    for member in ["cache", "performance", "redis", "connections", "locks"] {
        assert!(
            doc.get(member).is_some_and(serde_json::Value::is_object),
            "no `{member}` object in {stats}"
        );
    }
    assert!(stats["version"].is_string(), "{stats}");
    assert_eq!(stats["redis"]["configured"], false);
    assert!(stats["locks"]["grants"].is_u64(), "{stats}");
    assert!(
        stats["connections"]["current"].as_u64() >= Some(1),
        "{stats}"
    );

    // The table for people names the sections too.
    let out = run(socket, &["stats"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let table = stdout(&out);
    for word in ["cache", "connections", "redis", "locks"] {
        assert!(table.contains(word), "no {word} in:\n{table}");
    }
}

#[test]
fn an_unreachable_socket_is_an_error_on_stderr() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("nobody-listens.sock");
    for args in [
        &["ping"][..],
        &["get", "k"],
        &["lock", "k", "--", "true"],
        &["locks"],
    ] {
        let out = run(&socket, args);
        assert_eq!(code(&out), 2, "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}: {}", stdout(&out));
        let err = stderr(&out);
        assert!(err.contains("cannot reach scaled"), "{args:?}: {err}");
        assert!(err.contains("nobody-listens.sock"), "{args:?}: {err}");
    }
}
