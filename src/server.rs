//! Listeners, the accept loop, the connection limit, background upkeep and graceful shutdown.
//!
//! Shutdown is one mechanism: [`Daemon::shutdown`] is a `CancellationToken`. Cancelling it stops the
//! accept loops and makes every connection stop reading; each connection then finishes the requests it
//! has in flight, writes their answers and closes. A `TaskTracker` knows when the last one is done. If
//! that takes longer than the grace period, the daemon exits anyway.

use std::fs::{self, File, Permissions};
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use scaled_client::proto::ErrorCode;

use crate::config::Config;
use crate::connection;
use crate::daemon::Daemon;

/// How often the background sweeper looks for expired cache entries.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// Open files kept for everything but client connections.
const HEADROOM: u64 = crate::rlimit::HEADROOM;

/// Accept failures (out of file descriptors and the like) are logged at most once a second.
static ACCEPT_FAILED: crate::throttle::Throttle = crate::throttle::Throttle::new();

/// Slots of each shard the sweeper inspects per pass.
const SWEEP_BUDGET: usize = 512;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Another daemon answers on the socket path.
    #[error("another scaled is already serving {0}")]
    AlreadyRunning(PathBuf),
    /// Something that is not a socket sits at the socket path; it is left alone.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// `--tcp` names a non-loopback address without `--tcp-allow-remote`.
    #[error("--tcp {0} is not a loopback address; pass --tcp-allow-remote to allow it")]
    RemoteTcp(SocketAddr),
    /// The Redis settings cannot work (a bad REDIS_URL, too few connections allowed).
    #[error("{0}")]
    Redis(#[from] crate::redis::LinkError),
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// Creating, locking or binding something failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> StartError {
    let what = what.into();
    move |source| StartError::Io { what, source }
}

/// A daemon whose listeners are bound, ready to serve.
pub struct Server {
    daemon: Arc<Daemon>,
    unix: UnixListener,
    tcp: Option<TcpListener>,
    /// The Prometheus endpoint's listener, with `--metrics`.
    metrics: Option<TcpListener>,
    socket_path: PathBuf,
    /// Held for the daemon's life: whoever holds it owns the socket path, so two daemons starting at
    /// once cannot both decide the socket is stale.
    _path_lock: File,
}

impl Server {
    /// Binds the listeners `config` asks for. Must run inside a tokio runtime.
    pub fn bind(config: Config) -> Result<Server, StartError> {
        if let Some(addr) = config.tcp {
            if !addr.ip().is_loopback() && !config.tcp_allow_remote {
                return Err(StartError::RemoteTcp(addr));
            }
        }
        // Before the socket is claimed, so a bad --metrics leaves no socket file behind.
        let metrics = crate::metrics::bind(&config)?;
        let socket_path = config.socket.clone();
        let path_lock = claim_socket_path(&socket_path)?;
        let unix = UnixListener::bind(&socket_path)
            .map_err(io_err(format!("binding {}", socket_path.display())))?;
        fs::set_permissions(&socket_path, Permissions::from_mode(config.socket_mode)).map_err(
            io_err(format!("setting the mode of {}", socket_path.display())),
        )?;
        let tcp = match config.tcp {
            Some(addr) => {
                let listener = std::net::TcpListener::bind(addr)
                    .map_err(io_err(format!("binding tcp {addr}")))?;
                listener
                    .set_nonblocking(true)
                    .map_err(io_err("tcp listener"))?;
                Some(TcpListener::from_std(listener).map_err(io_err("tcp listener"))?)
            }
            None => None,
        };
        Ok(Server {
            daemon: Arc::new(Daemon::new(config)?),
            unix,
            tcp,
            metrics,
            socket_path,
            _path_lock: path_lock,
        })
    }

    /// The shared state, for tests and for the binary to cancel.
    pub fn daemon(&self) -> Arc<Daemon> {
        self.daemon.clone()
    }

    /// The TCP address actually bound (useful with port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until [`Daemon::shutdown`] is cancelled, then drains and removes the socket file.
    pub async fn run(self) {
        self.run_beside(std::future::pending()).await
    }

    /// Like [`Server::run`], polling `beside` in the same future as the accept loops and the drain
    /// until they finish: the service watchdog ([`crate::service::supervise`]) runs here, so that a
    /// serving loop that stops being polled stops its keep-alives too.
    pub async fn run_beside(self, beside: impl std::future::Future<Output = ()>) {
        let beside = async {
            beside.await;
            std::future::pending::<()>().await
        };
        // Serving first: its first poll starts the accept loops before `beside` reports anything.
        tokio::select! {
            biased;
            () = self.serve() => {}
            () = beside => {}
        }
    }

    async fn serve(self) {
        let Server {
            daemon,
            unix,
            tcp,
            metrics,
            socket_path,
            _path_lock,
        } = self;
        tracing::info!(
            socket = %socket_path.display(),
            tcp = ?tcp.as_ref().and_then(|l| l.local_addr().ok()),
            cache_size = daemon.config.cache_size,
            "scaled serving"
        );
        let tracker = TaskTracker::new();
        let serving = crate::rlimit::fit_connections(daemon.config.max_connections, HEADROOM);
        let limit = Arc::new(Semaphore::new(serving));
        let ids = Arc::new(AtomicU64::new(1));

        tracker.spawn(sweep_cache(daemon.clone()));
        tracker.spawn(daemon.locks.clone().run_expiry(daemon.shutdown.clone()));
        if let Some(listener) = metrics {
            tracker.spawn(crate::metrics::serve(
                listener,
                daemon.clone(),
                tracker.clone(),
            ));
        }
        let unix_loop = accept_loop(
            unix,
            daemon.clone(),
            tracker.clone(),
            limit.clone(),
            ids.clone(),
        );
        match tcp {
            Some(tcp) => {
                let tcp_loop = accept_loop(tcp, daemon.clone(), tracker.clone(), limit, ids);
                tokio::join!(unix_loop, tcp_loop);
            }
            None => unix_loop.await,
        }

        tracing::info!(
            in_flight = tracker.len(),
            "shutting down: draining connections"
        );
        tracker.close();
        let grace = daemon.config.shutdown_grace();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                ?grace,
                "connections still busy after the grace period; closing anyway"
            );
        }
        // Every connection's locks went to the releaser as it closed: release them in Redis now.
        daemon.store.finish(grace).await;
        if let Err(e) = fs::remove_file(&socket_path) {
            tracing::warn!(socket = %socket_path.display(), error = %e, "could not remove the socket");
        }
        tracing::info!("scaled stopped");
    }
}

/// Makes sure the socket path is ours to bind: creates its directory (0750: the socket's own mode
/// decides who connects, and nobody else needs to list or add files there), takes the lock file
/// beside it, and removes a stale socket, but never a live daemon's socket or a file that is not a
/// socket. The lock file is 0600: a user who could open it could flock it and block every restart.
fn claim_socket_path(path: &Path) -> Result<File, StartError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .map_err(io_err(format!("creating {}", dir.display())))?;
        }
    }
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io_err(format!(
            "opening {}",
            Path::new(&lock_path).display()
        )))?;
    if lock.try_lock().is_err() {
        return Err(StartError::AlreadyRunning(path.to_path_buf()));
    }
    // A lock file left by an older daemon may have a wider mode; narrow it.
    lock.set_permissions(Permissions::from_mode(0o600))
        .map_err(io_err("setting the lock file's mode"))?;
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(format!("inspecting {}", path.display()))(e)),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(StartError::NotASocket(path.to_path_buf()));
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            // A daemon that does not use the lock file (an older one) still answers: leave it be.
            Ok(_) => return Err(StartError::AlreadyRunning(path.to_path_buf())),
            Err(_) => {
                tracing::info!(socket = %path.display(), "removing stale socket");
                fs::remove_file(path).map_err(io_err(format!("removing {}", path.display())))?;
            }
        },
    }
    Ok(lock)
}

/// A listener whose connections split into a read half and a write half.
trait Listener: Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn accept_split(
        &self,
    ) -> impl std::future::Future<Output = io::Result<(Self::Read, Self::Write)>> + Send;
}

impl Listener for UnixListener {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    async fn accept_split(&self) -> io::Result<(Self::Read, Self::Write)> {
        Ok(self.accept().await?.0.into_split())
    }
}

impl Listener for TcpListener {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    async fn accept_split(&self) -> io::Result<(Self::Read, Self::Write)> {
        let (stream, _) = self.accept().await?;
        // Requests are small and latency-bound; never wait to coalesce them.
        stream.set_nodelay(true)?;
        Ok(stream.into_split())
    }
}

/// Accepts connections until shutdown begins.
async fn accept_loop<L: Listener>(
    listener: L,
    daemon: Arc<Daemon>,
    tracker: TaskTracker,
    limit: Arc<Semaphore>,
    ids: Arc<AtomicU64>,
) {
    loop {
        let accepted = tokio::select! {
            _ = daemon.shutdown.cancelled() => return,
            accepted = listener.accept_split() => accepted,
        };
        match accepted {
            Ok((r, w)) => start_connection(&daemon, &tracker, &limit, &ids, r, w),
            Err(e) => accept_failed(e).await,
        }
    }
}

/// Out of file descriptors and the like: log (rate-limited), and pause so a persistent failure does
/// not spin.
async fn accept_failed(e: io::Error) {
    crate::throttled_warn!(ACCEPT_FAILED, error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

fn start_connection<R, W>(
    daemon: &Arc<Daemon>,
    tracker: &TaskTracker,
    limit: &Arc<Semaphore>,
    ids: &AtomicU64,
    reader: R,
    mut writer: W,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let daemon = daemon.clone();
    let Ok(permit) = limit.clone().try_acquire_owned() else {
        daemon.connections.refused();
        tracker.spawn(async move {
            let mut out = Vec::new();
            connection::respond_unmatched(
                &mut out,
                ErrorCode::Overloaded,
                "connection limit reached; try again later",
            );
            let _ = writer.write_all(&out).await;
            let _ = writer.shutdown().await;
        });
        return;
    };
    let conn_id = ids.fetch_add(1, Ordering::Relaxed);
    tracker.spawn(async move {
        let _open = daemon.connections.opened();
        connection::serve(daemon.clone(), conn_id, reader, writer).await;
        drop(permit);
    });
}

/// Drops expired cache entries in the background, a bounded slice of each shard at a time.
async fn sweep_cache(daemon: Arc<Daemon>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = daemon.shutdown.cancelled() => return,
            _ = tick.tick() => {
                daemon.cache.sweep(Instant::now(), SWEEP_BUDGET);
            }
        }
    }
}
