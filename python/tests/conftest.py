"""Shared fixtures: the real ``scaled`` daemon, started on a socket in a fresh temporary directory.

The binary is ``target/debug/scaled`` of this repository (``scripts/test-python`` builds it), or the one
``$SCALED_BIN`` names. Its environment is cleared of every variable the daemon reads (``SCALED_*``,
``REDIS_*``, ``CACHE_*``, ``LOCK_*``), so the caller's settings cannot change a test.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, Optional

import pytest

import scaled

#: The repository's root: python/tests/ is two levels below it.
REPO_ROOT = Path(__file__).resolve().parents[2]

#: How long a daemon may take to start serving or to exit before the test fails.
STARTUP_LIMIT = 20.0

#: Terminal colour codes in the daemon's log lines.
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")

#: Prefixes of the environment variables the daemon reads.
DAEMON_ENV_PREFIXES = ("SCALED_", "REDIS_", "CACHE_", "LOCK_")


def daemon_binary() -> Path:
    """The daemon to test: ``$SCALED_BIN``, else ``target/debug/scaled`` under the repository root."""
    override = os.environ.get("SCALED_BIN")
    path = Path(override) if override else REPO_ROOT / "target" / "debug" / "scaled"
    if not path.is_file():
        pytest.fail(f"no scaled binary at {path}: run `cargo build` (or set SCALED_BIN)", pytrace=False)
    return path


def clean_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """This process's environment without the daemon's settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(DAEMON_ENV_PREFIXES)}
    env.update(extra or {})
    return env


def wait_for(what: str, check: Callable[[], bool], limit: float = STARTUP_LIMIT) -> None:
    """Polls ``check`` until it holds; fails the test naming ``what`` after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {limit} s waiting for {what}", pytrace=False)
        time.sleep(0.01)


class Daemon:
    """A running ``scaled`` on ``socket_path``, its log in ``log_path``."""

    def __init__(self, workdir: Path, args: tuple[str, ...] = (), log: str = "warn") -> None:
        #: The temporary directory holding the socket and the log.
        self.workdir = workdir
        #: The daemon's Unix socket.
        self.socket_path = str(workdir / "scaled.sock")
        #: The daemon's stderr (its log lines).
        self.log_path = workdir / "scaled.log"
        #: Extra command-line arguments.
        self.args = args
        #: The log filter (``--log``).
        self.log = log
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.start()

    def start(self) -> None:
        """Starts the daemon and waits until its socket accepts connections."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(daemon_binary()), "--socket", self.socket_path, "--log", self.log, *self.args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=clean_env(),
            )
        wait_for(f"scaled to serve {self.socket_path}", self._accepts)

    def _accepts(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"scaled exited with {self.proc.returncode}:\n{self.log_text()}", pytrace=False)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(self.socket_path)
            except OSError:
                return False
        return True

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signals the daemon and waits for it to exit."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(STARTUP_LIMIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"scaled did not exit within {STARTUP_LIMIT} s of signal {sig}", pytrace=False)
        self.proc = None

    def restart(self) -> None:
        """Stops the daemon and starts a new one on the same socket."""
        self.stop()
        self.start()

    def log_text(self) -> str:
        """What the daemon has logged so far, without the terminal colour codes it writes."""
        return ANSI_ESCAPE.sub("", self.log_path.read_text(errors="replace"))

    def client(self, **kwargs: object) -> scaled.Client:
        """A sync client on this daemon."""
        return scaled.Client(self.socket_path, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A fresh directory with a short path: a Unix socket path must fit in 108 bytes, which pytest's
    ``tmp_path`` (named after the test) can exceed."""
    path = Path(tempfile.mkdtemp(prefix="scaled-py-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[Daemon]:
    """A daemon of its own for the test, stopped afterwards."""
    d = Daemon(short_tmp)
    try:
        yield d
    finally:
        d.stop(signal.SIGKILL)


@pytest.fixture
def client(daemon: Daemon) -> Iterator[scaled.Client]:
    """A sync client on the test's daemon."""
    c = daemon.client()
    try:
        yield c
    finally:
        c.close()
