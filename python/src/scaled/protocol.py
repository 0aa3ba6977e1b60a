"""The wire protocol of proto-spec.md, with no I/O: framing, request encoding, response decoding, and
one description of each command (its arguments and how its answer reads) shared by the sync and the
asyncio clients, so the two cannot drift apart.

A frame is a 4-byte big-endian length and a MessagePack map. Requests list their members in the spec's
order and encode every number in its smallest form, so they reproduce the spec's test vectors byte for
byte. Answers are read as maps by member name; members this client does not know are ignored, which is
how the protocol grows (proto-spec.md, "Versioning"). The optional envelope member ``degraded`` (a daemon
answering from a fallback, such as its local state while Redis is unreachable) is surfaced on
:class:`Response`.
"""

from __future__ import annotations

import datetime
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Optional, Protocol, TypeVar, Union

import msgpack

from .errors import FrameTooLargeError, ProtocolError, ServerError, error_from_wire

#: The protocol version this client speaks, sent in HELLO.
PROTOCOL_VERSION = 1
#: Largest frame body either side may send, in bytes (2 MiB).
MAX_FRAME = 2 * 1024 * 1024
#: Largest key, in bytes of UTF-8.
MAX_KEY = 1024
#: Largest cache value, in bytes.
MAX_VALUE = 1024 * 1024
#: Bytes of the length prefix before each frame body.
LEN_PREFIX = 4
#: Where the daemon listens unless told otherwise (``SCALED_SOCKET``), as for ``scalectl``.
DEFAULT_SOCKET = "/run/scaled/scaled.sock"
#: The longest lease or lock wait the daemon accepts, in milliseconds (one day).
MAX_LOCK_MS = 86_400_000

#: The members of ``args`` in the order the spec's tables list them, which is the order requests use.
ARG_ORDER = (
    "version",
    "client",
    "key",
    "value",
    "ttl_ms",
    "wait_ms",
    "try",
    "auto_renew",
    "token",
    "fence",
    "delay_ms",
    "limit",
    "after",
)

_PREFIX = struct.Struct(">I")

T = TypeVar("T")

#: A duration given by a caller: seconds as a number, or a ``timedelta``.
Seconds = Union[float, int, datetime.timedelta]

#: What a cache value may be given as; a ``str`` is stored as its UTF-8 bytes, as the daemon does.
ValueLike = Union[bytes, bytearray, memoryview, str]


# ---------------------------------------------------------------------------------------------------
# Where the daemon is


@dataclass(frozen=True)
class Endpoint:
    """Where the daemon listens: a Unix socket path, or a TCP host and port."""

    #: The Unix socket's path, or ``None`` for TCP.
    path: Optional[str] = None
    #: The TCP host, or ``None`` for a Unix socket.
    host: Optional[str] = None
    #: The TCP port.
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path is not None else f"tcp:{self.host}:{self.port}"


def endpoint(path: Optional[str] = None, tcp: Union[str, tuple[str, int], None] = None) -> Endpoint:
    """The endpoint a client was given: ``path``, or ``tcp`` as ``"HOST:PORT"``, ``"PORT"`` (on
    127.0.0.1) or ``(host, port)``; with neither, ``$SCALED_SOCKET`` or :data:`DEFAULT_SOCKET`."""
    if path is not None and tcp is not None:
        raise ValueError("give a socket path or a TCP address, not both")
    if tcp is None:
        return Endpoint(
            path=os.fspath(path) if path is not None else os.environ.get("SCALED_SOCKET") or DEFAULT_SOCKET
        )
    if isinstance(tcp, tuple):
        return Endpoint(host=tcp[0], port=int(tcp[1]))
    host, _, port = tcp.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"a TCP address is HOST:PORT or PORT, got {tcp!r}")
    return Endpoint(host=host.strip("[]") or "127.0.0.1", port=int(port))


def endpoint_from_url(url: str) -> Endpoint:
    """``unix:///run/scaled/scaled.sock``, ``unix:/path``, ``tcp://127.0.0.1:7070``, or a bare path."""
    if url.startswith("unix://"):
        return endpoint(path=url[len("unix://") :])
    if url.startswith("unix:"):
        return endpoint(path=url[len("unix:") :])
    if url.startswith("tcp://"):
        return endpoint(tcp=url[len("tcp://") :].rstrip("/"))
    if "://" in url:
        raise ValueError(f"scaled URLs are unix:// or tcp://, got {url!r}")
    return endpoint(path=url)


# ---------------------------------------------------------------------------------------------------
# Framing


def frame(body: bytes) -> bytes:
    """``body`` with its length prefix. Refuses a body over :data:`MAX_FRAME` rather than send it, since
    the daemon would close the connection (and fail every other request on it)."""
    if len(body) > MAX_FRAME:
        raise FrameTooLargeError(f"request of {len(body)} bytes is over the {MAX_FRAME}-byte frame limit")
    return _PREFIX.pack(len(body)) + body


class FrameDecoder:
    """Reassembles frame bodies from bytes as they arrive, in any split."""

    def __init__(self) -> None:
        #: Bytes received and not yet returned as a whole frame.
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Takes more bytes; returns the bodies of the frames now complete, in order.

        Raises :class:`ProtocolError` for a length prefix over :data:`MAX_FRAME`: the daemon never sends
        one, so the stream is broken and cannot be resynchronised.
        """
        buf = self._buf
        buf += data
        bodies: list[bytes] = []
        start = 0
        while len(buf) - start >= LEN_PREFIX:
            (length,) = _PREFIX.unpack_from(buf, start)
            if length > MAX_FRAME:
                raise ProtocolError(f"the daemon announced a {length}-byte frame, over the {MAX_FRAME} limit")
            end = start + LEN_PREFIX + length
            if len(buf) < end:
                break
            bodies.append(bytes(buf[start + LEN_PREFIX : end]))
            start = end
        if start:
            del buf[:start]
        return bodies

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame held now."""
        return len(self._buf)


# ---------------------------------------------------------------------------------------------------
# Requests


def encode_request(
    request_id: int,
    cmd: str,
    args: Optional[Mapping[str, Any]] = None,
    session_id: Optional[str] = None,
    user_id: Optional[str] = None,
) -> bytes:
    """The whole frame of one request: ``id``, ``cmd``, ``args`` (when there are any), ``session_id`` and
    ``user_id`` (when given), in the spec's order, with the members of ``args`` in :data:`ARG_ORDER`."""
    envelope: dict[str, Any] = {"id": request_id, "cmd": cmd}
    if args:
        ordered = {name: args[name] for name in ARG_ORDER if args.get(name) is not None}
        # Members the spec does not list yet (a newer command's) follow in the caller's order.
        ordered.update((k, v) for k, v in args.items() if k not in ordered and v is not None)
        if ordered:
            envelope["args"] = ordered
    if session_id is not None:
        envelope["session_id"] = session_id
    if user_id is not None:
        envelope["user_id"] = user_id
    return frame(msgpack.packb(envelope, use_bin_type=True))


# ---------------------------------------------------------------------------------------------------
# Responses


@dataclass(frozen=True)
class Response:
    """One answer, as the envelope of proto-spec.md ("Response envelope") carries it."""

    #: The request's ``id``; 0 for an error that belongs to no request.
    id: int
    #: The daemon's UUID for the request, named in its log lines about it.
    request_id: str
    #: Microseconds the daemon spent on the request.
    elapsed_us: int
    #: The command's answer when it succeeded (may be ``None``, as for a GET that misses).
    ok: Any
    #: The error when it failed.
    error: Optional[ServerError]
    #: True when the daemon says it answered from a fallback (the optional ``degraded`` member).
    degraded: bool = False

    def result(self) -> Any:
        """The ``ok`` value, or raises the error."""
        if self.error is not None:
            raise self.error
        return self.ok


def decode_response(body: bytes) -> Response:
    """Reads one response body. Raises :class:`ProtocolError` for anything that is not a response
    envelope; members it does not know are skipped."""
    try:
        envelope = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"the daemon sent a frame that is not MessagePack: {exc}") from None
    if not isinstance(envelope, dict):
        raise ProtocolError(f"the daemon sent a {type(envelope).__name__} where a response map belongs")
    rid = envelope.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool) or rid < 0:
        raise ProtocolError(f"response without a readable id: {envelope!r:.200}")
    request_id = envelope.get("request_id")
    if not isinstance(request_id, str):
        request_id = ""
    elapsed = envelope.get("elapsed_us")
    elapsed_us = elapsed if isinstance(elapsed, int) and not isinstance(elapsed, bool) else 0
    degraded = envelope.get("degraded") is True
    error: Optional[ServerError] = None
    if "err" in envelope:
        err = envelope["err"]
        if not isinstance(err, dict) or not isinstance(err.get("code"), str):
            raise ProtocolError(f"response {rid} has an err without a code: {err!r:.200}")
        message = err.get("message")
        error = error_from_wire(err["code"], message if isinstance(message, str) else "", request_id or None)
    elif "ok" not in envelope:
        raise ProtocolError(f"response {rid} has neither ok nor err")
    return Response(rid, request_id, elapsed_us, envelope.get("ok"), error, degraded)


# ---------------------------------------------------------------------------------------------------
# What the commands answer


@dataclass(frozen=True)
class Fence:
    """A fenced write's guard: make the write only while ``token`` is the newest grant of lock ``lock``."""

    #: The key of the lock whose grant guards the write (it need not be the key written).
    lock: str
    #: The fencing token of that grant.
    token: int


class HoldsGrant(Protocol):
    """Anything that holds a lock grant: a sync or asyncio lock, usable as ``fence=`` of a write."""

    @property
    def key(self) -> str: ...

    @property
    def fence(self) -> int: ...


#: What ``fence=`` of ``set()`` and ``delete()`` takes.
FenceLike = Union[Fence, HoldsGrant]


@dataclass(frozen=True)
class Grant:
    """LOCK's answer: the proof of ownership and the fencing token of this grant."""

    #: The owner token UNLOCK and EXTEND need; keep it to the holder.
    token: str
    #: Greater than every earlier grant's fencing token on this key; send it with writes made under it.
    fence: int
    #: The lease granted, in milliseconds.
    ttl_ms: int
    #: Microseconds the LOCK waited in the queue (0 when granted at once).
    waited_us: int


@dataclass(frozen=True)
class LockInfo:
    """One held lock, as LOCKS lists it."""

    #: The lock key.
    key: str
    #: Who holds it, for people: the holder's HELLO name, ``#`` and its connection number.
    owner: str
    #: The fencing token of the current grant.
    fence: int
    #: Milliseconds since it was granted to this holder.
    age_ms: int
    #: Milliseconds of lease left.
    ttl_ms: int
    #: Whether the lease renews itself while the holder's connection is open.
    auto_renew: bool
    #: LOCKs waiting in its queue.
    waiters: int


#: UNLOCK's and EXTEND's answer when the token held the lock.
STATUS_OK = "OK"


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request to make, and how to read its answer. Built by the functions below; run by a client."""

    #: The command name.
    cmd: str
    #: Its arguments, by wire name; ``None`` values are left out.
    args: dict[str, Any] = field(default_factory=dict)
    #: Turns the ``ok`` value into what the caller gets; raises :class:`ProtocolError` on a wrong shape.
    parse: Callable[[Any], T] = field(default=lambda ok: ok)
    #: Seconds the daemon may rightly hold the request before answering (a LOCK's wait, a PING's delay),
    #: added to the client's request timeout; ``None`` when the daemon decides (LOCK's default wait).
    holds_for: Optional[float] = 0.0
    #: For a LOCK, its key: a grant whose caller has given up is given back with an UNLOCK.
    lock_key: Optional[str] = None


def _ms(value: Seconds, what: str) -> int:
    seconds = value.total_seconds() if isinstance(value, datetime.timedelta) else float(value)
    if seconds < 0:
        raise ValueError(f"{what} must not be negative, got {seconds}")
    return round(seconds * 1000)


def _key(key: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"keys are str, got {type(key).__name__}")
    return key


def _value(value: ValueLike) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"values are bytes (or str, stored as UTF-8), got {type(value).__name__}")


def _fence(fence: Optional[FenceLike]) -> Optional[dict[str, Any]]:
    if fence is None:
        return None
    if isinstance(fence, Fence):
        return {"lock": fence.lock, "token": fence.token}
    return {"lock": fence.key, "token": fence.fence}


def _expect(kind: type, what: str) -> Callable[[Any], Any]:
    def parse(ok: Any) -> Any:
        if not isinstance(ok, kind):
            raise ProtocolError(f"{what} answered {ok!r:.200}")
        return ok

    return parse


def _uint(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"{what} is not an unsigned integer: {value!r:.100}")
    return value


def _member(answer: Any, name: str, what: str) -> Any:
    if not isinstance(answer, dict) or name not in answer:
        raise ProtocolError(f"{what} answered without `{name}`: {answer!r:.200}")
    return answer[name]


def _parse_hello(ok: Any) -> dict[str, Any]:
    version = _member(ok, "version", "HELLO")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"the daemon answered HELLO with protocol version {version!r}")
    return dict(ok)


def _parse_get(ok: Any) -> Optional[bytes]:
    if ok is None or isinstance(ok, bytes):
        return ok
    raise ProtocolError(f"GET answered {ok!r:.200}")


def _parse_grant(ok: Any) -> Grant:
    token = _member(ok, "token", "LOCK")
    if not isinstance(token, str):
        raise ProtocolError(f"LOCK answered a token that is not a str: {token!r:.100}")
    return Grant(
        token=token,
        fence=_uint(_member(ok, "fence", "LOCK"), "LOCK's fence"),
        ttl_ms=_uint(_member(ok, "ttl_ms", "LOCK"), "LOCK's ttl_ms"),
        waited_us=_uint(ok.get("waited_us", 0), "LOCK's waited_us"),
    )


def _parse_status(ok: Any) -> str:
    status = _member(ok, "status", "UNLOCK/EXTEND")
    if not isinstance(status, str):
        raise ProtocolError(f"lock status is not a str: {status!r:.100}")
    return status


def _parse_extend(ok: Any) -> tuple[str, int]:
    return _parse_status(ok), _uint(ok.get("ttl_ms", 0), "EXTEND's ttl_ms")


def _parse_locks(ok: Any) -> list[LockInfo]:
    # Version 1 answers an array. A paged answer, a map holding the page (under `locks`, or else its one
    # array member) beside members such as a total or a cursor, reads the same.
    rows = ok
    if isinstance(ok, dict):
        rows = ok.get("locks", next((v for v in ok.values() if isinstance(v, list)), None))
    if not isinstance(rows, list):
        raise ProtocolError(f"LOCKS answered {ok!r:.200}")
    out = []
    for row in rows:
        key, owner = _member(row, "key", "LOCKS"), row.get("owner", "")
        if not isinstance(key, str) or not isinstance(owner, str):
            raise ProtocolError(f"LOCKS answered a row without a str key: {row!r:.200}")
        out.append(
            LockInfo(
                key=key,
                owner=owner,
                fence=_uint(row.get("fence", 0), "LOCKS fence"),
                age_ms=_uint(row.get("age_ms", 0), "LOCKS age_ms"),
                ttl_ms=_uint(row.get("ttl_ms", 0), "LOCKS ttl_ms"),
                auto_renew=row.get("auto_renew") is True,
                waiters=_uint(row.get("waiters", 0), "LOCKS waiters"),
            )
        )
    return out


def hello(name: str, token: Optional[str] = None) -> Call[dict[str, Any]]:
    """HELLO: opens the conversation; answers the daemon's limits and name. ``token`` is the shared
    secret a TCP listener requires (a line of the daemon's ``--auth-token-file``)."""
    return Call("HELLO", {"version": PROTOCOL_VERSION, "client": name, "token": token}, _parse_hello)


def ping(delay: Optional[Seconds] = None) -> Call[bool]:
    """PING, answered after ``delay`` if given."""
    delay_ms = None if delay is None else _ms(delay, "delay")
    return Call(
        "PING",
        {"delay_ms": delay_ms or None},
        lambda ok: _expect(str, "PING")(ok) == "PONG",
        holds_for=(delay_ms or 0) / 1000,
    )


def get(key: str) -> Call[Optional[bytes]]:
    """GET: the value as bytes, or ``None``."""
    return Call("GET", {"key": _key(key)}, _parse_get)


def set(
    key: str, value: ValueLike, ttl: Optional[Seconds] = None, fence: Optional[FenceLike] = None
) -> Call[bool]:
    """SET: ``ttl`` ``None`` takes the daemon's CACHE_TTL; 0 never expires."""
    args = {
        "key": _key(key),
        "value": _value(value),
        "ttl_ms": None if ttl is None else _ms(ttl, "ttl"),
        "fence": _fence(fence),
    }
    return Call("SET", args, lambda ok: _expect(str, "SET")(ok) == "OK")


def delete(key: str, fence: Optional[FenceLike] = None) -> Call[bool]:
    """DEL: true when a live entry was removed."""
    return Call("DEL", {"key": _key(key), "fence": _fence(fence)}, _expect(bool, "DEL"))


def stats() -> Call[dict[str, Any]]:
    """STATS: the daemon's counters, as nested dicts."""
    return Call("STATS", {}, _expect(dict, "STATS"))


def lock(
    key: str,
    ttl: Optional[Seconds] = None,
    wait: Optional[Seconds] = None,
    blocking: bool = True,
    auto_renew: bool = False,
) -> Call[Grant]:
    """LOCK: ``ttl`` is the lease and ``wait`` how long to queue (``None``: the daemon's defaults);
    ``blocking=False`` tries once and raises ``LockedError`` if the lock is held."""
    wait_ms = None if wait is None else _ms(wait, "wait")
    args = {
        "key": _key(key),
        "ttl_ms": None if ttl is None else _ms(ttl, "ttl"),
        "wait_ms": wait_ms,
        "try": True if not blocking else None,
        "auto_renew": True if auto_renew else None,
    }
    holds_for = 0.0 if not blocking else (None if wait_ms is None else wait_ms / 1000)
    return Call("LOCK", args, _parse_grant, holds_for=holds_for, lock_key=key)


def unlock(key: str, token: str) -> Call[str]:
    """UNLOCK: answers a status, ``OK`` when the token held the lock."""
    return Call("UNLOCK", {"key": _key(key), "token": token}, _parse_status)


def extend(key: str, token: str, ttl: Optional[Seconds] = None) -> Call[tuple[str, int]]:
    """EXTEND: answers a status and the lease now in force in milliseconds (0 unless ``OK``)."""
    args = {"key": _key(key), "token": token, "ttl_ms": None if ttl is None else _ms(ttl, "ttl")}
    return Call("EXTEND", args, _parse_extend)


def locks() -> Call[list[LockInfo]]:
    """LOCKS without paging: the first 1000 held locks by key (the clients page with
    :func:`locks_page` to see them all)."""
    return Call("LOCKS", {}, _parse_locks)


#: The most rows one LOCKS page holds; the daemon takes a larger ``limit`` as this.
MAX_LOCKS_PAGE = 1000


def locks_page(after: Optional[str] = None) -> Call[tuple[list[LockInfo], Optional[str]]]:
    """LOCKS, one page: the held locks after ``after`` by key, and the ``after`` of the next page
    (``None`` when this page reached the last lock). A daemon older than paging answers the whole list
    as an array, which reads as a last page."""
    args = {"limit": MAX_LOCKS_PAGE, "after": after}
    return Call("LOCKS", args, _parse_locks_page)


def _parse_locks_page(ok: Any) -> tuple[list[LockInfo], Optional[str]]:
    rows = _parse_locks(ok)
    after = ok.get("next") if isinstance(ok, dict) else None
    if after is not None and not isinstance(after, str):
        raise ProtocolError(f"LOCKS answered a next of {after!r:.200}")
    return rows, after


# ---------------------------------------------------------------------------------------------------
# The JSON helper shared by both clients


def dump_json(obj: Any) -> bytes:
    """``obj`` as compact UTF-8 JSON, the form ``set_json`` stores. Raises ``TypeError`` for anything JSON
    cannot hold, rather than store something that would not read back the same."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def load_json(raw: Optional[bytes]) -> Any:
    """The object ``dump_json`` stored, or ``None`` for a missing entry."""
    return None if raw is None else json.loads(raw)
