"""The asyncio client against the real daemon: the same surface as the sync client, locks as ``await``
and ``async with``, a cancelled LOCK that leaves nothing held, and the connection's life."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

import scaled
import scaled.aio

from conftest import Daemon

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 60))


async def until(what: str, check: Any, limit: float = 20.0) -> None:
    """Polls the coroutine function ``check`` until it is true; fails after ``limit`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {limit} s waiting for {what}", pytrace=False)
        await asyncio.sleep(0.01)


def test_the_commands(daemon: Daemon) -> None:
    async def main() -> None:
        async with scaled.aio.Client(daemon.socket_path) as client:
            assert (await client.connect())["version"] == 1
            assert await client.ping() is True
            assert await client.get("k") is None
            assert await client.set("k", b"\x00\xff", ttl=60) is True
            assert await client.get("k") == b"\x00\xff"
            await client.set_json("j", {"a": [1, 2]})
            assert await client.get_json("j") == {"a": [1, 2]}
            assert await client.delete("k") is True and await client.delete("k") is False
            stats = await client.stats()
            assert stats["cache"]["hits"] == 2
            with pytest.raises(scaled.BadArgumentError):
                await client.get("")
            with pytest.raises(scaled.TooLargeError):
                await client.set("k", b"v" * (1024 * 1024 + 1))
            assert isinstance((await client.execute("NOPE")).error, scaled.UnknownCommandError)
            assert await client.ping(delay=0.05)

    run(main())


def test_locks_fence_and_exclude(daemon: Daemon) -> None:
    async def main() -> None:
        async with scaled.aio.Client(daemon.socket_path) as a, scaled.aio.Client(daemon.socket_path) as b:
            stale = await a.lock("session:1", ttl=0.3)
            await a.set("session:1", b"a", fence=stale)
            with pytest.raises(scaled.LockedError):
                await b.lock("session:1", blocking=False)
            async with b.lock("session:1", wait=30) as fresh:  # granted when A's lease runs out
                assert fresh.fence > stale.fence and fresh.held
                with pytest.raises(scaled.FencedError):
                    await a.set("session:1", b"late", fence=stale)
                assert await fresh.extend(ttl=60) == 60_000
                assert [info.key for info in await a.locks()] == ["session:1"]
            assert not fresh.held and await a.locks() == []
            with pytest.raises(scaled.LockLost):
                await stale.release()

            # Tasks on one client take turns: no update lost.
            async def increment() -> None:
                for _ in range(20):
                    async with a.lock("counter", wait=30) as lock:
                        value = await a.get_json("n") or 0
                        await a.set_json("n", value + 1, fence=lock)

            await asyncio.gather(*(increment() for _ in range(10)))
            assert await a.get_json("n") == 200

    run(main())


def test_a_cancelled_lock_wait_leaves_nothing_held(daemon: Daemon) -> None:
    async def main() -> None:
        async with (
            scaled.aio.Client(daemon.socket_path) as holder,
            scaled.aio.Client(daemon.socket_path) as c,
        ):
            lock = await holder.lock("session:c")
            # A lease of 10 minutes: only the give-back can free the lock within the test.
            waiting = asyncio.ensure_future(c.lock("session:c", wait=30, ttl=600))

            async def queued() -> bool:
                return (await holder.locks())[0].waiters == 1

            await until("the LOCK to queue", queued)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            # The grant goes to the cancelled waiter's connection, which gives it straight back.
            await lock.release()

            async def free() -> bool:
                return await holder.locks() == []

            await until("the late grant to be given back", free)
            async with holder.lock("session:c", blocking=False):
                pass

    run(main())


def test_in_flight_calls_fail_with_connection_lost_then_it_reconnects(daemon: Daemon) -> None:
    async def main() -> None:
        client = scaled.aio.Client(daemon.socket_path)
        await client.set("k", b"v")
        pings = [asyncio.ensure_future(client.ping(delay=30)) for _ in range(3)]

        async def in_flight() -> bool:
            return client.in_flight == 3

        await until("three PINGs in flight", in_flight)
        daemon.stop(signal.SIGKILL)
        results = await asyncio.gather(*pings, return_exceptions=True)
        assert all(isinstance(r, scaled.ConnectionLost) for r in results), results
        daemon.start()
        assert await client.get("k") is None  # a new daemon, a new connection
        assert "PING" not in (await client.stats())["performance"]["commands"]
        await client.aclose()
        with pytest.raises(scaled.ScaledError):
            await client.ping()

    run(main())


def test_timeouts_and_a_missing_daemon(daemon: Daemon) -> None:
    async def main() -> None:
        async with scaled.aio.Client(daemon.socket_path, timeout=0.2) as client:
            with pytest.raises(scaled.RequestTimeout):
                await client.execute("PING", {"delay_ms": 3000})
            assert await client.ping()
        with pytest.raises(scaled.ConnectError):
            await scaled.aio.Client(daemon.socket_path + ".none").ping()

    run(main())
