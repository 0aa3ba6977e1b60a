//! The frame reader: the input is the byte stream a client sends on one connection. It is served by
//! the daemon's own connection loop ([`scaled::connection::serve`]) over in-memory streams instead of
//! a socket, so every frame that decodes is run against a fresh daemon state, and the answers must
//! be whole, decodable frames.

#![no_main]

use libfuzzer_sys::fuzz_target;
use scaled_fuzz::{check_answers, daemon, runtime};

fuzz_target!(|data: &[u8]| {
    let out = runtime().block_on(async {
        let daemon = daemon();
        let mut out = Vec::new();
        scaled::connection::serve(daemon, 1, data, &mut out).await;
        out
    });
    check_answers(&out);
});
