//! `handoff`: every connection loops LOCK on one key (`handoff`, 60 s wait) → UNLOCK as soon as
//! granted. It measures the hand-off: from the write of the holder's UNLOCK to the read of the next
//! holder's grant (the write instant is kept in a cell all connections share). It checks from the
//! client side that no two grants are ever outstanding and that fencing tokens strictly increase from
//! grant to grant. `--requests` counts grants; when they are used up (or `--max-seconds` passes) each
//! connection stops after its next grant, so the queue drains.
//!
//! A grant whose LOCK reached the daemon after the previous holder's UNLOCK (it found the lock free;
//! common with two contenders) is reported apart from the hand-offs from the queue.
//! `--wait-for-queue` makes each holder wait, before its UNLOCK and outside the measured interval,
//! until every other contender's LOCK is written and a PING round trip has passed, so that every grant
//! comes from the queue. Redis has no lock queue, so there is no RESP counterpart.
//!
//! With `--also-socket`, the contenders are spread over several daemons sharing one Redis, and a
//! grant on another daemon than the one whose UNLOCK preceded it is a hand-off across hosts,
//! reported apart (`across`): the release in Redis, its message to the other daemon, and that
//! daemon's acquire, all inside the measured interval.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hdrhistogram::Histogram;
use serde_json::json;
use tokio::task::JoinSet;

use scaled_client::proto::{Args, CommandName};

use super::locks::{lock_template, unlock_template};
use crate::net::{Conn, Endpoint};
use crate::opts::HandoffOpts;
use crate::report::{histogram, join_all, record, Counters, Latency, Outcome, Progress, Span};
use crate::wire::{answer_to, check, read_grant, read_unlock_status, request, Expect, Template};

/// How long a LOCK may wait in the queue.
const HANDOFF_WAIT_MS: u64 = 60_000;

/// The one key the connections contend for.
const HANDOFF_KEY: &str = "handoff";

/// Runs the workload.
pub async fn run(opts: HandoffOpts) -> Result<Outcome, String> {
    let endpoints: Vec<Endpoint> = std::iter::once(Endpoint::of(&opts.target))
        .chain(opts.also_socket.iter().cloned().map(Endpoint::Unix))
        .collect();
    let daemons = endpoints.len() as u64;
    let mut conns = Vec::with_capacity(opts.connections as usize);
    for i in 0..opts.connections {
        conns.push(Conn::open(&endpoints[(i % daemons) as usize], false).await?);
    }
    let remaining = Arc::new(AtomicI64::new(opts.requests as i64));
    let shared = Arc::new(Shared {
        floor: Mutex::new(Floor {
            active: opts.connections,
            ..Floor::default()
        }),
        changed: tokio::sync::Notify::new(),
        counters: Arc::new(Counters::default()),
    });
    let _progress = Progress::start("grants", opts.requests, shared.counters.clone());
    let span = Span::start(opts.target.max_seconds);
    let mut set = JoinSet::new();
    for (index, conn) in conns.into_iter().enumerate() {
        set.spawn(handoff_connection(
            conn,
            index as u64,
            index as u64 % daemons,
            shared.clone(),
            remaining.clone(),
            span.deadline,
            opts.wait_for_queue,
        ));
    }
    let tallies = join_all(set, span.deadline).await?;
    let (secs, cpu) = span.finish();

    let (mut queued, mut free, mut across) = (histogram(), histogram(), histogram());
    let (mut grants, mut errors, mut first_error) = (0u64, 0u64, None);
    for tally in tallies {
        grants += tally.grants;
        errors += tally.errors;
        first_error = first_error.or(tally.first_error);
        let _ = queued.add(&tally.queued_ns);
        let _ = free.add(&tally.free_ns);
        let _ = across.add(&tally.across_ns);
    }
    let gps = grants as f64 / secs;
    let (handoff, free_latency) = (Latency::of(&queued), Latency::of(&free));
    let across_latency = (daemons > 1).then(|| Latency::of(&across));
    let json = json!({
        "workload": "handoff",
        "protocol": "scaled",
        "connections": opts.connections,
        "daemons": daemons,
        "wait_for_queue": opts.wait_for_queue,
        "threads": opts.target.threads,
        "grants": grants,
        "seconds": secs,
        "grants_per_s": gps.round(),
        "handoffs": queued.len(),
        "handoff": handoff,
        "free_grants": free.len(),
        "free": free_latency,
        "across_daemons": across.len(),
        "across": across_latency,
        "errors": errors,
        "first_error": first_error,
        "client_cpu_us_per_grant": cpu.map(|c| c * 1e6 / grants.max(1) as f64),
    });
    let mut text = format!(
        "HANDOFF: {grants} grants, {} connections contending for one key, {} thread(s){}\n",
        opts.connections,
        opts.target.threads,
        if opts.wait_for_queue {
            ", each UNLOCK after the other contenders' LOCKs are written"
        } else {
            ""
        },
    );
    text += &format!("  {secs:.3} s, {gps:.0} grants/second, {errors} errors\n");
    if let Some(cpu) = cpu {
        text += &format!(
            "  load generator CPU {cpu:.2} s ({:.2} us/grant)\n",
            cpu * 1e6 / grants.max(1) as f64
        );
    }
    text += &format!(
        "  hand-off ms (UNLOCK written -> next grant read), {} queued grants: p50 {:.3}, p99 {:.3}, max {:.3}\n",
        queued.len(),
        handoff.p50_ms,
        handoff.p99_ms,
        handoff.max_ms,
    );
    if !free.is_empty() {
        text += &format!(
            "  {} grants found the lock free (their LOCK came after the UNLOCK): release -> grant ms p50 {:.3}, p99 {:.3}\n",
            free.len(),
            free_latency.p50_ms,
            free_latency.p99_ms,
        );
    }
    if let Some(across_latency) = &across_latency {
        text += &format!(
            "  {} hand-offs from one daemon to another of {daemons} (release on one -> grant on the next) ms: p50 {:.3}, p99 {:.3}, max {:.3}\n",
            across.len(),
            across_latency.p50_ms,
            across_latency.p99_ms,
            across_latency.max_ms,
        );
    }
    if let Some(e) = &first_error {
        text += &format!("  first error: {e}\n");
    }
    Ok(Outcome {
        passed: errors == 0 && grants >= opts.requests,
        json,
        text,
    })
}

/// What the contenders share. The client runs on one thread by default, so the mutex is never
/// contended; it keeps the checks right with `--threads` too.
#[derive(Default)]
struct Floor {
    /// The connection holding the lock, as far as the client has seen.
    holder: Option<u64>,
    /// The newest fencing token granted.
    last_fence: u64,
    /// The release not yet followed by a grant: its number and when its UNLOCK was written.
    released: Option<(u64, Instant)>,
    /// The daemon of the last release's connection.
    released_on: u64,
    /// Releases so far.
    releases: u64,
    /// LOCKs written whose grant has not been read yet.
    lock_pending: u64,
    /// Contenders still running.
    active: u64,
}

/// The contenders' shared state, and a signal for `--wait-for-queue` when it changes.
struct Shared {
    /// Who holds the lock, as the client has seen it.
    floor: Mutex<Floor>,
    /// Woken when a LOCK is written or a contender leaves.
    changed: tokio::sync::Notify,
    /// For the progress line.
    counters: Arc<Counters>,
}

impl Shared {
    fn floor(&self) -> std::sync::MutexGuard<'_, Floor> {
        self.floor
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until every other running contender has a LOCK written.
    async fn queue_filled(&self) {
        loop {
            let changed = self.changed.notified();
            {
                let f = self.floor();
                if f.lock_pending + 1 >= f.active {
                    return;
                }
            }
            changed.await;
        }
    }
}

/// Counts a contender out when its loop ends, however it ends.
struct Contender<'a>(&'a Shared);

impl Drop for Contender<'_> {
    fn drop(&mut self) {
        self.0.floor().active -= 1;
        self.0.changed.notify_waiters();
    }
}

/// What one contender measured.
struct HandoffTally {
    /// Grants read.
    grants: u64,
    /// Failures, including violations of mutual exclusion or of fencing order.
    errors: u64,
    /// The first failure, to show.
    first_error: Option<String>,
    /// UNLOCK written → next grant read, for grants that waited in the queue: the hand-off proper.
    queued_ns: Histogram<u64>,
    /// The same, for grants of a lock already free when their LOCK arrived (the previous holder's
    /// UNLOCK was handled first).
    free_ns: Histogram<u64>,
    /// UNLOCK written on one daemon → grant read on another, however the grant came; these are
    /// not in the two above.
    across_ns: Histogram<u64>,
}

impl HandoffTally {
    fn fail(&mut self, error: String) {
        self.errors += 1;
        self.first_error.get_or_insert(error);
    }
}

/// One contender's loop: LOCK the one key (waiting in the queue), UNLOCK as soon as granted.
async fn handoff_connection(
    mut conn: Conn,
    index: u64,
    daemon: u64,
    shared: Arc<Shared>,
    remaining: Arc<AtomicI64>,
    deadline: Instant,
    wait_for_queue: bool,
) -> HandoffTally {
    let mut tally = HandoffTally {
        grants: 0,
        errors: 0,
        first_error: None,
        queued_ns: histogram(),
        free_ns: histogram(),
        across_ns: histogram(),
    };
    let lock = lock_template(HANDOFF_KEY, Some(HANDOFF_WAIT_MS));
    let unlock = unlock_template(HANDOFF_KEY);
    let ping = Template::new(request(CommandName::Ping, Args::default()));
    let _counted = Contender(&shared);
    let mut id = 1u64;
    loop {
        id += 1;
        lock.push(&mut conn.out, id);
        if let Err(e) = conn.flush().await {
            tally.fail(e);
            return tally;
        }
        shared.floor().lock_pending += 1;
        if wait_for_queue {
            shared.changed.notify_waiters();
        }
        let body = match conn.next_frame().await {
            Ok(body) => body,
            Err(e) => {
                tally.fail(e);
                return tally;
            }
        };
        let read_at = Instant::now();
        let grant = match answer_to(&body, id).and_then(read_grant) {
            Ok(grant) => grant,
            Err(e) => {
                tally.fail(format!("LOCK: {e}"));
                return tally;
            }
        };
        {
            let mut f = shared.floor();
            f.lock_pending -= 1;
            if let Some(other) = f.holder {
                tally.fail(format!(
                    "connection {index} granted while connection {other} still holds the lock"
                ));
            }
            if grant.fence <= f.last_fence {
                tally.fail(format!(
                    "fencing token {} granted after {}",
                    grant.fence, f.last_fence
                ));
            }
            f.last_fence = f.last_fence.max(grant.fence);
            f.holder = Some(index);
            if let Some((_, at)) = f.released.take() {
                let took = read_at.saturating_duration_since(at);
                if f.released_on != daemon {
                    record(&mut tally.across_ns, took);
                } else if grant.waited_us > 0 {
                    record(&mut tally.queued_ns, took);
                } else {
                    record(&mut tally.free_ns, took);
                }
            }
        }
        tally.grants += 1;
        shared.counters.done.fetch_add(1, Ordering::Relaxed);
        // Once the grants are used up, each contender stops after its next grant, so the queue drains.
        let more = remaining.fetch_sub(1, Ordering::Relaxed) > 1 && read_at < deadline;
        if wait_for_queue {
            // Every other contender's LOCK is written; a PING round trip then lets the daemon read
            // them before this UNLOCK, so they are queued when it arrives.
            shared.queue_filled().await;
            id += 1;
            ping.push(&mut conn.out, id);
            let answered = match conn.flush().await {
                Ok(()) => conn.next_frame().await,
                Err(e) => Err(e),
            };
            if let Err(e) = answered.and_then(|body| check(&body, id, Expect::Text("PONG"))) {
                tally.fail(format!("PING: {e}"));
                return tally;
            }
        }

        id += 1;
        unlock.push_token(&mut conn.out, id, &grant.token);
        // Not the holder any more from the moment the UNLOCK may reach the daemon.
        let release = {
            let mut f = shared.floor();
            f.holder = None;
            f.releases += 1;
            let n = f.releases;
            f.released = Some((n, Instant::now()));
            f.released_on = daemon;
            n
        };
        let written = conn.flush().await;
        {
            // The instant the UNLOCK was written, unless its grant was already read (the write had to
            // wait), in which case the instant before the write stood.
            let mut f = shared.floor();
            if let Some((n, at)) = f.released.as_mut() {
                if *n == release {
                    *at = Instant::now();
                }
            }
        }
        if let Err(e) = written {
            tally.fail(e);
            return tally;
        }
        let released = match conn.next_frame().await {
            Ok(body) => answer_to(&body, id).and_then(read_unlock_status),
            Err(e) => Err(e),
        };
        if let Err(e) = released {
            tally.fail(format!("UNLOCK: {e}"));
            return tally;
        }
        if !more {
            return tally;
        }
    }
}
