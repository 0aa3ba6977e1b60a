//! The client's error type: one variant per protocol error code, plus what can go wrong locally.

use crate::proto::{ErrorCode, WireError};

/// Everything a call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `MALFORMED`: the daemon could not decode the request.
    #[error("MALFORMED: {0}")]
    Malformed(String),
    /// `FRAME_TOO_LARGE`: the request frame was over the daemon's limit.
    #[error("FRAME_TOO_LARGE: {0}")]
    FrameTooLarge(String),
    /// `HELLO_REQUIRED`: a command was sent before HELLO.
    #[error("HELLO_REQUIRED: {0}")]
    HelloRequired(String),
    /// `UNSUPPORTED_VERSION`: the daemon does not speak this client's protocol version.
    #[error("UNSUPPORTED_VERSION: {0}")]
    UnsupportedVersion(String),
    /// `UNKNOWN_COMMAND`: the daemon does not know the command.
    #[error("UNKNOWN_COMMAND: {0}")]
    UnknownCommand(String),
    /// `BAD_ARGUMENT`: an argument is missing or out of range.
    #[error("BAD_ARGUMENT: {0}")]
    BadArgument(String),
    /// `TOO_LARGE`: a key or value is over its limit.
    #[error("TOO_LARGE: {0}")]
    TooLarge(String),
    /// `OVERLOADED`: the daemon is at its connection limit, or this connection has the most waiting
    /// requests allowed (SCALED_MAX_IN_FLIGHT); retry later or on another connection.
    #[error("OVERLOADED: {0}")]
    Overloaded(String),
    /// `SHUTTING_DOWN`: the daemon is stopping.
    #[error("SHUTTING_DOWN: {0}")]
    ShuttingDown(String),
    /// `LOCKED`: a try-lock found the lock held.
    #[error("LOCKED: {0}")]
    Locked(String),
    /// `LOCK_TIMEOUT`: the lock was not granted within the wait timeout.
    #[error("LOCK_TIMEOUT: {0}")]
    LockTimeout(String),
    /// `FENCED`: a fenced write carried a stale fencing token.
    #[error("FENCED: {0}")]
    Fenced(String),
    /// `LOCK_LOST`: the lock this token held was lost without its holder letting go (with Redis).
    #[error("LOCK_LOST: {0}")]
    LockLost(String),
    /// `CORRUPTED`: the value in Redis failed its checksum and was not served (with Redis).
    #[error("CORRUPTED: {0}")]
    Corrupted(String),
    /// `UNAVAILABLE`: a backend the daemon needs is down.
    #[error("UNAVAILABLE: {0}")]
    Unavailable(String),
    /// `INTERNAL`: the daemon failed unexpectedly.
    #[error("INTERNAL: {0}")]
    Internal(String),
    /// `TIMEOUT`: the daemon closed the connection because it was too slow (no HELLO, an unfinished
    /// frame, or idle for too long). The client reconnects on its next call.
    #[error("TIMEOUT: {0}")]
    ConnectionTimedOut(String),
    /// `DENIED`: access control refused this client (its uid or gid is not allowed, or its token is
    /// missing or wrong); the daemon closed the connection.
    #[error("DENIED: {0}")]
    Denied(String),
    /// The connection could not be made, or broke.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The connection closed while the request was in flight; whether it was applied is unknown.
    #[error("connection lost while the request was in flight")]
    ConnectionLost,
    /// The daemon answered something this client cannot read.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A connect or a request took longer than the timeout set on the [`crate::ClientBuilder`]. A
    /// request that timed out may still have been applied by the daemon.
    #[error("timed out: {0}")]
    Timeout(String),
}

impl Error {
    /// The protocol error code behind this error, when the daemon sent one.
    pub fn code(&self) -> Option<ErrorCode> {
        Some(match self {
            Error::Malformed(_) => ErrorCode::Malformed,
            Error::FrameTooLarge(_) => ErrorCode::FrameTooLarge,
            Error::HelloRequired(_) => ErrorCode::HelloRequired,
            Error::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            Error::UnknownCommand(_) => ErrorCode::UnknownCommand,
            Error::BadArgument(_) => ErrorCode::BadArgument,
            Error::TooLarge(_) => ErrorCode::TooLarge,
            Error::Overloaded(_) => ErrorCode::Overloaded,
            Error::ShuttingDown(_) => ErrorCode::ShuttingDown,
            Error::Locked(_) => ErrorCode::Locked,
            Error::LockTimeout(_) => ErrorCode::LockTimeout,
            Error::Fenced(_) => ErrorCode::Fenced,
            Error::LockLost(_) => ErrorCode::LockLost,
            Error::Corrupted(_) => ErrorCode::Corrupted,
            Error::Unavailable(_) => ErrorCode::Unavailable,
            Error::Internal(_) => ErrorCode::Internal,
            Error::ConnectionTimedOut(_) => ErrorCode::Timeout,
            Error::Denied(_) => ErrorCode::Denied,
            Error::Io(_) | Error::ConnectionLost | Error::Protocol(_) | Error::Timeout(_) => {
                return None
            }
        })
    }

    /// Builds the typed error for a code.
    pub fn from_code(code: ErrorCode, message: String) -> Error {
        match code {
            ErrorCode::Malformed => Error::Malformed(message),
            ErrorCode::FrameTooLarge => Error::FrameTooLarge(message),
            ErrorCode::HelloRequired => Error::HelloRequired(message),
            ErrorCode::UnsupportedVersion => Error::UnsupportedVersion(message),
            ErrorCode::UnknownCommand => Error::UnknownCommand(message),
            ErrorCode::BadArgument => Error::BadArgument(message),
            ErrorCode::TooLarge => Error::TooLarge(message),
            ErrorCode::Overloaded => Error::Overloaded(message),
            ErrorCode::ShuttingDown => Error::ShuttingDown(message),
            ErrorCode::Locked => Error::Locked(message),
            ErrorCode::LockTimeout => Error::LockTimeout(message),
            ErrorCode::Fenced => Error::Fenced(message),
            ErrorCode::LockLost => Error::LockLost(message),
            ErrorCode::Corrupted => Error::Corrupted(message),
            ErrorCode::Unavailable => Error::Unavailable(message),
            ErrorCode::Internal => Error::Internal(message),
            ErrorCode::Timeout => Error::ConnectionTimedOut(message),
            ErrorCode::Denied => Error::Denied(message),
        }
    }
}

impl From<WireError> for Error {
    fn from(e: WireError) -> Error {
        match ErrorCode::parse(&e.code) {
            Some(code) => Error::from_code(code, e.message),
            None => Error::Protocol(format!("unknown error code {}: {}", e.code, e.message)),
        }
    }
}

/// Shorthand for this crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
