//! The Prometheus endpoint: `GET /metrics` over plain HTTP/1.1, off unless `--metrics` names an address.
//!
//! Every scrape computes the figures afresh with [`Daemon::stats`], the same builder STATS uses, and
//! renders them; nothing on the request path knows Prometheus exists. The rendering uses the
//! `prometheus-client` crate (the Prometheus project's own Rust client) rather than hand-written text:
//! its `Collector` trait encodes figures computed at scrape time, which is exactly this shape, and its
//! `prometheus_text` encoder writes the classic text format (version 0.0.4) that every Prometheus and
//! `promtool check metrics` read. (`metrics-exporter-prometheus` was the alternative; it wants every
//! observation pushed through a global recorder on the hot path, and cannot take a histogram whose
//! buckets were counted elsewhere.)
//!
//! The HTTP side is a few dozen lines on tokio, since the endpoint answers one path with one body. It is
//! bounded so a scraper cannot hold the daemon: at most [`MAX_SCRAPERS`] connections at once (one more
//! is answered `503` and closed), [`READ_TIMEOUT`] to send the request head of at most
//! [`MAX_HEAD_BYTES`], [`WRITE_TIMEOUT`] to take the answer, one request per connection, and shutdown
//! ends them all at once.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use scaled_client::proto::PROTOCOL_VERSION;

use crate::config::Config;
use crate::daemon::Daemon;
use crate::meter::{Buckets, BUCKETS_US};
use crate::stats::Stats;

/// Most scrapes served at once; Prometheus needs one, and a few more leave room for a person with curl.
pub const MAX_SCRAPERS: usize = 8;

/// Longest a scraper may take to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest a scraper may take to read the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request head read; a GET of `/metrics` needs a few hundred bytes.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;

/// The `Content-Type` of the Prometheus text format.
const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// `--metrics` names a non-loopback address without `--metrics-allow-remote`.
    #[error("--metrics {0} is not a loopback address; pass --metrics-allow-remote to allow it")]
    Remote(SocketAddr),
    /// Binding failed.
    #[error("binding metrics {0}: {1}")]
    Bind(SocketAddr, io::Error),
}

/// Binds the endpoint's listener if `--metrics` asks for one. Must run inside a tokio runtime.
pub fn bind(config: &Config) -> Result<Option<TcpListener>, MetricsError> {
    let Some(addr) = config.metrics else {
        return Ok(None);
    };
    if !addr.ip().is_loopback() && !config.metrics_allow_remote {
        return Err(MetricsError::Remote(addr));
    }
    let bound = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(TcpListener::from_std)
        .map_err(|e| MetricsError::Bind(addr, e))?;
    Ok(Some(bound))
}

/// Serves scrapes until shutdown begins. Each connection runs on `tracker`, so shutdown waits for none
/// longer than its timeouts.
pub async fn serve(listener: TcpListener, daemon: Arc<Daemon>, tracker: TaskTracker) {
    tracing::info!(addr = ?listener.local_addr().ok(), "metrics serving at /metrics");
    let limit = Arc::new(Semaphore::new(MAX_SCRAPERS));
    loop {
        let accepted = tokio::select! {
            _ = daemon.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: pause so a persistent failure does not spin.
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            // A fresh socket's send buffer is empty, so this write does not block; if it fails the
            // scraper simply sees the connection close.
            let _ = stream.try_write(&answer(
                "503 Service Unavailable",
                "text/plain",
                "too many metrics connections; try again\n",
            ));
            continue;
        };
        let daemon = daemon.clone();
        tracker.spawn(async move {
            tokio::select! {
                _ = daemon.shutdown.cancelled() => {}
                _ = scrape(stream, &daemon) => {}
            }
            drop(permit);
        });
    }
}

/// Answers one HTTP request on `stream`, then closes it.
async fn scrape(mut stream: TcpStream, daemon: &Daemon) {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(head)) => head,
        Ok(Err(Refusal(status))) => {
            let _ = write(&mut stream, &answer(status, "text/plain", "")).await;
            return;
        }
        Err(_) => return,
    };
    let reply = match route(&head) {
        Ok(()) => {
            let body = render(&daemon.stats(Instant::now()));
            answer("200 OK", CONTENT_TYPE, &body)
        }
        Err(Refusal(status)) => answer(status, "text/plain", &format!("{status}\n")),
    };
    let _ = write(&mut stream, &reply).await;
}

/// An HTTP status to answer instead of the metrics.
struct Refusal(&'static str);

/// Reads up to the blank line that ends the request head.
async fn read_head(stream: &mut TcpStream) -> Result<String, Refusal> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| Refusal("400 Bad Request"))?;
        if n == 0 {
            return Err(Refusal("400 Bad Request"));
        }
        head.extend_from_slice(&chunk[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return String::from_utf8(head).map_err(|_| Refusal("400 Bad Request"));
        }
        if head.len() > MAX_HEAD_BYTES {
            return Err(Refusal("431 Request Header Fields Too Large"));
        }
    }
}

/// Checks the request line: `GET /metrics` (a query string is ignored), HTTP/1.0 or 1.1.
fn route(head: &str) -> Result<(), Refusal> {
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal("400 Bad Request"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(Refusal("505 HTTP Version Not Supported"));
    }
    if method != "GET" {
        return Err(Refusal("405 Method Not Allowed"));
    }
    match target.split('?').next() {
        Some("/metrics") => Ok(()),
        _ => Err(Refusal("404 Not Found")),
    }
}

/// A whole HTTP/1.1 answer that closes the connection.
fn answer(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    let allow = if status.starts_with("405") {
        "Allow: GET\r\n"
    } else {
        ""
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn write(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(bytes).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

/// The figures in the Prometheus text format.
pub fn render(stats: &Stats) -> String {
    let mut registry = Registry::with_prefix("scaled");
    registry.register_collector(Box::new(Figures(stats.clone())));
    let mut out = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail; an encoder error would leave a partial page, still parseable.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

/// One scrape's figures, encoded by the registry.
#[derive(Debug)]
struct Figures(Stats);

impl Collector for Figures {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        let protocol = PROTOCOL_VERSION.to_string();
        let version = [("version", s.version), ("protocol", protocol.as_str())];
        enc.encode_descriptor("build", "The daemon's version.", None, MetricType::Info)?
            .encode_info(&version)?;
        gauge(
            &mut enc,
            "uptime_seconds",
            "Seconds since the daemon started.",
            s.uptime_seconds,
        )?;

        // Requests.
        if !s.requests.is_empty() {
            let mut family = enc.encode_descriptor(
                "requests",
                "Requests answered, by command and outcome (OK or the error code).",
                None,
                MetricType::Counter,
            )?;
            for t in &s.requests {
                for &(outcome, n) in &t.outcomes {
                    let labels = [("command", t.command), ("outcome", outcome)];
                    ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
                }
            }
            let mut family = enc.encode_descriptor(
                "request_duration_seconds",
                "Time from reading a request to its answer being ready, by command.",
                None,
                MetricType::Histogram,
            )?;
            for t in &s.requests {
                let labels = [("command", t.command)];
                histogram(&mut family.encode_family(&labels)?, &t.times)?;
            }
        }

        // The cache.
        let c = &s.cache;
        gauge(&mut enc, "cache_entries", "Cache entries held now.", c.size)?;
        gauge(
            &mut enc,
            "cache_max_entries",
            "CACHE_SIZE: the most entries held.",
            c.max_size,
        )?;
        gauge(
            &mut enc,
            "cache_bytes",
            "Bytes of keys plus values held now.",
            c.bytes,
        )?;
        gauge(
            &mut enc,
            "cache_max_bytes",
            "CACHE_MAX_BYTES: the most bytes held; 0 when unbounded.",
            c.max_bytes,
        )?;
        counter(
            &mut enc,
            "cache_hits",
            "GETs that found a live entry.",
            c.hits,
        )?;
        counter(
            &mut enc,
            "cache_misses",
            "GETs that found nothing or an expired entry.",
            c.misses,
        )?;
        counter(
            &mut enc,
            "cache_evictions",
            "Live entries dropped to make room.",
            c.evictions,
        )?;
        counter(
            &mut enc,
            "cache_expirations",
            "Entries dropped because their TTL had passed.",
            c.expirations,
        )?;

        // Connections.
        let n = &s.connections;
        gauge(
            &mut enc,
            "connections_open",
            "Client connections open now.",
            n.current,
        )?;
        counter(
            &mut enc,
            "connections_accepted",
            "Client connections accepted.",
            n.total,
        )?;
        counter(
            &mut enc,
            "connections_refused",
            "Client connections refused with OVERLOADED at the connection limit.",
            n.refused,
        )?;
        counter(
            &mut enc,
            "connections_denied",
            "Peers refused by access control with DENIED (uid, gid or token).",
            n.denied,
        )?;

        // Locks.
        let l = &s.locks;
        gauge(&mut enc, "locks_held", "Session locks held now.", l.held)?;
        gauge(
            &mut enc,
            "lock_waiters",
            "LOCKs waiting in queues now.",
            l.waiters,
        )?;
        gauge(
            &mut enc,
            "lock_records",
            "Lock records kept now: held locks and free ones kept for their fencing token.",
            l.records,
        )?;
        gauge(
            &mut enc,
            "lock_records_max",
            "SCALED_MAX_LOCKS, the most lock records kept.",
            l.max_records,
        )?;
        counter(
            &mut enc,
            "lock_requests",
            "LOCKs that passed their argument checks.",
            l.requests,
        )?;
        counter(
            &mut enc,
            "lock_grants",
            "Locks granted, at once or from a queue.",
            l.grants,
        )?;
        counter(
            &mut enc,
            "lock_timeouts",
            "LOCKs answered LOCK_TIMEOUT.",
            l.timeouts,
        )?;
        counter(
            &mut enc,
            "lock_refused",
            "LOCKs in try mode answered LOCKED.",
            l.refused,
        )?;
        counter(
            &mut enc,
            "lock_overloaded",
            "LOCKs answered OVERLOADED at SCALED_MAX_LOCKS or SCALED_MAX_WAITERS.",
            l.overloaded,
        )?;
        counter(
            &mut enc,
            "lock_expiries",
            "Leases that ran out before UNLOCK.",
            l.expiries,
        )?;
        counter(
            &mut enc,
            "lock_released_on_disconnect",
            "Locks released because their holder's connection ended.",
            l.released_on_disconnect,
        )?;
        counter(
            &mut enc,
            "lock_renewals",
            "Leases renewed by auto-renew.",
            l.renewals,
        )?;
        gauge(
            &mut enc,
            "lock_contention_ratio",
            "Share of LOCKs since start that found the lock held (0 to 1).",
            l.contention / 100.0,
        )?;
        let mut family = enc.encode_descriptor(
            "lock_wait_seconds",
            "Time granted LOCKs waited in a queue (LOCKs granted at once are not counted).",
            None,
            MetricType::Histogram,
        )?;
        histogram(&mut family, &s.lock_waits)?;

        // The shared backend.
        let r = &s.redis;
        gauge(
            &mut enc,
            "redis_configured",
            "1 when a Redis backend is configured.",
            u64::from(r.configured),
        )?;
        gauge(
            &mut enc,
            "redis_available",
            "1 when the Redis backend is reachable.",
            u64::from(r.available),
        )?;
        let degraded = ConstCounter::new(r.degraded_seconds);
        degraded.encode(enc.encode_descriptor(
            "redis_degraded_seconds",
            "Seconds Redis has been unavailable since start.",
            None,
            degraded.metric_type(),
        )?)?;
        counter(
            &mut enc,
            "redis_round_trips",
            "Commands and scripts sent to Redis.",
            r.round_trips,
        )?;
        counter(
            &mut enc,
            "redis_unavailable",
            "Calls to Redis that failed because it was unreachable.",
            r.unavailable,
        )?;
        counter(
            &mut enc,
            "redis_connects",
            "Connections to Redis opened.",
            r.connects,
        )?;
        counter(
            &mut enc,
            "redis_corruptions",
            "Values read from Redis whose checksum failed.",
            r.corruptions,
        )?;
        counter(
            &mut enc,
            "redis_renewals_failed",
            "Auto-renewals Redis refused.",
            r.renewals_failed,
        )?;
        counter(
            &mut enc,
            "redis_locks_lost",
            "Locks lost without their holder letting go.",
            r.locks_lost,
        )?;
        gauge(
            &mut enc,
            "redis_releases_pending",
            "Lock releases waiting for Redis.",
            r.releases_pending,
        )?;
        // The local cache in front of Redis.
        for (name, help, value) in [
            (
                "redis_cache_hits",
                "GETs answered from the local cache with Redis available.",
                r.cache_hits,
            ),
            (
                "redis_degraded_hits",
                "GETs answered from the local cache while Redis was unreachable.",
                r.degraded_hits,
            ),
            (
                "redis_reads",
                "Reads of a value sent to Redis for GETs.",
                r.reads,
            ),
            (
                "redis_reads_shared",
                "GETs that shared another GET's Redis read.",
                r.reads_shared,
            ),
            (
                "redis_reads_saved",
                "Redis reads saved by the local cache and by shared reads.",
                r.reads_saved,
            ),
            (
                "redis_fills_dropped",
                "Values not cached because an invalidation raced them.",
                r.fills_dropped,
            ),
            (
                "redis_invalidations",
                "Invalidations applied to the local cache.",
                r.invalidations,
            ),
            (
                "redis_flushes",
                "Times the invalidation stream was lost and the local cache flushed.",
                r.flushes,
            ),
        ] {
            counter(&mut enc, name, help, value)?;
        }
        Ok(())
    }
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(enc.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge<N>(enc: &mut DescriptorEncoder, name: &str, help: &str, value: N) -> fmt::Result
where
    N: prometheus_client::encoding::EncodeGaugeValue,
{
    let metric = ConstGauge::new(value);
    metric.encode(enc.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn histogram(m: &mut prometheus_client::encoding::MetricEncoder, b: &Buckets) -> fmt::Result {
    let bounds = BUCKETS_US
        .iter()
        .map(|&us| us as f64 / 1e6)
        .chain(std::iter::once(f64::INFINITY));
    let buckets: Vec<(f64, u64)> = bounds.zip(b.counts.iter().copied()).collect();
    m.encode_histogram::<NoLabelSet>(b.sum_seconds, b.count(), &buckets, None)
}
