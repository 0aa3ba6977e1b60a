//! `scalectl`: talk to a running `scaled` from a shell or a script.
//!
//! Exit status: 0 on success; 1 when `get` finds no value; 2 on any error (message on stderr);
//! `lock` exits with its command's status, or 75 when the lock could not be had.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use scaled::config::DEFAULT_SOCKET;
use scaled_client::proto::Fence;
use scaled_client::{Client, Endpoint, Error, LockOptions, Stats};

/// Exit status for an error of any kind.
const EXIT_ERROR: u8 = 2;

/// Exit status of `lock` when the lock was not had in time (EX_TEMPFAIL, as flock(1) scripts expect).
const EXIT_NOT_LOCKED: u8 = 75;

/// Talk to a running scaled daemon.
#[derive(Parser, Debug)]
#[command(name = "scalectl", version)]
struct Cli {
    /// The daemon's Unix socket.
    #[arg(long, global = true, env = "SCALED_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,

    /// Connect over TCP to HOST:PORT instead of the Unix socket.
    #[arg(long, global = true)]
    tcp: Option<String>,

    /// File holding the token to show in HELLO, which the daemon's TCP listener requires: the token
    /// alone, or a `NAME TOKEN` line copied from the daemon's --auth-token-file.
    #[arg(long, global = true, env = "SCALED_TOKEN_FILE")]
    token_file: Option<PathBuf>,

    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Check the daemon answers; prints PONG and the round trip.
    Ping,
    /// Show the daemon's counters.
    Stats {
        /// Print the STATS document as JSON.
        #[arg(long)]
        json: bool,
        /// Refresh in place until interrupted.
        #[arg(long)]
        watch: bool,
        /// Seconds between refreshes with --watch.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
    /// Print the raw value stored under KEY; exit 1 when there is none.
    Get {
        /// The key.
        key: String,
    },
    /// Store VALUE under KEY ("-" reads the value from standard input).
    Set {
        /// The key.
        key: String,
        /// The value, or "-" for standard input.
        value: String,
        /// Seconds to live; 0 = never expires; default: the daemon's CACHE_TTL.
        #[arg(long)]
        ttl: Option<f64>,
        /// Guard the write with a lock grant, LOCK:FENCE (inside `scalectl lock`:
        /// "$SCALED_LOCK_KEY:$SCALED_LOCK_FENCE"); refused with FENCED, exit 76, once a newer
        /// grant of that lock exists.
        #[arg(long, value_name = "LOCK:FENCE")]
        fence: Option<String>,
    },
    /// Remove KEY; prints 1 if it was there, 0 if not.
    Del {
        /// The key.
        key: String,
        /// Guard the removal with a lock grant, LOCK:FENCE, as for `set`.
        #[arg(long, value_name = "LOCK:FENCE")]
        fence: Option<String>,
    },
    /// Hold lock KEY while COMMAND runs (the lease renews itself meanwhile), then release it. Exits
    /// with COMMAND's status, or 75 if the lock was not had within --wait. COMMAND sees the grant in
    /// SCALED_LOCK_KEY, SCALED_LOCK_TOKEN and SCALED_LOCK_FENCE.
    Lock {
        /// The lock key.
        key: String,
        /// Seconds to wait for the lock; 0 = try once. Default: the daemon's default wait.
        #[arg(long)]
        wait: Option<f64>,
        /// Lease in seconds, renewed while COMMAND runs. Default: the daemon's LOCK_TIMEOUT.
        #[arg(long)]
        ttl: Option<f64>,
        /// Do not renew the lease: the lock ends when the lease does, even while COMMAND still
        /// runs, and COMMAND's fenced writes are refused from then on.
        #[arg(long)]
        no_renew: bool,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List the locks held, with owner, age, lease left and waiters.
    Locks {
        /// Print the listing as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(run(cli))
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("scalectl: {message}");
    ExitCode::from(EXIT_ERROR)
}

async fn run(cli: Cli) -> ExitCode {
    let endpoint = match &cli.tcp {
        Some(addr) => Endpoint::Tcp(addr.clone()),
        None => Endpoint::Unix(cli.socket.clone()),
    };
    let where_ = match &endpoint {
        Endpoint::Unix(p) => p.display().to_string(),
        Endpoint::Tcp(a) => a.clone(),
    };
    let mut builder = Client::builder(endpoint).name("scalectl");
    if let Some(path) = &cli.token_file {
        match read_token(path) {
            Ok(token) => builder = builder.token(token),
            Err(e) => return fail(e),
        }
    }
    let client = match builder.connect().await {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot reach scaled at {where_}: {e}")),
    };
    let result = match cli.command {
        Cmd::Ping => ping(&client).await,
        Cmd::Stats {
            json,
            watch,
            interval,
        } => stats(&client, json, watch, interval).await,
        Cmd::Get { key } => get(&client, &key).await,
        Cmd::Set {
            key,
            value,
            ttl,
            fence,
        } => set(&client, &key, &value, ttl, fence.as_deref()).await,
        Cmd::Del { key, fence } => del(&client, &key, fence.as_deref()).await,
        Cmd::Lock {
            key,
            wait,
            ttl,
            no_renew,
            command,
        } => lock(&client, &key, wait, ttl, !no_renew, &command).await,
        Cmd::Locks { json } => locks(&client, json).await,
    };
    result.unwrap_or_else(fail)
}

type CmdResult = Result<ExitCode, String>;

/// The token in a token file: the last field of its first line that is neither blank nor a comment,
/// so both a bare token and a line of the daemon's own token file work.
fn read_token(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().last())
        .map(str::to_string)
        .ok_or_else(|| format!("the token file {} holds no token", path.display()))
}

async fn ping(client: &Client) -> CmdResult {
    let start = std::time::Instant::now();
    client.ping().await.map_err(|e| e.to_string())?;
    println!("PONG ({} µs)", start.elapsed().as_micros());
    Ok(ExitCode::SUCCESS)
}

async fn get(client: &Client, key: &str) -> CmdResult {
    match client.get(key).await.map_err(|e| e.to_string())? {
        Some(value) => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(&value)
                .and_then(|_| stdout.flush())
                .map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        None => Ok(ExitCode::from(1)),
    }
}

/// Reads `--fence LOCK:FENCE`; the lock key may itself hold colons, the fence is after the last.
fn parse_fence(text: &str) -> Result<Fence, String> {
    let (lock, token) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("--fence {text:?} is not LOCK:FENCE"))?;
    let token = token
        .parse()
        .map_err(|_| format!("--fence {text:?}: {token:?} is not a fencing token"))?;
    Ok(Fence {
        lock: lock.to_string(),
        token,
    })
}

/// What a refused fenced write exits with, so scripts can tell it from other failures.
const EXIT_FENCED: u8 = 76;

/// Maps a write's error: a fenced write refused exits [`EXIT_FENCED`], after saying why.
fn write_failed(e: Error) -> CmdResult {
    match e {
        e @ Error::Fenced(_) => {
            eprintln!("scalectl: {e}");
            Ok(ExitCode::from(EXIT_FENCED))
        }
        e => Err(e.to_string()),
    }
}

async fn set(
    client: &Client,
    key: &str,
    value: &str,
    ttl: Option<f64>,
    fence: Option<&str>,
) -> CmdResult {
    let fence = fence.map(parse_fence).transpose()?;
    let ttl = match ttl {
        Some(secs) if !secs.is_finite() || secs < 0.0 => {
            return Err(format!("--ttl {secs} is not a number of seconds"));
        }
        Some(secs) => Some(Duration::from_secs_f64(secs)),
        None => None,
    };
    let bytes = if value == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| format!("reading stdin: {e}"))?;
        buf
    } else {
        value.as_bytes().to_vec()
    };
    let written = match &fence {
        Some(fence) => client.set_fenced(key, &bytes, ttl, fence).await,
        None => client.set(key, &bytes, ttl).await,
    };
    if let Err(e) = written {
        return write_failed(e);
    }
    println!("OK");
    Ok(ExitCode::SUCCESS)
}

async fn del(client: &Client, key: &str, fence: Option<&str>) -> CmdResult {
    let fence = fence.map(parse_fence).transpose()?;
    let removed = match &fence {
        Some(fence) => client.del_fenced(key, fence).await,
        None => client.del(key).await,
    };
    match removed {
        Ok(existed) => {
            println!("{}", u8::from(existed));
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => write_failed(e),
    }
}

fn seconds(flag: &str, secs: Option<f64>) -> Result<Option<Duration>, String> {
    match secs {
        Some(s) if !s.is_finite() || !(0.0..=86_400.0).contains(&s) => Err(format!(
            "{flag} {s} is not a number of seconds from 0 to 86400"
        )),
        Some(s) => Ok(Some(Duration::from_secs_f64(s))),
        None => Ok(None),
    }
}

async fn lock(
    client: &Client,
    key: &str,
    wait: Option<f64>,
    ttl: Option<f64>,
    auto_renew: bool,
    command: &[String],
) -> CmdResult {
    let wait = seconds("--wait", wait)?;
    let options = LockOptions {
        ttl: seconds("--ttl", ttl)?,
        wait,
        auto_renew,
    };
    let taken = if wait == Some(Duration::ZERO) {
        client.try_lock(key, options).await
    } else {
        client.lock(key, options).await
    };
    let guard = match taken {
        Ok(guard) => guard,
        Err(e @ (Error::Locked(_) | Error::LockTimeout(_))) => {
            eprintln!("scalectl: {e}");
            return Ok(ExitCode::from(EXIT_NOT_LOCKED));
        }
        Err(e) => return Err(e.to_string()),
    };
    let (program, args) = command.split_first().ok_or("no command given")?;
    let spawned = tokio::process::Command::new(program)
        .args(args)
        .env("SCALED_LOCK_KEY", key)
        .env("SCALED_LOCK_TOKEN", guard.token())
        .env("SCALED_LOCK_FENCE", guard.fence().to_string())
        .spawn();
    let status = match spawned {
        Ok(mut child) => child
            .wait()
            .await
            .map_err(|e| format!("waiting for {program}: {e}")),
        Err(e) => Err(format!("cannot run {program}: {e}")),
    };
    // Release before reporting, so the next holder is not kept waiting on our exit.
    let released = guard.unlock().await;
    let status = status?;
    if let Ok(s) = released {
        if s != scaled_client::LockStatus::Ok {
            eprintln!("scalectl: lock {key} was no longer held at release: {s:?}");
        }
    }
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(EXIT_ERROR)))
}

/// Lists every held lock, a page at a time, so that no answer the daemon writes is large however
/// many locks are held; the table is printed as the pages arrive.
async fn locks(client: &Client, json: bool) -> CmdResult {
    if json {
        let listing = client.locks().await.map_err(|e| e.to_string())?;
        println!(
            "{}",
            serde_json::to_string_pretty(&listing).map_err(|e| e.to_string())?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<32} {:<24} {:>10} {:>10} {:>10} {:>8}",
        "KEY", "OWNER", "FENCE", "AGE", "TTL LEFT", "WAITERS"
    );
    let mut after: Option<String> = None;
    loop {
        let page = client
            .locks_page(after.as_deref(), None)
            .await
            .map_err(|e| e.to_string())?;
        for row in &page.locks {
            println!(
                "{:<32} {:<24} {:>10} {:>10} {:>10} {:>8}",
                row.key,
                row.owner,
                row.fence,
                format!("{:.1}s", row.age_ms as f64 / 1000.0),
                format!("{:.1}s", row.ttl_ms as f64 / 1000.0),
                row.waiters,
            );
        }
        match page.next {
            Some(next) if !page.locks.is_empty() => after = Some(next),
            _ => break,
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn stats(client: &Client, json: bool, watch: bool, interval: f64) -> CmdResult {
    if !interval.is_finite() || interval <= 0.0 {
        return Err(format!(
            "--interval {interval} is not a positive number of seconds"
        ));
    }
    loop {
        let doc = client.stats().await.map_err(|e| e.to_string())?;
        let text = if json {
            serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?
        } else {
            render_stats(&doc)
        };
        if watch {
            // Home the cursor and clear the screen, so the table refreshes in place.
            println!("\x1b[H\x1b[2J{text}");
            let _ = std::io::stdout().flush();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs_f64(interval)) => {}
                _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            }
        } else {
            println!("{text}");
            return Ok(ExitCode::SUCCESS);
        }
    }
}

fn ms(seconds: f64) -> String {
    format!("{:.3} ms", seconds * 1000.0)
}

/// The STATS document as a table for people.
fn render_stats(doc: &Stats) -> String {
    let mut s = String::new();
    s += &format!("scaled {}, up {:.0} s\n\n", doc.version, doc.uptime_seconds);
    let c = &doc.cache;
    s += &format!(
        "cache        {} / {} entries, {} bytes   hit rate {:.2}%   hits {}   misses {}   evictions {}   expirations {}\n",
        c.size, c.max_size, c.bytes, c.hit_rate, c.hits, c.misses, c.evictions, c.expirations,
    );
    let n = &doc.connections;
    s += &format!(
        "connections  {} open   {} accepted   {} refused\n",
        n.current, n.total, n.refused,
    );
    let redis = match (doc.redis.configured, doc.redis.available) {
        (true, true) => "configured, available",
        (true, false) => "configured, UNAVAILABLE",
        _ => "not configured (standalone)",
    };
    s += &format!("redis        {redis}\n");
    if doc.redis.configured {
        let r = &doc.redis;
        s += &format!(
            "             degraded {:.1} s   {} round trips   {} unavailable   {} connects   \
             {} corruptions   {} renewals failed   {} locks lost   {} releases pending\n",
            r.degraded_seconds,
            r.round_trips,
            r.unavailable,
            r.connects,
            r.corruptions,
            r.renewals_failed,
            r.locks_lost,
            r.releases_pending,
        );
        s += &format!(
            "             cache {} hits   {} degraded hits   {} reads   {} shared   {} reads saved   \
             {} fills dropped   {} invalidations   {} flushes\n",
            r.cache_hits,
            r.degraded_hits,
            r.reads,
            r.reads_shared,
            r.reads_saved,
            r.fills_dropped,
            r.invalidations,
            r.flushes,
        );
    }
    let l = &doc.locks;
    s += &format!(
        "locks        {} held   {} waiting   {} requests   {} grants   {} timeouts   {} refused   \
         {} expiries   {} released on disconnect   {} renewals   contention {:.2}%\n",
        l.held,
        l.waiters,
        l.requests,
        l.grants,
        l.timeouts,
        l.refused,
        l.expiries,
        l.released_on_disconnect,
        l.renewals,
        l.contention,
    );
    s += &format!(
        "lock wait    p50 {}   p95 {}   p99 {}\n",
        ms(l.wait_p50),
        ms(l.wait_p95),
        ms(l.wait_p99),
    );
    let p = &doc.performance;
    s += &format!(
        "\nlast {:.0} s: {} requests, {:.1} req/s ({} since start)\n",
        p.window_seconds,
        p.overall.total_requests,
        p.overall.requests_per_second,
        p.lifetime_requests,
    );
    s += &format!(
        "{:<10} {:>10} {:>12} {:>12} {:>12} {:>12} {:>12}\n",
        "command", "requests", "req/s", "avg", "p50", "p95", "p99"
    );
    let rows = std::iter::once(("ALL", &p.overall))
        .chain(p.commands.iter().map(|(name, perf)| (name.as_str(), perf)));
    for (name, perf) in rows {
        s += &format!(
            "{:<10} {:>10} {:>12.1} {:>12} {:>12} {:>12} {:>12}\n",
            name,
            perf.total_requests,
            perf.requests_per_second,
            ms(perf.avg_response_time),
            ms(perf.p50_response_time),
            ms(perf.p95_response_time),
            ms(perf.p99_response_time),
        );
    }
    s
}
