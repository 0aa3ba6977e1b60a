"""The original architecture's API through ``scaled.compat``, against the real daemon: the original
document's own unit tests as written there, and what the layer does where the original was unsafe."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import scaled
from scaled import context
from scaled.compat import (
    RequestContext,
    ScalabilityManager,
    get_scalability_manager,
    reset_scalability_manager,
    with_performance_tracking,
    with_request_context,
    with_session_lock,
)

from conftest import Daemon, wait_for


@pytest.fixture(autouse=True)
def manager_on_the_test_daemon(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``get_scalability_manager()`` finds the test's daemon through SCALED_SOCKET, as an app would."""
    for name in ("CACHE_TTL", "LOCK_TIMEOUT", "LOCK_RETRY_DELAY", "LOCK_MAX_RETRIES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SCALED_SOCKET", daemon.socket_path)
    reset_scalability_manager()
    yield
    reset_scalability_manager()


# The original document's unit tests ("Testing" / "Unit Tests"), as written there.


def test_request_isolation():
    """Ensure requests don't mix context."""
    with RequestContext.create(session_id="session1"):
        assert RequestContext.get_session_id() == "session1"

    with RequestContext.create(session_id="session2"):
        assert RequestContext.get_session_id() == "session2"

    assert RequestContext.get_session_id() is None  # Cleaned up


def test_session_locking():
    """Ensure concurrent writes are blocked."""
    manager = get_scalability_manager()

    with manager.acquire_session_lock("session1"):
        # Try to acquire same lock from another thread
        with pytest.raises(RuntimeError):
            with manager.acquire_session_lock("session1", blocking=False):
                pass


# What the layer adds.


def test_the_session_lock_excludes_other_threads_and_other_managers(daemon: Daemon) -> None:
    manager = get_scalability_manager()
    other_process = ScalabilityManager(socket_path=daemon.socket_path)
    outcome: list[str] = []
    with manager.acquire_session_lock("session1") as lock:
        assert lock.key == "session:session1"

        def other_thread() -> None:
            try:
                with manager.acquire_session_lock("session1", blocking=False):
                    outcome.append("got it")
            except RuntimeError:
                outcome.append("RuntimeError")

        t = threading.Thread(target=other_thread)
        t.start()
        t.join(20)
        assert outcome == ["RuntimeError"]
        with pytest.raises(TimeoutError):
            with other_process.acquire_session_lock("session1", timeout=0.05):
                pass
        with pytest.raises(TimeoutError):  # a blocking wait of 0 is a timeout, not a RuntimeError
            with other_process.acquire_session_lock("session1", timeout=0):
                pass
    with other_process.acquire_session_lock("session1", blocking=False):
        pass
    other_process.close()


def test_the_cache_is_one_for_every_process(daemon: Daemon) -> None:
    worker_a, worker_b = ScalabilityManager(socket_path=daemon.socket_path), get_scalability_manager()
    state = {"session_id": "s1", "counter": 1, "filters": {"city": "Toronto"}}
    worker_a.cache_set("session:s1", state, ttl=300)
    assert worker_b.cache_get("session:s1") == state
    worker_b.cache_set("session:s1", {**state, "counter": 2})
    # The original's per-process LRU would still answer counter 1 here.
    assert worker_a.cache_get("session:s1")["counter"] == 2
    copy = worker_a.cache_get("session:s1")
    copy["counter"] = 99  # mutating what was read changes nothing shared
    assert worker_b.cache_get("session:s1")["counter"] == 2
    worker_a.cache_invalidate("session:s1")
    assert worker_b.cache_get("session:s1") is None
    with pytest.raises(TypeError):
        worker_a.cache_set("bad", {1, 2})
    worker_a.close()


def test_writes_under_a_lost_session_lock_are_refused(daemon: Daemon) -> None:
    slow = ScalabilityManager(socket_path=daemon.socket_path, lock_timeout=0.2)
    fast = get_scalability_manager()
    with pytest.raises(scaled.FencedError):
        with slow.acquire_session_lock("s9"):
            slow.cache_set("session:s9", {"counter": 1})  # accepted: still the holder
            # The lease runs out; the next holder is granted the lock and writes.
            with fast.acquire_session_lock("s9", timeout=30):
                fast.cache_set("session:s9", {"counter": 5})
            slow.cache_set("session:s9", {"counter": 2})  # the stale holder's write
    assert fast.cache_get("session:s9") == {"counter": 5}
    slow.close()


def test_settings_keep_the_originals_environment_names(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOCK_TIMEOUT", "7")
    monkeypatch.setenv("LOCK_RETRY_DELAY", "0.01")
    monkeypatch.setenv("LOCK_MAX_RETRIES", "5")
    monkeypatch.setenv("CACHE_TTL", "0.05")
    manager = ScalabilityManager(socket_path=daemon.socket_path)
    assert manager.lock_wait == pytest.approx(0.05)
    with manager.acquire_session_lock("s1") as lock:
        assert lock.grant.ttl_ms == 7000
        with pytest.raises(TimeoutError):  # waits LOCK_RETRY_DELAY × LOCK_MAX_RETRIES
            with get_scalability_manager().acquire_session_lock("s1"):
                pass
    manager.cache_set("short", {"a": 1})
    assert manager.client.locks() == []
    wait_for("the CACHE_TTL entry to expire", lambda: manager.cache_get("short") is None)
    manager.close()


def test_get_stats_has_the_originals_shape(daemon: Daemon) -> None:
    @with_performance_tracking
    def handler() -> None:
        get_scalability_manager().cache_get("x")

    for _ in range(3):
        handler()
    stats = get_scalability_manager().get_stats()
    assert set(stats) >= {"cache", "performance", "redis"}
    assert set(stats["cache"]) == {"size", "max_size", "hits", "misses", "hit_rate"}
    assert set(stats["performance"]) == {
        "requests_per_second",
        "avg_response_time",
        "p95_response_time",
        "p99_response_time",
        "total_requests",
    }
    assert stats["performance"]["total_requests"] == 3
    assert stats["cache"]["misses"] == 3 and stats["cache"]["max_size"] == 10_000
    assert stats["redis"] == {"available": False}
    assert stats["daemon"]["locks"]["held"] == 0


def test_the_decorators_as_the_document_stacks_them(daemon: Daemon) -> None:
    seen: dict[str, Any] = {}

    @with_request_context
    @with_performance_tracking
    @with_session_lock
    def process_message(session_id: str, message: str, user_id: str = "") -> str:
        seen["request_id"] = RequestContext.get_request_id()
        seen["session_id"] = RequestContext.get_session_id()
        seen["user_id"] = RequestContext.get_user_id()
        seen["locks"] = [info.key for info in get_scalability_manager().client.locks()]
        seen["tags"] = context.current()
        duration = RequestContext.get_request_duration()
        assert duration is not None and duration >= 0
        return message.upper()

    assert process_message("abc", "hi", user_id="u1") == "HI"
    assert seen["session_id"] == "abc" and seen["user_id"] == "u1" and seen["request_id"]
    assert seen["locks"] == ["session:abc"]
    assert seen["tags"] == scaled.Tags("abc", "u1")  # sent to the daemon with every request inside
    assert get_scalability_manager().client.locks() == []
    assert RequestContext.get_request_id() is None and RequestContext.get_request_duration() is None
    assert get_scalability_manager().monitor.stats()["total_requests"] == 1


def test_contexts_never_leak_between_threads_or_tasks() -> None:
    threads_n = 100
    barrier = threading.Barrier(threads_n)
    leaks: list[str] = []

    def request(n: int) -> None:
        with RequestContext.create(session_id=f"s{n}", user_id=f"u{n}") as info:
            barrier.wait()  # every thread is inside its own context at once
            get_scalability_manager().cache_get(f"k{n}")
            if (RequestContext.get_session_id(), RequestContext.get_user_id()) != (f"s{n}", f"u{n}"):
                leaks.append(f"thread {n}")
            if RequestContext.get_request_id() != info.request_id:
                leaks.append(f"thread {n} request_id")
        if RequestContext.get_context() is not None:
            leaks.append(f"thread {n} after")

    threads = [threading.Thread(target=request, args=(n,)) for n in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert leaks == []

    async def task(n: int, gate: asyncio.Event) -> str:
        with RequestContext.create(session_id=f"t{n}"):
            await gate.wait()
            await asyncio.sleep(0)
            return RequestContext.get_session_id() or ""

    async def main() -> list[str]:
        gate = asyncio.Event()
        running = [asyncio.ensure_future(task(n, gate)) for n in range(200)]
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(*running)

    assert asyncio.run(main()) == [f"t{n}" for n in range(200)]
    assert RequestContext.get_session_id() is None
