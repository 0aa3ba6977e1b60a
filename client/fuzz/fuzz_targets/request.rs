//! The request decoder: the input is one frame body. What decodes is dispatched by
//! [`scaled::cmd::dispatch`], as a connection does, to a fresh daemon state on a connection that has
//! already said HELLO (so every command is reached, not just HELLO), and its answer is encoded as a
//! connection encodes it. A request that would wait is polled once and dropped, which is what a
//! connection does to its waiting requests when it closes.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use scaled::cmd::{dispatch, Outcome, Peer};
use scaled::connection::write_answer;
use scaled::context::RequestContext;
use scaled_client::decode_request;
use scaled_fuzz::{check_answers, daemon, runtime};
use tokio::time::Instant;

fuzz_target!(|data: &[u8]| {
    let request = match decode_request(data) {
        Ok(request) => request,
        Err(_) => return,
    };
    let out = runtime().block_on(async {
        let daemon = daemon();
        let mut peer = Peer::new(1);
        peer.greeted = request.cmd != scaled_client::proto::CommandName::Hello;
        let now = Instant::now();
        let ctx = RequestContext::begin(
            peer.conn_id,
            request.id,
            Some(request.cmd),
            request.session_id.as_deref(),
            request.user_id.as_deref(),
            now,
        );
        let answer = match dispatch(&daemon, &mut peer, request, now) {
            Outcome::Done(answer) => Some(answer),
            Outcome::Later(pending) | Outcome::Remote(pending) | Outcome::Counted(pending) => {
                tokio::time::timeout(Duration::ZERO, pending).await.ok()
            }
        };
        let mut out = Vec::new();
        if let Some(answer) = answer {
            write_answer(
                &mut out,
                &ctx,
                ctx.elapsed_us(Instant::now()),
                &answer.result,
                answer.degraded,
            );
        }
        out
    });
    check_answers(&out);
});
