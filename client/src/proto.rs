//! The wire protocol: frame limits, the request and response envelopes, and the closed list of error
//! codes. `proto-spec.md` at the top of the repository says the same thing in prose and hex; the daemon,
//! this client and `scalectl` all use these definitions, so there is one source of truth in code.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks, sent in HELLO.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame body (the bytes after the 4-byte length) either side accepts.
/// A longer length prefix closes the connection, because the stream cannot be resynchronised cheaply.
pub const MAX_FRAME_LEN: usize = 2 * 1024 * 1024;

/// Largest key, in bytes of UTF-8, for cache keys and lock keys.
pub const MAX_KEY_LEN: usize = 1024;

/// Largest cache value, in bytes.
pub const MAX_VALUE_LEN: usize = 1024 * 1024;

/// Longest client name HELLO accepts, in bytes: it is shown as the owner of every lock the connection
/// holds, so it must stay small for LOCKS answers to stay small.
pub const MAX_CLIENT_NAME_LEN: usize = 256;

/// Most rows one LOCKS answer holds; a larger `limit` is taken as this.
pub const MAX_LOCKS_PAGE: u64 = 1000;

/// Longest delay PING accepts (`delay_ms`), so a test tool cannot park a request forever.
pub const MAX_PING_DELAY_MS: u64 = 60_000;

/// The commands of the protocol. On the wire each is its upper-case name as a MessagePack str.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum CommandName {
    /// Opens a connection: protocol version and client name.
    Hello,
    /// Liveness check, optionally answered after a delay.
    Ping,
    /// Reads a cache entry.
    Get,
    /// Writes a cache entry, with an optional TTL and fence.
    Set,
    /// Removes a cache entry, with an optional fence.
    Del,
    /// Takes a session lock.
    Lock,
    /// Releases a session lock.
    Unlock,
    /// Renews a lock's lease.
    Extend,
    /// Lists the locks held.
    Locks,
    /// The daemon's counters.
    Stats,
    /// Any name this version does not know. Never sent by this crate; answered with `UNKNOWN_COMMAND`.
    Unknown,
}

impl CommandName {
    /// Every command a client may send, in the order STATS reports them.
    pub const ALL: [CommandName; 10] = [
        CommandName::Hello,
        CommandName::Ping,
        CommandName::Get,
        CommandName::Set,
        CommandName::Del,
        CommandName::Lock,
        CommandName::Unlock,
        CommandName::Extend,
        CommandName::Locks,
        CommandName::Stats,
    ];

    /// The upper-case wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandName::Hello => "HELLO",
            CommandName::Ping => "PING",
            CommandName::Get => "GET",
            CommandName::Set => "SET",
            CommandName::Del => "DEL",
            CommandName::Lock => "LOCK",
            CommandName::Unlock => "UNLOCK",
            CommandName::Extend => "EXTEND",
            CommandName::Locks => "LOCKS",
            CommandName::Stats => "STATS",
            CommandName::Unknown => "UNKNOWN",
        }
    }
}

impl fmt::Display for CommandName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A fence on a write: the write is refused with `FENCED` unless `token` is the newest fencing token
/// granted on the lock `lock`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Fence {
    /// The lock key whose grants fence this write.
    pub lock: String,
    /// The fencing token the writer was granted.
    pub token: u64,
}

/// The arguments of every command, as one map whose fields are all optional. Each command reads the
/// fields it needs and ignores the rest, so a newer client can send fields an older daemon does not know.
/// Encoded with serde; the daemon decodes it with the protocol's own stricter reader.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Args {
    /// HELLO: the protocol version the client speaks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// HELLO: a name for the client, shown in logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// GET, SET, DEL, LOCK, UNLOCK, EXTEND: the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// SET: the value (bin; a str is accepted and stored as its UTF-8 bytes).
    #[serde(default, with = "serde_bytes", skip_serializing_if = "Option::is_none")]
    pub value: Option<Vec<u8>>,
    /// SET: time to live in milliseconds (0 = no expiry). LOCK, EXTEND: lease length in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// LOCK: how long to wait in the queue before `LOCK_TIMEOUT`, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
    /// LOCK: fail at once with `LOCKED` instead of waiting.
    #[serde(default, rename = "try", skip_serializing_if = "Option::is_none")]
    pub try_only: Option<bool>,
    /// LOCK: keep the lease alive for as long as this connection is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_renew: Option<bool>,
    /// UNLOCK, EXTEND: the owner token LOCK returned. HELLO: the shared secret a TCP listener asks
    /// for (`--auth-token-file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// SET, DEL: refuse the write unless this fencing token is still the newest on its lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<Fence>,
    /// PING: answer only after this many milliseconds (at most [`MAX_PING_DELAY_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// LOCKS: the most rows to answer (at most [`MAX_LOCKS_PAGE`]). With it or `after`, LOCKS answers a
    /// page map rather than a bare array.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// LOCKS: list the locks whose keys come after this one (the `next` of the previous page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

impl Args {
    fn is_empty(&self) -> bool {
        *self == Args::default()
    }
}

/// The request envelope: one MessagePack map per frame.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Request {
    /// Chosen by the client and echoed in the response; lets many requests share a connection.
    pub id: u64,
    /// Which command to run.
    pub cmd: CommandName,
    /// The command's arguments; may be omitted when empty.
    #[serde(skip_serializing_if = "Args::is_empty")]
    pub args: Args,
    /// The app's session this request belongs to, carried into the daemon's logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// The app's user this request is made for, carried into the daemon's logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
}

impl Request {
    /// A request with no arguments and no context.
    pub fn new(id: u64, cmd: CommandName) -> Request {
        Request {
            id,
            cmd,
            args: Args::default(),
            session_id: None,
            user_id: None,
        }
    }

    /// The body of a frame carrying this request (without the length prefix).
    pub fn to_msgpack(&self) -> Vec<u8> {
        // Writing a struct of strings, integers and byte strings into a Vec cannot fail.
        rmp_serde::to_vec_named(self).unwrap_or_default()
    }
}

/// The closed list of error codes a response may carry. On the wire each is its upper-case name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The frame is not a MessagePack request envelope (or is empty, or has bytes after the map).
    Malformed,
    /// The length prefix is over [`MAX_FRAME_LEN`]; the daemon closes the connection after this answer.
    FrameTooLarge,
    /// A command was sent before HELLO.
    HelloRequired,
    /// HELLO asked for a protocol version the daemon does not speak.
    UnsupportedVersion,
    /// The command name is not one the daemon knows.
    UnknownCommand,
    /// A required argument is missing or out of range.
    BadArgument,
    /// A key or value is over its size limit.
    TooLarge,
    /// The daemon is at its connection limit (id 0, and the connection is closed), or the request
    /// would wait while its connection already has the most waiting requests allowed (the request's
    /// id; the request had no effect).
    Overloaded,
    /// The daemon is shutting down and takes no new work.
    ShuttingDown,
    /// LOCK in try mode found the lock held.
    Locked,
    /// LOCK waited for its whole wait timeout without being granted.
    LockTimeout,
    /// A fenced write carried a fencing token older than the newest grant on its lock.
    Fenced,
    /// With Redis only: UNLOCK or EXTEND named the token of a lock lost without its holder letting go
    /// (a renewal in Redis failed).
    LockLost,
    /// With Redis only: a value read from Redis failed its checksum; it was not served.
    Corrupted,
    /// With Redis only: Redis, which the command needs, cannot be reached or did not answer in time.
    Unavailable,
    /// A bug or an unexpected internal failure; the message says more.
    Internal,
    /// The connection was too slow and is closed after this answer (id 0): no HELLO within
    /// SCALED_HELLO_TIMEOUT, a frame not finished within SCALED_FRAME_TIMEOUT, or nothing done for
    /// SCALED_IDLE_TIMEOUT.
    Timeout,
    /// Access control refused the peer: its uid or gid is not allowed on the Unix socket (id 0, then
    /// closed), or HELLO on an authenticated listener had no token or a wrong one (the HELLO's id,
    /// then closed). Only a daemon configured with access control sends it.
    Denied,
}

impl ErrorCode {
    /// Every code, in the order proto-spec.md lists them.
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::Malformed,
        ErrorCode::FrameTooLarge,
        ErrorCode::HelloRequired,
        ErrorCode::UnsupportedVersion,
        ErrorCode::UnknownCommand,
        ErrorCode::BadArgument,
        ErrorCode::TooLarge,
        ErrorCode::Overloaded,
        ErrorCode::ShuttingDown,
        ErrorCode::Locked,
        ErrorCode::LockTimeout,
        ErrorCode::Fenced,
        ErrorCode::LockLost,
        ErrorCode::Corrupted,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::Timeout,
        ErrorCode::Denied,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "MALFORMED",
            ErrorCode::FrameTooLarge => "FRAME_TOO_LARGE",
            ErrorCode::HelloRequired => "HELLO_REQUIRED",
            ErrorCode::UnsupportedVersion => "UNSUPPORTED_VERSION",
            ErrorCode::UnknownCommand => "UNKNOWN_COMMAND",
            ErrorCode::BadArgument => "BAD_ARGUMENT",
            ErrorCode::TooLarge => "TOO_LARGE",
            ErrorCode::Overloaded => "OVERLOADED",
            ErrorCode::ShuttingDown => "SHUTTING_DOWN",
            ErrorCode::Locked => "LOCKED",
            ErrorCode::LockTimeout => "LOCK_TIMEOUT",
            ErrorCode::Fenced => "FENCED",
            ErrorCode::LockLost => "LOCK_LOST",
            ErrorCode::Corrupted => "CORRUPTED",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::Denied => "DENIED",
        }
    }

    /// Parses a wire name; `None` for a name outside the list.
    pub fn parse(name: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `err` member of a failed response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// One of the [`ErrorCode`] names.
    pub code: String,
    /// A sentence for people; never parsed.
    pub message: String,
}

/// The response envelope, as a client decodes it.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Response {
    /// The id of the request this answers; 0 when the request's id could not be read.
    pub id: u64,
    /// The UUID the daemon gave this request, in its logs too.
    pub request_id: String,
    /// How long the daemon spent on the request, in microseconds.
    pub elapsed_us: u64,
    /// True when a daemon configured with Redis made this answer without it (the optional `degraded`
    /// member); false when the member is absent, as it always is from a standalone daemon.
    #[serde(default)]
    pub degraded: bool,
    /// The result; `nil` when absent (GET of a missing key answers `ok: nil`).
    #[serde(default = "nil")]
    pub ok: rmpv::Value,
    /// Present instead of `ok` when the request failed.
    #[serde(default)]
    pub err: Option<WireError>,
}

fn nil() -> rmpv::Value {
    rmpv::Value::Nil
}

impl Response {
    /// Decodes a frame body.
    pub fn decode(body: &[u8]) -> Result<Response, rmp_serde::decode::Error> {
        rmp_serde::from_slice(body)
    }
}

/// Writes the start of a response map into `out`: the map header and the `id`, `request_id` and
/// `elapsed_us` members. The caller then writes either [`write_ok_key`] and a value, or [`write_err`].
/// Writing into a `Vec` cannot fail, so the results of the `rmp` calls are ignored.
pub fn write_response_head(out: &mut Vec<u8>, id: u64, request_id: &str, elapsed_us: u64) {
    write_head(out, id, request_id, elapsed_us, false);
}

/// Like [`write_response_head`], for an answer made without Redis by a daemon configured with it: a
/// five-member map whose fourth member is `degraded: true`.
pub fn write_degraded_response_head(out: &mut Vec<u8>, id: u64, request_id: &str, elapsed_us: u64) {
    write_head(out, id, request_id, elapsed_us, true);
}

fn write_head(out: &mut Vec<u8>, id: u64, request_id: &str, elapsed_us: u64, degraded: bool) {
    let _ = rmp::encode::write_map_len(out, if degraded { 5 } else { 4 });
    let _ = rmp::encode::write_str(out, "id");
    let _ = rmp::encode::write_uint(out, id);
    let _ = rmp::encode::write_str(out, "request_id");
    let _ = rmp::encode::write_str(out, request_id);
    let _ = rmp::encode::write_str(out, "elapsed_us");
    let _ = rmp::encode::write_uint(out, elapsed_us);
    if degraded {
        let _ = rmp::encode::write_str(out, "degraded");
        let _ = rmp::encode::write_bool(out, true);
    }
}

/// Writes the `ok` key; the value follows.
pub fn write_ok_key(out: &mut Vec<u8>) {
    let _ = rmp::encode::write_str(out, "ok");
}

/// Writes the `err` member: `{code, message}`.
pub fn write_err(out: &mut Vec<u8>, code: ErrorCode, message: &str) {
    let _ = rmp::encode::write_str(out, "err");
    let _ = rmp::encode::write_map_len(out, 2);
    let _ = rmp::encode::write_str(out, "code");
    let _ = rmp::encode::write_str(out, code.as_str());
    let _ = rmp::encode::write_str(out, "message");
    let _ = rmp::encode::write_str(out, message);
}
