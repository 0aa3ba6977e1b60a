//! The end-of-run check: read every session's state back and compare it with what its users had
//! acknowledged. A user's count short of its acknowledged messages is a lost update; a count above
//! them is a write nobody was told succeeded; another session's state, or a user who does not
//! belong to the session, is a foreign value.

use super::state::SessionState;
use super::Plan;
use crate::net::{Conn, Endpoint};
use crate::wire::{read_bin, write_request, Arg, Envelope};
use bytes::BytesMut;
use scaled_client::proto::CommandName;

/// GETs written at once while reading the states back.
const BATCH: u64 = 256;

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

/// Reads back every session and compares it with `committed` (per user id, acknowledged messages).
pub async fn verify(
    endpoint: &Endpoint,
    plan: &Plan,
    committed: &[u64],
) -> Result<Verdict, String> {
    let mut conn = Conn::open(endpoint, false).await?;
    let mut verdict = Verdict::default();
    let mut next = 0;
    while next < plan.sessions {
        let end = (next + BATCH).min(plan.sessions);
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
        // Answers are matched by id: a daemon whose GETs wait on Redis answers them as they finish.
        let mut bodies: Vec<Option<BytesMut>> = vec![None; (end - next) as usize];
        for _ in next..end {
            let body = conn.next_frame().await?;
            let id = Envelope::parse(&body)?.id;
            let slot = id
                .checked_sub(next + 1)
                .and_then(|i| bodies.get_mut(usize::try_from(i).ok()?))
                .filter(|slot| slot.is_none())
                .ok_or_else(|| {
                    format!("checking: answer id {id}, not one of {}..={end}", next + 1)
                })?;
            *slot = Some(body);
        }
        for (s, body) in (next..end).zip(bodies) {
            let body = body.ok_or_else(|| format!("checking: no answer for id {}", s + 1))?;
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
