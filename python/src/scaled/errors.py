"""Everything a call to the daemon can fail with, and the table from wire error codes to classes.

Two families, both under :class:`ScaledError`:

- :class:`ServerError` and its subclasses: the daemon answered with an ``err``. There is one class per
  error code of proto-spec.md ("Error codes"), listed once in :data:`ERRORS_BY_CODE`. A code this client
  does not know (a newer daemon may add some) becomes an :class:`UnknownServerError`, a subclass of
  :class:`InternalError`, as the spec asks ("fail that request as it would for INTERNAL").
- Failures on this side: :class:`ConnectError` (no connection or no HELLO), :class:`ConnectionLost` (the
  connection ended with the request unanswered), :class:`RequestTimeout`, :class:`ProtocolError` (the
  daemon sent something outside the protocol) and :class:`LockLost` (a lock was no longer held when it
  was released or extended).

Errors that also mean what a built-in exception means subclass it too, so code written for the original
API keeps working: :class:`LockTimeoutError` and :class:`RequestTimeout` are :class:`TimeoutError`\\ s.
"""

from __future__ import annotations

from typing import ClassVar, Optional


class ScaledError(Exception):
    """Base class of every error this package raises about the daemon or the connection to it."""


class ConnectError(ScaledError):
    """The daemon could not be reached, or did not accept HELLO. Nothing was sent.

    Safe to retry: no request of the caller's had been sent on the connection that failed.
    """


class ConnectionLost(ScaledError):
    """The connection ended while this request was in flight; whether the daemon carried it out is unknown.

    Such a request is never retried by the client: a SET may or may not have been written, a LOCK may or
    may not have been granted (if it was, the daemon released it when the connection ended). The next
    call opens a new connection.
    """

    def __init__(self, message: str, cause: Optional[ServerError] = None) -> None:
        super().__init__(message)
        #: The connection-level error the daemon sent before closing (``id`` 0), if it sent one: for
        #: example ``OVERLOADED`` at its connection limit or ``FRAME_TOO_LARGE``.
        self.cause = cause


class RequestTimeout(ScaledError, TimeoutError):
    """No answer within the client's request timeout. The request may still be carried out.

    A LOCK that times out on this side is not left held: if its grant arrives later, the client gives
    the lock back with an UNLOCK.
    """


class ProtocolError(ScaledError):
    """The daemon sent something this client cannot read as protocol version 1. The connection is closed."""


class LockLost(ScaledError):
    """A lock was no longer held by this owner when it was released or extended.

    ``status`` is the daemon's answer: ``EXPIRED`` (the lease ran out and the lock was taken away),
    ``NOT_OWNER`` (someone else holds it now), ``NOT_LOCKED`` (nobody holds it), or ``CONNECTION_LOST``
    (the connection that took it ended, which released it). Writes made under the lock after it was
    lost may have overlapped the next holder's; fenced writes were refused instead.
    """

    def __init__(self, key: str, status: str) -> None:
        super().__init__(f"lock {key!r} was no longer held: {status}")
        #: The lock's key.
        self.key = key
        #: What the daemon (or the client, for ``CONNECTION_LOST``) found.
        self.status = status


class ServerError(ScaledError):
    """The daemon answered this request with an error. ``code`` is the wire code, ``message`` for people."""

    #: The wire code this class stands for.
    code: ClassVar[str] = ""

    def __init__(self, message: str, request_id: Optional[str] = None) -> None:
        self._init(self.code, message, request_id)

    def _init(self, error_code: str, message: str, request_id: Optional[str]) -> None:
        shown = f"{error_code}: {message}"
        # Named, not super(): a subclass that is also a LockLost must not reach LockLost.__init__.
        ScaledError.__init__(self, shown if request_id is None else f"{shown} (request {request_id})")
        #: The code as the daemon sent it: ``code``, except for an :class:`UnknownServerError`.
        self.error_code = error_code
        #: The daemon's sentence; it may change between versions, so do not parse it.
        self.message = message
        #: The daemon's UUID for the request, named in its logs; ``None`` for errors raised on this side.
        self.request_id = request_id


class MalformedError(ServerError):
    """``MALFORMED``: the daemon could not read the request as a request envelope."""

    code = "MALFORMED"


class FrameTooLargeError(ServerError):
    """``FRAME_TOO_LARGE``: a request frame over 2 MiB. Raised before sending; the daemon would close."""

    code = "FRAME_TOO_LARGE"


class HelloRequiredError(ServerError):
    """``HELLO_REQUIRED``: a command before HELLO succeeded (the client always says HELLO first)."""

    code = "HELLO_REQUIRED"


class UnsupportedVersionError(ServerError):
    """``UNSUPPORTED_VERSION``: the daemon does not speak protocol version 1."""

    code = "UNSUPPORTED_VERSION"


class UnknownCommandError(ServerError):
    """``UNKNOWN_COMMAND``: the daemon does not know the command (an older daemon, a newer command)."""

    code = "UNKNOWN_COMMAND"


class BadArgumentError(ServerError, ValueError):
    """``BAD_ARGUMENT``: a required argument is missing, a key is empty, or a number is out of range."""

    code = "BAD_ARGUMENT"


class TooLargeError(ServerError, ValueError):
    """``TOO_LARGE``: a key over 1024 bytes, a value over 1 MiB, or an entry too big for the cache."""

    code = "TOO_LARGE"


class OverloadedError(ServerError):
    """``OVERLOADED``: the daemon is at its connection limit, or this connection has the most waiting
    requests allowed (``SCALED_MAX_IN_FLIGHT``). The request had no effect; try again later."""

    code = "OVERLOADED"


class ShuttingDownError(ServerError):
    """``SHUTTING_DOWN``: the daemon began shutting down while this LOCK waited; it was not granted."""

    code = "SHUTTING_DOWN"


class LockedError(ServerError):
    """``LOCKED``: a LOCK in try mode (``blocking=False``) found the lock held."""

    code = "LOCKED"


class LockTimeoutError(ServerError, TimeoutError):
    """``LOCK_TIMEOUT``: the LOCK waited its whole ``wait`` in the queue without being granted."""

    code = "LOCK_TIMEOUT"


class FencedError(ServerError):
    """``FENCED``: a fenced SET or DEL carried a token that is not the lock's newest grant; nothing was
    written. The lock has passed to another holder: stop, and do not retry with the same token."""

    code = "FENCED"


class LockLostError(ServerError, LockLost):
    """``LOCK_LOST`` (daemons with Redis only): UNLOCK or EXTEND named the token of a lock that was lost
    without its holder letting go (a renewal in Redis failed, or another daemon was granted it while
    Redis was away). Also a :class:`LockLost`, with ``status`` ``LOCK_LOST``, so code that handles a
    lost lock handles this one too."""

    code = "LOCK_LOST"

    def __init__(self, message: str, request_id: Optional[str] = None) -> None:
        super().__init__(message, request_id)
        #: The daemon's error names the lock in its message only.
        self.key = ""
        self.status = "LOCK_LOST"


class CorruptedError(ServerError):
    """``CORRUPTED`` (daemons with Redis only): the value in Redis failed its checksum, or is not in the
    daemon's format; it was not served. It stays until a SET or DEL replaces it."""

    code = "CORRUPTED"


class UnavailableError(ServerError):
    """``UNAVAILABLE``: a backend the command needs (Redis) cannot be reached."""

    code = "UNAVAILABLE"


class InternalError(ServerError):
    """``INTERNAL``: a bug or an unexpected failure inside the daemon."""

    code = "INTERNAL"


class ConnectionTimedOutError(ServerError):
    """``TIMEOUT``: the daemon closed the connection as too slow (no HELLO in time, a frame left
    unfinished, or idle past ``SCALED_IDLE_TIMEOUT``). It arrives with id 0; the next call reconnects."""

    code = "TIMEOUT"


class DeniedError(ServerError, PermissionError):
    """``DENIED``: access control refused this client: its uid or gid is not allowed on the Unix
    socket, or its ``token`` (required over TCP) is missing or wrong. The daemon closed the connection."""

    code = "DENIED"


class UnknownServerError(InternalError):
    """An error code this client does not know, handled as ``INTERNAL`` (proto-spec.md, "Error codes").

    ``error_code`` holds the code the daemon sent; ``code`` stays ``INTERNAL``.
    """

    def __init__(self, error_code: str, message: str, request_id: Optional[str] = None) -> None:
        self._init(error_code, message, request_id)


#: The error codes of proto-spec.md, each with its class: the one table from wire codes to exceptions.
ERRORS_BY_CODE: dict[str, type[ServerError]] = {
    cls.code: cls
    for cls in (
        MalformedError,
        FrameTooLargeError,
        HelloRequiredError,
        UnsupportedVersionError,
        UnknownCommandError,
        BadArgumentError,
        TooLargeError,
        OverloadedError,
        ShuttingDownError,
        LockedError,
        LockTimeoutError,
        FencedError,
        LockLostError,
        CorruptedError,
        UnavailableError,
        InternalError,
        ConnectionTimedOutError,
        DeniedError,
    )
}


def error_from_wire(code: str, message: str, request_id: Optional[str] = None) -> ServerError:
    """The exception for an ``err`` the daemon sent: its code's class, or :class:`UnknownServerError`."""
    cls = ERRORS_BY_CODE.get(code)
    if cls is None:
        return UnknownServerError(code, message, request_id)
    return cls(message, request_id)
