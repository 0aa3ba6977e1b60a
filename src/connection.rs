//! One client connection: reads frames, hands each request to [`crate::cmd::dispatch`], and writes each
//! answer back as soon as it is ready, matched to its request by the client's id.
//!
//! Requests that answer at once are answered in the order they arrived. Requests that must wait run as
//! tasks in a `JoinSet` owned by this connection; their answers are written whenever they finish, in any
//! order. Answers are gathered into one buffer and written as the socket takes them, so a pipelining
//! client costs one write for many answers.
//!
//! What one connection may hold is bounded, so that no client, however buggy or hostile, can stall the
//! others or take the host's memory:
//!
//! - **Reading** takes memory as a frame's bytes arrive, never on the word of its length prefix; past
//!   [`BASE`] bytes the growth is charged to the daemon-wide buffer budget, and a frame that does not
//!   fit is refused. After a large frame the buffer goes back to its base size.
//! - **Answers** not yet read by the client stop the connection from taking new requests once they pass
//!   [`BACKLOG`] bytes; an answer that would take the buffer past its base size is charged to the
//!   budget too, and replaced by `OVERLOADED` if it does not fit (only answers without side effects are
//!   large: GET, STATS, LOCKS).
//! - **Requests waiting on Redis** (proto-spec.md, "Requests waiting on Redis") are counted apart
//!   from those waiting on other clients or on time: they never count toward SCALED_MAX_IN_FLIGHT and
//!   are never refused for their number. At REDIS_MAX_PENDING of them the connection takes no new
//!   request until one finishes, and a SET whose value does not fit the daemon-wide
//!   REDIS_MAX_PENDING_BYTES waits, taken but not run, until it does; meanwhile the connection reads
//!   at most [`BASE`] bytes further, as when its answers back up, so it still sees the client go.
//! - **Work per wake-up** is at most [`BATCH`] requests; then the task yields, so one connection with a
//!   2 MiB read of tiny requests cannot hold a worker thread from the others.
//! - **Access**: a HELLO that access control refuses (no token, or a wrong one, on TCP) is answered
//!   `DENIED` and nothing after it is read; the connection closes once that answer is written.
//! - **Time**: HELLO, a begun frame, reading the answers, and doing nothing at all each have a timeout.
//!
//! When the connection ends (the peer closes or shuts down its write side, a timeout, an error), its
//! locks are released at once, before any answers still unwritten are flushed, and every request
//! still waiting is cancelled, a slice at a time (see [`crate::retire`]).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use scaled_client::decode_request;
use scaled_client::frame::{begin_frame, finish_frame, missing, take_frame};
use scaled_client::proto::{
    write_degraded_response_head, write_err, write_ok_key, write_response_head, CommandName,
    ErrorCode, Request, MAX_FRAME_LEN,
};

use crate::budget::{Charge, Held};
use crate::cmd::{self, Answer, CommandError, Outcome, Peer, Reply};
use crate::config::Config;
use crate::context::RequestContext;
use crate::daemon::Daemon;
use crate::tally::{RemoteCount, WaitCount};
use crate::throttle::Throttle;
use crate::throttled_warn;
use crate::waits::Waits;

/// Bytes each buffer (reading, answers) may hold without charging the daemon-wide budget. Enough for
/// hundreds of pipelined small requests or answers.
pub const BASE: usize = 16 * 1024;

/// Unread answers past which the connection takes no new requests until the client reads.
pub const BACKLOG: usize = 64 * 1024;

/// Most requests run per wake-up before the task yields to the other connections. A request is a few
/// microseconds, so with a hundred connections all pipelining, a well-behaved client's request waits
/// at most about a hundred batches: small batches keep that to a few milliseconds, and a yield per 32
/// requests costs a pipelining client little.
const BATCH: usize = 32;

/// Timeouts and other connection closes a client can cause at will: logged, but at most once a second.
static CLOSED: Throttle = Throttle::new();
/// Refusals for lack of buffer budget or waiting slots.
static REFUSED: Throttle = Throttle::new();

/// Serves one connection until the peer closes it, it breaks, a timeout closes it, or shutdown drains
/// it. The peer is unrestricted and needs no token, as on a Unix socket without access control.
pub async fn serve<R, W>(daemon: Arc<Daemon>, conn_id: u64, reader: R, writer: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    serve_as(daemon, Peer::new(conn_id), reader, writer).await;
}

/// Serves one connection for `peer`, whose origin and scope access control has decided.
pub async fn serve_as<R, W>(daemon: Arc<Daemon>, mut peer: Peer, mut reader: R, mut writer: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let conn_id = peer.conn_id;
    let departure = Departure {
        daemon: &daemon,
        conn_id,
        alive: peer.alive.clone(),
    };
    let timeouts = Timeouts::new(&daemon.config);
    let mut bufs = Buffers::new();
    let mut waits = Waits::new(&daemon);
    peer.tally = Some(waits.tally.clone());
    let opened = Instant::now();
    // The last time the client did something: a request read, or answers taken off the socket.
    let mut last_active = opened;
    // When the unfinished frame at the front of the read buffer began to arrive.
    let mut frame_began: Option<Instant> = None;
    // When the answers waiting to be written last made progress.
    let mut write_stalled: Option<Instant> = None;
    // Reading stops at end of stream, at shutdown, at a timeout, or after a frame that breaks the
    // stream; the connection ends once nothing waits and every answer is written.
    let mut reading = true;
    // A large frame being decoded on the blocking pool; no further frame is taken until it has run.
    let mut aside: Option<JoinHandle<(Decoded, Instant)>> = None;
    // Made once, and polled once (see `shutdown_begun`): that files this task among the token's
    // waiters for good.
    let shutdown = daemon.shutdown.cancelled();
    tokio::pin!(shutdown);
    let mut filed = false;
    // One timer for all the deadlines below, moved only when a deadline comes sooner than the one it
    // is set for. Activity only moves deadlines later, so the timer is left alone on a busy
    // connection; when it fires early it finds nothing due and is set again. Setting a timer for
    // every request cost more than the request's own work.
    let timer = tokio::time::sleep_until(opened);
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;

    loop {
        // The clock, read at most once a pass: a pass takes microseconds, and a clock read costs
        // as much as a small request's lookup.
        let mut clock = PassClock(None);
        let backlogged = bufs.unwritten() >= BACKLOG;
        let mut more = false;
        if reading
            && aside.is_none()
            && !backlogged
            && !waits.paused()
            && missing(&bufs.inbuf, MAX_FRAME_LEN) == 0
        {
            let now = clock.now();
            match drain_frames(&daemon, &mut peer, &mut bufs, &mut waits, now) {
                Drained::AllThere => {}
                Drained::More => more = true,
                Drained::Aside(body, taken) => {
                    bufs.aside = body.capacity();
                    aside = Some(tokio::task::spawn_blocking(move || {
                        (decode_request(&body), taken)
                    }));
                }
                Drained::Broken => {
                    reading = false;
                    waits.abort_all();
                }
            }
            // A frame was taken: whatever is left is a new frame, with its own time to finish.
            frame_began = None;
            last_active = now;
        }
        if bufs.unwritten() > 0 {
            // Most answers go out at once: writing them here, rather than in the select below,
            // saves every request a pass through it. What the socket does not take now, the
            // select's write arm waits to write.
            if let Some(written) = try_write(&mut writer, &bufs.out[bufs.written..]).await {
                let now = || clock.now();
                if !took(
                    written,
                    &mut bufs,
                    &mut write_stalled,
                    &mut last_active,
                    now,
                ) {
                    tracing::debug!(conn = conn_id, "write failed; closing");
                    return;
                }
            }
        }
        frame_began = match (bufs.inbuf.is_empty(), frame_began) {
            (true, _) => None,
            (false, None) => Some(clock.now()),
            (false, began) => began,
        };
        if bufs.unwritten() == 0 {
            write_stalled = None;
        } else if write_stalled.is_none() {
            write_stalled = Some(clock.now());
        }
        // Taking no new request: its answers back up, or too much waits on Redis.
        let held = backlogged || waits.paused();
        if !reading && waits.is_empty() && aside.is_none() && bufs.unwritten() == 0 {
            break;
        }
        let idle = reading
            && waits.is_empty()
            && aside.is_none()
            && bufs.inbuf.is_empty()
            && bufs.unwritten() == 0;
        let hello = timeouts.hello.filter(|_| !peer.greeted).map(|t| opened + t);
        let frame = (timeouts.frame)
            .zip(frame_began.filter(|_| reading && !held))
            .map(|(t, at)| at + t);
        let write = timeouts.write.zip(write_stalled).map(|(t, at)| at + t);
        let idle_until = timeouts.idle.filter(|_| idle).map(|t| last_active + t);
        let deadline = soonest(soonest(hello, frame), soonest(write, idle_until));
        if let Some(at) = deadline {
            if armed.is_none_or(|set| at < set) {
                timer.as_mut().reset(at);
                armed = Some(at);
            }
        }
        // While answers pile up unread, or a large frame is decoded aside, read only a little more:
        // enough to see the client close or shut down its write side, never an unbounded backlog of
        // requests.
        let taking = !held && aside.is_none();
        let may_read = reading && !more && (taking || bufs.inbuf.len() < BASE);
        if may_read {
            bufs.make_room();
        }
        if !bufs.settle(&daemon) {
            // The room for the frame being read does not fit the budget: refuse that frame.
            refuse_buffer(&mut bufs, conn_id);
            reading = false;
            waits.abort_all();
            continue;
        }

        let (parked, parked_bytes) = (waits.parked.is_some(), waits.parked_bytes());
        tokio::select! {
            // Answers of waiting requests go out first: they are the ones that have been waiting.
            biased;
            Some(joined) = waits.set.join_next(), if !waits.set.is_empty() => {
                if let Ok((ctx, result)) = joined {
                    respond(&daemon, &mut bufs, &ctx, result);
                }
            }
            // A SET waiting for room among the values pending on Redis: its turn has come.
            charge = daemon.pending_bytes.charge(parked_bytes), if parked => {
                if let Some((request, taken)) = waits.parked.take() {
                    dispatch_request(&daemon, &mut peer, &mut bufs, &mut waits, request, taken, Some(charge));
                }
            }
            joined = join_aside(&mut aside), if aside.is_some() => {
                aside = None;
                bufs.aside = 0;
                last_active = Instant::now();
                match joined {
                    Ok((decoded, taken)) => {
                        run_request(&daemon, &mut peer, &mut bufs, &mut waits, decoded, taken);
                        if peer.denied {
                            reading = false;
                            waits.abort_all();
                        }
                    }
                    Err(e) => {
                        tracing::error!(conn = conn_id, error = %e, "decoding a frame failed; closing");
                        reading = false;
                        waits.abort_all();
                    }
                }
            }
            written = writer.write(&bufs.out[bufs.written..]), if bufs.unwritten() > 0 => {
                if !took(written, &mut bufs, &mut write_stalled, &mut last_active, Instant::now) {
                    tracing::debug!(conn = conn_id, "write failed; closing");
                    return;
                }
            }
            () = std::future::poll_fn(|cx| shutdown_begun(cx, &daemon.stopping, shutdown.as_mut(), &mut filed)), if reading => {
                reading = false;
            }
            // Reading never pauses for requests in flight: that is how the daemon sees a client
            // close (and frees its locks) at once, and how a holder's UNLOCK is read even while
            // its connection has many LOCKs waiting.
            read = reader.read_buf(&mut bufs.inbuf), if may_read => match read {
                Ok(0) => {
                    // The peer is gone or done: its locks go now, before anything else is written,
                    // and what still waits is cancelled. Frames it sent that were not yet run (it was
                    // not reading its answers) are not run.
                    departure.release();
                    waits.abort_all();
                    reading = false;
                    drop_aside(&mut aside, &mut bufs);
                    if missing(&bufs.inbuf, MAX_FRAME_LEN) > 0 && !bufs.inbuf.is_empty() {
                        let message =
                            format!("stream ended {} bytes into a frame", bufs.inbuf.len());
                        respond_unmatched(&mut bufs.out, ErrorCode::Malformed, &message);
                    }
                    bufs.inbuf = BytesMut::new();
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(conn = conn_id, error = %e, "read failed");
                    return;
                }
            },
            () = &mut timer, if armed.is_some() => {
                armed = None;
                let now = Instant::now();
                if deadline.is_none_or(|at| now < at) {
                    // Set for a deadline that activity has since moved: nothing is due yet.
                    continue;
                }
                if write_stalled.is_some_and(|at| timeouts.write.is_some_and(|t| now >= at + t)) {
                    throttled_warn!(CLOSED, conn = conn_id, "closing a connection whose client does not read its answers");
                    return;
                }
                if idle && daemon.locks.holds_any(conn_id) {
                    // A holder may sit idle for as long as it likes: its lock is what it waits on.
                    last_active = now;
                    continue;
                }
                let why = if !peer.greeted && timeouts.hello.is_some_and(|t| now >= opened + t) {
                    "no HELLO within SCALED_HELLO_TIMEOUT"
                } else if idle {
                    "idle for SCALED_IDLE_TIMEOUT"
                } else {
                    "a frame was not finished within SCALED_FRAME_TIMEOUT"
                };
                throttled_warn!(CLOSED, conn = conn_id, why, "closing a connection");
                respond_unmatched(&mut bufs.out, ErrorCode::Timeout, &format!("closing: {why}"));
                departure.release();
                reading = false;
                waits.abort_all();
                drop_aside(&mut aside, &mut bufs);
                bufs.inbuf = BytesMut::new();
            }
            // A full batch was run and frames remain: let the other connections have the thread.
            _ = tokio::task::yield_now(), if more => {}
        }
    }
    bufs.settle(&daemon);
    let _ = writer.shutdown().await;
}

/// Forgets the frame being decoded aside: the connection has ended, so it is never run.
fn drop_aside<T>(aside: &mut Option<JoinHandle<T>>, bufs: &mut Buffers) {
    if let Some(handle) = aside.take() {
        handle.abort();
    }
    bufs.aside = 0;
}

/// Waits for the frame being decoded aside (never ready without one: the select arm is then off).
async fn join_aside<T>(handle: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match handle {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

/// One attempt at a write: what the socket takes now, or `None` when it takes nothing now (the task
/// is then woken when it can take more).
async fn try_write<W: AsyncWrite + Unpin>(
    writer: &mut W,
    buf: &[u8],
) -> Option<std::io::Result<usize>> {
    std::future::poll_fn(|cx| match Pin::new(&mut *writer).poll_write(cx, buf) {
        Poll::Ready(written) => Poll::Ready(Some(written)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// Takes in what a write did; false when it failed (or wrote nothing) and the connection must end.
/// Progress restarts the write timeout. Only an empty buffer lets the connection go idle, so only
/// then is the time (`now`) of the client's last read worth taking.
fn took(
    written: std::io::Result<usize>,
    bufs: &mut Buffers,
    write_stalled: &mut Option<Instant>,
    last_active: &mut Instant,
    now: impl FnOnce() -> Instant,
) -> bool {
    match written {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            bufs.wrote(n);
            *write_stalled = None;
            if bufs.unwritten() == 0 {
                *last_active = now();
            }
            true
        }
    }
}

/// Whether shutdown has begun, the cheap way: the token's wait is polled only the first time, which
/// files this task among its waiters (it is woken when the token is cancelled), and after that only
/// `stopping`, set before the token is cancelled, is read. Polling the wait on every pass locked the
/// token's mutex and its waiter list's each time.
fn shutdown_begun(
    cx: &mut std::task::Context<'_>,
    stopping: &AtomicBool,
    wait: Pin<&mut impl std::future::Future<Output = ()>>,
    filed: &mut bool,
) -> Poll<()> {
    if stopping.load(Ordering::Acquire) {
        return Poll::Ready(());
    }
    if !*filed {
        *filed = true;
        return wait.poll(cx);
    }
    Poll::Pending
}

/// The sooner of two deadlines, either of which may be absent.
fn soonest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The time as a pass of the connection loop first needs it.
struct PassClock(Option<Instant>);

impl PassClock {
    fn now(&mut self) -> Instant {
        *self.0.get_or_insert_with(Instant::now)
    }
}

/// The connection timeouts in force; `None` is no limit.
struct Timeouts {
    hello: Option<Duration>,
    frame: Option<Duration>,
    write: Option<Duration>,
    idle: Option<Duration>,
}

impl Timeouts {
    fn new(config: &Config) -> Timeouts {
        Timeouts {
            hello: Config::timeout(config.hello_timeout),
            frame: Config::timeout(config.frame_timeout),
            write: Config::timeout(config.write_timeout),
            idle: Config::timeout(config.idle_timeout),
        }
    }
}

/// A connection's two buffers and what they have charged to the daemon-wide budget.
struct Buffers {
    /// Bytes read and not yet taken as frames.
    inbuf: BytesMut,
    /// Answers encoded and not yet all written; `written` bytes of it are gone.
    out: Vec<u8>,
    /// How much of `out` the socket has taken.
    written: usize,
    /// Bytes of a frame taken off `inbuf` and being decoded aside; still memory this connection holds.
    aside: usize,
    /// Capacity of both buffers beyond [`BASE`] each, as charged to [`Daemon::buffers`].
    charge: Charge,
}

impl Buffers {
    fn new() -> Buffers {
        Buffers {
            inbuf: BytesMut::with_capacity(BASE),
            out: Vec::with_capacity(BASE),
            written: 0,
            aside: 0,
            charge: Charge::default(),
        }
    }

    fn unwritten(&self) -> usize {
        self.out.len() - self.written
    }

    /// Marks `n` more bytes written; once all are, the buffer is emptied, and shrunk back to its base
    /// size if a large answer had grown it.
    fn wrote(&mut self, n: usize) {
        self.written += n;
        if self.written >= self.out.len() {
            self.out.clear();
            self.written = 0;
            if self.out.capacity() > 4 * BASE {
                self.out = Vec::with_capacity(BASE);
            }
        }
    }

    /// Makes sure a read has room: at least the base size, and for a frame larger than that, room
    /// that doubles as its bytes arrive but never passes the end of the frame.
    fn make_room(&mut self) {
        if self.inbuf.is_empty() && self.inbuf.capacity() > 4 * BASE {
            self.inbuf = BytesMut::with_capacity(BASE);
        }
        let spare = self.inbuf.capacity() - self.inbuf.len();
        if spare >= 4096 {
            return;
        }
        let lacking = missing(&self.inbuf, MAX_FRAME_LEN).max(4096);
        let step = self.inbuf.capacity().max(BASE).min(lacking);
        self.inbuf.reserve(step);
    }

    /// Brings the budget charge in line with the buffers' capacity. False when the read buffer grew
    /// past what the budget allows.
    fn settle(&mut self, daemon: &Daemon) -> bool {
        let needed =
            self.inbuf.capacity().saturating_sub(BASE) + self.out.capacity().saturating_sub(BASE);
        self.charge.settle(&daemon.buffers, needed)
    }
}

/// Frees what a connection held when it ends, however it ends: a crashed app must not leave a session
/// locked until its lease runs out.
struct Departure<'a> {
    daemon: &'a Daemon,
    conn_id: u64,
    alive: Arc<tokio_util::sync::CancellationToken>,
}

impl Departure<'_> {
    /// Releases the connection's locks now. Safe to call more than once.
    fn release(&self) {
        // Cancel first: from here on none of this connection's queued LOCKs can be granted.
        self.alive.cancel();
        self.daemon
            .store
            .release_connection(self.conn_id, Instant::now());
    }
}

impl Drop for Departure<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

/// Refuses the frame being read when the buffer budget cannot hold it: the stream cannot go on
/// without reading that frame, so the connection is closed after the answer.
fn refuse_buffer(bufs: &mut Buffers, conn_id: u64) {
    throttled_warn!(
        REFUSED,
        conn = conn_id,
        "buffer budget (SCALED_MAX_BUFFER_BYTES) exhausted; refusing a large frame"
    );
    bufs.inbuf = BytesMut::new();
    respond_unmatched(
        &mut bufs.out,
        ErrorCode::Overloaded,
        "the daemon's buffer budget (SCALED_MAX_BUFFER_BYTES) cannot hold this frame now; \
         closing, retry later",
    );
}

/// How a pass over the read buffer ended.
enum Drained {
    /// Every complete frame was run.
    AllThere,
    /// A batch was run and complete frames remain.
    More,
    /// A frame too large to decode on the serving thread was taken; decode it aside, then go on.
    Aside(BytesMut, Instant),
    /// A length prefix was over the limit: the stream cannot be trusted past it. Or access control
    /// refused the peer's HELLO: nothing more is taken from it.
    Broken,
}

/// Frames at least this large are decoded on the blocking pool rather than on the thread that serves
/// every connection: decoding is linear, but a 2 MiB map of tiny members still takes milliseconds,
/// and another connection's answers must not wait for it. Order is kept: the connection takes no
/// further frame until that one has run.
const DECODE_ASIDE: usize = 64 * 1024;

/// What a decode gives: the request, or its readable id (0 if none) and what was wrong.
type Decoded = Result<scaled_client::proto::Request, (u64, String)>;

/// Runs up to [`BATCH`] complete frames from the read buffer. Stops early when the answers not yet
/// written pass [`BACKLOG`], or at a frame to decode aside. Each frame's time is counted from `now`,
/// when the pass that took them began: they all arrived before it.
fn drain_frames(
    daemon: &Arc<Daemon>,
    peer: &mut Peer,
    bufs: &mut Buffers,
    waits: &mut Waits,
    now: Instant,
) -> Drained {
    for _ in 0..BATCH {
        if bufs.unwritten() >= BACKLOG || waits.paused() {
            return Drained::AllThere;
        }
        let body = match take_frame(&mut bufs.inbuf, MAX_FRAME_LEN) {
            Ok(Some(body)) => body,
            Ok(None) => return Drained::AllThere,
            Err(e) => {
                tracing::debug!(conn = peer.conn_id, error = %e, "frame over the limit; closing");
                respond_unmatched(&mut bufs.out, ErrorCode::FrameTooLarge, &e.to_string());
                return Drained::Broken;
            }
        };
        if body.len() >= DECODE_ASIDE {
            return Drained::Aside(body, now);
        }
        let decoded = decode_request(&body);
        drop(body);
        run_request(daemon, peer, bufs, waits, decoded, now);
        if peer.denied {
            // A HELLO with no valid token: nothing after it is read, and the connection closes.
            return Drained::Broken;
        }
    }
    if missing(&bufs.inbuf, MAX_FRAME_LEN) == 0 {
        Drained::More
    } else {
        Drained::AllThere
    }
}

/// Runs one decoded request (see [`dispatch_request`]); a SET whose value does not fit the bytes
/// pending on Redis now is parked in `waits` instead, to run when it fits.
fn run_request(
    daemon: &Arc<Daemon>,
    peer: &mut Peer,
    bufs: &mut Buffers,
    waits: &mut Waits,
    decoded: Decoded,
    now: Instant,
) {
    let request = match decoded {
        Ok(request) => request,
        // Without a readable id the error belongs to no request: id 0 and elapsed_us 0.
        Err((0, message)) => {
            respond_unmatched(&mut bufs.out, ErrorCode::Malformed, &message);
            return;
        }
        Err((id, message)) => {
            let ctx = RequestContext::begin(peer.conn_id, id, None, None, None, now);
            let error = CommandError::new(ErrorCode::Malformed, message);
            respond(daemon, bufs, &ctx, Err(error));
            return;
        }
    };
    // With Redis, a SET's value waits in memory until Redis has it: charged first, and the SET
    // waits (parked) rather than passing REDIS_MAX_PENDING_BYTES. Standalone a SET never waits.
    let value_len = match (&request.cmd, &request.args.value) {
        (CommandName::Set, Some(value)) if daemon.store.remote.is_some() => Some(value.len()),
        _ => None,
    };
    let charge = match value_len.map(|n| daemon.pending_bytes.try_charge(n)) {
        None => None,
        Some(Some(charge)) => Some(charge),
        Some(None) => {
            waits.parked = Some((request, now));
            return;
        }
    };
    dispatch_request(daemon, peer, bufs, waits, request, now, charge);
}

/// Runs one request and appends its answer, or starts it waiting. A request that would wait on other
/// clients or on time while SCALED_MAX_IN_FLIGHT such requests of this connection, or
/// SCALED_MAX_WAITING of the whole daemon, already wait is answered `OVERLOADED` instead, which bounds
/// what clients can park in the daemon. A request that waits only on Redis is never refused: it is
/// counted apart, and `charge` (its value's share of REDIS_MAX_PENDING_BYTES) goes with it.
fn dispatch_request(
    daemon: &Arc<Daemon>,
    peer: &mut Peer,
    bufs: &mut Buffers,
    waits: &mut Waits,
    request: Request,
    now: Instant,
    charge: Option<Held>,
) {
    let ctx = RequestContext::begin(
        peer.conn_id,
        request.id,
        Some(request.cmd),
        request.session_id.as_deref(),
        request.user_id.as_deref(),
        now,
    );
    let outcome = {
        let _entered = ctx.span.enter();
        cmd::dispatch(daemon, peer, request, now)
    };
    // What the request holds of the connection's counts while it waits (see `crate::tally`).
    let (pending, count): (_, (Option<RemoteCount>, Option<WaitCount>)) = match outcome {
        Outcome::Done(result) => return respond(daemon, bufs, &ctx, result),
        // Bounded by the pause at REDIS_MAX_PENDING and by REDIS_RESPONSE_TIMEOUT, not refused.
        Outcome::Remote(pending) => (pending, (Some(waits.tally.count_remote()), None)),
        // Counts itself: a LOCK that begins waiting on Redis and may go on to wait for a holder.
        Outcome::Counted(pending) => (pending, (None, None)),
        Outcome::Later(pending) => match waits.tally.admit() {
            Ok(count) => (pending, (None, Some(count))),
            Err(message) => {
                let error = CommandError::new(ErrorCode::Overloaded, message);
                return respond(daemon, bufs, &ctx, Err(error));
            }
        },
    };
    let span = ctx.span.clone();
    // The counts go back when the future ends, finished or cancelled; dropping the future undoes
    // it (a queued LOCK leaves its queue).
    let handle = waits.set.spawn(
        async move {
            let result = pending.await;
            drop((count, charge));
            (ctx, result)
        }
        .instrument(span),
    );
    waits.track(handle);
}

/// Appends the response to one request, files its time with the meter, and logs it. An answer that
/// would take the answer buffer past its base size must fit the daemon's buffer budget; if it does
/// not, the client gets `OVERLOADED` instead (large answers come only from commands without side
/// effects).
fn respond(daemon: &Daemon, bufs: &mut Buffers, ctx: &RequestContext, answer: impl Into<Answer>) {
    let Answer { result, degraded } = answer.into();
    let result = match result {
        Ok(reply) if !fits(daemon, bufs, &reply) => {
            throttled_warn!(
                REFUSED,
                "buffer budget (SCALED_MAX_BUFFER_BYTES) exhausted; refusing a large answer"
            );
            Err(CommandError::new(
                ErrorCode::Overloaded,
                "the daemon's buffer budget (SCALED_MAX_BUFFER_BYTES) cannot hold this answer \
                 now; retry later",
            ))
        }
        other => other,
    };
    let now = Instant::now();
    let elapsed_us = ctx.elapsed_us(now);
    daemon.meter.record(
        ctx.cmd,
        result.as_ref().err().map(|e| e.code),
        elapsed_us,
        now,
    );
    let error = result.as_ref().err().map(|e| (e.code, e.message.as_str()));
    crate::reqlog::finished(ctx, error, elapsed_us);
    write_answer(&mut bufs.out, ctx, elapsed_us, &result, degraded);
}

/// Appends one answer as a whole frame: the response envelope for `ctx`'s request, then its `ok` or
/// `err`. Public so that the fuzz targets (client/fuzz/) encode what [`crate::cmd::dispatch`] answers
/// exactly as a connection does, without a socket.
pub fn write_answer(
    out: &mut Vec<u8>,
    ctx: &RequestContext,
    elapsed_us: u64,
    result: &cmd::CommandResult,
    degraded: bool,
) {
    let mut id_text = [0u8; 36];
    let request_id = ctx.request_id.hyphenated().encode_lower(&mut id_text);
    let start = begin_frame(out);
    if degraded {
        write_degraded_response_head(out, ctx.id, request_id, elapsed_us);
    } else {
        write_response_head(out, ctx.id, request_id, elapsed_us);
    }
    match result {
        Ok(reply) => {
            write_ok_key(out);
            reply.write(out);
        }
        Err(e) => write_err(out, e.code, &e.message),
    }
    finish_frame(out, start);
}

/// Whether `reply` can be appended: room in the answer buffer's base size, or budget for the growth.
/// On success the buffer already has the room, and the budget is charged for it.
fn fits(daemon: &Daemon, bufs: &mut Buffers, reply: &Reply) -> bool {
    // The envelope around the reply: id, request_id, elapsed_us and the frame prefix.
    const ENVELOPE: usize = 128;
    let need = bufs.out.len() + reply.encoded_len() + ENVELOPE;
    if need <= bufs.out.capacity() {
        return true;
    }
    let before = bufs.out.capacity();
    bufs.out.reserve(need - bufs.out.len());
    if bufs.settle(daemon) {
        return true;
    }
    if before <= BASE {
        bufs.out.shrink_to(BASE.max(bufs.out.len()));
    } else {
        bufs.out.shrink_to(before);
    }
    bufs.settle(daemon);
    false
}

/// Appends an error that belongs to no request (id 0): a broken stream rather than a bad request.
pub(crate) fn respond_unmatched(out: &mut Vec<u8>, code: ErrorCode, message: &str) {
    let mut id_text = [0u8; 36];
    let request_id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut id_text);
    let start = begin_frame(out);
    write_response_head(out, 0, request_id, 0);
    write_err(out, code, message);
    finish_frame(out, start);
}
