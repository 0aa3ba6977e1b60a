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

use crate::error::{Error, Result};
use crate::frame::{push_frame, take_frame};
use crate::lock::field;
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

impl Client {
    /// Connects to the daemon and says HELLO. `name` identifies this client in the daemon's logs.
    pub async fn connect(endpoint: Endpoint, name: &str) -> Result<Client> {
        let shared = Arc::new(Shared {
            endpoint,
            name: name.to_string(),
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
    pub async fn stats(&self) -> Result<rmpv::Value> {
        self.call(CommandName::Stats, Args::default()).await
    }

    /// Sends any command and returns its `ok` value, or its error.
    pub async fn call(&self, cmd: CommandName, args: Args) -> Result<rmpv::Value> {
        let response = self.exchange(cmd, args).await?;
        match response.err {
            Some(err) => Err(err.into()),
            None => Ok(response.ok),
        }
    }

    /// Sends one request and waits for its response envelope.
    pub async fn exchange(&self, cmd: CommandName, args: Args) -> Result<Response> {
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
        let conn = Arc::new(open(&self.shared.endpoint, &self.shared.name).await?);
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
async fn open(endpoint: &Endpoint, name: &str) -> Result<Conn> {
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
    Ok(Conn { outbox, pending })
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
            if let (Some(key), Some(token)) = (lock_key, grant_token(&response)) {
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
fn grant_token(response: &Response) -> Option<String> {
    field(&response.ok, "token")?.as_str().map(str::to_string)
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
