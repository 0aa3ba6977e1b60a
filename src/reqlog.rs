//! What the daemon logs about requests: one line per finished request at debug level, and at info
//! level only what an operator must see: unexpected failures (`INTERNAL`) and overload, which is a
//! change of state rather than a request's own outcome.
//!
//! Expected outcomes (`LOCKED`, `FENCED`, `LOCK_TIMEOUT`, a missing key, a bad argument) are answers to
//! the client, not events for the operator, so they appear only in the debug line.
//!
//! The hot path does not pay for this when debug is off: [`enabled`] is `tracing::enabled!`, a load of
//! the global level filter and the call site's cached interest; the request context copies
//! `session_id` and `user_id` only when it says yes, and `tracing::debug!` checks the same before it
//! evaluates a single field. Nothing is allocated or formatted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use scaled_client::proto::{CommandName, ErrorCode};

use crate::context::RequestContext;
pub use crate::context::LOG_TARGET as TARGET;

/// Fewest seconds between two overload warnings: a flood of refusals must not become a flood of logs.
const OVERLOAD_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Whether per-request lines are being written.
#[inline]
pub fn enabled() -> bool {
    crate::context::logged()
}

/// Logs one finished request: at debug level always, and at error level when it failed unexpectedly.
/// `error` is the answer's error code and message, `None` when it succeeded.
#[inline]
pub fn finished(ctx: &RequestContext, error: Option<(ErrorCode, &str)>, elapsed_us: u64) {
    let (outcome, message) = match error {
        None => ("OK", None),
        Some((code, message)) => (code.as_str(), Some(message)),
    };
    let cmd = ctx.cmd.map_or("?", CommandName::as_str);
    tracing::debug!(
        target: TARGET,
        request_id = %ctx.request_id,
        id = ctx.id,
        cmd,
        session_id = ctx.session_id.as_deref(),
        user_id = ctx.user_id.as_deref(),
        outcome,
        error = message,
        elapsed_us,
        "request finished"
    );
    if let Some((code, message)) = error {
        match code {
            ErrorCode::Internal => tracing::error!(
                target: TARGET,
                request_id = %ctx.request_id,
                cmd,
                session_id = ctx.session_id.as_deref(),
                user_id = ctx.user_id.as_deref(),
                error = %message,
                "request failed unexpectedly"
            ),
            ErrorCode::Overloaded => {
                overloaded("a connection reached its limit of waiting requests")
            }
            _ => {}
        }
    }
}

/// Warns that the daemon is turning work away, at most once per [`OVERLOAD_LOG_INTERVAL`], with how
/// many other refusals the interval held.
pub fn overloaded(what: &str) {
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    let now = Instant::now();
    let due = match LAST.lock() {
        Ok(mut last) => {
            let due = last.is_none_or(|t| now.duration_since(t) >= OVERLOAD_LOG_INTERVAL);
            if due {
                *last = Some(now);
            }
            due
        }
        Err(_) => true,
    };
    if due {
        let suppressed = SUPPRESSED.swap(0, Ordering::Relaxed);
        tracing::warn!(
            suppressed,
            "overloaded: {what} (and {suppressed} other refusals in the last {}s)",
            OVERLOAD_LOG_INTERVAL.as_secs()
        );
    } else {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
    }
}
