"""No caller is ever handed another caller's answer, and no request context leaks between threads or
asyncio tasks: many callers share one connection, each checks every answer it gets."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import scaled
import scaled.aio
from scaled import context

from conftest import Daemon

THREADS = 500
REQUESTS_PER_THREAD = 200  # 500 × 200 = 100 000 requests


def test_500_threads_make_100000_requests_on_one_client_with_no_answer_misdelivered(
    client: scaled.Client,
) -> None:
    client.connect()
    start = threading.Barrier(THREADS)
    outcomes: Counter[str] = Counter()
    guard = threading.Lock()

    def caller(n: int) -> None:
        mine: Counter[str] = Counter()
        key = f"iso:{n}"
        with scaled.tagged(session_id=f"session-{n}", user_id=f"user-{n}"):
            start.wait()
            for i in range(REQUESTS_PER_THREAD // 2):
                value = f"{n}:{i}".encode()
                try:
                    # Every answer is checked: a SET answered with someone's GET value is a ProtocolError,
                    # and a GET answered with another key's value has another caller's number in it.
                    client.set(key, value)
                    got = client.get(key)
                    mine["right" if got == value else "wrong"] += 2
                except scaled.ProtocolError:
                    mine["wrong"] += 1
                tags = context.current()
                if tags is None or (tags.session_id, tags.user_id) != (f"session-{n}", f"user-{n}"):
                    mine["context leaked"] += 1
        with guard:
            outcomes.update(mine)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
        assert not t.is_alive(), "a caller never finished"
    assert outcomes == Counter(right=THREADS * REQUESTS_PER_THREAD), outcomes
    assert context.current() is None
    # All of it went over the one connection the client opened.
    assert client.stats()["connections"]["current"] == 1


def test_asyncio_tasks_on_one_client_get_their_own_answers_and_contexts(daemon: Daemon) -> None:
    tasks, per_task = 500, 40

    async def main() -> Counter[str]:
        outcomes: Counter[str] = Counter()
        async with scaled.aio.Client(daemon.socket_path) as client:
            await client.connect()

            async def caller(n: int) -> None:
                with scaled.tagged(session_id=f"session-{n}"):
                    for i in range(per_task // 2):
                        value = f"{n}:{i}".encode()
                        await client.set(f"iso:{n}", value)
                        got = await client.get(f"iso:{n}")
                        outcomes["right" if got == value else "wrong"] += 2
                        tags = context.current()
                        if tags is None or tags.session_id != f"session-{n}":
                            outcomes["context leaked"] += 1

            await asyncio.gather(*(caller(n) for n in range(tasks)))
            assert context.current() is None
        return outcomes

    assert asyncio.run(main()) == Counter(right=tasks * per_task)
