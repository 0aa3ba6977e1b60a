//! Key namespaces: how one app's keys and locks are kept out of another's reach.
//!
//! A namespaced peer's cache keys, lock keys and fence locks are prefixed with `NAME/` on their way
//! in, in [`crate::cmd::dispatch`] before any command sees them, so everything after it (the cache,
//! the lock table, Redis) holds and compares the prefixed key and no command can reach a key outside
//! the namespace. On the way out the prefix is taken off again: LOCKS rows and error messages name
//! the client's own keys, so the prefix is invisible to it.
//!
//! **Key length.** The prefix counts toward the 1024-byte key limit: a peer in namespace NAME may use
//! keys of at most `1024 - (len(NAME) + 1)` bytes, and its HELLO answers that as `max_key`. So a key
//! held inside the daemon (and in Redis) is never longer than 1024 bytes, and every bound that
//! follows from the key limit (lock record size, LOCKS page size, memory) holds unchanged.

use scaled_client::proto::{Args, MAX_KEY_LEN};

/// Longest namespace name: short enough to leave 959 bytes of every key to the app.
pub const MAX_NAME_LEN: usize = 64;

/// One namespace: the prefix its peers' keys are given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// `NAME/`: what every key of the namespace starts with inside the daemon.
    prefix: String,
}

impl Namespace {
    /// The namespace `name`, which must have passed [`check_name`].
    pub fn new(name: &str) -> Namespace {
        Namespace {
            prefix: format!("{name}/"),
        }
    }

    /// The namespace of a Unix peer with this uid, with `--namespace-by-uid`: `uid-1000`.
    pub fn of_uid(uid: u32) -> Namespace {
        Namespace::new(&format!("uid-{uid}"))
    }

    /// The name, for logs.
    pub fn name(&self) -> &str {
        &self.prefix[..self.prefix.len() - 1]
    }

    /// What every key of the namespace starts with inside the daemon.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The longest key a peer of this namespace may send.
    pub fn max_key(&self) -> usize {
        MAX_KEY_LEN - self.prefix.len()
    }

    /// Puts the request's keys (`key`, `fence.lock`) into the namespace. An empty key is left empty,
    /// for the command to refuse as it would anyone's; one over [`Namespace::max_key`] is refused
    /// here (the caller answers `TOO_LARGE`, with the peer's own limit in the message).
    pub fn enter(&self, args: &mut Args) -> Result<(), KeyTooLong> {
        if let Some(key) = args.key.as_mut() {
            self.prefix_key("key", key)?;
        }
        if let Some(fence) = args.fence.as_mut() {
            self.prefix_key("fence.lock", &mut fence.lock)?;
        }
        Ok(())
    }

    fn prefix_key(&self, what: &'static str, key: &mut String) -> Result<(), KeyTooLong> {
        if key.is_empty() {
            return Ok(());
        }
        let max = self.max_key();
        if key.len() > max {
            return Err(KeyTooLong {
                what,
                len: key.len(),
                max,
            });
        }
        key.insert_str(0, &self.prefix);
        Ok(())
    }

    /// The client's own name for a key held inside the daemon; `None` for a key of another namespace.
    pub fn strip<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(&self.prefix)
    }

    /// Takes the prefix out of an error message, which quotes keys in backticks (`` lock `web/x` is
    /// held ``), so that the client sees its own key names only.
    pub fn leave(&self, message: &mut String) {
        let quoted = format!("`{}", self.prefix);
        if message.contains(&quoted) {
            *message = message.replace(&quoted, "`");
        }
    }
}

/// A key that does not fit its namespace: `key` or `fence.lock`, its length, and the namespace's
/// limit ([`Namespace::max_key`]). Answered `TOO_LARGE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTooLong {
    /// Which argument: `key` or `fence.lock`.
    pub what: &'static str,
    /// Its length in bytes.
    pub len: usize,
    /// The longest this namespace allows.
    pub max: usize,
}

impl std::fmt::Display for KeyTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} bytes is over the {} byte limit of this namespace",
            self.what, self.len, self.max
        )
    }
}

/// Checks a namespace name: 1 to [`MAX_NAME_LEN`] bytes of ASCII letters, digits, `_`, `-` and `.`,
/// so that it can never hold the `/` that ends the prefix.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.chars().all(ok_char) {
        return Err(format!(
            "namespace name `{name}` must be 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 _ - ."
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use scaled_client::proto::Fence;

    #[test]
    fn keys_enter_with_the_prefix_and_errors_leave_without_it() {
        let ns = Namespace::new("web");
        let mut args = Args {
            key: Some("session:1".into()),
            fence: Some(Fence {
                lock: "session:1".into(),
                token: 7,
            }),
            ..Args::default()
        };
        ns.enter(&mut args).expect("fits");
        assert_eq!(args.key.as_deref(), Some("web/session:1"));
        assert_eq!(
            args.fence.as_ref().map(|f| f.lock.as_str()),
            Some("web/session:1")
        );
        let mut message = "lock `web/session:1` is held".to_string();
        ns.leave(&mut message);
        assert_eq!(message, "lock `session:1` is held");
        assert_eq!(ns.strip("web/a"), Some("a"));
        assert_eq!(ns.strip("billing/a"), None);
        assert_eq!(ns.strip("weba"), None);
    }

    #[test]
    fn the_prefix_counts_toward_the_key_limit() {
        let ns = Namespace::of_uid(1000);
        assert_eq!(ns.name(), "uid-1000");
        assert_eq!(ns.max_key(), MAX_KEY_LEN - "uid-1000/".len());
        let mut fits = Args {
            key: Some("k".repeat(ns.max_key())),
            ..Args::default()
        };
        ns.enter(&mut fits).expect("fits");
        assert_eq!(fits.key.map(|k| k.len()), Some(MAX_KEY_LEN));
        let mut over = Args {
            key: Some("k".repeat(ns.max_key() + 1)),
            ..Args::default()
        };
        let e = ns.enter(&mut over).expect_err("over");
        assert_eq!(e.len, ns.max_key() + 1);
        let mut empty = Args {
            key: Some(String::new()),
            ..Args::default()
        };
        ns.enter(&mut empty).expect("left to the command");
        assert_eq!(empty.key.as_deref(), Some(""));
    }

    #[test]
    fn names_cannot_hold_the_separator() {
        assert!(check_name("web-1.prod_2").is_ok());
        for bad in ["", "a/b", "a b", "é", &"x".repeat(MAX_NAME_LEN + 1)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
