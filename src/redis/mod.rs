//! The link to Redis: one pipelined connection shared by every request, its health, and the names
//! of everything the daemon keeps in Redis. This module knows nothing of the cache or the lock table;
//! the store composes them with it.
//!
//! - [`Link`] owns the command connection. A background connector opens it (with a connect timeout),
//!   loads the scripts, raises Redis's fencing floor to this daemon's own (see [`Link::note_fence`]),
//!   and only then reports [`Health::Up`]. A command that fails because Redis is unreachable (refused,
//!   broken, or no answer within the response timeout) drops the connection and reports
//!   [`Health::Down`]; the connector then reconnects with jittered exponential backoff. While up, it
//!   PINGs Redis every [`HEALTH_CHECK_INTERVAL`] so an idle daemon notices a dead Redis too. Each change
//!   of health is logged once.
//! - [`scripts`]: the Lua scripts (acquire, release, extend, adopt, raise the fence floor, fenced
//!   write, read) and the typed calls to them, as methods on [`Link`].
//! - [`pipe`] and [`resp`]: the command connection itself. Every caller's command goes into one
//!   output buffer, written in one go while the previous write is under way, and replies are parsed
//!   as they arrive and handed to their callers in order: no task, timer or reply tree per call.
//! - [`coherence`]: the invalidation stream (a dedicated pub/sub connection), with "flush" first
//!   whenever it is lost.
//! - [`wakeups`]: release messages (another dedicated pub/sub connection) waking local lock waiters.
//!
//! The command connection's reader sees the socket close the moment Redis dies, so a dead Redis is
//! noticed before the next call fails on it.
//!
//! One pipelined connection, not a pool: Redis runs commands one at a time, and one connection
//! carrying every caller's commands in large writes is what Redis serves fastest. The daemon
//! therefore uses three connections (commands, invalidations, wake-ups), within
//! `REDIS_MAX_CONNECTIONS`, which must allow them.

pub mod coherence;
pub mod pipe;
pub mod resp;
pub mod scripts;
pub mod wakeups;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use redis::{ConnectionAddr, IntoConnectionInfo, RedisError};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use pipe::{Address, Pipe, PipeError};
use resp::{Command, Reply};

/// How often the connector PINGs a Redis it believes up, so an idle daemon notices one that died.
pub const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The first reconnect delay; each failed attempt doubles it, up to [`BACKOFF_MAX`].
pub const BACKOFF_BASE: Duration = Duration::from_millis(25);

/// The longest reconnect delay: a Redis that comes back is found within about this long.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Connections the daemon opens to Redis: commands, invalidations, wake-ups.
pub const CONNECTIONS_USED: u32 = 3;

/// What the link needs to know, taken from the daemon's configuration.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://` or `unix://` URL of the Redis all daemons share.
    pub url: String,
    /// Prefix of every key and channel name, so one Redis can hold other data too.
    pub prefix: String,
    /// How long a connection attempt may take before Redis counts as unreachable.
    pub connect_timeout: Duration,
    /// How long a command may wait for its answer before Redis counts as unreachable.
    pub response_timeout: Duration,
    /// REDIS_MAX_CONNECTIONS: the most connections the daemon may open to Redis.
    pub max_connections: u32,
}

impl RedisSettings {
    /// The Redis settings of `config`; `None` when no REDIS_URL is set (standalone).
    pub fn from_config(config: &Config) -> Option<RedisSettings> {
        Some(RedisSettings {
            url: config.redis_url.clone()?,
            prefix: config.redis_prefix.clone(),
            connect_timeout: Duration::from_secs_f64(config.redis_connect_timeout),
            response_timeout: Duration::from_secs_f64(config.redis_response_timeout),
            max_connections: config.redis_max_connections,
        })
    }

    /// Settings for `url` with the defaults of the daemon's flags.
    pub fn new(url: impl Into<String>) -> RedisSettings {
        RedisSettings {
            url: url.into(),
            prefix: "scaled:".into(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(2),
            max_connections: 100,
        }
    }
}

/// Whether Redis can be reached, as the link last found out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Connected, scripts loaded, fencing floor raised: commands go to Redis.
    Up,
    /// Not connected: commands fail at once with [`LinkError::NotConnected`] while the connector
    /// retries. The daemon starts in this state.
    Down,
}

/// Why a call to Redis did not give an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// Redis cannot be reached: refused, broken, timed out, or still loading its data. The protocol's
    /// `UNAVAILABLE`; with [`LinkError::NotConnected`], the only error that makes the daemon
    /// degraded. The command may have reached Redis and been applied there before the failure.
    #[error("Redis is unavailable: {0}")]
    Unavailable(String),
    /// The link was down, so the command was never sent: `UNAVAILABLE` too, but certain to have
    /// changed nothing in Redis (an acquire that fails so needs no release).
    #[error("Redis is unavailable: not connected")]
    NotConnected,
    /// A value in Redis failed its checksum or is not in the daemon's format. The protocol's
    /// `CORRUPTED`.
    #[error("the value of `{key}` in Redis is corrupted: {reason}")]
    Corrupted {
        /// The protocol key whose value is bad.
        key: String,
        /// What was wrong with it.
        reason: String,
    },
    /// Redis answered something the scripts never return: a bug, or another program's data under
    /// the prefix. The protocol's `INTERNAL`.
    #[error("unexpected answer from Redis: {0}")]
    Unexpected(String),
    /// The settings cannot work (bad URL, too few connections allowed).
    #[error("Redis settings: {0}")]
    Settings(String),
}

impl LinkError {
    /// Whether Redis could not be reached ([`LinkError::Unavailable`] or
    /// [`LinkError::NotConnected`]): the cases the daemon answers without Redis, marked degraded.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, LinkError::Unavailable(_) | LinkError::NotConnected)
    }
}

/// Names of everything the daemon keeps in Redis, under its prefix. docs/coherence.md lists them.
#[derive(Debug, Clone)]
pub struct Keys {
    /// REDIS_PREFIX.
    prefix: String,
}

impl Keys {
    /// Names under `prefix`.
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    /// REDIS_PREFIX, for commands that write key names in parts.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn name(&self, kind: &str, rest: &str) -> String {
        format!("{}{kind}{rest}", self.prefix)
    }

    /// A cached value: `<prefix>v:<key>`.
    pub fn value(&self, key: &str) -> String {
        self.name(Keys::VALUE, key)
    }

    /// A lock's holder (its owner token): `<prefix>l:<lock>`.
    pub fn lock(&self, lock: &str) -> String {
        self.name(Keys::LOCK, lock)
    }

    /// A lock's newest fencing token: `<prefix>f:<lock>`.
    pub fn fence(&self, lock: &str) -> String {
        self.name(Keys::FENCE, lock)
    }

    /// Set while some daemon waits for a lock, so its release is published: `<prefix>w:<lock>`.
    pub fn waiters(&self, lock: &str) -> String {
        self.name(Keys::WAITERS, lock)
    }

    /// The newest fencing token of any lock: `<prefix>fence`.
    pub fn newest_fence(&self) -> String {
        self.name(Keys::NEWEST_FENCE, "")
    }

    /// The global write sequence: `<prefix>seq`.
    pub fn seq(&self) -> String {
        self.name(Keys::SEQ, "")
    }

    /// The invalidation channel: `<prefix>inval`.
    pub fn invalidations(&self) -> String {
        self.name(Keys::INVALIDATIONS, "")
    }

    /// The release channel: `<prefix>release`.
    pub fn releases(&self) -> String {
        self.name(Keys::RELEASES, "")
    }
}

/// What follows the prefix in each name: the kind, then (for per-key names) the key.
impl Keys {
    pub(crate) const VALUE: &'static str = "v:";
    pub(crate) const LOCK: &'static str = "l:";
    pub(crate) const FENCE: &'static str = "f:";
    pub(crate) const WAITERS: &'static str = "w:";
    pub(crate) const NEWEST_FENCE: &'static str = "fence";
    pub(crate) const SEQ: &'static str = "seq";
    pub(crate) const INVALIDATIONS: &'static str = "inval";
    pub(crate) const RELEASES: &'static str = "release";
}

/// Counts for STATS.
#[derive(Debug, Default)]
pub struct LinkCounters {
    /// Commands and scripts sent to Redis.
    round_trips: AtomicU64,
    /// Calls that failed because Redis was unreachable.
    unavailable: AtomicU64,
    /// Connections opened (the first one included).
    connects: AtomicU64,
}

/// A snapshot of [`LinkCounters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LinkStats {
    /// Commands and scripts sent to Redis since start.
    pub round_trips: u64,
    /// Calls that failed because Redis was unreachable, since start.
    pub unavailable: u64,
    /// Connections to Redis opened since start.
    pub connects: u64,
}

/// The link to Redis. Cheap to clone; every clone shares one connection and one health state.
#[derive(Clone)]
pub struct Link {
    shared: Arc<Shared>,
}

struct Shared {
    /// Where the command connection goes, and how it logs in there: from the URL.
    target: Target,
    /// Opens the subscribers' pub/sub connections: the URL as given (RESP2 pub/sub).
    pubsub_client: redis::Client,
    /// The settings it was made with.
    settings: RedisSettings,
    /// Key and channel names.
    keys: Keys,
    /// The command connection while up, with its number (so that the closing of an old connection
    /// cannot take down a newer one). Cloning it is cheap (a handle on one socket), so callers take a
    /// clone and never hold the lock across an await.
    current: Mutex<Option<(u64, Pipe)>>,
    /// Up or down; subscribers are the store (degraded flag) and tests.
    health: watch::Sender<Health>,
    /// Wakes the connector when a call finds Redis unreachable.
    broken: Notify,
    /// The highest fencing token this daemon has seen or issued; raised into Redis on every connect so
    /// Redis's later tokens stay above the ones issued while it was away.
    fence_floor: AtomicU64,
    /// For STATS.
    counters: LinkCounters,
    /// Cancelled by [`Link::close`]: the connector and the subscribers stop.
    closed: CancellationToken,
    /// True once the first connection attempt has finished, either way: until then "down" means
    /// "not tried yet" rather than "unreachable", and the daemon does not report itself ready.
    tried: watch::Sender<bool>,
}

impl Link {
    /// Checks the settings and starts the connector. Returns at once, down; [`Link::wait_up`] waits
    /// for the first connection. Must be called inside a tokio runtime.
    pub fn start(settings: RedisSettings) -> Result<Link, LinkError> {
        if settings.max_connections < CONNECTIONS_USED {
            return Err(LinkError::Settings(format!(
                "REDIS_MAX_CONNECTIONS is {}, and the daemon needs {CONNECTIONS_USED} (commands, invalidations, wake-ups)",
                settings.max_connections
            )));
        }
        let bad_url = |e: RedisError| LinkError::Settings(format!("REDIS_URL: {e}"));
        let pubsub_client = redis::Client::open(settings.url.as_str()).map_err(bad_url)?;
        let info = settings
            .url
            .as_str()
            .into_connection_info()
            .map_err(bad_url)?;
        let target = Target::from_info(&info)?;
        let (health, _) = watch::channel(Health::Down);
        let link = Link {
            shared: Arc::new(Shared {
                target,
                pubsub_client,
                keys: Keys::new(&settings.prefix),
                settings,
                current: Mutex::new(None),
                health,
                broken: Notify::new(),
                fence_floor: AtomicU64::new(0),
                counters: LinkCounters::default(),
                closed: CancellationToken::new(),
                tried: watch::channel(false).0,
            }),
        };
        tokio::spawn(connector(link.clone()));
        Ok(link)
    }

    /// Key and channel names.
    pub fn keys(&self) -> &Keys {
        &self.shared.keys
    }

    /// The settings the link was started with.
    pub fn settings(&self) -> &RedisSettings {
        &self.shared.settings
    }

    /// Health now.
    pub fn health(&self) -> Health {
        *self.shared.health.borrow()
    }

    /// A receiver that sees every change of health.
    pub fn watch_health(&self) -> watch::Receiver<Health> {
        self.shared.health.subscribe()
    }

    /// Waits until Redis is up, at most `limit`; true if it is.
    pub async fn wait_up(&self, limit: Duration) -> bool {
        self.wait_for(Health::Up, limit).await
    }

    /// Waits until the health is `want`, at most `limit`; true if it is.
    pub async fn wait_for(&self, want: Health, limit: Duration) -> bool {
        let mut rx = self.watch_health();
        tokio::time::timeout(limit, rx.wait_for(|h| *h == want))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Waits until the first connection attempt has finished, connected or not, at most `limit`; true
    /// if it has. After it, [`Link::health`] says whether Redis was reached.
    pub async fn first_attempt(&self, limit: Duration) -> bool {
        let mut rx = self.shared.tried.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|tried| *tried))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Records a fencing token this daemon has seen (from Redis) or issued (while degraded). The
    /// connector raises Redis's newest token to the highest of them each time it connects, before it
    /// reports [`Health::Up`].
    pub fn note_fence(&self, fence: u64) {
        self.shared.fence_floor.fetch_max(fence, Ordering::Relaxed);
    }

    /// The highest fencing token noted so far: the floor the acquire script is given.
    pub fn fence_floor(&self) -> u64 {
        self.shared.fence_floor.load(Ordering::Relaxed)
    }

    /// The counts for STATS.
    pub fn stats(&self) -> LinkStats {
        let c = &self.shared.counters;
        LinkStats {
            round_trips: c.round_trips.load(Ordering::Relaxed),
            unavailable: c.unavailable.load(Ordering::Relaxed),
            connects: c.connects.load(Ordering::Relaxed),
        }
    }

    /// Stops the connector and the subscribers, and drops the connection.
    pub fn close(&self) {
        self.shared.closed.cancel();
        *self.shared.current.lock() = None;
        self.shared.health.send_replace(Health::Down);
    }

    /// Cancelled when the link is closed.
    pub(crate) fn closed(&self) -> &CancellationToken {
        &self.shared.closed
    }

    /// The redis client for the subscribers' own pub/sub connections.
    pub(crate) fn pubsub_client(&self) -> &redis::Client {
        &self.shared.pubsub_client
    }

    /// The command connection, or [`LinkError::NotConnected`] at once while down.
    fn connection(&self) -> Result<(u64, Pipe), LinkError> {
        self.shared
            .current
            .lock()
            .clone()
            .ok_or(LinkError::NotConnected)
    }

    /// Sends one command on the command connection, counting it. A connection that fails takes the
    /// link down ([`LinkError::Unavailable`]). A Redis that answers but cannot serve now (loading its
    /// data after a restart, a replica without its primary, a script still running) is unavailable
    /// too, without taking the link down. Any other error reply is returned as the reply, for the
    /// caller to judge.
    pub(crate) async fn call(&self, cmd: &Command) -> Result<Reply, LinkError> {
        let counters = &self.shared.counters;
        let (number, pipe) = self.connection().inspect_err(|_| {
            counters.unavailable.fetch_add(1, Ordering::Relaxed);
        })?;
        counters.round_trips.fetch_add(1, Ordering::Relaxed);
        match pipe.call(cmd).await {
            Ok(reply) if is_busy(&reply) => {
                counters.unavailable.fetch_add(1, Ordering::Relaxed);
                Err(LinkError::Unavailable(format!("{reply:?}")))
            }
            Ok(reply) => Ok(reply),
            Err(PipeError::Closed(why)) => {
                counters.unavailable.fetch_add(1, Ordering::Relaxed);
                mark_down(&self.shared, number, &why);
                Err(LinkError::Unavailable(why))
            }
        }
    }
}

/// Whether an error reply says Redis cannot serve now, though the connection is fine.
fn is_busy(reply: &Reply) -> bool {
    matches!(
        reply.error_kind(),
        Some("LOADING" | "MASTERDOWN" | "TRYAGAIN" | "BUSY")
    )
}

/// Where the command connection goes and how it logs in, from REDIS_URL.
#[derive(Debug, Clone)]
struct Target {
    address: Address,
    /// `AUTH [username] password`, when the URL has a password.
    auth: Option<(Option<String>, String)>,
    /// `SELECT db`, when the URL names a database other than 0.
    db: i64,
}

impl Target {
    fn from_info(info: &redis::ConnectionInfo) -> Result<Target, LinkError> {
        let address = match info.addr() {
            ConnectionAddr::Tcp(host, port) => Address::Tcp(host.clone(), *port),
            ConnectionAddr::Unix(path) => Address::Unix(path.clone()),
            other => {
                return Err(LinkError::Settings(format!(
                    "REDIS_URL: {other:?} is not supported (use redis:// or unix://)"
                )))
            }
        };
        let redis = info.redis_settings();
        Ok(Target {
            address,
            auth: redis
                .password()
                .map(|p| (redis.username().map(str::to_string), p.to_string())),
            db: redis.db(),
        })
    }
}

/// Drops connection `number` if it is still the current one, and tells the connector, logging the
/// change once.
fn mark_down(shared: &Shared, number: u64, why: &str) {
    let dropped = {
        let mut current = shared.current.lock();
        let is_current = current.as_ref().is_some_and(|(n, _)| *n == number);
        if is_current {
            *current = None;
        }
        is_current
    };
    if dropped {
        set_health(&shared.health, Health::Down, why);
        shared.broken.notify_one();
    }
}

/// Sets the health, logging a change (and only a change).
fn set_health(health: &watch::Sender<Health>, to: Health, why: &str) {
    let was = health.send_replace(to);
    if was != to {
        match to {
            Health::Up => tracing::info!("Redis is available"),
            Health::Down => tracing::warn!(reason = why, "Redis is unavailable"),
        }
    }
}

/// The delay before reconnect attempt `attempt` (0-based): exponential from [`BACKOFF_BASE`] up to
/// [`BACKOFF_MAX`], with "equal jitter" (a random point in the upper half) so that many daemons
/// losing one Redis do not all come back at the same instant.
pub fn backoff(attempt: u32) -> Duration {
    let full = BACKOFF_BASE
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(BACKOFF_MAX);
    let half = full / 2;
    half + half.mul_f64(fastrand::f64())
}

/// Keeps the command connection open: connects (loading the scripts and raising the fencing floor
/// before reporting up), health-checks while up, and reconnects with backoff after a failure.
async fn connector(link: Link) {
    let shared = &link.shared;
    let mut attempt = 0u32;
    // The link starts down without a change of health to log; the first failure is logged here.
    let mut ever_up = false;
    loop {
        if shared.closed.is_cancelled() {
            return;
        }
        let number = shared.counters.connects.load(Ordering::Relaxed) + 1;
        match open(&link, number).await {
            Ok(conn) => {
                attempt = 0;
                ever_up = true;
                shared.counters.connects.store(number, Ordering::Relaxed);
                *shared.current.lock() = Some((number, conn));
                set_health(&shared.health, Health::Up, "");
                // After the health, so whoever the first attempt wakes sees its outcome.
                shared.tried.send_replace(true);
                // While up: PING now and then; a call that fails wakes us through `broken`.
                loop {
                    tokio::select! {
                        _ = shared.closed.cancelled() => return,
                        _ = shared.broken.notified() => {}
                        _ = tokio::time::sleep(HEALTH_CHECK_INTERVAL) => {
                            // A failure here takes the link down through `call`.
                            let _ = link.call(&Command::new("PING")).await;
                        }
                    }
                    if shared.current.lock().is_none() {
                        break;
                    }
                }
            }
            Err(e) => {
                if !ever_up && attempt == 0 {
                    tracing::warn!(reason = %e, "Redis is unavailable");
                }
                set_health(&shared.health, Health::Down, &e.to_string());
                shared.tried.send_replace(true);
                let delay = backoff(attempt);
                attempt = attempt.saturating_add(1);
                tracing::debug!(error = %e, ?delay, "Redis connect failed; retrying");
                tokio::select! {
                    _ = shared.closed.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Opens command connection `number`: connects, logs in, loads every script, and raises Redis's
/// fencing floor. The connection tells the link the moment it closes, holding the link weakly so a
/// closed link is not kept alive by its own connection.
async fn open(link: &Link, number: u64) -> Result<Pipe, String> {
    let shared = &link.shared;
    let weak: Weak<Shared> = Arc::downgrade(shared);
    let pipe = Pipe::connect(
        &shared.target.address,
        shared.settings.connect_timeout,
        shared.settings.response_timeout,
        move |why| {
            if let Some(shared) = weak.upgrade() {
                mark_down(&shared, number, &why);
            }
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let setup = async {
        if let Some((user, password)) = &shared.target.auth {
            let mut auth = Command::new("AUTH");
            if let Some(user) = user {
                auth.arg(user.as_bytes());
            }
            auth.arg(password.as_bytes());
            expect_ok(&pipe, &auth, "AUTH").await?;
        }
        if shared.target.db != 0 {
            let mut select = Command::new("SELECT");
            select.arg(shared.target.db.to_string().as_bytes());
            expect_ok(&pipe, &select, "SELECT").await?;
        }
        scripts::load_all(&pipe).await?;
        let floor = shared.fence_floor.load(Ordering::Relaxed);
        if floor > 0 {
            scripts::raise_floor_on(&pipe, &shared.keys, floor).await?;
        }
        Ok::<(), String>(())
    };
    match setup.await {
        Ok(()) => Ok(pipe),
        Err(e) => {
            pipe.close();
            Err(e)
        }
    }
}

/// Sends `cmd` on a connection not yet handed out; anything but a plain reply is the error.
async fn expect_ok(pipe: &Pipe, cmd: &Command, what: &str) -> Result<Reply, String> {
    match pipe.call(cmd).await {
        Ok(Reply::Error(e)) => Err(format!("{what}: {e}")),
        Ok(reply) => Ok(reply),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_in_the_upper_half() {
        for attempt in 0..40 {
            let full = BACKOFF_BASE
                .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
                .min(BACKOFF_MAX);
            let d = backoff(attempt);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
        assert!(backoff(30) <= BACKOFF_MAX);
        assert!(backoff(30) >= BACKOFF_MAX / 2);
    }

    #[test]
    fn names_live_under_the_prefix() {
        let k = Keys::new("app1:");
        assert_eq!(k.value("session:42"), "app1:v:session:42");
        assert_eq!(k.lock("session:42"), "app1:l:session:42");
        assert_eq!(k.fence("session:42"), "app1:f:session:42");
        assert_eq!(k.waiters("session:42"), "app1:w:session:42");
        assert_eq!(k.newest_fence(), "app1:fence");
        assert_eq!(k.seq(), "app1:seq");
        assert_eq!(k.invalidations(), "app1:inval");
        assert_eq!(k.releases(), "app1:release");
    }
}
