"""The original architecture's ``scalability_manager`` API, backed by the ``scaled`` daemon.

An app written against the original document moves here by changing one import::

    from services.scalability_manager import get_scalability_manager, RequestContext   # before
    from scaled.compat import get_scalability_manager, RequestContext                  # after

and finds the daemon at ``$SCALED_SOCKET`` (default ``/run/scaled/scaled.sock``). The names, arguments,
settings (``CACHE_TTL``, ``LOCK_TIMEOUT``, ``LOCK_RETRY_DELAY``, ``LOCK_MAX_RETRIES``, ...) and the
``get_stats()`` shape are the original's. What changes is where the state lives, and with it what is safe:

- **The cache is the daemon's, one for every process on the host.** The original kept an LRU per process,
  so a worker read its own stale copy of a session that another worker had changed, and updates were lost
  across processes. Here ``cache_get`` always reads the value the last writer stored.
- **Session locks are the daemon's**: one holder per session across every process, waiters served in
  order, released the moment the holding process dies. The original fell back to a process-local lock
  (no exclusion at all across processes) whenever Redis was slow or down.
- **Writes under a session lock are fenced.** ``cache_set`` and ``cache_invalidate`` inside
  ``acquire_session_lock`` are made only while that lock's grant is the newest; a holder whose lease ran
  out gets :class:`~scaled.errors.FencedError` instead of overwriting the next holder's state.
- **Values are JSON.** The original cached Python objects by reference; here ``cache_set`` stores JSON and
  ``cache_get`` returns a fresh copy, so a caller mutating what it read changes nothing shared.

Nothing here touches a socket: it is a layer over :class:`scaled.Client`.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar, cast

from . import context
from .client import Client, Lock
from .errors import LockedError, LockTimeoutError
from .protocol import DEFAULT_SOCKET

logger = logging.getLogger("scaled.compat")

F = TypeVar("F", bound=Callable[..., Any])

__all__ = [
    "PerformanceMonitor",
    "RequestContext",
    "ScalabilityManager",
    "SessionLockedError",
    "get_scalability_manager",
    "reset_scalability_manager",
    "with_performance_tracking",
    "with_request_context",
    "with_session_lock",
]


# ---------------------------------------------------------------------------------------------------
# Request context


@dataclass(frozen=True)
class RequestInfo:
    """One request's context, as the original keeps it."""

    #: A fresh UUID for the request, for the app's logs and responses.
    request_id: str
    #: The session the request belongs to; sent to the daemon with every request made in the context.
    session_id: Optional[str]
    #: The user it is made for; sent to the daemon likewise.
    user_id: Optional[str]
    #: Wall-clock start, as the original records it.
    start_time: float = field(default_factory=time.time)
    #: Monotonic start, so the duration does not jump with the wall clock.
    started: float = field(default_factory=time.perf_counter)


_request: contextvars.ContextVar[Optional[RequestInfo]] = contextvars.ContextVar(
    "scaled_compat_request", default=None
)


class RequestContext:
    """Per-request context on :mod:`contextvars`: each thread and each asyncio task sees only its own,
    and leaving :meth:`create`'s block restores what was there before (``None`` outside any)."""

    @staticmethod
    @contextmanager
    def create(session_id: Optional[str] = None, user_id: Optional[str] = None) -> Iterator[RequestInfo]:
        """A new request context with a fresh ``request_id``. Every daemon request made inside it carries
        ``session_id`` and ``user_id``, so they appear in the daemon's log lines for it."""
        info = RequestInfo(str(uuid.uuid4()), session_id, user_id)
        token = _request.set(info)
        try:
            with context.tagged(session_id=session_id, user_id=user_id):
                yield info
        finally:
            _request.reset(token)

    @staticmethod
    def get_context() -> Optional[RequestInfo]:
        """The current request's context, or ``None``."""
        return _request.get()

    @staticmethod
    def get_request_id() -> Optional[str]:
        """The current request's id, or ``None`` outside a context."""
        info = _request.get()
        return info.request_id if info else None

    @staticmethod
    def get_session_id() -> Optional[str]:
        """The current request's session id, or ``None``."""
        info = _request.get()
        return info.session_id if info else None

    @staticmethod
    def get_user_id() -> Optional[str]:
        """The current request's user id, or ``None``."""
        info = _request.get()
        return info.user_id if info else None

    @staticmethod
    def get_request_duration() -> Optional[float]:
        """Seconds since the current request's context was created, or ``None`` outside one."""
        info = _request.get()
        return time.perf_counter() - info.started if info else None


# ---------------------------------------------------------------------------------------------------
# Performance monitor


class PerformanceMonitor:
    """The app's own request times over a sliding window, fed by ``@with_performance_tracking``: this
    process's requests, as in the original. At most ``max_samples`` are kept, so memory stays bounded
    under any load (the oldest are dropped first). The daemon's own figures are in ``get_stats()["daemon"]``.
    """

    def __init__(self, window_seconds: float = 60.0, max_samples: int = 100_000) -> None:
        #: Seconds of history the figures cover.
        self.window = window_seconds
        #: (monotonic time, duration) pairs, oldest first, bounded by ``max_samples``.
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._lock = threading.Lock()
        #: When the monitor started, so rates are not divided by a window longer than its life.
        self._started = time.monotonic()

    def record(self, duration: float) -> None:
        """Records one request that took ``duration`` seconds."""
        with self._lock:
            self._samples.append((time.monotonic(), duration))

    def stats(self) -> dict[str, Any]:
        """``requests_per_second``, ``avg_response_time``, ``p95_response_time``, ``p99_response_time``
        (seconds) and ``total_requests`` over the window, as the original reports them."""
        now = time.monotonic()
        with self._lock:
            cutoff = now - self.window
            while self._samples and self._samples[0][0] < cutoff:
                self._samples.popleft()
            durations = sorted(d for _, d in self._samples)
        n = len(durations)
        window = min(self.window, max(1.0, now - self._started))

        def pick(q: float) -> float:
            return round(durations[min(n - 1, int(n * q))], 4) if n else 0.0

        return {
            "requests_per_second": round(n / window, 2),
            "avg_response_time": round(sum(durations) / n, 4) if n else 0.0,
            "p95_response_time": pick(0.95),
            "p99_response_time": pick(0.99),
            "total_requests": n,
        }


# ---------------------------------------------------------------------------------------------------
# The manager


class SessionLockedError(RuntimeError):
    """A non-blocking ``acquire_session_lock`` found the session locked: the original raises
    ``RuntimeError``, and this is one."""


def _env_number(name: str, kind: Callable[[str], Any]) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


#: The locks held in the current thread or task, innermost last: writes inside are fenced by the last.
_held: contextvars.ContextVar[tuple[Lock, ...]] = contextvars.ContextVar("scaled_compat_held", default=())


class ScalabilityManager:
    """The original ``ScalabilityManager`` surface over one :class:`scaled.Client`.

    The original's arguments are accepted with their meanings where the daemon lets a client choose:

    - ``cache_ttl``: the TTL of ``cache_set`` without one (env ``CACHE_TTL``; else the daemon's).
    - ``lock_timeout``: the lease of a session lock (env ``LOCK_TIMEOUT``; else the daemon's).
    - ``lock_retry_delay`` × ``lock_max_retries``: how long ``acquire_session_lock`` waits (env
      ``LOCK_RETRY_DELAY``, ``LOCK_MAX_RETRIES``; else the daemon's). The daemon queues the waiter and
      grants in order instead of retrying, so there is no retry delay in the wait itself.
    - ``redis_url``, ``cache_size``, ``max_redis_connections``: the daemon's settings (its ``REDIS_URL``,
      ``CACHE_SIZE``, ``REDIS_MAX_CONNECTIONS``), accepted and ignored here.

    ``socket_path`` (default ``$SCALED_SOCKET``, else ``/run/scaled/scaled.sock``) or ``client`` says
    which daemon to use.
    """

    def __init__(
        self,
        redis_url: Optional[str] = None,
        cache_size: Optional[int] = None,
        cache_ttl: Optional[float] = None,
        lock_timeout: Optional[float] = None,
        max_redis_connections: Optional[int] = None,
        lock_retry_delay: Optional[float] = None,
        lock_max_retries: Optional[int] = None,
        *,
        socket_path: Optional[str] = None,
        client: Optional[Client] = None,
    ) -> None:
        #: The daemon connection every call goes through.
        self.client = client or Client(
            socket_path or os.environ.get("SCALED_SOCKET") or DEFAULT_SOCKET, name="scalability-manager"
        )
        #: TTL in seconds for ``cache_set`` without one; ``None``: the daemon's CACHE_TTL.
        self.cache_ttl: Optional[float] = (
            cache_ttl if cache_ttl is not None else _env_number("CACHE_TTL", float)
        )
        #: Lease of a session lock in seconds; ``None``: the daemon's LOCK_TIMEOUT.
        self.lock_timeout: Optional[float] = (
            lock_timeout if lock_timeout is not None else _env_number("LOCK_TIMEOUT", float)
        )
        #: With ``lock_max_retries``, how long a blocking ``acquire_session_lock`` waits.
        self.lock_retry_delay: Optional[float] = (
            lock_retry_delay if lock_retry_delay is not None else _env_number("LOCK_RETRY_DELAY", float)
        )
        #: See ``lock_retry_delay``.
        self.lock_max_retries: Optional[int] = (
            lock_max_retries if lock_max_retries is not None else _env_number("LOCK_MAX_RETRIES", int)
        )
        #: The app's request times, fed by ``@with_performance_tracking``.
        self.monitor = PerformanceMonitor()

    @property
    def lock_wait(self) -> Optional[float]:
        """Seconds a blocking ``acquire_session_lock`` waits: retry delay × retries, or ``None`` (the daemon's
        default) when neither is set here."""
        if self.lock_retry_delay is None and self.lock_max_retries is None:
            return None
        return (self.lock_retry_delay if self.lock_retry_delay is not None else 0.1) * (
            self.lock_max_retries if self.lock_max_retries is not None else 50
        )

    @staticmethod
    def lock_key(session_id: str) -> str:
        """The daemon lock a session's lock is: ``session:<id>``."""
        return f"session:{session_id}"

    # -- locking -------------------------------------------------------------------------------------

    @contextmanager
    def acquire_session_lock(
        self, session_id: str, blocking: bool = True, timeout: Optional[float] = None
    ) -> Iterator[Lock]:
        """Holds the session's lock for the block: one holder at a time across every thread and process
        on the host, waiters served first come, first served.

        ``blocking=False`` tries once and raises :class:`SessionLockedError` (a ``RuntimeError``, as in
        the original) if the session is locked, even by the caller itself: locks are not re-entrant.
        Blocking waits up to ``timeout`` seconds (default: the manager's lock wait), then raises
        :class:`~scaled.errors.LockTimeoutError` (a ``TimeoutError``, as in the original).

        Unlike the original, there is no fallback to a process-local lock: if the daemon cannot be
        reached the call raises, rather than letting two processes into the same session. Writes made
        with ``cache_set``/``cache_invalidate`` in the block are fenced by this lock, and the lock is
        released at once if this process dies. The block gets the held :class:`scaled.Lock`; its
        ``fence`` can guard writes to other storage too.
        """
        try:
            lock = self.client.lock(
                self.lock_key(session_id),
                ttl=self.lock_timeout,
                wait=timeout if timeout is not None else self.lock_wait,
                blocking=blocking,
            )
        except LockedError as exc:
            if blocking:  # a wait of 0 (asked for, or the daemon's default) found it held: a timeout
                raise LockTimeoutError(exc.message, exc.request_id) from exc
            raise SessionLockedError(f"session {session_id!r} is locked") from exc
        logger.debug(
            "🔒 Acquired session lock | session=%s | request=%s | fence=%s",
            session_id,
            RequestContext.get_request_id(),
            lock.fence,
        )
        token = _held.set((*_held.get(), lock))
        try:
            with lock:
                yield lock
        finally:
            _held.reset(token)

    # -- cache ---------------------------------------------------------------------------------------

    def cache_get(self, key: str) -> Any:
        """The value stored under ``key`` (decoded from JSON, a fresh copy), or ``None``.

        Reads the daemon's value, the one every process shares: under ``acquire_session_lock`` it is
        the value the previous holder wrote, wherever that ran, never a stale per-process copy.
        """
        return self.client.get_json(key)

    def cache_set(self, key: str, value: Any, ttl: Optional[float] = None) -> None:
        """Stores ``value`` (anything JSON can hold; ``TypeError`` otherwise) under ``key`` for ``ttl``
        seconds (default: the manager's ``cache_ttl``). Inside ``acquire_session_lock`` the write is fenced:
        if the lock was lost (its lease ran out and someone else holds it), nothing is written and
        :class:`~scaled.errors.FencedError` is raised."""
        held = _held.get()
        self.client.set_json(
            key, value, ttl=ttl if ttl is not None else self.cache_ttl, fence=held[-1] if held else None
        )

    def cache_invalidate(self, key: str) -> None:
        """Removes ``key`` for every process; fenced like ``cache_set`` inside a session lock."""
        held = _held.get()
        self.client.delete(key, fence=held[-1] if held else None)

    # -- monitoring ----------------------------------------------------------------------------------

    def record_request(self, duration: float) -> None:
        """Records one app request's duration in seconds (``@with_performance_tracking`` calls this)."""
        self.monitor.record(duration)

    def get_stats(self) -> dict[str, Any]:
        """The original's document: ``cache`` (the daemon's shared cache), ``performance`` (this process's
        tracked requests) and ``redis`` (``available``: whether the daemon's Redis backend is reachable),
        plus ``daemon``, the daemon's whole STATS document."""
        daemon = self.client.stats()
        cache = daemon.get("cache", {})
        return {
            "cache": {k: cache.get(k, 0) for k in ("size", "max_size", "hits", "misses", "hit_rate")},
            "performance": self.monitor.stats(),
            "redis": {"available": bool(daemon.get("redis", {}).get("available", False))},
            "daemon": daemon,
        }

    def close(self) -> None:
        """Closes the connection to the daemon."""
        self.client.close()


_manager: Optional[ScalabilityManager] = None
_manager_guard = threading.Lock()


def get_scalability_manager(**kwargs: Any) -> ScalabilityManager:
    """The process's shared manager, made on first call with ``kwargs`` (the original's settings, plus
    ``socket_path`` or ``client``); later calls return it and ignore their arguments, as in the original.
    Safe to call from many threads at once, and after ``fork()`` (the child opens its own connection)."""
    global _manager
    if _manager is None:
        with _manager_guard:
            if _manager is None:
                _manager = ScalabilityManager(**kwargs)
    return _manager


def reset_scalability_manager() -> None:
    """Closes the shared manager; the next ``get_scalability_manager()`` makes a new one (for tests, or
    to pick up changed settings)."""
    global _manager
    with _manager_guard:
        manager, _manager = _manager, None
    if manager is not None:
        manager.close()


# ---------------------------------------------------------------------------------------------------
# Decorators


def _session_id_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Optional[str]:
    """The session a decorated call is for: its ``session_id`` keyword, else its first argument."""
    session_id = kwargs.get("session_id", args[0] if args else None)
    return None if session_id is None else str(session_id)


def with_request_context(func: F) -> F:
    """Runs each call in a fresh :meth:`RequestContext.create`, with the call's ``session_id`` (keyword, or
    first argument) and ``user_id`` (keyword)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with RequestContext.create(session_id=_session_id_of(args, kwargs), user_id=kwargs.get("user_id")):
            return func(*args, **kwargs)

    return cast(F, wrapper)


def with_performance_tracking(func: F) -> F:
    """Records each call's duration in the shared manager's monitor (``get_stats()["performance"]``)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            duration = time.perf_counter() - start
            get_scalability_manager().record_request(duration)
            logger.debug(
                "⏱️ Request completed | request_id=%s | duration=%.3fs",
                RequestContext.get_request_id(),
                duration,
            )

    return cast(F, wrapper)


def with_session_lock(func: F) -> F:
    """Holds the call's session lock (``session_id`` keyword, or first argument) for the whole call, with
    :meth:`ScalabilityManager.acquire_session_lock`'s guarantees."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        session_id = _session_id_of(args, kwargs)
        if session_id is None:
            raise TypeError(f"{func.__qualname__} needs a session_id to lock")
        lock: AbstractContextManager[Lock] = get_scalability_manager().acquire_session_lock(session_id)
        with lock:
            return func(*args, **kwargs)

    return cast(F, wrapper)
