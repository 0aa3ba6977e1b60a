"""Python client of ``scaled``, the sidecar daemon that gives the app servers on a host a shared session
cache, session locks with fencing tokens, and request metrics.

The map of the package:

- :mod:`scaled.protocol`: frames, request encoding, answer decoding and every command's arguments, with
  no I/O; shared by both clients.
- :mod:`scaled.errors`: one exception class per error code of the protocol, and the client's own errors.
- :mod:`scaled.client`: :class:`Client`, the sync client (one connection, a reader thread routing answers
  by request id to any number of threads), and :class:`Lock`.
- :mod:`scaled.aio`: the same on asyncio.
- :mod:`scaled.context`: :func:`tagged`, the session and user ids that travel with requests.
- :mod:`scaled.compat`: the original architecture's ``scalability_manager`` API on top of the daemon.

Quick start::

    import scaled

    client = scaled.Client()                      # $SCALED_SOCKET or /run/scaled/scaled.sock
    client.set("session:42", b"state", ttl=300)
    with client.lock("session:42") as lock:       # one writer per session, across processes
        client.set("session:42", b"new", fence=lock)
"""

from .client import Client, Lock
from .context import Tags, tagged
from .errors import (
    ERRORS_BY_CODE,
    BadArgumentError,
    ConnectError,
    ConnectionLost,
    ConnectionTimedOutError,
    CorruptedError,
    DeniedError,
    FencedError,
    FrameTooLargeError,
    HelloRequiredError,
    InternalError,
    LockedError,
    LockLost,
    LockLostError,
    LockTimeoutError,
    MalformedError,
    OverloadedError,
    ProtocolError,
    RequestTimeout,
    ScaledError,
    ServerError,
    ShuttingDownError,
    TooLargeError,
    UnavailableError,
    UnknownCommandError,
    UnknownServerError,
    UnsupportedVersionError,
)
from .protocol import Fence, Grant, LockInfo, Response

__version__ = "0.1.0"

__all__ = [
    "ERRORS_BY_CODE",
    "BadArgumentError",
    "Client",
    "ConnectError",
    "ConnectionLost",
    "ConnectionTimedOutError",
    "CorruptedError",
    "DeniedError",
    "Fence",
    "FencedError",
    "FrameTooLargeError",
    "Grant",
    "HelloRequiredError",
    "InternalError",
    "Lock",
    "LockInfo",
    "LockLost",
    "LockLostError",
    "LockTimeoutError",
    "LockedError",
    "MalformedError",
    "OverloadedError",
    "ProtocolError",
    "RequestTimeout",
    "Response",
    "ScaledError",
    "ServerError",
    "ShuttingDownError",
    "Tags",
    "TooLargeError",
    "UnavailableError",
    "UnknownCommandError",
    "UnknownServerError",
    "UnsupportedVersionError",
    "__version__",
    "tagged",
]
