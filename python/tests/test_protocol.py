"""The protocol core on its own (no daemon): framing in any split, how answers a newer daemon may send
are read, and the error table."""

from __future__ import annotations

import contextlib
import datetime
import random
import struct

import msgpack
import pytest

import scaled
from scaled import protocol
from scaled.errors import ERRORS_BY_CODE, error_from_wire

REQUEST_ID = "3f2b8c1e-9a4d-4e7f-b1c2-0d5e6f7a8b9c"


def answer(**members: object) -> bytes:
    envelope = {"id": 7, "request_id": REQUEST_ID, "elapsed_us": 12, **members}
    return msgpack.packb(envelope, use_bin_type=True)


def test_frames_are_reassembled_from_any_split() -> None:
    bodies = [answer(ok="PONG"), answer(ok=b"\x00" * 70_000), answer(ok=None)]
    stream = b"".join(protocol.frame(b) for b in bodies)
    for step in (1, 3, 4, 5, 1000, len(stream)):
        decoder = protocol.FrameDecoder()
        got = []
        for i in range(0, len(stream), step):
            got.extend(decoder.feed(stream[i : i + step]))
        assert got == bodies, f"split every {step} bytes"
        assert decoder.pending == 0


def test_a_length_prefix_over_the_limit_is_a_broken_stream() -> None:
    with pytest.raises(scaled.ProtocolError, match="over the"):
        protocol.FrameDecoder().feed(struct.pack(">I", protocol.MAX_FRAME + 1))


def test_a_body_at_the_limit_is_a_frame_and_one_over_is_refused_before_sending() -> None:
    assert len(protocol.frame(b"x" * protocol.MAX_FRAME)) == protocol.MAX_FRAME + 4
    with pytest.raises(scaled.FrameTooLargeError):
        protocol.frame(b"x" * (protocol.MAX_FRAME + 1))
    with pytest.raises(scaled.FrameTooLargeError):
        protocol.encode_request(1, "SET", protocol.set("k", b"x" * protocol.MAX_FRAME).args)


def test_unknown_envelope_members_are_ignored_and_degraded_is_surfaced() -> None:
    plain = protocol.decode_response(answer(ok="OK", shard=3, trace={"a": [1, 2]}, **{"x": None}))
    assert (plain.ok, plain.error, plain.degraded) == ("OK", None, False)
    degraded = protocol.decode_response(answer(ok=b"v", degraded=True, later_member="?"))
    assert degraded.ok == b"v" and degraded.degraded is True
    # Members in another order, and a non-str key, read the same.
    body = msgpack.packb({1: "x", "ok": "PONG", "elapsed_us": 1, "request_id": REQUEST_ID, "id": 9})
    assert protocol.decode_response(body).ok == "PONG"


def test_an_unknown_error_code_is_handled_as_internal() -> None:
    response = protocol.decode_response(answer(err={"code": "CORRUPTED_VALUE", "message": "checksum"}))
    err = response.error
    assert isinstance(err, scaled.UnknownServerError)
    assert isinstance(err, scaled.InternalError) and isinstance(err, scaled.ServerError)
    assert err.error_code == "CORRUPTED_VALUE" and err.code == "INTERNAL"
    assert err.message == "checksum" and err.request_id == REQUEST_ID
    with pytest.raises(scaled.InternalError, match="CORRUPTED_VALUE: checksum"):
        response.result()


def test_every_known_code_maps_to_its_own_class() -> None:
    for code, cls in ERRORS_BY_CODE.items():
        err = error_from_wire(code, "m", REQUEST_ID)
        assert type(err) is cls and err.code == err.error_code == code
    assert len(set(ERRORS_BY_CODE.values())) == len(ERRORS_BY_CODE)


def test_errors_that_mean_what_a_builtin_means_are_one() -> None:
    assert isinstance(error_from_wire("LOCK_TIMEOUT", "m"), TimeoutError)
    assert isinstance(error_from_wire("BAD_ARGUMENT", "m"), ValueError)
    assert isinstance(scaled.RequestTimeout("m"), TimeoutError)


@pytest.mark.parametrize(
    "body",
    [
        msgpack.packb([1, 2]),
        msgpack.packb({"request_id": REQUEST_ID, "ok": 1}),
        msgpack.packb({"id": -1, "ok": 1}),
        msgpack.packb({"id": 1, "request_id": REQUEST_ID}),
        msgpack.packb({"id": 1, "err": "text"}),
        b"\xc1",
        b"",
    ],
)
def test_what_is_not_a_response_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(scaled.ProtocolError):
        protocol.decode_response(body)


def test_answers_of_the_wrong_shape_are_protocol_errors() -> None:
    with pytest.raises(scaled.ProtocolError):
        protocol.get("k").parse("text")
    with pytest.raises(scaled.ProtocolError):
        protocol.lock("k").parse({"token": "t"})
    with pytest.raises(scaled.ProtocolError):
        protocol.delete("k").parse(1)


def test_locks_reads_the_array_and_a_paged_answer_alike() -> None:
    row = {
        "key": "a",
        "owner": "web#1",
        "fence": 5,
        "age_ms": 1,
        "ttl_ms": 2,
        "auto_renew": False,
        "waiters": 0,
    }
    parse = protocol.locks().parse
    assert parse([row]) == parse({"locks": [row], "total": 1, "next": None, "new_member": 1})
    assert parse([row]) == parse({"total": 1, "page": [row], "cursor": "x"})
    assert parse([row])[0].owner == "web#1"


def test_durations_are_seconds_or_timedeltas_sent_as_milliseconds() -> None:
    assert protocol.set("k", b"v", ttl=1.5).args["ttl_ms"] == 1500
    assert protocol.set("k", b"v", ttl=datetime.timedelta(minutes=5)).args["ttl_ms"] == 300_000
    assert protocol.set("k", b"v", ttl=0).args["ttl_ms"] == 0
    with pytest.raises(ValueError):
        protocol.set("k", b"v", ttl=-1)
    with pytest.raises(TypeError):
        protocol.get(b"bytes-key")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        protocol.set("k", 12)  # type: ignore[arg-type]


def test_endpoints() -> None:
    assert protocol.endpoint_from_url("unix:///run/x.sock").path == "/run/x.sock"
    assert protocol.endpoint_from_url("/tmp/s").path == "/tmp/s"
    tcp = protocol.endpoint_from_url("tcp://127.0.0.1:7070")
    assert (tcp.host, tcp.port) == ("127.0.0.1", 7070)
    assert protocol.endpoint(tcp="7070") == protocol.Endpoint(host="127.0.0.1", port=7070)
    with pytest.raises(ValueError):
        protocol.endpoint("/a", tcp="1")
    with pytest.raises(ValueError):
        protocol.endpoint_from_url("http://x")


def test_arbitrary_bytes_from_the_daemon_are_a_response_or_a_protocol_error_never_a_crash() -> None:
    rng = random.Random(20261129)
    valid = [
        answer(ok="PONG"),
        answer(ok={"token": "t", "fence": 1, "ttl_ms": 2, "waited_us": 0}),
        answer(err={"code": "LOCKED", "message": "held"}, degraded=True),
    ]
    bodies = [bytes(rng.randrange(256) for _ in range(rng.randrange(64))) for _ in range(2000)]
    for body in valid:  # and every valid answer with bytes flipped, cut short or extended
        for _ in range(700):
            mutated = bytearray(body)
            for _ in range(rng.randrange(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            bodies.append(bytes(mutated[: rng.randrange(1, len(mutated) + 8)]))
    for body in bodies:
        try:
            response = protocol.decode_response(body)
        except scaled.ProtocolError:
            continue
        assert isinstance(response, protocol.Response)
        for call in (protocol.get("k"), protocol.lock("k"), protocol.locks(), protocol.extend("k", "t")):
            with contextlib.suppress(scaled.ProtocolError):
                call.parse(response.ok)
    decoder = protocol.FrameDecoder()
    for body in bodies[:500]:
        try:
            decoder.feed(body)
        except scaled.ProtocolError:
            decoder = protocol.FrameDecoder()
