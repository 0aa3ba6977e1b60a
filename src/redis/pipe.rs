//! The command connection: one socket to Redis on which every caller's commands are pipelined.
//!
//! A caller appends its command to one shared output buffer and its reply slot to a queue, in the
//! same critical section, so the queue's order is the order the bytes go out and Redis answers in.
//! A writer task sends whatever the buffer holds in one write; while it writes, the next callers'
//! commands gather behind it, so under load one write carries many commands and Redis reads them
//! with one read. A reader task parses replies as they arrive and hands each to the front of the
//! queue. No task, timer or allocation beyond the command's own is spent per call.
//!
//! The connection dies, and every call waiting on it fails at once, when the socket fails or closes,
//! when Redis sends something that is not RESP, or when the oldest unanswered command has waited
//! longer than the response timeout (checked a few times per timeout, so a command may wait up to a
//! quarter longer before it fails). The owner is told through the `on_close` callback, once.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::resp::{take_reply, Command, Reply};

/// Why a call on the pipe got no reply. Every variant means Redis could not be reached through this
/// connection; the command may or may not have been applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PipeError {
    /// The connection failed or was closed before the reply came: how, in words.
    #[error("{0}")]
    Closed(String),
}

/// Where Redis listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// Host and port.
    Tcp(String, u16),
    /// A Unix socket's path.
    Unix(PathBuf),
}

/// What the owner is told when the connection dies: why.
type OnClose = Box<dyn FnOnce(String) + Send>;

/// One reply slot: the sender, and when the command was queued (for the response timeout).
type Slot = (Instant, oneshot::Sender<Result<Reply, PipeError>>);

/// What callers and the two tasks share.
struct Shared {
    out: Mutex<Outbox>,
    /// Wakes the writer when the buffer goes from empty to not.
    wake_writer: Notify,
    /// Cancelled when the connection is dead, by whichever side finds out first.
    dead: CancellationToken,
    /// Told once, when the connection dies.
    on_close: Mutex<Option<OnClose>>,
}

struct Outbox {
    /// Commands not yet written.
    buf: BytesMut,
    /// One slot per command written or waiting to be, in order.
    slots: VecDeque<Slot>,
    /// Why the connection died, once it has: later calls fail with it at once.
    closed: Option<String>,
}

/// A handle on the connection. Cheap to clone; the connection closes when [`Pipe::close`] is called
/// or it fails, not when handles are dropped (the tasks hold it).
#[derive(Clone)]
pub struct Pipe {
    shared: Arc<Shared>,
}

impl Pipe {
    /// Connects to `address` within `connect_timeout` and starts the reader and writer tasks. Must be
    /// called inside a tokio runtime.
    pub async fn connect(
        address: &Address,
        connect_timeout: Duration,
        response_timeout: Duration,
        on_close: impl FnOnce(String) + Send + 'static,
    ) -> Result<Pipe, PipeError> {
        let connect = async {
            match address {
                Address::Tcp(host, port) => {
                    let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                    // Commands are small and latency matters more than packet count.
                    stream.set_nodelay(true)?;
                    let (r, w) = stream.into_split();
                    Ok::<_, std::io::Error>(Pipe::start(r, w, response_timeout, on_close))
                }
                Address::Unix(path) => {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    let (r, w) = stream.into_split();
                    Ok(Pipe::start(r, w, response_timeout, on_close))
                }
            }
        };
        match tokio::time::timeout(connect_timeout, connect).await {
            Ok(Ok(pipe)) => Ok(pipe),
            Ok(Err(e)) => Err(PipeError::Closed(format!("connect: {e}"))),
            Err(_) => Err(PipeError::Closed(format!(
                "connect: no answer within {connect_timeout:?}"
            ))),
        }
    }

    /// Runs the pipe over any byte stream (a socket; in tests, an in-memory one).
    pub fn start<R, W>(
        reader: R,
        writer: W,
        response_timeout: Duration,
        on_close: impl FnOnce(String) + Send + 'static,
    ) -> Pipe
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let shared = Arc::new(Shared {
            out: Mutex::new(Outbox {
                buf: BytesMut::with_capacity(16 * 1024),
                slots: VecDeque::with_capacity(256),
                closed: None,
            }),
            wake_writer: Notify::new(),
            dead: CancellationToken::new(),
            on_close: Mutex::new(Some(Box::new(on_close))),
        });
        tokio::spawn(write_loop(shared.clone(), writer));
        tokio::spawn(read_loop(shared.clone(), reader, response_timeout));
        Pipe { shared }
    }

    /// Sends `cmd` and waits for its reply. An error reply from Redis is a reply
    /// ([`Reply::Error`]); [`PipeError`] is for a connection that died.
    pub async fn call(&self, cmd: &Command) -> Result<Reply, PipeError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut out = self.shared.out.lock();
            if let Some(why) = &out.closed {
                return Err(PipeError::Closed(why.clone()));
            }
            let was_empty = out.buf.is_empty();
            cmd.write_to(&mut out.buf);
            out.slots.push_back((Instant::now(), tx));
            if was_empty {
                self.shared.wake_writer.notify_one();
            }
        }
        match rx.await {
            Ok(reply) => reply,
            // The slot was dropped without an answer: the connection died in between.
            Err(_) => Err(PipeError::Closed("connection closed".into())),
        }
    }

    /// Closes the connection; calls waiting on it fail. The `on_close` callback is not told (the
    /// owner knows).
    pub fn close(&self) {
        self.shared.on_close.lock().take();
        fail(&self.shared, "closed by the daemon".into());
    }

    /// Whether the connection has died.
    pub fn is_closed(&self) -> bool {
        self.shared.dead.is_cancelled()
    }

    /// Commands sent or queued and not answered yet.
    pub fn waiting(&self) -> usize {
        self.shared.out.lock().slots.len()
    }
}

/// Marks the connection dead (the first reason wins), fails every waiting call, and tells the owner.
fn fail(shared: &Shared, why: String) {
    let slots = {
        let mut out = shared.out.lock();
        if out.closed.is_some() {
            return;
        }
        out.closed = Some(why.clone());
        out.buf.clear();
        std::mem::take(&mut out.slots)
    };
    shared.dead.cancel();
    for (_, tx) in slots {
        let _ = tx.send(Err(PipeError::Closed(why.clone())));
    }
    let on_close = shared.on_close.lock().take();
    if let Some(on_close) = on_close {
        on_close(why);
    }
}

/// Sends the buffer whenever it has something, all of it in one write.
async fn write_loop<W: AsyncWrite + Unpin>(shared: Arc<Shared>, mut writer: W) {
    let mut sending = BytesMut::with_capacity(16 * 1024);
    loop {
        {
            let mut out = shared.out.lock();
            if out.closed.is_some() {
                return;
            }
            // Swap rather than split: both buffers keep their capacity, so a steady load allocates
            // nothing here.
            std::mem::swap(&mut out.buf, &mut sending);
        }
        if sending.is_empty() {
            tokio::select! {
                _ = shared.dead.cancelled() => return,
                _ = shared.wake_writer.notified() => {}
            }
            // Woken by the first command of a batch. The scheduler runs a task it just woke next,
            // before the tasks that would add to the batch: let them run first, so one write
            // carries what the whole round of ready tasks sends (one command per write otherwise,
            // each costing a system call here and a read in Redis).
            tokio::task::yield_now().await;
            continue;
        }
        let written = tokio::select! {
            _ = shared.dead.cancelled() => return,
            written = writer.write_all(&sending) => written,
        };
        if let Err(e) = written {
            fail(&shared, format!("write: {e}"));
            return;
        }
        sending.clear();
    }
}

/// Parses replies as they arrive and hands each to its caller; watches the response timeout.
async fn read_loop<R: AsyncRead + Unpin>(
    shared: Arc<Shared>,
    mut reader: R,
    response_timeout: Duration,
) {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut check = tokio::time::interval((response_timeout / 4).max(Duration::from_millis(1)));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let read = tokio::select! {
            _ = shared.dead.cancelled() => return,
            read = reader.read_buf(&mut buf) => read,
            _ = check.tick() => {
                let oldest = shared.out.lock().slots.front().map(|(queued, _)| *queued);
                if oldest.is_some_and(|t| t.elapsed() > response_timeout) {
                    fail(&shared, format!("no answer within {response_timeout:?}"));
                    return;
                }
                continue;
            }
        };
        match read {
            Ok(0) => {
                fail(&shared, "connection closed by Redis".into());
                return;
            }
            Ok(_) => {}
            Err(e) => {
                fail(&shared, format!("read: {e}"));
                return;
            }
        }
        loop {
            let reply = match take_reply(&mut buf) {
                Ok(Some(reply)) => reply,
                Ok(None) => break,
                Err(e) => {
                    fail(&shared, e.to_string());
                    return;
                }
            };
            let slot = shared.out.lock().slots.pop_front();
            match slot {
                // The caller may have given up (its future dropped): the reply is dropped.
                Some((_, tx)) => drop(tx.send(Ok(reply))),
                None => {
                    fail(&shared, "a reply to no command".into());
                    return;
                }
            }
        }
        // A large reply may have grown the buffer; give the memory back once it is consumed.
        if buf.is_empty() && buf.capacity() > 1024 * 1024 {
            buf = BytesMut::with_capacity(16 * 1024);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use tokio::io::{duplex, AsyncBufReadExt, BufReader};

    use super::*;

    /// A pipe over an in-memory stream, and the far end of it.
    fn pipe_pair(timeout: Duration) -> (Pipe, tokio::io::DuplexStream, Arc<AtomicUsize>) {
        let (near, far) = duplex(1 << 20);
        let (r, w) = tokio::io::split(near);
        let told = Arc::new(AtomicUsize::new(0));
        let pipe = Pipe::start(r, w, timeout, {
            let told = told.clone();
            move |_| {
                told.fetch_add(1, Ordering::SeqCst);
            }
        });
        (pipe, far, told)
    }

    fn echo(n: u64) -> Command {
        let mut cmd = Command::new("ECHO");
        cmd.uint(n);
        cmd
    }

    #[tokio::test]
    async fn replies_go_to_their_callers_in_order_even_when_pipelined() {
        let (pipe, far, _) = pipe_pair(Duration::from_secs(5));
        let (far_r, mut far_w) = tokio::io::split(far);
        // A fake server that answers each ECHO with its argument, reading lines.
        tokio::spawn(async move {
            let mut lines = BufReader::new(far_r).lines();
            let mut n = 0;
            while let Ok(Some(line)) = lines.next_line().await {
                n += 1;
                // Lines: *2, $4, ECHO, $k, <arg>: the fifth of every five is the argument.
                if n % 5 == 0 {
                    let reply = format!("${}\r\n{line}\r\n", line.len());
                    far_w.write_all(reply.as_bytes()).await.expect("write");
                }
            }
        });
        let calls = (0..500u64).map(|i| {
            let pipe = pipe.clone();
            async move { (i, pipe.call(&echo(i)).await) }
        });
        for (i, reply) in futures_util::future::join_all(calls).await {
            assert_eq!(reply, Ok(Reply::Bulk(Bytes::from(i.to_string()))));
        }
        assert_eq!(pipe.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn no_answer_within_the_timeout_fails_every_call_and_tells_the_owner_once() {
        let (pipe, _far, told) = pipe_pair(Duration::from_millis(400));
        let a = tokio::spawn({
            let pipe = pipe.clone();
            async move { pipe.call(&echo(1)).await }
        });
        let b = tokio::spawn({
            let pipe = pipe.clone();
            async move { pipe.call(&echo(2)).await }
        });
        let (a, b) = (a.await.expect("task"), b.await.expect("task"));
        assert!(matches!(a, Err(PipeError::Closed(ref why)) if why.contains("no answer")));
        assert!(b.is_err());
        assert!(pipe.is_closed());
        assert!(
            pipe.call(&echo(3)).await.is_err(),
            "a dead pipe took a call"
        );
        assert_eq!(told.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_far_end_closing_or_talking_nonsense_fails_the_calls() {
        let (pipe, far, told) = pipe_pair(Duration::from_secs(5));
        let call = tokio::spawn({
            let pipe = pipe.clone();
            async move { pipe.call(&echo(1)).await }
        });
        drop(far);
        assert!(call.await.expect("task").is_err());
        assert_eq!(told.load(Ordering::SeqCst), 1);

        let (pipe, mut far, told) = pipe_pair(Duration::from_secs(5));
        let call = tokio::spawn({
            let pipe = pipe.clone();
            async move { pipe.call(&echo(1)).await }
        });
        far.write_all(b"?nonsense\r\n").await.expect("write");
        let err = call.await.expect("task").expect_err("nonsense answered");
        assert!(err.to_string().contains("malformed"), "{err}");
        assert_eq!(told.load(Ordering::SeqCst), 1);

        // A reply nobody asked for is nonsense too.
        let (pipe, mut far, _) = pipe_pair(Duration::from_secs(5));
        far.write_all(b"+OK\r\n").await.expect("write");
        tokio::time::timeout(Duration::from_secs(5), pipe.shared.dead.cancelled())
            .await
            .expect("an unasked-for reply closes the pipe");
    }

    #[tokio::test]
    async fn closing_it_fails_waiting_calls_without_telling_the_owner() {
        let (pipe, _far, told) = pipe_pair(Duration::from_secs(5));
        let call = tokio::spawn({
            let pipe = pipe.clone();
            async move { pipe.call(&echo(1)).await }
        });
        tokio::task::yield_now().await;
        pipe.close();
        assert!(call.await.expect("task").is_err());
        assert_eq!(told.load(Ordering::SeqCst), 0);
    }
}
