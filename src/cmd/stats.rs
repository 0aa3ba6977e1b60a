//! STATS: the daemon's counters, in the original architecture's shape and more. [`Daemon::stats`] computes
//! them; this command only encodes them.
//!
//! A peer confined to a namespace gets the same document with every figure that describes other apps'
//! activity set to 0: how many keys and bytes are cached, hits and misses, request rates and response
//! times, connections, locks held and their counters. What it keeps is the daemon's health and limits
//! (version, uptime, Redis reachability, the cache's and lock table's configured bounds), which say
//! nothing about anyone's data. The shape stays whole so that every client decodes it as it always has.

use std::sync::Arc;

use tokio::time::Instant;

use scaled_client::answers::{RedisStats, Stats};

use super::{CommandResult, Reply};
use crate::access::Scope;
use crate::daemon::Daemon;

pub fn run(daemon: &Arc<Daemon>, scope: &Scope, now: Instant) -> CommandResult {
    let stats = daemon.stats(now);
    match scope {
        Scope::Unrestricted => Reply::encode(&stats),
        Scope::Namespace(_) => {
            let mut health = Stats {
                version: stats.version.to_string(),
                uptime_seconds: stats.uptime_seconds,
                redis: RedisStats {
                    configured: stats.redis.configured,
                    available: stats.redis.available,
                    degraded_seconds: stats.redis.degraded_seconds,
                    ..RedisStats::default()
                },
                ..Stats::default()
            };
            health.cache.max_size = stats.cache.max_size;
            health.cache.max_bytes = stats.cache.max_bytes;
            health.locks.max_records = stats.locks.max_records;
            Reply::encode(&health)
        }
    }
}
