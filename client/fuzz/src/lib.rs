//! What the fuzz targets share: a fresh daemon state per input, and the check every answer must pass.
//!
//! A fresh state per input keeps each run a function of its input alone, so libFuzzer can replay and
//! minimize what it finds. The state is the daemon's own ([`scaled::daemon::Daemon`]), standalone (no
//! Redis), with a small cache and small lock limits so that eviction and the limits are reached by
//! short inputs too.

use std::sync::{Arc, LazyLock};

use bytes::BytesMut;
use scaled::config::Config;
use scaled::daemon::Daemon;
use scaled_client::frame::take_frame;
use scaled_client::proto::{ErrorCode, Response, MAX_FRAME_LEN};
use tokio::runtime::Runtime;

/// A fresh runtime for each input, dropped with it: whatever tasks an input leaves behind (a
/// connection's cancelled waits, a departing connection's release slices) go with the runtime, so
/// neither memory nor work carries over from one input to the next. Building one costs tens of
/// microseconds, a small part of an input's run through the whole connection loop.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Settings parsed once: the defaults, but a cache and lock table small enough for a short input to
/// fill them.
static CONFIG: LazyLock<Config> = LazyLock::new(|| {
    use clap::Parser;
    Config::try_parse_from([
        "scaled",
        "--cache-size",
        "8",
        "--cache-max-bytes",
        "4096",
        "--max-locks",
        "4",
        "--max-waiters",
        "2",
        "--max-in-flight",
        "4",
        "--max-waiting",
        "8",
    ])
    .expect("the fuzz settings parse")
});

/// A fresh standalone daemon state. Call inside a runtime from [`runtime`].
pub fn daemon() -> Arc<Daemon> {
    Arc::new(Daemon::new(CONFIG.clone()).expect("a standalone daemon needs no Redis"))
}

/// Checks the daemon's output stream: whole frames only, each a response envelope a client decodes,
/// none an `INTERNAL` error (the daemon's own fault, never the input's).
pub fn check_answers(out: &[u8]) {
    let mut buf = BytesMut::from(out);
    while !buf.is_empty() {
        let body = take_frame(&mut buf, MAX_FRAME_LEN)
            .expect("an answer within the frame limit")
            .expect("answers are whole frames");
        let response = Response::decode(&body).expect("an answer a client can decode");
        if let Some(err) = &response.err {
            let code = ErrorCode::parse(&err.code).expect("an error code from the closed list");
            assert_ne!(
                code,
                ErrorCode::Internal,
                "INTERNAL answer: {}",
                err.message
            );
        }
    }
}
