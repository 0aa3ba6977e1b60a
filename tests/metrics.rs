//! The Prometheus endpoint through the real daemon: after a known mix of requests, `/metrics` shows
//! exactly those counts (requests by command and outcome, response-time histograms, the cache, the
//! connections, every lock counter, the lock-wait histogram), the page passes `promtool check
//! metrics`, the endpoint answers nothing but `GET /metrics`, a silent connection cannot block a
//! scrape, and a remote address needs `--metrics-allow-remote`.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::{TestDaemon, STARTUP_LIMIT};
use scaled_client::proto::{Args, CommandName};
use scaled_client::{Client, Error, LockOptions, LockStatus};

/// How long a test waits for an event before failing.
const EVENT_LIMIT: Duration = Duration::from_secs(10);

/// A port that was free a moment ago.
fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe");
    probe.local_addr().expect("probe address").port()
}

/// A daemon serving metrics on a free loopback port, and that port.
fn daemon_with_metrics() -> (TestDaemon, u16) {
    let port = free_port();
    let daemon = TestDaemon::start(&["--metrics", &port.to_string()]);
    (daemon, port)
}

/// Sends `request` as it is and reads the whole answer, up to the daemon closing the connection.
async fn http(port: u16, request: &str) -> String {
    tokio::time::timeout(STARTUP_LIMIT, async {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to the metrics port");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.expect("read");
        String::from_utf8(answer).expect("a UTF-8 answer")
    })
    .await
    .expect("no answer from the metrics endpoint")
}

/// `GET /metrics`: the body, after checking the status and content type.
async fn scrape(port: u16) -> String {
    let answer = http(port, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_string()
}

/// One sample: metric name and labels.
type Series = (String, BTreeMap<String, String>);

/// The samples of a text-format page.
fn samples(body: &str) -> BTreeMap<Series, f64> {
    let mut out = BTreeMap::new();
    for line in body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').expect("`series value`");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in `{line}`")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let rest = rest.strip_suffix('}').expect("labels end with }");
                let labels = rest
                    .split(',')
                    .map(|pair| {
                        let (k, v) = pair.split_once('=').expect("label=value");
                        (k.to_string(), v.trim_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        assert!(
            out.insert((name, labels), value).is_none(),
            "duplicate sample `{series}`"
        );
    }
    out
}

/// The value of `name{labels}`, failing the test with the page's names when it is missing.
fn value(page: &BTreeMap<Series, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let key = (
        name.to_string(),
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    *page.get(&key).unwrap_or_else(|| {
        let names: Vec<String> = page.keys().map(|(n, l)| format!("{n}{l:?}")).collect();
        panic!("no sample {name}{labels:?} among {names:#?}")
    })
}

/// Runs `promtool check metrics` on `body`. promtool must be there under CI (scripts/test-all installs
/// it); elsewhere a missing promtool skips this one check, loudly.
fn promtool_check(body: &str) {
    if Command::new("promtool").arg("--version").output().is_err() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("promtool is not installed; scripts/test-all installs Debian's `prometheus` package");
        }
        eprintln!(
            "\n!!! SKIPPED `promtool check metrics`: promtool is not installed. \
             Run scripts/test-all, or apt-get install prometheus. !!!\n"
        );
        return;
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    let mut stdin = child.stdin.take().expect("promtool's stdin");
    std::io::Write::write_all(&mut stdin, body.as_bytes()).expect("write to promtool");
    drop(stdin);
    let out = child.wait_with_output().expect("promtool finished");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- page ---\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn metrics_count_what_the_clients_did_and_pass_promtool() {
    let (daemon, port) = daemon_with_metrics();
    let main = daemon.client().await;
    let other = daemon.client().await;
    let observer = daemon.client().await;

    for _ in 0..2 {
        main.ping().await.expect("PING");
    }
    for key in ["a", "b", "c"] {
        main.set(key, b"value", None).await.expect("SET");
    }
    assert!(main.get("a").await.expect("GET").is_some());
    assert!(main.get("b").await.expect("GET").is_some());
    assert!(main.get("zz").await.expect("GET").is_none());
    assert!(main.del("a").await.expect("DEL"));
    let err = main
        .call(CommandName::Get, Args::default())
        .await
        .expect_err("GET without a key");
    assert!(matches!(err, Error::BadArgument(_)), "{err:?}");

    // A lock taken, refused to a try, extended, waited for by another, and passed on.
    let held = main.lock("L", LockOptions::default()).await.expect("LOCK");
    let refused = other
        .try_lock("L", LockOptions::default())
        .await
        .expect_err("held");
    assert!(matches!(refused, Error::Locked(_)), "{refused:?}");
    assert_eq!(
        held.extend(Duration::from_secs(30)).await.expect("EXTEND"),
        LockStatus::Ok
    );
    assert_eq!(main.locks().await.expect("LOCKS").len(), 1);
    let queued = other.clone();
    let waiter = tokio::spawn(async move {
        let options = LockOptions {
            wait: Some(EVENT_LIMIT),
            ..LockOptions::default()
        };
        let guard = queued.lock("L", options).await.expect("the queued LOCK");
        guard.unlock().await.expect("UNLOCK")
    });
    let deadline = Instant::now() + EVENT_LIMIT;
    while observer.stats().await.expect("STATS").locks.waiters != 1 {
        assert!(Instant::now() < deadline, "the second LOCK never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(held.unlock().await.expect("UNLOCK"), LockStatus::Ok);
    assert_eq!(waiter.await.expect("the waiter"), LockStatus::Ok);

    // TestDaemon's readiness probe was a connection too; scrape until the daemon has seen it close.
    let deadline = Instant::now() + EVENT_LIMIT;
    let (body, page) = loop {
        let body = scrape(port).await;
        let page = samples(&body);
        if value(&page, "scaled_connections_open", &[]) == 3.0 {
            break (body, page);
        }
        assert!(
            Instant::now() < deadline,
            "connections never settled:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let requests = |command: &str, outcome: &str| {
        value(
            &page,
            "scaled_requests_total",
            &[("command", command), ("outcome", outcome)],
        )
    };
    assert_eq!(requests("HELLO", "OK"), 3.0);
    assert_eq!(requests("PING", "OK"), 2.0);
    assert_eq!(requests("SET", "OK"), 3.0);
    assert_eq!(requests("GET", "OK"), 3.0);
    assert_eq!(requests("GET", "BAD_ARGUMENT"), 1.0);
    assert_eq!(requests("DEL", "OK"), 1.0);
    assert_eq!(requests("LOCK", "OK"), 2.0);
    assert_eq!(requests("LOCK", "LOCKED"), 1.0);
    assert_eq!(requests("EXTEND", "OK"), 1.0);
    assert_eq!(requests("UNLOCK", "OK"), 2.0);
    assert_eq!(requests("LOCKS", "OK"), 1.0);
    assert!(requests("STATS", "OK") >= 1.0);

    // The GET histogram holds the four GETs, cumulatively, and their time.
    let get = [("command", "GET")];
    let count = value(&page, "scaled_request_duration_seconds_count", &get);
    assert_eq!(count, 4.0);
    assert!(value(&page, "scaled_request_duration_seconds_sum", &get) > 0.0);
    let mut buckets: Vec<(f64, f64)> = page
        .iter()
        .filter(|((name, labels), _)| {
            name == "scaled_request_duration_seconds_bucket"
                && labels.get("command").map(String::as_str) == Some("GET")
        })
        .map(|((_, labels), v)| {
            let le = &labels["le"];
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().expect("a numeric le")
            };
            (bound, *v)
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(buckets.len(), 20, "{buckets:?}");
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "buckets are not cumulative: {buckets:?}"
    );
    assert_eq!(buckets.last().map(|b| b.1), Some(4.0));

    // The cache.
    assert_eq!(value(&page, "scaled_cache_hits_total", &[]), 2.0);
    assert_eq!(value(&page, "scaled_cache_misses_total", &[]), 1.0);
    assert_eq!(value(&page, "scaled_cache_entries", &[]), 2.0);
    assert_eq!(value(&page, "scaled_cache_max_entries", &[]), 10_000.0);
    assert_eq!(value(&page, "scaled_cache_bytes", &[]), 12.0);
    assert_eq!(value(&page, "scaled_cache_evictions_total", &[]), 0.0);
    assert_eq!(value(&page, "scaled_cache_expirations_total", &[]), 0.0);

    // Connections.
    assert_eq!(value(&page, "scaled_connections_accepted_total", &[]), 4.0);
    assert_eq!(value(&page, "scaled_connections_refused_total", &[]), 0.0);

    // Every lock counter STATS has, and the wait of the one LOCK that queued.
    for (name, want) in [
        ("scaled_locks_held", 0.0),
        ("scaled_lock_waiters", 0.0),
        ("scaled_lock_requests_total", 3.0),
        ("scaled_lock_grants_total", 2.0),
        ("scaled_lock_timeouts_total", 0.0),
        ("scaled_lock_refused_total", 1.0),
        ("scaled_lock_expiries_total", 0.0),
        ("scaled_lock_released_on_disconnect_total", 0.0),
        ("scaled_lock_renewals_total", 0.0),
    ] {
        assert_eq!(value(&page, name, &[]), want, "{name}");
    }
    let contention = value(&page, "scaled_lock_contention_ratio", &[]);
    assert!((contention - 2.0 / 3.0).abs() < 0.001, "{contention}");
    assert_eq!(value(&page, "scaled_lock_wait_seconds_count", &[]), 1.0);
    assert_eq!(
        value(&page, "scaled_lock_wait_seconds_bucket", &[("le", "+Inf")]),
        1.0
    );
    assert!(value(&page, "scaled_lock_wait_seconds_sum", &[]) > 0.0);

    // What is running.
    assert_eq!(
        value(
            &page,
            "scaled_build_info",
            &[("protocol", "1"), ("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert!(value(&page, "scaled_uptime_seconds", &[]) > 0.0);
    assert_eq!(value(&page, "scaled_redis_configured", &[]), 0.0);

    promtool_check(&body);
    every_series_named_in_the_docs_exists(&page);
    drop(other);
}

/// The Grafana dashboard and README's alerts name only series the daemon serves.
fn every_series_named_in_the_docs_exists(page: &BTreeMap<Series, f64>) {
    let served: std::collections::BTreeSet<&str> = page.keys().map(|(n, _)| n.as_str()).collect();
    for (doc, text) in [
        (
            "contrib/grafana/scaled.json",
            include_str!("../contrib/grafana/scaled.json"),
        ),
        ("README.md", include_str!("../README.md")),
    ] {
        let mut named = 0;
        for (at, _) in text.match_indices("scaled_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // README's table abbreviates families as `scaled_cache_{hits,...}_total`; skip those.
            if text[at + name.len()..].starts_with('{') && name.ends_with('_') {
                continue;
            }
            if name == "scaled_client" || name.len() <= "scaled_".len() {
                continue;
            }
            named += 1;
            let histogram = format!("{name}_bucket");
            assert!(
                served.contains(name.as_str()) || served.contains(histogram.as_str()),
                "{doc} names `{name}`, which /metrics does not serve"
            );
        }
        assert!(named > 5, "{doc} names only {named} series");
    }
}

#[tokio::test]
async fn a_fresh_daemon_has_a_valid_page_and_figures_agree_with_stats() {
    let (daemon, port) = daemon_with_metrics();
    // Before any request at all: no request series yet, and the page is still valid.
    let body = scrape(port).await;
    assert!(!body.contains("scaled_requests_total"), "{body}");
    promtool_check(&body);

    // One builder computes both: after a few SETs, STATS and /metrics report the same cache.
    let client: Client = daemon.client().await;
    for key in ["x", "y"] {
        client.set(key, b"12345", None).await.expect("SET");
    }
    let stats = client.stats().await.expect("STATS");
    let page = samples(&scrape(port).await);
    assert_eq!(
        value(&page, "scaled_cache_entries", &[]),
        stats.cache.size as f64
    );
    assert_eq!(
        value(&page, "scaled_cache_bytes", &[]),
        stats.cache.bytes as f64
    );
    assert_eq!(
        value(&page, "scaled_connections_accepted_total", &[]),
        stats.connections.total as f64
    );
}

#[tokio::test]
async fn only_get_metrics_is_served_and_a_silent_scraper_blocks_nobody() {
    let (_daemon, port) = daemon_with_metrics();
    // A connection that never sends its request holds one place, not the endpoint.
    let _silent = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let not_found = http(port, "GET / HTTP/1.1\r\n\r\n").await;
    assert!(not_found.starts_with("HTTP/1.1 404 "), "{not_found}");
    let not_allowed = http(port, "POST /metrics HTTP/1.1\r\n\r\n").await;
    assert!(not_allowed.starts_with("HTTP/1.1 405 "), "{not_allowed}");
    assert!(not_allowed.contains("Allow: GET"), "{not_allowed}");
    let garbage = http(port, "hello\r\n\r\n").await;
    assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");
    let with_query = http(port, "GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
    assert!(with_query.starts_with("HTTP/1.1 200 OK"), "{with_query}");
    // A head that never ends is cut off at its limit.
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    let refused = http(port, &huge).await;
    assert!(refused.starts_with("HTTP/1.1 431 "), "{refused}");
    assert!(scrape(port).await.contains("scaled_uptime_seconds"));
}

#[test]
fn a_remote_metrics_address_needs_allow_remote() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_scaled"))
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .args(["--metrics", "0.0.0.0:0"])
        .env_remove("SCALED_METRICS_ALLOW_REMOTE")
        .output()
        .expect("run scaled");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--metrics-allow-remote"), "{stderr}");
    assert!(
        !dir.path().join("s.sock").exists(),
        "a refused start left its socket behind"
    );
}
