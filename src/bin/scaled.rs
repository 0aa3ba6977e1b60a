//! The daemon's entry point: parse the configuration, bind, serve until SIGTERM or SIGINT, drain, exit 0.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

use scaled::config::{Config, LogFormat};
use scaled::server::Server;

fn main() -> ExitCode {
    let config = Config::parse();
    if config.print_config {
        match serde_json::to_string_pretty(&config) {
            Ok(json) => println!("{json}"),
            Err(e) => eprintln!("scaled: cannot print the configuration: {e}"),
        }
        return ExitCode::SUCCESS;
    }
    let filter = match EnvFilter::try_new(&config.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("scaled: bad --log filter `{}`: {e}", config.log);
            return ExitCode::from(2);
        }
    };
    // Colour codes only for a person at a terminal: a file or the journal would store them as noise.
    let ansi = std::io::stderr().is_terminal();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match config.log_format {
        LogFormat::Text => logs.init(),
        // The event's fields at the top level, so `request_id` is a member of every request's line.
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }

    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // The blocking pool decodes large frames off the serving threads; a few threads are plenty, and
    // the bound keeps many large frames at once from becoming many threads.
    builder.max_blocking_threads(4);
    if config.worker_threads > 0 {
        builder.worker_threads(config.worker_threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("scaled: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let server = match Server::bind(config) {
            Ok(server) => server,
            Err(e) => {
                eprintln!("scaled: {e}");
                return ExitCode::FAILURE;
            }
        };
        let daemon = server.daemon();
        let (mut term, mut int) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(t), Ok(i)) => (t, i),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("scaled: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
            daemon.shutdown.cancel();
        });
        server.run().await;
        ExitCode::SUCCESS
    })
}
