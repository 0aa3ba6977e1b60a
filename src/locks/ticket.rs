//! A LOCK's place in a lock's queue, held by the request while it waits.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::{Grant, LockTable};

/// A place in a lock's queue. Await [`WaitTicket::granted`]; dropping the ticket leaves the queue (in
/// O(log n), wherever it stands), and if the grant had already been sent, releases it to the next
/// waiter, so a grant never goes to someone who stopped waiting.
pub struct WaitTicket {
    /// The table, to leave the queue on drop.
    table: Arc<LockTable>,
    /// The lock waited for.
    key: Arc<str>,
    /// This waiter's number in the queue: tickets only grow, so the queue's order is theirs.
    ticket: u64,
    /// Where the grant arrives; `None` once it has been taken out.
    rx: Option<oneshot::Receiver<Grant>>,
}

impl WaitTicket {
    /// A ticket for the waiter `ticket` on `key`, whose grant arrives on `rx`.
    pub(super) fn new(
        table: Arc<LockTable>,
        key: Arc<str>,
        ticket: u64,
        rx: oneshot::Receiver<Grant>,
    ) -> WaitTicket {
        WaitTicket {
            table,
            key,
            ticket,
            rx: Some(rx),
        }
    }

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
