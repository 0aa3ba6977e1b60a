//! A session's state as the `session` workload stores it: which session it is, a counter of the
//! messages applied to it, and how many of those each of its users sent. Text, so that
//! `scalectl get` shows it plainly:
//!
//! ```text
//! session=17 counter=42 users=17:21,1017:21 pad=xxxx
//! ```
//!
//! The counter and the per-user counts are what the checks compare with the messages the users had
//! acknowledged: an update lost to an unlocked read-modify-write shows as a count short of what its
//! user sent, and a value of another session shows as a foreign session or user id.

use std::fmt::Write as _;

/// One session's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionState {
    /// The session this state belongs to; a GET answering another session's state is a mixed response.
    pub session: u64,
    /// Messages applied, by any user.
    pub counter: u64,
    /// Per user id, the messages of that user applied; sorted by user id.
    pub users: Vec<(u64, u64)>,
}

impl SessionState {
    /// The state of a session nobody has written yet.
    pub fn empty(session: u64) -> SessionState {
        SessionState {
            session,
            counter: 0,
            users: Vec::new(),
        }
    }

    /// Applies one message of `user`.
    pub fn bump(&mut self, user: u64) {
        self.counter += 1;
        match self.users.binary_search_by_key(&user, |(u, _)| *u) {
            Ok(i) => self.users[i].1 += 1,
            Err(i) => self.users.insert(i, (user, 1)),
        }
    }

    /// Messages of `user` applied.
    pub fn count_of(&self, user: u64) -> u64 {
        self.users
            .binary_search_by_key(&user, |(u, _)| *u)
            .map_or(0, |i| self.users[i].1)
    }

    /// Writes the text form, with `pad` bytes of padding, into `out` (cleared first).
    pub fn encode(&self, pad: usize, out: &mut Vec<u8>) {
        let mut text = String::with_capacity(48 + 16 * self.users.len() + pad);
        let _ = write!(
            text,
            "session={} counter={} users=",
            self.session, self.counter
        );
        for (i, (user, n)) in self.users.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            let _ = write!(text, "{user}:{n}");
        }
        if pad > 0 {
            text.push_str(" pad=");
            text.extend(std::iter::repeat_n('x', pad));
        }
        out.clear();
        out.extend_from_slice(text.as_bytes());
    }

    /// Reads the text form; an error for anything this workload did not write.
    pub fn parse(bytes: &[u8]) -> Result<SessionState, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "state is not UTF-8".to_string())?;
        let shown = || text.chars().take(80).collect::<String>();
        let mut fields = text.split(' ');
        let mut field = |name: &str| {
            fields
                .next()
                .and_then(|f| f.strip_prefix(name))
                .and_then(|f| f.strip_prefix('='))
                .ok_or_else(|| format!("state {:?} has no {name}", shown()))
        };
        let number = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| format!("state {:?}: {s:?} is not a number", shown()))
        };
        let session = number(field("session")?)?;
        let counter = number(field("counter")?)?;
        let list = field("users")?;
        let mut users = Vec::new();
        for pair in list.split(',').filter(|p| !p.is_empty()) {
            let (user, n) = pair
                .split_once(':')
                .ok_or_else(|| format!("state {:?}: bad user entry {pair:?}", shown()))?;
            users.push((number(user)?, number(n)?));
        }
        if !users.windows(2).all(|w| w[0].0 < w[1].0) {
            return Err(format!("state {:?}: users out of order", shown()));
        }
        Ok(SessionState {
            session,
            counter,
            users,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_and_parses_back() {
        let mut state = SessionState::empty(17);
        state.bump(1017);
        state.bump(17);
        state.bump(1017);
        let mut out = Vec::new();
        state.encode(5, &mut out);
        assert_eq!(
            out,
            b"session=17 counter=3 users=17:1,1017:2 pad=xxxxx".to_vec()
        );
        assert_eq!(SessionState::parse(&out), Ok(state.clone()));
        assert_eq!(state.count_of(1017), 2);
        assert_eq!(state.count_of(5), 0);
        state.encode(0, &mut out);
        assert_eq!(SessionState::parse(&out), Ok(state));
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            &b"x"[..],
            b"session=1 counter=x users=",
            b"session=1 counter=2 users=3",
            b"session=1 counter=2 users=3:1,2:1",
            b"\xff",
        ] {
            assert!(SessionState::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            SessionState::parse(b"session=4 counter=0 users="),
            Ok(SessionState::empty(4))
        );
    }
}
