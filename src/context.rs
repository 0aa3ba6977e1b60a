//! The request context: what the daemon knows about one request while it runs.
//!
//! Each request gets its own context value, created when its frame is decoded and passed by value to the
//! code that answers it. Nothing is kept in thread-locals or task-locals, so two requests on the same
//! connection, the same worker thread or the same task can never see each other's context: the seed's
//! "no response mixing" holds by construction, not by cleanup.

use tokio::time::Instant;
use tracing::Span;
use uuid::Uuid;

use scaled_client::proto::CommandName;

/// The target of the per-request log lines ([`crate::reqlog`]), so a filter can pick them out
/// (`--log scaled::request=debug`).
pub const LOG_TARGET: &str = "scaled::request";

/// Whether per-request lines are being written: only then does a context keep the request's
/// session and user ids.
#[inline]
pub fn logged() -> bool {
    tracing::enabled!(target: LOG_TARGET, tracing::Level::DEBUG)
}

/// One request's identity and clock.
pub struct RequestContext {
    /// The daemon-issued UUID, echoed in the response and named in every log line of the request.
    pub request_id: Uuid,
    /// The client's correlation id, echoed so the client can match the response.
    pub id: u64,
    /// The command, when the frame named a known one; used to file the timing in the meter.
    pub cmd: Option<CommandName>,
    /// When the frame was decoded; the response reports the time since.
    pub started: Instant,
    /// Carries request_id, command, session_id and user_id into every event logged for this request.
    pub span: Span,
    /// The app's session, kept for the request's log line only while that line is written (see
    /// [`crate::reqlog`]), so a daemon not logging requests copies nothing.
    pub session_id: Option<Box<str>>,
    /// The app's user, kept on the same terms as `session_id`.
    pub user_id: Option<Box<str>>,
}

impl RequestContext {
    /// A fresh context for a request just read from connection `conn`.
    pub fn begin(
        conn: u64,
        id: u64,
        cmd: Option<CommandName>,
        session_id: Option<&str>,
        user_id: Option<&str>,
        started: Instant,
    ) -> RequestContext {
        let request_id = Uuid::new_v4();
        let span = tracing::debug_span!(
            "request",
            %request_id,
            conn,
            id,
            cmd = cmd.map_or("?", CommandName::as_str),
            session_id,
            user_id,
        );
        let logged = logged();
        RequestContext {
            request_id,
            id,
            cmd,
            started,
            span,
            session_id: session_id.filter(|_| logged).map(Box::from),
            user_id: user_id.filter(|_| logged).map(Box::from),
        }
    }

    /// Microseconds since the request was read.
    pub fn elapsed_us(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_micros() as u64
    }
}
