//! `scaled`: a sidecar daemon that lets the app servers on a host share hot session state, coordinate
//! writes to a session, and see how fast they are answered, without handing one user another's response.
//!
//! The map of the house, in the order a request travels:
//!
//! - protocol: [`scaled_client::proto`] and [`scaled_client::frame`] (shared with the client crate)
//!   define frames, envelopes, error codes and the request decoder; `proto-spec.md` says the same
//!   byte for byte.
//! - [`server`]: binds the Unix socket (and optional loopback TCP), accepts connections under a limit,
//!   runs background upkeep, and drains on shutdown.
//! - [`access`]: who may connect (Unix peer credentials, TCP tokens) and what each peer may reach
//!   (key namespaces, admins).
//! - [`connection`]: one client connection; reads frames, decodes requests, writes answers as they finish.
//!   Its entry points need no socket: [`connection::serve`] takes any byte stream, and
//!   [`cmd::dispatch`] plus [`connection::write_answer`] run and answer one request; the fuzz targets
//!   (`client/fuzz/`) drive the daemon through exactly these.
//! - [`context`]: the per-request context (UUID request_id, session_id, user_id, clock, tracing span).
//! - [`cmd`]: one file per command; [`cmd::dispatch`] decides what a request does.
//! - [`store`]: the seam between commands and state: the cache and lock table standalone, a second
//!   tier when Redis is configured. Commands call it and never see the backend.
//! - [`cache`]: the sharded LRU with per-entry TTL. It knows nothing of sockets.
//! - [`locks`]: the lock table: FIFO queues, fencing tokens, leases, release when a connection ends.
//!   It knows a connection only as a number and a cancellation token.
//! - [`meter`]: response times and rates over a sliding 60-second window, and since-start totals.
//! - [`redis`]: the link to a shared Redis (connection, health, Lua scripts, the invalidation stream,
//!   release wake-ups). It knows nothing of the cache or the lock table.
//! - [`daemon`]: the shared state the connections hold.
//! - [`budget`]: daemon-wide budgets of buffer bytes and waiting requests, so per-connection limits
//!   times the connection limit cannot exceed what the host can spare.
//! - [`retire`]: cancels a departing connection's waiting requests a slice at a time.
//! - [`waits`]: a connection's requests that finish later, and their limits.
//! - [`tally`]: what those requests count against (SCALED_MAX_IN_FLIGHT, REDIS_MAX_PENDING), held by
//!   guards the requests own.
//! - [`rlimit`]: raises the open-file limit so the connection limit, not the kernel, turns clients away.
//! - [`heap`]: the C allocator's settings, so a mass release never stalls the serving thread.
//! - [`throttle`]: rate-limited warnings for what a client can cause at will.
//! - [`stats`]: [`daemon::Daemon::stats`], the one builder of every figure, for STATS and `/metrics`.
//! - [`metrics`]: the Prometheus endpoint (`--metrics`), rendering those figures.
//! - [`reqlog`]: each request's log line (debug) and the warnings an operator needs (info).
//! - [`config`]: every setting, as a flag and an environment variable.
//!
//! Running as a service (systemd's `Type=notify`, `systemd/scaled.service`):
//! - [`notify`]: the notification protocol (READY, STATUS, STOPPING, WATCHDOG).
//! - [`service`]: what the daemon tells systemd while it runs, and the watchdog's liveness probe.
//! - [`signals`]: SIGTERM/SIGINT (drain, then exit at once on a second), SIGHUP (reopen, reload).
//! - [`logging`]: where log lines go, and what SIGHUP can change about them.

pub mod access;
pub mod budget;
pub mod cache;
pub mod cmd;
pub mod config;
pub mod connection;
pub mod context;
pub mod daemon;
pub mod heap;
pub mod locks;
pub mod logging;
pub mod meter;
pub mod metrics;
pub mod notify;
pub mod redis;
pub mod reqlog;
pub mod retire;
pub mod rlimit;
pub mod server;
pub mod service;
pub mod signals;
pub mod stats;
pub mod store;
pub mod tally;
pub mod throttle;
pub mod waits;
