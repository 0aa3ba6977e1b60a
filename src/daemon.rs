//! The state every connection shares: the cache, the lock table, the meter and the connection counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cache::{CacheLimits, SessionCache};
use crate::config::Config;
use crate::locks::LockTable;
use crate::meter::RequestMeter;

/// The daemon's shared state. One value, behind an `Arc`, handed to every connection.
pub struct Daemon {
    /// The settings it was started with.
    pub config: Config,
    /// Session state and anything else the apps cache.
    pub cache: SessionCache,
    /// Session locks. In an `Arc` because waiters hold it to leave their queue when dropped.
    pub locks: Arc<LockTable>,
    /// Response times and rates for STATS.
    pub meter: RequestMeter,
    /// Connection counts for STATS.
    pub connections: ConnectionCounters,
    /// When the daemon started, for uptime.
    pub started: Instant,
    /// Cancelled when shutdown begins: listeners stop accepting and connections stop reading.
    pub shutdown: CancellationToken,
}

impl Daemon {
    /// Fresh state for `config`.
    pub fn new(config: Config) -> Daemon {
        let started = Instant::now();
        let cache = SessionCache::new(CacheLimits {
            max_entries: usize::try_from(config.cache_size).unwrap_or(usize::MAX),
            max_bytes: (config.cache_max_bytes > 0)
                .then(|| usize::try_from(config.cache_max_bytes).unwrap_or(usize::MAX)),
            shards: config.cache_shards,
        });
        let lock_limits = config.lock_limits();
        Daemon {
            config,
            cache,
            locks: Arc::new(LockTable::with_fences_after(
                wall_clock_micros(),
                lock_limits,
            )),
            meter: RequestMeter::new(started),
            connections: ConnectionCounters::default(),
            started,
            shutdown: CancellationToken::new(),
        }
    }
}

/// Microseconds since the Unix epoch; where fencing tokens start, so they keep growing across restarts.
fn wall_clock_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Connection counts.
#[derive(Default)]
pub struct ConnectionCounters {
    current: AtomicU64,
    total: AtomicU64,
    refused: AtomicU64,
}

/// What STATS reports under `connections`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ConnectionStats {
    /// Open now.
    pub current: u64,
    /// Accepted since start.
    pub total: u64,
    /// Turned away at the connection limit since start.
    pub refused: u64,
}

impl ConnectionCounters {
    /// Counts a connection accepted; the guard counts it closed when dropped.
    pub fn opened(&self) -> OpenConnection<'_> {
        self.current.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        OpenConnection(self)
    }

    /// Counts a connection refused at the limit.
    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn stats(&self) -> ConnectionStats {
        ConnectionStats {
            current: self.current.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

/// Keeps a connection counted as open while it lives.
pub struct OpenConnection<'a>(&'a ConnectionCounters);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.current.fetch_sub(1, Ordering::Relaxed);
    }
}
