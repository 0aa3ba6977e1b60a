"""proto-spec.md against the Python client: every hex test vector, byte for byte, and the spec's tables.

- Request vectors: the client's command builders and encoder produce exactly the vector's frame.
- Response vectors: the client decodes each to the expected envelope and answer, and the vector is the
  smallest encoding of what it holds (so a decoder that dropped or changed anything would show).
- Replayed to a running daemon, the request vectors get answers whose ``ok``/``err`` part is byte for
  byte the one in the response vector (the lock story with the owner and fencing tokens the daemon
  really granted in place of the vector's fixed ones).
- The error-code table and the ``args`` table list exactly what the client knows, in order.
"""

from __future__ import annotations

from typing import Any, Callable

import msgpack
import pytest

import scaled
from scaled import protocol
from scaled.errors import ERRORS_BY_CODE
from scaled.protocol import Call, Fence, Grant

from conftest import Daemon
from spec import RawConn, body_of, head_length, parse_vectors, section, spec_text, table_names

VALUE = bytes([0x00, 0x01, 0x02, 0xFE, 0xFF])
KEY = "session:abc"
LOCK_KEY = "session:42"
OWNER_TOKEN = "5f0c8a1e-2b7d-4c39-a6e4-1d9b3f7c2e80"
FIRST_FENCE = 1_764_201_600_000_001
FENCED_VALUE = b"cart:3"

VECTORS = parse_vectors(spec_text())


def fixed_request_id(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


#: Each request vector: its id, the call that must encode to it, and the session and user it carries.
REQUESTS: dict[str, tuple[int, Call[Any], dict[str, str]]] = {
    "hello-request": (1, protocol.hello("example"), {}),
    "ping-request": (2, protocol.ping(), {}),
    "set-request": (3, protocol.set(KEY, VALUE, ttl=60), {}),
    "get-request": (4, protocol.get(KEY), {"session_id": "sess-7f3a", "user_id": "user-42"}),
    "del-request": (5, protocol.delete(KEY), {}),
    "get-without-key-request": (7, Call("GET"), {}),
    "lock-request": (8, protocol.lock(LOCK_KEY, ttl=30, wait=5), {}),
    "lock-try-request": (9, protocol.lock(LOCK_KEY, blocking=False), {}),
    "extend-request": (10, protocol.extend(LOCK_KEY, OWNER_TOKEN, ttl=60), {}),
    "unlock-request": (11, protocol.unlock(LOCK_KEY, OWNER_TOKEN), {}),
    "set-fenced-request": (
        13,
        protocol.set(LOCK_KEY, FENCED_VALUE, fence=Fence(LOCK_KEY, FIRST_FENCE)),
        {},
    ),
}

HELLO_ANSWER = {
    "version": 1,
    "server": "scaled 0.1.0",
    "max_frame": protocol.MAX_FRAME,
    "max_key": protocol.MAX_KEY,
    "max_value": protocol.MAX_VALUE,
}

#: Each response vector: id, number of its fixed request_id, elapsed_us, and either
#: ("ok", the parser of its command, the parsed answer) or ("err", the class, the message).
RESPONSES: dict[str, tuple[int, int, int, tuple[Any, ...]]] = {
    "hello-response": (1, 1, 42, ("ok", protocol.hello("x").parse, HELLO_ANSWER)),
    "ping-response": (2, 2, 7, ("ok", protocol.ping().parse, True)),
    "set-response": (3, 3, 15, ("ok", protocol.set("k", b"").parse, True)),
    "get-hit-response": (4, 4, 9, ("ok", protocol.get("k").parse, VALUE)),
    "del-response": (5, 5, 11, ("ok", protocol.delete("k").parse, True)),
    "get-miss-response": (6, 6, 8, ("ok", protocol.get("k").parse, None)),
    "bad-argument-response": (7, 7, 5, ("err", scaled.BadArgumentError, "missing argument `key`")),
    "malformed-response": (0, 8, 0, ("err", scaled.MalformedError, "stream ended 3 bytes into a frame")),
    "lock-response": (
        8,
        9,
        23,
        ("ok", protocol.lock("k").parse, Grant(OWNER_TOKEN, FIRST_FENCE, 30_000, 0)),
    ),
    "locked-response": (9, 10, 6, ("err", scaled.LockedError, "lock `session:42` is held")),
    "extend-response": (10, 11, 12, ("ok", protocol.extend("k", "t").parse, ("OK", 60_000))),
    "unlock-response": (11, 12, 14, ("ok", protocol.unlock("k", "t").parse, "OK")),
    "unlock-not-owner-response": (12, 13, 8, ("ok", protocol.unlock("k", "t").parse, "NOT_OWNER")),
    "fenced-response": (
        13,
        14,
        10,
        (
            "err",
            scaled.FencedError,
            f"fencing token {FIRST_FENCE} on lock `session:42` is not the newest grant ({FIRST_FENCE + 1})",
        ),
    ),
}


def test_the_spec_holds_every_expected_vector_each_one_whole_frame() -> None:
    for name in [*REQUESTS, *RESPONSES]:
        assert name in VECTORS, f"proto-spec.md has no vector {name}"
    for name, frame in VECTORS.items():
        assert name.endswith(("-request", "-response")), name
        body_of(name, frame)


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_request_vectors_are_what_the_client_encodes(name: str) -> None:
    request_id, call, tags = REQUESTS[name]
    frame = protocol.encode_request(request_id, call.cmd, call.args, **tags)
    assert frame.hex(" ") == VECTORS[name].hex(" ")


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_every_vector_is_the_smallest_encoding_of_what_it_holds(name: str) -> None:
    body = body_of(name, VECTORS[name])
    decoded = msgpack.unpackb(body, raw=False)
    assert msgpack.packb(decoded, use_bin_type=True) == body


@pytest.mark.parametrize("name", sorted(RESPONSES))
def test_response_vectors_decode_to_the_expected_answers(name: str) -> None:
    rid, n, elapsed, expected = RESPONSES[name]
    response = protocol.decode_response(body_of(name, VECTORS[name]))
    assert (response.id, response.request_id, response.elapsed_us) == (rid, fixed_request_id(n), elapsed)
    assert response.degraded is False
    if expected[0] == "ok":
        _, parse, value = expected
        assert response.error is None
        assert parse(response.ok) == value
    else:
        _, cls, message = expected
        assert type(response.error) is cls
        assert response.error.message == message
        assert response.error.request_id == fixed_request_id(n)
        with pytest.raises(cls):
            response.result()


def test_the_error_table_lists_exactly_the_codes_the_client_has_a_class_for() -> None:
    codes = table_names(section(spec_text(), "Error codes"), "Code")
    assert codes == list(ERRORS_BY_CODE)


def test_the_args_table_is_the_order_requests_use() -> None:
    # The first table is the envelope's, the second the members of `args`.
    text = section(spec_text(), "Request envelope")
    args = table_names(text[text.index("`args` is one map") :], "Key")
    assert tuple(args) == protocol.ARG_ORDER


# ---------------------------------------------------------------------------------------------------
# Replayed to a running daemon


def answer_part(body: bytes) -> tuple[dict[str, Any], bytes]:
    """A response body's envelope, and its bytes from the ``ok``/``err`` member on; checks the head is
    the smallest encoding of ``id``, ``request_id`` and ``elapsed_us``."""
    envelope = msgpack.unpackb(body, raw=False)
    assert list(envelope)[:3] == ["id", "request_id", "elapsed_us"]
    cut = head_length(envelope)
    head = {k: envelope[k] for k in ("id", "request_id", "elapsed_us")}
    assert body[:cut] == bytes([0x84]) + msgpack.packb(head, use_bin_type=True)[1:]
    return envelope, body[cut:]


def vector_answer(name: str, replace: Callable[[Any], Any] = lambda v: v) -> bytes:
    """The ``ok``/``err`` part of a response vector, with ``replace`` applied to the decoded answer."""
    envelope, tail = answer_part(body_of(name, VECTORS[name]))
    if "ok" in envelope:
        return msgpack.packb("ok") + msgpack.packb(replace(envelope["ok"]), use_bin_type=True)
    return tail


def test_the_cache_story_replayed_to_the_daemon_answers_the_vectors_bytes(daemon: Daemon) -> None:
    conn = RawConn(daemon.socket_path)
    try:
        get_miss = protocol.encode_request(6, "GET", {"key": KEY})
        story = [
            ("hello-request", "hello-response"),
            ("ping-request", "ping-response"),
            ("set-request", "set-response"),
            ("get-request", "get-hit-response"),
            ("del-request", "del-response"),
            (get_miss, "get-miss-response"),
            ("get-without-key-request", "bad-argument-response"),
        ]
        for request, response in story:
            conn.send(VECTORS[request] if isinstance(request, str) else request)
            envelope, tail = answer_part(conn.recv())
            want_id = RESPONSES[response][0]
            assert envelope["id"] == want_id, response
            if response == "hello-response":
                # The server string names the daemon's version, which may move on: compare the rest.
                assert msgpack.unpackb(tail[3:])["version"] == 1
            else:
                assert tail == vector_answer(response), response
    finally:
        conn.close()


def test_the_lock_story_replayed_to_the_daemon_answers_the_vectors_bytes(daemon: Daemon) -> None:
    a, b = RawConn(daemon.socket_path), RawConn(daemon.socket_path)
    try:
        for conn in (a, b):
            conn.send(VECTORS["hello-request"])
            assert "ok" in msgpack.unpackb(conn.recv())
        a.send(VECTORS["lock-request"])
        envelope, tail = answer_part(a.recv())
        token, fence = envelope["ok"]["token"], envelope["ok"]["fence"]
        assert tail == vector_answer("lock-response", lambda ok: {**ok, "token": token, "fence": fence})

        b.send(VECTORS["lock-try-request"])
        assert answer_part(b.recv())[1] == vector_answer("locked-response")

        def with_token(name: str) -> bytes:
            rid, call, _ = REQUESTS[name]
            return protocol.encode_request(rid, call.cmd, {**call.args, "token": token})

        a.send(with_token("extend-request"))
        assert answer_part(a.recv())[1] == vector_answer("extend-response")
        a.send(with_token("unlock-request"))
        assert answer_part(a.recv())[1] == vector_answer("unlock-response")

        b.send(protocol.encode_request(20, "LOCK", {"key": LOCK_KEY}))
        second = msgpack.unpackb(b.recv())["ok"]
        assert second["fence"] > fence

        a.send(protocol.encode_request(12, "UNLOCK", {"key": LOCK_KEY, "token": token}))
        assert answer_part(a.recv())[1] == vector_answer("unlock-not-owner-response")

        stale = Fence(LOCK_KEY, fence)
        a.send(protocol.encode_request(13, "SET", protocol.set(LOCK_KEY, FENCED_VALUE, fence=stale).args))
        err = msgpack.unpackb(answer_part(a.recv())[1][4:])
        want = msgpack.unpackb(vector_answer("fenced-response")[4:])
        assert err["code"] == want["code"] == "FENCED"
        assert err["message"] == want["message"].replace(str(FIRST_FENCE + 1), str(second["fence"])).replace(
            str(FIRST_FENCE), str(fence)
        )
    finally:
        a.close()
        b.close()
