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
//! With `--resp` it speaks RESP to a Redis server instead (no HELLO, no ids: answers come in order), so
//! the same client, with the same cost per request, can drive both servers:
//!
//! ```text
//! cargo bench --bench loadgen -- --resp --socket /tmp/bench-redis.sock --connections 50 --cmd get
//! ```

use std::process::ExitCode;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::task::JoinSet;

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

    /// Requests in total, across all connections.
    #[arg(long, short = 'n', default_value_t = 500_000, value_parser = clap::value_parser!(u64).range(1..))]
    requests: u64,

    /// The command to send.
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

    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Cmd {
    Get,
    Set,
    Ping,
}

impl Cmd {
    fn name(self) -> CommandName {
        match self {
            Cmd::Get => CommandName::Get,
            Cmd::Set => CommandName::Set,
            Cmd::Ping => CommandName::Ping,
        }
    }
}

/// Where the id's eight bytes sit in a frame: 4-byte prefix, map header, fixstr "id", u64 marker.
const ID_AT: usize = 4 + 1 + 3 + 1;

/// One request, encoded once, as a whole frame whose id (if it has one) is patched per use.
struct Template {
    frame: Vec<u8>,
    has_id: bool,
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
        }
    }

    fn push(&self, out: &mut Vec<u8>, id: u64) {
        let start = out.len();
        out.extend_from_slice(&self.frame);
        if self.has_id {
            out[start + ID_AT..start + ID_AT + 8].copy_from_slice(&id.to_be_bytes());
        }
    }
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
    let mut rd = body;
    let fields = rmp::decode::read_map_len(&mut rd).map_err(|e| format!("not a map: {e}"))?;
    let mut seen_id = None;
    let mut ok = false;
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
            "ok" => {
                match expect {
                    Expect::Bin(len) => match rd.first() {
                        Some(0xc0) => return Err("GET missed (ok: nil)".into()),
                        _ => {
                            let n = rmp::decode::read_bin_len(&mut rd)
                                .map_err(|e| format!("ok is not a bin: {e}"))?
                                as usize;
                            if n != len || rd.len() < n {
                                return Err(format!("value of {n} bytes, expected {len}"));
                            }
                            rd = &rd[n..];
                        }
                    },
                    Expect::Text(want) => {
                        let (got, rest) = rmp::decode::read_str_from_slice(rd)
                            .map_err(|e| format!("ok is not a str: {e:?}"))?;
                        if got != want {
                            return Err(format!("ok is {got:?}, expected {want:?}"));
                        }
                        rd = rest;
                    }
                }
                ok = true;
            }
            "err" => {
                // The slow path is fine here: errors are the exception.
                let err = Response::decode(body).map_err(|e| e.to_string())?.err;
                return Err(match err {
                    Some(e) => format!("{}: {}", e.code, e.message),
                    None => "err member without an error".into(),
                });
            }
            other => {
                rmpv::decode::read_value_ref(&mut rd)
                    .map_err(|e| format!("bad value of field {other}: {e}"))?;
            }
        }
    }
    match seen_id {
        Some(got) if got != id => Err(format!("response id {got}, expected {id}")),
        None => Err("response without an id".into()),
        Some(_) if !ok => Err("response without ok".into()),
        Some(_) => Ok(()),
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
    let mut tally = Tally {
        done: 0,
        errors: 0,
        first_error: None,
        latency_ns: histogram(),
    };
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

async fn run(opts: Opts) -> Result<bool, String> {
    let expect = match opts.cmd {
        Cmd::Get => Expect::Bin(opts.value_size),
        Cmd::Set => Expect::Text("OK"),
        Cmd::Ping => Expect::Text("PONG"),
    };
    let mut conns = Vec::with_capacity(opts.connections as usize);
    for _ in 0..opts.connections {
        conns.push(Conn::open(&opts).await?);
    }
    if opts.cmd == Cmd::Get {
        preload(&mut conns[0], &opts).await?;
    }
    let templates = Arc::new(templates(&opts));
    let remaining = Arc::new(AtomicI64::new(opts.requests as i64));

    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(opts.max_seconds);
    let mut set = JoinSet::new();
    for (index, conn) in conns.into_iter().enumerate() {
        set.spawn(run_connection(
            conn,
            index as u64,
            templates.clone(),
            remaining.clone(),
            opts.pipeline,
            expect,
            deadline,
        ));
    }
    let mut latency = histogram();
    let (mut done, mut errors, mut first_error) = (0u64, 0u64, None);
    // A daemon that stops answering must not hang the run: give the loops a little past the deadline.
    let give_up = tokio::time::Instant::from_std(deadline + Duration::from_secs(10));
    loop {
        let joined = match tokio::time::timeout_at(give_up, set.join_next()).await {
            Ok(Some(joined)) => joined,
            Ok(None) => break,
            Err(_) => {
                set.abort_all();
                return Err(format!(
                    "{} connections still waiting for answers; gave up",
                    set.len()
                ));
            }
        };
        let tally = joined.map_err(|e| format!("connection task failed: {e}"))?;
        done += tally.done;
        errors += tally.errors;
        first_error = first_error.or(tally.first_error);
        let _ = latency.add(&tally.latency_ns);
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds()
        .zip(cpu_before)
        .map(|(after, before)| after - before);

    let ms = |ns: u64| ns as f64 / 1e6;
    let rps = done as f64 / secs;
    println!(
        "{}{}: {} requests, {} connections, pipeline {}, {}-byte values, keyspace {}, {} thread(s)",
        opts.cmd.name(),
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
        opts.cmd.name(),
        done,
        secs,
        rps,
        latency.value_at_quantile(0.50) as f64 / 1e3,
        latency.value_at_quantile(0.99) as f64 / 1e3,
        latency.max() as f64 / 1e3,
        errors,
        cpu.unwrap_or(f64::NAN),
    );
    Ok(errors == 0 && done == opts.requests)
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
