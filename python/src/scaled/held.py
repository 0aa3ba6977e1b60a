"""What a held lock is on either client: its key, the grant, the connection that took it, and whether
it is still held. :class:`scaled.Lock` (sync) and :class:`scaled.aio.AsyncLock` add the calls that
extend and release it, each in its own way of waiting."""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

from .protocol import Grant


class _Connection(Protocol):
    """The one thing a held lock asks of its connection: whether it has ended."""

    closed: bool


ClientT = TypeVar("ClientT")
ConnT = TypeVar("ConnT", bound=_Connection)


class HeldLock(Generic[ClientT, ConnT]):
    """A granted lock and the connection that took it: the daemon releases it when that ends."""

    def __init__(self, client: ClientT, key: str, grant: Grant, conn: ConnT, degraded: bool) -> None:
        #: The client whose connection took the lock; UNLOCK and EXTEND go through it.
        self._client = client
        #: The lock's key.
        self._key = key
        #: What the daemon granted: owner token, fencing token, lease, time waited.
        self.grant = grant
        #: The connection that took the lock: the daemon releases the lock when it ends.
        self._conn = conn
        #: True when the daemon granted it from a fallback (``degraded`` on LOCK's answer).
        self.degraded = degraded
        #: Set by the first release, so a second one does nothing.
        self._released = False

    @property
    def key(self) -> str:
        """The lock's key."""
        return self._key

    @property
    def fence(self) -> int:
        """The fencing token: greater than that of every earlier grant of this key."""
        return self.grant.fence

    @property
    def token(self) -> str:
        """The owner token UNLOCK and EXTEND need."""
        return self.grant.token

    @property
    def held(self) -> bool:
        """False once released, or once the connection that took it has ended (which released it). A
        lease that ran out is only found out by ``extend``, ``release`` or a fenced write."""
        return not self._released and not self._conn.closed
