//! Unit tests of the lock table.

use super::*;

fn req(conn: u64, lease_ms: u64) -> LockRequest {
    LockRequest {
        conn,
        alive: CancellationToken::new(),
        owner: Arc::from(format!("test#{conn}")),
        lease: Duration::from_millis(lease_ms),
        auto_renew: false,
        try_only: false,
    }
}

fn granted(a: Acquire) -> Grant {
    match a {
        Acquire::Granted(g) => g,
        _ => panic!("expected an immediate grant"),
    }
}

fn queued(a: Acquire) -> WaitTicket {
    match a {
        Acquire::Queued(t) => t,
        _ => panic!("expected to queue"),
    }
}

#[tokio::test(start_paused = true)]
async fn lease_expiry_hands_the_lock_on() {
    let table = Arc::new(LockTable::new());
    tokio::spawn(table.clone().run_expiry(CancellationToken::new()));
    let first = granted(table.acquire("k", req(1, 1000), Instant::now()));
    let mut ticket = queued(table.acquire("k", req(2, 1000), Instant::now()));
    // Paused time jumps to the lease deadline; the expiry task grants the waiter.
    let second = ticket.granted().await.expect("granted after expiry");
    assert!(second.fence > first.fence);
    assert!(second.waited_us >= 1_000_000);
    assert_eq!(
        table.release("k", &first.token, Instant::now()),
        Status::Expired
    );
    assert_eq!(table.stats().expiries, 1);
    assert_eq!(
        table.release("k", &second.token, Instant::now()),
        Status::Ok
    );
}

#[tokio::test(start_paused = true)]
async fn auto_renew_outlives_its_lease() {
    let table = Arc::new(LockTable::new());
    tokio::spawn(table.clone().run_expiry(CancellationToken::new()));
    let held = granted(table.acquire(
        "k",
        LockRequest {
            auto_renew: true,
            ..req(1, 100)
        },
        Instant::now(),
    ));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(matches!(
        table.acquire(
            "k",
            LockRequest {
                try_only: true,
                ..req(2, 100)
            },
            Instant::now()
        ),
        Acquire::Busy
    ));
    assert!(table.stats().renewals >= 40);
    assert_eq!(table.release("k", &held.token, Instant::now()), Status::Ok);
}

#[tokio::test]
async fn dropped_ticket_with_unread_grant_passes_it_on() {
    let table = Arc::new(LockTable::new());
    let now = Instant::now();
    let first = granted(table.acquire("k", req(1, 10_000), now));
    let gone = queued(table.acquire("k", req(2, 10_000), now));
    let mut third = queued(table.acquire("k", req(3, 10_000), now));
    assert_eq!(table.release("k", &first.token, now), Status::Ok);
    // The second waiter was granted but never read it; dropping it must pass the lock on.
    drop(gone);
    let g = third.granted().await.expect("third granted");
    assert_eq!(table.list(Instant::now())[0].owner, "test#3");
    assert_eq!(table.release("k", &g.token, Instant::now()), Status::Ok);
}

#[test]
fn closed_connection_is_never_granted() {
    let table = Arc::new(LockTable::new());
    let now = Instant::now();
    let first = granted(table.acquire("k", req(1, 10_000), now));
    let dead = req(2, 10_000);
    let alive = dead.alive.clone();
    let _ticket = queued(table.acquire("k", dead, now));
    alive.cancel();
    table.release_connection(2, now);
    assert_eq!(table.release("k", &first.token, now), Status::Ok);
    assert!(table.list(now).is_empty(), "the dead waiter was granted");
}

#[test]
fn fenced_writes_need_the_newest_token() {
    let table = Arc::new(LockTable::new());
    let now = Instant::now();
    let a = granted(table.acquire("k", req(1, 10_000), now));
    assert!(table.fenced("k", a.fence, || ()).is_ok());
    table.release("k", &a.token, now);
    let b = granted(table.acquire("k", req(1, 10_000), now));
    assert!(b.fence > a.fence);
    assert!(table.fenced("k", a.fence, || ()).is_err());
    assert!(table.fenced("k", b.fence + 1, || ()).is_err());
    assert!(table.fenced("k", b.fence, || ()).is_ok());
    assert!(table.fenced("never-locked", 1, || ()).is_err());
}
