//! The async client: one connection shared by any number of concurrent callers, each request matched to
//! its caller by id, reconnecting when the connection breaks.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::answers::{decode, Grant, Stats, Welcome};
use crate::error::{Error, Result};
use crate::frame::{push_frame, take_frame};
use crate::proto::{Args, CommandName, Fence, Request, Response, MAX_FRAME_LEN, PROTOCOL_VERSION};

/// Where the daemon listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP address, `host:port`.
    Tcp(String),
}

/// The id of HELLO on a new connection. HELLO is answered before any other request is sent, so it
/// cannot collide; 0 is left to the daemon's connection-level errors.
const HELLO_ID: u64 = 1;

/// How many encoded requests may queue for the writer before callers wait.
const OUTBOX_DEPTH: usize = 4096;

/// Callers waiting for an answer, by request id; `None` once the connection is gone.
type Pending = Mutex<Option<HashMap<u64, Waiter>>>;

/// A caller waiting for its answer.
struct Waiter {
    tx: oneshot::Sender<Response>,
    /// For a LOCK, its key: if the caller gives up before the grant arrives, the reader gives the
    /// grant back with an UNLOCK, so a cancelled `lock()` never leaves a lock held.
    lock_key: Option<String>,
}

/// One live connection: a writer task fed through `outbox`, and a reader task that hands each response to
/// the caller registered under its id.
struct Conn {
    /// Encoded frames for the writer task, which batches them into as few writes as it can.
    outbox: mpsc::Sender<Vec<u8>>,
    /// Callers waiting for an answer. The reader sets it to `None` when the connection ends, which both
    /// fails everyone waiting and tells new callers to reconnect.
    pending: Arc<Pending>,
    /// What HELLO answered on this connection: the limits the daemon promises.
    welcome: Welcome,
}

impl Conn {
    fn is_open(&self) -> bool {
        self.pending.lock().map(|p| p.is_some()).unwrap_or(false)
    }
}

/// The state all clones of a [`Client`] share.
struct Shared {
    endpoint: Endpoint,
    /// Sent in HELLO so the daemon's logs can say who is talking.
    name: String,
    /// Sent in HELLO as `token`: the shared secret a TCP listener asks for.
    token: Option<String>,
    /// Longest a connect plus its HELLO may take; `None` waits as long as the OS does.
    connect_timeout: Option<Duration>,
    /// Longest a request may wait for its answer beyond the wait it asked for itself (a LOCK's
    /// `wait`, a PING's delay); `None` waits for as long as the connection lives.
    request_timeout: Option<Duration>,
    /// The current connection, if one is open. Read on every call, so a plain lock, held only to clone.
    conn: RwLock<Option<Arc<Conn>>>,
    /// Held while connecting, so that many callers finding the connection gone open only one new one.
    reconnect: tokio::sync::Mutex<()>,
    /// Request ids, unique for the life of this client across reconnects.
    next_id: AtomicU64,
}

/// A handle to the daemon. Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
    /// Sent with every request from this handle, for the daemon's request context.
    session_id: Option<String>,
    /// Sent with every request from this handle, for the daemon's request context.
    user_id: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.shared.endpoint)
            .field("name", &self.shared.name)
            .field("connected", &self.current().is_some())
            .field("session_id", &self.session_id)
            .field("user_id", &self.user_id)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Client`] with a name and timeouts. Start from [`Client::builder`].
///
/// ```no_run
/// # async fn demo() -> scaled_client::Result<()> {
/// use std::time::Duration;
/// use scaled_client::{Client, Endpoint};
///
/// let client = Client::builder(Endpoint::Unix("/run/scaled/scaled.sock".into()))
///     .name("checkout-api")
///     .connect_timeout(Duration::from_secs(1))
///     .request_timeout(Duration::from_millis(500))
///     .connect()
///     .await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct ClientBuilder {
    /// Where the daemon listens.
    endpoint: Endpoint,
    /// The name sent in HELLO.
    name: String,
    /// See [`ClientBuilder::token`].
    token: Option<String>,
    /// See [`ClientBuilder::connect_timeout`].
    connect_timeout: Option<Duration>,
    /// See [`ClientBuilder::request_timeout`].
    request_timeout: Option<Duration>,
}

impl ClientBuilder {
    /// The name this client gives in HELLO, shown in the daemon's logs and as the owner of its locks.
    /// Default: `scaled-client`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The token to show in HELLO: a line of the daemon's `--auth-token-file`, which its TCP
    /// listener requires (a Unix socket ignores it). A missing or wrong token fails the connect with
    /// [`Error::Denied`]. Default: none.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Fails a connect (the socket and the HELLO exchange together) that takes longer than this with
    /// [`Error::Timeout`]. Applies to every reconnect too. Default: none.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// Fails a request whose answer takes longer than this with [`Error::Timeout`]. The connection stays
    /// usable, and a late answer is dropped, never handed to another caller; a late LOCK grant is given
    /// back to the daemon. A LOCK's own `wait` and a PING's delay are added to the limit; a LOCK that
    /// leaves its wait to the daemon's default is not limited, so set [`crate::LockOptions::wait`]
    /// where it matters. Default: none.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// Connects and says HELLO.
    pub async fn connect(self) -> Result<Client> {
        let shared = Arc::new(Shared {
            endpoint: self.endpoint,
            name: self.name,
            token: self.token,
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            conn: RwLock::new(None),
            reconnect: tokio::sync::Mutex::new(()),
            next_id: AtomicU64::new(1),
        });
        let client = Client {
            shared,
            session_id: None,
            user_id: None,
        };
        client.connection().await?;
        Ok(client)
    }
}

impl Client {
    /// A builder for a client of the daemon at `endpoint`, to set its name and timeouts.
    pub fn builder(endpoint: Endpoint) -> ClientBuilder {
        ClientBuilder {
            endpoint,
            name: "scaled-client".to_string(),
            token: None,
            connect_timeout: None,
            request_timeout: None,
        }
    }

    /// Connects to the daemon and says HELLO. `name` identifies this client in the daemon's logs.
    /// No timeouts; [`Client::builder`] sets them.
    pub async fn connect(endpoint: Endpoint, name: &str) -> Result<Client> {
        Client::builder(endpoint).name(name).connect().await
    }

    /// Connects over a Unix socket.
    pub async fn connect_unix(path: impl Into<PathBuf>) -> Result<Client> {
        Client::connect(Endpoint::Unix(path.into()), "scaled-client").await
    }

    /// A handle on the same connection whose requests carry this session and user, for the daemon's logs.
    pub fn with_context(&self, session_id: Option<&str>, user_id: Option<&str>) -> Client {
        Client {
            shared: self.shared.clone(),
            session_id: session_id.map(str::to_string),
            user_id: user_id.map(str::to_string),
        }
    }

    /// Checks the daemon answers.
    pub async fn ping(&self) -> Result<()> {
        self.call(CommandName::Ping, Args::default())
            .await
            .map(drop)
    }

    /// A PING the daemon answers only after `delay`: a way to see that a slow request does not hold up
    /// the fast ones behind it.
    pub async fn ping_after(&self, delay: Duration) -> Result<()> {
        let args = Args {
            delay_ms: Some(delay.as_millis() as u64),
            ..Args::default()
        };
        self.call(CommandName::Ping, args).await.map(drop)
    }

    /// The value stored under `key`, or `None`.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let args = Args {
            key: Some(key.to_string()),
            ..Args::default()
        };
        match self.call(CommandName::Get, args).await? {
            rmpv::Value::Nil => Ok(None),
            rmpv::Value::Binary(b) => Ok(Some(b)),
            other => Err(Error::Protocol(format!("GET answered {other}"))),
        }
    }

    /// Stores `value` under `key`. `ttl` of `None` takes the daemon's CACHE_TTL; `Some(ZERO)` never expires.
    pub async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<()> {
        self.set_with(key, value, ttl, None).await
    }

    /// Removes `key`; true when it was there.
    pub async fn del(&self, key: &str) -> Result<bool> {
        self.del_with(key, None).await
    }

    /// SET, fenced or not.
    pub(crate) async fn set_with(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
        fence: Option<&Fence>,
    ) -> Result<()> {
        let args = Args {
            key: Some(key.to_string()),
            value: Some(value.to_vec()),
            ttl_ms: ttl.map(|t| t.as_millis() as u64),
            fence: fence.cloned(),
            ..Args::default()
        };
        self.call(CommandName::Set, args).await.map(drop)
    }

    /// DEL, fenced or not.
    pub(crate) async fn del_with(&self, key: &str, fence: Option<&Fence>) -> Result<bool> {
        let args = Args {
            key: Some(key.to_string()),
            fence: fence.cloned(),
            ..Args::default()
        };
        match self.call(CommandName::Del, args).await? {
            rmpv::Value::Boolean(b) => Ok(b),
            other => Err(Error::Protocol(format!("DEL answered {other}"))),
        }
    }

    /// The daemon's STATS document.
    pub async fn stats(&self) -> Result<Stats> {
        decode(
            "STATS",
            self.call(CommandName::Stats, Args::default()).await?,
        )
    }

    /// What the daemon answered to HELLO on the current connection (connecting first if needed): its
    /// version and the frame, key and value limits it enforces.
    pub async fn welcome(&self) -> Result<Welcome> {
        Ok(self.connection().await?.welcome.clone())
    }

    /// Sends any command and returns its `ok` value, or its error.
    pub async fn call(&self, cmd: CommandName, args: Args) -> Result<rmpv::Value> {
        let response = self.exchange(cmd, args).await?;
        match response.err {
            Some(err) => Err(err.into()),
            None => Ok(response.ok),
        }
    }

    /// Sends one request and waits for its response envelope, within the request timeout if one is
    /// set (see [`ClientBuilder::request_timeout`]).
    pub async fn exchange(&self, cmd: CommandName, args: Args) -> Result<Response> {
        let Some(limit) = self.shared.request_timeout else {
            return self.exchange_unbounded(cmd, args).await;
        };
        // A request that asks to wait is given that long on top of the limit.
        let asked = match cmd {
            CommandName::Lock if args.try_only != Some(true) => match args.wait_ms {
                Some(ms) => Duration::from_millis(ms),
                None => return self.exchange_unbounded(cmd, args).await,
            },
            CommandName::Ping => Duration::from_millis(args.delay_ms.unwrap_or(0)),
            _ => Duration::ZERO,
        };
        let limit = limit.saturating_add(asked);
        // Timing out drops the exchange, which withdraws the caller's registration: a late answer
        // finds nobody under its id and is discarded (a late grant is unlocked by the reader).
        tokio::time::timeout(limit, self.exchange_unbounded(cmd, args))
            .await
            .map_err(|_| Error::Timeout(format!("no answer to {cmd} within {limit:?}")))?
    }

    /// Sends one request and waits for its response envelope for as long as the connection lives.
    async fn exchange_unbounded(&self, cmd: CommandName, args: Args) -> Result<Response> {
        let conn = self.connection().await?;
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let request = Request {
            id,
            cmd,
            args,
            session_id: self.session_id.clone(),
            user_id: self.user_id.clone(),
        };
        let (tx, rx) = oneshot::channel();
        let lock_key = (cmd == CommandName::Lock)
            .then(|| request.args.key.clone())
            .flatten();
        let _registered = Registration::new(&conn.pending, id, Waiter { tx, lock_key })?;
        let body = request.to_msgpack();
        if body.len() > MAX_FRAME_LEN {
            // The daemon would close the connection on it, failing every other caller sharing it.
            return Err(Error::FrameTooLarge(format!(
                "request of {} bytes is over the {MAX_FRAME_LEN} byte frame limit",
                body.len()
            )));
        }
        let mut frame = Vec::with_capacity(body.len() + 4);
        push_frame(&mut frame, &body);
        conn.outbox
            .send(frame)
            .await
            .map_err(|_| Error::ConnectionLost)?;
        rx.await.map_err(|_| Error::ConnectionLost)
    }

    /// The open connection, opening a new one when there is none or it broke.
    async fn connection(&self) -> Result<Arc<Conn>> {
        if let Some(conn) = self.current() {
            return Ok(conn);
        }
        let _one_at_a_time = self.shared.reconnect.lock().await;
        if let Some(conn) = self.current() {
            return Ok(conn);
        }
        let opening = open(
            &self.shared.endpoint,
            &self.shared.name,
            self.shared.token.as_deref(),
        );
        let conn = match self.shared.connect_timeout {
            Some(limit) => tokio::time::timeout(limit, opening).await.map_err(|_| {
                Error::Timeout(format!(
                    "could not connect to {:?} and say HELLO within {limit:?}",
                    self.shared.endpoint
                ))
            })??,
            None => opening.await?,
        };
        let conn = Arc::new(conn);
        if let Ok(mut slot) = self.shared.conn.write() {
            *slot = Some(conn.clone());
        }
        Ok(conn)
    }

    fn current(&self) -> Option<Arc<Conn>> {
        let slot = self.shared.conn.read().ok()?;
        slot.as_ref().filter(|c| c.is_open()).cloned()
    }
}

/// A caller's place in the pending table; leaving it (answered, failed or cancelled) frees the place.
struct Registration<'a> {
    pending: &'a Pending,
    id: u64,
}

impl<'a> Registration<'a> {
    fn new(pending: &'a Pending, id: u64, waiter: Waiter) -> Result<Self> {
        let mut guard = pending.lock().map_err(|_| Error::ConnectionLost)?;
        let map = guard.as_mut().ok_or(Error::ConnectionLost)?;
        map.insert(id, waiter);
        Ok(Registration { pending, id })
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if let Ok(mut guard) = self.pending.lock() {
            if let Some(map) = guard.as_mut() {
                // A LOCK still in flight stays registered, so its grant can be given back on arrival.
                if map.get(&self.id).is_some_and(|w| w.lock_key.is_none()) {
                    map.remove(&self.id);
                }
            }
        }
    }
}

type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

/// Opens a connection, says HELLO, and starts its reader and writer tasks.
async fn open(endpoint: &Endpoint, name: &str, token: Option<&str>) -> Result<Conn> {
    let (mut reader, mut writer): (BoxRead, BoxWrite) = match endpoint {
        Endpoint::Unix(path) => {
            let (r, w) = UnixStream::connect(path).await?.into_split();
            (Box::new(r), Box::new(w))
        }
        Endpoint::Tcp(addr) => {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (r, w) = stream.into_split();
            (Box::new(r), Box::new(w))
        }
    };
    let hello = Request {
        args: Args {
            version: Some(PROTOCOL_VERSION),
            client: Some(name.to_string()),
            token: token.map(str::to_string),
            ..Args::default()
        },
        ..Request::new(HELLO_ID, CommandName::Hello)
    };
    let mut frame = Vec::new();
    push_frame(&mut frame, &hello.to_msgpack());
    writer.write_all(&frame).await?;
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let answer = read_response(&mut reader, &mut buf)
        .await?
        .ok_or(Error::ConnectionLost)?;
    if let Some(err) = answer.err {
        return Err(err.into());
    }
    let welcome: Welcome = decode("HELLO", answer.ok)?;

    let pending: Arc<Pending> = Arc::new(Mutex::new(Some(HashMap::new())));
    let (outbox, inbox) = mpsc::channel(OUTBOX_DEPTH);
    let writer_task = tokio::spawn(write_loop(writer, inbox));
    // Weak, so the writer still ends (and the daemon sees the close) when the last client handle goes.
    let give_back = outbox.downgrade();
    tokio::spawn(read_loop(
        reader,
        buf,
        pending.clone(),
        writer_task,
        give_back,
    ));
    Ok(Conn {
        outbox,
        pending,
        welcome,
    })
}

/// Reads one response, or `None` at a clean end of stream.
async fn read_response(reader: &mut BoxRead, buf: &mut BytesMut) -> Result<Option<Response>> {
    loop {
        match take_frame(buf, MAX_FRAME_LEN) {
            Ok(Some(body)) => {
                return Response::decode(&body)
                    .map(Some)
                    .map_err(|e| Error::Protocol(format!("undecodable response: {e}")));
            }
            Ok(None) => {}
            Err(e) => return Err(Error::Protocol(e.to_string())),
        }
        if reader.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// Hands each response to its caller until the connection ends, then fails everyone still waiting.
async fn read_loop(
    mut reader: BoxRead,
    mut buf: BytesMut,
    pending: Arc<Pending>,
    writer_task: tokio::task::JoinHandle<()>,
    give_back: mpsc::WeakSender<Vec<u8>>,
) {
    while let Ok(Some(response)) = read_response(&mut reader, &mut buf).await {
        let waiter = pending
            .lock()
            .ok()
            .and_then(|mut p| p.as_mut()?.remove(&response.id));
        let Some(Waiter { tx, lock_key }) = waiter else {
            continue;
        };
        // A caller that gave up has dropped its receiver; its answer has nowhere to go, except a
        // lock grant, which goes back to the daemon so the next waiter gets the lock.
        if let Err(response) = tx.send(response) {
            if let (Some(key), Some(token)) = (lock_key, grant_token(response)) {
                if let Some(outbox) = give_back.upgrade() {
                    let unlock = Request {
                        args: Args {
                            key: Some(key),
                            token: Some(token),
                            ..Args::default()
                        },
                        ..Request::new(u64::MAX, CommandName::Unlock)
                    };
                    let mut frame = Vec::new();
                    push_frame(&mut frame, &unlock.to_msgpack());
                    let _ = outbox.try_send(frame);
                }
            }
        }
    }
    // Dropping the senders wakes every waiting caller with ConnectionLost.
    if let Ok(mut p) = pending.lock() {
        *p = None;
    }
    writer_task.abort();
}

/// The owner token in a LOCK grant, if the response is one.
fn grant_token(response: Response) -> Option<String> {
    decode::<Grant>("LOCK", response.ok).ok().map(|g| g.token)
}

/// Writes queued frames, batching whatever is already queued into one write.
async fn write_loop(mut writer: BoxWrite, mut inbox: mpsc::Receiver<Vec<u8>>) {
    let mut batch = Vec::with_capacity(16 * 1024);
    while let Some(first) = inbox.recv().await {
        batch.clear();
        batch.extend_from_slice(&first);
        while batch.len() < 64 * 1024 {
            match inbox.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if writer.write_all(&batch).await.is_err() {
            return;
        }
    }
    let _ = writer.shutdown().await;
}
