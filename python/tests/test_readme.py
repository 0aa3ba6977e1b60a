"""The README's Python quick start, run as it is written, against the real daemon."""

from __future__ import annotations

import pytest

import scaled

from conftest import REPO_ROOT, Daemon


def quick_start() -> str:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    python = readme[readme.index("\n## Python\n") :]
    block = python[python.index("Quick start:") :]
    start = block.index("```python\n") + len("```python\n")
    return block[start : block.index("```", start)]


def test_the_quick_start_runs_as_written(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    code = quick_start()
    assert len(code.strip().splitlines()) == 5
    monkeypatch.setenv("SCALED_SOCKET", daemon.socket_path)
    exec(compile(code, "README.md", "exec"), {})
    with scaled.Client(daemon.socket_path) as client:
        assert client.get_json("session:42") == {"cart": 3}
        assert client.locks() == []
