//! Command-line options: one subcommand per workload, and the options every workload shares.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Load generator for scaled (and, with `--resp`, for Redis as the reference).
#[derive(Parser, Debug)]
#[command(name = "scaled-bench", version)]
pub struct Cli {
    /// The workload to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The workloads.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// The original architecture's load test: users sending messages that each LOCK their session,
    /// GET its state, change it, SET it and UNLOCK; every update is checked at the end.
    Session(SessionOpts),
    /// GET hits on preloaded keys, closed loop, in the manner of redis-benchmark.
    Get(RequestOpts),
    /// SET of fixed-size values, closed loop.
    Set(RequestOpts),
    /// PING, closed loop: the bare round trip.
    Ping(RequestOpts),
    /// Uncontended LOCK+UNLOCK pairs, a key per connection (with --resp: SET NX PX + EVAL).
    Lock(LockOpts),
    /// Every connection contends for one lock; measures the hand-off from UNLOCK to the next grant.
    Handoff(HandoffOpts),
    /// A TCP forwarder that delays every chunk by --delay-us in each direction, to put a server
    /// "across the network" on one machine.
    DelayProxy(ProxyOpts),
}

/// Where the server is, and how to report. Shared by every workload.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// The server's Unix socket (scaled's, or with --resp a Redis server's).
    #[arg(
        long,
        short = 's',
        required_unless_present = "tcp",
        conflicts_with = "tcp"
    )]
    pub socket: Option<PathBuf>,

    /// The server's TCP address, HOST:PORT, instead of a Unix socket.
    #[arg(long)]
    pub tcp: Option<String>,

    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Runtime worker threads of the load generator; 1 runs everything on one thread, as
    /// redis-benchmark does.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub threads: u64,

    /// Stop starting new work after this many seconds.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub max_seconds: u64,
}

/// `session`.
#[derive(Args, Debug, Clone)]
pub struct SessionOpts {
    #[command(flatten)]
    pub target: Target,

    /// Users, each sending its messages one after another.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub users: u64,

    /// Messages each user sends.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub messages: u64,

    /// Sessions the users share; user u works on session u mod K. 0 = one session per user. Fewer
    /// sessions than users make users contend for the same lock.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub sessions: u64,

    /// Connections the users' requests are spread over (user u on connection u mod C): as if C app
    /// server processes each served N/C users over one connection, which is how the client crate is
    /// meant to be used (one connection, any number of callers).
    #[arg(long, short = 'c', default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub connections: u64,

    /// Closed loop: a user's pause between the end of one message and the start of its next.
    #[arg(long, default_value_t = 0.0, conflicts_with = "rate")]
    pub think_ms: f64,

    /// Open loop: messages per second offered in all, on a fixed schedule whatever the answers;
    /// latency counts from each message's scheduled start.
    #[arg(long)]
    pub rate: Option<f64>,

    /// Bytes of padding in each session's state, on top of its counter and user ids (2048 makes
    /// the 2 KiB sessions of the memory target).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub state_bytes: u64,

    /// Skip LOCK and UNLOCK (and write without a fence): shows that the checks catch the lost
    /// updates of unlocked read-modify-write when users contend.
    #[arg(long)]
    pub no_lock: bool,

    /// How long a LOCK may wait in its session's queue, in milliseconds.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    pub lock_wait_ms: u64,

    /// The lease each LOCK asks for, in milliseconds.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    pub lock_ttl_ms: u64,

    /// Another daemon sharing the first one's Redis (its Unix socket); repeat for more. The users
    /// of each session are spread over all the daemons, so every session is written from each of
    /// them, and the end-of-run check reads every session back from each daemon under its lock.
    #[arg(long, value_name = "SOCKET", conflicts_with = "tcp")]
    pub also_socket: Vec<PathBuf>,
}

/// `get`, `set`, `ping`.
#[derive(Args, Debug, Clone)]
pub struct RequestOpts {
    #[command(flatten)]
    pub target: Target,

    /// Connections, each with one request (or one pipeline batch) outstanding at a time.
    #[arg(long, short = 'c', default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub connections: u64,

    /// Requests in total, across all connections.
    #[arg(long, short = 'n', default_value_t = 500_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: u64,

    /// Distinct keys, used round robin (keep it under the daemon's CACHE_SIZE, or GETs miss).
    #[arg(long, short = 'r', default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub keyspace: u64,

    /// Bytes per value for SET and for the preloaded values GET reads.
    #[arg(long, short = 'd', default_value_t = 3, value_parser = clap::value_parser!(u64).range(0..=1_048_576))]
    pub value_size: u64,

    /// Requests written at once per connection before reading their answers.
    #[arg(long, short = 'P', default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub pipeline: u64,

    /// Speak RESP to a Redis server instead, for comparison.
    #[arg(long)]
    pub resp: bool,

    /// GET: the keys are already loaded (by an earlier run with the same keyspace and value size).
    #[arg(long)]
    pub no_preload: bool,
}

/// `lock`.
#[derive(Args, Debug, Clone)]
pub struct LockOpts {
    #[command(flatten)]
    pub target: Target,

    /// Connections, each looping LOCK → UNLOCK on its own key.
    #[arg(long, short = 'c', default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub connections: u64,

    /// LOCK+UNLOCK pairs in total.
    #[arg(long, short = 'n', default_value_t = 300_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: u64,

    /// Speak RESP to a Redis server instead: SET NX PX, then a compare-and-delete EVAL.
    #[arg(long)]
    pub resp: bool,
}

/// `handoff`.
#[derive(Args, Debug, Clone)]
pub struct HandoffOpts {
    #[command(flatten)]
    pub target: Target,

    /// Contenders, one connection each.
    #[arg(long, short = 'c', default_value_t = 50, value_parser = clap::value_parser!(u64).range(2..=10_000))]
    pub connections: u64,

    /// Grants in total.
    #[arg(long, short = 'n', default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: u64,

    /// Before each UNLOCK, wait until every other contender's LOCK has been written and a PING
    /// round trip has passed, so the next grant comes from the queue even with few contenders
    /// (outside the measured interval).
    #[arg(long)]
    pub wait_for_queue: bool,

    /// Another daemon sharing the first one's Redis (its Unix socket); repeat for more. Contender
    /// `i` connects to daemon `i mod D`, and hand-offs from one daemon to another are reported
    /// apart: the release on one host, the grant on the next.
    #[arg(long, value_name = "SOCKET", conflicts_with = "tcp")]
    pub also_socket: Vec<PathBuf>,
}

/// `delay-proxy`.
#[derive(Args, Debug, Clone)]
pub struct ProxyOpts {
    /// Where to accept connections, HOST:PORT.
    #[arg(long)]
    pub listen: String,

    /// Where to forward them, HOST:PORT.
    #[arg(long)]
    pub to: String,

    /// Delay added to every chunk in each direction, in microseconds (250 each way = 0.5 ms round
    /// trip, a typical same-zone figure).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub delay_us: u64,

    /// Most connections forwarded at once; past it a new one is closed at once.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_connections: u64,
}
