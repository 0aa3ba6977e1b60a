"""The sync client against the real daemon: every command, errors as their classes, the connection's
life (HELLO, reconnect after a restart, in-flight calls failing, timeouts, the connection limit), and the
session and user ids reaching the daemon's logs."""

from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path

import pytest

import scaled

from conftest import Daemon, wait_for

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_hello_and_the_cache_commands(client: scaled.Client) -> None:
    info = client.connect()
    assert info["version"] == 1 and info["max_value"] == 1024 * 1024
    assert client.ping() is True
    assert client.get("session:1") is None
    assert client.set("session:1", bytes(range(256))) is True
    assert client.get("session:1") == bytes(range(256))
    assert client.set("session:1", "naïve") is True  # a str is stored as its UTF-8 bytes
    assert client.get("session:1") == "naïve".encode()
    assert client.set("empty", b"") is True and client.get("empty") == b""
    assert client.delete("session:1") is True
    assert client.delete("session:1") is False
    stats = client.stats()
    assert stats["cache"]["hits"] == 3 and stats["cache"]["misses"] == 1
    assert stats["connections"]["current"] == 1


def test_a_ttl_expires_the_entry(client: scaled.Client) -> None:
    client.set("short", b"v", ttl=0.05)
    client.set("forever", b"v", ttl=0)
    wait_for("the 50 ms entry to expire", lambda: client.get("short") is None, limit=10)
    assert client.get("forever") == b"v"


def test_json_helper_round_trips_json_state_and_refuses_the_rest(client: scaled.Client) -> None:
    state = {"user_id": "u1", "counter": 3, "filters": {"beds": [2, 3]}, "note": "é", "ok": True, "x": None}
    client.set_json("session:json", state, ttl=60)
    assert client.get_json("session:json") == state
    assert (
        client.get("session:json")
        == b'{"user_id":"u1","counter":3,"filters":{"beds":[2,3]},"note":"\xc3\xa9","ok":true,"x":null}'
    )
    assert client.get_json("missing") is None
    with pytest.raises(TypeError):
        client.set_json("bad", {"when": object()})
    with pytest.raises(ValueError):
        client.set_json("bad", float("nan"))


def test_errors_arrive_as_their_classes_with_the_daemons_request_id(client: scaled.Client) -> None:
    client.connect()
    connections = client.stats()["connections"]["total"]
    with pytest.raises(scaled.BadArgumentError) as empty:
        client.get("")
    assert UUID.match(empty.value.request_id or ""), empty.value.request_id
    with pytest.raises(scaled.TooLargeError):
        client.get("k" * 1025)
    with pytest.raises(scaled.TooLargeError):
        client.set("k", b"v" * (1024 * 1024 + 1))
    with pytest.raises(scaled.BadArgumentError):
        client.ping(delay=61)
    with pytest.raises(scaled.BadArgumentError):
        client.lock("k", ttl=86_400.001)
    unknown = client.execute("FLUSHALL")
    assert isinstance(unknown.error, scaled.UnknownCommandError)
    with pytest.raises(scaled.UnknownCommandError):
        unknown.result()
    # None of these broke the connection.
    assert client.stats()["connections"]["total"] == connections


def test_a_frame_over_the_limit_is_refused_before_it_is_sent(client: scaled.Client) -> None:
    connections = client.stats()["connections"]["total"]
    with pytest.raises(scaled.FrameTooLargeError):
        client.set("k", b"v" * (2 * 1024 * 1024))
    assert client.ping() and client.stats()["connections"]["total"] == connections


def test_the_session_and_user_ids_reach_the_daemons_log_lines(short_tmp: Path) -> None:
    daemon = Daemon(short_tmp, log="scaled=debug")
    try:
        with daemon.client() as client, scaled.tagged(session_id="sess-7f3a", user_id="user-42"):
            with pytest.raises(scaled.BadArgumentError) as failed:
                client.get("")  # a failed request is logged at debug
        line = f"request_id={failed.value.request_id}"
        wait_for("the request's log line", lambda: line in daemon.log_text())
        logged = next(entry for entry in daemon.log_text().splitlines() if line in entry)
        assert 'session_id="sess-7f3a"' in logged and 'user_id="user-42"' in logged
    finally:
        daemon.stop(signal.SIGKILL)


def test_in_flight_calls_fail_with_connection_lost_and_are_never_retried(daemon: Daemon) -> None:
    client = daemon.client()
    errors: list[BaseException] = []

    def slow_ping() -> None:
        try:
            client.ping(delay=30)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=slow_ping) for _ in range(5)]
    for t in threads:
        t.start()
    wait_for("five PINGs in flight", lambda: client.in_flight == 5)
    daemon.stop(signal.SIGKILL)
    for t in threads:
        t.join(20)
        assert not t.is_alive(), "a call in flight was not failed when the connection died"
    assert len(errors) == 5 and all(isinstance(e, scaled.ConnectionLost) for e in errors), errors

    daemon.start()
    wait_for("the client to see the connection end", lambda: not client.connected)
    stats = client.stats()  # reconnects, says HELLO again
    assert "PING" not in stats["performance"]["commands"], "a lost PING was sent again"
    client.close()


def test_the_client_reconnects_after_a_daemon_restart(daemon: Daemon) -> None:
    client = daemon.client()
    client.set("k", b"before")
    daemon.restart()
    wait_for("the client to see the connection end", lambda: not client.connected)
    assert client.get("k") is None  # the new daemon starts empty
    client.set("k", b"after")
    assert client.get("k") == b"after"
    assert client.connected
    client.close()


def test_callers_see_clear_errors_while_the_daemon_is_killed_and_restarted(daemon: Daemon) -> None:
    """Threads keep working through one client while the daemon dies (SIGKILL) and a new one starts:
    each call either succeeds or fails at once with ConnectError or ConnectionLost, none hangs, and
    all of them succeed again once the daemon is back."""
    client = daemon.client(timeout=20)
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}
    unclear: list[BaseException] = []
    lock = threading.Lock()

    def work(w: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                client.set(f"w{w}", str(n))
                assert client.get(f"w{w}") in (str(n).encode(), None)
                outcome = "ok"
            except (scaled.ConnectError, scaled.ConnectionLost, scaled.ShuttingDownError):
                outcome = "failed"
                stop.wait(0.005)
            except BaseException as e:  # reported by the test below
                with lock:
                    unclear.append(e)
                return
            with lock:
                counts[outcome] += 1

    def more(what: str, outcome: str) -> None:
        with lock:
            start = counts[outcome]

        def grown() -> bool:
            with lock:
                return counts[outcome] >= start + 20 or bool(unclear)

        wait_for(what, grown)
        assert not unclear, f"an unclear error across the restart: {unclear[0]!r}"

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        more("calls before the restart", "ok")
        daemon.stop(signal.SIGKILL)
        more("clear errors while the daemon is away", "failed")
        daemon.start()
        more("calls after the restart", "ok")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads), "a call hung across the restart"
    assert not unclear, f"an unclear error across the restart: {unclear[0]!r}"
    client.close()


def test_no_daemon_is_a_connect_error(short_tmp: Path) -> None:
    client = scaled.Client(str(short_tmp / "nothing.sock"), connect_timeout=1)
    with pytest.raises(scaled.ConnectError, match=r"nothing\.sock"):
        client.ping()


def test_a_late_answer_is_a_request_timeout_and_the_connection_goes_on(daemon: Daemon) -> None:
    client = daemon.client(timeout=0.2)
    client.ping(delay=0.5)  # the client waits a delayed PING's delay on top of its timeout
    with pytest.raises(scaled.RequestTimeout):
        client.execute("PING", {"delay_ms": 3000})  # a raw command: only the timeout
    assert client.ping() and client.get("k") is None
    client.close()


def test_the_connection_limit_answers_overloaded(short_tmp: Path) -> None:
    daemon = Daemon(short_tmp, args=("--max-connections", "1"))
    try:
        first = daemon.client()

        def first_connects() -> bool:
            # The probe that saw the daemon start may still hold the one connection for a moment.
            try:
                return first.ping()
            except scaled.OverloadedError:
                return False

        wait_for("the first client to be let in", first_connects)
        with pytest.raises(scaled.OverloadedError):
            daemon.client().ping()
        assert first.ping()
        first.close()
    finally:
        daemon.stop(signal.SIGKILL)


def test_a_closed_client_refuses_calls(client: scaled.Client) -> None:
    client.ping()
    client.close()
    with pytest.raises(scaled.ScaledError, match="closed"):
        client.ping()


def test_tcp_and_urls(short_tmp: Path) -> None:
    import socket as sockets

    with sockets.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = Daemon(short_tmp, args=("--tcp", str(port)))
    try:
        with (
            scaled.Client(tcp=f"127.0.0.1:{port}") as tcp,
            scaled.Client.from_url(f"unix://{daemon.socket_path}") as unix,
        ):
            tcp.set("shared", b"one cache")
            assert unix.get("shared") == b"one cache"
    finally:
        daemon.stop(signal.SIGKILL)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_client_made_before_fork_works_in_the_child_and_the_parent(client: scaled.Client) -> None:
    client.set("k", b"parent")
    pid = os.fork()
    if pid == 0:  # the child: its own connection, the parent's left alone
        code = 1
        try:
            if client.get("k") == b"parent" and client.set("k", b"child"):
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert client.get("k") == b"child"  # the parent's connection still works
    wait_for("the child's connection to close", lambda: client.stats()["connections"]["current"] == 1)
