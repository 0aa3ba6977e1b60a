//! The daemon's logs, read from its real stderr: at debug level every request writes exactly one line
//! when it finishes, successful or not, carrying its `request_id`, `session_id` and `user_id`; JSON
//! lines parse; no terminal escape codes reach a file; and at info level requests write nothing, while
//! startup, overload and shutdown still do.

mod common;

use std::fs::File;
use std::path::Path;
use std::time::Duration;

use common::TestDaemon;
use scaled_client::proto::{Args, CommandName};
use scaled_client::{Client, Endpoint, Error};

/// How long a test waits for the daemon to exit.
const EXIT_LIMIT: Duration = Duration::from_secs(20);

/// Starts a daemon whose stderr goes to `dir/stderr.log`.
fn start_logging(dir: &Path, extra: &[&str]) -> TestDaemon {
    let log = File::create(dir.join("stderr.log")).expect("create the log file");
    TestDaemon::start_logging_to(extra, log)
}

/// Stops the daemon with SIGTERM and returns everything it logged.
fn stop_and_read(mut daemon: TestDaemon, dir: &Path) -> String {
    daemon.signal("TERM");
    assert!(daemon.wait_exit(EXIT_LIMIT).success());
    std::fs::read_to_string(dir.join("stderr.log")).expect("read the log")
}

/// Sends one request and returns the daemon's request_id for it.
async fn request_id(client: &Client, cmd: CommandName, args: Args) -> String {
    client
        .exchange(cmd, args)
        .await
        .expect("an answer")
        .request_id
}

fn key(k: &str) -> Args {
    Args {
        key: Some(k.into()),
        ..Args::default()
    }
}

#[tokio::test]
async fn every_request_writes_one_json_line_with_its_ids() {
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = start_logging(
        dir.path(),
        &["--log", "scaled=debug", "--log-format", "json"],
    );
    let client = daemon
        .client()
        .await
        .with_context(Some("sess-7f3a"), Some("user-42"));

    let mut made = Vec::new();
    made.push((
        request_id(&client, CommandName::Ping, Args::default()).await,
        "PING",
        "OK",
    ));
    let set = Args {
        value: Some(b"v".to_vec()),
        ..key("k")
    };
    made.push((
        request_id(&client, CommandName::Set, set).await,
        "SET",
        "OK",
    ));
    made.push((
        request_id(&client, CommandName::Get, key("k")).await,
        "GET",
        "OK",
    ));
    made.push((
        request_id(&client, CommandName::Get, key("gone")).await,
        "GET",
        "OK",
    ));
    made.push((
        request_id(&client, CommandName::Del, key("k")).await,
        "DEL",
        "OK",
    ));
    // A failure writes its line too, with its code as the outcome.
    made.push((
        request_id(&client, CommandName::Get, Args::default()).await,
        "GET",
        "BAD_ARGUMENT",
    ));
    made.push((
        request_id(&client, CommandName::Stats, Args::default()).await,
        "STATS",
        "OK",
    ));

    let log = stop_and_read(daemon, dir.path());
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"))
        })
        .collect();
    assert!(!lines.is_empty());
    for line in &lines {
        assert!(line["timestamp"].is_string(), "{line}");
        assert!(line["level"].is_string(), "{line}");
        assert!(line["message"].is_string(), "{line}");
    }
    for (id, cmd, outcome) in &made {
        let mine: Vec<&serde_json::Value> = lines
            .iter()
            .filter(|l| l["request_id"] == id.as_str() && l["message"] == "request finished")
            .collect();
        assert_eq!(
            mine.len(),
            1,
            "request {id} ({cmd}) has {} lines:\n{log}",
            mine.len()
        );
        let line = mine[0];
        assert_eq!(line["level"], "DEBUG", "{line}");
        assert_eq!(line["cmd"], *cmd, "{line}");
        assert_eq!(line["outcome"], *outcome, "{line}");
        assert_eq!(line["session_id"], "sess-7f3a", "{line}");
        assert_eq!(line["user_id"], "user-42", "{line}");
        assert!(line["elapsed_us"].is_u64(), "{line}");
    }
}

#[tokio::test]
async fn logs_written_to_a_file_carry_no_escape_codes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = start_logging(dir.path(), &["--log", "scaled=debug"]);
    let client = daemon.client().await.with_context(Some("s-1"), None);
    let id = request_id(&client, CommandName::Ping, Args::default()).await;
    let err = client
        .call(CommandName::Get, Args::default())
        .await
        .expect_err("GET without a key");
    assert!(matches!(err, Error::BadArgument(_)), "{err:?}");

    let log = stop_and_read(daemon, dir.path());
    assert!(
        log.lines()
            .any(|l| l.contains(&id) && l.contains("request finished") && l.contains("s-1")),
        "no line for request {id}:\n{log}"
    );
    assert!(
        !log.contains('\x1b'),
        "escape codes in a log file:\n{log:?}"
    );
}

#[tokio::test]
async fn at_info_requests_are_silent_but_state_changes_are_not() {
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = start_logging(
        dir.path(),
        &["--log-format", "json", "--max-connections", "1"],
    );
    // The readiness probe held the one place for a moment; connect once it has let go.
    let deadline = std::time::Instant::now() + EXIT_LIMIT;
    let client = loop {
        match Client::connect(Endpoint::Unix(daemon.socket.clone()), "first").await {
            Ok(client) => break client,
            Err(Error::Overloaded(_)) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("cannot connect: {e}"),
        }
    };
    for _ in 0..20 {
        client.set("k", b"v", None).await.expect("SET");
        client.get("k").await.expect("GET");
    }
    // The one connection allowed is taken: the next is refused, which an operator must hear of.
    let refused = Client::connect(Endpoint::Unix(daemon.socket.clone()), "second").await;
    assert!(matches!(refused, Err(Error::Overloaded(_))), "{refused:?}");

    let log = stop_and_read(daemon, dir.path());
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    let said = |text: &str| {
        lines
            .iter()
            .any(|l| l["message"].as_str().is_some_and(|m| m.contains(text)))
    };
    assert!(said("scaled serving"), "no startup line:\n{log}");
    assert!(
        said("overloaded: connection limit reached"),
        "no overload warning:\n{log}"
    );
    assert!(said("scaled stopped"), "no shutdown line:\n{log}");
    assert!(
        lines
            .iter()
            .all(|l| l["request_id"].is_null() && l["level"] != "DEBUG"),
        "request lines at info level:\n{log}"
    );
}
