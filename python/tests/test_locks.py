"""Session locks through the sync client: one holder at a time across threads and processes with no
update lost, FIFO waiters, fencing that refuses a stale holder's write, leases, and locks released when
their holder's process dies."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import scaled

from conftest import Daemon, clean_env, wait_for

WORKER = Path(__file__).resolve().parent / "helpers" / "lock_worker.py"


def worker(daemon: Daemon, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), daemon.socket_path, *args],
        stdout=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )


def increment(client: scaled.Client, key: str) -> None:
    """One read-modify-write of a counter under the lock: lost updates show if two ever overlap."""
    with client.lock(key, ttl=30, wait=60) as lock:
        counter = client.get_json(f"{key}:counter") or 0
        client.set_json(f"{key}:counter", counter + 1, fence=lock)


def test_threads_take_turns_with_no_update_lost(daemon: Daemon) -> None:
    shared, own = daemon.client(), [daemon.client() for _ in range(4)]
    threads_n, times = 16, 25

    def run(n: int) -> None:
        # Half the threads share one connection, the others have one each: both must exclude.
        client = shared if n % 2 else own[n % 4]
        for _ in range(times):
            increment(client, "counter")

    threads = [threading.Thread(target=run, args=(n,)) for n in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive()
    assert shared.get_json("counter:counter") == threads_n * times
    assert shared.stats()["locks"]["grants"] == threads_n * times
    for c in (shared, *own):
        c.close()


def test_processes_take_turns_with_no_update_lost(daemon: Daemon) -> None:
    processes, times = 4, 40
    workers = [worker(daemon, "increment", "shared", str(times)) for _ in range(processes)]
    for w in workers:
        assert w.wait(120) == 0
    with daemon.client() as client:
        assert client.get_json("shared:counter") == processes * times
        assert client.stats()["locks"]["contention"] > 0, "the processes never met at the lock"


def test_waiters_are_granted_in_the_order_they_asked(daemon: Daemon) -> None:
    holder = daemon.client()
    lock = holder.lock("fifo")
    granted: list[int] = []
    clients = [daemon.client(name=f"waiter-{n}") for n in range(6)]

    def wait_turn(n: int) -> None:
        with clients[n].lock("fifo", wait=60):
            granted.append(n)

    threads = []
    for n in range(6):
        t = threading.Thread(target=wait_turn, args=(n,))
        t.start()
        threads.append(t)
        # Waiter n is in the queue before waiter n + 1 asks.
        wait_for(f"waiter {n} to queue", lambda n=n: holder.locks()[0].waiters == n + 1)  # type: ignore[misc]
    lock.release()
    for t in threads:
        t.join(60)
    assert granted == list(range(6))
    for c in (holder, *clients):
        c.close()


def test_a_stale_holders_fenced_write_is_refused(daemon: Daemon) -> None:
    a, b = daemon.client(name="a"), daemon.client(name="b")
    stale = a.lock("session:9", ttl=0.3)
    a.set("session:9", b"a's state", fence=stale)  # accepted while it is the newest grant
    # B is granted the lock the moment A's lease runs out.
    fresh = b.lock("session:9", wait=30)
    assert fresh.fence > stale.fence
    with pytest.raises(scaled.FencedError):
        a.set("session:9", b"a's late write", fence=stale)
    with pytest.raises(scaled.FencedError):
        a.delete("session:9", fence=stale)
    b.set("session:9", b"b's state", fence=fresh)
    assert a.get("session:9") == b"b's state"
    with pytest.raises(scaled.LockLost) as lost:
        stale.release()
    assert lost.value.status == "EXPIRED"
    fresh.release()
    a.close()
    b.close()


def test_a_killed_process_releases_its_lock_at_once(daemon: Daemon) -> None:
    holder = worker(daemon, "hold", "session:killed")
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        assert line.startswith("held "), line
        with daemon.client() as client:
            with pytest.raises(scaled.LockedError):
                client.lock("session:killed", blocking=False)
            holder.send_signal(signal.SIGKILL)
            # The lease is 600 s: only the end of the holder's connection can hand the lock on.
            with client.lock("session:killed", wait=30) as lock:
                assert lock.fence > int(line.split()[1])
            assert client.stats()["locks"]["released_on_disconnect"] == 1
    finally:
        holder.kill()
        holder.wait()


def test_try_mode_reentry_extend_and_the_locks_listing(client: scaled.Client) -> None:
    with client.lock("session:1", ttl=1) as lock:
        with pytest.raises(scaled.LockedError):
            client.lock("session:1", blocking=False)  # not re-entrant
        assert lock.extend(ttl=60) == 60_000
        (info,) = client.locks()
        assert (info.key, info.fence, info.owner) == (
            "session:1",
            lock.fence,
            f"{client.name}#{info.owner.split('#')[1]}",
        )
        assert info.ttl_ms > 1000 and info.auto_renew is False
        assert lock.held
    assert not lock.held and client.locks() == []
    with pytest.raises(scaled.LockTimeoutError):
        holder = client.lock("session:2")
        try:
            client.lock("session:2", wait=0.05)
        finally:
            holder.release()


def test_auto_renew_keeps_a_short_lease_held(client: scaled.Client) -> None:
    with client.lock("session:renewed", ttl=0.05, auto_renew=True) as lock:
        wait_for("three renewals", lambda: client.stats()["locks"]["renewals"] >= 3)
        assert client.locks()[0].auto_renew and lock.held
    assert client.stats()["locks"]["expiries"] == 0


def test_a_lock_whose_connection_ended_is_reported_lost(daemon: Daemon) -> None:
    client = daemon.client()
    lock = client.lock("session:restart")
    daemon.restart()
    wait_for("the client to see the connection end", lambda: not client.connected)
    assert not lock.held
    with pytest.raises(scaled.LockLost) as lost:
        lock.release()
    assert lost.value.status == "CONNECTION_LOST"
    client.close()


def test_a_failing_block_releases_the_lock_and_keeps_its_own_error(client: scaled.Client) -> None:
    with pytest.raises(KeyError):
        with client.lock("session:err"):
            raise KeyError("the app's own error")
    assert client.locks() == []


def test_locks_lists_every_lock_past_one_page(client: scaled.Client) -> None:
    """More locks than one LOCKS page holds (1000): the client pages through them all, in key order."""
    held = [client.lock(f"page:{i:05d}", blocking=False) for i in range(1005)]
    listed = [row.key for row in client.locks()]
    assert listed == [f"page:{i:05d}" for i in range(1005)]
    for lock in held:
        lock.release()
    assert client.locks() == []
