//! Commands: how each request is checked, what it does to the shared state, and what it answers.
//!
//! One file per command. [`dispatch`] routes a decoded request to its command. A command that can answer
//! at once returns [`Outcome::Done`]; one that must wait (a LOCK in a queue, a delayed PING) returns
//! [`Outcome::Later`] with a future, which the connection runs beside the others so a slow request never
//! holds up a fast one behind it.

mod del;
mod extend;
mod get;
mod hello;
mod lock;
mod locks;
mod ping;
mod set;
mod stats;
mod unlock;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use scaled_client::proto::{Args, CommandName, ErrorCode, Fence, Request, MAX_KEY_LEN};

use crate::access::{Namespace, Origin, Scope};
use crate::daemon::Daemon;
use crate::locks::{Grant, Status};
use crate::store::degraded::Marked;
use crate::store::{Step, StoreError};
use crate::tally::Tally;

/// A successful answer, written as the response's `ok` value.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// MessagePack nil: GET of a missing key.
    Nil,
    /// MessagePack bool: DEL's "was it there".
    Bool(bool),
    /// MessagePack str: PING's "PONG", SET's "OK".
    Text(&'static str),
    /// MessagePack bin: a cached value.
    Value(Bytes),
    /// A lock grant, `{token, fence, ttl_ms, waited_us}`: LOCK's answer, written straight into the
    /// response rather than encoded apart first, since every session message takes one.
    Grant(Grant),
    /// `{status}` (UNLOCK), or with a lease in milliseconds `{status, ttl_ms}` (EXTEND): written
    /// straight into the response, like [`Reply::Grant`].
    Status(Status, Option<u64>),
    /// A MessagePack value already encoded: maps such as STATS and HELLO.
    Encoded(Vec<u8>),
}

impl Reply {
    /// Encodes a serializable value as a map-shaped reply.
    pub fn encode<T: serde::Serialize>(value: &T) -> CommandResult {
        rmp_serde::to_vec_named(value)
            .map(Reply::Encoded)
            .map_err(|e| CommandError::new(ErrorCode::Internal, format!("encoding reply: {e}")))
    }

    /// At least the bytes [`Reply::write`] appends (an upper bound on the header's size).
    pub fn encoded_len(&self) -> usize {
        match self {
            Reply::Nil | Reply::Bool(_) => 1,
            Reply::Text(s) => s.len() + 5,
            Reply::Value(v) => v.len() + 5,
            // Four short names, a token and three integers; a status and at most one integer.
            Reply::Grant(grant) => grant.token.len() + 80,
            Reply::Status(..) => 40,
            Reply::Encoded(bytes) => bytes.len(),
        }
    }

    /// Appends the MessagePack encoding. Writing into a `Vec` cannot fail.
    pub fn write(&self, out: &mut Vec<u8>) {
        match self {
            Reply::Nil => {
                let _ = rmp::encode::write_nil(out);
            }
            Reply::Bool(b) => {
                let _ = rmp::encode::write_bool(out, *b);
            }
            Reply::Text(s) => {
                let _ = rmp::encode::write_str(out, s);
            }
            Reply::Value(v) => {
                let _ = rmp::encode::write_bin(out, v);
            }
            Reply::Grant(grant) => {
                // The members in the order of `Grant`'s fields, as serde would write them.
                let _ = rmp::encode::write_map_len(out, 4);
                let _ = rmp::encode::write_str(out, "token");
                let _ = rmp::encode::write_str(out, &grant.token);
                let _ = rmp::encode::write_str(out, "fence");
                let _ = rmp::encode::write_uint(out, grant.fence);
                let _ = rmp::encode::write_str(out, "ttl_ms");
                let _ = rmp::encode::write_uint(out, grant.ttl_ms);
                let _ = rmp::encode::write_str(out, "waited_us");
                let _ = rmp::encode::write_uint(out, grant.waited_us);
            }
            Reply::Status(status, ttl_ms) => {
                let _ = rmp::encode::write_map_len(out, 1 + u32::from(ttl_ms.is_some()));
                let _ = rmp::encode::write_str(out, "status");
                let _ = rmp::encode::write_str(out, status_name(*status));
                if let Some(ttl_ms) = ttl_ms {
                    let _ = rmp::encode::write_str(out, "ttl_ms");
                    let _ = rmp::encode::write_uint(out, *ttl_ms);
                }
            }
            Reply::Encoded(bytes) => out.extend_from_slice(bytes),
        }
    }
}

/// A lock status's wire name, as proto-spec.md lists them.
fn status_name(status: Status) -> &'static str {
    match status {
        Status::Ok => "OK",
        Status::NotLocked => "NOT_LOCKED",
        Status::NotOwner => "NOT_OWNER",
        Status::Expired => "EXPIRED",
    }
}

/// A failed answer: a code from the protocol's closed list and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct CommandError {
    /// The wire code.
    pub code: ErrorCode,
    /// What went wrong, for the person reading the client's error.
    pub message: String,
}

impl CommandError {
    /// An error with this code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> CommandError {
        CommandError {
            code,
            message: message.into(),
        }
    }
}

/// What a command answers.
pub type CommandResult = Result<Reply, CommandError>;

/// A command's answer with the envelope's `degraded` member: whether a daemon configured with Redis
/// made it without Redis. The flag is decided with the answer, never read from the daemon's health
/// when the answer is written (proto-spec.md, "Degraded answers").
#[derive(Debug)]
pub struct Answer {
    /// The `ok` or `err` of the response.
    pub result: CommandResult,
    /// Written as `degraded: true` in the envelope when set.
    pub degraded: bool,
}

impl Answer {
    /// `result`, made without Redis when `degraded`.
    pub fn new(result: CommandResult, degraded: bool) -> Answer {
        Answer { result, degraded }
    }
}

/// An `UNAVAILABLE` answer is always one made without Redis; every other answer is not, unless the
/// command says so.
impl From<CommandResult> for Answer {
    fn from(result: CommandResult) -> Answer {
        let degraded = matches!(&result, Err(e) if e.code == ErrorCode::Unavailable);
        Answer { result, degraded }
    }
}

/// The answer to a store result that says whether it was made without Redis. An error is degraded
/// when it is `UNAVAILABLE`, or when it was made while Redis is unreachable.
fn marked<T>(
    daemon: &Daemon,
    result: Result<Marked<T>, StoreError>,
    reply: impl FnOnce(T) -> Reply,
) -> Answer {
    match result {
        Ok(m) => Answer::new(Ok(reply(m.value)), m.degraded),
        Err(e) => {
            let mut answer = Answer::from(Err(CommandError::from(e)));
            answer.degraded |= daemon.store.degraded();
            answer
        }
    }
}

/// The answer to a store step: [`marked`] now, or when the step finishes. The daemon is shared with
/// the step only when it finishes later: an `Arc` count taken and dropped on every request is a cost
/// the requests answered at once need not pay.
fn answered<T: Send + 'static>(
    daemon: &Arc<Daemon>,
    step: Step<Result<Marked<T>, StoreError>>,
    reply: impl FnOnce(T) -> Reply + Send + 'static,
) -> Step<Answer> {
    match step {
        Step::Ready(result) => Step::Ready(marked(daemon, result, reply)),
        later => {
            let daemon = daemon.clone();
            later.map(move |result| marked(&daemon, result, reply))
        }
    }
}

/// A command that finishes later.
pub type Pending = Pin<Box<dyn Future<Output = Answer> + Send + 'static>>;

/// Whether the answer is ready now.
pub enum Outcome {
    /// Answered without waiting.
    Done(Answer),
    /// Answered when the future completes; waits on other clients or on time, so it counts toward
    /// SCALED_MAX_IN_FLIGHT.
    Later(Pending),
    /// Answered when the future completes; waits only on Redis, so it counts toward
    /// REDIS_MAX_PENDING instead.
    Remote(Pending),
    /// Answered when the future completes, which holds its own counts of the connection's
    /// [`Tally`]: a LOCK whose Redis step may turn into a wait for another daemon's holder.
    Counted(Pending),
}

impl Outcome {
    /// Answered at once with `error`.
    pub fn failed(error: CommandError) -> Outcome {
        Outcome::Done(Err(error).into())
    }
}

impl From<CommandResult> for Outcome {
    fn from(r: CommandResult) -> Outcome {
        Outcome::Done(r.into())
    }
}

impl From<Step<CommandResult>> for Outcome {
    fn from(step: Step<CommandResult>) -> Outcome {
        step.map(Answer::from).into()
    }
}

impl From<Step<Answer>> for Outcome {
    fn from(step: Step<Answer>) -> Outcome {
        match step {
            Step::Ready(a) => Outcome::Done(a),
            Step::Later(pending) => Outcome::Later(pending),
            Step::Remote(pending) => Outcome::Remote(pending),
            Step::Counted(pending) => Outcome::Counted(pending),
        }
    }
}

/// A command whose checks failed before it reached the store, or the store's step.
impl From<Result<Step<Answer>, CommandError>> for Outcome {
    fn from(r: Result<Step<Answer>, CommandError>) -> Outcome {
        match r {
            Ok(step) => step.into(),
            Err(e) => Outcome::failed(e),
        }
    }
}

/// A command's checks failed before it reached the store, or the store's step.
impl From<Result<Step<CommandResult>, CommandError>> for Outcome {
    fn from(r: Result<Step<CommandResult>, CommandError>) -> Outcome {
        match r {
            Ok(step) => step.into(),
            Err(e) => Outcome::failed(e),
        }
    }
}

impl From<StoreError> for CommandError {
    fn from(e: StoreError) -> CommandError {
        let code = match &e {
            StoreError::Fenced(_) => ErrorCode::Fenced,
            StoreError::TooLarge(_) => ErrorCode::TooLarge,
            StoreError::Locked(_) => ErrorCode::Locked,
            StoreError::LockTimeout { .. } => ErrorCode::LockTimeout,
            StoreError::ShuttingDown => ErrorCode::ShuttingDown,
            StoreError::Overloaded(_) => ErrorCode::Overloaded,
            StoreError::Unavailable(_) => ErrorCode::Unavailable,
            StoreError::Corrupted(_) => ErrorCode::Corrupted,
            StoreError::LockLost(_) => ErrorCode::LockLost,
            StoreError::Internal(_) => ErrorCode::Internal,
        };
        CommandError::new(code, e.to_string())
    }
}

/// What the daemon knows about the connection a request came on.
pub struct Peer {
    /// Unique for the daemon's lifetime; owns the locks taken on this connection.
    pub conn_id: u64,
    /// Whether HELLO has succeeded; until it has, every other command is refused.
    pub greeted: bool,
    /// "name#conn", shown as the owner of the locks this connection takes.
    pub owner: Arc<str>,
    /// Cancelled when the connection closes, so none of its queued LOCKs can be granted after.
    /// Shared behind an `Arc`: every LOCK takes a copy, and cloning the token itself locks a mutex.
    pub alive: Arc<CancellationToken>,
    /// Which listener it came in on, and as whom: a TCP peer must show a token in HELLO.
    pub origin: Origin,
    /// What it may reach: everything, or one key namespace. Set at accept for a Unix peer, by the
    /// token in HELLO for a TCP peer.
    pub scope: Scope,
    /// Set when access control refused its HELLO: the connection reads nothing more and closes.
    pub denied: bool,
    /// The counts its waiting requests are held to; set by the connection that serves it (`None`:
    /// no connection, as when a request is run on its own, and every wait is counted by whoever
    /// runs it).
    pub tally: Option<Tally>,
}

impl Peer {
    /// A connection that has not said HELLO yet, accepted without access control: unrestricted,
    /// and needing no token.
    pub fn new(conn_id: u64) -> Peer {
        Peer::with_access(conn_id, Origin::UnixUnknown, Scope::Unrestricted)
    }

    /// A connection that has not said HELLO yet, from `origin`, with the scope access control gave it
    /// at accept (a TCP peer's is decided by its HELLO).
    pub fn with_access(conn_id: u64, origin: Origin, scope: Scope) -> Peer {
        Peer {
            conn_id,
            greeted: false,
            owner: Arc::from(format!("#{conn_id}")),
            alive: Arc::new(CancellationToken::new()),
            origin,
            scope,
            denied: false,
            tally: None,
        }
    }
}

/// Runs one decoded request.
pub fn dispatch(daemon: &Arc<Daemon>, peer: &mut Peer, request: Request, now: Instant) -> Outcome {
    if !peer.greeted && request.cmd != CommandName::Hello {
        return Outcome::failed(CommandError::new(
            ErrorCode::HelloRequired,
            "send HELLO with the protocol version before any other command",
        ));
    }
    let mut args = request.args;
    // The one place keys enter a namespace: every command below, and the store behind them, sees
    // the prefixed key only.
    let namespace = peer.scope.namespace().cloned();
    if let Some(ns) = &namespace {
        use CommandName::*;
        if matches!(request.cmd, Get | Set | Del | Lock | Unlock | Extend) {
            if let Err(e) = ns.enter(&mut args) {
                return Outcome::failed(CommandError::new(ErrorCode::TooLarge, e.to_string()));
            }
        }
    }
    let outcome = match request.cmd {
        CommandName::Hello => hello::run(daemon, peer, args).into(),
        CommandName::Ping => ping::run(args),
        CommandName::Get => get::run(daemon, args, now).into(),
        CommandName::Set => set::run(daemon, args, now).into(),
        CommandName::Del => del::run(daemon, args, now).into(),
        CommandName::Stats => stats::run(daemon, &peer.scope, now).into(),
        CommandName::Lock => lock::run(daemon, peer, args, now),
        CommandName::Unlock => unlock::run(daemon, args, now).into(),
        CommandName::Extend => extend::run(daemon, args, now).into(),
        CommandName::Locks => locks::run(daemon, &peer.scope, args, now).into(),
        CommandName::Unknown => Outcome::failed(CommandError::new(
            ErrorCode::UnknownCommand,
            "unknown command; see proto-spec.md for the list",
        )),
    };
    let outcome = match namespace {
        Some(ns) => unprefixed(ns, outcome),
        None => outcome,
    };
    // An answer made at once while Redis is unreachable is made without it, whatever the command.
    match outcome {
        Outcome::Done(mut answer) => {
            answer.degraded |= daemon.store.degraded();
            Outcome::Done(answer)
        }
        later => later,
    }
}

/// Takes a namespace's prefix out of an answer's error message, now or when it finishes, so that a
/// namespaced peer sees only its own key names. (LOCKS strips its rows itself.)
fn unprefixed(ns: Arc<Namespace>, outcome: Outcome) -> Outcome {
    fn leave(ns: &Namespace, mut answer: Answer) -> Answer {
        if let Err(e) = &mut answer.result {
            ns.leave(&mut e.message);
        }
        answer
    }
    match outcome {
        Outcome::Done(answer) => Outcome::Done(leave(&ns, answer)),
        Outcome::Later(pending) => {
            Outcome::Later(Box::pin(async move { leave(&ns, pending.await) }))
        }
        Outcome::Remote(pending) => {
            Outcome::Remote(Box::pin(async move { leave(&ns, pending.await) }))
        }
        Outcome::Counted(pending) => {
            Outcome::Counted(Box::pin(async move { leave(&ns, pending.await) }))
        }
    }
}

/// The `key` argument, checked: present, non-empty, at most [`MAX_KEY_LEN`] bytes.
fn required_key(args: &mut Args) -> Result<String, CommandError> {
    let key = args
        .key
        .take()
        .ok_or_else(|| CommandError::new(ErrorCode::BadArgument, "missing argument `key`"))?;
    check_key("key", &key)?;
    Ok(key)
}

/// The `fence` argument of SET and DEL, with its lock checked like a key, so that FENCED, which names
/// the lock, stays a short answer.
fn checked_fence(args: &mut Args) -> Result<Option<Fence>, CommandError> {
    let fence = args.fence.take();
    if let Some(f) = &fence {
        check_key("fence.lock", &f.lock)?;
    }
    Ok(fence)
}

/// The `token` argument of UNLOCK and EXTEND.
fn required_token(args: &mut Args) -> Result<String, CommandError> {
    args.token
        .take()
        .ok_or_else(|| CommandError::new(ErrorCode::BadArgument, "missing argument `token`"))
}

/// Longest lease or wait a LOCK may ask for: a day.
const MAX_LOCK_MS: u64 = 86_400_000;

/// A lock duration argument in milliseconds, checked to be 1 ms to a day; `None` when absent.
fn lock_millis(
    value: Option<u64>,
    name: &str,
) -> Result<Option<std::time::Duration>, CommandError> {
    match value {
        None => Ok(None),
        Some(ms) if ms == 0 || ms > MAX_LOCK_MS => Err(CommandError::new(
            ErrorCode::BadArgument,
            format!("{name} must be 1 to {MAX_LOCK_MS} milliseconds, not {ms}"),
        )),
        Some(ms) => Ok(Some(std::time::Duration::from_millis(ms))),
    }
}

/// Checks the length of a key, or of an argument that names one (`what`).
fn check_key(what: &str, key: &str) -> Result<(), CommandError> {
    if key.is_empty() {
        return Err(CommandError::new(
            ErrorCode::BadArgument,
            format!("{what} is empty"),
        ));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(CommandError::new(
            ErrorCode::TooLarge,
            format!(
                "{what} of {} bytes is over the {MAX_KEY_LEN} byte limit",
                key.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(reply: &Reply) -> Vec<u8> {
        let mut out = Vec::new();
        reply.write(&mut out);
        out
    }

    #[test]
    fn replies_written_in_place_match_their_serde_encoding() {
        let grant = Grant {
            token: "5f0c8a1e-2b7d-4c39-a6e4-1d9b3f7c2e80".into(),
            fence: 1_764_201_600_000_001,
            ttl_ms: 30_000,
            waited_us: 0,
        };
        assert_eq!(
            written(&Reply::Grant(grant.clone())),
            rmp_serde::to_vec_named(&grant).expect("encodes")
        );
        #[derive(serde::Serialize)]
        struct Unlocked {
            status: Status,
        }
        #[derive(serde::Serialize)]
        struct Extended {
            status: Status,
            ttl_ms: u64,
        }
        for status in [
            Status::Ok,
            Status::NotLocked,
            Status::NotOwner,
            Status::Expired,
        ] {
            assert_eq!(
                written(&Reply::Status(status, None)),
                rmp_serde::to_vec_named(&Unlocked { status }).expect("encodes")
            );
            assert_eq!(
                written(&Reply::Status(status, Some(60_000))),
                rmp_serde::to_vec_named(&Extended {
                    status,
                    ttl_ms: 60_000
                })
                .expect("encodes")
            );
        }
    }
}
