"""The session and user a request is made for, carried to the daemon with every request made inside
:func:`tagged`.

The ids live in a :class:`contextvars.ContextVar`, so they belong to the thread or asyncio task that set
them: a new thread starts with none, an asyncio task starts with a copy of its creator's, and leaving the
``with`` block restores what was there before. Nothing is shared between callers, so one request's ids can
never travel with another's. The daemon writes them into its log lines for the request (``session_id``,
``user_id``), next to its own ``request_id``.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Tags:
    """The ids the requests made in a context carry."""

    #: The app's session the requests belong to (the envelope's ``session_id``).
    session_id: Optional[str] = None
    #: The app's user they are made for (the envelope's ``user_id``).
    user_id: Optional[str] = None


#: The tags of the current thread or task; ``None`` outside every :func:`tagged` block.
_current: contextvars.ContextVar[Optional[Tags]] = contextvars.ContextVar("scaled_tags", default=None)


@contextmanager
def tagged(session_id: Optional[str] = None, user_id: Optional[str] = None) -> Iterator[Tags]:
    """Every request made inside the block, by any client, carries ``session_id`` and ``user_id``.

    Nested blocks replace the outer ids for their duration. Safe across threads and asyncio tasks: each
    sees only its own.
    """
    tags = Tags(session_id, user_id)
    token = _current.set(tags)
    try:
        yield tags
    finally:
        _current.reset(token)


def current() -> Optional[Tags]:
    """The tags of the innermost :func:`tagged` block around the caller, or ``None``."""
    return _current.get()
