//! The open-file limit. Every connection is a file descriptor, so with the common soft limit of 1024
//! the kernel would refuse connections long before SCALED_MAX_CONNECTIONS, and those clients would
//! hang in the listen backlog instead of being answered OVERLOADED. At start the daemon raises its
//! soft limit as far as the hard limit allows, and if that is still short it serves fewer connections
//! (saying so), so that OVERLOADED stays the answer at the limit.

/// Descriptors kept for what is not a client connection: listeners, the lock file, stdio, the
/// runtime's own, a refused connection's brief answer.
pub const HEADROOM: u64 = 64;

/// Raises the soft RLIMIT_NOFILE toward the hard limit and returns how many client connections the
/// result leaves room for: `wanted` if it fits, fewer otherwise.
pub fn fit_connections(wanted: usize, headroom: u64) -> usize {
    let Some((soft, hard)) = nofile() else {
        return wanted;
    };
    let want = (wanted as u64).saturating_add(headroom);
    let mut soft_now = soft;
    if soft < want {
        let target = want.min(hard);
        if set_nofile(target, hard) {
            soft_now = target;
            tracing::info!(from = soft, to = target, "raised the open-file limit");
        }
    }
    let room = usize::try_from(soft_now.saturating_sub(headroom)).unwrap_or(usize::MAX);
    if room < wanted {
        tracing::warn!(
            open_file_limit = soft_now,
            max_connections = wanted,
            serving = room,
            "the open-file limit is below SCALED_MAX_CONNECTIONS plus headroom; serving fewer \
             connections (raise LimitNOFILE / ulimit -n to serve more)"
        );
    }
    room.min(wanted)
}

fn nofile() -> Option<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own and reads nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (rc == 0).then_some((lim.rlim_cur, lim.rlim_max))
}

fn set_nofile(soft: u64, hard: u64) -> bool {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 }
}
