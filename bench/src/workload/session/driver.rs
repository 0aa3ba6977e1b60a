//! One connection of the `session` workload: the users it carries, each a small state machine stepping
//! through a message (LOCK → GET → change → SET → UNLOCK), all multiplexed on the connection with
//! their requests in flight together and their answers matched back by id.
//!
//! A request's id names the user it belongs to (`seq << USER_BITS | slot`), and each user has at most
//! one request in flight, so an answer is matched with one comparison: an id that is not the one its
//! user waits for is a mixed response. Every answer's `request_id` is kept for the duplicate check
//! at the end.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::mpsc;

use scaled_client::proto::CommandName;

use super::state::SessionState;
use super::{Plan, Shared};
use crate::net::Conn;
use crate::report::{histogram, record};
use crate::wire::{
    read_bin, read_grant, read_str, read_unlock_status, write_request, Arg, Envelope,
};

/// Bits of a request id that name the user's slot on its connection.
const USER_BITS: u32 = 20;

/// Most users one connection can carry.
pub const MAX_USERS_PER_CONN: u64 = 1 << USER_BITS;

/// Where a user is in its current message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Between messages.
    Idle,
    /// LOCK sent.
    Lock,
    /// GET sent.
    Get,
    /// SET sent.
    Set,
    /// UNLOCK sent.
    Unlock,
}

/// One simulated user.
struct User {
    /// Global user number; written into the session's state.
    id: u64,
    /// The session it works on (user id mod sessions).
    session: u64,
    /// `user_id` in the requests' envelopes, for the daemon's logs.
    id_text: String,
    /// The session's cache key, which is also its lock key.
    key: String,
    /// Where the current message is.
    step: Step,
    /// The id of the request in flight, 0 when none.
    in_flight: u64,
    /// When the request in flight was written.
    sent_at: Instant,
    /// When the current message was due to start: latency counts from here.
    scheduled: Instant,
    /// Open loop: messages that came due while the user was busy, with their scheduled starts.
    backlog: VecDeque<Instant>,
    /// The current message's grant: owner token and fencing token.
    grant: Option<([u8; 36], u64)>,
    /// The counter the current message's SET writes, stored as the session's newest once acknowledged.
    writing: u64,
    /// Whether a step of the current message failed.
    failed: bool,
    /// Messages finished (in any way).
    finished: u64,
}

/// What one connection measured and saw.
pub struct ConnReport {
    /// Messages started.
    pub messages: u64,
    /// Messages whose every step succeeded.
    pub successful: u64,
    /// Requests answered.
    pub requests: u64,
    /// Per message, from its scheduled start to its last answer.
    pub message_ns: Histogram<u64>,
    /// Per request, from its write to its answer.
    pub request_ns: Histogram<u64>,
    /// Open loop: from a message's scheduled start to its first request's write.
    pub start_lag_ns: Histogram<u64>,
    /// Requests answered with an error, or lost with the connection.
    pub errors: u64,
    /// Answers matching no request in flight, and GETs answering another session's state.
    pub mixed: u64,
    /// GETs under the lock that did not see the session's newest acknowledged write.
    pub stale_reads: u64,
    /// LOCKs that waited in their queue.
    pub lock_waits: u64,
    /// The first problem, to show.
    pub first_error: Option<String>,
    /// Per user id, the messages whose SET was acknowledged.
    pub committed: Vec<(u64, u64)>,
    /// Every answer's request_id, for the duplicate check.
    pub request_ids: Vec<u128>,
}

impl ConnReport {
    fn new() -> ConnReport {
        ConnReport {
            messages: 0,
            successful: 0,
            requests: 0,
            message_ns: histogram(),
            request_ns: histogram(),
            start_lag_ns: histogram(),
            errors: 0,
            mixed: 0,
            stale_reads: 0,
            lock_waits: 0,
            first_error: None,
            committed: Vec::new(),
            request_ids: Vec::new(),
        }
    }

    fn problem(&mut self, what: String) {
        self.first_error.get_or_insert(what);
    }
}

/// Runs one connection's users to the end and reports.
pub async fn drive(
    conn: Conn,
    user_ids: Vec<u64>,
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    due: Option<mpsc::UnboundedReceiver<(usize, Instant)>>,
) -> ConnReport {
    let now = Instant::now();
    let users = user_ids
        .into_iter()
        .map(|id| User {
            id,
            session: id % plan.sessions,
            id_text: format!("user_{id}"),
            key: plan.key(id % plan.sessions),
            step: Step::Idle,
            in_flight: 0,
            sent_at: now,
            scheduled: now,
            backlog: VecDeque::new(),
            grant: None,
            writing: 0,
            failed: false,
            finished: 0,
        })
        .collect::<Vec<_>>();
    let mut driver = Driver {
        outstanding: if due.is_some() {
            0
        } else {
            users.len() as u64 * plan.messages
        },
        conn,
        plan,
        shared,
        users,
        seq: 0,
        timers: BinaryHeap::new(),
        report: ConnReport::new(),
        scratch: Vec::new(),
    };
    driver.report.committed = driver.users.iter().map(|u| (u.id, 0)).collect();
    let result = driver.run(due).await;
    let mut report = driver.report;
    if let Err(e) = result {
        // The requests in flight are lost with the connection (the messages not yet begun are
        // simply never sent: they are not counted as started).
        let in_flight = driver.users.iter().filter(|u| u.in_flight != 0).count() as u64;
        report.errors += in_flight.max(1);
        report.problem(e);
    }
    report
}

/// The connection, its users and what they measured.
struct Driver {
    /// The connection all these users share.
    conn: Conn,
    /// The run's settings.
    plan: Arc<Plan>,
    /// What all connections see: each session's newest acknowledged write, the progress counters.
    shared: Arc<Shared>,
    /// The users on this connection; a user's index here is its slot in request ids.
    users: Vec<User>,
    /// Counts requests written, for their ids.
    seq: u64,
    /// Closed loop with think time: when each thinking user starts its next message.
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Messages given to this connection and not finished yet.
    outstanding: u64,
    /// What this connection measured and saw.
    report: ConnReport,
    /// The state being written, reused from message to message.
    scratch: Vec<u8>,
}

impl Driver {
    async fn run(
        &mut self,
        mut due: Option<mpsc::UnboundedReceiver<(usize, Instant)>>,
    ) -> Result<(), String> {
        if due.is_none() {
            let now = Instant::now();
            for slot in 0..self.users.len() {
                self.start(slot, now, now);
            }
        }
        loop {
            let now = Instant::now();
            while let Some(&Reverse((at, slot))) = self.timers.peek() {
                if at > now {
                    break;
                }
                self.timers.pop();
                self.start(slot, at, now);
            }
            if !self.conn.out.is_empty() {
                self.conn.flush().await?;
            }
            if self.outstanding == 0 && due.is_none() {
                return Ok(());
            }
            let wake = self.timers.peek().map(|r| r.0 .0);
            tokio::select! {
                read = self.conn.read_more() => {
                    read?;
                    while let Some(body) = self.conn.take()? {
                        self.answer(&body)?;
                    }
                }
                message = recv(&mut due) => match message {
                    Some((slot, scheduled)) => {
                        self.outstanding += 1;
                        self.begin_due(slot, scheduled);
                    }
                    // The schedule is over: finish what is in flight.
                    None => due = None,
                },
                _ = sleep_until(wake), if wake.is_some() => {}
            }
        }
    }

    /// Open loop: a message of this user comes due now; it starts at once unless the user is busy.
    fn begin_due(&mut self, slot: usize, scheduled: Instant) {
        let user = &mut self.users[slot];
        if user.step == Step::Idle && user.backlog.is_empty() {
            self.start(slot, scheduled, Instant::now());
        } else {
            user.backlog.push_back(scheduled);
        }
    }

    /// Starts a message of user `slot`, due at `scheduled`.
    fn start(&mut self, slot: usize, scheduled: Instant, now: Instant) {
        if now >= self.plan.deadline {
            // Past the run's time limit: this message is not sent, and in a closed loop neither is
            // any later one of this user, so all of them leave the count.
            let user = &mut self.users[slot];
            let unsent = if self.plan.open_loop() {
                1
            } else {
                self.plan.messages.saturating_sub(user.finished).max(1)
            };
            user.finished += unsent;
            self.outstanding = self.outstanding.saturating_sub(unsent);
            return;
        }
        self.report.messages += 1;
        if self.plan.open_loop() {
            record(
                &mut self.report.start_lag_ns,
                now.saturating_duration_since(scheduled),
            );
        }
        let user = &mut self.users[slot];
        user.scheduled = scheduled;
        user.failed = false;
        user.grant = None;
        if self.plan.no_lock {
            self.send_get(slot);
        } else {
            self.send(slot, Step::Lock, CommandName::Lock);
        }
    }

    /// Writes the request for `step` of user `slot`.
    fn send(&mut self, slot: usize, step: Step, cmd: CommandName) {
        self.seq += 1;
        let id = (self.seq << USER_BITS) | slot as u64;
        let user = &mut self.users[slot];
        user.step = step;
        user.in_flight = id;
        user.sent_at = Instant::now();
        let key = Arg::Str(&user.key);
        let token;
        let args: &[(&str, Arg<'_>)] = match step {
            Step::Lock => &[
                ("key", key),
                ("ttl_ms", Arg::Uint(self.plan.lock_ttl_ms)),
                ("wait_ms", Arg::Uint(self.plan.lock_wait_ms)),
            ],
            Step::Get => &[("key", key)],
            Step::Set => match user.grant {
                Some((_, fence)) => &[
                    ("key", key),
                    ("value", Arg::Bin(&self.scratch)),
                    ("ttl_ms", Arg::Uint(0)),
                    ("fence", Arg::Fence(&user.key, fence)),
                ],
                None => &[
                    ("key", key),
                    ("value", Arg::Bin(&self.scratch)),
                    ("ttl_ms", Arg::Uint(0)),
                ],
            },
            Step::Unlock => {
                let (t, _) = user.grant.unwrap_or(([b'0'; 36], 0));
                token = t;
                &[
                    ("key", key),
                    ("token", Arg::Str(std::str::from_utf8(&token).unwrap_or(""))),
                ]
            }
            Step::Idle => &[],
        };
        write_request(
            &mut self.conn.out,
            id,
            cmd,
            args,
            &self.plan.session_ids[user.session as usize],
            &user.id_text,
        );
    }

    fn send_get(&mut self, slot: usize) {
        self.send(slot, Step::Get, CommandName::Get);
    }

    /// Handles one answer. An error return means the stream can no longer be matched to requests.
    fn answer(&mut self, body: &[u8]) -> Result<(), String> {
        let now = Instant::now();
        let envelope = match Envelope::parse(body) {
            Ok(envelope) => envelope,
            Err(e) => {
                self.report.mixed += 1;
                return Err(format!("unreadable answer: {e}"));
            }
        };
        let slot = (envelope.id & (MAX_USERS_PER_CONN - 1)) as usize;
        let matched = self
            .users
            .get(slot)
            .is_some_and(|u| u.in_flight == envelope.id && envelope.id != 0);
        if !matched {
            self.report.mixed += 1;
            return Err(format!(
                "answer with id {} matches no request in flight on its connection",
                envelope.id
            ));
        }
        if let Ok(id) = uuid::Uuid::try_parse_ascii(envelope.request_id) {
            self.report.request_ids.push(id.as_u128());
        }
        self.report.requests += 1;
        let user = &mut self.users[slot];
        user.in_flight = 0;
        record(
            &mut self.report.request_ns,
            now.saturating_duration_since(user.sent_at),
        );
        match user.step {
            Step::Lock => self.on_lock(slot, &envelope),
            Step::Get => self.on_get(slot, &envelope),
            Step::Set => self.on_set(slot, &envelope),
            Step::Unlock => self.on_unlock(slot, &envelope, now),
            // A request in flight always has a step; an idle user has nothing to match.
            Step::Idle => {
                self.report.mixed += 1;
                return Err(format!("answer with id {} for an idle user", envelope.id));
            }
        }
        Ok(())
    }

    fn fail(&mut self, slot: usize, what: String) {
        self.report.errors += 1;
        self.shared.counters.errors.fetch_add(1, Ordering::Relaxed);
        let user = &mut self.users[slot];
        user.failed = true;
        let what = format!("user {} on session {}: {what}", user.id, user.session);
        self.report.problem(what);
    }

    fn on_lock(&mut self, slot: usize, envelope: &Envelope<'_>) {
        match envelope.ok().and_then(read_grant) {
            Ok(grant) => {
                if grant.waited_us > 0 {
                    self.report.lock_waits += 1;
                }
                self.users[slot].grant = Some((grant.token, grant.fence));
                self.send_get(slot);
            }
            Err(e) => {
                self.fail(slot, format!("LOCK: {e}"));
                self.finish(slot, Instant::now());
            }
        }
    }

    fn on_get(&mut self, slot: usize, envelope: &Envelope<'_>) {
        let (user_id, session) = (self.users[slot].id, self.users[slot].session);
        let read = envelope.ok().and_then(|mut ok| read_bin(&mut ok));
        let state = match read {
            Ok(None) => Ok(SessionState::empty(session)),
            Ok(Some(bytes)) => SessionState::parse(bytes),
            Err(e) => {
                self.fail(slot, format!("GET: {e}"));
                return self.after_write(slot);
            }
        };
        let mut state = match state.and_then(|s| self.plan.check_state(&s, session).map(|()| s)) {
            Ok(state) => state,
            Err(e) => {
                // Another session's value, or not one of ours: never written back.
                self.report.mixed += 1;
                self.fail(slot, format!("GET answered a foreign value: {e}"));
                return self.after_write(slot);
            }
        };
        let newest = self.shared.newest[session as usize].load(Ordering::Acquire);
        // Older than the newest acknowledged write is stale. Newer is a write whose answer was lost
        // (its connection or its daemon died after Redis applied it): not stale, and the end-of-run
        // check reports it as an unacknowledged write found applied.
        if state.counter < newest {
            self.report.stale_reads += 1;
            if !self.plan.no_lock {
                self.report.problem(format!(
                    "user {user_id} read counter {} of session {session} under its lock; the newest acknowledged write is {newest}",
                    state.counter
                ));
            }
        }
        state.bump(user_id);
        state.encode(self.plan.state_bytes, &mut self.scratch);
        self.users[slot].writing = state.counter;
        self.send(slot, Step::Set, CommandName::Set);
    }

    fn on_set(&mut self, slot: usize, envelope: &Envelope<'_>) {
        match envelope
            .ok()
            .and_then(|mut ok| read_str(&mut ok).map(str::to_owned))
        {
            Ok(ok) if ok == "OK" => {
                let user = &self.users[slot];
                self.shared.newest[user.session as usize].store(user.writing, Ordering::Release);
                self.report.committed[slot].1 += 1;
            }
            Ok(other) => self.fail(slot, format!("SET answered {other:?}, expected \"OK\"")),
            Err(e) => self.fail(slot, format!("SET: {e}")),
        }
        self.after_write(slot);
    }

    /// After the GET and SET: UNLOCK when the lock is held, else the message is over.
    fn after_write(&mut self, slot: usize) {
        if self.users[slot].grant.is_some() {
            self.send(slot, Step::Unlock, CommandName::Unlock);
        } else {
            self.finish(slot, Instant::now());
        }
    }

    fn on_unlock(&mut self, slot: usize, envelope: &Envelope<'_>, now: Instant) {
        if let Err(e) = envelope.ok().and_then(read_unlock_status) {
            self.fail(slot, format!("UNLOCK: {e}"));
        }
        self.finish(slot, now);
    }

    /// Ends the current message of user `slot` and starts its next one when it is due.
    fn finish(&mut self, slot: usize, now: Instant) {
        let user = &mut self.users[slot];
        user.step = Step::Idle;
        user.grant = None;
        user.finished += 1;
        self.outstanding -= 1;
        record(
            &mut self.report.message_ns,
            now.saturating_duration_since(user.scheduled),
        );
        self.shared.counters.done.fetch_add(1, Ordering::Relaxed);
        if !user.failed {
            self.report.successful += 1;
        }
        if self.plan.open_loop() {
            if let Some(scheduled) = user.backlog.pop_front() {
                self.start(slot, scheduled, now);
            }
        } else if user.finished < self.plan.messages {
            match self.plan.think {
                Some(think) => self.timers.push(Reverse((now + think, slot))),
                None => self.start(slot, now, now),
            }
        }
    }
}

/// The next due message, or never when there is no schedule.
async fn recv(
    due: &mut Option<mpsc::UnboundedReceiver<(usize, Instant)>>,
) -> Option<(usize, Instant)> {
    match due {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Closed loop: the pause between messages, `None` for none.
pub fn think_time(ms: f64) -> Option<Duration> {
    (ms > 0.0).then(|| Duration::from_secs_f64(ms / 1000.0))
}
