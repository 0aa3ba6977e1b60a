//! The state every connection shares: the cache, the lock table, the meter and the connection counters.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::access::Access;
use crate::budget::{Budget, Reservoir};
use crate::cache::{CacheLimits, SessionCache};
use crate::config::Config;
use crate::locks::{wall_clock_micros, LockTable};
use crate::meter::RequestMeter;
use crate::redis::LinkError;
use crate::store::remote::Remote;
use crate::store::Store;

/// The daemon's shared state. One value, behind an `Arc`, handed to every connection.
pub struct Daemon {
    /// The settings it was started with.
    pub config: Config,
    /// Session state and anything else the apps cache. Commands reach it through [`Daemon::store`];
    /// STATS and upkeep read it here.
    pub cache: Arc<SessionCache>,
    /// Session locks. In an `Arc` because waiters hold it to leave their queue when dropped.
    pub locks: Arc<LockTable>,
    /// Where commands read and write session state and locks, whatever the backend.
    pub store: Store,
    /// Response times and rates for STATS.
    pub meter: RequestMeter,
    /// Bytes of connection buffers beyond each connection's base allowance (SCALED_MAX_BUFFER_BYTES).
    pub buffers: Budget,
    /// Requests waiting to finish, across all connections (SCALED_MAX_WAITING). In an `Arc` because
    /// each waiting request holds a slot of it until it ends.
    pub waiting: Arc<Budget>,
    /// Bytes of SET values waiting on Redis, across all connections (REDIS_MAX_PENDING_BYTES); a
    /// connection whose next SET does not fit waits for it. In an `Arc` because each such SET holds
    /// its charge until it ends.
    pub pending_bytes: Arc<Reservoir>,
    /// Connection counts for STATS.
    pub connections: ConnectionCounters,
    /// When the daemon started, for uptime.
    pub started: Instant,
    /// Cancelled when shutdown begins: listeners stop accepting and connections stop reading. Behind
    /// an `Arc` because every LOCK takes a copy, and cloning the token itself locks a mutex. Begin it
    /// with [`Daemon::begin_shutdown`], which sets `stopping` first.
    pub shutdown: Arc<CancellationToken>,
    /// Set just before `shutdown` is cancelled: what a connection reads on every pass, where asking
    /// the token would lock its mutex (see `crate::connection`).
    pub stopping: AtomicBool,
    /// Who may connect and what each peer may reach. Open to all until [`crate::server::Server::bind`]
    /// sets the rules the configuration asks for.
    pub access: Access,
}

impl Daemon {
    /// Fresh state for `config`; with REDIS_URL set, starts the link to Redis (down until it
    /// connects). Must run inside a tokio runtime.
    pub fn new(config: Config) -> Result<Daemon, LinkError> {
        let started = Instant::now();
        let cache = Arc::new(SessionCache::new(CacheLimits {
            max_entries: usize::try_from(config.cache_size).unwrap_or(usize::MAX),
            max_bytes: (config.cache_max_bytes > 0)
                .then(|| usize::try_from(config.cache_max_bytes).unwrap_or(usize::MAX)),
            shards: config.cache_shards,
        }));
        let locks = Arc::new(LockTable::with_fences_after(
            wall_clock_micros(),
            config.lock_limits(),
        ));
        let store = Store::new(
            cache.clone(),
            locks.clone(),
            Remote::start(&config, &cache)?,
        );
        let buffers = Budget::new(usize::try_from(config.max_buffer_bytes).unwrap_or(usize::MAX));
        let waiting = Arc::new(Budget::new(
            usize::try_from(config.max_waiting).unwrap_or(usize::MAX),
        ));
        let pending_bytes = Arc::new(Reservoir::new(
            usize::try_from(config.redis_max_pending_bytes).unwrap_or(usize::MAX),
        ));
        Ok(Daemon {
            pending_bytes,
            config,
            cache,
            locks,
            store,
            meter: RequestMeter::new(started),
            buffers,
            waiting,
            connections: ConnectionCounters::default(),
            started,
            shutdown: Arc::new(CancellationToken::new()),
            stopping: AtomicBool::new(false),
            access: Access::default(),
        })
    }

    /// Begins shutdown: `stopping` first, so that a connection woken by the token finds it set.
    pub fn begin_shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        self.shutdown.cancel();
    }
}

/// Connection counts.
#[derive(Default)]
pub struct ConnectionCounters {
    /// Open now.
    current: AtomicU64,
    /// Accepted since start.
    total: AtomicU64,
    /// Refused at the connection limit since start.
    refused: AtomicU64,
}

/// What STATS reports under `connections`: the client crate's type, one schema for both sides.
pub use scaled_client::answers::ConnectionStats;

impl ConnectionCounters {
    /// Counts a connection accepted; the guard counts it closed when dropped.
    pub fn opened(&self) -> OpenConnection<'_> {
        self.current.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        OpenConnection(self)
    }

    /// Counts a connection refused at the limit, and says so in the log (at most once per interval,
    /// so a flood of refusals cannot flood the log too).
    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        crate::reqlog::overloaded("connection limit reached; refusing new connections");
    }

    /// The counts now.
    pub fn stats(&self) -> ConnectionStats {
        ConnectionStats {
            current: self.current.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            // Counted by access control; Daemon::stats fills it in.
            denied: 0,
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
