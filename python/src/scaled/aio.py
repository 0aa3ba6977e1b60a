"""The asyncio client, for ASGI apps: the same surface as :class:`scaled.Client`, with ``await``.

It shares :mod:`scaled.protocol` with the sync client (requests, answers, every command's arguments and
answer), so the two behave alike. One connection per client carries every task's requests; answers are
matched to their task by ``id`` in the connection's ``data_received``, with no extra task per request. A
client belongs to the event loop it first connects on.

A task cancelled while it waits for a LOCK does not leave the lock held: if the grant arrives after the
task has gone, the client gives it back with an UNLOCK.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import weakref
from collections.abc import Generator
from typing import Any, Callable, Optional, TypeVar, Union

from . import context, protocol
from .errors import (
    ConnectError,
    ConnectionLost,
    LockLost,
    ProtocolError,
    RequestTimeout,
    ScaledError,
    ServerError,
)
from .held import HeldLock
from .protocol import Call, Endpoint, FenceLike, Grant, LockInfo, Response, Seconds, ValueLike

T = TypeVar("T")


class _Waiter:
    """A task waiting for its answer."""

    __slots__ = ("abandoned", "future", "lock_key")

    def __init__(self, future: asyncio.Future[Response], lock_key: Optional[str]) -> None:
        #: Resolved with the answer, or failed with ConnectionLost / RequestTimeout.
        self.future = future
        #: For a LOCK, its key, so a grant nobody waits for any more can be given back.
        self.lock_key = lock_key
        #: The task gave up; the entry stays only so a late grant is given back.
        self.abandoned = False


class _Connection(asyncio.Protocol):
    """One connection: frames out through the transport, answers in through ``data_received``."""

    def __init__(self, endpoint: Endpoint, give_back: Callable[[str, str], None]) -> None:
        #: For messages.
        self.endpoint = endpoint
        #: Called with (key, token) for a grant whose task gave up.
        self._give_back = give_back
        #: Set by ``connection_made``.
        self.transport: Optional[asyncio.Transport] = None
        #: Reassembles answers from the bytes as they arrive.
        self._decoder = protocol.FrameDecoder()
        #: Tasks waiting for an answer, by request id.
        self._pending: dict[int, _Waiter] = {}
        #: True once the connection has ended; nothing is sent on it after that.
        self.closed = False
        #: The connection-level error (``id`` 0) the daemon sent before closing, if any.
        self.cause: Optional[ServerError] = None
        #: Why the connection ended, for ConnectionLost's message.
        self.reason = ""
        #: Writers waiting for the transport's buffer to drain (it is over its high-water mark).
        self._drain_waiters: list[asyncio.Future[None]] = []
        #: True between the transport's ``pause_writing`` and ``resume_writing``.
        self._paused = False

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            for body in self._decoder.feed(data):
                self._deliver(protocol.decode_response(body))
        except ProtocolError as exc:
            self.shut(str(exc))

    def eof_received(self) -> Optional[bool]:
        if self._decoder.pending:
            self.reason = (
                self.reason or f"the daemon closed the connection {self._decoder.pending} bytes into a frame"
            )
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Optional[Exception]) -> None:
        reason = self.reason or (
            f"the connection failed: {exc}" if exc else "the daemon closed the connection"
        )
        self.closed = True
        pending, self._pending = self._pending, {}
        cause = f" (the daemon said {self.cause})" if self.cause is not None else ""
        for waiter in pending.values():
            if not waiter.future.done():
                waiter.future.set_exception(
                    ConnectionLost(
                        f"connection to {self.endpoint} ended with the request unanswered: {reason}{cause}",
                        self.cause,
                    )
                )
        self._wake_writers()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_writers()

    # -- used by the client ------------------------------------------------------------------------

    def send(self, request_id: int, frame: bytes, waiter: _Waiter) -> bool:
        """Registers ``waiter`` and writes ``frame``; False (nothing sent) if the connection has ended."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        self._pending[request_id] = waiter
        self.transport.write(frame)
        return True

    async def drain(self) -> None:
        """Waits while the transport holds more unsent bytes than its high-water mark."""
        if self._paused and not self.closed:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def abandon(self, request_id: int, waiter: _Waiter) -> bool:
        """The task gives up. False when its answer has already been delivered."""
        if self._pending.get(request_id) is not waiter:
            return False
        if waiter.lock_key is not None:
            waiter.abandoned = True
        else:
            del self._pending[request_id]
        return True

    def shut(self, reason: str) -> None:
        """Ends the connection; ``connection_lost`` then fails the tasks still waiting."""
        self.reason = self.reason or reason
        if self.transport is not None:
            self.transport.abort()

    def _deliver(self, response: Response) -> None:
        if response.id == 0 and response.error is not None:
            self.cause = response.error  # connection-level; the daemon closes next
            return
        waiter = self._pending.pop(response.id, None)
        if waiter is None:
            return  # the answer to a call that timed out
        if waiter.abandoned:
            if response.error is None and waiter.lock_key is not None and isinstance(response.ok, dict):
                token = response.ok.get("token")
                if isinstance(token, str):
                    self._give_back(waiter.lock_key, token)
            return
        if not waiter.future.done():
            waiter.future.set_result(response)

    def _wake_writers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class Client:
    """An asyncio connection to the daemon, shared by any number of tasks.

    The arguments are those of :class:`scaled.Client`. It connects on the first call (or on
    :meth:`connect`); close it with :meth:`aclose` or ``async with``.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike[str], None] = None,
        *,
        tcp: Union[str, tuple[str, int], None] = None,
        name: str = "scaled-py-aio",
        token: Optional[str] = None,
        connect_timeout: float = 5.0,
        timeout: Optional[float] = 10.0,
    ) -> None:
        #: Where the daemon is.
        self.endpoint = protocol.endpoint(None if path is None else os.fspath(path), tcp)
        #: Sent in HELLO, for the daemon's logs and LOCKS.
        self.name = name
        #: Sent in HELLO as ``token``: the shared secret the daemon's TCP listener requires. A missing or
        #: wrong one fails the connect with :class:`scaled.DeniedError`.
        self.token = token
        #: Seconds to connect and be answered HELLO.
        self.connect_timeout = connect_timeout
        #: Seconds to wait for an answer beyond what the request itself may take; ``None``: no limit.
        self.timeout = timeout
        #: HELLO's answer on the current connection, once connected.
        self.server_info: dict[str, Any] = {}
        #: Answers that carried ``degraded: true``.
        self.degraded_answers = 0
        #: The current connection, if one has been opened.
        self._conn: Optional[_Connection] = None
        #: Made on first use, inside the event loop (an asyncio.Lock made outside one binds the wrong
        #: loop on Python 3.9).
        self._connect_lock: Optional[asyncio.Lock] = None
        #: Request ids, unique for the client's life across reconnects.
        self._ids = itertools.count(1)
        #: Set by :meth:`aclose`: no new connection is opened after it.
        self._closed = False
        #: Give-back UNLOCKs in progress, kept so they are not garbage-collected half way.
        self._background: set[asyncio.Task[Any]] = set()

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Client:
        """A client for ``unix:///path/to.sock``, ``tcp://127.0.0.1:7070`` or a bare socket path."""
        where = protocol.endpoint_from_url(url)
        if where.path is not None:
            return cls(where.path, **kwargs)
        return cls(tcp=(where.host or "127.0.0.1", where.port), **kwargs)

    # -- commands (see scaled.Client for what each guarantees) ---------------------------------------

    async def ping(self, delay: Optional[Seconds] = None) -> bool:
        """True when the daemon answers; with ``delay``, it answers only after that long."""
        return await self._run(protocol.ping(delay))

    async def get(self, key: str) -> Optional[bytes]:
        """The value stored under ``key``, or ``None``."""
        return await self._run(protocol.get(key))

    async def set(
        self, key: str, value: ValueLike, ttl: Optional[Seconds] = None, fence: Optional[FenceLike] = None
    ) -> bool:
        """Stores ``value`` under ``key``; ``ttl`` and ``fence`` as for :meth:`scaled.Client.set`."""
        return await self._run(protocol.set(key, value, ttl, fence))

    async def delete(self, key: str, fence: Optional[FenceLike] = None) -> bool:
        """Removes ``key``; True when a live entry was there."""
        return await self._run(protocol.delete(key, fence))

    async def get_json(self, key: str) -> Any:
        """The JSON document stored under ``key``, decoded, or ``None``."""
        return protocol.load_json(await self.get(key))

    async def set_json(
        self, key: str, obj: Any, ttl: Optional[Seconds] = None, fence: Optional[FenceLike] = None
    ) -> bool:
        """Stores ``obj`` as compact UTF-8 JSON; ``TypeError`` for anything JSON cannot hold."""
        return await self.set(key, protocol.dump_json(obj), ttl, fence)

    async def stats(self) -> dict[str, Any]:
        """The daemon's STATS document as nested dicts."""
        return await self._run(protocol.stats())

    def lock(
        self,
        key: str,
        *,
        ttl: Optional[Seconds] = None,
        wait: Optional[Seconds] = None,
        blocking: bool = True,
        auto_renew: bool = False,
    ) -> LockRequest:
        """Takes the lock ``key``: ``lock = await client.lock(key)``, or ``async with client.lock(key) as
        lock:`` to release it at the end of the block. Arguments as for :meth:`scaled.Client.lock`."""
        return LockRequest(self, key, protocol.lock(key, ttl, wait, blocking, auto_renew))

    async def unlock(self, key: str, token: str) -> str:
        """Releases the lock ``key`` held with ``token``; the daemon's status."""
        return await self._run(protocol.unlock(key, token))

    async def extend(self, key: str, token: str, ttl: Optional[Seconds] = None) -> tuple[str, int]:
        """Renews the lease of ``key`` held with ``token``: (status, lease in ms)."""
        return await self._run(protocol.extend(key, token, ttl))

    async def locks(self) -> list[LockInfo]:
        """The locks held now, sorted by key: every page of them, asked for in turn (see
        :meth:`scaled.Client.locks`)."""
        out: list[LockInfo] = []
        after: Optional[str] = None
        while True:
            rows, after = await self._run(protocol.locks_page(after))
            out.extend(rows)
            if after is None:
                return out

    async def execute(self, cmd: str, args: Optional[dict[str, Any]] = None) -> Response:
        """Sends any command and returns the whole answer without raising for an ``err``."""
        return (await self._exchange(Call(cmd, dict(args or {}))))[0]

    # -- connection --------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection is open, as far as the client has seen."""
        return self._conn is not None and not self._conn.closed

    @property
    def in_flight(self) -> int:
        """Requests sent on the current connection and not answered yet."""
        return 0 if self._conn is None else len(self._conn._pending)

    async def connect(self) -> dict[str, Any]:
        """Connects now and returns HELLO's answer."""
        await self._connection()
        return self.server_info

    async def aclose(self) -> None:
        """Closes the connection; tasks waiting fail with ConnectionLost, later calls raise ScaledError."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.shut("the client was closed")

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<scaled.aio.Client {self.endpoint} name={self.name!r}>"

    async def _run(self, call: Call[T]) -> T:
        response, _ = await self._exchange(call)
        return call.parse(response.result())

    async def _exchange(self, call: Call[Any]) -> tuple[Response, _Connection]:
        tags = context.current()
        request_id = next(self._ids)
        frame = protocol.encode_request(
            request_id,
            call.cmd,
            call.args,
            tags.session_id if tags else None,
            tags.user_id if tags else None,
        )
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), call.lock_key)
        for _ in range(3):
            conn = await self._connection()
            if conn.send(request_id, frame, waiter):
                break
        else:
            raise ConnectionLost(
                f"the connection to {self.endpoint} kept closing before the request was sent"
            )
        limit = None if self.timeout is None or call.holds_for is None else self.timeout + call.holds_for
        expiry = (
            None
            if limit is None
            else loop.call_later(limit, self._expire, conn, request_id, waiter, call.cmd, limit)
        )
        try:
            await conn.drain()
            response = await waiter.future
        except asyncio.CancelledError:
            conn.abandon(request_id, waiter)
            raise
        finally:
            if expiry is not None:
                expiry.cancel()
        if response.degraded:
            self.degraded_answers += 1
        return response, conn

    def _expire(self, conn: _Connection, request_id: int, waiter: _Waiter, cmd: str, limit: float) -> None:
        if conn.abandon(request_id, waiter) and not waiter.future.done():
            waiter.future.set_exception(
                RequestTimeout(f"{cmd} was not answered within {limit:.3f} s by {self.endpoint}")
            )

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            conn = self._conn
            if conn is not None and not conn.closed:
                return conn
            if self._closed:
                raise ScaledError("the client is closed")
            conn = await self._open()
            self._conn = conn
            return conn

    async def _open(self) -> _Connection:
        where = self.endpoint
        loop = asyncio.get_running_loop()
        conn = _Connection(where, _give_back_via(weakref.ref(self)))
        try:
            if where.path is not None:
                opening = loop.create_unix_connection(lambda: conn, where.path)
            else:
                opening = loop.create_connection(lambda: conn, where.host or "127.0.0.1", where.port)
            await asyncio.wait_for(opening, self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise ConnectError(f"cannot connect to the scaled daemon at {where}: {exc!r}") from None
        call = protocol.hello(self.name, self.token)
        request_id = next(self._ids)
        waiter = _Waiter(loop.create_future(), None)
        if not conn.send(request_id, protocol.encode_request(request_id, call.cmd, call.args), waiter):
            if conn.cause is not None:
                raise conn.cause  # OVERLOADED: the daemon is at its connection limit
            raise ConnectError(f"the daemon at {where} closed the connection at once: {conn.reason}")
        try:
            response = await asyncio.wait_for(waiter.future, self.connect_timeout)
        except asyncio.TimeoutError:
            conn.shut("no answer to HELLO")
            raise ConnectError(
                f"the daemon at {where} did not answer HELLO within {self.connect_timeout} s"
            ) from None
        except ConnectionLost as lost:
            if lost.cause is not None:
                raise lost.cause from None  # OVERLOADED: the daemon is at its connection limit
            raise ConnectError(f"the daemon at {where} closed the connection during HELLO: {lost}") from None
        try:
            self.server_info = call.parse(response.result())
        except ScaledError:
            conn.shut("HELLO refused")
            raise
        return conn

    def _give_back(self, key: str, token: str) -> None:
        async def release() -> None:
            # If the connection ended meanwhile, the daemon released the lock with it.
            with contextlib.suppress(ScaledError):
                await self.unlock(key, token)

        task = asyncio.get_running_loop().create_task(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _give_back_via(client: weakref.ref[Client]) -> Callable[[str, str], None]:
    """The connection's callback for late grants, holding the client weakly."""

    def give_back(key: str, token: str) -> None:
        target = client()
        if target is not None:
            target._give_back(key, token)

    return give_back


class LockRequest:
    """What :meth:`Client.lock` returns: ``await`` it for the held lock, or ``async with`` it."""

    def __init__(self, client: Client, key: str, call: Call[Grant]) -> None:
        #: The client to take the lock through.
        self._client = client
        #: The lock's key.
        self._key = key
        #: The LOCK request, built when ``lock()`` was called so bad arguments fail at once.
        self._call = call
        #: The held lock, once ``async with`` has taken it.
        self._lock: Optional[AsyncLock] = None

    async def _acquire(self) -> AsyncLock:
        response, conn = await self._client._exchange(self._call)
        return AsyncLock(
            self._client, self._key, self._call.parse(response.result()), conn, response.degraded
        )

    def __await__(self) -> Generator[Any, None, AsyncLock]:
        return self._acquire().__await__()

    async def __aenter__(self) -> AsyncLock:
        self._lock = await self._acquire()
        return self._lock

    async def __aexit__(self, exc_type: Optional[type[BaseException]], exc: object, tb: object) -> None:
        if self._lock is not None:
            await self._lock.__aexit__(exc_type, exc, tb)


class AsyncLock(HeldLock["Client", "_Connection"]):
    """A held session lock on the asyncio client; ``async with`` releases it. See :class:`scaled.Lock`."""

    async def extend(self, ttl: Optional[Seconds] = None) -> int:
        """Renews the lease; returns it in ms. Raises :class:`~scaled.errors.LockLost` if no longer held."""
        if self._conn.closed:
            raise LockLost(self._key, "CONNECTION_LOST")
        status, ttl_ms = await self._client.extend(self._key, self.grant.token, ttl)
        if status != protocol.STATUS_OK:
            raise LockLost(self._key, status)
        return ttl_ms

    async def release(self) -> None:
        """Releases the lock; :class:`~scaled.errors.LockLost` if it was no longer held. Idempotent."""
        if self._released:
            return
        self._released = True
        if self._conn.closed:
            raise LockLost(self._key, "CONNECTION_LOST")
        status = await self._client.unlock(self._key, self.grant.token)
        if status != protocol.STATUS_OK:
            raise LockLost(self._key, status)

    async def __aenter__(self) -> AsyncLock:
        return self

    async def __aexit__(self, exc_type: Optional[type[BaseException]], exc: object, tb: object) -> None:
        if exc_type is None:
            await self.release()
            return
        with contextlib.suppress(ScaledError):
            await self.release()

    def __repr__(self) -> str:
        return f"<scaled.aio.AsyncLock {self._key!r} fence={self.grant.fence} held={self.held}>"
