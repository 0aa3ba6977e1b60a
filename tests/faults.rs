//! Faults of the processes around a lock, each made for real: a daemon holding distributed locks is
//! killed with SIGKILL, a lock holder is frozen with SIGSTOP past its lease, and the daemon is killed
//! and restarted while clients keep working. What must hold:
//! - a dead daemon's locks pass to the other daemons once their leases end in Redis, and not before;
//! - a holder that wakes after its lease ended has its fenced write refused (FENCED), on one daemon
//!   and across two, and the newer holder's write stands;
//! - clients of a restarted daemon see clear errors while it is away, never a hang, and carry on
//!   once it is back.
//!
//! Redis itself failing is in tests/redis_faults.rs.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon_group::DaemonGroup;
use common::redis_server::RedisServer;
use common::{scalectl_command, TestDaemon};
use scaled_client::{Client, Error, LockOptions};

/// How long a test waits for something that should happen, before it fails saying what.
const LIMIT: Duration = Duration::from_secs(20);

fn lease(ttl: Duration) -> LockOptions {
    LockOptions {
        ttl: Some(ttl),
        wait: Some(LIMIT),
        auto_renew: false,
    }
}

fn try_once(ttl: Duration) -> LockOptions {
    LockOptions {
        ttl: Some(ttl),
        wait: Some(Duration::ZERO),
        auto_renew: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_holding_locks_frees_them_after_their_leases_and_no_sooner() {
    let redis = RedisServer::start();
    let mut group = DaemonGroup::start_available(&redis, 2, &[]).await;
    let (a, b) = (group.host(0).client().await, group.host(1).client().await);
    let ttl = Duration::from_millis(1500);

    // Three plain leases and one renewed one, all held on host 0.
    let before_grants = Instant::now();
    let (mut held, mut guards) = (Vec::new(), Vec::new());
    for key in ["sess:1", "sess:2", "sess:3"] {
        let guard = a.lock(key, lease(ttl)).await.expect("LOCK on host 0");
        held.push((key, guard.fence()));
        guards.push(guard); // a guard dropped would release its lock
    }
    let renewed = a
        .lock(
            "sess:renewed",
            LockOptions {
                ttl: Some(Duration::from_secs(1)),
                wait: Some(LIMIT),
                auto_renew: true,
            },
        )
        .await
        .expect("auto_renew LOCK on host 0");
    std::mem::forget(renewed); // its daemon dies holding it

    group.daemons[0].child.kill().expect("SIGKILL host 0");
    group.daemons[0].child.wait().expect("reap host 0");
    // Their daemon is dead: nothing is left to release them but their leases.
    guards.into_iter().for_each(std::mem::forget);

    // While the leases run, host 1 cannot have the locks: they are held in Redis by a dead host.
    for (key, _) in &held {
        let early = b.lock(key, try_once(ttl)).await;
        if before_grants.elapsed() < ttl {
            assert!(
                matches!(early, Err(Error::Locked(_))),
                "{key} was granted on host 1 while host 0's lease still ran: {early:?}"
            );
        }
    }
    // Then each lock is granted, with a fence above the dead holder's, and never before its lease
    // could have ended: the lease began after `before_grants`.
    for (key, dead_fence) in held {
        let guard = b.lock(key, lease(ttl)).await.expect("LOCK on host 1");
        assert!(
            before_grants.elapsed() >= ttl,
            "{key} was granted {:?} after host 0 took it with a {ttl:?} lease",
            before_grants.elapsed()
        );
        assert!(
            guard.fence() > dead_fence,
            "{key}: fence {} not above the dead holder's {dead_fence}",
            guard.fence()
        );
    }
    // The renewed lock ends too once nobody renews it, within its 1 s lease of the last renewal.
    b.lock("sess:renewed", lease(ttl))
        .await
        .expect("the dead host's auto_renew lock was never freed");
}

/// Spawns `scalectl lock --no-renew` holding `key` with a `ttl_ms` lease on `holder_socket`, whose
/// command prints its pid, stops itself (SIGSTOP), and once continued writes `stale` to `data`
/// fenced with the grant it had, on `writer_socket`. Answers the child and the command's pid.
fn frozen_holder(
    holder_socket: &Path,
    writer_socket: &Path,
    key: &str,
    ttl_ms: u64,
) -> (Child, u32) {
    let script = format!(
        "echo $$; kill -STOP $$; exec \"$SCALECTL\" --socket '{}' set --fence \"$SCALED_LOCK_KEY:$SCALED_LOCK_FENCE\" data stale",
        writer_socket.display()
    );
    let mut child = scalectl_command()
        .env("SCALECTL", env!("CARGO_BIN_EXE_scalectl"))
        .arg("--socket")
        .arg(holder_socket)
        .args(["lock", "--no-renew", "--wait", "10", "--ttl"])
        .arg(format!("{}", ttl_ms as f64 / 1000.0))
        .arg(key)
        .args(["--", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn scalectl lock");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the holder's pid");
    let pid: u32 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("the holder printed {line:?}, not its pid"));
    // Wait until it has really stopped itself.
    let deadline = Instant::now() + LIMIT;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
        if state.is_some_and(|s| s.starts_with('T')) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the holder never stopped: {stat}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    (child, pid)
}

/// Continues the frozen holder and answers scalectl's exit code and stderr.
fn thaw(mut child: Child, pid: u32) -> (Option<i32>, String) {
    let status = std::process::Command::new("kill")
        .args(["-CONT", &pid.to_string()])
        .status()
        .expect("kill -CONT");
    assert!(status.success(), "kill -CONT {pid} failed");
    let deadline = Instant::now() + LIMIT;
    let code = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status.code();
        }
        assert!(
            Instant::now() < deadline,
            "the thawed holder did not finish"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
    }
    (code, stderr)
}

/// The frozen holder's lease ends; `other` takes the lock and writes `fresh`; the holder wakes and
/// its write with the old grant is refused, and `fresh` stands.
async fn paused_past_the_lease(holder: &TestDaemon, other: &Client) {
    let (child, pid) = frozen_holder(&holder.socket, &holder.socket, "account:7", 300);
    let guard = other
        .lock("account:7", lease(Duration::from_secs(10)))
        .await
        .expect("the frozen holder's lease never ended");
    other
        .set_fenced("data", b"fresh", None, &guard.write_fence())
        .await
        .expect("the new holder's fenced SET");
    let (code, stderr) = thaw(child, pid);
    assert_eq!(
        code,
        Some(76),
        "the stale holder's fenced write was not refused with FENCED (exit 76): {stderr}"
    );
    assert!(
        stderr.contains("FENCED") || stderr.contains("fenc"),
        "{stderr}"
    );
    assert_eq!(
        other.get("data").await.expect("GET").as_deref(),
        Some(&b"fresh"[..]),
        "the stale write replaced the newer holder's"
    );
    guard.unlock().await.expect("UNLOCK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_frozen_past_its_lease_has_its_fenced_write_refused() {
    let daemon = TestDaemon::start(&[]);
    let other = daemon.client().await;
    paused_past_the_lease(&daemon, &other).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_frozen_past_its_lease_on_one_host_is_fenced_off_by_another() {
    let redis = RedisServer::start();
    let group = DaemonGroup::start_available(&redis, 2, &[]).await;
    let other = group.host(1).client().await;
    paused_past_the_lease(group.host(0), &other).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_see_clear_errors_while_the_daemon_restarts_then_carry_on() {
    let mut daemon = TestDaemon::start(&[]);
    let client = daemon.client().await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (client, stop, ok, failed) = (client.clone(), stop.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let key = format!("w{w}");
                let call = async {
                    client.set(&key, &n.to_be_bytes(), None).await?;
                    client.get(&key).await
                };
                match tokio::time::timeout(LIMIT, call).await {
                    Err(_) => panic!("a call hung for {LIMIT:?} across the restart"),
                    Ok(Ok(_)) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(Error::ConnectionLost | Error::Io(_) | Error::ShuttingDown(_))) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Ok(Err(e)) => panic!("an unclear error across the restart: {e:?}"),
                }
            }
        }));
    }
    let wait_for_more = |what: &'static str, counter: Arc<AtomicU64>| async move {
        let start = counter.load(Ordering::Relaxed);
        let deadline = Instant::now() + LIMIT;
        while counter.load(Ordering::Relaxed) < start + 50 {
            assert!(Instant::now() < deadline, "no progress: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    wait_for_more("before the restart", ok.clone()).await;

    daemon.child.kill().expect("SIGKILL scaled");
    daemon.child.wait().expect("reap scaled");
    wait_for_more("no errors while the daemon was away", failed.clone()).await;
    let socket = daemon.socket.clone();
    let restarted = TestDaemon::start_at(&socket, &[]);
    wait_for_more("after the restart", ok.clone()).await;

    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.expect("a worker panicked");
    }
    assert!(client.ping().await.is_ok());
    drop(restarted);
}
