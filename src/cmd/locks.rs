//! LOCKS: the locks held now, with owner, age, lease left and queue length, a page at a time.
//!
//! Without `limit` or `after` it answers the first page as a bare array, as LOCKS always has, so older
//! clients keep working; with either it answers a page map with the total and the cursor of the next
//! page. Either way one answer holds at most [`MAX_LOCKS_PAGE`] rows and costs O(log n + page).
//!
//! A peer confined to a namespace sees only its namespace's locks, under its own key names: the
//! walk is bounded to the namespace's prefix, `after` is taken in the namespace, and rows and `next`
//! lose the prefix. `total` then counts the namespace's locks.

use std::sync::Arc;

use tokio::time::Instant;

use scaled_client::proto::{Args, ErrorCode};

use super::{check_key, CommandError, CommandResult, Reply};
use crate::access::Scope;
use crate::daemon::Daemon;
use crate::locks::MAX_LOCKS_PAGE;

pub fn run(daemon: &Arc<Daemon>, scope: &Scope, args: Args, now: Instant) -> CommandResult {
    let paged = args.limit.is_some() || args.after.is_some();
    let limit = match args.limit {
        None => MAX_LOCKS_PAGE,
        Some(0) => {
            return Err(CommandError::new(
                ErrorCode::BadArgument,
                format!("limit must be 1 to {MAX_LOCKS_PAGE}, not 0"),
            ))
        }
        // Past the page size is the page size: a client asking for more pages through.
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX).min(MAX_LOCKS_PAGE),
    };
    if let Some(after) = &args.after {
        // An empty cursor is the start; a longer one than any key is refused like a key.
        if !after.is_empty() {
            check_key("after", after)?;
        }
    }
    let page = match scope.namespace() {
        None => daemon.locks.page(args.after.as_deref(), limit, now),
        Some(ns) => {
            let after = args
                .after
                .as_deref()
                .filter(|a| !a.is_empty())
                .map(|a| format!("{}{a}", ns.prefix()));
            let mut page = daemon
                .locks
                .page_within(ns.prefix(), after.as_deref(), limit, now);
            for row in &mut page.locks {
                row.key = ns.strip(&row.key).unwrap_or_default().to_string();
            }
            page.next = page
                .next
                .and_then(|next| ns.strip(&next).map(str::to_string));
            page
        }
    };
    if paged {
        Reply::encode(&page)
    } else {
        Reply::encode(&page.locks)
    }
}
