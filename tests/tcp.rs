//! The optional loopback TCP listener: same protocol as the Unix socket, loopback unless told otherwise,
//! and a token in HELLO (tests/access.rs has the token's own tests).

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::TestDaemon;
use scaled_client::{Client, Endpoint};

/// A port that was free a moment ago.
fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe");
    probe.local_addr().expect("probe address").port()
}

#[tokio::test]
async fn tcp_serves_the_same_protocol_and_state() {
    let port = free_port();
    let (_dir, tokens) = common::token_file("0123456789abcdef0123\n");
    let tokens = tokens.to_str().expect("utf-8 path");
    let daemon = TestDaemon::start(&["--tcp", &port.to_string(), "--auth-token-file", tokens]);
    let over_tcp = Client::builder(Endpoint::Tcp(format!("127.0.0.1:{port}")))
        .name("tcp-test")
        .token("0123456789abcdef0123")
        .connect()
        .await
        .expect("connect over TCP");
    over_tcp
        .set("k", b"over tcp", None)
        .await
        .expect("SET over TCP");
    let over_unix = daemon.client().await;
    assert_eq!(
        over_unix.get("k").await.expect("GET").as_deref(),
        Some(&b"over tcp"[..])
    );
    let stats = over_tcp.stats().await.expect("STATS over TCP");
    assert_eq!(stats.connections.current, 2);
}

#[test]
fn non_loopback_tcp_needs_explicit_permission() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = common::scaled_command()
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .args(["--tcp", "0.0.0.0:0"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn scaled");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "scaled started on 0.0.0.0 without permission"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(stderr.contains("--tcp-allow-remote"), "stderr: {stderr}");
}
