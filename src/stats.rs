//! The figures: [`Daemon::stats`] computes, in one place, everything the STATS command answers and
//! `/metrics` exposes, so the two can never disagree. A new group of figures (the Redis backend's, say)
//! is one member here, filled in [`Daemon::stats`]: STATS then carries it, and [`crate::metrics`] renders
//! it.
//!
//! The serialized members are the STATS document of proto-spec.md. Members marked `serde(skip)` are the
//! since-start histograms and outcome counts that only `/metrics` shows: Prometheus needs counters that
//! only grow, where STATS reports a 60-second window.

use serde::Serialize;
use tokio::time::Instant;

use scaled_client::answers::RedisStats;

use crate::cache::CacheStats;
use crate::daemon::{ConnectionStats, Daemon};
use crate::locks::LockStats;
use crate::meter::{Buckets, CommandTotals, Performance};

/// The daemon's figures at one moment. Serialized, it is the STATS document.
#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    /// The daemon's software version.
    pub version: &'static str,
    /// Seconds since the daemon started.
    pub uptime_seconds: f64,
    /// The session cache.
    pub cache: CacheStats,
    /// Response times and rates over the sliding 60-second window.
    pub performance: Performance,
    /// The shared backend (none in this build).
    pub redis: RedisStats,
    /// Client connections.
    pub connections: ConnectionStats,
    /// The lock table's counters.
    pub locks: LockStats,
    /// Requests since start, by command and outcome, with their response times: `/metrics` only.
    #[serde(skip)]
    pub requests: Vec<CommandTotals>,
    /// How long granted LOCKs waited in a queue, since start: `/metrics` only.
    #[serde(skip)]
    pub lock_waits: Buckets,
}

impl Daemon {
    /// Every figure the daemon reports, as of `now`.
    pub fn stats(&self, now: Instant) -> Stats {
        Stats {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: now.saturating_duration_since(self.started).as_secs_f64(),
            cache: self.cache.stats(),
            performance: self.meter.snapshot(now),
            redis: self.store.redis_stats(now),
            connections: ConnectionStats {
                denied: self.access.denied(),
                ..self.connections.stats()
            },
            locks: self.locks.stats(),
            requests: self.meter.totals(),
            lock_waits: self.locks.read_waits(Buckets::from_histogram),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The daemon serializes the client crate's answer types where it can; these tests prove that the
    //! ones it still declares itself (the lock table's) and the STATS document as a whole have exactly
    //! the client's shape: decoding into the client's type and encoding again loses nothing.

    use serde::de::DeserializeOwned;

    use super::*;
    use crate::config::Config;
    use crate::locks::{Grant, LockInfo, LockPage};
    use clap::Parser;

    fn value_of<T: Serialize>(v: &T) -> rmpv::Value {
        let bytes = rmp_serde::to_vec_named(v).expect("encodes");
        rmpv::decode::read_value(&mut &bytes[..]).expect("MessagePack")
    }

    /// Sorted member names, recursively, so member order does not matter.
    fn normalized(v: rmpv::Value) -> rmpv::Value {
        match v {
            rmpv::Value::Map(members) => {
                let mut members: Vec<(rmpv::Value, rmpv::Value)> = members
                    .into_iter()
                    .map(|(k, v)| (k, normalized(v)))
                    .collect();
                members.sort_by(|a, b| a.0.as_str().cmp(&b.0.as_str()));
                rmpv::Value::Map(members)
            }
            rmpv::Value::Array(items) => {
                rmpv::Value::Array(items.into_iter().map(normalized).collect())
            }
            other => other,
        }
    }

    /// Decodes the daemon's `value` as the client's `C` and encodes it again: the two must be equal.
    fn same_shape<D: Serialize, C: Serialize + DeserializeOwned>(daemon: &D) {
        let sent = value_of(daemon);
        let client: C = rmpv::ext::from_value(sent.clone()).expect("the client decodes it");
        assert_eq!(
            normalized(value_of(&client)),
            normalized(sent),
            "the client's {} and the daemon's {} differ",
            std::any::type_name::<C>(),
            std::any::type_name::<D>()
        );
    }

    #[test]
    fn the_stats_document_has_the_clients_shape() {
        let config = Config::try_parse_from(["scaled"]).expect("defaults");
        let daemon = Daemon::new(config).expect("a standalone daemon needs no Redis");
        let now = Instant::now();
        daemon
            .meter
            .record(Some(scaled_client::proto::CommandName::Get), None, 10, now);
        let mut stats = daemon.stats(now);
        // Every member non-zero, so a member the client drops cannot hide behind a default.
        stats.locks = LockStats {
            held: 1,
            waiters: 2,
            records: 11,
            max_records: 12,
            requests: 3,
            grants: 4,
            timeouts: 5,
            refused: 6,
            overloaded: 13,
            expiries: 7,
            released_on_disconnect: 8,
            renewals: 9,
            contention: 10.5,
            wait_p50: 0.25,
            wait_p95: 0.5,
            wait_p99: 0.75,
        };
        assert!(stats.performance.commands.contains_key("GET"));
        same_shape::<_, scaled_client::Stats>(&stats);
    }

    #[test]
    fn grants_and_lock_rows_have_the_clients_shape() {
        same_shape::<_, scaled_client::Grant>(&Grant {
            token: "t".into(),
            fence: 1,
            ttl_ms: 2,
            waited_us: 3,
        });
        let row = LockInfo {
            key: "k".into(),
            owner: "o#1".into(),
            fence: 1,
            age_ms: 2,
            ttl_ms: 3,
            auto_renew: true,
            waiters: 4,
        };
        same_shape::<_, Vec<scaled_client::LockInfo>>(&vec![row.clone()]);
        same_shape::<_, scaled_client::LocksPage>(&LockPage {
            locks: vec![row],
            total: 5,
            next: Some("k".into()),
        });
    }
}
