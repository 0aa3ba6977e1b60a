//! What the daemon does on each signal it handles.
//!
//! - SIGTERM or SIGINT: `STOPPING=1`, then the graceful drain ([`Daemon::shutdown`]).
//! - A second SIGTERM or SIGINT during the drain: exit at once with status 128 + the signal's number
//!   (143 for SIGTERM, 130 for SIGINT), as a shell reports a process the signal ended. Requests in
//!   flight get no answer; their connections close with the process, which releases their local locks
//!   (locks in Redis expire with their lease).
//! - SIGHUP: reopen the log file (`--log-file`), and read the environment file (`--env-file`) again:
//!   a changed `SCALED_LOG` is applied at once; any other changed setting is logged as taking effect at
//!   the next restart. Only the log filter is reloaded because every other setting sizes something
//!   already built (the cache's shards, the budgets, the listeners, the Redis link) or is a promise
//!   made to connected clients (leases, timeouts), and changing those under live connections could
//!   break what was promised.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::CommandFactory;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::daemon::Daemon;
use crate::logging::Logging;
use crate::notify::Notifier;

/// The setting SIGHUP applies without a restart.
const RELOADABLE: &str = "SCALED_LOG";

/// Installs the handlers and starts the task that acts on them. Must run inside a tokio runtime.
pub fn handle(daemon: Arc<Daemon>, notifier: Arc<Notifier>, logging: Logging) -> io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut reloader = Reloader::new(&daemon.config, logging);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(()) = term.recv() => stop(&daemon, &notifier, "SIGTERM", libc::SIGTERM),
                Some(()) = int.recv() => stop(&daemon, &notifier, "SIGINT", libc::SIGINT),
                Some(()) = hup.recv() => reloader.reload(),
                else => return,
            }
        }
    });
    Ok(())
}

/// Starts the drain, or, when it has begun already, ends the daemon at once.
fn stop(daemon: &Daemon, notifier: &Notifier, name: &str, number: i32) {
    if daemon.shutdown.is_cancelled() {
        tracing::warn!(
            signal = name,
            "second stop signal during the drain: exiting at once"
        );
        // The lock file and the listener go with the process; the socket file would be found stale
        // by the next start, but removing it now spares clients a connection to nobody.
        let _ = std::fs::remove_file(&daemon.config.socket);
        std::process::exit(128 + number);
    }
    tracing::info!(signal = name, "stop signal received; draining");
    daemon.begin_shutdown();
    notifier.send(&format!(
        "STOPPING=1\nSTATUS={}",
        crate::service::status_line(daemon)
    ));
}

/// What SIGHUP changes, and what it compares the environment file against.
struct Reloader {
    /// The installed logger: its file is reopened and its filter swapped.
    logging: Logging,
    /// `--env-file`, if given.
    env_file: Option<PathBuf>,
    /// Each setting's value when the daemon started (its environment), or as last applied: a value
    /// in the file that differs from it is a change.
    baseline: HashMap<String, String>,
    /// The names of every setting's environment variable, so other variables in the file are not
    /// reported as settings.
    settings: Vec<String>,
}

impl Reloader {
    fn new(config: &Config, logging: Logging) -> Reloader {
        let settings: Vec<String> = Config::command()
            .get_arguments()
            .filter_map(|a| a.get_env())
            .filter_map(|e| e.to_str())
            .map(str::to_string)
            .collect();
        let baseline = settings
            .iter()
            .filter_map(|name| Some((name.clone(), std::env::var(name).ok()?)))
            .collect();
        Reloader {
            logging,
            env_file: config.env_file.clone(),
            baseline,
            settings,
        }
    }

    fn reload(&mut self) {
        tracing::info!("SIGHUP received: reopening the log and reloading settings");
        match self.logging.reopen() {
            Ok(Some(path)) => tracing::info!(file = %path.display(), "log file reopened"),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "cannot reopen the log file; still writing to the old one")
            }
        }
        let Some(path) = self.env_file.clone() else {
            tracing::info!("no --env-file: no settings to reload");
            return;
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot read the environment file; settings unchanged");
                return;
            }
        };
        for (name, value) in parse_env_file(&text) {
            if !self.settings.contains(&name) || self.baseline.get(&name) == Some(&value) {
                continue;
            }
            self.apply(&path, name, value);
        }
    }

    fn apply(&mut self, file: &Path, name: String, value: String) {
        if name != RELOADABLE {
            tracing::warn!(setting = %name, file = %file.display(), "setting changed; it takes effect at the next restart");
            return;
        }
        match self.logging.set_filter(&value) {
            Ok(()) => {
                tracing::info!(setting = %name, filter = %value, "log filter changed");
                self.baseline.insert(name, value);
            }
            Err(e) => tracing::error!(setting = %name, error = %e, "log filter unchanged"),
        }
    }
}

/// `NAME=value` lines as systemd's `EnvironmentFile=` reads them: blank lines and lines starting with
/// `#` or `;` skipped, and a value in matching single or double quotes unquoted.
fn parse_env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with(['#', ';']))
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.trim().to_string(), unquote(value.trim()).to_string()))
        .collect()
}

fn unquote(value: &str) -> &str {
    for quote in ['"', '\''] {
        if let Some(inner) = value
            .strip_prefix(quote)
            .and_then(|v| v.strip_suffix(quote))
        {
            return inner;
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_files_read_as_systemd_reads_them() {
        let text = "# comment\n; also\n\nSCALED_LOG=debug\n CACHE_SIZE = 20 \nREDIS_URL=\"redis://h:1\"\nQ='x y'\nnot a setting\n";
        assert_eq!(
            parse_env_file(text),
            vec![
                ("SCALED_LOG".into(), "debug".into()),
                ("CACHE_SIZE".into(), "20".into()),
                ("REDIS_URL".into(), "redis://h:1".into()),
                ("Q".into(), "x y".into()),
            ]
        );
    }
}
