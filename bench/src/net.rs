//! Connections: a Unix or TCP stream with its buffers, HELLO on open, and whole frames (or RESP
//! replies) read off it.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use scaled_client::frame::{push_frame, take_frame};
use scaled_client::proto::{Args, CommandName, Request, MAX_FRAME_LEN, PROTOCOL_VERSION};

use crate::opts::Target;
use crate::report::Tally;
use crate::resp;
use crate::wire::{self, Expect};

/// Where the server listens.
#[derive(Clone, Debug)]
pub enum Endpoint {
    /// A Unix socket path.
    Unix(std::path::PathBuf),
    /// A TCP address, and the token scaled's TCP listener asks for in HELLO.
    Tcp(String, Option<String>),
}

impl Endpoint {
    /// The endpoint the options name; reads the token of `--token-file`.
    pub fn of(target: &Target) -> Result<Endpoint, String> {
        Ok(match (&target.socket, &target.tcp) {
            (Some(path), _) => Endpoint::Unix(path.clone()),
            (None, Some(addr)) => Endpoint::Tcp(addr.clone(), read_token(target)?),
            // clap requires one of the two.
            (None, None) => Endpoint::Unix("/run/scaled/scaled.sock".into()),
        })
    }

    fn describe(&self) -> String {
        match self {
            Endpoint::Unix(path) => path.display().to_string(),
            Endpoint::Tcp(addr, _) => addr.clone(),
        }
    }

    /// The token to show in HELLO, if any.
    fn token(&self) -> Option<String> {
        match self {
            Endpoint::Unix(_) => None,
            Endpoint::Tcp(_, token) => token.clone(),
        }
    }
}

/// The token in `--token-file`: the last field of its first line that is neither blank nor a
/// comment, so both a bare token and a line of the daemon's own token file work.
fn read_token(target: &Target) -> Result<Option<String>, String> {
    let Some(path) = &target.token_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().last())
        .map(|t| Some(t.to_string()))
        .ok_or_else(|| format!("the token file {} holds no token", path.display()))
}

/// A Unix or TCP stream behind one type, so every workload runs over both.
pub enum Stream {
    /// A Unix stream socket.
    Unix(UnixStream),
    /// A TCP connection, with Nagle off.
    Tcp(TcpStream),
}

impl Stream {
    /// Connects to `endpoint`.
    pub async fn connect(endpoint: &Endpoint) -> Result<Stream, String> {
        let failed = |e: std::io::Error| format!("connecting to {}: {e}", endpoint.describe());
        match endpoint {
            Endpoint::Unix(path) => UnixStream::connect(path)
                .await
                .map(Stream::Unix)
                .map_err(failed),
            Endpoint::Tcp(addr, _) => {
                let stream = TcpStream::connect(addr).await.map_err(failed)?;
                // Requests are small and latency-bound.
                stream.set_nodelay(true).map_err(failed)?;
                Ok(Stream::Tcp(stream))
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// One open connection with its buffers.
pub struct Conn {
    /// The socket.
    pub stream: Stream,
    /// Bytes read and not yet taken as frames.
    pub inbuf: BytesMut,
    /// Requests gathered for the next write, so many go out in one system call.
    pub out: Vec<u8>,
    /// Whether this connection speaks RESP (to Redis) rather than scaled's frames.
    pub resp: bool,
}

impl Conn {
    /// Connects and, for scaled, says HELLO.
    pub async fn open(endpoint: &Endpoint, resp: bool) -> Result<Conn, String> {
        let mut conn = Conn {
            stream: Stream::connect(endpoint).await?,
            inbuf: BytesMut::with_capacity(64 * 1024),
            out: Vec::with_capacity(4096),
            resp,
        };
        if resp {
            return Ok(conn);
        }
        let hello = Request {
            args: Args {
                version: Some(PROTOCOL_VERSION),
                client: Some("scaled-bench".into()),
                token: endpoint.token(),
                ..Args::default()
            },
            ..Request::new(1, CommandName::Hello)
        };
        push_frame(&mut conn.out, &hello.to_msgpack());
        conn.flush().await?;
        let body = conn.next_frame().await?;
        wire::answer_to(&body, 1).map_err(|e| format!("HELLO: {e}"))?;
        Ok(conn)
    }

    /// Checks one answer with this connection's protocol.
    pub fn check(&self, body: &[u8], id: u64, expect: Expect) -> Result<(), String> {
        if self.resp {
            resp::check(body, expect)
        } else {
            wire::check(body, id, expect)
        }
    }

    /// Writes what `out` holds.
    pub async fn flush(&mut self) -> Result<(), String> {
        self.stream
            .write_all(&self.out)
            .await
            .map_err(|e| format!("write: {e}"))?;
        self.out.clear();
        Ok(())
    }

    /// Writes what is in `out`, reads one answer, and files the round trip's latency.
    pub async fn exchange(&mut self, tally: &mut Tally) -> Result<BytesMut, String> {
        let sent = Instant::now();
        self.flush().await?;
        let body = self.next_frame().await?;
        tally.record(sent.elapsed());
        Ok(body)
    }

    /// The next whole frame body (or RESP reply), reading as needed.
    pub async fn next_frame(&mut self) -> Result<BytesMut, String> {
        loop {
            if let Some(body) = self.take()? {
                return Ok(body);
            }
            self.read_more().await?;
        }
    }

    /// A whole frame body (or RESP reply) already read, if there is one.
    pub fn take(&mut self) -> Result<Option<BytesMut>, String> {
        if self.resp {
            resp::take_reply(&mut self.inbuf)
        } else {
            take_frame(&mut self.inbuf, MAX_FRAME_LEN).map_err(|e| e.to_string())
        }
    }

    /// Reads what the socket has; an error when the server has closed the connection.
    pub async fn read_more(&mut self) -> Result<(), String> {
        match self.stream.read_buf(&mut self.inbuf).await {
            Ok(0) => Err("the server closed the connection".into()),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("read: {e}")),
        }
    }
}

/// Opens `n` connections.
pub async fn open_all(endpoint: &Endpoint, n: u64, resp: bool) -> Result<Vec<Conn>, String> {
    let mut conns = Vec::with_capacity(n as usize);
    for _ in 0..n {
        conns.push(Conn::open(endpoint, resp).await?);
    }
    Ok(conns)
}
