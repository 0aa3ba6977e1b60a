//! STATS: the daemon's counters, in the seed's shape and more.

use std::sync::Arc;

use serde::Serialize;
use tokio::time::Instant;

use super::{CommandResult, Reply};
use crate::cache::CacheStats;
use crate::daemon::{ConnectionStats, Daemon};
use crate::locks::LockStats;
use crate::meter::MeterSnapshot;

/// The STATS document. proto-spec.md lists every member.
#[derive(Serialize)]
pub struct StatsDoc {
    version: &'static str,
    uptime_seconds: f64,
    cache: CacheStats,
    performance: MeterSnapshot,
    redis: RedisStats,
    connections: ConnectionStats,
    locks: LockStats,
}

/// Whether a Redis backend is in use and reachable.
#[derive(Serialize)]
struct RedisStats {
    configured: bool,
    available: bool,
}

pub fn run(daemon: &Arc<Daemon>, now: Instant) -> CommandResult {
    Reply::encode(&StatsDoc {
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: now.saturating_duration_since(daemon.started).as_secs_f64(),
        cache: daemon.cache.stats(),
        performance: daemon.meter.snapshot(now),
        redis: {
            let (configured, available) = daemon.store.redis_health();
            RedisStats {
                configured,
                available,
            }
        },
        connections: daemon.connections.stats(),
        locks: daemon.locks.stats(),
    })
}
