//! `scaled-bench`: the load generator for scaled, and the measuring stick of its benchmarks.
//!
//! The map, from the command line down:
//!
//! - [`opts`]: the subcommands and their options.
//! - [`workload`]: one module per workload. [`workload::session`] is the original architecture's
//!   load test (LOCK, GET, change, SET, UNLOCK per message), checked for lost updates and mixed
//!   answers; [`workload::requests`] (GET, SET, PING), [`workload::locks`] (LOCK+UNLOCK pairs) and
//!   [`workload::handoff`] (one contended lock) are closed loops in the manner of redis-benchmark.
//! - [`net`]: a Unix or TCP connection with its buffers; [`wire`]: scaled's protocol written and read
//!   without allocating; [`resp`]: the Redis reference, for `--resp`.
//! - [`stats`]: the daemon's STATS before and after a run.
//! - [`report`]: histograms, the run's clock and CPU, the progress line, and what a run hands back.
//! - [`proxy`]: `delay-proxy`, which puts a TCP server "across the network" on one machine.
//!
//! [`run`] is the whole command line as a function, so tests run exactly what the binary runs.

pub mod net;
pub mod opts;
pub mod proxy;
pub mod report;
pub mod resp;
pub mod stats;
pub mod wire;
pub mod workload;

use std::ffi::OsString;
use std::io::Write;

use clap::Parser;

use opts::{Cli, Command};
use report::Outcome;
use workload::requests::Kind;

/// Exit status of a run that failed its checks or could not run.
pub const EXIT_FAILED: u8 = 1;

/// Exit status of a command line clap refused.
pub const EXIT_USAGE: u8 = 2;

/// Runs the command line `args` (program name first), writing the report (or with `--json`, one JSON
/// object) to `out` and problems to stderr. Returns the exit status: 0 when the run passed its checks.
pub fn run<I, T>(args: I, out: &mut dyn Write) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_USAGE } else { 0 };
        }
    };
    let (threads, json) = match &cli.command {
        Command::Session(o) => (o.target.threads, o.target.json),
        Command::Get(o) | Command::Set(o) | Command::Ping(o) => (o.target.threads, o.target.json),
        Command::Lock(o) => (o.target.threads, o.target.json),
        Command::Handoff(o) => (o.target.threads, o.target.json),
        Command::DelayProxy(o) => {
            return match proxy::run(o) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("scaled-bench: {e}");
                    EXIT_FAILED
                }
            };
        }
    };
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads as usize)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("scaled-bench: cannot start the runtime: {e}");
            return EXIT_FAILED;
        }
    };
    let outcome: Result<Outcome, String> = runtime.block_on(async move {
        match cli.command {
            Command::Session(o) => workload::session::run(o).await,
            Command::Get(o) => workload::requests::run(Kind::Get, o).await,
            Command::Set(o) => workload::requests::run(Kind::Set, o).await,
            Command::Ping(o) => workload::requests::run(Kind::Ping, o).await,
            Command::Lock(o) => workload::locks::run(o).await,
            Command::Handoff(o) => workload::handoff::run(o).await,
            Command::DelayProxy(_) => Err("delay-proxy runs without the runtime".into()),
        }
    });
    match outcome {
        Ok(outcome) => {
            let written = if json {
                writeln!(out, "{}", outcome.json)
            } else {
                write!(out, "{}", outcome.text)
            };
            if let Err(e) = written.and_then(|()| out.flush()) {
                eprintln!("scaled-bench: writing the report: {e}");
                return EXIT_FAILED;
            }
            if outcome.passed {
                0
            } else {
                EXIT_FAILED
            }
        }
        Err(e) => {
            eprintln!("scaled-bench: {e}");
            EXIT_FAILED
        }
    }
}
