//! Access control: who may connect, and what each peer may see.
//!
//! - **Unix socket.** The kernel tells the daemon each peer's uid and gid (`SO_PEERCRED`). With
//!   `--allow-uid` or `--allow-gid` set, a peer whose uid is on neither list, and whose (primary) gid
//!   is not on the second, is answered `DENIED` (id 0) and closed before it can send anything;
//!   `--admin-uid` peers are always let in.
//! - **TCP.** Loopback TCP bypasses the socket's file mode, so it needs a token from
//!   `--auth-token-file` in HELLO, compared in constant time ([`tokens`]). A HELLO without a valid one
//!   is answered `DENIED` and the connection closed; before a successful HELLO nothing else is served.
//! - **Scope.** Every peer is either unrestricted (an admin: `--admin-uid`, a token without a name, or
//!   any Unix peer when `--namespace-by-uid` is off) or confined to a key [`namespace`]: its keys and
//!   locks are prefixed inside the daemon, LOCKS shows it only its own locks, and STATS only figures
//!   that say nothing about other apps.
//!
//! The README's "Security" section has the threat model this serves.

pub mod namespace;
pub mod tokens;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::config::Config;
use crate::throttle::Throttle;

pub use namespace::Namespace;
pub use tokens::{TokenFileError, TokenTable};

/// Refusals are logged, but a peer retrying in a loop must not flood the log: one line a second.
static DENIED: Throttle = Throttle::new();

/// What a peer may reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every key, every lock, every figure: an admin peer, or any peer when no namespaces are set up.
    Unrestricted,
    /// Only the keys and locks of this namespace, and figures about the daemon's health. In an `Arc`
    /// because every request of the peer carries it.
    Namespace(Arc<Namespace>),
}

impl Scope {
    /// The namespace, if the peer is confined to one.
    pub fn namespace(&self) -> Option<&Arc<Namespace>> {
        match self {
            Scope::Unrestricted => None,
            Scope::Namespace(ns) => Some(ns),
        }
    }
}

/// Who is at the other end of a connection, as the listener knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A Unix socket peer, with the credentials the kernel gave for it.
    Unix {
        /// Its user id.
        uid: u32,
        /// Its primary group id.
        gid: u32,
    },
    /// A Unix socket peer whose credentials could not be read (a platform without them).
    UnixUnknown,
    /// A TCP peer: it proves who it is with a token in HELLO.
    Tcp,
}

/// The access rules in force, made once at start from the configuration.
#[derive(Debug, Default)]
pub struct Access {
    /// `--allow-uid`: uids that may connect over the Unix socket.
    allow_uids: Vec<u32>,
    /// `--allow-gid`: primary gids that may connect over the Unix socket.
    allow_gids: Vec<u32>,
    /// `--admin-uid`: uids that are unrestricted (and always allowed).
    admin_uids: Vec<u32>,
    /// `--namespace-by-uid`: confine each non-admin Unix peer to the namespace of its uid.
    namespace_by_uid: bool,
    /// `--auth-token-file`: the tokens TCP peers must show; `None` when TCP is off.
    tokens: Option<TokenTable>,
    /// Peers refused since start (uid, gid or token), for STATS and `/metrics`.
    denied: AtomicU64,
}

/// Why the access settings cannot work; the daemon does not start.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// TCP is on without a token file: anyone on the host could connect.
    #[error(
        "--tcp needs --auth-token-file: any local user can reach a TCP port, whatever the socket's \
         mode; put a token (16 or more characters) in a file of mode 600 and pass its path"
    )]
    TcpWithoutTokens,
    /// The token file cannot be used.
    #[error(transparent)]
    TokenFile(#[from] TokenFileError),
}

impl Access {
    /// The rules `config` asks for; reads the token file when TCP is on.
    pub fn from_config(config: &Config) -> Result<Access, AccessError> {
        let tokens = match (&config.tcp, &config.auth_token_file) {
            (Some(_), None) => return Err(AccessError::TcpWithoutTokens),
            (Some(_), Some(path)) => Some(TokenTable::load(path)?),
            // A token file without TCP is read too, so that a mistake in it shows at start.
            (None, Some(path)) => Some(TokenTable::load(path)?),
            (None, None) => None,
        };
        Ok(Access {
            allow_uids: config.allow_uid.clone(),
            allow_gids: config.allow_gid.clone(),
            admin_uids: config.admin_uid.clone(),
            namespace_by_uid: config.namespace_by_uid,
            tokens,
            denied: AtomicU64::new(0),
        })
    }

    /// Whether a Unix peer may connect, and if so its scope. A refusal is counted and logged.
    pub fn admit(&self, origin: Origin) -> Result<Scope, String> {
        let restricted = !self.allow_uids.is_empty() || !self.allow_gids.is_empty();
        match origin {
            Origin::Tcp => Ok(Scope::Unrestricted),
            Origin::UnixUnknown if restricted || self.namespace_by_uid => {
                Err(self.deny("the peer's credentials cannot be read".to_string()))
            }
            Origin::UnixUnknown => Ok(Scope::Unrestricted),
            Origin::Unix { uid, gid } => {
                let admin = self.admin_uids.contains(&uid);
                let allowed = !restricted
                    || admin
                    || self.allow_uids.contains(&uid)
                    || self.allow_gids.contains(&gid);
                if !allowed {
                    return Err(self.deny(format!(
                        "uid {uid} (gid {gid}) is not allowed to use this daemon"
                    )));
                }
                Ok(if self.namespace_by_uid && !admin {
                    Scope::Namespace(Arc::new(Namespace::of_uid(uid)))
                } else {
                    Scope::Unrestricted
                })
            }
        }
    }

    /// The scope a TCP peer's HELLO token grants, or the refusal (counted and logged).
    pub fn authenticate(&self, token: Option<&str>) -> Result<Scope, String> {
        let Some(table) = &self.tokens else {
            // TCP never runs without a table (the daemon refuses to start); be safe regardless.
            return Err(self.deny("this listener accepts no token".to_string()));
        };
        let Some(token) = token else {
            return Err(self.deny(
                "this listener needs `token` in HELLO (the shared secret of --auth-token-file)"
                    .to_string(),
            ));
        };
        table
            .check(token)
            .ok_or_else(|| self.deny("the token in HELLO is not valid".to_string()))
    }

    /// Peers refused since start.
    pub fn denied(&self) -> u64 {
        self.denied.load(Ordering::Relaxed)
    }

    /// Counts and logs (rate-limited) a refusal, and returns what the peer is told.
    fn deny(&self, why: String) -> String {
        self.denied.fetch_add(1, Ordering::Relaxed);
        crate::throttled_warn!(DENIED, reason = %why, "access denied");
        why
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn access(args: &[&str]) -> Access {
        let mut all = vec!["scaled"];
        all.extend_from_slice(args);
        Access::from_config(&Config::try_parse_from(all).expect("parses")).expect("valid")
    }

    #[test]
    fn allow_lists_and_admins() {
        let open = access(&[]);
        assert_eq!(
            open.admit(Origin::Unix { uid: 5, gid: 5 }),
            Ok(Scope::Unrestricted)
        );
        let a = access(&[
            "--allow-uid",
            "1000,1001",
            "--allow-gid",
            "50",
            "--admin-uid",
            "0",
        ]);
        assert!(a.admit(Origin::Unix { uid: 1001, gid: 9 }).is_ok());
        assert!(a.admit(Origin::Unix { uid: 7, gid: 50 }).is_ok());
        assert!(
            a.admit(Origin::Unix { uid: 0, gid: 0 }).is_ok(),
            "admins are allowed"
        );
        assert!(a
            .admit(Origin::Unix {
                uid: 65534,
                gid: 65534
            })
            .is_err());
        assert!(a.admit(Origin::UnixUnknown).is_err());
        assert_eq!(a.denied(), 2);
    }

    #[test]
    fn namespaces_by_uid_spare_admins() {
        let a = access(&["--namespace-by-uid", "--admin-uid", "0"]);
        assert_eq!(
            a.admit(Origin::Unix {
                uid: 1000,
                gid: 1000
            }),
            Ok(Scope::Namespace(Arc::new(Namespace::of_uid(1000))))
        );
        assert_eq!(
            a.admit(Origin::Unix { uid: 0, gid: 0 }),
            Ok(Scope::Unrestricted)
        );
    }

    #[test]
    fn tcp_needs_a_token_file() {
        let config = Config::try_parse_from(["scaled", "--tcp", "7000"]).expect("parses");
        let err = Access::from_config(&config).expect_err("no token file");
        assert!(err.to_string().contains("--auth-token-file"), "{err}");
    }
}
