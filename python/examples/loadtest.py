#!/usr/bin/env python3
"""The original document's load test, against the example app over HTTP, with its results checked.

N users, each a thread of a ``ThreadPoolExecutor(max_workers=N)`` as in the document, send M messages
each to ``POST /api/message`` on their own session, one after the other. Each message goes on a new
connection, as behind a load balancer without session affinity (the document's "session affinity: NOT
required"), so a user's messages reach any of the app's worker processes; ``--keep-alive`` keeps one
connection per user instead, which pins each user to one worker.
Each answer must be a success for the sender's own session and user, echoing the sender's own message,
with the session's counter one higher than the sender's last. At the end every session's stored state
(``GET /api/session/<id>``) must hold its own user's id and a counter equal to the messages its user
sent. One JSON line reports throughput, per-message latency and every check; the exit status is 0 only
when all checks pass.

    python loadtest.py --url http://127.0.0.1:8000 --users 100 --messages 20
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional
from urllib.parse import urlsplit


class Http:
    """HTTP/1.1 to the app: a new connection per request, or one kept alive (reopened after an error)."""

    def __init__(self, url: str, timeout: float, keep_alive: bool = False) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout = timeout
        self.keep_alive = keep_alive
        self.conn: Optional[http.client.HTTPConnection] = None

    def request(self, method: str, path: str, body: Optional[dict[str, Any]] = None) -> tuple[int, Any]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            if not self.keep_alive:
                headers["Connection"] = "close"
            self.conn.request(method, path, body=payload, headers=headers)
            response = self.conn.getresponse()
            data = response.read()
            if not self.keep_alive:
                self.conn.close()
                self.conn = None
            return response.status, json.loads(data) if data else None
        except BaseException:
            self.conn.close()
            self.conn = None
            raise


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q))] if values else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--messages", type=int, default=20, help="messages per user")
    ap.add_argument(
        "--think-ms", type=float, default=0.0, help="pause after each message (the document: 100)"
    )
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one answer")
    ap.add_argument("--keep-alive", action="store_true", help="one connection per user (pins it to a worker)")
    ap.add_argument("--label", default="", help="copied into the JSON line")
    args = ap.parse_args()

    run = uuid.uuid4().hex[:8]  # fresh sessions on every run, so runs against one daemon never meet
    sessions = [f"{run}-session-{i}" for i in range(args.users)]
    users = [f"{run}-user-{i}" for i in range(args.users)]
    start = threading.Barrier(args.users + 1)
    guard = threading.Lock()
    latencies: list[float] = []
    sent: Counter[str] = Counter()  # session -> messages answered with success
    problems: Counter[str] = Counter()

    def simulate_user(i: int) -> None:
        http = Http(args.url, args.timeout, args.keep_alive)
        session_id, user_id = sessions[i], users[i]
        mine: list[float] = []
        ok = 0
        trouble: Counter[str] = Counter()
        start.wait()
        for n in range(args.messages):
            text = f"message {n} from {user_id}"
            t0 = time.perf_counter()
            try:
                status, answer = http.request(
                    "POST", "/api/message", {"session_id": session_id, "user_id": user_id, "message": text}
                )
            except Exception as exc:  # counted and reported
                trouble[f"error {type(exc).__name__}"] += 1
                mine.append(time.perf_counter() - t0)
                continue
            mine.append(time.perf_counter() - t0)
            if status != 200 or not isinstance(answer, dict) or not answer.get("success"):
                trouble[f"failed HTTP {status}"] += 1
                continue
            if (answer.get("session_id"), answer.get("user_id"), answer.get("last_message")) != (
                session_id,
                user_id,
                text,
            ):
                trouble["foreign_responses"] += 1  # another user's data in this user's answer
                continue
            ok += 1
            if answer.get("counter") != ok:
                trouble["stale_counter"] += 1  # read a state that missed this user's earlier writes
            if args.think_ms:
                time.sleep(args.think_ms / 1000)
        with guard:
            latencies.extend(mine)
            sent[session_id] += ok
            problems.update(trouble)

    with ThreadPoolExecutor(max_workers=args.users) as executor:
        futures = [executor.submit(simulate_user, i) for i in range(args.users)]
        start.wait()
        began = time.perf_counter()
        for f in futures:
            f.result()
        elapsed = time.perf_counter() - began

    # The checks on what was stored.
    lost = mismatched = foreign_states = 0
    checker = Http(args.url, args.timeout)
    for session_id, user_id in zip(sessions, users):
        status, state = checker.request("GET", f"/api/session/{session_id}")
        counter = state.get("counter", 0) if status == 200 and isinstance(state, dict) else 0
        if status == 200 and state.get("user_id") != user_id:
            foreign_states += 1
        if counter != sent[session_id]:
            mismatched += 1
            lost += max(0, sent[session_id] - counter)

    latencies.sort()
    total, succeeded = args.users * args.messages, sum(sent.values())
    ms = lambda s: round(s * 1000, 2)  # noqa: E731
    result = {
        "label": args.label,
        "users": args.users,
        "messages": args.messages,
        "think_ms": args.think_ms,
        "keep_alive": args.keep_alive,
        "elapsed_s": round(elapsed, 3),
        "messages_per_s": round(succeeded / elapsed, 1) if elapsed else 0.0,
        "p50_ms": ms(pct(latencies, 0.50)),
        "p95_ms": ms(pct(latencies, 0.95)),
        "p99_ms": ms(pct(latencies, 0.99)),
        "max_ms": ms(latencies[-1]) if latencies else 0.0,
        "total_messages": total,
        "successful_messages": succeeded,
        "lost_updates": lost,
        "sessions_mismatched": mismatched,
        "foreign_responses": problems.pop("foreign_responses", 0),
        "foreign_states": foreign_states,
        "stale_counters": problems.pop("stale_counter", 0),
        "errors": dict(problems),
    }
    print(json.dumps(result), flush=True)
    passed = (
        succeeded == total
        and lost
        == mismatched
        == foreign_states
        == result["foreign_responses"]
        == result["stale_counters"]
        == 0
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
