//! PING: answers "PONG", at once or after `delay_ms`.

use std::time::Duration;

use scaled_client::proto::{Args, ErrorCode, MAX_PING_DELAY_MS};

use super::{Answer, CommandError, Outcome, Reply};

pub fn run(args: Args) -> Outcome {
    match args.delay_ms {
        None | Some(0) => Outcome::Done(Ok(Reply::Text("PONG")).into()),
        Some(ms) if ms > MAX_PING_DELAY_MS => Outcome::failed(CommandError::new(
            ErrorCode::BadArgument,
            format!("delay_ms {ms} is over the limit of {MAX_PING_DELAY_MS}"),
        )),
        Some(ms) => Outcome::Later(Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Answer::from(Ok(Reply::Text("PONG")))
        })),
    }
}
