//! The service manager's notification protocol (systemd's `sd_notify`): newline-separated
//! `NAME=value` assignments in one datagram to the Unix socket named by `$NOTIFY_SOCKET`.
//!
//! Implemented here rather than through a crate because it is one `sendto` on a socket from the
//! standard library; the only subtlety is the abstract namespace (a path starting with `@`), which
//! `std` supports on Linux. When `$NOTIFY_SOCKET` is unset (run by hand, or `Type=` other than
//! `notify`), every call does nothing.
//!
//! `$WATCHDOG_USEC` says how often systemd expects `WATCHDOG=1`; `$WATCHDOG_PID`, when set, says which
//! process it expects it from, so a child that inherited the variables does not answer for its parent.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::time::Duration;

/// A connection to the service manager's notification socket; does nothing when there is none.
#[derive(Debug)]
pub struct Notifier {
    /// The unbound datagram socket messages leave from, and where they go; `None` when
    /// `$NOTIFY_SOCKET` is unset or unusable.
    target: Option<(UnixDatagram, SocketAddr)>,
    /// How long the service manager waits for a keep-alive before it restarts the daemon, from
    /// `$WATCHDOG_USEC`; `None` when no watchdog is configured for this process.
    watchdog: Option<Duration>,
}

impl Notifier {
    /// The notifier the environment describes. An unusable `$NOTIFY_SOCKET` is logged and ignored:
    /// the daemon serves anyway, and systemd's start timeout reports the missing READY.
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            match open(path.as_bytes()) {
                Ok(target) => Some(target),
                Err(e) => {
                    tracing::warn!(socket = ?path, error = %e, "NOTIFY_SOCKET is unusable; not notifying");
                    None
                }
            }
        });
        let watchdog = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        Notifier { target, watchdog }
    }

    /// A notifier sending to `address` (a path, or `@name` in the abstract namespace), expecting
    /// keep-alives within `watchdog` if given.
    pub fn to(address: &[u8], watchdog: Option<Duration>) -> io::Result<Notifier> {
        Ok(Notifier {
            target: Some(open(address)?),
            watchdog,
        })
    }

    /// A notifier that sends nothing (for a daemon embedded in tests).
    pub fn disabled() -> Notifier {
        Notifier {
            target: None,
            watchdog: None,
        }
    }

    /// Whether anything is listening: no point in composing messages otherwise.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// The watchdog timeout, when systemd expects keep-alives from this process.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog.filter(|_| self.enabled())
    }

    /// Sends `state` (`NAME=value` lines). A failure is logged at debug and otherwise ignored: the
    /// service manager going away must not stop the daemon serving.
    pub fn send(&self, state: &str) {
        let Some((socket, addr)) = &self.target else {
            return;
        };
        if let Err(e) = socket.send_to_addr(state.as_bytes(), addr) {
            tracing::debug!(error = %e, "notification not sent");
        }
    }

    /// `STATUS=`: one line saying what the daemon is doing (`systemctl status` shows it).
    pub fn status(&self, status: &str) {
        if self.enabled() {
            self.send(&format!("STATUS={}", one_line(status)));
        }
    }
}

/// Opens an unbound datagram socket and resolves `path` (`@name` for the abstract namespace).
fn open(path: &[u8]) -> io::Result<(UnixDatagram, SocketAddr)> {
    let addr = match path.split_first() {
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "NOTIFY_SOCKET is empty",
            ))
        }
        Some((b'@', name)) => abstract_addr(name)?,
        Some((b'/', _)) => SocketAddr::from_pathname(Path::new(OsStr::from_bytes(path)))?,
        Some(_) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "NOTIFY_SOCKET is neither an absolute path nor an @abstract name",
            ))
        }
    };
    Ok((UnixDatagram::unbound()?, addr))
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets exist only on Linux",
    ))
}

/// The watchdog timeout from `$WATCHDOG_USEC` and `$WATCHDOG_PID`, as systemd's `sd_watchdog_enabled`
/// reads them: a positive number of microseconds, meant for this process when a PID is given.
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(own_pid) {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// A status squeezed onto one line: a newline would start a new assignment.
fn one_line(status: &str) -> String {
    status.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_ours_only_when_the_pid_matches_or_is_absent() {
        let second = Some(Duration::from_secs(1));
        assert_eq!(watchdog_interval(Some("1000000"), None, 7), second);
        assert_eq!(watchdog_interval(Some("1000000"), Some("7"), 7), second);
        assert_eq!(watchdog_interval(Some("1000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, Some("7"), 7), None);
    }

    #[test]
    fn messages_reach_a_path_socket_and_an_abstract_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).expect("bind");
        let (client, addr) = open(path.as_os_str().as_bytes()).expect("open");
        let notifier = Notifier {
            target: Some((client, addr)),
            watchdog: None,
        };
        notifier.status("serving\n3 connections");
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STATUS=serving 3 connections");

        let name = format!("scaled-notify-test-{}", std::process::id());
        let server = UnixDatagram::bind_addr(&abstract_addr(name.as_bytes()).expect("addr"))
            .expect("bind abstract");
        let (client, addr) = open(format!("@{name}").as_bytes()).expect("open abstract");
        client.send_to_addr(b"READY=1", &addr).expect("send");
        let n = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1");

        assert!(open(b"").is_err());
        assert!(open(b"relative").is_err());
    }
}
