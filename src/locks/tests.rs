//! Unit tests of the lock table: hand-off, expiry, auto-renew, fencing, the record and waiter limits,
//! pruning, and that leaving a queue or releasing a connection's locks costs linear work, not
//! quadratic.

use super::*;

fn req(conn: u64, lease_ms: u64) -> LockRequest {
    LockRequest {
        conn,
        alive: Arc::new(CancellationToken::new()),
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

fn limited(max_records: usize, max_waiters: usize) -> Arc<LockTable> {
    Arc::new(LockTable::with_fences_after(
        0,
        LockLimits {
            max_records,
            max_waiters,
        },
    ))
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
async fn auto_renew_outlives_its_lease_and_renews_at_most_once_a_second() {
    let table = Arc::new(LockTable::new());
    tokio::spawn(table.clone().run_expiry(CancellationToken::new()));
    let auto = |conn, lease_ms| LockRequest {
        auto_renew: true,
        ..req(conn, lease_ms)
    };
    // Asked for 100 ms, given the one-second floor, and the grant says so.
    let held = granted(table.acquire("k", auto(1, 100), Instant::now()));
    assert_eq!(held.ttl_ms, AUTO_RENEW_MIN_LEASE.as_millis() as u64);
    tokio::time::sleep(Duration::from_millis(5500)).await;
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
    // One renewal per second of the floor, not one per 100 ms.
    assert_eq!(table.stats().renewals, 5);
    // EXTEND cannot bring an auto-renew lease below the floor either; a plain lease it can.
    let (status, lease) = table.extend(
        "k",
        &held.token,
        Some(Duration::from_millis(1)),
        Instant::now(),
    );
    assert_eq!((status, lease), (Status::Ok, AUTO_RENEW_MIN_LEASE));
    assert_eq!(table.release("k", &held.token, Instant::now()), Status::Ok);
    let plain = granted(table.acquire("p", req(1, 100), Instant::now()));
    assert_eq!(plain.ttl_ms, 100);
    let (_, lease) = table.extend(
        "p",
        &plain.token,
        Some(Duration::from_millis(1)),
        Instant::now(),
    );
    assert_eq!(lease, Duration::from_millis(1));
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

#[test]
fn at_the_record_limit_the_oldest_free_record_goes_and_the_fence_floor_rises() {
    let table = limited(3, 8);
    let now = Instant::now();
    let mut last = Vec::new();
    for key in ["a", "b", "c"] {
        let g = granted(table.acquire(key, req(1, 10_000), now));
        assert_eq!(table.release(key, &g.token, now), Status::Ok);
        last.push(g.fence);
    }
    assert_eq!(table.stats().records, 3);

    // A fourth key needs a record: `a`, free the longest, is pruned; the floor becomes its last token.
    let d = granted(table.acquire("d", req(1, 10_000), now));
    assert!(d.fence > last[2]);
    assert_eq!(table.stats().records, 3);
    assert!(
        table.fenced("a", last[0], || ()).is_ok(),
        "floor = a's last"
    );
    assert!(
        table.fenced("b", last[1], || ()).is_ok(),
        "b still has its record"
    );

    // `b` goes next; writes naming `a` with its old token are now refused (conservative).
    let e = granted(table.acquire("e", req(1, 10_000), now));
    assert!(table.fenced("a", last[0], || ()).is_err());
    assert!(
        table.fenced("b", last[1], || ()).is_ok(),
        "floor = b's last"
    );

    // A pruned key taken again gets a token above every earlier one: tokens never go backwards.
    let f = granted(table.acquire("f", req(1, 10_000), now));
    assert!(f.fence > e.fence);

    // Every record held: a new key is refused, with no effect; held keys still queue and hand on.
    assert!(matches!(
        table.acquire("g", req(2, 10_000), now),
        Acquire::Refused(Limit::Records(3))
    ));
    let stats = table.stats();
    assert_eq!((stats.records, stats.held, stats.overloaded), (3, 3, 1));
    let mut waiter = queued(table.acquire("d", req(2, 10_000), now));
    assert_eq!(table.release("d", &d.token, now), Status::Ok);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let handed = rt.block_on(waiter.granted()).expect("handed on");
    assert!(handed.fence > f.fence);
    // Once one lock is free, the new key gets its record.
    assert_eq!(table.release("d", &handed.token, now), Status::Ok);
    assert!(matches!(
        table.acquire("g", req(2, 10_000), now),
        Acquire::Granted(_)
    ));
}

#[test]
fn at_the_record_limit_an_overdue_lease_makes_room_without_the_expiry_task() {
    let table = limited(2, 8);
    let now = Instant::now();
    let short = granted(table.acquire("short", req(1, 5), now));
    granted(table.acquire("long", req(1, 60_000), now));
    // Both held, neither free: nothing to give up yet.
    assert!(matches!(
        table.acquire("new", req(2, 60_000), now),
        Acquire::Refused(Limit::Records(2))
    ));
    // Once the short lease is past its deadline, the LOCK ends it and takes its room at once.
    let later = now + Duration::from_millis(10);
    let fresh = granted(table.acquire("new", req(2, 60_000), later));
    assert!(fresh.fence > short.fence);
    assert_eq!(
        table.release("short", &short.token, later),
        Status::NotLocked
    );
    let stats = table.stats();
    assert_eq!((stats.records, stats.held, stats.expiries), (2, 2, 1));
}

#[test]
fn a_full_queue_refuses_the_next_waiter_without_effect() {
    let table = limited(100, 2);
    let now = Instant::now();
    let held = granted(table.acquire("k", req(1, 10_000), now));
    let _first = queued(table.acquire("k", req(2, 10_000), now));
    let _second = queued(table.acquire("k", req(3, 10_000), now));
    assert!(matches!(
        table.acquire("k", req(4, 10_000), now),
        Acquire::Refused(Limit::Waiters(2))
    ));
    // Try mode is answered as always: the lock is held.
    assert!(matches!(
        table.acquire(
            "k",
            LockRequest {
                try_only: true,
                ..req(4, 10_000)
            },
            now
        ),
        Acquire::Busy
    ));
    let stats = table.stats();
    assert_eq!((stats.waiters, stats.overloaded, stats.refused), (2, 1, 1));
    assert_eq!(table.release("k", &held.token, now), Status::Ok);
    assert_eq!(table.list(now)[0].owner, "test#2");
}

#[tokio::test(start_paused = true)]
async fn records_are_pruned_after_retention_and_their_memory_returned() {
    const KEYS: usize = 20_000;
    let table = Arc::new(LockTable::new());
    let now = Instant::now();
    for i in 0..KEYS {
        let key = format!("k{i}");
        let g = granted(table.acquire(&key, req(1, 10_000), now));
        table.release(&key, &g.token, now);
    }
    let full = table.state.lock().entries.capacity();
    assert!(full >= KEYS);
    let last = granted(table.acquire("held", req(1, 86_400_000), now));

    // Nothing is due before the retention; after it, upkeep prunes in batches until none is left.
    table.expire_due(now + FENCE_RETENTION / 2);
    assert_eq!(table.stats().records, KEYS as u64 + 1);
    let later = now + FENCE_RETENTION;
    let mut passes = 0;
    while table.expire_due(later) <= later {
        passes += 1;
        assert!(passes <= KEYS, "upkeep never finished");
    }
    assert!(passes >= KEYS / UPKEEP_BATCH - 1, "pruning was not batched");
    assert_eq!(table.stats().records, 1, "only the held lock is left");
    let st = table.state.lock();
    assert!(
        st.entries.capacity() < full / 8,
        "the record map kept {} slots for {} records",
        st.entries.capacity(),
        st.entries.len()
    );
    assert!(st.free.is_empty());
    // The floor covers every pruned record: their last tokens are all below the held lock's.
    assert_eq!(st.fence_floor, last.fence - 1);
}

// ---------------------------------------------------------------------------------------------------
// Work grows linearly: eight runs of n against one run of 8n, in this thread's CPU time.

/// This thread's CPU time in nanoseconds, from the scheduler's account (`/proc/thread-self/schedstat`,
/// first field). It lags by at most a scheduler tick, far less than what is measured here.
fn thread_cpu_ns() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("schedstat's first field")
}

/// CPU time of `work(size)` alone, after `setup(size)` (not counted).
fn cpu_of<S>(size: usize, setup: impl Fn(usize) -> S, work: impl Fn(S)) -> u64 {
    let state = setup(size);
    let start = thread_cpu_ns();
    work(state);
    thread_cpu_ns() - start
}

/// Fails unless one run at 8n costs less than three times eight runs at n. Linear work gives a ratio
/// near 1; quadratic work gives 8.
fn assert_linear<S>(what: &str, n: usize, setup: impl Fn(usize) -> S, work: impl Fn(S)) {
    // Warm up allocator and caches, so the first measured run is not the odd one out.
    cpu_of(n, &setup, &work);
    let small: u64 = (0..8).map(|_| cpu_of(n, &setup, &work)).sum();
    let large = cpu_of(8 * n, &setup, &work);
    assert!(
        large < 3 * small.max(1),
        "{what}: one run of {} took {large} ns of CPU, eight runs of {n} took {small} ns",
        8 * n
    );
}

#[test]
fn withdrawing_waiters_is_linear_in_their_number() {
    let setup = |n: usize| {
        let table = limited(16, usize::MAX);
        let now = Instant::now();
        let holder = granted(table.acquire("k", req(1, 10_000), now));
        let tickets: Vec<WaitTicket> = (0..n)
            .map(|i| queued(table.acquire("k", req(2 + i as u64, 10_000), now)))
            .collect();
        (table, holder, tickets)
    };
    // Newest first: the order in which a scan from the front costs the most.
    assert_linear(
        "withdrawal",
        10_000,
        setup,
        |(table, _holder, mut tickets)| {
            while let Some(t) = tickets.pop() {
                drop(t);
            }
            assert_eq!(table.stats().waiters, 0);
        },
    );
}

#[test]
fn releasing_a_connections_locks_is_linear_in_their_number() {
    let setup = |n: usize| {
        let table = limited(usize::MAX, 8);
        let now = Instant::now();
        for i in 0..n {
            granted(table.acquire(&format!("held:{i}"), req(7, 10_000), now));
        }
        table
    };
    assert_linear("release_connection", 5_000, setup, |table| {
        table.release_connection(7, Instant::now());
        assert_eq!(table.stats().held, 0);
    });
}

#[test]
fn a_page_costs_its_rows_not_the_table() {
    let table = limited(usize::MAX, 8);
    let now = Instant::now();
    for i in 0..2_500 {
        granted(table.acquire(&format!("k{i:05}"), req(1, 10_000), now));
    }
    let page = table.page(Some("k00099"), 10, now);
    let keys: Vec<&str> = page.locks.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys[0], "k00100");
    assert_eq!(keys.len(), 10);
    assert_eq!(page.total, 2_500);
    assert_eq!(page.next.as_deref(), Some("k00109"));
    let last = table.page(Some("k02495"), 10, now);
    assert_eq!(last.locks.len(), 4);
    assert_eq!(last.next, None);
    assert_eq!(table.page(None, 5_000, now).locks.len(), MAX_LOCKS_PAGE);
    assert_eq!(table.list(now).len(), 2_500);

    // One page of 10 from a table 8 times larger costs about the same: O(log n + page).
    let setup = |n: usize| {
        let table = limited(usize::MAX, 8);
        for i in 0..n {
            granted(table.acquire(&format!("k{i:07}"), req(1, 10_000), now));
        }
        table
    };
    let pages = |table: Arc<LockTable>| {
        for _ in 0..2_000 {
            assert_eq!(table.page(Some("k0000500"), 10, now).locks.len(), 10);
        }
    };
    // The least of three runs each: a busy machine only ever adds time. A page costing the table's
    // size would take about 8 times as long.
    let least = |n: usize| (0..3).map(|_| cpu_of(n, setup, pages)).min().unwrap_or(0);
    let small = least(2_000);
    let large = least(16_000);
    assert!(
        large < 4 * small.max(1),
        "pages from 16 000 locks took {large} ns, from 2 000 took {small} ns"
    );
}
