//! One client connection: reads frames, hands each request to [`crate::cmd::dispatch`], and writes each
//! answer back as soon as it is ready, matched to its request by the client's id.
//!
//! Requests that answer at once are answered in the order they arrived. Requests that must wait run as
//! tasks in a `JoinSet` owned by this connection; their answers are written whenever they finish, in any
//! order. Answers are gathered into one buffer and written with one call per wake-up, so a pipelining
//! client costs one write for many answers.
//!
//! When the connection ends, dropping the `JoinSet` cancels every request still waiting.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use scaled_client::frame::{begin_frame, finish_frame, take_frame};
use scaled_client::proto::{
    decode_request, write_err, write_ok_key, write_response_head, ErrorCode, MAX_FRAME_LEN,
};

use crate::cmd::{self, CommandError, CommandResult, Outcome, Peer};
use crate::context::RequestContext;
use crate::daemon::Daemon;

/// Read buffer size to start with; grows to fit a large frame.
const READ_BUF: usize = 16 * 1024;

/// Serves one connection until the peer closes it, it breaks, or shutdown drains it.
pub async fn serve<R, W>(daemon: Arc<Daemon>, conn_id: u64, mut reader: R, mut writer: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut peer = Peer::new(conn_id);
    let _departure = Departure {
        daemon: &daemon,
        conn_id,
        alive: peer.alive.clone(),
    };
    let mut inbuf = BytesMut::with_capacity(READ_BUF);
    let mut out: Vec<u8> = Vec::with_capacity(READ_BUF);
    let mut waiting: JoinSet<(RequestContext, CommandResult)> = JoinSet::new();
    let max_in_flight = usize::try_from(daemon.config.max_in_flight).unwrap_or(usize::MAX);
    // Reading stops at end of stream, at shutdown, or after a frame that breaks the stream.
    let mut reading = true;
    let mut close_after_write = false;
    // Made once: a fresh future per pass would register and unregister with the token every request.
    let shutdown = daemon.shutdown.cancelled();
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            // Answers of waiting requests go out first: they are the ones that have been waiting.
            biased;
            Some(joined) = waiting.join_next(), if !waiting.is_empty() => {
                if let Ok((ctx, result)) = joined {
                    respond(&daemon, &mut out, &ctx, &result);
                }
            }
            _ = &mut shutdown, if reading => {
                reading = false;
            }
            // Reading never pauses for requests in flight: that is how the daemon sees a client
            // close (and frees its locks) at once, and how a holder's UNLOCK is read even while
            // its connection has many LOCKs waiting.
            read = reader.read_buf(&mut inbuf), if reading => {
                match read {
                    Ok(0) => {
                        if !inbuf.is_empty() {
                            let message = format!(
                                "stream ended {} bytes into a frame", inbuf.len()
                            );
                            respond_unmatched(&mut out, ErrorCode::Malformed, &message);
                        }
                        // The peer is gone or done: what still waits is cancelled with the set.
                        waiting.abort_all();
                        reading = false;
                    }
                    Ok(_) => {
                        let waits = (&mut waiting, max_in_flight);
                        if !drain_frames(&daemon, &mut peer, &mut inbuf, &mut out, waits) {
                            close_after_write = true;
                            reading = false;
                            waiting.abort_all();
                        }
                    }
                    Err(e) => {
                        tracing::debug!(conn = conn_id, error = %e, "read failed");
                        return;
                    }
                }
            }
        }
        if !out.is_empty() {
            if let Err(e) = writer.write_all(&out).await {
                tracing::debug!(conn = conn_id, error = %e, "write failed");
                return;
            }
            out.clear();
        }
        if close_after_write || (!reading && waiting.is_empty()) {
            break;
        }
    }
    let _ = writer.shutdown().await;
}

/// Frees what a connection held when it ends, however it ends: a crashed app must not leave a session
/// locked until its lease runs out.
struct Departure<'a> {
    daemon: &'a Daemon,
    conn_id: u64,
    alive: tokio_util::sync::CancellationToken,
}

impl Drop for Departure<'_> {
    fn drop(&mut self) {
        // Cancel first: from here on none of this connection's queued LOCKs can be granted.
        self.alive.cancel();
        self.daemon
            .locks
            .release_connection(self.conn_id, Instant::now());
    }
}

/// Runs every complete frame in `inbuf`. A request that would wait while `max_in_flight` requests of
/// this connection already wait is answered `OVERLOADED` instead, which bounds what one connection
/// can park in the daemon. Returns false when a frame's length prefix is over the limit: the stream
/// cannot be trusted past it, so the connection is closed after the answer.
fn drain_frames(
    daemon: &Arc<Daemon>,
    peer: &mut Peer,
    inbuf: &mut BytesMut,
    out: &mut Vec<u8>,
    (waiting, max_in_flight): (&mut JoinSet<(RequestContext, CommandResult)>, usize),
) -> bool {
    loop {
        let body = match take_frame(inbuf, MAX_FRAME_LEN) {
            Ok(Some(body)) => body,
            Ok(None) => return true,
            Err(e) => {
                tracing::debug!(conn = peer.conn_id, error = %e, "frame over the limit; closing");
                respond_unmatched(out, ErrorCode::FrameTooLarge, &e.to_string());
                return false;
            }
        };
        let now = Instant::now();
        let request = match decode_request(&body) {
            Ok(request) => request,
            Err((id, message)) => {
                let ctx = RequestContext::begin(peer.conn_id, id, None, None, None, now);
                respond(
                    daemon,
                    out,
                    &ctx,
                    &Err(CommandError::new(ErrorCode::Malformed, message)),
                );
                continue;
            }
        };
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
        match outcome {
            Outcome::Done(result) => respond(daemon, out, &ctx, &result),
            Outcome::Later(_) if waiting.len() >= max_in_flight => {
                // Dropping the future undoes it: a queued LOCK leaves its queue.
                let message = format!(
                    "{max_in_flight} requests of this connection are already waiting; \
                     retry when some finish, or use another connection"
                );
                respond(
                    daemon,
                    out,
                    &ctx,
                    &Err(CommandError::new(ErrorCode::Overloaded, message)),
                );
            }
            Outcome::Later(pending) => {
                let span = ctx.span.clone();
                waiting.spawn(async move { (ctx, pending.await) }.instrument(span));
            }
        }
    }
}

/// Appends the response to one request, files its time with the meter, and logs it.
fn respond(daemon: &Daemon, out: &mut Vec<u8>, ctx: &RequestContext, result: &CommandResult) {
    let now = Instant::now();
    let elapsed_us = ctx.elapsed_us(now);
    daemon.meter.record(
        ctx.cmd,
        result.as_ref().err().map(|e| e.code),
        elapsed_us,
        now,
    );
    crate::reqlog::finished(ctx, result, elapsed_us);
    let mut id_text = [0u8; 36];
    let request_id = ctx.request_id.hyphenated().encode_lower(&mut id_text);
    let start = begin_frame(out);
    write_response_head(out, ctx.id, request_id, elapsed_us);
    match result {
        Ok(reply) => {
            write_ok_key(out);
            reply.write(out);
        }
        Err(e) => write_err(out, e.code, &e.message),
    }
    finish_frame(out, start);
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
