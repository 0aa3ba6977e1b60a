//! Typed answers: the maps the daemon answers with, as documented Rust types.
//!
//! Each type mirrors a table of `proto-spec.md` member for member. Decoding follows the protocol's
//! rule that the answer may grow: members this crate does not know are skipped, so an older client keeps
//! working against a newer daemon; figures a STATS document lacks (an older daemon) read as zero. The
//! daemon serializes the same types where it can, and a test proves the rest have the same shape, so
//! there is one schema for the daemon, this client, `scalectl` and any client that copies it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// HELLO's answer: what the client may rely on for this connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version agreed.
    pub version: u32,
    /// The daemon's name and software version, e.g. `scaled 0.1.0`.
    pub server: String,
    /// Largest frame body the daemon accepts, in bytes.
    pub max_frame: u64,
    /// Largest key, in bytes.
    pub max_key: u64,
    /// Largest cache value, in bytes.
    pub max_value: u64,
}

/// A LOCK's grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The owner token, needed to UNLOCK and EXTEND.
    pub token: String,
    /// The fencing token: greater than that of every earlier grant of this key.
    pub fence: u64,
    /// The lease granted, in milliseconds.
    pub ttl_ms: u64,
    /// How long the LOCK waited in the queue, in microseconds; 0 when granted at once.
    #[serde(default)]
    pub waited_us: u64,
}

/// One row of LOCKS: a lock held now.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LockInfo {
    /// The lock key.
    pub key: String,
    /// Who holds it: the client's HELLO name and its connection number.
    pub owner: String,
    /// The fencing token of the current grant.
    pub fence: u64,
    /// Milliseconds since it was granted.
    pub age_ms: u64,
    /// Milliseconds of lease left.
    pub ttl_ms: u64,
    /// Whether the lease renews while the holder's connection lives.
    pub auto_renew: bool,
    /// Requests queued behind the holder.
    pub waiters: u64,
}

/// One page of LOCKS, asked for with `limit` or `after`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocksPage {
    /// The rows, by key: at most the page's `limit`.
    pub locks: Vec<LockInfo>,
    /// How many locks are held now, counting every page.
    pub total: u64,
    /// Send this as `after` for the next page; `None` on the last page.
    #[serde(default)]
    pub next: Option<String>,
}

/// The STATS document. Times are in seconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stats {
    /// The daemon's software version (not the protocol version).
    pub version: String,
    /// Seconds since the daemon started.
    pub uptime_seconds: f64,
    /// The session cache.
    pub cache: CacheStats,
    /// Response times and rates over the sliding 60-second window.
    pub performance: Performance,
    /// The shared backend.
    pub redis: RedisStats,
    /// Client connections.
    pub connections: ConnectionStats,
    /// The lock table.
    pub locks: LockStats,
}

/// STATS `cache`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CacheStats {
    /// Entries held now (some may have expired and not been swept yet).
    pub size: u64,
    /// CACHE_SIZE, the most entries held.
    pub max_size: u64,
    /// Bytes of keys plus values held now.
    pub bytes: u64,
    /// CACHE_MAX_BYTES; 0 when only CACHE_SIZE bounds the cache.
    pub max_bytes: u64,
    /// GETs that found a live entry, since start.
    pub hits: u64,
    /// GETs that found nothing, or an expired entry, since start.
    pub misses: u64,
    /// `100 × hits / (hits + misses)`, in percent as the original architecture reports it; 0 before
    /// the first GET.
    pub hit_rate: f64,
    /// Live entries dropped to make room, since start.
    pub evictions: u64,
    /// Entries dropped because their TTL had passed, since start.
    pub expirations: u64,
}

/// The six window figures, for all requests together or for one command.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PerfStats {
    /// Requests finished in the window divided by the window's length.
    pub requests_per_second: f64,
    /// Mean response time in the window.
    pub avg_response_time: f64,
    /// Median response time in the window.
    pub p50_response_time: f64,
    /// 95th percentile response time in the window.
    pub p95_response_time: f64,
    /// 99th percentile response time in the window.
    pub p99_response_time: f64,
    /// Requests finished in the window: the last 60 seconds, not since start.
    pub total_requests: u64,
}

/// STATS `performance`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Performance {
    /// All commands together; on the wire these six members sit in `performance` itself.
    #[serde(flatten)]
    pub overall: PerfStats,
    /// Requests finished since the daemon started.
    pub lifetime_requests: u64,
    /// Seconds the window covers now: the uptime, at least 1 and at most 60.
    pub window_seconds: f64,
    /// The same figures per command name (`GET`, …, and `OTHER` for requests naming no known
    /// command), for the commands with a request in the window.
    pub commands: BTreeMap<String, PerfStats>,
}

/// STATS `redis`. Every figure is 0 (or false) on a standalone daemon.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RedisStats {
    /// Whether a Redis backend is configured.
    pub configured: bool,
    /// Whether it is reachable.
    pub available: bool,
    /// Seconds Redis has been unavailable since start (degraded time), the current outage included.
    pub degraded_seconds: f64,
    /// Commands and scripts sent to Redis since start.
    pub round_trips: u64,
    /// Calls that failed because Redis was unreachable, since start.
    pub unavailable: u64,
    /// Connections to Redis opened since start.
    pub connects: u64,
    /// Values read from Redis whose checksum failed (answered `CORRUPTED`), since start.
    pub corruptions: u64,
    /// Auto-renewals Redis refused, since start.
    pub renewals_failed: u64,
    /// Locks lost without their holder letting go (a refused renewal, or a lock granted while
    /// degraded that another daemon was granted meanwhile), since start.
    pub locks_lost: u64,
    /// Releases waiting for the background releaser now (a connection's end, Redis away).
    pub releases_pending: u64,
    /// GETs answered from the local cache with Redis available, since start.
    pub cache_hits: u64,
    /// GETs answered from the local cache while Redis was unreachable (marked degraded), since start.
    pub degraded_hits: u64,
    /// Reads of a value sent to Redis for GETs, since start.
    pub reads: u64,
    /// GETs that shared a read another GET had started (single flight), since start.
    pub reads_shared: u64,
    /// Redis reads saved: `cache_hits + reads_shared`, since start.
    pub reads_saved: u64,
    /// Values read or written that were not cached because an invalidation of their key, or a lost
    /// invalidation stream, came between their Redis step and their landing, since start.
    pub fills_dropped: u64,
    /// Invalidations applied to the local cache, since start.
    pub invalidations: u64,
    /// Times the invalidation stream was lost and the local cache flushed, since start.
    pub flushes: u64,
}

/// STATS `connections`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectionStats {
    /// Open now.
    pub current: u64,
    /// Accepted since start.
    pub total: u64,
    /// Turned away with `OVERLOADED` at the connection limit, since start.
    pub refused: u64,
    /// Refused by access control with `DENIED` (a uid or gid not allowed, a missing or wrong token),
    /// since start.
    pub denied: u64,
}

/// STATS `locks`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LockStats {
    /// Locks held now.
    pub held: u64,
    /// LOCKs waiting in queues now.
    pub waiters: u64,
    /// Lock records kept now: held locks, and free ones kept for their fencing token.
    pub records: u64,
    /// SCALED_MAX_LOCKS, the most lock records kept.
    pub max_records: u64,
    /// LOCKs since start that passed their argument checks.
    pub requests: u64,
    /// Grants since start, at once or from a queue.
    pub grants: u64,
    /// LOCKs answered `LOCK_TIMEOUT` since start.
    pub timeouts: u64,
    /// LOCKs in try mode answered `LOCKED` since start.
    pub refused: u64,
    /// LOCKs the lock table answered `OVERLOADED` (SCALED_MAX_LOCKS or SCALED_MAX_WAITERS) since start.
    pub overloaded: u64,
    /// Leases that ran out, taking the lock from its holder, since start.
    pub expiries: u64,
    /// Locks released because their holder's connection ended, since start.
    pub released_on_disconnect: u64,
    /// Leases renewed by auto-renew since start.
    pub renewals: u64,
    /// Share of LOCKs that found the lock held (queued or refused), in percent.
    pub contention: f64,
    /// Median wait in a queue before the grant, in seconds, over the LOCKs that queued, since start.
    pub wait_p50: f64,
    /// 95th percentile of the same.
    pub wait_p95: f64,
    /// 99th percentile of the same.
    pub wait_p99: f64,
}

/// What UNLOCK and EXTEND answer: `{status}`, and for EXTEND the lease now in force.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub(crate) struct StatusAnswer {
    /// The status.
    pub status: crate::LockStatus,
}

/// Decodes an `ok` value into one of these types; a value of another shape is a protocol error.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    what: &str,
    value: rmpv::Value,
) -> crate::Result<T> {
    rmpv::ext::from_value(value)
        .map_err(|e| crate::Error::Protocol(format!("{what} answered an unexpected shape: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_members_are_skipped_and_missing_figures_read_as_zero() {
        let doc = rmpv::Value::Map(vec![
            ("version".into(), "9.9.9".into()),
            ("from_the_future".into(), rmpv::Value::Array(vec![1.into()])),
            (
                "cache".into(),
                rmpv::Value::Map(vec![
                    ("hits".into(), 7.into()),
                    ("shiny".into(), true.into()),
                ]),
            ),
            (
                "performance".into(),
                rmpv::Value::Map(vec![
                    ("total_requests".into(), 3.into()),
                    (
                        "commands".into(),
                        rmpv::Value::Map(vec![(
                            "GET".into(),
                            rmpv::Value::Map(vec![("total_requests".into(), 2.into())]),
                        )]),
                    ),
                ]),
            ),
        ]);
        let stats: Stats = decode("STATS", doc).expect("decodes");
        assert_eq!(stats.version, "9.9.9");
        assert_eq!(stats.cache.hits, 7);
        assert_eq!(stats.cache.misses, 0);
        assert_eq!(stats.performance.overall.total_requests, 3);
        assert_eq!(stats.performance.commands["GET"].total_requests, 2);
        assert_eq!(stats.locks, LockStats::default());
    }

    #[test]
    fn a_grant_needs_its_token() {
        let partial = rmpv::Value::Map(vec![("fence".into(), 5.into())]);
        assert!(decode::<Grant>("LOCK", partial).is_err());
    }
}
