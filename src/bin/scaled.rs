//! The daemon's entry point: parse the configuration, bind, tell the service manager, serve until
//! SIGTERM or SIGINT, drain, exit 0. Signals are handled in [`scaled::signals`]; what systemd is told,
//! in [`scaled::service`].

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use scaled::config::Config;
use scaled::logging::Logging;
use scaled::notify::Notifier;
use scaled::server::Server;

fn main() -> ExitCode {
    scaled::heap::tune();
    let config = Config::parse();
    if config.print_config {
        match serde_json::to_string_pretty(&config) {
            Ok(json) => println!("{json}"),
            Err(e) => eprintln!("scaled: cannot print the configuration: {e}"),
        }
        return ExitCode::SUCCESS;
    }
    let logging = match Logging::init(&config) {
        Ok(logging) => logging,
        Err(e) => {
            eprintln!("scaled: {e}");
            return ExitCode::from(2);
        }
    };
    let notifier = Arc::new(Notifier::from_env());
    notifier.status("starting");

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
                notifier.status(&format!("failed to start: {e}"));
                return ExitCode::FAILURE;
            }
        };
        let daemon = server.daemon();
        if let Err(e) = scaled::signals::handle(daemon.clone(), notifier.clone(), logging) {
            eprintln!("scaled: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
        server
            .run_beside(scaled::service::supervise(daemon, notifier.clone()))
            .await;
        notifier.status("stopped");
        ExitCode::SUCCESS
    })
}
