//! A LOCK's place in a lock's queue, held by the request while it waits.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::{Grant, LockTable};

/// A place in a lock's queue. Await [`WaitTicket::granted`]; dropping the ticket leaves the queue, and
/// if the grant had already been sent, releases it to the next waiter, so a grant never goes to
/// someone who stopped waiting.
pub struct WaitTicket {
    pub(super) table: Arc<LockTable>,
    pub(super) key: Arc<str>,
    pub(super) ticket: u64,
    /// `None` once the grant has been taken out.
    pub(super) rx: Option<oneshot::Receiver<Grant>>,
}

impl WaitTicket {
    /// Waits for the grant. `None` if the table dropped the wait (its connection closed).
    pub async fn granted(&mut self) -> Option<Grant> {
        let rx = self.rx.as_mut()?;
        let grant = rx.await.ok();
        self.rx = None;
        grant
    }

    /// Gives up waiting because the wait timeout passed.
    pub fn time_out(self) {
        self.table.count_timeout();
    }
}

impl Drop for WaitTicket {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            self.table.withdraw(&self.key, self.ticket, &mut rx);
        }
    }
}
