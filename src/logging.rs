//! Where log lines go and which ones are written, set up once at start and changeable on SIGHUP.
//!
//! Lines go to stderr (the journal, under systemd) or, with `--log-file`, to a file opened for
//! appending. SIGHUP reopens that file, so logrotate can move it away and the next line starts a new
//! one; and it can swap the filter (`SCALED_LOG`) without a restart, which would drop every lock.

use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

use crate::config::{Config, LogFormat};

/// Mode of a log file the daemon creates: it may hold keys and client names, so not world-readable.
const LOG_FILE_MODE: u32 = 0o640;

/// The installed logger's handles: what SIGHUP can change.
pub struct Logging {
    /// Swaps the filter in place; events in flight see the old or the new one, never neither.
    filter: reload::Handle<EnvFilter, Registry>,
    /// Where lines are written; reopened on SIGHUP when it is a file.
    sink: LogSink,
}

impl Logging {
    /// Installs the global logger `config` describes. Fails on a bad filter or a log file that
    /// cannot be opened, before anything is served.
    pub fn init(config: &Config) -> Result<Logging, String> {
        let filter = parse_filter(&config.log)?;
        let sink = match &config.log_file {
            Some(path) => LogSink::file(path)
                .map_err(|e| format!("cannot open the log file {}: {e}", path.display()))?,
            None => LogSink::stderr(),
        };
        // Colour codes only for a person at a terminal: a file or the journal would store them as noise.
        let ansi = config.log_file.is_none() && io::stderr().is_terminal();
        let (filter, handle) = reload::Layer::new(filter);
        let lines = fmt::layer().with_writer(sink.clone()).with_ansi(ansi);
        let installed = match config.log_format {
            LogFormat::Text => Registry::default().with(filter).with(lines).try_init(),
            // The event's fields at the top level, so `request_id` is a member of every request's line.
            LogFormat::Json => Registry::default()
                .with(filter)
                .with(
                    lines
                        .json()
                        .flatten_event(true)
                        .with_current_span(true)
                        .with_span_list(false),
                )
                .try_init(),
        };
        installed.map_err(|e| format!("cannot install the logger: {e}"))?;
        Ok(Logging {
            filter: handle,
            sink,
        })
    }

    /// Replaces the filter with `directives` (EnvFilter syntax); on a bad one keeps the old filter.
    pub fn set_filter(&self, directives: &str) -> Result<(), String> {
        let filter = parse_filter(directives)?;
        self.filter
            .reload(filter)
            .map_err(|e| format!("cannot change the log filter: {e}"))
    }

    /// Reopens the log file at its path (after logrotate moved it); nothing to do on stderr.
    /// Returns the path reopened.
    pub fn reopen(&self) -> io::Result<Option<PathBuf>> {
        self.sink.reopen()
    }
}

fn parse_filter(directives: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(directives).map_err(|e| format!("bad log filter `{directives}`: {e}"))
}

/// Where lines are written: stderr, or a file that can be swapped for a fresh one.
#[derive(Clone)]
pub struct LogSink(Arc<Sink>);

/// The destination behind a [`LogSink`].
enum Sink {
    /// The default: the journal under systemd, the terminal by hand.
    Stderr,
    /// `--log-file`.
    File {
        /// The path given, opened again on reopen.
        path: PathBuf,
        /// The file now. A mutex so a reopen swaps it between two lines, never inside one.
        file: Mutex<File>,
    },
}

impl LogSink {
    fn stderr() -> LogSink {
        LogSink(Arc::new(Sink::Stderr))
    }

    fn file(path: &Path) -> io::Result<LogSink> {
        Ok(LogSink(Arc::new(Sink::File {
            path: path.to_path_buf(),
            file: Mutex::new(open_log(path)?),
        })))
    }

    fn reopen(&self) -> io::Result<Option<PathBuf>> {
        match &*self.0 {
            Sink::Stderr => Ok(None),
            Sink::File { path, file } => {
                // Opened before the swap: if it fails, lines keep going to the old file.
                let fresh = open_log(path)?;
                *file.lock() = fresh;
                Ok(Some(path.clone()))
            }
        }
    }
}

fn open_log(path: &Path) -> io::Result<File> {
    File::options()
        .create(true)
        .append(true)
        .mode(LOG_FILE_MODE)
        .open(path)
}

impl<'a> MakeWriter<'a> for LogSink {
    type Writer = SinkWriter<'a>;

    fn make_writer(&'a self) -> SinkWriter<'a> {
        SinkWriter(&self.0)
    }
}

/// Writes one formatted line to the sink; made per event, so it only borrows it.
pub struct SinkWriter<'a>(&'a Sink);

impl Write for SinkWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0 {
            Sink::Stderr => io::stderr().write(buf),
            Sink::File { file, .. } => file.lock().write(buf),
        }
    }

    /// One lock for the whole line, so lines of two threads never interleave in the file.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self.0 {
            Sink::Stderr => io::stderr().lock().write_all(buf),
            Sink::File { file, .. } => file.lock().write_all(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.0 {
            Sink::Stderr => io::stderr().flush(),
            Sink::File { file, .. } => file.lock().flush(),
        }
    }
}
