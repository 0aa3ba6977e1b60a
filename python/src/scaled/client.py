"""The sync client: one connection to the daemon shared by any number of threads.

How a call travels: the calling thread encodes its request (:mod:`scaled.protocol`), registers itself
under the request's ``id``, and writes the frame; a reader thread, one per connection, reads every answer
and wakes the thread registered under its ``id``. So a thousand request threads need one socket, a slow
request (a LOCK waiting its turn) never holds up the fast ones, and no thread can be handed another's
answer: answers are matched by ``id`` alone, and ids are unique for the client's life.

When the connection ends, every call in flight on it fails with :class:`~scaled.errors.ConnectionLost`
and is never retried (the daemon may or may not have carried it out); the next call opens a new
connection and says HELLO again. After ``fork()`` the child drops the parent's connection without
touching it and opens its own, so a client made before gunicorn forks its workers is safe to use in them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
import weakref
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
from .protocol import Call, Endpoint, FenceLike, LockInfo, Response, Seconds, ValueLike

T = TypeVar("T")

#: Bytes asked of the socket per read; answers are small, so one read usually holds many.
_READ_SIZE = 256 * 1024


class _Waiter:
    """A caller waiting for its answer. ``done`` is held until the answer (or the connection's end) comes."""

    __slots__ = ("abandoned", "done", "lock_key", "lost", "response")

    def __init__(self, lock_key: Optional[str]) -> None:
        #: Released by the reader when ``response`` or ``lost`` is set; a lock is the cheapest one-shot
        #: signal between threads in CPython.
        self.done = threading.Lock()
        self.done.acquire()
        #: The answer.
        self.response: Optional[Response] = None
        #: Set instead of ``response`` when the connection ended first.
        self.lost: Optional[ConnectionLost] = None
        #: For a LOCK, its key, so a grant nobody waits for any more can be given back.
        self.lock_key = lock_key
        #: The caller gave up (timeout); the entry stays only so a late grant is given back.
        self.abandoned = False


class _Connection:
    """One socket to the daemon, its reader thread, and the callers waiting on it."""

    def __init__(
        self, sock: socket.socket, endpoint: Endpoint, give_back: Callable[[str, str], None]
    ) -> None:
        #: The socket, written by callers (one at a time) and read by the reader thread alone.
        self.sock = sock
        #: For messages.
        self.endpoint = endpoint
        #: Called by the reader with (key, token) for a grant whose caller gave up.
        self._give_back = give_back
        #: Callers waiting for an answer, by request id. Guarded by ``_guard``.
        self._pending: dict[int, _Waiter] = {}
        #: Guards ``_pending`` and ``closed``, so no caller can register after the reader has failed
        #: everyone and left.
        self._guard = threading.Lock()
        #: True once the connection has ended; no request is sent on it after that.
        self.closed = False
        #: Frames written by callers that have not reached the socket yet. The thread that takes
        #: ``_write_lock`` sends all of them in one write, so threads arriving together share a syscall.
        self._outbox: list[bytes] = []
        #: Guards ``_outbox`` alone, held only to append or to take the whole list.
        self._outbox_lock = threading.Lock()
        #: Held while writing to the socket, so frames never interleave.
        self._write_lock = threading.Lock()
        #: The connection-level error (``id`` 0) the daemon sent before closing, if any.
        self.cause: Optional[ServerError] = None
        #: Why the connection ended, for :class:`ConnectionLost`'s message.
        self.reason = ""
        #: Reads every answer and wakes its caller; a daemon thread, so it never keeps the process alive.
        self._reader = threading.Thread(target=self._read_loop, name=f"scaled-reader {endpoint}", daemon=True)
        self._reader.start()

    def send(self, request_id: int, frame: bytes, waiter: _Waiter) -> bool:
        """Registers ``waiter`` and writes ``frame``. False (nothing sent) if the connection has ended."""
        with self._guard:
            if self.closed:
                return False
            self._pending[request_id] = waiter
        with self._outbox_lock:
            self._outbox.append(frame)
        with self._write_lock:
            with self._outbox_lock:
                batch, self._outbox = self._outbox, []
            if batch:
                try:
                    self.sock.sendall(batch[0] if len(batch) == 1 else b"".join(batch))
                except OSError as exc:
                    # The reader sees the end too and fails every caller, this one included.
                    self.shut(f"writing to the daemon failed: {exc}")
        return True

    def waiting(self) -> int:
        """Callers waiting for an answer now (including abandoned LOCKs whose grant may still come)."""
        with self._guard:
            return len(self._pending)

    def abandon(self, request_id: int, waiter: _Waiter) -> bool:
        """The caller gives up waiting. False when its answer is already being delivered (take it)."""
        with self._guard:
            if self._pending.get(request_id) is not waiter:
                return False
            if waiter.lock_key is not None:
                waiter.abandoned = True
            else:
                del self._pending[request_id]
            return True

    def shut(self, reason: str) -> None:
        """Ends the connection: the reader wakes, fails the callers still waiting, and closes the socket."""
        if not self.reason:
            self.reason = reason
        with contextlib.suppress(OSError):  # already shut
            self.sock.shutdown(socket.SHUT_RDWR)

    def _read_loop(self) -> None:
        decoder = protocol.FrameDecoder()
        reason = "the daemon closed the connection"
        try:
            while True:
                data = self.sock.recv(_READ_SIZE)
                if not data:
                    if decoder.pending:
                        reason = f"the daemon closed the connection {decoder.pending} bytes into a frame"
                    break
                for body in decoder.feed(data):
                    self._deliver(protocol.decode_response(body))
        except OSError as exc:
            reason = f"the connection failed: {exc}"
        except ProtocolError as exc:
            reason = str(exc)
        finally:
            self._finish(self.reason or reason)

    def _deliver(self, response: Response) -> None:
        if response.id == 0 and response.error is not None:
            # A connection-level error (OVERLOADED at the connection limit, FRAME_TOO_LARGE, MALFORMED at
            # the end of the stream); the daemon closes next, and the callers learn it from ConnectionLost.
            self.cause = response.error
            return
        with self._guard:
            waiter = self._pending.pop(response.id, None)
        if waiter is None:
            return  # the answer to a call that timed out
        if waiter.abandoned:
            if response.error is None and waiter.lock_key is not None and isinstance(response.ok, dict):
                token = response.ok.get("token")
                if isinstance(token, str):
                    self._give_back(waiter.lock_key, token)
            return
        waiter.response = response
        waiter.done.release()

    def _finish(self, reason: str) -> None:
        with self._guard:
            self.closed = True
            pending, self._pending = self._pending, {}
        cause = f" (the daemon said {self.cause})" if self.cause is not None else ""
        for waiter in pending.values():
            if waiter.abandoned:
                continue
            waiter.lost = ConnectionLost(
                f"connection to {self.endpoint} ended with the request unanswered: {reason}{cause}",
                self.cause,
            )
            waiter.done.release()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        # Closed under the write lock, so no caller is inside sendall on a descriptor number that the
        # system could hand to another socket once closed.
        with self._write_lock:
            self.sock.close()


class _Slot:
    """The client's current connection, held apart from the client so that a finalizer can close it."""

    __slots__ = ("conn",)

    def __init__(self) -> None:
        self.conn: Optional[_Connection] = None

    def close(self, reason: str = "the client was closed") -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.shut(reason)


#: Every open client, so that a forked child can drop the connections it inherited.
_clients: weakref.WeakSet[Client] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(_clients):
        client._forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _give_back_via(client: weakref.ref[Client]) -> Callable[[str, str], None]:
    """The connection's callback for late grants. It holds the client weakly, so that a client nobody
    uses any more can be collected (and its connection closed) while the reader thread still runs."""

    def give_back(key: str, token: str) -> None:
        target = client()
        if target is not None:
            target._give_back(key, token)

    return give_back


class Client:
    """A connection to the daemon, shared by any number of threads.

    ``Client()`` finds the daemon at ``$SCALED_SOCKET`` (default ``/run/scaled/scaled.sock``); give a
    socket ``path``, or ``tcp="127.0.0.1:7070"``, to choose. It connects on the first call (or on
    :meth:`connect`), says HELLO, and reconnects on the next call after the connection ends. Over TCP
    the daemon requires ``token``, a line of its ``--auth-token-file``; a wrong or missing one raises
    :class:`scaled.DeniedError`.

    ``connect_timeout`` bounds connecting and HELLO; ``timeout`` bounds the wait for each answer (plus a
    LOCK's ``wait`` or a PING's ``delay``); ``None`` waits as long as it takes. Requests made inside
    :func:`scaled.tagged` carry its session and user ids to the daemon's logs.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike[str], None] = None,
        *,
        tcp: Union[str, tuple[str, int], None] = None,
        name: str = "scaled-py",
        token: Optional[str] = None,
        connect_timeout: float = 5.0,
        timeout: Optional[float] = 10.0,
    ) -> None:
        #: Where the daemon is.
        self.endpoint = protocol.endpoint(None if path is None else os.fspath(path), tcp)
        #: Sent in HELLO, so the daemon's logs and LOCKS can say whose connection this is.
        self.name = name
        #: Sent in HELLO as ``token``: the shared secret the daemon's TCP listener requires. A missing or
        #: wrong one fails the connect with :class:`scaled.DeniedError`.
        self.token = token
        #: Seconds to connect and be answered HELLO.
        self.connect_timeout = connect_timeout
        #: Seconds to wait for an answer beyond what the request itself may take; ``None``: no limit.
        self.timeout = timeout
        #: HELLO's answer on the current connection (``server``, ``max_frame``, ...), once connected.
        self.server_info: dict[str, Any] = {}
        #: Answers that carried ``degraded: true`` (served from a fallback, such as while Redis is down).
        self.degraded_answers = 0
        #: The current connection, in a holder a finalizer can close without keeping the client alive.
        self._slot = _Slot()
        #: Held while connecting, so that callers finding the connection gone open only one new one.
        self._connect_lock = threading.Lock()
        #: Request ids, unique for the client's life across reconnects (``next`` on a count is atomic).
        self._ids = itertools.count(1)
        #: Set by :meth:`close`: no new connection is opened after it.
        self._closed = False
        _clients.add(self)
        weakref.finalize(self, self._slot.close, "the client was garbage-collected")

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Client:
        """A client for ``unix:///path/to.sock``, ``tcp://127.0.0.1:7070`` or a bare socket path."""
        where = protocol.endpoint_from_url(url)
        if where.path is not None:
            return cls(where.path, **kwargs)
        return cls(tcp=(where.host or "127.0.0.1", where.port), **kwargs)

    # -- commands ----------------------------------------------------------------------------------

    def ping(self, delay: Optional[Seconds] = None) -> bool:
        """True when the daemon answers; with ``delay``, it answers only after that long."""
        return self._run(protocol.ping(delay))

    def get(self, key: str) -> Optional[bytes]:
        """The value stored under ``key``, or ``None``. Every process on the host sees the same value."""
        return self._run(protocol.get(key))

    def set(
        self, key: str, value: ValueLike, ttl: Optional[Seconds] = None, fence: Optional[FenceLike] = None
    ) -> bool:
        """Stores ``value`` (bytes; a str is stored as UTF-8) under ``key``. ``ttl`` in seconds: ``None``
        takes the daemon's CACHE_TTL, 0 never expires. With ``fence`` (a held :class:`Lock`, or a
        :class:`~scaled.protocol.Fence`), the write is made only while that grant is the lock's newest,
        and raises :class:`~scaled.errors.FencedError` otherwise, so a holder whose lease ran out cannot
        overwrite the next holder's state."""
        return self._run(protocol.set(key, value, ttl, fence))

    def delete(self, key: str, fence: Optional[FenceLike] = None) -> bool:
        """Removes ``key``; True when a live entry was there. ``fence`` as for :meth:`set`."""
        return self._run(protocol.delete(key, fence))

    def get_json(self, key: str) -> Any:
        """The JSON document :meth:`set_json` stored under ``key``, decoded, or ``None`` if there is none."""
        return protocol.load_json(self.get(key))

    def set_json(
        self, key: str, obj: Any, ttl: Optional[Seconds] = None, fence: Optional[FenceLike] = None
    ) -> bool:
        """Stores ``obj`` (dicts, lists, str, numbers, bools, None) as compact UTF-8 JSON; ``TypeError``
        for anything JSON cannot hold. Reading it back gives an equal object, never the same one."""
        return self.set(key, protocol.dump_json(obj), ttl, fence)

    def stats(self) -> dict[str, Any]:
        """The daemon's STATS document (cache, performance, locks, connections) as nested dicts."""
        return self._run(protocol.stats())

    def lock(
        self,
        key: str,
        *,
        ttl: Optional[Seconds] = None,
        wait: Optional[Seconds] = None,
        blocking: bool = True,
        auto_renew: bool = False,
    ) -> Lock:
        """Takes the lock ``key`` and returns it held; use it as a context manager to release it.

        Waiters are served first come, first served, for up to ``wait`` seconds (``None``: the daemon's
        LOCK_RETRY_DELAY × LOCK_MAX_RETRIES), then :class:`~scaled.errors.LockTimeoutError`. With
        ``blocking=False`` it tries once and raises :class:`~scaled.errors.LockedError` if the lock is
        held. ``ttl`` is the lease (``None``: the daemon's LOCK_TIMEOUT); ``auto_renew`` renews it for as
        long as this client's connection is open. The lock is released if this process dies, since its
        connection closes. Locks are not re-entrant. Pass the lock as ``fence=`` to writes made under it.
        """
        call = protocol.lock(key, ttl, wait, blocking, auto_renew)
        response, conn = self._exchange(call)
        return Lock(self, key, call.parse(response.result()), conn, response.degraded)

    def unlock(self, key: str, token: str) -> str:
        """Releases the lock ``key`` held with owner ``token``; the daemon's status, ``"OK"`` when it did."""
        return self._run(protocol.unlock(key, token))

    def extend(self, key: str, token: str, ttl: Optional[Seconds] = None) -> tuple[str, int]:
        """Renews the lease of ``key`` held with ``token``: (status, lease in ms; 0 unless ``"OK"``)."""
        return self._run(protocol.extend(key, token, ttl))

    def locks(self) -> list[LockInfo]:
        """The locks held now, sorted by key: holder, fencing token, age, lease left, waiters. Every
        page of them, asked for in turn: a lock held throughout is listed once; one taken or released
        meanwhile may or may not be."""
        out: list[LockInfo] = []
        after: Optional[str] = None
        while True:
            rows, after = self._run(protocol.locks_page(after))
            out.extend(rows)
            if after is None:
                return out

    def execute(self, cmd: str, args: Optional[dict[str, Any]] = None) -> Response:
        """Sends any command and returns the whole answer (``ok``, ``error``, ``degraded``) without raising
        for an ``err``: for commands this client does not wrap yet."""
        return self._exchange(Call(cmd, dict(args or {})))[0]

    # -- connection --------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection is open (as far as the client has seen: a daemon that has just gone
        away is noticed when its end of the socket closes)."""
        conn = self._slot.conn
        return conn is not None and not conn.closed

    @property
    def in_flight(self) -> int:
        """Requests sent on the current connection and not answered yet."""
        conn = self._slot.conn
        return 0 if conn is None else conn.waiting()

    def connect(self) -> dict[str, Any]:
        """Connects now (calls connect by themselves when needed) and returns HELLO's answer."""
        self._connection()
        return self.server_info

    def close(self) -> None:
        """Closes the connection. Calls in flight fail with ConnectionLost; later calls raise ScaledError."""
        self._closed = True
        self._slot.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<scaled.Client {self.endpoint} name={self.name!r}>"

    def _run(self, call: Call[T]) -> T:
        response, _ = self._exchange(call)
        return call.parse(response.result())

    def _exchange(self, call: Call[Any]) -> tuple[Response, _Connection]:
        tags = context.current()
        request_id = next(self._ids)
        frame = protocol.encode_request(
            request_id,
            call.cmd,
            call.args,
            tags.session_id if tags else None,
            tags.user_id if tags else None,
        )
        waiter = _Waiter(call.lock_key)
        # A connection can end between being looked up and being written to; the request was then not
        # sent, so sending it on the next connection repeats nothing.
        for _ in range(3):
            conn = self._connection()
            if conn.send(request_id, frame, waiter):
                break
        else:
            raise ConnectionLost(
                f"the connection to {self.endpoint} kept closing before the request was sent"
            )
        limit = None if self.timeout is None or call.holds_for is None else self.timeout + call.holds_for
        if not waiter.done.acquire(timeout=-1 if limit is None else limit):
            if conn.abandon(request_id, waiter):
                raise RequestTimeout(f"{call.cmd} was not answered within {limit:.3f} s by {self.endpoint}")
            waiter.done.acquire()  # the answer is being handed over right now
        if waiter.lost is not None:
            raise waiter.lost
        response = waiter.response
        if response is None:  # pragma: no cover - the reader always sets one of the two
            raise ProtocolError("internal: woken without an answer")
        if response.degraded:
            self.degraded_answers += 1
        return response, conn

    def _connection(self) -> _Connection:
        conn = self._slot.conn
        if conn is not None and not conn.closed:
            return conn
        with self._connect_lock:
            conn = self._slot.conn
            if conn is not None and not conn.closed:
                return conn
            if self._closed:
                raise ScaledError("the client is closed")
            conn = self._open()
            self._slot.conn = conn
            return conn

    def _open(self) -> _Connection:
        where = self.endpoint
        try:
            if where.path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(self.connect_timeout)
                    sock.connect(where.path)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((where.host or "127.0.0.1", where.port), self.connect_timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(None)
        except OSError as exc:
            raise ConnectError(f"cannot connect to the scaled daemon at {where}: {exc}") from None
        conn = _Connection(sock, where, _give_back_via(weakref.ref(self)))
        call = protocol.hello(self.name, self.token)
        request_id = next(self._ids)
        waiter = _Waiter(None)
        if not conn.send(request_id, protocol.encode_request(request_id, call.cmd, call.args), waiter):
            # It ended before HELLO could be sent: the daemon refused it at its connection limit.
            if conn.cause is not None:
                raise conn.cause
            raise ConnectError(f"the daemon at {where} closed the connection at once: {conn.reason}")
        if not waiter.done.acquire(timeout=self.connect_timeout):
            conn.shut("no answer to HELLO")
            raise ConnectError(f"the daemon at {where} did not answer HELLO within {self.connect_timeout} s")
        if waiter.lost is not None:
            if waiter.lost.cause is not None:
                raise waiter.lost.cause  # OVERLOADED: the daemon is at its connection limit
            raise ConnectError(f"the daemon at {where} closed the connection during HELLO: {waiter.lost}")
        assert waiter.response is not None
        try:
            self.server_info = call.parse(waiter.response.result())
        except ScaledError:
            conn.shut("HELLO refused")
            raise
        return conn

    def _give_back(self, key: str, token: str) -> None:
        """Releases a grant that arrived after its caller gave up. Runs off the reader thread, which must
        never wait on a write."""

        def release() -> None:
            # If the connection ended meanwhile, the daemon released the lock with it.
            with contextlib.suppress(ScaledError):
                self.unlock(key, token)

        threading.Thread(target=release, name="scaled-give-back", daemon=True).start()

    def _forget_after_fork(self) -> None:
        # Only this thread exists in the child. The inherited socket is the parent's connection too:
        # closing this copy of the descriptor leaves it open for the parent (no shutdown, which would
        # end it for both).
        conn, self._slot.conn = self._slot.conn, None
        self._connect_lock = threading.Lock()
        if conn is not None:
            conn.closed = True
            with contextlib.suppress(OSError):
                conn.sock.close()


class Lock(HeldLock["Client", "_Connection"]):
    """A held session lock, as :meth:`Client.lock` returns it. A context manager that releases it.

    ``fence`` is the fencing token of this grant: pass the lock as ``fence=`` to ``set``/``delete`` (or
    store ``fence`` with data kept elsewhere) so that a write made after the lock was lost is refused.
    """

    def extend(self, ttl: Optional[Seconds] = None) -> int:
        """Renews the lease to ``ttl`` seconds from now (``None``: the length it has); returns it in ms.
        Raises :class:`~scaled.errors.LockLost` if the lock is no longer held by this owner."""
        if self._conn.closed:
            raise LockLost(self._key, "CONNECTION_LOST")
        status, ttl_ms = self._client.extend(self._key, self.grant.token, ttl)
        if status != protocol.STATUS_OK:
            raise LockLost(self._key, status)
        return ttl_ms

    def release(self) -> None:
        """Releases the lock, handing it to the next waiter. Raises :class:`~scaled.errors.LockLost` if it
        was no longer held (its lease ran out, or its connection ended); a second call does nothing."""
        if self._released:
            return
        self._released = True
        if self._conn.closed:
            raise LockLost(self._key, "CONNECTION_LOST")
        status = self._client.unlock(self._key, self.grant.token)
        if status != protocol.STATUS_OK:
            raise LockLost(self._key, status)

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: object, tb: object) -> None:
        if exc_type is None:
            self.release()
            return
        # The block failed: release, but let its exception, not a release problem, be the one raised.
        with contextlib.suppress(ScaledError):
            self.release()

    def __repr__(self) -> str:
        return f"<scaled.Lock {self._key!r} fence={self.grant.fence} held={self.held}>"
