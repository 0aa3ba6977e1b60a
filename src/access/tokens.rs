//! The token file (`--auth-token-file`): the shared secrets a TCP client must show in HELLO, each
//! either unrestricted (an admin token) or tied to a key namespace, and the constant-time comparison
//! that checks them.
//!
//! The format, one token a line (blank lines and lines starting with `#` are skipped):
//!
//! ```text
//! # TOKEN alone: unrestricted, sees every key, lock and figure (the admin token)
//! 9c1f4e0a7b2d4c8e9f3a6b5d1e0c7f2a
//! # NAME TOKEN: a peer whose keys and locks live in namespace NAME
//! web      3b8d0e6f1a2c4d5e8f9a0b1c2d3e4f5a
//! billing  7e6d5c4b3a291807f6e5d4c3b2a19080
//! ```
//!
//! The file is read once, at start. It must not be readable or writable by others (mode `o-rwx`):
//! a daemon refuses to start on one that is, rather than serve with a secret every user can read.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use super::namespace::{check_name, Namespace};
use super::Scope;

/// Shortest token accepted: 16 bytes of, say, hex is 64 bits, beyond guessing over a socket that
/// closes after every wrong try.
pub const MIN_TOKEN_LEN: usize = 16;

/// Longest token accepted; keeps HELLO small and the comparison's cost fixed.
pub const MAX_TOKEN_LEN: usize = 256;

/// The tokens a TCP peer may show, each with the scope it grants.
#[derive(Debug)]
pub struct TokenTable {
    /// Every token of the file with what it grants, in file order.
    entries: Vec<(Vec<u8>, Scope)>,
}

/// Why the token file cannot be used; the daemon does not start.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// It could not be read.
    #[error("cannot read the token file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Others may read or write it.
    #[error(
        "the token file {path} has mode {mode:03o}: other users can read or write it; \
         run `chmod o-rwx {path}` (for example mode 600 or 640)"
    )]
    Exposed {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// A line is not `TOKEN` or `NAME TOKEN`, or a token is too short or repeated.
    #[error("token file {path}, line {line}: {reason}")]
    Line {
        /// The file.
        path: String,
        /// The line number, from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// It holds no token at all: TCP would accept nobody.
    #[error("the token file {path} holds no token")]
    Empty {
        /// The file.
        path: String,
    },
}

impl TokenTable {
    /// Reads and checks the token file at `path`.
    pub fn load(path: &Path) -> Result<TokenTable, TokenFileError> {
        let shown = path.display().to_string();
        let read_err = |source| TokenFileError::Read {
            path: shown.clone(),
            source,
        };
        let meta = fs::metadata(path).map_err(read_err)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            return Err(TokenFileError::Exposed { path: shown, mode });
        }
        let text = fs::read_to_string(path).map_err(read_err)?;
        TokenTable::parse(&text)
            .map_err(|(line, reason)| TokenFileError::Line {
                path: shown.clone(),
                line,
                reason,
            })?
            .ok_or(TokenFileError::Empty { path: shown })
    }

    /// Parses the file's text: `Ok(None)` when it holds no token, `Err((line, reason))` on a bad line.
    pub fn parse(text: &str) -> Result<Option<TokenTable>, (usize, String)> {
        let mut entries: Vec<(Vec<u8>, Scope)> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (token, scope) = match fields[..] {
                [token] => (token, Scope::Unrestricted),
                [name, token] => {
                    check_name(name).map_err(|reason| (i + 1, reason))?;
                    (token, Scope::Namespace(Arc::new(Namespace::new(name))))
                }
                _ => return Err((i + 1, "expected `TOKEN` or `NAME TOKEN`".to_string())),
            };
            if !(MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&token.len()) {
                return Err((
                    i + 1,
                    format!(
                        "a token must be {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} bytes, not {}",
                        token.len()
                    ),
                ));
            }
            if entries.iter().any(|(t, _)| t == token.as_bytes()) {
                return Err((
                    i + 1,
                    "this token is already on an earlier line".to_string(),
                ));
            }
            entries.push((token.as_bytes().to_vec(), scope));
        }
        Ok((!entries.is_empty()).then_some(TokenTable { entries }))
    }

    /// The scope `token` grants, or `None` when it is no token of the file. Every token is compared,
    /// each in constant time, whatever matches: how long this takes says nothing about which token
    /// matched or how much of one did.
    pub fn check(&self, token: &str) -> Option<Scope> {
        let mut found = None;
        for (known, scope) in &self.entries {
            if constant_time_eq(token.as_bytes(), known) && found.is_none() {
                found = Some(scope.clone());
            }
        }
        found
    }
}

/// Whether `given` equals `secret`, in time that depends only on `secret`'s length: every byte of the
/// secret is looked at, whatever the first difference, and the lengths are folded into the same
/// difference rather than returned early on.
pub fn constant_time_eq(given: &[u8], secret: &[u8]) -> bool {
    // Any difference in length is a difference; folded in, not branched on.
    let mut diff = (given.len() ^ secret.len()) as u64;
    for (i, &s) in secret.iter().enumerate() {
        let g = given.get(i).copied().unwrap_or(!s);
        diff |= u64::from(g ^ s);
    }
    // Keeps the optimiser from turning the loop into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_is_equality() {
        let secret = b"0123456789abcdef";
        assert!(constant_time_eq(secret, secret));
        assert!(!constant_time_eq(b"0123456789abcdeF", secret));
        assert!(!constant_time_eq(b"X123456789abcdef", secret));
        assert!(!constant_time_eq(b"0123456789abcde", secret), "a prefix");
        assert!(!constant_time_eq(b"0123456789abcdef0", secret), "longer");
        assert!(!constant_time_eq(b"", secret));
        assert!(constant_time_eq(b"", b""));
        // A byte that equals the stand-in for a missing one must not make a shorter input match.
        assert!(!constant_time_eq(&[0xff], &[0x00, 0x00]));
        for len in 0..40usize {
            let a: Vec<u8> = (0..len as u8).collect();
            let mut b = a.clone();
            assert!(constant_time_eq(&a, &b));
            if len > 0 {
                b[len / 2] ^= 0x20;
                assert!(!constant_time_eq(&a, &b), "one flipped bit at {}", len / 2);
            }
        }
    }

    #[test]
    fn the_file_format() {
        let text = "# comment\n\n  aaaaaaaaaaaaaaaa\nweb bbbbbbbbbbbbbbbb\n";
        let table = TokenTable::parse(text)
            .expect("parses")
            .expect("has tokens");
        assert_eq!(table.check("aaaaaaaaaaaaaaaa"), Some(Scope::Unrestricted));
        assert_eq!(
            table.check("bbbbbbbbbbbbbbbb"),
            Some(Scope::Namespace(Arc::new(Namespace::new("web"))))
        );
        assert_eq!(table.check("bbbbbbbbbbbbbbb"), None);
        assert_eq!(table.check(""), None);
        assert!(TokenTable::parse("# nothing\n").expect("parses").is_none());
        for bad in [
            "short",
            "a b c",
            "web short",
            "bad/name bbbbbbbbbbbbbbbb",
            "aaaaaaaaaaaaaaaa\nweb aaaaaaaaaaaaaaaa",
        ] {
            assert!(TokenTable::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn an_exposed_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens");
        fs::write(&path, "aaaaaaaaaaaaaaaa\n").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = TokenTable::load(&path).expect_err("world-readable");
        assert!(err.to_string().contains("chmod o-rwx"), "{err}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod");
        assert!(TokenTable::load(&path).is_ok());
    }
}
