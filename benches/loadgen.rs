//! End-to-end load generator: many connections to a running daemon's Unix socket, each running a closed
//! loop of one request at a time (or `--pipeline P` at a time), in the manner of `redis-benchmark` so the
//! two can be compared on the same machine.
//!
//! ```text
//! cargo bench --bench loadgen -- --socket /tmp/bench-scaled.sock --connections 50 --cmd get
//! ```
//!
//! Every connection says HELLO first. For `--cmd get` the keys are preloaded with SET (no expiry), so
//! every GET must hit: a GET that finds nothing counts as an error. Each response is checked: its id must
//! be the one sent, and it must carry `ok` of the expected type, not `err`. The run is bounded by
//! `--requests` in total and by `--max-seconds`.
//!
//! Requests are encoded once per key with the client crate's encoder, with the id written as a fixed
//! 8-byte integer that is patched in place for each request, so the generator spends its time on the
//! socket rather than on encoding. Responses are parsed field by field without allocating.
//!
//! Two lock workloads:
//!
//! - `--cmd lock`: uncontended LOCK+UNLOCK pairs. Each connection has its own key (`lock:<n>`) and loops
//!   LOCK (10 s lease) → UNLOCK with the owner token of the grant. `--requests` counts pairs. Every grant
//!   is checked (a 36-character owner token, the lease asked for, a fencing token greater than the
//!   connection's previous one) and every UNLOCK must answer `status: OK`.
//! - `--cmd handoff`: every connection loops LOCK on one key (`handoff`, 60 s wait) → UNLOCK as soon as
//!   granted. It measures the hand-off: from the write of the holder's UNLOCK to the read of the next
//!   holder's grant (the write instant is kept in a cell all connections share). It checks from the
//!   client side that no two grants are ever outstanding and that fencing tokens strictly increase from
//!   grant to grant. `--requests` counts grants; when they are used up (or `--max-seconds` passes) each
//!   connection stops after its next grant, so the queue drains. A grant whose LOCK reached the daemon
//!   after the previous holder's UNLOCK (it found the lock free; common with two contenders) is reported
//!   apart from the hand-offs from the queue. `--wait-for-queue` makes each holder wait, before its
//!   UNLOCK and outside the measured interval, until every other contender's LOCK is written and a PING
//!   round trip has passed, so that every grant comes from the queue.
//!
//! With `--resp` it speaks RESP to a Redis server instead (no HELLO, no ids: answers come in order), so
//! the same client, with the same cost per request, can drive both servers:
//!
//! ```text
//! cargo bench --bench loadgen -- --resp --socket /tmp/bench-redis.sock --connections 50 --cmd get
//! ```
//!
//! `--cmd lock --resp` runs Redis's usual single-instance lock pair instead: `SET lock:<n> <random token>
//! NX PX 10000` (must answer `+OK`), then a compare-and-delete script with `EVAL` (must answer `:1`).
//! Redis has no lock queue, so `--cmd handoff` has no RESP counterpart.

use std::process::ExitCode;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::task::JoinSet;
use uuid::Uuid;

use scaled_client::frame::{push_frame, take_frame};
use scaled_client::proto::{Args, CommandName, Request, Response, MAX_FRAME_LEN, PROTOCOL_VERSION};

/// Load generator for a running scaled daemon (Unix socket only).
#[derive(Parser, Debug)]
#[command(name = "loadgen")]
struct Opts {
    /// The daemon's Unix socket (with `--resp`, a Redis server's).
    #[arg(long, short = 's')]
    socket: std::path::PathBuf,

    /// Connections, each with one request (or one pipeline batch) outstanding at a time.
    #[arg(long, short = 'c', default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    connections: u64,

    /// Requests in total, across all connections (`--cmd lock`: LOCK+UNLOCK pairs; `handoff`: grants).
    #[arg(long, short = 'n', default_value_t = 500_000, value_parser = clap::value_parser!(u64).range(1..))]
    requests: u64,

    /// The command to send: `get`, `set`, `ping`, `lock` (LOCK+UNLOCK pairs, a key per connection) or
    /// `handoff` (all connections contend for one lock).
    #[arg(long, value_enum, default_value_t = Cmd::Get)]
    cmd: Cmd,

    /// Distinct keys, used round robin (keep it well under the daemon's CACHE_SIZE, or GETs miss).
    #[arg(long, short = 'r', default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    keyspace: u64,

    /// Bytes per value for SET and for the preloaded values GET reads.
    #[arg(long, short = 'd', default_value_t = 3)]
    value_size: usize,

    /// Requests written at once per connection before reading their answers.
    #[arg(long, short = 'P', default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pipeline: u64,

    /// Stop after this many seconds even if requests remain.
    #[arg(long, default_value_t = 120)]
    max_seconds: u64,

    /// Runtime worker threads; 1 runs everything on one thread, as redis-benchmark does.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    threads: u64,

    /// Speak RESP to a Redis server on `--socket` instead, for comparison.
    #[arg(long)]
    resp: bool,

    /// `--cmd handoff`: before each UNLOCK, wait until every other contender's LOCK has been written,
    /// then make a PING round trip, so the next grant is a hand-off from the queue even with few
    /// contenders (all of this is before the measured interval).
    #[arg(long)]
    wait_for_queue: bool,

    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Cmd {
    Get,
    Set,
    Ping,
    Lock,
    Handoff,
}

impl Cmd {
    fn label(self) -> &'static str {
        match self {
            Cmd::Get => "GET",
            Cmd::Set => "SET",
            Cmd::Ping => "PING",
            Cmd::Lock => "LOCK+UNLOCK",
            Cmd::Handoff => "HANDOFF",
        }
    }
}

/// The lease `--cmd lock` and `--cmd handoff` ask for.
const LOCK_TTL_MS: u64 = 10_000;

/// How long a LOCK of `--cmd handoff` may wait in the queue.
const HANDOFF_WAIT_MS: u64 = 60_000;

/// The one key `--cmd handoff` contends for.
const HANDOFF_KEY: &str = "handoff";

/// Length of an owner token: a hyphenated UUID, as the daemon hands out and as sent to Redis.
const TOKEN_LEN: usize = 36;

/// Stands for the owner token in a template; patched per request.
const TOKEN_SLOT: &[u8; TOKEN_LEN] = b"TTTTTTTT-TTTT-TTTT-TTTT-TTTTTTTTTTTT";

/// Redis's compare-and-delete: delete the key only if it still holds this owner's token.
const RESP_UNLOCK_SCRIPT: &str =
    "if redis.call('get',KEYS[1])==ARGV[1] then return redis.call('del',KEYS[1]) else return 0 end";

fn lock_key(conn: u64) -> String {
    format!("lock:{conn}")
}

/// Where the id's eight bytes sit in a frame: 4-byte prefix, map header, fixstr "id", u64 marker.
const ID_AT: usize = 4 + 1 + 3 + 1;

/// One request, encoded once, as a whole frame whose id (if it has one) is patched per use.
struct Template {
    frame: Vec<u8>,
    has_id: bool,
    /// Where the owner token's bytes sit, for a request that carries one.
    token_at: Option<usize>,
}

impl Template {
    fn new(mut request: Request) -> Template {
        // u64::MAX forces the 9-byte encoding (marker 0xcf and 8 bytes), so any id fits in place.
        request.id = u64::MAX;
        let mut frame = Vec::new();
        push_frame(&mut frame, &request.to_msgpack());
        assert_eq!(
            &frame[4 + 1..ID_AT],
            &[0xa2, b'i', b'd', 0xcf],
            "request must start with its id"
        );
        Template {
            frame,
            has_id: true,
            token_at: None,
        }
    }

    /// A RESP command: an array of bulk strings.
    fn resp(words: &[&[u8]]) -> Template {
        let mut frame = format!("*{}\r\n", words.len()).into_bytes();
        for word in words {
            frame.extend_from_slice(format!("${}\r\n", word.len()).as_bytes());
            frame.extend_from_slice(word);
            frame.extend_from_slice(b"\r\n");
        }
        Template {
            frame,
            has_id: false,
            token_at: None,
        }
    }

    /// Marks where [`TOKEN_SLOT`] sits in the frame, so [`Template::push_token`] can patch it.
    fn with_token_slot(mut self) -> Template {
        let at = self
            .frame
            .windows(TOKEN_LEN)
            .position(|w| w == TOKEN_SLOT)
            .expect("template must hold the token slot");
        self.token_at = Some(at);
        self
    }

    fn push(&self, out: &mut Vec<u8>, id: u64) {
        let start = out.len();
        out.extend_from_slice(&self.frame);
        if self.has_id {
            out[start + ID_AT..start + ID_AT + 8].copy_from_slice(&id.to_be_bytes());
        }
    }

    /// Pushes the request with this owner token in its token slot.
    fn push_token(&self, out: &mut Vec<u8>, id: u64, token: &[u8; TOKEN_LEN]) {
        let start = out.len();
        self.push(out, id);
        if let Some(at) = self.token_at {
            out[start + at..start + at + TOKEN_LEN].copy_from_slice(token);
        }
    }
}

/// LOCK `key` with the benchmark's lease, waiting at most `wait_ms` in the queue when it says.
fn lock_template(key: &str, wait_ms: Option<u64>) -> Template {
    Template::new(request(
        CommandName::Lock,
        Args {
            key: Some(key.to_string()),
            ttl_ms: Some(LOCK_TTL_MS),
            wait_ms,
            ..Args::default()
        },
    ))
}

/// UNLOCK `key` with a token patched in per request.
fn unlock_template(key: &str) -> Template {
    Template::new(request(
        CommandName::Unlock,
        Args {
            key: Some(key.to_string()),
            token: Some(String::from_utf8_lossy(TOKEN_SLOT).into_owned()),
            ..Args::default()
        },
    ))
    .with_token_slot()
}

fn key(i: u64) -> String {
    format!("key:{i:012}")
}

fn request(cmd: CommandName, args: Args) -> Request {
    Request {
        args,
        ..Request::new(0, cmd)
    }
}

/// The templates the measured loop cycles through: one per key (one in all for PING).
fn templates(opts: &Opts) -> Vec<Template> {
    let value = vec![b'x'; opts.value_size];
    if opts.resp {
        return match opts.cmd {
            Cmd::Ping => vec![Template::resp(&[b"PING"])],
            Cmd::Get => (0..opts.keyspace)
                .map(|i| Template::resp(&[b"GET", key(i).as_bytes()]))
                .collect(),
            Cmd::Set => (0..opts.keyspace)
                .map(|i| Template::resp(&[b"SET", key(i).as_bytes(), &value]))
                .collect(),
            Cmd::Lock | Cmd::Handoff => Vec::new(),
        };
    }
    match opts.cmd {
        Cmd::Ping => vec![Template::new(request(CommandName::Ping, Args::default()))],
        Cmd::Get => (0..opts.keyspace)
            .map(|i| {
                Template::new(request(
                    CommandName::Get,
                    Args {
                        key: Some(key(i)),
                        ..Args::default()
                    },
                ))
            })
            .collect(),
        Cmd::Set => (0..opts.keyspace)
            .map(|i| {
                Template::new(request(
                    CommandName::Set,
                    Args {
                        key: Some(key(i)),
                        value: Some(value.clone()),
                        ..Args::default()
                    },
                ))
            })
            .collect(),
        Cmd::Lock | Cmd::Handoff => Vec::new(),
    }
}

/// What a successful answer must hold.
#[derive(Clone, Copy)]
enum Expect {
    /// A bin of this length (GET hit).
    Bin(usize),
    /// This str (SET's "OK", PING's "PONG").
    Text(&'static str),
}

/// Checks one response body without allocating: right id, `ok` of the expected shape, no `err`.
fn check(body: &[u8], id: u64, expect: Expect) -> Result<(), String> {
    check_with(body, id, |rd| {
        match expect {
            Expect::Bin(len) => match rd.first() {
                Some(0xc0) => return Err("GET missed (ok: nil)".into()),
                _ => {
                    let n = rmp::decode::read_bin_len(rd)
                        .map_err(|e| format!("ok is not a bin: {e}"))?
                        as usize;
                    if n != len || rd.len() < n {
                        return Err(format!("value of {n} bytes, expected {len}"));
                    }
                    *rd = &rd[n..];
                }
            },
            Expect::Text(want) => {
                let (got, rest) = rmp::decode::read_str_from_slice(*rd)
                    .map_err(|e| format!("ok is not a str: {e:?}"))?;
                if got != want {
                    return Err(format!("ok is {got:?}, expected {want:?}"));
                }
                *rd = rest;
            }
        }
        Ok(())
    })
}

/// Checks the envelope of one response (right id, no `err`) and reads its `ok` value with `read_ok`,
/// which must consume exactly that value.
fn check_with<T>(
    body: &[u8],
    id: u64,
    mut read_ok: impl FnMut(&mut &[u8]) -> Result<T, String>,
) -> Result<T, String> {
    let mut rd = body;
    let fields = rmp::decode::read_map_len(&mut rd).map_err(|e| format!("not a map: {e}"))?;
    let mut seen_id = None;
    let mut ok = None;
    for _ in 0..fields {
        let (name, rest) =
            rmp::decode::read_str_from_slice(rd).map_err(|e| format!("bad field name: {e:?}"))?;
        rd = rest;
        match name {
            "id" => seen_id = Some(read_uint(&mut rd)?),
            "elapsed_us" => {
                read_uint(&mut rd)?;
            }
            "request_id" => {
                let (_, rest) = rmp::decode::read_str_from_slice(rd)
                    .map_err(|e| format!("bad request_id: {e:?}"))?;
                rd = rest;
            }
            "ok" => ok = Some(read_ok(&mut rd)?),
            "err" => {
                // The slow path is fine here: errors are the exception.
                let err = Response::decode(body).map_err(|e| e.to_string())?.err;
                return Err(match err {
                    Some(e) => format!("{}: {}", e.code, e.message),
                    None => "err member without an error".into(),
                });
            }
            other => skip_value(&mut rd, other)?,
        }
    }
    match (seen_id, ok) {
        (Some(got), _) if got != id => Err(format!("response id {got}, expected {id}")),
        (None, _) => Err("response without an id".into()),
        (Some(_), None) => Err("response without ok".into()),
        (Some(_), Some(ok)) => Ok(ok),
    }
}

fn skip_value(rd: &mut &[u8], field: &str) -> Result<(), String> {
    rmpv::decode::read_value_ref(rd)
        .map(|_| ())
        .map_err(|e| format!("bad value of field {field}: {e}"))
}

/// What a LOCK answered.
struct Grant {
    token: [u8; TOKEN_LEN],
    fence: u64,
    waited_us: u64,
}

/// Reads LOCK's answer `{token, fence, ttl_ms, waited_us}` and checks it: a token of [`TOKEN_LEN`]
/// characters, a fencing token, and the lease asked for.
fn read_grant(rd: &mut &[u8]) -> Result<Grant, String> {
    let fields = rmp::decode::read_map_len(rd).map_err(|e| format!("grant is not a map: {e}"))?;
    let (mut token, mut fence, mut ttl_ms, mut waited_us) = (None, None, None, None);
    for _ in 0..fields {
        let (name, rest) =
            rmp::decode::read_str_from_slice(*rd).map_err(|e| format!("bad grant field: {e:?}"))?;
        *rd = rest;
        match name {
            "token" => {
                let (t, rest) = rmp::decode::read_str_from_slice(*rd)
                    .map_err(|e| format!("token is not a str: {e:?}"))?;
                *rd = rest;
                token = Some(
                    <[u8; TOKEN_LEN]>::try_from(t.as_bytes())
                        .map_err(|_| format!("owner token {t:?} is not {TOKEN_LEN} characters"))?,
                );
            }
            "fence" => fence = Some(read_uint(rd)?),
            "ttl_ms" => ttl_ms = Some(read_uint(rd)?),
            "waited_us" => waited_us = Some(read_uint(rd)?),
            other => skip_value(rd, other)?,
        }
    }
    match (token, fence, ttl_ms, waited_us) {
        (Some(token), Some(fence), Some(LOCK_TTL_MS), Some(waited_us)) => Ok(Grant {
            token,
            fence,
            waited_us,
        }),
        (_, _, Some(ttl), _) if ttl != LOCK_TTL_MS => {
            Err(format!("grant with ttl_ms {ttl}, asked for {LOCK_TTL_MS}"))
        }
        _ => Err("grant without token, fence, ttl_ms or waited_us".into()),
    }
}

/// Reads UNLOCK's answer `{status}` and checks that the status is OK.
fn read_unlock_status(rd: &mut &[u8]) -> Result<(), String> {
    let fields = rmp::decode::read_map_len(rd).map_err(|e| format!("status is not a map: {e}"))?;
    let mut ok = false;
    for _ in 0..fields {
        let (name, rest) = rmp::decode::read_str_from_slice(*rd)
            .map_err(|e| format!("bad UNLOCK field: {e:?}"))?;
        *rd = rest;
        if name == "status" {
            let (status, rest) = rmp::decode::read_str_from_slice(*rd)
                .map_err(|e| format!("status is not a str: {e:?}"))?;
            *rd = rest;
            if status != "OK" {
                return Err(format!("UNLOCK answered status {status}, expected OK"));
            }
            ok = true;
        } else {
            skip_value(rd, name)?;
        }
    }
    if ok {
        Ok(())
    } else {
        Err("UNLOCK answer without a status".into())
    }
}

/// Checks one RESP reply: a bulk string of the expected length, or the expected simple string.
fn check_resp(reply: &[u8], expect: Expect) -> Result<(), String> {
    let shown = || String::from_utf8_lossy(reply).trim_end().to_string();
    match expect {
        Expect::Bin(len) => {
            if reply.starts_with(b"$-1\r\n") {
                return Err("GET missed (nil)".into());
            }
            let want = format!("${len}\r\n");
            if !reply.starts_with(want.as_bytes()) {
                return Err(format!(
                    "reply {}, expected a {len}-byte bulk string",
                    shown()
                ));
            }
            Ok(())
        }
        Expect::Text(want) => match reply.strip_prefix(b"+") {
            Some(rest) if rest.strip_suffix(b"\r\n") == Some(want.as_bytes()) => Ok(()),
            _ => Err(format!("reply {}, expected +{want}", shown())),
        },
    }
}

/// Checks that a RESP reply is exactly `want` (`+OK\r\n`, `:1\r\n`).
fn check_resp_exact(reply: &[u8], want: &[u8]) -> Result<(), String> {
    if reply == want {
        Ok(())
    } else {
        Err(format!(
            "reply {}, expected {}",
            String::from_utf8_lossy(reply).trim_end(),
            String::from_utf8_lossy(want).trim_end()
        ))
    }
}

/// Takes one whole RESP reply (simple string, error, integer or bulk string) off the front of `buf`.
fn take_resp(buf: &mut BytesMut) -> Result<Option<BytesMut>, String> {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line_end = eol + 2;
    let total = match buf[0] {
        b'+' | b'-' | b':' => line_end,
        b'$' => {
            let len: i64 = std::str::from_utf8(&buf[1..eol])
                .ok()
                .and_then(|n| n.parse().ok())
                .ok_or("bad bulk length")?;
            if len < 0 {
                line_end
            } else {
                line_end + len as usize + 2
            }
        }
        other => return Err(format!("unexpected RESP reply type {:?}", other as char)),
    };
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(buf.split_to(total)))
}

fn read_uint(rd: &mut &[u8]) -> Result<u64, String> {
    rmp::decode::read_int::<u64, _>(rd).map_err(|e| format!("bad integer: {e}"))
}

/// One open connection with its read buffer.
struct Conn {
    stream: UnixStream,
    inbuf: BytesMut,
    out: Vec<u8>,
    resp: bool,
}

impl Conn {
    async fn open(opts: &Opts) -> Result<Conn, String> {
        let stream = UnixStream::connect(&opts.socket)
            .await
            .map_err(|e| format!("connecting to {}: {e}", opts.socket.display()))?;
        let mut conn = Conn {
            stream,
            inbuf: BytesMut::with_capacity(64 * 1024),
            out: Vec::with_capacity(4096),
            resp: opts.resp,
        };
        if conn.resp {
            return Ok(conn);
        }
        let hello = Request {
            args: Args {
                version: Some(PROTOCOL_VERSION),
                client: Some("loadgen".into()),
                ..Args::default()
            },
            ..Request::new(1, CommandName::Hello)
        };
        push_frame(&mut conn.out, &hello.to_msgpack());
        conn.flush().await?;
        let body = conn.next_frame().await?;
        let response = Response::decode(&body).map_err(|e| format!("HELLO answer: {e}"))?;
        if let Some(err) = response.err {
            return Err(format!("HELLO refused: {}: {}", err.code, err.message));
        }
        Ok(conn)
    }

    fn check(&self, body: &[u8], id: u64, expect: Expect) -> Result<(), String> {
        if self.resp {
            check_resp(body, expect)
        } else {
            check(body, id, expect)
        }
    }

    async fn flush(&mut self) -> Result<(), String> {
        self.stream
            .write_all(&self.out)
            .await
            .map_err(|e| format!("write: {e}"))?;
        self.out.clear();
        Ok(())
    }

    /// Writes what is in `out`, reads one answer, and files the round trip's latency.
    async fn exchange(&mut self, tally: &mut Tally) -> Result<BytesMut, String> {
        let sent = Instant::now();
        self.flush().await?;
        let body = self.next_frame().await?;
        let ns = sent.elapsed().as_nanos() as u64;
        tally.latency_ns.saturating_record(ns.max(1));
        Ok(body)
    }

    async fn next_frame(&mut self) -> Result<BytesMut, String> {
        loop {
            let taken = if self.resp {
                take_resp(&mut self.inbuf)?
            } else {
                take_frame(&mut self.inbuf, MAX_FRAME_LEN).map_err(|e| e.to_string())?
            };
            if let Some(body) = taken {
                return Ok(body);
            }
            match self.stream.read_buf(&mut self.inbuf).await {
                Ok(0) => return Err("the server closed the connection".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }
}

/// SETs every key with no expiry, so the GETs that follow all hit.
async fn preload(conn: &mut Conn, opts: &Opts) -> Result<(), String> {
    let value = vec![b'x'; opts.value_size];
    let batch = 256;
    let mut next = 0;
    while next < opts.keyspace {
        let end = (next + batch).min(opts.keyspace);
        for i in next..end {
            let template = if conn.resp {
                Template::resp(&[b"SET", key(i).as_bytes(), &value])
            } else {
                let args = Args {
                    key: Some(key(i)),
                    value: Some(value.clone()),
                    ttl_ms: Some(0),
                    ..Args::default()
                };
                Template::new(request(CommandName::Set, args))
            };
            template.push(&mut conn.out, i);
        }
        conn.flush().await?;
        for i in next..end {
            let body = conn.next_frame().await?;
            conn.check(&body, i, Expect::Text("OK"))
                .map_err(|e| format!("preloading: {e}"))?;
        }
        next = end;
    }
    Ok(())
}

/// What one connection measured.
struct Tally {
    done: u64,
    errors: u64,
    first_error: Option<String>,
    latency_ns: Histogram<u64>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            done: 0,
            errors: 0,
            first_error: None,
            latency_ns: histogram(),
        }
    }

    fn fail(&mut self, error: String) {
        self.errors += 1;
        self.first_error.get_or_insert(error);
    }
}

fn histogram() -> Histogram<u64> {
    // 1 ns to 10 minutes, three significant figures.
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("constant histogram bounds are valid")
}

/// The closed loop of one connection: claim up to `pipeline` requests, write them, read their answers.
async fn run_connection(
    mut conn: Conn,
    index: u64,
    templates: Arc<Vec<Template>>,
    remaining: Arc<AtomicI64>,
    pipeline: u64,
    expect: Expect,
    deadline: Instant,
) -> Tally {
    let mut tally = Tally::new();
    // Each connection starts at its own place in the keyspace.
    let mut slot = (index as usize * 7919) % templates.len();
    let mut id = 1u64;
    loop {
        let before = remaining.fetch_sub(pipeline as i64, Ordering::Relaxed);
        if before <= 0 {
            break;
        }
        let batch = (before as u64).min(pipeline);
        let first_id = id + 1;
        for _ in 0..batch {
            id += 1;
            templates[slot].push(&mut conn.out, id);
            slot += 1;
            if slot == templates.len() {
                slot = 0;
            }
        }
        let sent = Instant::now();
        if let Err(e) = conn.flush().await {
            tally.errors += batch;
            tally.first_error.get_or_insert(e);
            break;
        }
        for want in first_id..first_id + batch {
            let body = match conn.next_frame().await {
                Ok(body) => body,
                Err(e) => {
                    tally.errors += first_id + batch - want;
                    tally.first_error.get_or_insert(e);
                    return tally;
                }
            };
            let latency = sent.elapsed().as_nanos() as u64;
            tally.latency_ns.saturating_record(latency.max(1));
            tally.done += 1;
            if let Err(e) = conn.check(&body, want, expect) {
                tally.errors += 1;
                let desynced = e.starts_with("response id") || e.starts_with("not a map");
                tally.first_error.get_or_insert(e);
                if desynced {
                    return tally;
                }
            }
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    tally
}

/// One connection's closed loop of uncontended LOCK+UNLOCK pairs on its own key (with `--resp`, Redis's
/// SET NX PX + compare-and-delete EVAL). `done` counts pairs; the latency is per request.
async fn lock_pairs(
    mut conn: Conn,
    index: u64,
    remaining: Arc<AtomicI64>,
    deadline: Instant,
) -> Tally {
    let mut tally = Tally::new();
    let key = lock_key(index);
    let (lock, unlock) = if conn.resp {
        let px = LOCK_TTL_MS.to_string();
        let set = [
            b"SET",
            key.as_bytes(),
            TOKEN_SLOT,
            b"NX",
            b"PX",
            px.as_bytes(),
        ];
        let eval = [
            b"EVAL".as_slice(),
            RESP_UNLOCK_SCRIPT.as_bytes(),
            b"1",
            key.as_bytes(),
            TOKEN_SLOT,
        ];
        (
            Template::resp(&set).with_token_slot(),
            Template::resp(&eval).with_token_slot(),
        )
    } else {
        (lock_template(&key, None), unlock_template(&key))
    };
    let mut id = 1u64;
    let mut last_fence = 0u64;
    let mut token = *TOKEN_SLOT;
    while remaining.fetch_sub(1, Ordering::Relaxed) > 0 {
        id += 1;
        if conn.resp {
            // The owner token Redis's recipe asks for: random, made by the client.
            Uuid::new_v4().hyphenated().encode_lower(&mut token);
        }
        lock.push_token(&mut conn.out, id, &token);
        let body = match conn.exchange(&mut tally).await {
            Ok(body) => body,
            Err(e) => {
                tally.fail(e);
                return tally;
            }
        };
        let granted = if conn.resp {
            check_resp_exact(&body, b"+OK\r\n")
        } else {
            check_with(&body, id, read_grant).and_then(|grant| {
                if grant.fence <= last_fence {
                    return Err(format!("fencing token {} after {last_fence}", grant.fence));
                }
                last_fence = grant.fence;
                token = grant.token;
                Ok(())
            })
        };
        if let Err(e) = granted {
            tally.fail(format!("LOCK: {e}"));
            return tally;
        }

        id += 1;
        unlock.push_token(&mut conn.out, id, &token);
        let body = match conn.exchange(&mut tally).await {
            Ok(body) => body,
            Err(e) => {
                tally.fail(e);
                return tally;
            }
        };
        let released = if conn.resp {
            check_resp_exact(&body, b":1\r\n")
        } else {
            check_with(&body, id, read_unlock_status)
        };
        if let Err(e) = released {
            tally.fail(format!("UNLOCK: {e}"));
            return tally;
        }
        tally.done += 1;
        if Instant::now() >= deadline {
            break;
        }
    }
    tally
}

/// What the `--cmd handoff` connections share. The client runs on one thread by default, so the
/// mutex is never contended; it keeps the checks right with `--threads` too.
#[derive(Default)]
struct Floor {
    /// The connection holding the lock, as far as the client has seen.
    holder: Option<u64>,
    /// The newest fencing token granted.
    last_fence: u64,
    /// The release not yet followed by a grant: its number and when its UNLOCK was written.
    released: Option<(u64, Instant)>,
    /// Releases so far.
    releases: u64,
    /// LOCKs written whose grant has not been read yet.
    lock_pending: u64,
    /// Contenders still running.
    active: u64,
}

/// The shared state of `--cmd handoff`, and a signal for `--wait-for-queue` when it changes.
struct Shared {
    floor: Mutex<Floor>,
    changed: tokio::sync::Notify,
}

impl Shared {
    fn floor(&self) -> std::sync::MutexGuard<'_, Floor> {
        self.floor
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until every other running contender has a LOCK written.
    async fn queue_filled(&self) {
        loop {
            let changed = self.changed.notified();
            {
                let f = self.floor();
                if f.lock_pending + 1 >= f.active {
                    return;
                }
            }
            changed.await;
        }
    }
}

/// Counts a contender out when its loop ends, however it ends.
struct Contender<'a>(&'a Shared);

impl Drop for Contender<'_> {
    fn drop(&mut self) {
        self.0.floor().active -= 1;
        self.0.changed.notify_waiters();
    }
}

/// What one `--cmd handoff` connection measured.
struct HandoffTally {
    grants: u64,
    errors: u64,
    first_error: Option<String>,
    /// UNLOCK written → next grant read, for grants that waited in the queue: the hand-off proper.
    queued_ns: Histogram<u64>,
    /// The same, for grants of a lock already free when their LOCK arrived (the previous holder's
    /// UNLOCK was handled first).
    free_ns: Histogram<u64>,
}

impl HandoffTally {
    fn fail(&mut self, error: String) {
        self.errors += 1;
        self.first_error.get_or_insert(error);
    }
}

/// One contender's loop: LOCK the one key (waiting in the queue), UNLOCK as soon as granted.
async fn handoff_connection(
    mut conn: Conn,
    index: u64,
    shared: Arc<Shared>,
    remaining: Arc<AtomicI64>,
    deadline: Instant,
    wait_for_queue: bool,
) -> HandoffTally {
    let mut tally = HandoffTally {
        grants: 0,
        errors: 0,
        first_error: None,
        queued_ns: histogram(),
        free_ns: histogram(),
    };
    let lock = lock_template(HANDOFF_KEY, Some(HANDOFF_WAIT_MS));
    let unlock = unlock_template(HANDOFF_KEY);
    let ping = Template::new(request(CommandName::Ping, Args::default()));
    let _counted = Contender(&shared);
    let mut id = 1u64;
    loop {
        id += 1;
        lock.push(&mut conn.out, id);
        if let Err(e) = conn.flush().await {
            tally.fail(e);
            return tally;
        }
        shared.floor().lock_pending += 1;
        if wait_for_queue {
            shared.changed.notify_waiters();
        }
        let body = match conn.next_frame().await {
            Ok(body) => body,
            Err(e) => {
                tally.fail(e);
                return tally;
            }
        };
        let read_at = Instant::now();
        let grant = match check_with(&body, id, read_grant) {
            Ok(grant) => grant,
            Err(e) => {
                tally.fail(format!("LOCK: {e}"));
                return tally;
            }
        };
        {
            let mut f = shared.floor();
            f.lock_pending -= 1;
            if let Some(other) = f.holder {
                tally.fail(format!(
                    "connection {index} granted while connection {other} still holds the lock"
                ));
            }
            if grant.fence <= f.last_fence {
                tally.fail(format!(
                    "fencing token {} granted after {}",
                    grant.fence, f.last_fence
                ));
            }
            f.last_fence = f.last_fence.max(grant.fence);
            f.holder = Some(index);
            if let Some((_, at)) = f.released.take() {
                let ns = (read_at.saturating_duration_since(at).as_nanos() as u64).max(1);
                if grant.waited_us > 0 {
                    tally.queued_ns.saturating_record(ns);
                } else {
                    tally.free_ns.saturating_record(ns);
                }
            }
        }
        tally.grants += 1;
        // Once the grants are used up, each contender stops after its next grant, so the queue drains.
        let more = remaining.fetch_sub(1, Ordering::Relaxed) > 1 && read_at < deadline;
        if wait_for_queue {
            // Every other contender's LOCK is written; a PING round trip then lets the daemon read
            // them before this UNLOCK, so they are queued when it arrives.
            shared.queue_filled().await;
            id += 1;
            ping.push(&mut conn.out, id);
            let answered = match conn.flush().await {
                Ok(()) => conn.next_frame().await,
                Err(e) => Err(e),
            };
            if let Err(e) = answered.and_then(|body| check(&body, id, Expect::Text("PONG"))) {
                tally.fail(format!("PING: {e}"));
                return tally;
            }
        }

        id += 1;
        unlock.push_token(&mut conn.out, id, &grant.token);
        // Not the holder any more from the moment the UNLOCK may reach the daemon.
        let release = {
            let mut f = shared.floor();
            f.holder = None;
            f.releases += 1;
            let n = f.releases;
            f.released = Some((n, Instant::now()));
            n
        };
        let written = conn.flush().await;
        {
            // The instant the UNLOCK was written, unless its grant was already read (the write had to
            // wait), in which case the instant before the write stood.
            let mut f = shared.floor();
            if let Some((n, at)) = f.released.as_mut() {
                if *n == release {
                    *at = Instant::now();
                }
            }
        }
        if let Err(e) = written {
            tally.fail(e);
            return tally;
        }
        let released = match conn.next_frame().await {
            Ok(body) => check_with(&body, id, read_unlock_status),
            Err(e) => Err(e),
        };
        if let Err(e) = released {
            tally.fail(format!("UNLOCK: {e}"));
            return tally;
        }
        if !more {
            return tally;
        }
    }
}

/// Waits for every connection's loop, giving up a little past the deadline so a daemon that stops
/// answering cannot hang the run.
async fn join_all<T: 'static>(mut set: JoinSet<T>, deadline: Instant) -> Result<Vec<T>, String> {
    let give_up = tokio::time::Instant::from_std(deadline + Duration::from_secs(10));
    let mut tallies = Vec::with_capacity(set.len());
    loop {
        match tokio::time::timeout_at(give_up, set.join_next()).await {
            Ok(Some(joined)) => {
                tallies.push(joined.map_err(|e| format!("connection task failed: {e}"))?)
            }
            Ok(None) => return Ok(tallies),
            Err(_) => {
                set.abort_all();
                return Err(format!(
                    "{} connections still waiting for answers; gave up",
                    set.len()
                ));
            }
        }
    }
}

async fn run(opts: Opts) -> Result<bool, String> {
    if opts.cmd == Cmd::Handoff && opts.resp {
        return Err("--cmd handoff has no RESP counterpart: Redis has no lock queue".into());
    }
    if opts.wait_for_queue && opts.cmd != Cmd::Handoff {
        return Err("--wait-for-queue applies to --cmd handoff only".into());
    }
    if matches!(opts.cmd, Cmd::Lock | Cmd::Handoff) && opts.pipeline != 1 {
        return Err("--pipeline applies to get, set and ping only".into());
    }
    let mut conns = Vec::with_capacity(opts.connections as usize);
    for _ in 0..opts.connections {
        conns.push(Conn::open(&opts).await?);
    }
    if opts.cmd == Cmd::Get {
        preload(&mut conns[0], &opts).await?;
    }
    match opts.cmd {
        Cmd::Get | Cmd::Set | Cmd::Ping => run_requests(opts, conns).await,
        Cmd::Lock => run_lock_pairs(opts, conns).await,
        Cmd::Handoff => run_handoff(opts, conns).await,
    }
}

/// The measured clock and CPU of one run.
struct Span {
    cpu_before: Option<f64>,
    started: Instant,
    deadline: Instant,
}

impl Span {
    fn start(opts: &Opts) -> Span {
        let cpu_before = cpu_seconds();
        let started = Instant::now();
        Span {
            cpu_before,
            started,
            deadline: started + Duration::from_secs(opts.max_seconds),
        }
    }

    /// Seconds and client CPU seconds since the start.
    fn finish(&self) -> (f64, Option<f64>) {
        let secs = self.started.elapsed().as_secs_f64();
        let cpu = cpu_seconds()
            .zip(self.cpu_before)
            .map(|(after, before)| after - before);
        (secs, cpu)
    }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

/// GET, SET or PING.
async fn run_requests(opts: Opts, conns: Vec<Conn>) -> Result<bool, String> {
    let expect = match opts.cmd {
        Cmd::Get => Expect::Bin(opts.value_size),
        Cmd::Set => Expect::Text("OK"),
        _ => Expect::Text("PONG"),
    };
    let templates = Arc::new(templates(&opts));
    let remaining = Arc::new(AtomicI64::new(opts.requests as i64));

    let span = Span::start(&opts);
    let mut set = JoinSet::new();
    for (index, conn) in conns.into_iter().enumerate() {
        set.spawn(run_connection(
            conn,
            index as u64,
            templates.clone(),
            remaining.clone(),
            opts.pipeline,
            expect,
            span.deadline,
        ));
    }
    let tallies = join_all(set, span.deadline).await?;
    let (secs, cpu) = span.finish();
    let (done, errors, first_error, latency) = sum(tallies);

    let ms = |ns: u64| ns as f64 / 1e6;
    let rps = done as f64 / secs;
    println!(
        "{}{}: {} requests, {} connections, pipeline {}, {}-byte values, keyspace {}, {} thread(s)",
        opts.cmd.label(),
        if opts.resp { " (RESP)" } else { "" },
        done,
        opts.connections,
        opts.pipeline,
        opts.value_size,
        opts.keyspace,
        opts.threads,
    );
    println!("  {secs:.3} s, {rps:.0} requests/second, {errors} errors");
    if let Some(cpu) = cpu {
        println!(
            "  load generator CPU {cpu:.2} s ({:.2} us/request)",
            cpu * 1e6 / done.max(1) as f64
        );
    }
    println!(
        "  latency ms: p50 {:.3}, p99 {:.3}, max {:.3}",
        ms(latency.value_at_quantile(0.50)),
        ms(latency.value_at_quantile(0.99)),
        ms(latency.max()),
    );
    if done < opts.requests {
        println!(
            "  stopped early: {} of {} requests done",
            done, opts.requests
        );
    }
    if let Some(e) = &first_error {
        println!("  first error: {e}");
    }
    // One line for scripts.
    println!(
        "RESULT protocol={} cmd={} requests={} seconds={:.3} rps={:.0} p50_us={:.1} p99_us={:.1} max_us={:.1} errors={} client_cpu_s={:.2}",
        if opts.resp { "resp" } else { "scaled" },
        opts.cmd.label(),
        done,
        secs,
        rps,
        us(latency.value_at_quantile(0.50)),
        us(latency.value_at_quantile(0.99)),
        us(latency.max()),
        errors,
        cpu.unwrap_or(f64::NAN),
    );
    Ok(errors == 0 && done == opts.requests)
}

/// Adds up the connections' tallies.
fn sum(tallies: Vec<Tally>) -> (u64, u64, Option<String>, Histogram<u64>) {
    let mut latency = histogram();
    let (mut done, mut errors, mut first_error) = (0u64, 0u64, None);
    for tally in tallies {
        done += tally.done;
        errors += tally.errors;
        first_error = first_error.or(tally.first_error);
        let _ = latency.add(&tally.latency_ns);
    }
    (done, errors, first_error, latency)
}

/// `--cmd lock`: uncontended LOCK+UNLOCK pairs, a key per connection.
async fn run_lock_pairs(opts: Opts, conns: Vec<Conn>) -> Result<bool, String> {
    let remaining = Arc::new(AtomicI64::new(opts.requests as i64));
    let span = Span::start(&opts);
    let mut set = JoinSet::new();
    for (index, conn) in conns.into_iter().enumerate() {
        set.spawn(lock_pairs(
            conn,
            index as u64,
            remaining.clone(),
            span.deadline,
        ));
    }
    let tallies = join_all(set, span.deadline).await?;
    let (secs, cpu) = span.finish();
    let (pairs, errors, first_error, latency) = sum(tallies);

    let pps = pairs as f64 / secs;
    println!(
        "{}: {} pairs, {} connections, a key per connection, {} thread(s)",
        if opts.resp {
            "SET NX PX + EVAL compare-and-delete (RESP)"
        } else {
            "LOCK+UNLOCK"
        },
        pairs,
        opts.connections,
        opts.threads,
    );
    println!(
        "  {secs:.3} s, {pps:.0} pairs/second ({:.0} requests/second), {errors} errors",
        pps * 2.0
    );
    if let Some(cpu) = cpu {
        println!(
            "  load generator CPU {cpu:.2} s ({:.2} us/pair)",
            cpu * 1e6 / pairs.max(1) as f64
        );
    }
    println!(
        "  latency per request us: p50 {:.1}, p99 {:.1}, max {:.1}",
        us(latency.value_at_quantile(0.50)),
        us(latency.value_at_quantile(0.99)),
        us(latency.max()),
    );
    if pairs < opts.requests {
        println!("  stopped early: {} of {} pairs done", pairs, opts.requests);
    }
    if let Some(e) = &first_error {
        println!("  first error: {e}");
    }
    println!(
        "RESULT protocol={} cmd=LOCK+UNLOCK pairs={} seconds={:.3} pairs_per_s={:.0} rps={:.0} p50_us={:.1} p99_us={:.1} max_us={:.1} errors={} client_cpu_s={:.2}",
        if opts.resp { "resp" } else { "scaled" },
        pairs,
        secs,
        pps,
        pps * 2.0,
        us(latency.value_at_quantile(0.50)),
        us(latency.value_at_quantile(0.99)),
        us(latency.max()),
        errors,
        cpu.unwrap_or(f64::NAN),
    );
    Ok(errors == 0 && pairs == opts.requests)
}

/// `--cmd handoff`: every connection contends for one key.
async fn run_handoff(opts: Opts, conns: Vec<Conn>) -> Result<bool, String> {
    let remaining = Arc::new(AtomicI64::new(opts.requests as i64));
    let shared = Arc::new(Shared {
        floor: Mutex::new(Floor {
            active: opts.connections,
            ..Floor::default()
        }),
        changed: tokio::sync::Notify::new(),
    });
    let span = Span::start(&opts);
    let mut set = JoinSet::new();
    for (index, conn) in conns.into_iter().enumerate() {
        set.spawn(handoff_connection(
            conn,
            index as u64,
            shared.clone(),
            remaining.clone(),
            span.deadline,
            opts.wait_for_queue,
        ));
    }
    let tallies = join_all(set, span.deadline).await?;
    let (secs, cpu) = span.finish();

    let (mut queued, mut free) = (histogram(), histogram());
    let (mut grants, mut errors, mut first_error) = (0u64, 0u64, None);
    for tally in tallies {
        grants += tally.grants;
        errors += tally.errors;
        first_error = first_error.or(tally.first_error);
        let _ = queued.add(&tally.queued_ns);
        let _ = free.add(&tally.free_ns);
    }
    let gps = grants as f64 / secs;
    println!(
        "HANDOFF: {} grants, {} connections contending for one key, {} thread(s){}",
        grants,
        opts.connections,
        opts.threads,
        if opts.wait_for_queue {
            ", each UNLOCK after the other contenders' LOCKs are written"
        } else {
            ""
        },
    );
    println!("  {secs:.3} s, {gps:.0} grants/second, {errors} errors");
    if let Some(cpu) = cpu {
        println!(
            "  load generator CPU {cpu:.2} s ({:.2} us/grant)",
            cpu * 1e6 / grants.max(1) as f64
        );
    }
    println!(
        "  hand-off us (UNLOCK written -> next grant read), {} queued grants: p50 {:.1}, p99 {:.1}, max {:.1}",
        queued.len(),
        us(queued.value_at_quantile(0.50)),
        us(queued.value_at_quantile(0.99)),
        us(queued.max()),
    );
    if !free.is_empty() {
        println!(
            "  {} grants found the lock free (their LOCK came after the UNLOCK): release -> grant us p50 {:.1}, p99 {:.1}",
            free.len(),
            us(free.value_at_quantile(0.50)),
            us(free.value_at_quantile(0.99)),
        );
    }
    if grants < opts.requests {
        println!(
            "  stopped early: {} of {} grants done",
            grants, opts.requests
        );
    }
    if let Some(e) = &first_error {
        println!("  first error: {e}");
    }
    println!(
        "RESULT protocol=scaled cmd=HANDOFF connections={} wait_for_queue={} grants={} seconds={:.3} grants_per_s={:.0} handoffs={} handoff_p50_us={:.1} handoff_p99_us={:.1} handoff_max_us={:.1} free_grants={} free_p50_us={:.1} free_p99_us={:.1} errors={} client_cpu_s={:.2}",
        opts.connections,
        opts.wait_for_queue,
        grants,
        secs,
        gps,
        queued.len(),
        us(queued.value_at_quantile(0.50)),
        us(queued.value_at_quantile(0.99)),
        us(queued.max()),
        free.len(),
        us(free.value_at_quantile(0.50)),
        us(free.value_at_quantile(0.99)),
        errors,
        cpu.unwrap_or(f64::NAN),
    );
    Ok(errors == 0 && grants >= opts.requests)
}

/// User plus system CPU time of this process so far, from /proc (in ticks of 1/100 s, Linux's USER_HZ).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces: state is the
    // first, utime the 12th, stime the 13th.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

fn main() -> ExitCode {
    let opts = Opts::parse();
    let runtime = if opts.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(opts.threads as usize)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(opts)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
