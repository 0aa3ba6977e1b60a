//! Access control against the real daemon: Unix peers checked by uid and gid (real processes running
//! as `nobody`), TCP peers by the token in HELLO, and key namespaces that keep one app out of another's
//! keys and locks. The tests run as root, which may start a client as any uid.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::TestDaemon;
use scaled_client::frame::{push_frame, take_frame};
use scaled_client::proto::{
    Args, CommandName, Request, Response, MAX_FRAME_LEN, MAX_KEY_LEN, PROTOCOL_VERSION,
};
use scaled_client::{Client, Endpoint, Error, LockOptions, LockStatus};

/// `nobody`: a uid that is not root and is on no allow list unless a test puts it there.
const NOBODY: u32 = 65534;

/// The token file of the TCP tests: an admin token, and one token each for two apps.
const TOKENS: &str = "\
# admin: every key, every lock, every figure
admin-0123456789abcdef
web     web-0123456789abcdef
billing billing-0123456789abcdef
";

fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe");
    probe.local_addr().expect("probe address").port()
}

/// Runs `scalectl --socket SOCKET ARGS` as `uid`:`gid`.
fn scalectl_as(uid: u32, gid: u32, socket: &Path, args: &[&str]) -> Output {
    common::scalectl_command()
        .uid(uid)
        .gid(gid)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run scalectl")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Starts a daemon with `extra`, its log going to a file, and opens its socket's directory to other
/// users (a temp dir is 0700) so that `nobody` can reach the socket.
fn daemon_for_all_users(extra: &[&str]) -> (TestDaemon, tempfile::TempDir, PathBuf) {
    let log_dir = tempfile::tempdir().expect("temp dir");
    let log_path = log_dir.path().join("scaled.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut all = vec!["--socket-mode", "666"];
    all.extend_from_slice(extra);
    let daemon = TestDaemon::start_logging_to(&all, log);
    std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    (daemon, log_dir, log_path)
}

#[tokio::test]
async fn a_uid_off_the_allow_list_is_refused_counted_and_logged() {
    let (mut daemon, _log_dir, log_path) =
        daemon_for_all_users(&["--allow-uid", "0", "--allow-gid", "4242"]);

    let refused = scalectl_as(NOBODY, NOBODY, &daemon.socket, &["ping"]);
    assert_eq!(
        refused.status.code(),
        Some(2),
        "nobody was let in: {refused:?}"
    );
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains("DENIED") && stderr.contains("uid 65534"),
        "stderr: {stderr}"
    );

    // The same uid is let in through a group on the allow list, and root through its uid.
    let by_group = scalectl_as(NOBODY, 4242, &daemon.socket, &["ping"]);
    assert!(by_group.status.success(), "gid 4242 refused: {by_group:?}");
    let stats = daemon.client().await.stats().await.expect("STATS as root");
    assert_eq!(stats.connections.denied, 1);

    daemon.signal("TERM");
    daemon.wait_exit(common::STARTUP_LIMIT);
    let log = std::fs::read_to_string(&log_path).expect("read the log");
    assert!(
        log.contains("access denied") && log.contains("uid 65534"),
        "log: {log}"
    );
}

#[test]
fn namespaces_by_uid_keep_apps_apart_and_admins_see_all() {
    let (daemon, _log_dir, _log) =
        daemon_for_all_users(&["--namespace-by-uid", "--admin-uid", "0"]);
    let set = scalectl_as(NOBODY, NOBODY, &daemon.socket, &["set", "cart", "3"]);
    assert!(set.status.success(), "SET as nobody: {set:?}");
    let own = scalectl_as(NOBODY, NOBODY, &daemon.socket, &["get", "cart"]);
    assert_eq!(text(&own.stdout).trim(), "3", "{own:?}");
    // Another uid's `cart` is another key: uid 4242 finds nothing.
    let other = scalectl_as(4242, 4242, &daemon.socket, &["get", "cart"]);
    assert_eq!(
        other.status.code(),
        Some(1),
        "uid 4242 read nobody's key: {other:?}"
    );
    // Root is an admin: unconfined, it sees the key under its namespace's name.
    let admin = scalectl_as(0, 0, &daemon.socket, &["get", "uid-65534/cart"]);
    assert_eq!(text(&admin.stdout).trim(), "3", "{admin:?}");
    let root_cart = scalectl_as(0, 0, &daemon.socket, &["get", "cart"]);
    assert_eq!(root_cart.status.code(), Some(1), "{root_cart:?}");
}

/// A raw TCP connection, for what the client crate would never send.
struct RawTcp {
    stream: TcpStream,
    buf: BytesMut,
}

impl RawTcp {
    async fn connect(port: u16) -> RawTcp {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect over TCP");
        RawTcp {
            stream,
            buf: BytesMut::new(),
        }
    }

    async fn request(&mut self, request: &Request) {
        let mut frame = Vec::new();
        push_frame(&mut frame, &request.to_msgpack());
        self.stream.write_all(&frame).await.expect("write");
    }

    async fn hello(&mut self, id: u64, token: Option<&str>) {
        let hello = Request {
            args: Args {
                version: Some(PROTOCOL_VERSION),
                client: Some("raw".into()),
                token: token.map(str::to_string),
                ..Args::default()
            },
            ..Request::new(id, CommandName::Hello)
        };
        self.request(&hello).await;
    }

    /// The next answer, or `None` once the daemon has closed the connection.
    async fn recv(&mut self) -> Option<Response> {
        tokio::time::timeout(common::STARTUP_LIMIT, async {
            loop {
                if let Some(body) = take_frame(&mut self.buf, MAX_FRAME_LEN).expect("frame") {
                    return Some(Response::decode(&body).expect("a response"));
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
        .expect("no answer within 20 s")
    }
}

fn code_of(answer: &Option<Response>) -> Option<&str> {
    answer
        .as_ref()
        .and_then(|a| a.err.as_ref())
        .map(|e| e.code.as_str())
}

/// A daemon serving TCP with [`TOKENS`], and its port.
fn tcp_daemon() -> (TestDaemon, tempfile::TempDir, u16) {
    let port = free_port();
    let (dir, tokens) = common::token_file(TOKENS);
    let tokens = tokens.to_str().expect("utf-8 path").to_string();
    let daemon = TestDaemon::start(&["--tcp", &port.to_string(), "--auth-token-file", &tokens]);
    (daemon, dir, port)
}

async fn tcp_client(port: u16, token: &str) -> Result<Client, Error> {
    Client::builder(Endpoint::Tcp(format!("127.0.0.1:{port}")))
        .name(token.split('-').next().unwrap_or("test"))
        .token(token)
        .connect_timeout(Duration::from_secs(20))
        .connect()
        .await
}

#[tokio::test]
async fn tcp_needs_the_right_token_in_hello() {
    let (daemon, _tokens, port) = tcp_daemon();

    // Before HELLO nothing is served; HELLO without a token is DENIED (its own id) and closed.
    let mut raw = RawTcp::connect(port).await;
    raw.request(&Request::new(7, CommandName::Stats)).await;
    let answer = raw.recv().await;
    assert_eq!(code_of(&answer), Some("HELLO_REQUIRED"), "{answer:?}");
    raw.hello(8, None).await;
    let answer = raw.recv().await;
    assert_eq!(code_of(&answer), Some("DENIED"), "{answer:?}");
    assert_eq!(answer.as_ref().map(|a| a.id), Some(8));
    assert!(raw.recv().await.is_none(), "the connection stayed open");

    // A wrong token: the same. One byte off the right one is still wrong.
    let mut raw = RawTcp::connect(port).await;
    raw.hello(1, Some("web-0123456789abcdeF")).await;
    assert_eq!(code_of(&raw.recv().await), Some("DENIED"));
    assert!(raw.recv().await.is_none(), "the connection stayed open");
    match tcp_client(port, "not-a-token-at-all").await {
        Err(Error::Denied(message)) => assert!(message.contains("not valid"), "{message}"),
        other => panic!("a wrong token was not denied: {other:?}"),
    }

    // The right token opens the conversation.
    let mut raw = RawTcp::connect(port).await;
    raw.hello(1, Some("admin-0123456789abcdef")).await;
    let answer = raw.recv().await.expect("HELLO answered");
    assert!(answer.err.is_none(), "{answer:?}");
    let admin = tcp_client(port, "admin-0123456789abcdef")
        .await
        .expect("connect with the admin token");
    admin.ping().await.expect("PING");
    let stats = daemon.client().await.stats().await.expect("STATS");
    assert_eq!(stats.connections.denied, 3);

    // scalectl shows the token of --token-file: a line of the daemon's own file will do.
    let scalectl = |token_file: Option<&Path>| {
        let mut cmd = common::scalectl_command();
        cmd.args(["--tcp", &format!("127.0.0.1:{port}")]);
        if let Some(path) = token_file {
            cmd.arg("--token-file").arg(path);
        }
        cmd.arg("ping")
            .stdin(Stdio::null())
            .output()
            .expect("run scalectl")
    };
    let (_dir, web_line) = common::token_file("web     web-0123456789abcdef\n");
    let ok = scalectl(Some(&web_line));
    assert!(ok.status.success(), "{ok:?}");
    let refused = scalectl(None);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(text(&refused.stderr).contains("DENIED"), "{refused:?}");
}

#[tokio::test]
async fn token_namespaces_keep_keys_and_locks_apart() {
    let (_daemon, _tokens, port) = tcp_daemon();
    let web = tcp_client(port, "web-0123456789abcdef").await.expect("web");
    let web2 = tcp_client(port, "web-0123456789abcdef").await.expect("web");
    let billing = tcp_client(port, "billing-0123456789abcdef")
        .await
        .expect("billing");
    let admin = tcp_client(port, "admin-0123456789abcdef")
        .await
        .expect("admin");

    // A's SET is invisible to B, and B's own key of the same name is another key.
    web.set("session:1", b"web's", None).await.expect("SET");
    assert_eq!(billing.get("session:1").await.expect("GET"), None);
    billing
        .set("session:1", b"billing's", None)
        .await
        .expect("SET");
    assert!(!billing.del("nothing").await.expect("DEL"));
    assert_eq!(
        web.get("session:1").await.expect("GET").as_deref(),
        Some(&b"web's"[..])
    );
    assert_eq!(
        admin.get("web/session:1").await.expect("GET").as_deref(),
        Some(&b"web's"[..])
    );

    // B can neither unlock nor steal A's lock of the same name.
    let held = web
        .lock("job", LockOptions::default())
        .await
        .expect("web locks job");
    assert_eq!(
        billing.unlock("job", held.token()).await.expect("UNLOCK"),
        LockStatus::NotLocked
    );
    let billing_job = billing
        .try_lock("job", LockOptions::default())
        .await
        .expect("billing's own job lock");
    assert_eq!(
        billing.unlock("job", held.token()).await.expect("UNLOCK"),
        LockStatus::NotOwner
    );
    // A's lock is still A's: its fenced write goes through, and its own app sees it held, by name.
    web.set_fenced("session:1", b"fenced", None, &held.write_fence())
        .await
        .expect("web's fence is still the newest");
    match web2.try_lock("job", LockOptions::default()).await {
        Err(Error::Locked(message)) => {
            assert_eq!(message, "lock `job` is held", "the prefix leaked")
        }
        other => panic!("web's lock was not held: {other:?}"),
    }

    // LOCKS: each app its own, under its own names; the admin every lock, namespaced.
    let keys = |rows: Vec<scaled_client::LockInfo>| -> Vec<String> {
        rows.into_iter().map(|r| r.key).collect()
    };
    assert_eq!(keys(web.locks().await.expect("LOCKS")), ["job"]);
    assert_eq!(keys(billing.locks().await.expect("LOCKS")), ["job"]);
    let page = web.locks_page(None, Some(1)).await.expect("LOCKS page");
    assert_eq!((page.total, page.next), (1, None));
    assert_eq!(
        keys(admin.locks().await.expect("LOCKS")),
        ["billing/job", "web/job"]
    );

    // STATS: an app sees the daemon's health and limits, not other apps' figures; the admin all.
    let seen = web.stats().await.expect("STATS");
    assert_eq!((seen.cache.size, seen.locks.held), (0, 0));
    assert_eq!(seen.connections.current, 0);
    assert!(
        seen.cache.max_size > 0 && seen.uptime_seconds > 0.0,
        "{seen:?}"
    );
    let all = admin.stats().await.expect("STATS");
    assert_eq!((all.cache.size, all.locks.held), (2, 2));

    // The prefix counts toward the key limit, and HELLO says what is left.
    let max_key = web.welcome().await.expect("HELLO").max_key as usize;
    assert_eq!(max_key, MAX_KEY_LEN - "web/".len());
    web.set(&"k".repeat(max_key), b"fits", None)
        .await
        .expect("a key at the namespace's limit");
    match web.set(&"k".repeat(max_key + 1), b"over", None).await {
        Err(Error::TooLarge(_)) => {}
        other => panic!("a key over the namespace's limit: {other:?}"),
    }
    drop((billing_job, held));
}

#[test]
fn tcp_refuses_to_start_without_a_private_token_file() {
    let refused = |extra: &[&str]| -> String {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = common::scaled_command()
            .arg("--socket")
            .arg(dir.path().join("s.sock"))
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .expect("run scaled");
        assert!(!out.status.success(), "scaled started with {extra:?}");
        assert!(
            !dir.path().join("s.sock").exists(),
            "a socket was left behind"
        );
        text(&out.stderr)
    };
    let port = free_port().to_string();
    let stderr = refused(&["--tcp", &port]);
    assert!(stderr.contains("--auth-token-file"), "stderr: {stderr}");

    let (_dir, tokens) = common::token_file("admin-0123456789abcdef\n");
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let path = tokens.to_str().expect("utf-8 path");
    let stderr = refused(&["--tcp", &port, "--auth-token-file", path]);
    assert!(stderr.contains("chmod o-rwx"), "stderr: {stderr}");

    std::fs::write(&tokens, "short\n").expect("write");
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let stderr = refused(&["--tcp", &port, "--auth-token-file", path]);
    assert!(stderr.contains("line 1"), "stderr: {stderr}");
}

#[tokio::test]
async fn namespaced_keys_reach_redis_already_prefixed() {
    let redis = common::redis_server::RedisServer::start();
    let port = free_port();
    let (_dir, tokens) = common::token_file(TOKENS);
    let daemon = TestDaemon::start(&[
        "--redis-url",
        &redis.url(),
        "--tcp",
        &port.to_string(),
        "--auth-token-file",
        tokens.to_str().expect("utf-8 path"),
    ]);
    let admin = daemon.client().await;
    let deadline = std::time::Instant::now() + common::STARTUP_LIMIT;
    while !admin.stats().await.expect("STATS").redis.available {
        assert!(
            std::time::Instant::now() < deadline,
            "Redis never became available"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let web = tcp_client(port, "web-0123456789abcdef").await.expect("web");
    let billing = tcp_client(port, "billing-0123456789abcdef")
        .await
        .expect("billing");
    web.set("session:1", b"web's", None).await.expect("SET");
    let held = web.lock("job", LockOptions::default()).await.expect("LOCK");
    assert!(
        !redis.keys("*web/session:1*").is_empty() && !redis.keys("*web/job*").is_empty(),
        "keys in Redis: {:?}",
        redis.keys("*")
    );
    assert!(
        redis.keys("*:session:1*").is_empty(),
        "{:?}",
        redis.keys("*")
    );
    // Billing's GET goes to Redis under billing's prefix, and finds nothing there.
    assert_eq!(billing.get("session:1").await.expect("GET"), None);
    assert_eq!(
        billing.unlock("job", held.token()).await.expect("UNLOCK"),
        LockStatus::NotLocked
    );
    assert_eq!(
        web.get("session:1").await.expect("GET").as_deref(),
        Some(&b"web's"[..])
    );
}
