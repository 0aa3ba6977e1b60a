//! `session`: the original architecture's `process_message`, as its load test runs it, and checked.
//!
//! Each of `--users N` users sends `--messages M` messages on session `u mod K` (`--sessions K`;
//! fewer sessions than users make users contend). A message is LOCK the session, GET its state,
//! change it, SET it (fenced with the grant's token), UNLOCK. Users are spread over `--connections`
//! connections, with all their requests in flight together. Closed loop by default (each user's next
//! message right after its last, or after `--think-ms`); with `--rate R` the messages come due on a
//! fixed schedule of R per second whatever the answers, and latency counts from each message's
//! scheduled start, so a slow answer cannot hide the messages it held up (coordinated omission).
//!
//! It checks what it measures. Each session's state carries a counter and, per user, the messages
//! applied ([`state::SessionState`]). Under the lock every GET must see the newest acknowledged
//! write; at the end every session must hold exactly the messages its users had acknowledged, and
//! only its own users' ids; every answer must carry the id of a request in flight and a request_id
//! no other answer had. Any lost update, foreign value, mixed answer or error fails the run.
//! `--no-lock` skips LOCK and UNLOCK, to show that the checks catch the lost updates that follow.

mod driver;
mod state;
mod verify;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::net::{Conn, Endpoint};
use crate::opts::SessionOpts;
use crate::report::{
    histogram, join_all, round3, thousands, Counters, Latency, Outcome, Progress, Span,
};
use crate::stats::Snapshot;

pub use state::SessionState;

/// Requests in one message: LOCK, GET, SET, UNLOCK (GET and SET alone with `--no-lock`).
const REQUESTS_PER_MESSAGE: u64 = 4;

/// What every connection of a run shares and never changes.
pub struct Plan {
    /// Keys of this run start with it, so runs against the same daemon never see each other's state.
    prefix: String,
    /// Users in all.
    users: u64,
    /// Messages per user.
    messages: u64,
    /// Sessions the users share.
    sessions: u64,
    /// Closed loop: pause between a user's messages.
    think: Option<Duration>,
    /// Open loop: messages per second offered.
    rate: Option<f64>,
    /// Padding bytes in each state.
    state_bytes: usize,
    /// Skip LOCK and UNLOCK.
    no_lock: bool,
    /// LOCK's `wait_ms`.
    lock_wait_ms: u64,
    /// LOCK's `ttl_ms`.
    lock_ttl_ms: u64,
    /// No message starts after this.
    deadline: Instant,
    /// `session_id` of each session, for the requests' envelopes (the daemon's logs).
    session_ids: Vec<String>,
}

impl Plan {
    /// The cache key (and lock key) of session `s`.
    fn key(&self, s: u64) -> String {
        format!("{}:session:{s}", self.prefix)
    }

    fn open_loop(&self) -> bool {
        self.rate.is_some()
    }

    /// A state read for `session` must be that session's, and name only that session's users.
    fn check_state(&self, state: &SessionState, session: u64) -> Result<(), String> {
        if state.session != session {
            return Err(format!(
                "state of session {} where session {session} was asked for",
                state.session
            ));
        }
        if let Some((user, _)) = state
            .users
            .iter()
            .find(|(u, _)| *u >= self.users || u % self.sessions != session)
        {
            return Err(format!(
                "session {session} holds user {user}, who is not one of its users"
            ));
        }
        let sum: u64 = state.users.iter().map(|(_, n)| n).sum();
        if sum != state.counter {
            return Err(format!(
                "session {session}'s counter {} is not the sum of its users' counts {sum}",
                state.counter
            ));
        }
        Ok(())
    }
}

/// What the connections share and change.
pub struct Shared {
    /// Per session, the counter of the newest acknowledged SET: under the lock, a GET must see it.
    newest: Vec<AtomicU64>,
    /// For the progress line.
    counters: Arc<Counters>,
}

/// Runs the workload.
pub async fn run(opts: SessionOpts) -> Result<Outcome, String> {
    let sessions = if opts.sessions == 0 {
        opts.users
    } else {
        opts.sessions
    };
    if sessions > opts.users {
        return Err(format!(
            "--sessions {sessions} is more than --users {}: some sessions would have no user",
            opts.users
        ));
    }
    if let Some(rate) = opts.rate {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(format!("--rate {rate} must be a positive number"));
        }
    }
    if !(opts.think_ms.is_finite() && opts.think_ms >= 0.0) {
        return Err(format!("--think-ms {} must be 0 or more", opts.think_ms));
    }
    let endpoints: Vec<Endpoint> = std::iter::once(Endpoint::of(&opts.target))
        .chain(opts.also_socket.iter().cloned().map(Endpoint::Unix))
        .collect();
    let daemons = endpoints.len() as u64;
    // Every daemon gets the same number of connections.
    let connections = (opts.connections.min(opts.users) / daemons).max(1) * daemons;
    let placement = place(opts.users, sessions, connections, daemons);
    if placement
        .iter()
        .any(|users| users.len() as u64 > driver::MAX_USERS_PER_CONN)
    {
        return Err(format!(
            "more than {} users per connection; use more connections",
            driver::MAX_USERS_PER_CONN
        ));
    }
    let before = Snapshot::fetch_all(&endpoints).await?;
    let mut conns = Vec::with_capacity(connections as usize);
    for c in 0..connections {
        conns.push(Conn::open(&endpoints[(c % daemons) as usize], false).await?);
    }

    let total = opts.users * opts.messages;
    let counters = Arc::new(Counters::default());
    let shared = Arc::new(Shared {
        newest: (0..sessions).map(|_| AtomicU64::new(0)).collect(),
        counters: counters.clone(),
    });
    let _progress = Progress::start("messages", total, counters);
    let span = Span::start(opts.target.max_seconds);
    let plan = Arc::new(Plan {
        prefix: format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        users: opts.users,
        messages: opts.messages,
        sessions,
        think: driver::think_time(opts.think_ms),
        rate: opts.rate,
        state_bytes: opts.state_bytes as usize,
        no_lock: opts.no_lock,
        lock_wait_ms: opts.lock_wait_ms,
        lock_ttl_ms: opts.lock_ttl_ms,
        deadline: span.deadline,
        session_ids: (0..sessions).map(|s| format!("user_{s}")).collect(),
    });

    // Open loop: one thread keeps the schedule, with a finer clock than the runtime's timers.
    let mut schedules = Vec::new();
    let mut receivers: Vec<Option<_>> = (0..connections).map(|_| None).collect();
    if opts.rate.is_some() {
        for receiver in receivers.iter_mut() {
            let (tx, rx) = mpsc::unbounded_channel();
            schedules.push(tx);
            *receiver = Some(rx);
        }
    }
    let mut set = JoinSet::new();
    // Where the pacer sends each user's messages: its connection and its slot there.
    let mut route = vec![(0, 0); opts.users as usize];
    for (c, users) in placement.iter().enumerate() {
        for (slot, &user) in users.iter().enumerate() {
            route[user as usize] = (c, slot);
        }
    }
    for ((conn, due), user_ids) in conns.into_iter().zip(receivers).zip(placement) {
        set.spawn(driver::drive(
            conn,
            user_ids,
            plan.clone(),
            shared.clone(),
            due,
        ));
    }
    let pacer = opts
        .rate
        .map(|rate| spawn_pacer(rate, span.started(), plan.clone(), route, schedules));
    let reports = join_all(set, span.deadline).await?;
    let (secs, cpu) = span.finish();
    if let Some(pacer) = pacer {
        let _ = pacer.join();
    }
    let after = Snapshot::fetch_all(&endpoints).await?;

    // Add up the connections.
    let mut sum = Sum::default();
    let mut committed = vec![0u64; opts.users as usize];
    let mut request_ids = Vec::new();
    for report in reports {
        sum.add(&report);
        for (user, n) in report.committed {
            committed[user as usize] = n;
        }
        request_ids.extend(report.request_ids);
        let _ = sum.message_ns.add(&report.message_ns);
        let _ = sum.request_ns.add(&report.request_ns);
        let _ = sum.start_lag_ns.add(&report.start_lag_ns);
    }
    request_ids.sort_unstable();
    let repeated_ids = request_ids.windows(2).filter(|w| w[0] == w[1]).count() as u64;
    if repeated_ids > 0 {
        sum.first_error.get_or_insert(format!(
            "{repeated_ids} answers repeated another's request_id"
        ));
    }
    let missing_ids = sum.requests.saturating_sub(request_ids.len() as u64);
    let verdict = verify_all(&endpoints, &plan, &committed).await?;

    let mixed = sum.mixed + verdict.foreign + repeated_ids + missing_ids;
    let first_problem = sum.first_error.clone().or(verdict.first_problem.clone());
    let passed = verdict.lost_updates == 0
        && verdict.extra_updates == 0
        && mixed == 0
        && sum.errors == 0
        && (opts.no_lock || sum.stale_reads == 0);
    let figures = Figures {
        opts: &opts,
        sessions,
        connections,
        daemons,
        secs,
        cpu,
        sum: &sum,
        hit_rate: before.hit_rate(&after),
        contention: if opts.no_lock {
            None
        } else {
            before.contention(&after)
        },
        lost_updates: verdict.lost_updates,
        extra_updates: verdict.extra_updates,
        mixed,
        first_problem,
        passed,
    };
    Ok(Outcome {
        passed,
        json: figures.json(),
        text: figures.table(),
    })
}

/// Which users each connection carries, in slot order. Connection `c` goes to daemon `c mod D`.
/// User `u` works on session `u mod K`; it goes to daemon `(u / K + u mod K) mod D`: the users who
/// share a session go to consecutive daemons, and so do the sessions of users who share none. Within
/// its daemon a user goes to the next connection in turn. With one daemon this is user `u` on
/// connection `u mod C`, at slot `u / C`.
fn place(users: u64, sessions: u64, connections: u64, daemons: u64) -> Vec<Vec<u64>> {
    let per_daemon = connections / daemons;
    let mut placed = vec![Vec::new(); connections as usize];
    let mut seen = vec![0u64; daemons as usize];
    for u in 0..users {
        let d = (u / sessions + u % sessions) % daemons;
        let k = seen[d as usize];
        seen[d as usize] += 1;
        placed[(d + daemons * (k % per_daemon)) as usize].push(u);
    }
    placed
}

/// The end-of-run check on every daemon. With one daemon the states are read with plain GETs; with
/// more, each daemon reads every session under its lock, and a lost update on any daemon counts.
async fn verify_all(
    endpoints: &[Endpoint],
    plan: &Plan,
    committed: &[u64],
) -> Result<verify::Verdict, String> {
    let read = if endpoints.len() > 1 {
        verify::Read::Locked
    } else {
        verify::Read::Plain
    };
    let mut all = verify::Verdict::default();
    for (d, endpoint) in endpoints.iter().enumerate() {
        let verdict = verify::verify(endpoint, plan, committed, read).await?;
        all.lost_updates = all.lost_updates.max(verdict.lost_updates);
        all.extra_updates = all.extra_updates.max(verdict.extra_updates);
        all.foreign = all.foreign.max(verdict.foreign);
        if let Some(problem) = verdict.first_problem {
            all.first_problem
                .get_or_insert(format!("read back on daemon {d}: {problem}"));
        }
    }
    Ok(all)
}

/// Runs the open-loop schedule on its own thread: message k (of user k mod N) comes due at
/// start + k / rate, and goes to its user's connection (`route`: per user, its connection and
/// slot). The thread sleeps with the operating system's clock, which is finer than the runtime's
/// millisecond timers.
fn spawn_pacer(
    rate: f64,
    start: Instant,
    plan: Arc<Plan>,
    route: Vec<(usize, usize)>,
    schedules: Vec<mpsc::UnboundedSender<(usize, Instant)>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for k in 0..plan.users * plan.messages {
            let due = start + Duration::from_secs_f64(k as f64 / rate);
            if due >= plan.deadline {
                break;
            }
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let (conn, slot) = route[(k % plan.users) as usize];
            // A connection that has failed no longer listens; its failure is already counted.
            let _ = schedules[conn].send((slot, due));
        }
    })
}

/// The connections' reports, added up.
/// The fields are those of [`driver::ConnReport`], summed.
struct Sum {
    /// Messages started.
    messages: u64,
    /// Messages whose every step succeeded.
    successful: u64,
    /// Requests answered.
    requests: u64,
    /// Requests answered with an error, or lost with a connection.
    errors: u64,
    /// Answers matching no request in flight, and foreign values read during the run.
    mixed: u64,
    /// GETs under the lock that missed the newest acknowledged write.
    stale_reads: u64,
    /// LOCKs that waited in a queue.
    lock_waits: u64,
    /// The first problem any connection saw.
    first_error: Option<String>,
    /// Per message, from its scheduled start to its last answer.
    message_ns: hdrhistogram::Histogram<u64>,
    /// Per request, from its write to its answer.
    request_ns: hdrhistogram::Histogram<u64>,
    /// Open loop: scheduled start to first write.
    start_lag_ns: hdrhistogram::Histogram<u64>,
}

impl Default for Sum {
    fn default() -> Sum {
        Sum {
            messages: 0,
            successful: 0,
            requests: 0,
            errors: 0,
            mixed: 0,
            stale_reads: 0,
            lock_waits: 0,
            first_error: None,
            message_ns: histogram(),
            request_ns: histogram(),
            start_lag_ns: histogram(),
        }
    }
}

impl Sum {
    fn add(&mut self, report: &driver::ConnReport) {
        self.messages += report.messages;
        self.successful += report.successful;
        self.requests += report.requests;
        self.errors += report.errors;
        self.mixed += report.mixed;
        self.stale_reads += report.stale_reads;
        self.lock_waits += report.lock_waits;
        if self.first_error.is_none() {
            self.first_error.clone_from(&report.first_error);
        }
    }
}

/// Every figure of a run, for the JSON and the table.
struct Figures<'a> {
    /// The options the run was given.
    opts: &'a SessionOpts,
    /// Sessions in use (the users when `--sessions` is 0).
    sessions: u64,
    /// Connections in use (never more than the users), spread evenly over the daemons.
    connections: u64,
    /// Daemons the users were spread over.
    daemons: u64,
    /// Wall-clock length of the run.
    secs: f64,
    /// The generator's CPU seconds, when /proc tells.
    cpu: Option<f64>,
    /// The connections' reports, added up.
    sum: &'a Sum,
    /// Cache hits over GETs, from STATS before and after.
    hit_rate: Option<f64>,
    /// LOCKs that found the lock held over all LOCKs, from STATS before and after.
    contention: Option<f64>,
    /// Acknowledged messages missing from the final states.
    lost_updates: u64,
    /// Messages in the final states beyond what their users had acknowledged.
    extra_updates: u64,
    /// Mixed answers, foreign values and repeated or missing request ids, all told.
    mixed: u64,
    /// The first problem, to show.
    first_problem: Option<String>,
    /// Whether every check passed.
    passed: bool,
}

impl Figures<'_> {
    fn success_rate(&self) -> f64 {
        if self.sum.messages == 0 {
            return 0.0;
        }
        self.sum.successful as f64 / self.sum.messages as f64
    }

    fn json(&self) -> serde_json::Value {
        let message = Latency::of(&self.sum.message_ns);
        let o = self.opts;
        json!({
            "workload": "session",
            "users": o.users,
            "messages": o.messages,
            "sessions": self.sessions,
            "connections": self.connections,
            "daemons": self.daemons,
            "think_ms": o.think_ms,
            "rate": o.rate,
            "no_lock": o.no_lock,
            "state_bytes": o.state_bytes,
            "threads": o.target.threads,
            "total_messages": self.sum.messages,
            "successful_messages": self.sum.successful,
            "total_requests": self.sum.requests,
            "elapsed_s": round3(self.secs),
            "messages_per_s": (self.sum.successful as f64 / self.secs * 10.0).round() / 10.0,
            "requests_per_s": (self.sum.requests as f64 / self.secs).round(),
            "avg_ms": message.avg_ms,
            "p50_ms": message.p50_ms,
            "p95_ms": message.p95_ms,
            "p99_ms": message.p99_ms,
            "max_ms": message.max_ms,
            "request": Latency::of(&self.sum.request_ns),
            "start_lag": o.rate.map(|_| Latency::of(&self.sum.start_lag_ns)),
            "success_rate": self.success_rate(),
            "cache_hit_rate": self.hit_rate,
            "lock_contention": self.contention,
            "lock_waits": self.sum.lock_waits,
            "lost_updates": self.lost_updates,
            "extra_updates": self.extra_updates,
            "mixed_responses": self.mixed,
            "stale_reads": self.sum.stale_reads,
            "errors": self.sum.errors,
            "first_error": self.first_problem,
            "client_cpu_s": self.cpu,
            "passed": self.passed,
        })
    }

    /// The table, in the shape of the original's "Load Test Results".
    fn table(&self) -> String {
        let o = self.opts;
        let (message, request) = (
            Latency::of(&self.sum.message_ns),
            Latency::of(&self.sum.request_ns),
        );
        let pct = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{:.2}%", 100.0 * x));
        let load = match o.rate {
            Some(rate) => format!("offered {rate} messages/s (open loop)"),
            None if o.think_ms > 0.0 => format!("closed loop, {} ms think time", o.think_ms),
            None => "closed loop, no think time".to_string(),
        };
        let mut t = format!(
            "# {} concurrent users × {} messages, {} sessions, {} connections{}, {load}{}\n",
            o.users,
            o.messages,
            self.sessions,
            self.connections,
            if self.daemons > 1 {
                format!(" over {} daemons", self.daemons)
            } else {
                String::new()
            },
            if o.no_lock { ", NO LOCK" } else { "" },
        );
        t += &format!(
            "Total Requests:       {}  ({} messages, {} requests each)\n",
            thousands(self.sum.requests),
            thousands(self.sum.messages),
            if o.no_lock { 2 } else { REQUESTS_PER_MESSAGE },
        );
        t += &format!(
            "Success Rate:         {:.2}%\n",
            100.0 * self.success_rate()
        );
        t += &format!(
            "Throughput:           {:.0} messages/s, {:.0} requests/s, over {:.2} s\n",
            self.sum.successful as f64 / self.secs,
            self.sum.requests as f64 / self.secs,
            self.secs
        );
        t += "                      per message   per request\n";
        for (name, m, r) in [
            ("Avg", message.avg_ms, request.avg_ms),
            ("P50", message.p50_ms, request.p50_ms),
            ("P95", message.p95_ms, request.p95_ms),
            ("P99", message.p99_ms, request.p99_ms),
            ("Max", message.max_ms, request.max_ms),
        ] {
            t += &format!("{name} Response Time:    {m:>8.3} ms   {r:>8.3} ms\n");
        }
        if o.rate.is_some() {
            let lag = Latency::of(&self.sum.start_lag_ns);
            t += &format!(
                "Start lag:            p50 {:.3} ms, p99 {:.3} ms (scheduled start to first write; part of the above)\n",
                lag.p50_ms, lag.p99_ms
            );
        }
        t += &format!("Cache Hit Rate:       {}\n", pct(self.hit_rate));
        t += &format!(
            "Lock Contention:      {} ({} LOCKs waited)\n",
            pct(self.contention),
            self.sum.lock_waits
        );
        t += &format!("Lost Updates:         {}\n", self.lost_updates);
        if self.extra_updates > 0 {
            t += &format!("Unacknowledged:       {}\n", self.extra_updates);
        }
        t += &format!("Mixed Responses:      {}\n", self.mixed);
        t += &format!("Stale Reads:          {}\n", self.sum.stale_reads);
        t += &format!("Errors:               {}\n", self.sum.errors);
        if let Some(cpu) = self.cpu {
            t += &format!(
                "Load generator CPU:   {cpu:.2} s ({:.1} µs/message)\n",
                cpu * 1e6 / self.sum.messages.max(1) as f64
            );
        }
        if let Some(e) = &self.first_problem {
            t += &format!("First problem:        {e}\n");
        }
        t += if self.passed {
            "Checks:               passed\n"
        } else {
            "Checks:               FAILED\n"
        };
        t
    }
}
