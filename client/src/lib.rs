//! Async client for `scaled`, the sidecar daemon that gives the app servers on a host a shared cache,
//! session locks and request metrics over a Unix socket.
//!
//! - [`proto`]: the wire protocol (frame limits, request and response envelopes, error codes), shared
//!   with the daemon; `proto-spec.md` describes the same thing byte for byte.
//! - [`frame`]: the 4-byte length prefix that delimits frames.
//! - [`Client`]: one connection carrying any number of concurrent callers, reconnecting on failure.
//! - [`LockGuard`]: a session lock, released on drop, carrying its fencing token.
//! - [`Error`]: one variant per protocol error code, plus local failures.
//! - [`answers`]: the maps the daemon answers with (STATS, LOCKS, grants, HELLO) as typed structs.
//! - [`ClientBuilder`]: a client's name and its connect and request timeouts.
//!
//! ```no_run
//! # async fn demo() -> scaled_client::Result<()> {
//! let client = scaled_client::Client::connect_unix("/run/scaled/scaled.sock").await?;
//! client.set("session:abc", b"state", None).await?;
//! assert_eq!(client.get("session:abc").await?.as_deref(), Some(&b"state"[..]));
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs, missing_debug_implementations)]

pub mod answers;
mod client;
mod decode;
mod error;
pub mod frame;
mod lock;
pub mod proto;

pub use answers::{Grant, LockInfo, LocksPage, Stats, Welcome};
pub use client::{Client, ClientBuilder, Endpoint};
pub use decode::decode_request;
pub use error::{Error, Result};
pub use lock::{LockGuard, LockOptions, LockStatus};
pub use proto::{ErrorCode, MAX_FRAME_LEN, MAX_KEY_LEN, MAX_VALUE_LEN, PROTOCOL_VERSION};
