//! `get`, `set`, `ping`: many connections, each a closed loop of one request (or `--pipeline P`) at a
//! time, in the manner of `redis-benchmark`, so the two can be compared on the same machine. With
//! `--resp` the same loop drives Redis.
//!
//! GET keys are preloaded with SET (no expiry), so every GET must hit: a GET that finds nothing is an
//! error. Each answer is checked: its id must be the one sent, and it must carry `ok` of the expected
//! shape. A template per command is encoded once; each request patches in its id and key number.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use tokio::task::JoinSet;

use scaled_client::proto::{Args, CommandName};

use crate::net::{open_all, Conn, Endpoint};
use crate::opts::RequestOpts;
use crate::report::{join_all, record, Counters, Latency, Outcome, Progress, Span, Tally};
use crate::wire::{key, request, Envelope, Expect, Template};

/// Which request the loop sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// GET of a preloaded key.
    Get,
    /// SET of a fixed-size value.
    Set,
    /// PING.
    Ping,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Get => "GET",
            Kind::Set => "SET",
            Kind::Ping => "PING",
        }
    }
}

/// Runs the workload.
pub async fn run(kind: Kind, opts: RequestOpts) -> Result<Outcome, String> {
    let endpoint = Endpoint::of(&opts.target);
    let mut conns = open_all(&endpoint, opts.connections, opts.resp).await?;
    if kind == Kind::Get && !opts.no_preload {
        preload(&mut conns[0], &opts).await?;
    }
    let expect = match kind {
        Kind::Get => Expect::Bin(opts.value_size as usize),
        Kind::Set => Expect::Text("OK"),
        Kind::Ping => Expect::Text("PONG"),
    };
    let template = Arc::new(template(kind, &opts));
    let remaining = Arc::new(AtomicI64::new(opts.requests as i64));
    let counters = Arc::new(Counters::default());
    let _progress = Progress::start("requests", opts.requests, counters.clone());

    let span = Span::start(opts.target.max_seconds);
    let mut set = JoinSet::new();
    for (index, conn) in conns.into_iter().enumerate() {
        set.spawn(closed_loop(
            conn,
            index as u64,
            Shared {
                template: template.clone(),
                keyspace: opts.keyspace,
                remaining: remaining.clone(),
                counters: counters.clone(),
                pipeline: opts.pipeline,
                expect,
                deadline: span.deadline,
            },
        ));
    }
    let total = Tally::sum(join_all(set, span.deadline).await?);
    let (secs, cpu) = span.finish();
    let rps = total.done as f64 / secs;
    let latency = Latency::of(&total.latency_ns);
    let json = json!({
        "workload": kind.label().to_lowercase(),
        "protocol": if opts.resp { "resp" } else { "scaled" },
        "connections": opts.connections,
        "pipeline": opts.pipeline,
        "keyspace": opts.keyspace,
        "value_size": opts.value_size,
        "threads": opts.target.threads,
        "requests": total.done,
        "seconds": secs,
        "requests_per_s": rps.round(),
        "latency": latency,
        "errors": total.errors,
        "first_error": total.first_error,
        "client_cpu_us_per_request": cpu.map(|c| c * 1e6 / total.done.max(1) as f64),
    });
    let mut text = format!(
        "{}{}: {} requests, {} connections, pipeline {}, {}-byte values, keyspace {}, {} thread(s)\n",
        kind.label(),
        if opts.resp { " (RESP)" } else { "" },
        total.done,
        opts.connections,
        opts.pipeline,
        opts.value_size,
        opts.keyspace,
        opts.target.threads,
    );
    text += &format!(
        "  {secs:.3} s, {rps:.0} requests/second, {} errors\n",
        total.errors
    );
    if let Some(cpu) = cpu {
        text += &format!(
            "  load generator CPU {cpu:.2} s ({:.2} us/request)\n",
            cpu * 1e6 / total.done.max(1) as f64
        );
    }
    text += &format!(
        "  latency ms: p50 {:.3}, p99 {:.3}, max {:.3}\n",
        latency.p50_ms, latency.p99_ms, latency.max_ms
    );
    if total.done < opts.requests {
        text += &format!(
            "  stopped early: {} of {} requests done\n",
            total.done, opts.requests
        );
    }
    if let Some(e) = &total.first_error {
        text += &format!("  first error: {e}\n");
    }
    Ok(Outcome {
        passed: total.errors == 0 && total.done == opts.requests,
        json,
        text,
    })
}

/// The one template the loop patches: a key slot for GET and SET.
fn template(kind: Kind, opts: &RequestOpts) -> Template {
    let value = vec![b'x'; opts.value_size as usize];
    match (kind, opts.resp) {
        (Kind::Ping, true) => Template::resp(&[b"PING"]),
        (Kind::Get, true) => Template::resp(&[b"GET", key(0).as_bytes()]).with_key_slot(),
        (Kind::Set, true) => Template::resp(&[b"SET", key(0).as_bytes(), &value]).with_key_slot(),
        (Kind::Ping, false) => Template::new(request(CommandName::Ping, Args::default())),
        (Kind::Get, false) => Template::new(request(
            CommandName::Get,
            Args {
                key: Some(key(0)),
                ..Args::default()
            },
        ))
        .with_key_slot(),
        (Kind::Set, false) => Template::new(request(
            CommandName::Set,
            Args {
                key: Some(key(0)),
                value: Some(value),
                ..Args::default()
            },
        ))
        .with_key_slot(),
    }
}

/// SETs every key with no expiry, so the GETs that follow all hit.
async fn preload(conn: &mut Conn, opts: &RequestOpts) -> Result<(), String> {
    let value = vec![b'x'; opts.value_size as usize];
    let set = if conn.resp {
        Template::resp(&[b"SET", key(0).as_bytes(), &value]).with_key_slot()
    } else {
        let args = Args {
            key: Some(key(0)),
            value: Some(value),
            ttl_ms: Some(0),
            ..Args::default()
        };
        Template::new(request(CommandName::Set, args)).with_key_slot()
    };
    let batch = 256;
    let mut next = 0;
    while next < opts.keyspace {
        let end = (next + batch).min(opts.keyspace);
        for i in next..end {
            set.push_key(&mut conn.out, i + 1, i);
        }
        conn.flush().await?;
        // A daemon whose SETs wait on Redis answers each as it finishes, so answers are matched
        // by id (RESP answers come in order).
        let mut answered = vec![false; (end - next) as usize];
        for i in next..end {
            let body = conn.next_frame().await?;
            let id = if conn.resp {
                i + 1
            } else {
                Envelope::parse(&body)
                    .map_err(|e| format!("preloading: {e}"))?
                    .id
            };
            let seen = id
                .checked_sub(next + 1)
                .and_then(|k| answered.get_mut(usize::try_from(k).ok()?))
                .filter(|seen| !**seen)
                .ok_or_else(|| {
                    format!(
                        "preloading: answer id {id}, not one of {}..={end}",
                        next + 1
                    )
                })?;
            *seen = true;
            conn.check(&body, id, Expect::Text("OK"))
                .map_err(|e| format!("preloading: {e}"))?;
        }
        next = end;
    }
    Ok(())
}

/// What every connection's loop shares.
struct Shared {
    /// The request, patched per use with its id and key number.
    template: Arc<Template>,
    /// Keys cycled through.
    keyspace: u64,
    /// Requests not yet claimed by a connection.
    remaining: Arc<AtomicI64>,
    /// For the progress line.
    counters: Arc<Counters>,
    /// Requests written at once per connection.
    pipeline: u64,
    /// What every answer must hold.
    expect: Expect,
    /// No batch starts after this.
    deadline: Instant,
}

/// The closed loop of one connection: claim up to `pipeline` requests, write them, read their answers.
async fn closed_loop(mut conn: Conn, index: u64, shared: Shared) -> Tally {
    let mut tally = Tally::new();
    // Each connection starts at its own place in the keyspace.
    let mut slot = (index * 7919) % shared.keyspace;
    let mut id = 1u64;
    loop {
        let before = shared
            .remaining
            .fetch_sub(shared.pipeline as i64, Ordering::Relaxed);
        if before <= 0 {
            break;
        }
        let batch = (before as u64).min(shared.pipeline);
        let first_id = id + 1;
        for _ in 0..batch {
            id += 1;
            shared.template.push_key(&mut conn.out, id, slot);
            slot += 1;
            if slot == shared.keyspace {
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
            record(&mut tally.latency_ns, sent.elapsed());
            tally.done += 1;
            if let Err(e) = conn.check(&body, want, shared.expect) {
                tally.errors += 1;
                shared.counters.errors.fetch_add(1, Ordering::Relaxed);
                // After a wrong id the answers can no longer be matched to requests.
                let desynced = e.starts_with("response id") || e.starts_with("not a map");
                tally.first_error.get_or_insert(e);
                if desynced {
                    return tally;
                }
            }
        }
        shared.counters.done.fetch_add(batch, Ordering::Relaxed);
        if Instant::now() >= shared.deadline {
            break;
        }
    }
    tally
}
