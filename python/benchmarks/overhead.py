#!/usr/bin/env python3
"""What one call costs through the Python client, next to a bare redis-py GET on the same machine.

One caller, one request at a time, a GET that hits a 3-byte value, ``--calls`` calls per measurement:

- ``scaled sync``: ``scaled.Client.get`` (encode, hand-off to the reader thread, decode);
- ``scaled asyncio``: ``await scaled.aio.Client.get``;
- ``scaled raw socket``: the same GET frame written and its answer read on a plain blocking socket,
  the floor the clients add to;
- ``redis-py``: ``redis.Redis.get`` on one connection (``--redis-port``), and ``redis raw socket``,
  the same GET in RESP on a plain socket.

Each measurement runs ``--rounds`` times, interleaved; the line per round and the medians are printed
as JSON. Microseconds per call, wall clock.

    python overhead.py --socket /tmp/bench-scaled.sock --redis-port 6391 --calls 20000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import time
from typing import Callable

import redis

import scaled
import scaled.aio
from scaled import protocol

KEY, VALUE = "bench:key", b"abc"


def per_call(calls: int, fn: Callable[[], object]) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def scaled_sync(path: str, calls: int) -> float:
    with scaled.Client(path) as client:
        client.set(KEY, VALUE, ttl=0)
        return per_call(calls, lambda: client.get(KEY))


def scaled_asyncio(path: str, calls: int) -> float:
    async def main() -> float:
        async with scaled.aio.Client(path) as client:
            await client.set(KEY, VALUE, ttl=0)
            await client.get(KEY)
            start = time.perf_counter()
            for _ in range(calls):
                await client.get(KEY)
            return (time.perf_counter() - start) / calls * 1e6

    return asyncio.run(main())


def scaled_raw(path: str, calls: int) -> float:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        decoder = protocol.FrameDecoder()

        def exchange(frame: bytes) -> bytes:
            sock.sendall(frame)
            while True:
                bodies = decoder.feed(sock.recv(65536))
                if bodies:
                    return bodies[0]

        exchange(protocol.encode_request(1, "HELLO", protocol.hello("bench").args))
        get = protocol.encode_request(2, "GET", {"key": KEY})  # one id: one request in flight at a time
        return per_call(calls, lambda: exchange(get))


def redis_py(port: int, calls: int) -> float:
    client = redis.Redis(host="127.0.0.1", port=port)
    client.set(KEY, VALUE)
    try:
        return per_call(calls, lambda: client.get(KEY))
    finally:
        client.close()


def redis_raw(port: int, calls: int) -> float:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        get = f"*2\r\n$3\r\nGET\r\n${len(KEY)}\r\n{KEY}\r\n".encode()
        answer = f"${len(VALUE)}\r\n".encode() + VALUE + b"\r\n"

        def exchange() -> None:
            sock.sendall(get)
            got = b""
            while len(got) < len(answer):
                got += sock.recv(4096)

        return per_call(calls, exchange)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", required=True, help="the scaled daemon's Unix socket")
    ap.add_argument("--redis-port", type=int, required=True, help="a redis-server on 127.0.0.1")
    ap.add_argument("--calls", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    runs: dict[str, Callable[[], float]] = {
        "scaled sync": lambda: scaled_sync(args.socket, args.calls),
        "scaled asyncio": lambda: scaled_asyncio(args.socket, args.calls),
        "scaled raw socket": lambda: scaled_raw(args.socket, args.calls),
        "redis-py": lambda: redis_py(args.redis_port, args.calls),
        "redis raw socket": lambda: redis_raw(args.redis_port, args.calls),
    }
    results: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.rounds):
        # Odd rounds run in reverse order, so a busy moment of the machine does not always hit the same one.
        order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
        for name in order:
            results[name].append(round(runs[name](), 2))
        print(json.dumps({"round": round_ + 1, **{k: v[-1] for k, v in results.items()}}), flush=True)
    print(json.dumps({"median_us_per_call": {k: statistics.median(v) for k, v in results.items()}}))


if __name__ == "__main__":
    main()
