//! `lock`: uncontended LOCK+UNLOCK pairs. Each connection has its own key (`lock:<n>`) and loops LOCK
//! (10 s lease) → UNLOCK with the owner token of the grant. Every grant is checked (a 36-character
//! owner token, the lease asked for, a fencing token greater than the connection's previous one) and
//! every UNLOCK must answer `status: OK`.
//!
//! With `--resp` it runs Redis's usual single-instance lock pair instead: `SET lock:<n> <random token>
//! NX PX 10000` (must answer `+OK`), then a compare-and-delete script with `EVAL` (must answer `:1`).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use tokio::task::JoinSet;
use uuid::Uuid;

use scaled_client::proto::{Args, CommandName};

use crate::net::{open_all, Conn, Endpoint};
use crate::opts::LockOpts;
use crate::report::{join_all, Counters, Latency, Outcome, Progress, Span, Tally};
use crate::resp;
use crate::wire::{answer_to, read_grant, read_unlock_status, request, Template, TOKEN_SLOT};

/// The lease `lock` and `handoff` ask for.
pub const LOCK_TTL_MS: u64 = 10_000;

/// Runs the workload.
pub async fn run(opts: LockOpts) -> Result<Outcome, String> {
    let endpoint = Endpoint::of(&opts.target)?;
    let conns = open_all(&endpoint, opts.connections, opts.resp).await?;
    let remaining = Arc::new(AtomicI64::new(opts.requests as i64));
    let counters = Arc::new(Counters::default());
    let _progress = Progress::start("pairs", opts.requests, counters.clone());
    let span = Span::start(opts.target.max_seconds);
    let mut set = JoinSet::new();
    for (index, conn) in conns.into_iter().enumerate() {
        set.spawn(lock_pairs(
            conn,
            index as u64,
            remaining.clone(),
            counters.clone(),
            span.deadline,
        ));
    }
    let total = Tally::sum(join_all(set, span.deadline).await?);
    let (secs, cpu) = span.finish();
    let pps = total.done as f64 / secs;
    let latency = Latency::of(&total.latency_ns);
    let json = json!({
        "workload": "lock",
        "protocol": if opts.resp { "resp" } else { "scaled" },
        "connections": opts.connections,
        "threads": opts.target.threads,
        "pairs": total.done,
        "seconds": secs,
        "pairs_per_s": pps.round(),
        "requests_per_s": (2.0 * pps).round(),
        "latency": latency,
        "errors": total.errors,
        "first_error": total.first_error,
        "client_cpu_us_per_pair": cpu.map(|c| c * 1e6 / total.done.max(1) as f64),
    });
    let mut text = format!(
        "{}: {} pairs, {} connections, a key per connection, {} thread(s)\n",
        if opts.resp {
            "SET NX PX + EVAL compare-and-delete (RESP)"
        } else {
            "LOCK+UNLOCK"
        },
        total.done,
        opts.connections,
        opts.target.threads,
    );
    text += &format!(
        "  {secs:.3} s, {pps:.0} pairs/second ({:.0} requests/second), {} errors\n",
        pps * 2.0,
        total.errors
    );
    if let Some(cpu) = cpu {
        text += &format!(
            "  load generator CPU {cpu:.2} s ({:.2} us/pair)\n",
            cpu * 1e6 / total.done.max(1) as f64
        );
    }
    text += &format!(
        "  latency per request ms: p50 {:.3}, p99 {:.3}, max {:.3}\n",
        latency.p50_ms, latency.p99_ms, latency.max_ms
    );
    if let Some(e) = &total.first_error {
        text += &format!("  first error: {e}\n");
    }
    Ok(Outcome {
        passed: total.errors == 0 && total.done == opts.requests,
        json,
        text,
    })
}

/// LOCK `key` with the benchmark's lease, waiting at most `wait_ms` in the queue when it says.
pub fn lock_template(key: &str, wait_ms: Option<u64>) -> Template {
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
pub fn unlock_template(key: &str) -> Template {
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

/// One connection's closed loop of LOCK+UNLOCK pairs on its own key. `done` counts pairs; the
/// latency is per request.
async fn lock_pairs(
    mut conn: Conn,
    index: u64,
    remaining: Arc<AtomicI64>,
    counters: Arc<Counters>,
    deadline: Instant,
) -> Tally {
    let mut tally = Tally::new();
    let key = format!("lock:{index}");
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
            resp::UNLOCK_SCRIPT.as_bytes(),
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
            resp::check_exact(&body, b"+OK\r\n")
        } else {
            answer_to(&body, id).and_then(read_grant).and_then(|grant| {
                if grant.ttl_ms != LOCK_TTL_MS {
                    return Err(format!(
                        "grant with ttl_ms {}, asked for {LOCK_TTL_MS}",
                        grant.ttl_ms
                    ));
                }
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
            resp::check_exact(&body, b":1\r\n")
        } else {
            answer_to(&body, id).and_then(read_unlock_status)
        };
        if let Err(e) = released {
            tally.fail(format!("UNLOCK: {e}"));
            counters.errors.fetch_add(1, Ordering::Relaxed);
            return tally;
        }
        tally.done += 1;
        counters.done.fetch_add(1, Ordering::Relaxed);
        if Instant::now() >= deadline {
            break;
        }
    }
    tally
}
