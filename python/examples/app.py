"""The original architecture's chat endpoint as a Flask app, written against its ``scalability_manager``
API and run on ``scaled`` by importing that API from ``scaled.compat``.

One message: lock the session, read its state, change it, write it, unlock. Served by gunicorn with
several worker processes and threads in each, in front of one daemon::

    cd python/examples
    SCALED_SOCKET=/run/scaled/scaled.sock gunicorn -w 4 -k gthread --threads 16 -b 127.0.0.1:8000 app:app

Endpoints: ``POST /api/message`` (``{"session_id", "user_id", "message"}``), ``GET /api/session/<id>``
(the stored state, for checking) and ``GET /api/stats`` (the original's stats document).

For comparison, ``EXAMPLE_BACKEND=original`` runs the very same handler on the original design (the
Python baseline's ``seed_manager.py``, found in ``$ORIGINAL_MANAGER_DIR``, with Redis at ``$REDIS_URL``):
its cache is per process, so the session state of record is written through to Redis, as the original
document prescribes.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

from flask import Flask, Response, jsonify, request

BACKEND = os.environ.get("EXAMPLE_BACKEND", "scaled")
#: How long a session's state lives without a message, in seconds.
SESSION_TTL = 3600

if BACKEND == "original":
    sys.path.insert(0, os.environ["ORIGINAL_MANAGER_DIR"])
    from seed_manager import (  # type: ignore[import-not-found]
        RequestContext,
        get_scalability_manager,
        with_performance_tracking,
        with_request_context,
    )

    manager = get_scalability_manager(redis_url=os.environ["REDIS_URL"])
    store: Any = manager.redis  # the original's session store of record, behind its per-process cache
elif BACKEND == "scaled":
    from scaled.compat import (
        RequestContext,
        get_scalability_manager,
        with_performance_tracking,
        with_request_context,
    )

    manager = get_scalability_manager()
    store = None  # the daemon's cache is shared by every process: no store behind it is needed here
else:
    sys.exit(f"EXAMPLE_BACKEND is scaled or original, not {BACKEND!r}")

app = Flask(__name__)


def load_state(key: str) -> Optional[dict[str, Any]]:
    """The session's state: the cache first, then (original design only) its store on a miss."""
    state = manager.cache_get(key)
    if state is None and store is not None:
        raw = store.get(key)
        state = json.loads(raw) if raw else None
    return state


def save_state(key: str, state: dict[str, Any]) -> None:
    """Writes the state (through to the store for the original design), then caches it."""
    if store is not None:
        store.set(key, json.dumps(state))
    manager.cache_set(key, state, ttl=SESSION_TTL)


@with_request_context
@with_performance_tracking
def process_user_message(session_id: str, user_id: str, message: str) -> dict[str, Any]:
    """The original's message flow: lock the session, read its state, change it, write it, unlock."""
    key = f"session:{session_id}"
    with manager.acquire_session_lock(session_id):
        state = load_state(key) or {"session_id": session_id, "user_id": user_id, "counter": 0}
        if state["user_id"] != user_id:
            return {"success": False, "error": "session belongs to another user", "session_id": session_id}
        state = {
            **state,
            "counter": state["counter"] + 1,
            "last_message": message,
            "last_request_id": RequestContext.get_request_id(),
        }
        save_state(key, state)
    return {
        "success": True,
        "response": f"Noted message {state['counter']} of session {session_id}",
        "request_id": RequestContext.get_request_id(),
        "session_id": state["session_id"],
        "user_id": state["user_id"],
        "counter": state["counter"],
        "last_message": state["last_message"],
        "processing_time": RequestContext.get_request_duration(),
    }


@app.post("/api/message")
def message() -> tuple[Response, int]:
    body = request.get_json(force=True)
    result = process_user_message(
        session_id=str(body["session_id"]), user_id=str(body["user_id"]), message=str(body.get("message", ""))
    )
    return jsonify(result), 200 if result["success"] else 409


@app.get("/api/session/<session_id>")
def session(session_id: str) -> tuple[Response, int]:
    key = f"session:{session_id}"
    # The state of record: the shared cache with scaled; the store behind the per-process caches otherwise.
    if store is not None:
        raw = store.get(key)
        state = json.loads(raw) if raw else None
    else:
        state = manager.cache_get(key)
    return jsonify(state), 200 if state is not None else 404


@app.get("/api/stats")
def stats() -> Response:
    return jsonify(manager.get_stats())
