"""The example app end to end, in a short version: gunicorn with several worker processes and threads in
front of the real daemon, driven by the example load script, whose own checks must all pass."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Daemon, clean_env, wait_for

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def answers(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/api/stats")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


@pytest.fixture
def app_server(daemon: Daemon) -> Iterator[int]:
    """The example app under gunicorn (2 workers × 4 threads) on a free port, using the test's daemon."""
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--chdir",
            str(EXAMPLES),
            "-w",
            "2",
            "-k",
            "gthread",
            "--threads",
            "4",
            "-b",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
            "app:app",
        ],
        env=clean_env({"SCALED_SOCKET": daemon.socket_path}),
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_for("gunicorn to serve the example app", lambda: server.poll() is None and answers(port))
        yield port
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_the_example_app_serves_the_load_script_with_every_check_passing(
    app_server: int, daemon: Daemon
) -> None:
    run = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "loadtest.py"),
            "--url",
            f"http://127.0.0.1:{app_server}",
            "--users",
            "8",
            "--messages",
            "6",
            "--timeout",
            "30",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout)
    assert result["successful_messages"] == 48
    assert result["lost_updates"] == result["foreign_responses"] == result["foreign_states"] == 0

    with daemon.client() as client:
        stats = client.stats()
    # Both workers' messages went through the one daemon: every message took the session lock.
    assert stats["locks"]["grants"] == 48
    assert stats["connections"]["total"] >= 2

    conn = http.client.HTTPConnection("127.0.0.1", app_server, timeout=10)
    conn.request("GET", "/api/stats")
    document = json.loads(conn.getresponse().read())
    assert set(document) >= {"cache", "performance", "redis"}
