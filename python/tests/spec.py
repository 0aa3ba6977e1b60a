"""Reading proto-spec.md: its hex test vectors and its tables, straight from the document, as the Rust
tests do, so the Python client cannot drift from the contract without a test failing."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import msgpack

from scaled import protocol

#: The protocol contract, at the repository's root.
SPEC_PATH = Path(__file__).resolve().parents[2] / "proto-spec.md"


def spec_text() -> str:
    return SPEC_PATH.read_text(encoding="utf-8")


def parse_vectors(text: str) -> dict[str, bytes]:
    """Every ```` ```hex name=<name> ```` block, by name, in document order. Each line is an offset, up to
    16 hex bytes and an ASCII column between ``|`` bars; offsets and the ASCII column are checked, so a
    typo in the document is a failure that names the line rather than a wrong vector."""
    vectors: dict[str, bytes] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        i += 1
        if not line.startswith("```hex"):
            continue
        info = line[len("```hex") :].strip()
        assert info.startswith("name="), f"line {i}: a hex block needs name=<name>"
        name = info[len("name=") :]
        assert re.fullmatch(r"[a-z0-9-]+", name), f"line {i}: bad vector name {name!r}"
        assert name not in vectors, f"line {i}: vector {name} appears twice"
        data = bytearray()
        while True:
            assert i < len(lines), f"vector {name}: block never closed"
            row = lines[i]
            i += 1
            if row.strip() == "```":
                break
            hex_part, bar, ascii_part = row.partition("|")
            tokens = hex_part.split()
            if not tokens:
                continue
            assert int(tokens[0], 16) == len(data), f"line {i}: offset does not follow the bytes before it"
            start = len(data)
            for token in tokens[1:]:
                assert len(token) == 2, f"line {i}: {token!r} is not a two-digit hex byte"
                data.append(int(token, 16))
            assert 1 <= len(data) - start <= 16, f"line {i}: a line holds 1 to 16 bytes"
            if bar:
                shown = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in data[start:])
                column = ascii_part.rstrip()
                column = column[:-1] if column.endswith("|") else column
                assert column == shown, f"line {i}: the ASCII column does not match the bytes"
        assert data, f"vector {name} is empty"
        vectors[name] = bytes(data)
    return vectors


def body_of(name: str, frame: bytes) -> bytes:
    """The body of a whole frame, checked with the client's own frame decoder."""
    decoder = protocol.FrameDecoder()
    bodies = decoder.feed(frame)
    assert len(bodies) == 1 and decoder.pending == 0, f"vector {name} is not exactly one frame"
    return bodies[0]


def section(text: str, title: str) -> str:
    """The text of ``## <title>`` up to the next ``## `` heading."""
    start = text.index(f"\n## {title}\n") + len(title) + 5
    end = text.find("\n## ", start)
    return text[start : end if end >= 0 else len(text)]


def table_names(text: str, header: str) -> list[str]:
    """The back-quoted names in the first column of the table whose header row starts ``| <header> |``."""
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    names = []
    for line in lines[head + 2 :]:
        if not line.startswith("|"):
            break
        match = re.match(r"\|\s*`([^`]+)`", line)
        assert match, f"table row without a `name`: {line}"
        names.append(match.group(1))
    return names


def head_length(envelope: dict[str, object]) -> int:
    """Bytes of a response body up to the ``ok``/``err`` member: the map header and the three members
    ``id``, ``request_id``, ``elapsed_us``, each in its smallest encoding."""
    pack = msgpack.packb
    return 1 + sum(len(pack(k)) + len(pack(envelope[k])) for k in ("id", "request_id", "elapsed_us"))


class RawConn:
    """A socket to the daemon that speaks frames directly, for replaying the vectors as they are."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(path)
        self.decoder = protocol.FrameDecoder()
        self.ready: list[bytes] = []

    def send(self, frame: bytes) -> None:
        self.sock.sendall(frame)

    def recv(self) -> bytes:
        """The next response body; fails after 20 s."""
        deadline = time.monotonic() + 20
        while not self.ready:
            assert time.monotonic() < deadline, "no answer from scaled within 20 s"
            data = self.sock.recv(65536)
            assert data, "scaled closed the connection"
            self.ready.extend(self.decoder.feed(data))
        return self.ready.pop(0)

    def close(self) -> None:
        self.sock.close()
