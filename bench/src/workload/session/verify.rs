//! The end-of-run check: read every session's state back and compare it with what its users had
//! acknowledged. A user's count short of its acknowledged messages is a lost update; a count above
//! them is a write nobody was told succeeded; another session's state, or a user who does not
//! belong to the session, is a foreign value.

use super::state::SessionState;
use super::Plan;
use crate::net::{Conn, Endpoint};
use crate::wire::{
    read_bin, read_grant, read_unlock_status, write_request, Arg, Envelope, UUID_LEN,
};
use bytes::BytesMut;
use scaled_client::proto::CommandName;

/// GETs written at once while reading the states back.
const BATCH: u64 = 256;

/// The lease, and the longest wait, of the check's own LOCKs.
const CHECK_LEASE_MS: u64 = 10_000;

/// What the check found.
#[derive(Default, Debug)]
pub struct Verdict {
    /// Acknowledged messages missing from their session's state.
    pub lost_updates: u64,
    /// Messages in a state beyond what their user had acknowledged.
    pub extra_updates: u64,
    /// States that were another session's, named a foreign user, or were not ours at all.
    pub foreign: u64,
    /// The first problem, to show.
    pub first_problem: Option<String>,
}

/// How the check reads a session back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    /// A plain GET: enough on the daemon every write went through.
    Plain,
    /// LOCK, GET, UNLOCK: with several daemons a GET outside a lock may trail another daemon's
    /// write by the invalidation window, while under the lock it may not (docs/coherence.md).
    Locked,
}

/// Reads back every session and compares it with `committed` (per user id, acknowledged messages).
pub async fn verify(
    endpoint: &Endpoint,
    plan: &Plan,
    committed: &[u64],
    read: Read,
) -> Result<Verdict, String> {
    let mut conn = Conn::open(endpoint, false).await?;
    let mut verdict = Verdict::default();
    let mut next = 0;
    while next < plan.sessions {
        let end = (next + BATCH).min(plan.sessions);
        let grants = match read {
            Read::Plain => Vec::new(),
            Read::Locked => lock_all(&mut conn, plan, next, end).await?,
        };
        for s in next..end {
            let key = plan.key(s);
            write_request(
                &mut conn.out,
                s + 1,
                CommandName::Get,
                &[("key", Arg::Str(&key))],
                &plan.session_ids[s as usize],
                "check",
            );
        }
        conn.flush().await?;
        let bodies = answers(&mut conn, next, end).await?;
        if read == Read::Locked {
            unlock_all(&mut conn, plan, next, &grants).await?;
        }
        for (s, body) in (next..end).zip(bodies) {
            let envelope = Envelope::parse(&body)?;
            let state = envelope
                .ok()
                .and_then(|mut ok| read_bin(&mut ok))
                .and_then(|value| match value {
                    None => Ok(SessionState::empty(s)),
                    Some(bytes) => SessionState::parse(bytes),
                })
                .and_then(|state| plan.check_state(&state, s).map(|()| state));
            match state {
                Ok(state) => compare(plan, s, &state, committed, &mut verdict),
                Err(e) => {
                    verdict.foreign += 1;
                    verdict
                        .first_problem
                        .get_or_insert(format!("session {s}: {e}"));
                }
            }
        }
        next = end;
    }
    Ok(verdict)
}

/// Reads the answers to requests `next + 1 ..= end`, in id order. They are matched by id: a daemon
/// whose requests wait on Redis answers them as they finish.
async fn answers(conn: &mut Conn, next: u64, end: u64) -> Result<Vec<BytesMut>, String> {
    let mut bodies: Vec<Option<BytesMut>> = vec![None; (end - next) as usize];
    for _ in next..end {
        let body = conn.next_frame().await?;
        let id = Envelope::parse(&body)?.id;
        let slot = id
            .checked_sub(next + 1)
            .and_then(|i| bodies.get_mut(usize::try_from(i).ok()?))
            .filter(|slot| slot.is_none())
            .ok_or_else(|| format!("checking: answer id {id}, not one of {}..={end}", next + 1))?;
        *slot = Some(body);
    }
    (next..end)
        .zip(bodies)
        .map(|(s, body)| body.ok_or_else(|| format!("checking: no answer for id {}", s + 1)))
        .collect()
}

/// Takes the locks of sessions `next..end` (the run is over, so each is free or soon will be) and
/// answers their owner tokens in session order.
async fn lock_all(
    conn: &mut Conn,
    plan: &Plan,
    next: u64,
    end: u64,
) -> Result<Vec<[u8; UUID_LEN]>, String> {
    for s in next..end {
        let key = plan.key(s);
        write_request(
            &mut conn.out,
            s + 1,
            CommandName::Lock,
            &[
                ("key", Arg::Str(&key)),
                ("ttl_ms", Arg::Uint(CHECK_LEASE_MS)),
                ("wait_ms", Arg::Uint(CHECK_LEASE_MS)),
            ],
            &plan.session_ids[s as usize],
            "check",
        );
    }
    conn.flush().await?;
    let bodies = answers(conn, next, end).await?;
    (next..end)
        .zip(bodies)
        .map(|(s, body)| {
            let grant = Envelope::parse(&body)?
                .ok()
                .and_then(read_grant)
                .map_err(|e| format!("checking: LOCK of session {s}: {e}"))?;
            Ok(grant.token)
        })
        .collect()
}

/// Gives back the locks [`lock_all`] took.
async fn unlock_all(
    conn: &mut Conn,
    plan: &Plan,
    next: u64,
    tokens: &[[u8; UUID_LEN]],
) -> Result<(), String> {
    for (s, token) in (next..).zip(tokens) {
        let key = plan.key(s);
        let token = std::str::from_utf8(token).map_err(|e| format!("owner token: {e}"))?;
        write_request(
            &mut conn.out,
            s + 1,
            CommandName::Unlock,
            &[("key", Arg::Str(&key)), ("token", Arg::Str(token))],
            &plan.session_ids[s as usize],
            "check",
        );
    }
    conn.flush().await?;
    let end = next + tokens.len() as u64;
    for (s, body) in (next..end).zip(answers(conn, next, end).await?) {
        Envelope::parse(&body)?
            .ok()
            .and_then(read_unlock_status)
            .map_err(|e| format!("checking: UNLOCK of session {s}: {e}"))?;
    }
    Ok(())
}

/// Compares one session's state with its users' acknowledged messages.
fn compare(plan: &Plan, s: u64, state: &SessionState, committed: &[u64], verdict: &mut Verdict) {
    for user in (s..plan.users).step_by(plan.sessions as usize) {
        let acknowledged = committed[user as usize];
        let recorded = state.count_of(user);
        if recorded < acknowledged {
            verdict.lost_updates += acknowledged - recorded;
            verdict.first_problem.get_or_insert(format!(
                "session {s}: user {user} had {acknowledged} messages acknowledged, the state holds {recorded}"
            ));
        } else if recorded > acknowledged {
            verdict.extra_updates += recorded - acknowledged;
            verdict.first_problem.get_or_insert(format!(
                "session {s}: the state holds {recorded} messages of user {user}, who had {acknowledged} acknowledged"
            ));
        }
    }
}
