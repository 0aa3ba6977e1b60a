//! The daemon's configuration: one clap struct, every field a flag that can also come from the
//! environment. Where the seed architecture named a setting, the environment variable keeps that name.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Serialize;

/// Where the Unix socket lives unless `--socket` says otherwise. systemd's `RuntimeDirectory=scaled`
/// creates the directory; the daemon creates it too when run by hand.
pub const DEFAULT_SOCKET: &str = "/run/scaled/scaled.sock";

/// scaled: a sidecar daemon giving the app servers on this host a shared session cache, session locks
/// and request metrics over a Unix socket.
#[derive(Parser, Debug, Clone, Serialize)]
#[command(name = "scaled", version)]
pub struct Config {
    /// Unix socket to listen on. A stale socket left by a dead daemon is replaced; a live daemon's is not.
    #[arg(long, env = "SCALED_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,

    /// File mode of the Unix socket, in octal. 660 lets the socket's group connect.
    #[arg(long, env = "SCALED_SOCKET_MODE", default_value = "660", value_parser = parse_mode)]
    #[serde(serialize_with = "octal")]
    pub socket_mode: u32,

    /// Also listen on TCP: a PORT (bound to 127.0.0.1) or HOST:PORT. Off by default.
    #[arg(long, env = "SCALED_TCP", value_parser = parse_tcp)]
    pub tcp: Option<SocketAddr>,

    /// Allow --tcp to bind an address other than loopback. Only the HELLO token protects it, and the
    /// traffic is not encrypted.
    #[arg(long, env = "SCALED_TCP_ALLOW_REMOTE")]
    pub tcp_allow_remote: bool,

    /// Most entries the cache holds; least recently used entries are evicted past it.
    #[arg(long, env = "CACHE_SIZE", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub cache_size: u64,

    /// Most bytes of keys plus values the cache holds; 0 = bounded by CACHE_SIZE only. The default,
    /// 256 MiB, holds the default 10 000 entries at up to 26 KiB each, while 10 000 values of the
    /// largest size (1 MiB) could not take 10 GiB of the host's memory.
    #[arg(long, env = "CACHE_MAX_BYTES", default_value_t = 256 << 20)]
    pub cache_max_bytes: u64,

    /// TTL in seconds for a SET that gives none; 0 = such entries never expire.
    #[arg(long, env = "CACHE_TTL", default_value = "300", value_parser = parse_secs)]
    pub cache_ttl: f64,

    /// Number of cache shards; 0 picks one from CACHE_SIZE.
    #[arg(long, env = "CACHE_SHARDS", default_value_t = 0)]
    pub cache_shards: usize,

    /// Lease length in seconds for a LOCK that gives none.
    #[arg(long, env = "LOCK_TIMEOUT", default_value = "10", value_parser = parse_secs)]
    pub lock_timeout: f64,

    /// Seconds between attempts where a lock must be polled (Redis without notifications). Also sets,
    /// with LOCK_MAX_RETRIES, the default wait of a LOCK: LOCK_RETRY_DELAY × LOCK_MAX_RETRIES.
    #[arg(long, env = "LOCK_RETRY_DELAY", default_value = "0.1", value_parser = parse_secs)]
    pub lock_retry_delay: f64,

    /// See LOCK_RETRY_DELAY.
    #[arg(long, env = "LOCK_MAX_RETRIES", default_value_t = 50)]
    pub lock_max_retries: u32,

    /// Redis to share locks and cache across hosts (`redis://host:port/db` or `unix://path`); unset,
    /// the daemon runs standalone. With it set the daemon starts at once and connects in the
    /// background.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,

    /// Most connections to Redis. The daemon uses three: commands, invalidations, wake-ups.
    #[arg(long, env = "REDIS_MAX_CONNECTIONS", default_value_t = 100)]
    pub redis_max_connections: u32,

    /// Prefix of every key and channel in Redis, so one Redis can hold other data too.
    #[arg(long, env = "REDIS_PREFIX", default_value = "scaled:")]
    pub redis_prefix: String,

    /// Seconds a connection attempt to Redis may take before Redis counts as unreachable.
    #[arg(long, env = "REDIS_CONNECT_TIMEOUT", default_value = "1", value_parser = parse_timeout)]
    pub redis_connect_timeout: f64,

    /// Seconds a command may wait for Redis's answer before it fails UNAVAILABLE and Redis counts
    /// as unreachable (checked four times per timeout, so a command may wait up to a quarter longer).
    #[arg(long, env = "REDIS_RESPONSE_TIMEOUT", default_value = "2", value_parser = parse_timeout)]
    pub redis_response_timeout: f64,

    /// Most requests waiting on Redis per connection; at that many the connection is not read
    /// until one finishes.
    #[arg(long, env = "REDIS_MAX_PENDING", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub redis_max_pending: u64,

    /// Most bytes of SET values waiting on Redis, over all connections; at least one largest value.
    #[arg(long, env = "REDIS_MAX_PENDING_BYTES", default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(1 << 20..))]
    pub redis_max_pending_bytes: u64,

    /// What LOCK does while Redis is unreachable: `local` falls back to this daemon's own lock table
    /// (grants marked degraded), `fail` answers UNAVAILABLE.
    #[arg(long, env = "LOCK_FALLBACK", value_enum, default_value_t = LockFallback::Local)]
    pub lock_fallback: LockFallback,

    /// Most client connections at once; one more is answered OVERLOADED and closed.
    #[arg(long, env = "SCALED_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// Most requests waiting to finish on one connection (queued LOCKs, delayed PINGs); one more is
    /// answered OVERLOADED. Requests answered at once never count.
    #[arg(long, env = "SCALED_MAX_IN_FLIGHT", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_in_flight: u64,

    /// Most lock records kept at once: locks held (with their queues) plus free locks kept for their
    /// fencing token. At the limit the oldest free record is pruned; when every record is held, a LOCK
    /// of a new key is answered OVERLOADED.
    #[arg(long, env = "SCALED_MAX_LOCKS", default_value_t = crate::locks::DEFAULT_MAX_LOCKS as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_locks: u64,

    /// Most LOCKs waiting on one lock at once; one more is answered OVERLOADED.
    #[arg(long, env = "SCALED_MAX_WAITERS", default_value_t = crate::locks::DEFAULT_MAX_WAITERS as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_waiters: u64,

    /// Most requests waiting to finish across all connections together; one more is answered
    /// OVERLOADED. Bounds what SCALED_MAX_IN_FLIGHT times the connections could otherwise park.
    #[arg(long, env = "SCALED_MAX_WAITING", default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_waiting: u64,

    /// Bytes of connection buffers, across all connections, beyond each connection's 16 KiB for
    /// reading and 16 KiB for answers: large frames being read and large answers not yet written.
    /// A frame that does not fit is refused OVERLOADED (connection closed); an answer that does not
    /// fit is replaced by OVERLOADED.
    #[arg(long, env = "SCALED_MAX_BUFFER_BYTES", default_value_t = 256 << 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_buffer_bytes: u64,

    /// Seconds a new connection has to complete HELLO; 0 = no limit.
    #[arg(long, env = "SCALED_HELLO_TIMEOUT", default_value = "10", value_parser = parse_secs)]
    pub hello_timeout: f64,

    /// Seconds a client has to finish sending a frame it has begun; 0 = no limit.
    #[arg(long, env = "SCALED_FRAME_TIMEOUT", default_value = "30", value_parser = parse_secs)]
    pub frame_timeout: f64,

    /// Seconds the daemon waits for a client to read its answers before closing the connection;
    /// 0 = no limit.
    #[arg(long, env = "SCALED_WRITE_TIMEOUT", default_value = "30", value_parser = parse_secs)]
    pub write_timeout: f64,

    /// Seconds a connection may sit with nothing to do (no request, nothing waiting, no lock held)
    /// before it is closed; 0 = never. Pooled connections that are used every few minutes stay.
    #[arg(long, env = "SCALED_IDLE_TIMEOUT", default_value = "600", value_parser = parse_secs)]
    pub idle_timeout: f64,

    /// Threads serving requests. One serves hundreds of thousands of requests per second and leaves
    /// the host's other cores to the app servers; raise it where cores sit idle. 0 = one per core.
    #[arg(long, env = "SCALED_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,

    /// Seconds to let requests in flight finish after SIGTERM or SIGINT before closing anyway.
    #[arg(long, env = "SCALED_SHUTDOWN_TIMEOUT", default_value = "10", value_parser = parse_secs)]
    pub shutdown_timeout: f64,

    /// Log filter, in tracing's EnvFilter syntax (e.g. `info`, `scaled=debug`).
    #[arg(long, env = "SCALED_LOG", default_value = "info")]
    pub log: String,

    // Operations: log format and the Prometheus endpoint.
    /// Log line format: `text` for people, `json` (one object a line) for log collectors. Colour codes
    /// are written only when stderr is a terminal.
    #[arg(long, env = "SCALED_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Serve Prometheus metrics at `GET /metrics` over HTTP: a PORT (bound to 127.0.0.1) or HOST:PORT.
    /// Off by default.
    #[arg(long, env = "SCALED_METRICS", value_parser = parse_tcp)]
    pub metrics: Option<SocketAddr>,

    /// Allow --metrics to bind an address other than loopback. The endpoint has no authentication.
    #[arg(long, env = "SCALED_METRICS_ALLOW_REMOTE")]
    pub metrics_allow_remote: bool,

    // Running as a service: the log file and what SIGHUP re-reads.
    /// Write log lines to this file (appending) instead of stderr. SIGHUP reopens it, for logrotate.
    #[arg(long, env = "SCALED_LOG_FILE")]
    pub log_file: Option<PathBuf>,

    /// The environment file the daemon was started with (systemd's `EnvironmentFile=`). SIGHUP reads
    /// it again and applies its SCALED_LOG; any other setting changed in it is logged as taking
    /// effect at the next restart.
    #[arg(long, env = "SCALED_ENV_FILE")]
    pub env_file: Option<PathBuf>,

    // Access control (src/access/; README "Security").
    /// Unix peers allowed to connect, by uid (comma-separated). With neither this nor --allow-gid,
    /// every process that can open the socket may connect; with either, a peer on neither list (and
    /// not an --admin-uid) is answered DENIED and closed.
    #[arg(long, env = "SCALED_ALLOW_UID", value_delimiter = ',')]
    pub allow_uid: Vec<u32>,

    /// Unix peers allowed to connect, by primary gid (comma-separated). See --allow-uid.
    #[arg(long, env = "SCALED_ALLOW_GID", value_delimiter = ',')]
    pub allow_gid: Vec<u32>,

    /// Unix peers that are admins, by uid (comma-separated): always allowed, never confined to a
    /// namespace, and shown every lock and figure.
    #[arg(long, env = "SCALED_ADMIN_UID", value_delimiter = ',')]
    pub admin_uid: Vec<u32>,

    /// Confine each Unix peer that is not an admin to the key namespace of its uid (`uid-1000`), so
    /// that apps running as different users can neither read nor lock each other's keys.
    #[arg(long, env = "SCALED_NAMESPACE_BY_UID")]
    pub namespace_by_uid: bool,

    /// File of tokens a TCP client must show in HELLO: `TOKEN` (an admin) or `NAME TOKEN` (a peer in
    /// namespace NAME) a line. Required with --tcp; must not be readable by others. Read at start.
    #[arg(long, env = "SCALED_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// Print the effective configuration as JSON and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
}

/// How log lines are written.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line: timestamp, level, message, and the event's fields at the top level.
    Json,
}

impl Config {
    /// CACHE_TTL as a duration; `None` when entries without a TTL never expire.
    pub fn default_cache_ttl(&self) -> Option<Duration> {
        (self.cache_ttl > 0.0).then(|| Duration::from_secs_f64(self.cache_ttl))
    }

    /// LOCK_TIMEOUT as a duration.
    pub fn default_lease(&self) -> Duration {
        Duration::from_secs_f64(self.lock_timeout)
    }

    /// How long a LOCK waits when it does not say: LOCK_RETRY_DELAY × LOCK_MAX_RETRIES, as in the seed.
    pub fn default_lock_wait(&self) -> Duration {
        Duration::from_secs_f64(self.lock_retry_delay * f64::from(self.lock_max_retries))
    }

    /// The lock table's limits.
    pub fn lock_limits(&self) -> crate::locks::LockLimits {
        crate::locks::LockLimits {
            max_records: usize::try_from(self.max_locks).unwrap_or(usize::MAX),
            max_waiters: usize::try_from(self.max_waiters).unwrap_or(usize::MAX),
        }
    }

    /// A timeout setting as a duration; `None` when it is 0 (no limit).
    pub fn timeout(secs: f64) -> Option<Duration> {
        (secs > 0.0).then(|| Duration::from_secs_f64(secs))
    }

    /// The shutdown grace period.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_timeout)
    }
}

/// What LOCK does while Redis is configured but unreachable.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LockFallback {
    /// Grant from this daemon's own lock table: exclusion among its own clients only, marked
    /// degraded. The original architecture's fallback, and the default.
    Local,
    /// Refuse with UNAVAILABLE: no lock is granted that Redis has not granted.
    Fail,
}

/// A timeout in seconds: positive (a zero timeout would fail every call) and finite.
fn parse_timeout(s: &str) -> Result<f64, String> {
    let v = parse_secs(s)?;
    if v <= 0.0 {
        return Err(format!("`{s}`: a timeout must be more than 0 seconds"));
    }
    Ok(v)
}

/// Seconds as a non-negative, finite number, so `Duration::from_secs_f64` can never panic.
fn parse_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !v.is_finite() || !(0.0..=1e9).contains(&v) {
        return Err(format!("`{s}` is out of range: give 0 to 1e9 seconds"));
    }
    Ok(v)
}

fn octal<S: serde::Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{mode:03o}"))
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let mode =
        u32::from_str_radix(s.trim(), 8).map_err(|_| format!("`{s}` is not an octal mode"))?;
    if mode > 0o777 {
        return Err(format!("`{s}` is not a file mode (000 to 777)"));
    }
    Ok(mode)
}

fn parse_tcp(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    s.parse()
        .map_err(|_| format!("`{s}` is neither a PORT nor a HOST:PORT address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_seed() {
        let c = Config::try_parse_from(["scaled"]).unwrap();
        assert_eq!(c.cache_size, 10_000);
        assert_eq!(c.default_cache_ttl(), Some(Duration::from_secs(300)));
        assert_eq!(c.default_lease(), Duration::from_secs(10));
        assert_eq!(c.default_lock_wait(), Duration::from_secs(5));
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.socket_mode, 0o660);
        assert_eq!(c.max_locks, 100_000);
        assert_eq!(c.max_waiters, 1024);
        assert_eq!(c.cache_max_bytes, 256 << 20);
        assert_eq!(
            Config::timeout(c.idle_timeout),
            Some(Duration::from_secs(600))
        );
        assert_eq!(Config::timeout(0.0), None);
        assert_eq!(c.redis_prefix, "scaled:");
        assert_eq!(c.lock_fallback, LockFallback::Local);
    }

    #[test]
    fn bad_values_are_refused() {
        for args in [
            &["scaled", "--cache-ttl", "-1"][..],
            &["scaled", "--lock-timeout", "NaN"],
            &["scaled", "--socket-mode", "999"],
            &["scaled", "--tcp", "nowhere"],
            &["scaled", "--cache-size", "0"],
            &["scaled", "--max-locks", "0"],
            &["scaled", "--max-waiters", "0"],
        ] {
            assert!(
                Config::try_parse_from(args).is_err(),
                "{args:?} was accepted"
            );
        }
        for args in [
            &["scaled", "--redis-response-timeout", "0"][..],
            &["scaled", "--redis-max-pending-bytes", "1000"],
            &["scaled", "--lock-fallback", "maybe"],
        ] {
            assert!(
                Config::try_parse_from(args).is_err(),
                "{args:?} was accepted"
            );
        }
        let c = Config::try_parse_from(["scaled", "--tcp", "7000"]).unwrap();
        assert_eq!(c.tcp, Some("127.0.0.1:7000".parse().unwrap()));
        let c = Config::try_parse_from(["scaled", "--metrics", "9150", "--log-format", "json"])
            .unwrap();
        assert_eq!(c.metrics, Some("127.0.0.1:9150".parse().unwrap()));
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(Config::try_parse_from(["scaled", "--log-format", "xml"]).is_err());
        let c = Config::try_parse_from(["scaled", "--allow-uid", "1000,1001", "--admin-uid", "0"])
            .unwrap();
        assert_eq!((c.allow_uid, c.admin_uid), (vec![1000, 1001], vec![0]));
        assert!(Config::try_parse_from(["scaled", "--allow-gid", "staff"]).is_err());
    }
}
